"""Side-by-side speed of jax-gpt2 and transformers' PyTorch eager path on the same random weights,
with each decode figure also given as a fraction of the memory-bandwidth roofline measured in the
same run. Never a timed test: the suite only checks that this runs.

Roofline for one decode step: every weight is read once (wte twice: the row gather is negligible,
the tied lm_head reads it whole) plus the filled part of the KV cache; tokens/s at the roofline
is batch * bandwidth / bytes per step.
"""

import dataclasses
import os
import platform
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jax_gpt2.config import GPT2Config
from jax_gpt2.generate import generate
from jax_gpt2.loader import normalize_keys, weights_from_state_dict
from jax_gpt2.model import gpt2_forward
from jax_gpt2.random_model import random_state_dict


@dataclasses.dataclass(frozen=True)
class Timing:
    median_s: float
    min_s: float
    max_s: float


def time_repeats(run: Callable[[], object], repeats: int) -> Timing:
    """Wall time of `run` over `repeats` calls after one warm-up call (compiles, caches, page faults)."""
    assert repeats >= 1
    run()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - start)
    return Timing(statistics.median(seconds), min(seconds), max(seconds))


def measure_bandwidth_gbs(megabytes: int = 512, repeats: int = 5) -> float:
    """Memory read bandwidth as XLA sees it: the best of several sums over a buffer far larger than cache."""
    assert megabytes >= 64
    buffer = jnp.ones((megabytes * 2**20 // 4,), jnp.float32)
    total = jax.jit(jnp.sum)
    timing = time_repeats(lambda: total(buffer).block_until_ready(), repeats)
    return buffer.nbytes / timing.min_s / 1e9


def decode_bytes_per_step(config: GPT2Config, batch: int, context: int, dtype_bytes: int = 4) -> int:
    """Bytes one decode step must read: all weights once, plus the keys and values of `context` tokens."""
    D, F, L, V = config.n_embd, config.d_mlp, config.n_layer, config.vocab_size
    per_layer = D * 3 * D + 3 * D + D * D + D + 2 * D * F + F + D + 4 * D
    weights = L * per_layer + V * D + 2 * D
    cache = 2 * L * batch * context * D
    assert weights > 0
    assert cache >= 0
    return (weights + cache) * dtype_bytes


def make_models(config: GPT2Config, seed: int = 0):
    """The same random weights as jax-gpt2 GPT2Weights and as a transformers GPT2LMHeadModel (float32)."""
    import torch
    import transformers

    state = random_state_dict(config, std=0.1, seed=seed)
    weights = weights_from_state_dict(normalize_keys(state), config)
    hf_config = transformers.GPT2Config(**{f.name: getattr(config, f.name) for f in dataclasses.fields(config)})
    model = transformers.GPT2LMHeadModel(hf_config).eval()
    missing, unexpected = model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=False)
    assert missing == ["lm_head.weight"], missing  # tied to wte, which was loaded
    assert not unexpected
    return weights, model


def bench_decode(config, weights, model, batch: int, prompt_len: int, new_tokens: int, repeats: int) -> dict:
    """Greedy decode tokens/s for both, without the prompt's prefill, and a check that the tokens agree.

    Each side runs the same call twice, for new_tokens and for 1 new token (prefill plus one step):
    decode speed is the extra tokens over the extra time, so a long prompt's prefill is not counted.
    """
    import torch

    assert new_tokens >= 2
    rng = np.random.default_rng(batch)
    prompts = rng.integers(0, config.vocab_size, (batch, prompt_len))
    ids = torch.as_tensor(prompts)

    def run_ours(count: int):
        return generate(prompts.tolist(), weights, config, max_new_tokens=count)

    def run_hf(count: int):
        with torch.no_grad():
            return model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=count, min_new_tokens=count,
                do_sample=False, pad_token_id=0, eos_token_id=None,
            )  # fmt: skip

    ours_full, ours_first = time_repeats(lambda: run_ours(new_tokens), repeats), time_repeats(lambda: run_ours(1), repeats)
    hf_full, hf_first = time_repeats(lambda: run_hf(new_tokens), repeats), time_repeats(lambda: run_hf(1), repeats)
    extra_tokens = batch * (new_tokens - 1)
    return dict(
        batch=batch, prompt_len=prompt_len, new_tokens=new_tokens,
        tokens_equal=run_ours(new_tokens) == run_hf(new_tokens)[:, prompt_len:].tolist(),
        # Fastest of each (the least disturbed run), so a noisy repeat cannot make the difference negative.
        jax_tok_s=rate(extra_tokens, ours_full.min_s - ours_first.min_s),
        hf_tok_s=rate(extra_tokens, hf_full.min_s - hf_first.min_s),
        jax_first_token_s=ours_first.median_s, hf_first_token_s=hf_first.median_s,
        jax_spread_s=[ours_full.min_s, ours_full.max_s], hf_spread_s=[hf_full.min_s, hf_full.max_s],
    )  # fmt: skip


def rate(tokens: int, seconds: float) -> float:
    """Tokens per second, or NaN when timing noise swamped the interval (a model too small to time)."""
    assert tokens >= 1
    assert np.isfinite(seconds)
    return tokens / seconds if seconds > 0 else float("nan")


def cold_first_token_s(config: GPT2Config, weights) -> float:
    """Seconds from a fresh compile to the first token: batch 1, 20 prompt tokens, one new token."""
    jax.clear_caches()
    prompt = np.random.default_rng(7).integers(0, config.vocab_size, (1, 20)).tolist()
    start = time.perf_counter()
    generate(prompt, weights, config, max_new_tokens=1)
    return time.perf_counter() - start


def bench_prefill(config, weights, model, prompt_len: int, repeats: int) -> dict:
    """Tokens/s of one forward pass over a prompt of prompt_len tokens at batch 1 (all logits, both sides)."""
    import torch

    ids = np.random.default_rng(prompt_len).integers(0, config.vocab_size, (1, prompt_len))
    ours = time_repeats(lambda: gpt2_forward(ids, weights, config).block_until_ready(), repeats)
    tensor = torch.as_tensor(ids)

    def run_hf():
        with torch.no_grad():
            return model(tensor).logits

    theirs = time_repeats(run_hf, repeats)
    return dict(
        prompt_len=prompt_len, jax_tok_s=prompt_len / ours.median_s, hf_tok_s=prompt_len / theirs.median_s,
        jax_spread_s=[ours.min_s, ours.max_s], hf_spread_s=[theirs.min_s, theirs.max_s],
    )  # fmt: skip


def machine_info() -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        names = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")]
        cpu = names[0] if names else cpu
    return dict(
        cpu=cpu, cores=os.cpu_count(), jax=jax.__version__, torch=torch.__version__,
        torch_threads=torch.get_num_threads(), device=str(jax.devices()[0]),
    )  # fmt: skip


def run_benchmarks(
    config: GPT2Config, batches: list[int], prefill_lens: list[int], new_tokens: int, repeats: int,
    contexts: list[int], progress: bool = True,
) -> dict:  # fmt: skip
    """Every measurement of one model shape, as a JSON-ready dict."""
    from tqdm import tqdm

    weights, model = make_models(config)
    cold_s = cold_first_token_s(config, weights)
    bandwidth = measure_bandwidth_gbs()
    plan = [("decode", batch, 20) for batch in batches] + [("context", 1, context) for context in contexts]
    plan += [("prefill", 1, length) for length in prefill_lens]
    results: dict = dict(machine=machine_info(), bandwidth_gbs=bandwidth, config=dataclasses.asdict(config))
    results["jax_cold_first_token_s"] = cold_s
    results.update(decode=[], prefill=[])
    for kind, batch, length in tqdm(plan, desc="benchmarks", disable=not progress):
        if kind == "prefill":
            results["prefill"].append(bench_prefill(config, weights, model, length, repeats))
            continue
        row = bench_decode(config, weights, model, batch, length, new_tokens, repeats)
        mean_context = length + new_tokens // 2
        roofline = batch * bandwidth * 1e9 / decode_bytes_per_step(config, batch, mean_context)
        row.update(roofline_tok_s=roofline, jax_fraction_of_roofline=row["jax_tok_s"] / roofline)
        results["decode"].append(row)
    assert len(results["decode"]) == len(batches) + len(contexts)
    return results


def format_table(results: dict) -> str:
    """The results as a plain-text table: figures, ratio to transformers, roofline fraction."""
    lines = [
        f"machine: {results['machine']['cpu']}, {results['machine']['cores']} cores, "
        f"jax {results['machine']['jax']}, torch {results['machine']['torch']} "
        f"({results['machine']['torch_threads']} threads); read bandwidth {results['bandwidth_gbs']:.1f} GB/s",
        f"jax-gpt2 cold first token (compile included, B=1, 20 tokens): {results['jax_cold_first_token_s']:.2f} s",
        f"{'measurement':<34}{'jax-gpt2':>12}{'transformers':>14}{'ratio':>8}{'roofline':>10}",
    ]
    for row in results["decode"]:
        name = f"decode B={row['batch']} ctx={row['prompt_len']}+{row['new_tokens']} tok/s"
        first = f"first token B={row['batch']} ctx={row['prompt_len']} ms"
        lines.append(f"{first:<34}{1e3 * row['jax_first_token_s']:>12.1f}{1e3 * row['hf_first_token_s']:>14.1f}")
        ratio = row["jax_tok_s"] / row["hf_tok_s"]
        fraction = f"{100 * row['jax_fraction_of_roofline']:.0f}%"
        same = "" if row["tokens_equal"] else "  (tokens differ!)"
        lines.append(f"{name:<34}{row['jax_tok_s']:>12.1f}{row['hf_tok_s']:>14.1f}{ratio:>7.2f}x{fraction:>10}{same}")
    for row in results["prefill"]:
        name = f"prefill T={row['prompt_len']} tok/s"
        ratio = row["jax_tok_s"] / row["hf_tok_s"]
        lines.append(f"{name:<34}{row['jax_tok_s']:>12.1f}{row['hf_tok_s']:>14.1f}{ratio:>7.2f}x")
    return "\n".join(lines)
