"""Side-by-side speed of jax-gpt2 and transformers' PyTorch eager path on the same random weights,
with each decode figure also given as a fraction of the memory-bandwidth roofline measured in the
same run. Never a timed test: the suite only checks that this runs.

Roofline for one decode step: every weight is read once (wte twice: the row gather is negligible,
the tied lm_head reads it whole) plus the filled part of the KV cache; tokens/s at the roofline
is batch * bandwidth / bytes per step. For bf16 and int8 the block matrices and lm_head count at
2 and 1 byte (int8 plus a float32 scale per output column); everything else stays float32.

Each dtype runs against transformers in the nearest form it has: float32 for fp32, the model
cast to bfloat16 for bf16; transformers has no int8 eager path for GPT-2's Conv1D layers, so
int8 rows carry transformers' float32 figures.
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

from jax_gpt2 import native
from jax_gpt2.config import WEIGHT_DTYPES, GPT2Config
from jax_gpt2.generate import generate
from jax_gpt2.loader import normalize_keys, weights_for_dtype
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


def measure_bandwidth_gbs(megabytes: int = 512, repeats: int = 10) -> float:
    """Memory read bandwidth: the best of several sums over a buffer far larger than cache.

    The buffer gets the same 2 MiB-page advice as packed weights, so the roofline is measured
    the way the weights are read (on 4 KiB pages the same sum reads ~20% slower here).
    """
    assert megabytes >= 64
    buffer = jnp.ones((megabytes * 2**20 // 4,), jnp.float32)
    native.advise_huge_pages(buffer)
    total = jax.jit(jnp.sum)
    timing = time_repeats(lambda: total(buffer).block_until_ready(), repeats)
    return buffer.nbytes / timing.min_s / 1e9


BYTES_PER_WEIGHT = {"float32": 4.0, "bfloat16": 2.0, "int8": 1.0}


def decode_bytes_per_step(config: GPT2Config, batch: int, context: int, dtype_name: str = "float32") -> float:
    """Bytes one decode step must read: all weights once, plus the float32 keys and values of `context` tokens."""
    D, F, L, V = config.n_embd, config.d_mlp, config.n_layer, config.vocab_size
    matrix_bytes = BYTES_PER_WEIGHT[dtype_name]
    per_layer_matrices = D * 3 * D + D * D + 2 * D * F
    per_layer_vectors = 3 * D + D + F + D + 4 * D
    scales = 4 * (L * (3 * D + D + F + D) + V) if dtype_name == "int8" else 0
    weights = (L * per_layer_matrices + V * D) * matrix_bytes + 4 * (L * per_layer_vectors + 2 * D) + scales
    cache = 4 * 2 * L * batch * context * D
    assert weights > 0
    assert cache >= 0
    return weights + cache


def make_models(config: GPT2Config, seed: int = 0):
    """The same random weights as a float32 state dict and as a transformers GPT2LMHeadModel (float32)."""
    import torch
    import transformers

    state = random_state_dict(config, std=0.1, seed=seed)
    hf_config = transformers.GPT2Config(**{f.name: getattr(config, f.name) for f in dataclasses.fields(config)})
    model = transformers.GPT2LMHeadModel(hf_config).eval()
    missing, unexpected = model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=False)
    assert missing == ["lm_head.weight"], missing  # tied to wte, which was loaded
    assert not unexpected
    return normalize_keys(state), model


def bench_decode(config, weights, model, batch: int, prompt_len: int, new_tokens: int, repeats: int) -> dict:
    """Greedy decode tokens/s for both, without the prompt's prefill, and a check that the tokens agree.

    Each side runs the same call twice, for new_tokens and for 1 new token (prefill plus one step):
    decode speed is the extra tokens over the extra time, so a long prompt's prefill is not counted.
    """
    import torch

    assert new_tokens >= 2
    rng = np.random.default_rng(batch)
    prompts = rng.integers(0, config.vocab_size, (batch, prompt_len))
    ids = torch.as_tensor(prompts, device=model.device)

    def run_ours(count: int):
        return generate(prompts.tolist(), weights, config, max_new_tokens=count)

    def run_hf(count: int):
        return hf_greedy(model, ids, count)

    extra_tokens = batch * (new_tokens - 1)
    ours_rates, ours_first = paired_rates(lambda: run_ours(new_tokens), lambda: run_ours(1), extra_tokens, repeats)
    hf_rates, hf_first = paired_rates(lambda: run_hf(new_tokens), lambda: run_hf(1), extra_tokens, repeats)
    return dict(
        batch=batch, prompt_len=prompt_len, new_tokens=new_tokens,
        token_agreement=agreement(run_ours(new_tokens), run_hf(new_tokens)[:, prompt_len:].tolist()),
        jax_tok_s=median_of_finite(ours_rates), hf_tok_s=median_of_finite(hf_rates),
        jax_rates=ours_rates, hf_rates=hf_rates, jax_first_token_s=ours_first, hf_first_token_s=hf_first,
    )  # fmt: skip


def hf_greedy(model, ids, count: int):
    """transformers' greedy generate of exactly `count` new tokens (no eos stop), prompt included."""
    import torch

    assert count >= 1
    with torch.no_grad():
        tokens = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=count, min_new_tokens=count,
            do_sample=False, pad_token_id=0, eos_token_id=None,
        )  # fmt: skip
    wait_for_torch(tokens.device)
    return tokens


def wait_for_torch(device) -> None:
    """Block until `device` has finished its queued work: a CUDA call returns before its kernels end."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def paired_rates(run_full, run_first, extra_tokens: int, repeats: int) -> tuple[list[float], float]:
    """Decode tokens/s from back-to-back pairs (full call, then the 1-token call), one rate per pair,
    and the median first-token time. Pairing keeps both halves of a difference in the same stretch
    of a noisy machine: this host's memory bandwidth wanders between ~28 and ~50 GB/s over seconds.
    """
    assert repeats >= 1
    run_full()
    run_first()
    rates, firsts = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        run_full()
        middle = time.perf_counter()
        run_first()
        end = time.perf_counter()
        rates.append(rate(extra_tokens, (middle - start) - (end - middle)))
        firsts.append(end - middle)
    assert len(rates) == repeats
    return rates, statistics.median(firsts)


def median_of_finite(values: list[float]) -> float:
    finite = [value for value in values if np.isfinite(value)]
    return statistics.median(finite) if finite else float("nan")


def agreement(ours: list[list[int]], theirs: list[list[int]]) -> float:
    """Fraction of greedy tokens equal at the same position (1.0: identical; narrowed weights drift)."""
    assert len(ours) == len(theirs)
    pairs = [(a, b) for row_a, row_b in zip(ours, theirs, strict=True) for a, b in zip(row_a, row_b, strict=True)]
    assert pairs
    return sum(a == b for a, b in pairs) / len(pairs)


def rate(tokens: int, seconds: float) -> float:
    """Tokens per second, or NaN when timing noise swamped the interval (a model too small to time)."""
    assert tokens >= 1
    assert np.isfinite(seconds)
    return tokens / seconds if seconds > 0 else float("nan")


def first_token_s(config: GPT2Config, weights, cache_dir: str) -> tuple[float, float]:
    """Seconds to the first token (batch 1, 20 prompt tokens) from an empty compile cache, then with
    JAX's persistent compilation cache (what a second CLI run sees): (cold, warm)."""
    from jax.experimental.compilation_cache import compilation_cache

    prompt = np.random.default_rng(7).integers(0, config.vocab_size, (1, 20)).tolist()
    previous = jax.config.jax_compilation_cache_dir
    compilation_cache.reset_cache()  # JAX opens its cache once per process: reopen it at cache_dir
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    try:
        seconds = []
        for _ in range(2):
            jax.clear_caches()
            start = time.perf_counter()
            generate(prompt, weights, config, max_new_tokens=1)
            seconds.append(time.perf_counter() - start)
    finally:
        compilation_cache.reset_cache()
        jax.config.update("jax_compilation_cache_dir", previous)
    assert len(seconds) == 2
    return seconds[0], seconds[1]


def bench_prefill(config, weights, model, prompt_len: int, repeats: int) -> dict:
    """Prompt tokens/s at batch 1, two ways, both sides alike:

    prefill: the prompt to its first new token (`generate`, 1 new token: logits for the last
    position only, as a generation's prefill needs them, and as transformers' generate computes them);
    forward: one forward pass with logits for every position (`gpt2_forward` against `model(ids)`).
    """
    import torch

    ids = np.random.default_rng(prompt_len).integers(0, config.vocab_size, (1, prompt_len))
    tensor = torch.as_tensor(ids, device=model.device)

    def hf_forward():
        with torch.no_grad():
            logits = model(tensor).logits
        wait_for_torch(logits.device)
        return logits

    ours = time_repeats(lambda: generate(ids.tolist(), weights, config, max_new_tokens=1), repeats)
    theirs = time_repeats(lambda: hf_greedy(model, tensor, 1), repeats)
    ours_forward = time_repeats(lambda: gpt2_forward(ids, weights, config).block_until_ready(), repeats)
    theirs_forward = time_repeats(hf_forward, repeats)
    return dict(
        prompt_len=prompt_len, jax_tok_s=prompt_len / ours.median_s, hf_tok_s=prompt_len / theirs.median_s,
        jax_spread_s=[ours.min_s, ours.max_s], hf_spread_s=[theirs.min_s, theirs.max_s],
        jax_forward_tok_s=prompt_len / ours_forward.median_s, hf_forward_tok_s=prompt_len / theirs_forward.median_s,
    )  # fmt: skip


def machine_info() -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        names = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")]
        cpu = names[0] if names else cpu
    return dict(
        cpu=cpu, cores=os.cpu_count(), jax=jax.__version__, torch=torch.__version__,
        torch_threads=torch.get_num_threads(), device=str(jax.devices()[0]), device_kind=jax.devices()[0].device_kind,
    )  # fmt: skip


def transformers_model_for(model, dtype: str):
    """transformers' nearest form of a jax-gpt2 dtype: the float32 model itself, or a bfloat16 copy."""
    import copy

    import torch

    assert dtype in WEIGHT_DTYPES
    return copy.deepcopy(model).to(torch.bfloat16) if dtype == "bf16" else model


def run_benchmarks(
    config: GPT2Config, dtypes: list[str], batches: list[int], prefill_lens: list[int], new_tokens: int,
    repeats: int, contexts: list[int], progress: bool = True, torch_device: str = "cpu",
) -> dict:  # fmt: skip
    """Every measurement of one model shape, for each weight dtype, as a JSON-ready dict.

    transformers runs on `torch_device` ("cpu", or "cuda" to compare on the same card as JAX's GPU).
    """
    import tempfile

    from tqdm import tqdm

    assert dtypes and all(dtype in WEIGHT_DTYPES for dtype in dtypes)
    state, model = make_models(config)
    results: dict = dict(machine=machine_info(), config=dataclasses.asdict(config), runs=[])
    bandwidths = [measure_bandwidth_gbs()]
    plan = [("decode", batch, 20) for batch in batches] + [("decode", 1, context) for context in contexts]
    plan += [("prefill", 1, length) for length in prefill_lens]
    bar = tqdm(total=len(dtypes) * (len(plan) + 1), desc="benchmarks", disable=not progress)
    for dtype in dtypes:
        weights = weights_for_dtype(state, config, jnp.dtype(WEIGHT_DTYPES[dtype]), pack=None)
        hf_model = transformers_model_for(model, dtype).to(torch_device)
        with tempfile.TemporaryDirectory() as cache_dir:
            cold_s, warm_s = first_token_s(config, weights, cache_dir)
        bar.update()
        run = dict(dtype=dtype, packed=weights.lm_head_DV is not None, transformers_dtype=str(hf_model.dtype))
        run["transformers_device"] = str(hf_model.device)
        run.update(jax_cold_first_token_s=cold_s, jax_warm_first_token_s=warm_s, decode=[], prefill=[])
        for kind, batch, length in plan:
            bandwidths.append(measure_bandwidth_gbs(repeats=3))  # sampled throughout: the host's bandwidth wanders
            if kind == "prefill":
                run["prefill"].append(bench_prefill(config, weights, hf_model, length, repeats))
            else:
                run["decode"].append(decode_row(config, weights, hf_model, dtype, batch, length, new_tokens, repeats))
            bar.update()
        results["runs"].append(run)
        bandwidths.append(measure_bandwidth_gbs())
    bar.close()
    results["bandwidth_samples_gbs"] = bandwidths
    add_rooflines(results)
    assert len(results["runs"]) == len(dtypes)
    return results


def add_rooflines(results: dict) -> None:
    """Each decode row as a fraction of two rooflines: at the best bandwidth sampled in the run (a
    noisy neighbour can only lower a sample, so this is the strict one) and at the median sample
    (what the host typically gave while the run went on)."""
    samples = results["bandwidth_samples_gbs"]
    assert samples and min(samples) > 0
    results.update(bandwidth_gbs=max(samples), bandwidth_median_gbs=statistics.median(samples))
    for run in results["runs"]:
        for row in run["decode"]:
            row["roofline_tok_s"] = row["batch"] * results["bandwidth_gbs"] * 1e9 / row["bytes_per_step"]
            row["jax_fraction_of_roofline"] = row["jax_tok_s"] / row["roofline_tok_s"]
            median_roofline = row["batch"] * results["bandwidth_median_gbs"] * 1e9 / row["bytes_per_step"]
            row["jax_fraction_of_median_roofline"] = row["jax_tok_s"] / median_roofline


def decode_row(config, weights, hf_model, dtype: str, batch: int, length: int, new_tokens: int, repeats: int) -> dict:
    """bench_decode plus the bytes one step reads on average (weights and the cache's filled part)."""
    row = bench_decode(config, weights, hf_model, batch, length, new_tokens, repeats)
    row["bytes_per_step"] = decode_bytes_per_step(config, batch, length + new_tokens // 2, WEIGHT_DTYPES[dtype])
    assert row["bytes_per_step"] > 0
    return row


def format_table(results: dict) -> str:
    """The results as a plain-text table: figures, ratio to transformers, roofline fraction."""
    machine = results["machine"]
    lines = [
        f"machine: {machine['cpu']}, {machine['cores']} cores, jax {machine['jax']} on {machine['device_kind']}, "
        f"torch {machine['torch']} "
        f"({machine['torch_threads']} threads); read bandwidth best {results['bandwidth_gbs']:.1f} GB/s, median "
        f"{results['bandwidth_median_gbs']:.1f} GB/s of {len(results['bandwidth_samples_gbs'])} samples in this run",
    ]
    for run in results["runs"]:
        lines.append(
            f"\n[{run['dtype']}] transformers as {run['transformers_dtype']} on {run['transformers_device']}; "
            f"first token B=1, 20 tokens: "
            f"{run['jax_cold_first_token_s']:.2f} s cold (compile), {run['jax_warm_first_token_s']:.2f} s warm cache"
        )
        lines.append(f"{'measurement':<34}{'jax-gpt2':>12}{'transformers':>14}{'ratio':>8}{'roofline':>10}{'(median)':>10}{'same tokens':>13}{'jax-gpt2 range':>17}")
        for row in run["decode"]:
            name = f"decode B={row['batch']} ctx={row['prompt_len']}+{row['new_tokens']} tok/s"
            ratio = row["jax_tok_s"] / row["hf_tok_s"]
            fraction = f"{100 * row['jax_fraction_of_roofline']:.0f}%"
            same = f"{100 * row['token_agreement']:.0f}%"
            spread = f"{min(row['jax_rates']):.1f}-{max(row['jax_rates']):.1f}"
            median = f"{100 * row['jax_fraction_of_median_roofline']:.0f}%"
            lines.append(f"{name:<34}{row['jax_tok_s']:>12.1f}{row['hf_tok_s']:>14.1f}{ratio:>7.2f}x{fraction:>10}{median:>10}{same:>13}{spread:>17}")
        for row in run["prefill"]:
            for label, ours, theirs in [
                ("prefill", row["jax_tok_s"], row["hf_tok_s"]),
                ("forward, all logits,", row["jax_forward_tok_s"], row["hf_forward_tok_s"]),
            ]:  # fmt: skip
                name = f"{label} T={row['prompt_len']} tok/s"
                lines.append(f"{name:<34}{ours:>12.1f}{theirs:>14.1f}{ours / theirs:>7.2f}x")
    return "\n".join(lines)


def plot_results(results: dict, path) -> None:
    """A PNG of the table: tokens/s of each measurement, jax-gpt2 beside transformers, per dtype."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, ours, theirs = [], [], []
    for run in results["runs"]:
        for row in run["decode"]:
            labels.append(f"{run['dtype']} decode B={row['batch']} ctx={row['prompt_len']}")
            ours.append(row["jax_tok_s"])
            theirs.append(row["hf_tok_s"])
        for row in run["prefill"]:
            labels.append(f"{run['dtype']} prefill T={row['prompt_len']}")
            ours.append(row["jax_tok_s"])
            theirs.append(row["hf_tok_s"])
    assert labels
    positions = np.arange(len(labels))
    figure, axes = plt.subplots(figsize=(9, 0.45 * len(labels) + 1.5))
    axes.barh(positions - 0.2, ours, height=0.4, label="jax-gpt2")
    axes.barh(positions + 0.2, theirs, height=0.4, label="transformers (eager PyTorch)")
    axes.set_yticks(positions, labels)
    axes.invert_yaxis()
    axes.set_xscale("log")
    axes.set_xlabel("tokens/s (log scale)")
    machine = results["machine"]
    axes.set_title(f"GPT-2 {results.get('preset', '')} on {machine['cpu']}, {machine['cores']} cores", fontsize=10)
    axes.legend(loc="upper right")  # the short decode bars leave that corner free
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
