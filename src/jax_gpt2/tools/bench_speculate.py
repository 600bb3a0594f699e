"""Speculative decoding beside plain decoding, in one process, on the same weights: tokens/s of each,
the drafts' acceptance rate and mean accepted length, and what a verify pass costs against a decode
step (the bound on what any acceptance rate can give). Never a timed test.

Plain and speculative calls alternate, repeat by repeat, so a noisy host disturbs both alike; each
figure is the median over repeats, with the spread. Decode rates leave the prefill out: the time
of a 1-token call is subtracted from an N-token call's.

Workloads (random weights cannot say how often a real model copies its prompt, so a bracket):
    repeat   greedy, the prompt a random passage said three times (lookups hit, drafts agree)
    loop     greedy, a random prompt (a random model's greedy output falls into loops by itself)
    sampled  temperature 1, top_p 0.95, a random prompt: open-ended, lookups rarely agree
"""

import dataclasses
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jax_gpt2.config import GPT2Config
from jax_gpt2.generate import generate_speculative, generate_with_settings, prefill, settings_from_arguments
from jax_gpt2.speculate import DraftModel, PromptLookup, start_speculating, verify
from jax_gpt2.weights import GPT2Weights

WORKLOADS = {
    "repeat": dict(temperature=0.0, top_p=None),
    "loop": dict(temperature=0.0, top_p=None),
    "sampled": dict(temperature=1.0, top_p=0.95),
}


def workload_prompts(name: str, batch: int, length: int, vocab_size: int, seed: int = 0) -> list[list[int]]:
    """`batch` prompts of `length` tokens for a workload: a passage said three times, or random tokens."""
    assert name in WORKLOADS
    assert length >= 3
    rng = np.random.default_rng(seed)
    if name == "repeat":
        passages = rng.integers(0, vocab_size, (batch, length // 3))
        return [np.tile(passage, 3).tolist() + passage[: length - 3 * (length // 3)].tolist() for passage in passages]
    return rng.integers(0, vocab_size, (batch, length)).tolist()


def _settings(name: str, new_tokens: int, seed: int):
    sampling = WORKLOADS[name]
    return settings_from_arguments(new_tokens, sampling["temperature"], None, sampling["top_p"], None, None, seed)


def compare_workload(
    name: str, weights: GPT2Weights, config: GPT2Config, speculate: PromptLookup, batch: int, prompt_len: int,
    new_tokens: int, repeats: int,
) -> dict:  # fmt: skip
    """Plain and speculative decode rates (tokens/s, all rows) of one workload, alternating, and the
    drafts' acceptance. Greedy workloads also check that both made the same tokens."""
    assert new_tokens >= 2
    assert repeats >= 1
    prompts = workload_prompts(name, batch, prompt_len, config.vocab_size)

    def plain(count: int):
        return generate_with_settings(prompts, weights, config, _settings(name, count, 0), None)

    def spec(count: int):
        return generate_speculative(prompts, weights, config, _settings(name, count, 0), None, jnp.float32, speculate)

    rates = {"plain": [], "speculative": []}
    for run in (plain, spec):  # compile both lengths first
        run(1), run(new_tokens)
    for _ in range(repeats):
        for label, run in (("plain", plain), ("speculative", spec)):
            one, full = _seconds(lambda: run(1)), _seconds(lambda: run(new_tokens))
            rates[label].append(batch * (new_tokens - 1) / max(full - one, 1e-9))
    tokens, stats = spec(new_tokens)
    if WORKLOADS[name]["temperature"] == 0:
        assert tokens == plain(new_tokens), f"{name}: speculative greedy tokens differ from plain decoding's"
    drafted, accepted, passes = (int(np.sum(x)) for x in (stats.drafted_B, stats.accepted_B, stats.passes_B))
    return dict(
        workload=name, batch=batch, new_tokens=new_tokens, max_draft=speculate.max_draft, adaptive=speculate.adaptive,
        drafter=type(speculate).__name__,
        plain_tok_s=_spread(rates["plain"]), speculative_tok_s=_spread(rates["speculative"]),
        speedup=statistics.median(rates["speculative"]) / statistics.median(rates["plain"]),
        acceptance_rate=accepted / drafted if drafted else 0.0,
        mean_accepted_per_pass=accepted / passes if passes else 0.0, verify_passes=passes,
    )  # fmt: skip


def _seconds(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def _spread(values: list[float]) -> dict:
    return dict(median=statistics.median(values), min=min(values), max=max(values))


@functools.partial(jax.jit, static_argnames=("config", "passes"), donate_argnames=("state",))
def _verify_passes_jit(state, ids_BT, weights, config, passes):
    """`passes` verify passes of ids_BT (forward and greedy acceptance) at the same cache slots, in one
    loop that updates the cache in place as the decode loop does: a pass timed on its own would also
    copy a cache it does not own (at batch 8 that copy doubled a step's time)."""
    B, T = ids_BT.shape
    params, flags = _greedy(B)
    draft_len_B = jnp.full((B,), T - 1, jnp.int32)

    def one_pass(_, state):
        keys_B2 = state.decode.keys_B2
        cache, accepted_B, logits_BV, _ = verify(ids_BT, draft_len_B, state, params, flags, keys_B2, weights, config)
        decode = dataclasses.replace(state.decode, cache=cache, logits_BV=logits_BV + accepted_B[:, None])
        return dataclasses.replace(state, decode=decode)

    return jax.lax.fori_loop(0, passes, one_pass, state)


def _greedy(rows: int):
    from jax_gpt2.sampling import flags_for, sampling_params

    settings = [settings_from_arguments(1, 0.0, None, None, None, None, 0)] * rows
    return jax.tree.map(jnp.asarray, sampling_params(settings)), flags_for(settings)


def verify_costs(
    weights: GPT2Weights, config: GPT2Config, batch: int, context: int, widths: tuple[int, ...], repeats: int
) -> dict:
    """Milliseconds of a verify pass of 1 + k positions over a cache filled to `context` slots, for
    each k in widths (k = 0 is a plain decode step), and each against k = 0: what PASS_COSTS holds.
    Eight passes a call, the calls alternating within each repeat; medians over repeats."""
    assert 0 in widths
    assert context + max(widths) + 1 <= config.n_positions
    rng = np.random.default_rng(0)
    ids_BT = jnp.asarray(rng.integers(0, config.vocab_size, (batch, context)), jnp.int32)
    keys_B2 = jnp.zeros((batch, 2), jnp.uint32)
    state = prefill(ids_BT, jnp.zeros((batch,), jnp.int32), keys_B2, weights, config, context + max(widths) + 1)
    state = jax.tree.map(lambda x: jnp.array(x, copy=True), start_speculating(state, ids_BT))  # donated: own buffers
    verify_ids = {k: jnp.asarray(rng.integers(0, config.vocab_size, (batch, k + 1)), jnp.int32) for k in widths}
    seconds, passes = {k: [] for k in widths}, 8
    for k in widths:
        state = jax.block_until_ready(_verify_passes_jit(state, verify_ids[k], weights, config, passes))
    for _ in range(repeats):
        for k in widths:
            start = time.perf_counter()
            state = jax.block_until_ready(_verify_passes_jit(state, verify_ids[k], weights, config, passes))
            seconds[k].append((time.perf_counter() - start) / passes)
    base = statistics.median(seconds[0])
    return {
        k: dict(ms=1e3 * statistics.median(s), min_ms=1e3 * min(s), max_ms=1e3 * max(s),
                vs_decode_step=statistics.median(s) / base)
        for k, s in seconds.items()
    }  # fmt: skip


def format_rows(rows: list[dict]) -> str:
    """The comparison rows as a text table."""
    lines = ["workload  batch  plain tok/s (min-max)    speculative tok/s (min-max)  speedup  accept  acc/pass"]
    for r in rows:
        p, s = r["plain_tok_s"], r["speculative_tok_s"]
        lines.append(
            f"{r['workload']:<8}  {r['batch']:>5}  {p['median']:7.1f} ({p['min']:.1f}-{p['max']:.1f})"
            f"  {s['median']:10.1f} ({s['min']:.1f}-{s['max']:.1f})      {r['speedup']:5.2f}x"
            f"  {r['acceptance_rate']:6.1%}  {r['mean_accepted_per_pass']:8.2f}"
        )
    return "\n".join(lines)


def format_costs(costs: dict, dtype: str, batch: int, context: int) -> str:
    """One batch's verify-pass costs, and the same as a row of speculate.PASS_COSTS' table."""
    parts = [f"k={k}: {c['ms']:.1f} ms ({c['vs_decode_step']:.2f}x)" for k, c in costs.items()]
    row = ", ".join(f"{costs[k]['vs_decode_step']:.2f}" for k in sorted(costs))
    return f"verify pass {dtype} B={batch} context {context}: " + ", ".join(parts) + f"\n  pass costs: ({batch}, ({row}))"



# The bench's weights per workload: transformers' own initializer std (0.02) gives a model whose
# greedy output falls into a loop within a few tokens; the main bench's std (0.1) gives output that
# never repeats (measured: ~70 distinct tokens in 100), the open-ended case.
WORKLOAD_STDS = {"loop": 0.02, "repeat": 0.1, "sampled": 0.1}
VERIFY_WIDTHS = (0, 1, 2, 3, 4, 5, 6, 7)  # T = 1..8, as PASS_COSTS


def run_speculative_bench(
    config: GPT2Config, dtypes: list[str], batches: list[int], new_tokens: int, repeats: int,
    speculate: PromptLookup | None, draft_config: GPT2Config | None = None, draft_max: int = 4, progress: bool = True,
    draft_adaptive: bool = True,
) -> dict:  # fmt: skip
    """Every workload at every batch size and dtype, plain beside speculative, and the verify-pass
    costs at VERIFY_WIDTHS; random weights of config's shape (std per WORKLOAD_STDS). With
    draft_config (and speculate None) the drafts come from a random model of that shape instead,
    drawn with the same std and another seed (draft_adaptive: its width adapts, as DraftModel's default)."""
    assert (speculate is None) != (draft_config is None)
    from jax_gpt2.loader import normalize_keys
    from jax_gpt2.tools.bench import BENCH_SEED, load_quietly
    from jax_gpt2.tools.random_model import random_state_dict

    assert dtypes
    assert batches
    results = dict(rows=[], costs=[], kernels=kernels_label())
    for std in sorted(set(WORKLOAD_STDS.values())):
        state = normalize_keys(random_state_dict(config, std=std, seed=BENCH_SEED))
        for dtype in dtypes:
            weights = load_quietly(state, config, dtype, None)
            drafter = speculate
            if draft_config is not None:
                draft_state = normalize_keys(random_state_dict(draft_config, std=std, seed=BENCH_SEED + 1))
                draft_weights = load_quietly(draft_state, draft_config, dtype, None)
                drafter = DraftModel(draft_weights, draft_config, draft_max, adaptive=draft_adaptive)
            if std == WORKLOAD_STDS["sampled"]:
                for batch in batches:
                    costs = verify_costs(weights, config, batch, 128, VERIFY_WIDTHS, repeats * 3)
                    results["costs"].append(dict(dtype=dtype, batch=batch, context=128, widths=costs))
                    _say(progress, format_costs(costs, dtype, batch, 128))
            for name in [name for name, s in WORKLOAD_STDS.items() if s == std]:
                for batch in batches:
                    row = compare_workload(name, weights, config, drafter, batch, 64, new_tokens, repeats)
                    results["rows"].append(dict(row, dtype=dtype, std=std))
                    _say(progress, f"{dtype} " + format_rows([row]).splitlines()[1])
    return results


def kernels_label() -> str:
    from jax_gpt2 import kernels

    return f"kernels {kernels.kernels_isa()}" if kernels.kernels_available() else "XLA (no kernels)"


def _say(progress: bool, line: str) -> None:
    if progress:
        print(line, flush=True)


def format_results(results: dict) -> str:
    """The whole speculative bench as text: the verify costs, then the workload rows per dtype."""
    lines = [f"speculative decoding ({results['kernels']}); rates leave the prefill out, medians (min-max)"]
    lines += [format_costs(c["widths"], c["dtype"], c["batch"], c["context"]) for c in results["costs"]]
    for dtype in dict.fromkeys(row["dtype"] for row in results["rows"]):
        lines += [f"-- {dtype}", format_rows([row for row in results["rows"] if row["dtype"] == dtype])]
    return "\n".join(lines)
