"""Side-by-side speed of jax-gpt2 and transformers' PyTorch eager path on the same random weights,
with each decode figure also given as a fraction of the memory-bandwidth roofline measured in the
same run. Never a timed test: the suite only checks that this runs.

Roofline for one decode step: every weight is read once (wte twice: the row gather is negligible,
the tied lm_head reads it whole) plus the filled part of the KV cache; tokens/s at the roofline
is batch * bandwidth / bytes per step. For bf16 and int8 the block matrices and lm_head count at
2 and 1 byte (int8 plus a float32 scale per output column); everything else stays float32.

Each dtype runs against transformers in the nearest form it has: float32 for fp32, the model
cast to bfloat16 for bf16; transformers has no int8 eager path for GPT-2's Conv1D layers, so
int8 rows carry transformers' float32 figures. Given a llama-bench binary and GGUF conversions of
the same weights (tools/llama_cpp.py), llama.cpp is a third column: f32, f16 and q8_0 beside our fp32,
bf16 and int8.

With bf16_dot (`bench --bf16-dot`) the bf16 run loads with load_weights' bf16_dot option (prefill
and scoring on the bf16 dot-product instructions, activations rounded to bf16 as transformers' bf16
path rounds them); its rows are labelled "bf16 --bf16-dot" and the run records bf16_dot. With
int8_dot (`bench --int8-dot`) the int8 run likewise loads with the int8_dot option (activations
quantized to int8 for AVX512_VNNI's integer dot products, as llama.cpp's q8_0 does), labelled
"int8 --int8-dot".

Every run records which path ran (the kernels or XLA, the ISA, the thread count), and one more
figure without the kernels: each dtype loaded with pack=False in this same process, decoding at
batch 1, against fp32 without the kernels (a narrow dtype must not be slower there).
"""

import dataclasses
import functools
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jax_gpt2 import kernels
from jax_gpt2.config import KV_DTYPES, PRESETS, WEIGHT_DTYPES, GPT2Config, config_to_hf_dict
from jax_gpt2.generate import (
    bucket_length, decode_request, generate, place_request, prefill_request, prepare_request, settings_from_arguments,
)
from jax_gpt2.loader import normalize_keys, weights_for_dtype
from jax_gpt2.model import gpt2_forward
from jax_gpt2.tools.llama_cpp import GGUF_TYPES, gguf_path, run_llama_bench
from jax_gpt2.tools.random_model import random_state_dict
from jax_gpt2.sharding import place_weights


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
    kernels.advise_huge_pages(buffer)
    total = jax.jit(jnp.sum)
    timing = time_repeats(lambda: total(buffer).block_until_ready(), repeats)
    return buffer.nbytes / timing.min_s / 1e9


# By dtype name, from config's one table (int8's per-column scales are counted apart).
BYTES_PER_WEIGHT = {name: float(jnp.dtype(name).itemsize) for name in WEIGHT_DTYPES.values()}


def decode_bytes_per_step(
    config: GPT2Config, batch: int, context: int, dtype_name: str = "float32", kv_dtype_name: str = "float32"
) -> float:
    """Bytes one decode step must read: all weights once, plus the keys and values of `context` tokens."""
    D, F, L, V = config.n_embd, config.d_mlp, config.n_layer, config.vocab_size
    matrix_bytes = BYTES_PER_WEIGHT[dtype_name]
    per_layer_matrices = D * 3 * D + D * D + 2 * D * F
    per_layer_vectors = 3 * D + D + F + D + 4 * D
    scales = 4 * (L * (3 * D + D + F + D) + V) if dtype_name == "int8" else 0
    weights = (L * per_layer_matrices + V * D) * matrix_bytes + 4 * (L * per_layer_vectors + 2 * D) + scales
    cache = BYTES_PER_WEIGHT[kv_dtype_name] * 2 * L * batch * context * D
    assert weights > 0
    assert cache >= 0
    return weights + cache


def forward_flop_per_token(config: GPT2Config, length: int, logit_share: float) -> float:
    """Floating-point operations per token of a causal forward over `length` tokens: the block
    matmuls, attention (each query against (length + 1) / 2 keys on average, for q.k and p.v), and
    the lm_head at `logit_share` of the positions (1 when scoring, 1 / length for a prefill that
    needs the last position's logits only). ~180 MFLOP a token for gpt2, ~257 with all logits."""
    assert length >= 1
    assert 0 < logit_share <= 1
    D, F, L, V = config.n_embd, config.d_mlp, config.n_layer, config.vocab_size
    matmuls = 2 * L * (3 * D * D + D * D + 2 * D * F)
    attention = 2 * 2 * L * D * (length + 1) / 2
    return matmuls + attention + 2 * D * V * logit_share


def sample_fma_peak(samples: list[float]) -> None:
    """Appends the host's FMA peak as the kernels measure it, now (nothing where they are unavailable)."""
    peak = kernels.native.fma_peak_gflops()
    if peak is not None:
        samples.append(peak)


# The bench's random weights: write_bench_model writes the same ones for llama.cpp's converter.
BENCH_STD, BENCH_SEED = 0.1, 0


def make_models(config: GPT2Config, seed: int = BENCH_SEED):
    """The same random weights as a float32 state dict and as a transformers GPT2LMHeadModel (float32)."""
    import torch
    import transformers

    state = random_state_dict(config, std=BENCH_STD, seed=seed)
    hf_config = transformers.GPT2Config(**{f.name: getattr(config, f.name) for f in dataclasses.fields(config)})
    model = transformers.GPT2LMHeadModel(hf_config).eval()
    missing, unexpected = model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=False)
    assert missing == ["lm_head.weight"], missing  # tied to wte, which was loaded
    assert not unexpected
    return normalize_keys(state), model


def bench_model_stem(preset: str, n_layer: int) -> str:
    """The name of the bench's weights for a preset and layer count (GGUF files are named after it)."""
    assert preset
    assert n_layer >= 1
    return f"{preset}-L{n_layer}-std{BENCH_STD}-seed{BENCH_SEED}"


def write_bench_model(folder: Path, preset: str, layers: int | None, vocab_dir: Path) -> str:
    """The bench's weights for `preset` as a transformers folder that llama.cpp's converter reads:
    config.json with "n_ctx" (transformers 5 omits it; the converter requires it), model.safetensors,
    and GPT-2's vocab.json + merges.txt (the converter identifies the tokenizer by hashing them).
    Returns the model's stem for gguf_path."""
    import json
    import shutil

    from safetensors.numpy import save_file

    config = PRESETS[preset] if layers is None else dataclasses.replace(PRESETS[preset], n_layer=layers)
    vocab_size = len(json.loads((Path(vocab_dir) / "vocab.json").read_text()))
    if vocab_size != config.vocab_size:
        raise ValueError(f"{vocab_dir}/vocab.json has {vocab_size} tokens; {preset} has {config.vocab_size}")
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(Path(vocab_dir) / name, folder / name)
    hf_config = {**config_to_hf_dict(config), "n_ctx": config.n_positions}
    (folder / "config.json").write_text(json.dumps(hf_config, indent=2))
    save_file(random_state_dict(config, BENCH_STD, BENCH_SEED), folder / "model.safetensors", metadata={"format": "pt"})
    assert (folder / "model.safetensors").is_file()
    return bench_model_stem(preset, config.n_layer)


def bench_decode(
    config, weights, model, batch: int, prompt_len: int, new_tokens: int, repeats: int, kv_dtype=jnp.float32
) -> dict:
    """Greedy decode tokens/s for both, without the prompt's prefill, and a check that the tokens agree.

    Ours: the decode steps timed alone (decode_only_rates). transformers' generate has no such
    seam, so it runs twice, for new_tokens and for 1 new token (prefill plus one step), and its
    decode speed is the extra tokens over the extra time (paired_rates).
    """
    import torch

    assert new_tokens >= 2
    rng = np.random.default_rng(batch)
    prompts = rng.integers(0, config.vocab_size, (batch, prompt_len))
    ids = torch.as_tensor(prompts, device=model.device)

    def run_ours(count: int):
        return generate(prompts.tolist(), weights, config, max_new_tokens=count, kv_dtype=kv_dtype)

    def run_hf(count: int):
        return hf_greedy(model, ids, count)

    extra_tokens = batch * (new_tokens - 1)
    ours_rates = decode_only_rates(prompts.tolist(), weights, config, new_tokens, repeats, kv_dtype)
    ours_first = time_repeats(lambda: run_ours(1), repeats).median_s
    hf_rates, hf_first = paired_rates(lambda: run_hf(new_tokens), lambda: run_hf(1), extra_tokens, repeats)
    return dict(
        batch=batch, prompt_len=prompt_len, new_tokens=new_tokens,
        token_agreement=agreement(run_ours(new_tokens), run_hf(new_tokens)[:, prompt_len:].tolist()),
        jax_tok_s=median_of_finite(ours_rates), hf_tok_s=median_of_finite(hf_rates),
        jax_rates=ours_rates, hf_rates=hf_rates, jax_first_token_s=ours_first, hf_first_token_s=hf_first,
    )  # fmt: skip


def decode_only_rates(prompts: list[list[int]], weights, config, new_tokens: int, repeats: int, kv_dtype) -> list[float]:
    """Our greedy decode tokens/s with the steps timed alone: one prefill (untimed), then `repeats`
    runs of the new_tokens - 1 steps after the first token, each from a fresh copy of the prefilled
    state (a decode call takes over the state it is given). Timing a difference of two whole calls
    instead let a long prompt's prefill into the figure: measured here, a 990-token prefill (~2 s)
    wandered by more than the 31 steps after it take."""
    assert new_tokens >= 2
    assert repeats >= 1
    settings = settings_from_arguments(
        max_new_tokens=new_tokens, temperature=0.0, top_k=None, top_p=None, min_p=None, repetition_penalty=None, seed=0
    )  # greedy, as transformers' side runs
    placed = place_request(prepare_request(prompts, config, settings, None), weights.mesh)
    state = prefill_request(placed, weights, config, kv_dtype)
    steps = new_tokens - 1

    def seconds() -> float:
        fresh = jax.block_until_ready(jax.tree.map(jnp.copy, state))
        start = time.perf_counter()
        _, tokens_BY, emitted_BY = decode_request(fresh, placed, np.int32(steps), bucket_length(new_tokens), weights, config)
        jax.block_until_ready(tokens_BY)
        elapsed = time.perf_counter() - start
        made = int(np.asarray(emitted_BY)[: len(prompts)].sum())  # a mesh pads the rows; those are not counted
        assert made == len(prompts) * steps, "every row makes every step (no eos)"
        return elapsed

    seconds()  # compiles
    rates = [rate(len(prompts) * steps, seconds()) for _ in range(repeats)]
    assert len(rates) == repeats
    return rates


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


def bench_prefill(config, weights, model, prompt_len: int, repeats: int, kv_dtype=jnp.float32) -> dict:
    """Prompt tokens/s at batch 1, two ways, both sides alike:

    prefill: the prompt to its first new token (`generate`, 1 new token: logits for the last
    position only, as a generation's prefill needs them, and as transformers' generate computes them);
    forward: one forward pass with logits for every position (`gpt2_forward` against `model(ids)`).
    """
    import torch

    ids = np.random.default_rng(prompt_len).integers(0, config.vocab_size, (1, prompt_len))
    tensor = torch.as_tensor(ids, device=model.device)

    hf_forward = functools.partial(hf_forward_logits, model, tensor)

    ours = time_repeats(lambda: generate(ids.tolist(), weights, config, max_new_tokens=1, kv_dtype=kv_dtype), repeats)
    theirs = time_repeats(lambda: hf_greedy(model, tensor, 1), repeats)
    ours_forward = time_repeats(lambda: gpt2_forward(ids, weights, config).block_until_ready(), repeats)
    theirs_forward = time_repeats(hf_forward, repeats)
    return dict(
        prompt_len=prompt_len, jax_tok_s=prompt_len / ours.median_s, hf_tok_s=prompt_len / theirs.median_s,
        jax_spread_s=[ours.min_s, ours.max_s], hf_spread_s=[theirs.min_s, theirs.max_s],
        jax_forward_tok_s=prompt_len / ours_forward.median_s, hf_forward_tok_s=prompt_len / theirs_forward.median_s,
    )  # fmt: skip


def hf_forward_logits(model, tensor):
    """transformers' forward with every position's logits, finished on its device before it returns."""
    import torch

    with torch.no_grad():
        logits = model(tensor).logits
    wait_for_torch(logits.device)
    return logits


def bench_scoring(config, weights, model, batch: int, length: int, repeats: int) -> dict:
    """Scoring tokens/s: one forward over (batch, length) tokens with the logits at every position
    (perplexity windows, evaluation harnesses), `gpt2_forward` against `model(ids)`."""
    import torch

    assert 1 <= length <= config.n_positions
    ids = np.random.default_rng(length).integers(0, config.vocab_size, (batch, length))
    tensor = torch.as_tensor(ids, device=model.device)

    hf_forward = functools.partial(hf_forward_logits, model, tensor)

    ours = time_repeats(lambda: gpt2_forward(ids, weights, config).block_until_ready(), repeats)
    theirs = time_repeats(hf_forward, repeats)
    tokens = batch * length
    return dict(
        batch=batch, prompt_len=length, jax_tok_s=tokens / ours.median_s, hf_tok_s=tokens / theirs.median_s,
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
        torch_threads=torch.get_num_threads(), device=str(jax.devices()[0]), device_kind=jax.devices()[0].device_kind,
        torch_cpu_capability=torch.backends.cpu.get_cpu_capability(), peer_isa_caps=peer_isa_caps(os.environ),
    )  # fmt: skip


# Environment variables that cap the instruction set of transformers' CPU code (PyTorch's own kernels,
# MKL's GEMMs, oneDNN's): set to AVX2 on an AVX-512 host, they make transformers the peer of our
# x86-64-v3 build, as on an AVX2-only CPU.
PEER_ISA_VARIABLES = ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA")


def peer_isa_caps(environment) -> dict[str, str]:
    """The PEER_ISA_VARIABLES set in `environment`, so a result says which code transformers ran."""
    caps = {name: environment[name] for name in PEER_ISA_VARIABLES if name in environment}
    assert all(isinstance(value, str) for value in caps.values())
    assert set(caps) <= set(PEER_ISA_VARIABLES)
    return caps


# CPU feature flags (Linux /proc/cpuinfo) of the instructions that multiply bfloat16 natively.
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")


def cpu_has_bf16_instructions(cpuinfo: str | None = None) -> bool | None:
    """Whether the CPU multiplies bfloat16 natively (x86 AVX512_BF16 / AMX-BF16, Arm's BF16);
    None where /proc/cpuinfo does not say (not Linux)."""
    if cpuinfo is None:
        if not os.path.exists("/proc/cpuinfo"):
            return None
        cpuinfo = Path("/proc/cpuinfo").read_text()
    flags = {flag for line in cpuinfo.splitlines() if line.split(":")[0].strip() in ("flags", "Features")
             for flag in line.split(":", 1)[1].split()}  # fmt: skip
    return any(flag in flags for flag in BF16_CPU_FLAGS)


# Values of PEER_ISA_VARIABLES that cap transformers' CPU code below the first x86 ISA with bfloat16
# dot products (AVX512_BF16): under any of them its bf16 matmuls are emulated, as on a Zen 3.
CAPS_WITHOUT_BF16 = {
    "ATEN_CPU_CAPABILITY": {"DEFAULT", "AVX2"},
    "MKL_ENABLE_INSTRUCTIONS": {"SSE4_2", "AVX", "AVX2"},
    "ONEDNN_MAX_CPU_ISA": {"SSE41", "AVX", "AVX2", "AVX2_VNNI"},
}


def caps_keep_out_bf16(caps: dict[str, str]) -> bool:
    """Whether any of peer_isa_caps' caps keeps transformers' code below bfloat16 instructions."""
    assert set(caps) <= set(CAPS_WITHOUT_BF16)
    return any(value.upper() in CAPS_WITHOUT_BF16[name] for name, value in caps.items())


def peer_has_bf16_instructions(cpuinfo: str | None = None, environment=None) -> bool | None:
    """Whether transformers can use bfloat16 instructions here: the CPU has them
    (cpu_has_bf16_instructions) and no PEER_ISA_VARIABLES cap keeps its code below them."""
    environment = os.environ if environment is None else environment
    if caps_keep_out_bf16(peer_isa_caps(environment)):
        return False
    has = cpu_has_bf16_instructions(cpuinfo)
    assert has in (True, False, None)
    return has


def bf16_peer_note(hf_dtype: str, dtype: str, caps: dict[str, str]) -> str:
    """Why transformers ran float32 for our bf16, if it did ("" otherwise)."""
    assert hf_dtype in ("fp32", "bf16")
    if hf_dtype == dtype or dtype != "bf16":
        return ""
    if caps_keep_out_bf16(caps):
        return "fp32: its code is capped below bf16 instructions"
    return "fp32: this CPU has no bf16 instructions"


def transformers_dtype_for(dtype: str, torch_device: str, bf16_instructions: bool | None) -> str:
    """transformers' nearest form of a jax-gpt2 dtype: "bf16" for bf16, except on a CPU without
    bfloat16 instructions, where PyTorch emulates them so slowly (one bench row took 7 minutes on a
    Zen 3) that its float32 path is the fair peer; "fp32" for fp32 and int8 (transformers has no
    int8 eager path for GPT-2's Conv1D layers)."""
    assert dtype in WEIGHT_DTYPES
    assert torch_device in ("cpu", "cuda")
    if dtype != "bf16" or (torch_device == "cpu" and bf16_instructions is False):
        return "fp32"
    return "bf16"


def transformers_model_for(model, dtype: str):
    """The float32 reference model itself, or a bfloat16 copy of it (dtype "fp32" or "bf16")."""
    import copy

    import torch

    assert dtype in ("fp32", "bf16")
    return copy.deepcopy(model).to(torch.bfloat16) if dtype == "bf16" else model


@dataclasses.dataclass(frozen=True)
class LlamaPeer:
    """llama.cpp's llama-bench and the folder of GGUF conversions of this bench's weights (named `stem`)."""

    binary: Path
    gguf_dir: Path
    stem: str
    threads: int


def check_llama_peer(llama: LlamaPeer, dtypes: list[str]) -> None:
    if not Path(llama.binary).is_file():
        raise FileNotFoundError(f"no llama-bench at {llama.binary} (bash benchmarks/build_llama_cpp.sh build)")
    for dtype in dtypes:
        if not gguf_path(llama.gguf_dir, llama.stem, dtype).is_file():
            raise FileNotFoundError(
                f"no {gguf_path(llama.gguf_dir, llama.stem, dtype)}: the bench's weights in GGUF "
                f"(bash benchmarks/build_llama_cpp.sh convert PRESET [LAYERS])"
            )


def execution_path(weights) -> dict:
    """Which code ran a model: the kernels (their ISA and pool size) or XLA (the CPU's ISA, every core)."""
    if weights.use_kernels:
        return dict(path="kernels", isa=kernels.kernels_isa(), threads=kernels.kernel_threads())
    return dict(path="XLA", isa=kernels.native.cpu_vector_isa(), threads=os.cpu_count() or 1)


def matrix_dtype_name(weights) -> str:
    """The dtype the block matrices are read in (a PackedMatrix's tiles, or the plain array's)."""
    dtype = weights.blocks[0].qkv_w_DE.dtype
    assert jnp.dtype(dtype).name in BYTES_PER_WEIGHT
    return jnp.dtype(dtype).name


def load_quietly(state, config: GPT2Config, dtype: str, pack: bool | None, dot: bool = False):
    """weights_for_dtype without the widening warning (the bench records the path itself); `dot`
    turns on the dtype's dot option (bf16_dot or int8_dot)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return weights_for_dtype(
            state, config, jnp.dtype(WEIGHT_DTYPES[dtype]), pack, bf16_dot=dot and dtype == "bf16",
            int8_dot=dot and dtype == "int8",
        )  # fmt: skip


def run_label(run: dict) -> str:
    """A run's name in the table and the plot: its dtype, and its dot option where it was on."""
    label = f"{run['dtype']} --{run['dtype']}-dot" if run.get("bf16_dot") or run.get("int8_dot") else run["dtype"]
    assert label.startswith(run["dtype"])
    return label


def run_benchmarks(
    config: GPT2Config, dtypes: list[str], batches: list[int], prefill_lens: list[int], new_tokens: int,
    repeats: int, contexts: list[int], progress: bool = True, kv_dtype: str = "fp32", llama: LlamaPeer | None = None,
    torch_device: str = "cpu", mesh=None, scoring: tuple[tuple[int, int], ...] = (), bf16_dot: bool = False,
    int8_dot: bool = False,
) -> dict:  # fmt: skip
    """Every measurement of one model shape, for each weight dtype, as a JSON-ready dict.
    `scoring` lists (batch, length) forwards with all logits to time as well; `bf16_dot` loads the
    bf16 run with load_weights' bf16_dot option (dtypes must include bf16), `int8_dot` the int8 run
    with int8_dot.

    transformers runs on `torch_device` ("cpu", or "cuda" to compare on the same card as JAX's GPU);
    our side on `mesh` when given (placed as load_weights places it, unpacked).
    """
    from tqdm import tqdm

    assert dtypes and all(dtype in WEIGHT_DTYPES for dtype in dtypes)
    assert kv_dtype in KV_DTYPES
    if bf16_dot and "bf16" not in dtypes:
        raise ValueError("--bf16-dot applies to the bf16 run: include bf16 in --dtypes")
    if int8_dot and "int8" not in dtypes:
        raise ValueError("--int8-dot applies to the int8 run: include int8 in --dtypes")
    if llama is not None:
        check_llama_peer(llama, dtypes)  # before minutes of measuring, not after
    state, model = make_models(config)
    results: dict = dict(machine=machine_info(), config=dataclasses.asdict(config), kv_dtype=kv_dtype, runs=[])
    results["kernels"] = dict(
        available=kernels.kernels_available(), isa=kernels.kernels_isa(), threads=kernels.kernel_threads()
    )  # fmt: skip
    results["mesh"] = None if mesh is None else dict(mesh.shape)
    bandwidths = [measure_bandwidth_gbs()]
    plan = [("decode", batch, 20) for batch in batches] + [("decode", 1, context) for context in contexts]
    plan += [("prefill", 1, length) for length in prefill_lens]
    plan += [("scoring", batch, length) for batch, length in scoring]
    fma_peaks: list[float] = []
    sample_fma_peak(fma_peaks)
    bar = tqdm(total=len(dtypes) * (len(plan) + 1) + 1, desc="benchmarks", disable=not progress)
    # llama.cpp first: a llama-bench that cannot run these files ends the run before minutes of ours.
    llama_runs = {} if llama is None else {
        dtype: run_llama_bench(llama.binary, gguf_path(llama.gguf_dir, llama.stem, dtype), llama.threads) for dtype in dtypes
    }  # fmt: skip
    for dtype in dtypes:
        run = bench_dtype(
            config, state, model, dtype, plan, new_tokens, repeats, kv_dtype, torch_device, mesh, bandwidths, bar.update,
            (bf16_dot and dtype == "bf16") or (int8_dot and dtype == "int8"),
        )  # fmt: skip
        if dtype in llama_runs:
            run["llama"] = llama_runs[dtype]
        results["runs"].append(run)
        bandwidths.append(measure_bandwidth_gbs())
        sample_fma_peak(fma_peaks)
    results["without_kernels"] = bench_without_kernels(config, state, dtypes, new_tokens, repeats, kv_dtype)
    bar.update()
    bar.close()
    results["bandwidth_samples_gbs"] = bandwidths
    add_rooflines(results)
    results["fma_peak_samples_gflops"] = fma_peaks
    add_fma_peak_fractions(results)
    assert len(results["runs"]) == len(dtypes)
    return results


def bench_dtype(
    config, state, model, dtype: str, plan, new_tokens: int, repeats: int, kv_dtype: str, torch_device: str, mesh,
    bandwidths, tick, dot: bool = False,
) -> dict:  # fmt: skip
    """One dtype's run: the model as load_weights makes it here (placed on `mesh` when it has more
    than one device: unpacked, XLA's dot), every row of the plan against transformers."""
    import tempfile

    on_mesh = mesh is not None and mesh.size > 1
    weights = load_quietly(state, config, dtype, pack=False if on_mesh else None, dot=dot)
    if on_mesh:
        weights = place_weights(weights, config, mesh)
    hf_dtype = transformers_dtype_for(dtype, torch_device, peer_has_bf16_instructions())
    hf_model = transformers_model_for(model, hf_dtype).to(torch_device)
    with tempfile.TemporaryDirectory() as cache_dir:
        cold_s, warm_s = first_token_s(config, weights, cache_dir)
    tick()
    run = dict(dtype=dtype, packed=weights.lm_head_DV is not None, transformers_dtype=str(hf_model.dtype))
    run["bf16_dot"], run["int8_dot"] = weights.bf16_dot, weights.int8_dot
    run["transformers_note"] = bf16_peer_note(hf_dtype, dtype, peer_isa_caps(os.environ))
    run["transformers_device"] = str(hf_model.device)
    run.update(execution_path(weights), matrix_dtype=matrix_dtype_name(weights))
    run.update(jax_cold_first_token_s=cold_s, jax_warm_first_token_s=warm_s, decode=[], prefill=[], scoring=[])
    cache_dtype = jnp.dtype(KV_DTYPES[kv_dtype])
    for kind, batch, length in plan:
        bandwidths.append(measure_bandwidth_gbs(repeats=3))  # sampled throughout: the host's bandwidth wanders
        if kind == "prefill":
            run["prefill"].append(bench_prefill(config, weights, hf_model, length, repeats, cache_dtype))
        elif kind == "scoring":
            run["scoring"].append(bench_scoring(config, weights, hf_model, batch, length, repeats))
        else:
            run["decode"].append(bench_decode(config, weights, hf_model, batch, length, new_tokens, repeats, cache_dtype))
        tick()
    return run


def bench_without_kernels(config, state, dtypes: list[str], new_tokens: int, repeats: int, kv_dtype: str) -> list[dict]:
    """Batch-1 decode (20 prompt tokens) of each dtype loaded with pack=False, in this process, beside
    fp32 loaded the same way: where the kernels cannot run, a narrow dtype must not be the slower one.

    The dtypes take turns, one timing each per round, so a host that slows down part-way through
    slows every dtype alike instead of whichever ran last (measured here: three float32-read models,
    timed one after another, once came out 1.00x, 0.90x and 0.49x)."""
    prompt = np.random.default_rng(1).integers(0, config.vocab_size, (1, 20)).tolist()
    cache_dtype = jnp.dtype(KV_DTYPES[kv_dtype])
    names = ["fp32", *[name for name in dtypes if name != "fp32"]]
    models = {name: load_quietly(state, config, name, pack=False) for name in names}
    assert not any(weights.use_kernels for weights in models.values())
    rates: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(repeats):
        for name in names:
            rates[name] += decode_only_rates(prompt, models[name], config, new_tokens, 1, cache_dtype)
    rows = [
        dict(dtype=name, matrix_dtype=matrix_dtype_name(models[name]), jax_tok_s=median_of_finite(rates[name]), jax_rates=rates[name])
        for name in names
    ]  # fmt: skip
    for row in rows:
        row["ratio_to_fp32"] = row["jax_tok_s"] / rows[0]["jax_tok_s"]
    assert rows[0]["dtype"] == "fp32"
    return rows


def add_rooflines(results: dict) -> None:
    """Each decode row as a fraction of two rooflines: at the best bandwidth sampled in the run (a
    noisy neighbour can only lower a sample, so this is the strict one) and at the median sample
    (what the host typically gave while the run went on)."""
    samples = results["bandwidth_samples_gbs"]
    assert samples and min(samples) > 0
    results.update(bandwidth_gbs=max(samples), bandwidth_median_gbs=statistics.median(samples))
    for run in results["runs"]:
        for row in run["decode"]:
            row["bytes_per_step"] = decode_bytes_per_step(
                GPT2Config(**results["config"]), row["batch"], row["prompt_len"] + row["new_tokens"] // 2,
                run["matrix_dtype"], KV_DTYPES[results["kv_dtype"]],
            )  # fmt: skip
            row["roofline_tok_s"] = row["batch"] * results["bandwidth_gbs"] * 1e9 / row["bytes_per_step"]
            row["jax_fraction_of_roofline"] = row["jax_tok_s"] / row["roofline_tok_s"]
            median_roofline = row["batch"] * results["bandwidth_median_gbs"] * 1e9 / row["bytes_per_step"]
            row["jax_fraction_of_median_roofline"] = row["jax_tok_s"] / median_roofline


def add_fma_peak_fractions(results: dict) -> None:
    """Each compute-bound row (prefill, forward with all logits, scoring) as a fraction of the FMA
    peak: tokens/s x FLOP per token / the best peak sampled in the run (a busy host only lowers a
    sample). Both sides against the same peak; absent where the kernels (and their probe) are not."""
    samples = results["fma_peak_samples_gflops"]
    if not samples:
        return
    peak = max(samples) * 1e9
    results.update(fma_peak_gflops=max(samples), fma_peak_median_gflops=statistics.median(samples))
    config = GPT2Config(**results["config"])
    for run in results["runs"]:
        for row in run["prefill"]:
            last_only = forward_flop_per_token(config, row["prompt_len"], 1 / row["prompt_len"])
            every = forward_flop_per_token(config, row["prompt_len"], 1.0)
            row["jax_fraction_of_fma_peak"] = row["jax_tok_s"] * last_only / peak
            row["hf_fraction_of_fma_peak"] = row["hf_tok_s"] * last_only / peak
            row["jax_forward_fraction_of_fma_peak"] = row["jax_forward_tok_s"] * every / peak
            row["hf_forward_fraction_of_fma_peak"] = row["hf_forward_tok_s"] * every / peak
        for row in run.get("scoring", []):
            every = forward_flop_per_token(config, row["prompt_len"], 1.0)
            row["jax_fraction_of_fma_peak"] = row["jax_tok_s"] * every / peak
            row["hf_fraction_of_fma_peak"] = row["hf_tok_s"] * every / peak


def short_decode(run: dict) -> dict | None:
    """The batch-1 decode row with the shortest prompt (the ~20-token one), if the run has it."""
    rows = [row for row in run["decode"] if row["batch"] == 1]
    return min(rows, key=lambda row: row["prompt_len"]) if rows else None


def llama_ratios(run: dict) -> dict:
    """Our batch-1 decode over llama.cpp's tg, and our prefill over its pp at the same prompt length."""
    if "llama" not in run:
        return {}
    llama, ratios = run["llama"], {}
    short = short_decode(run)
    if short is not None:
        ratios["decode"] = short["jax_tok_s"] / llama["tg_tok_s"]
    for row in run["prefill"]:
        if row["prompt_len"] == llama["prompt_len"]:
            ratios["prefill"] = row["jax_tok_s"] / llama["pp_tok_s"]
        pp = llama.get("pp_by_prompt_len", {}).get(str(row["prompt_len"]))
        if pp is not None and row["prompt_len"] != llama["prompt_len"]:
            ratios[f"prefill T={row['prompt_len']}"] = row["jax_tok_s"] / pp
    return ratios


def torch_isa_note(machine: dict) -> str:
    """", code for AVX2 (ATEN_CPU_CAPABILITY=avx2, ...)": torch's ISA where the run capped it, else ""
    (older results carry neither field)."""
    caps = machine.get("peer_isa_caps") or {}
    if not caps:
        return ""
    assert "torch_cpu_capability" in machine
    return f", code for {machine['torch_cpu_capability']} (" + ", ".join(f"{k}={v}" for k, v in sorted(caps.items())) + ")"


def format_table(results: dict) -> str:
    """The results as a plain-text table: figures, ratio to transformers (and llama.cpp), roofline fraction."""
    machine, path = results["machine"], results["kernels"]
    lines = [
        f"machine: {machine['cpu']}, {machine['cores']} cores, jax {machine['jax']} on {machine['device_kind']}, "
        f"torch {machine['torch']} ({machine['torch_threads']} threads{torch_isa_note(machine)}); read bandwidth best {results['bandwidth_gbs']:.1f} GB/s, median "
        f"{results['bandwidth_median_gbs']:.1f} GB/s of {len(results['bandwidth_samples_gbs'])} samples in this run",
        f"kernels: {'available' if path['available'] else 'not available'} here (ISA {path['isa']}, "
        f"{path['threads']} threads); KV cache {results['kv_dtype']}",
    ]
    if "fma_peak_gflops" in results:
        lines.append(
            f"FMA peak (12 vector FMA chains a thread, {path['threads']} threads): best {results['fma_peak_gflops']:.0f} "
            f"GFLOP/s, median {results['fma_peak_median_gflops']:.0f} of {len(results['fma_peak_samples_gflops'])} "
            f"samples; '% peak' = tokens/s x FLOP a token / the best"
        )
    for run in results["runs"]:
        lines += format_run(run)
    lines.append("\nwithout the kernels (pack=False, this process): batch-1 decode, 20 prompt tokens")
    for row in results["without_kernels"]:
        lines.append(f"  {row['dtype']:<5} (matrices read as {row['matrix_dtype']}){row['jax_tok_s']:>10.1f} tok/s  {row['ratio_to_fp32']:.2f}x fp32")
    return "\n".join(lines)


def format_run(run: dict) -> list[str]:
    lines = [
        f"\n[{run_label(run)}] {run['path']} ({run['isa']}, {run['threads']} threads, matrices {run['matrix_dtype']}); "
        f"transformers as {run['transformers_dtype']} on {run['transformers_device']}"
        f"{' (' + run['transformers_note'] + ')' if run.get('transformers_note') else ''}; first token B=1, 20 tokens: "
        f"{run['jax_cold_first_token_s']:.2f} s cold (compile), {run['jax_warm_first_token_s']:.2f} s warm cache",
        f"{'measurement':<34}{'jax-gpt2':>12}{'transformers':>14}{'ratio':>8}{'roofline':>10}{'(median)':>10}{'same tokens':>13}{'jax-gpt2 range':>17}",
    ]
    for row in run["decode"]:
        name = f"decode B={row['batch']} ctx={row['prompt_len']}+{row['new_tokens']} tok/s"
        ratio = row["jax_tok_s"] / row["hf_tok_s"]
        fraction = f"{100 * row['jax_fraction_of_roofline']:.0f}%"
        same = f"{100 * row['token_agreement']:.0f}%"
        spread = f"{min(row['jax_rates']):.1f}-{max(row['jax_rates']):.1f}"
        median = f"{100 * row['jax_fraction_of_median_roofline']:.0f}%"
        lines.append(f"{name:<34}{row['jax_tok_s']:>12.1f}{row['hf_tok_s']:>14.1f}{ratio:>7.2f}x{fraction:>10}{median:>10}{same:>13}{spread:>17}")
    short = short_decode(run)
    for row in run["decode"]:
        if short is not None and row["batch"] == 1 and row is not short:
            share = row["jax_tok_s"] / short["jax_tok_s"]
            lines.append(f"  decode at ctx={row['prompt_len']} is {100 * share:.0f}% of decode at ctx={short['prompt_len']}")
    for row in run["prefill"]:
        for label, ours, theirs in [
            ("prefill", row["jax_tok_s"], row["hf_tok_s"]),
            ("forward, all logits,", row["jax_forward_tok_s"], row["hf_forward_tok_s"]),
        ]:  # fmt: skip
            name = f"{label} T={row['prompt_len']} tok/s"
            lines.append(f"{name:<34}{ours:>12.1f}{theirs:>14.1f}{ours / theirs:>7.2f}x" + peak_note(row, label))
    for row in run.get("scoring", []):
        name = f"scoring B={row['batch']} T={row['prompt_len']} tok/s"
        ratio = row["jax_tok_s"] / row["hf_tok_s"]
        lines.append(f"{name:<34}{row['jax_tok_s']:>12.1f}{row['hf_tok_s']:>14.1f}{ratio:>7.2f}x" + peak_note(row, "scoring"))
    if "llama" in run:
        llama, ratios = run["llama"], llama_ratios(run)
        lines.append(
            f"llama.cpp {GGUF_TYPES[run['dtype']]} ({llama['threads']} threads): tg{llama['new_tokens']} "
            f"{llama['tg_tok_s']:.1f} tok/s, pp{llama['prompt_len']} {llama['pp_tok_s']:.1f} tok/s"
            + "".join(f", pp{n} {pp:.1f} tok/s" for n, pp in llama.get("pp_by_prompt_len", {}).items() if int(n) != llama["prompt_len"])
            + "; ours/llama.cpp: "
            + ", ".join(f"{name} {ratio:.2f}x" for name, ratio in ratios.items())
        )
    return lines


def peak_note(row: dict, label: str) -> str:
    """'  ours NN% / theirs NN% of FMA peak' for a compute-bound row, where the run measured the peak."""
    key = "forward_fraction_of_fma_peak" if label.startswith("forward") else "fraction_of_fma_peak"
    if f"jax_{key}" not in row:
        return ""
    return f"   {100 * row[f'jax_{key}']:.0f}% / {100 * row[f'hf_{key}']:.0f}% of FMA peak"


def plot_rows(run: dict) -> list[tuple[str, float, float | None, str]]:
    """(label, ratio to transformers, ratio to llama.cpp or None, note) per measurement of one run."""
    llama = llama_ratios(run)
    short = short_decode(run)
    rows = []
    for row in run["decode"]:
        vs_llama = llama.get("decode") if row is short else None
        note = f"{100 * row['jax_fraction_of_roofline']:.0f}% of roofline"
        rows.append((f"decode B={row['batch']} ctx={row['prompt_len']}", row["jax_tok_s"] / row["hf_tok_s"], vs_llama, note))
    for row in run["prefill"]:
        vs_llama = llama.get("prefill") if "llama" in run and row["prompt_len"] == run["llama"]["prompt_len"] else None
        rows.append((f"prefill T={row['prompt_len']}", row["jax_tok_s"] / row["hf_tok_s"], vs_llama, ""))
    return rows


def plot_results(results: dict, path) -> None:
    """A PNG: per weight dtype, each measurement as jax-gpt2's speed over transformers' (and over
    llama.cpp's, where measured) on a linear axis with the 1x line drawn, the decode rows annotated
    with their roofline fraction; a last panel compares each dtype to fp32 without the kernels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(run, plot_rows(run)) for run in results["runs"]]
    assert panels
    heights = [len(rows) for _, rows in panels] + [len(results["without_kernels"])]
    figure, axes = plt.subplots(
        len(heights), 1, figsize=(9, 0.55 * sum(heights) + 1.2 * len(heights) + 0.8),
        gridspec_kw=dict(height_ratios=[h + 1 for h in heights]), squeeze=False,
    )  # fmt: skip
    for axis, (run, rows) in zip(axes[:, 0], panels):
        plot_panel(axis, rows, f"{run_label(run)} weights: {run['path']} ({run['isa']}, {run['threads']} threads)")
    plot_without_kernels(axes[-1, 0], results["without_kernels"])
    machine = results["machine"]
    figure.suptitle(
        f"GPT-2 {results.get('preset', '')}, KV cache {results['kv_dtype']}: {machine['cpu']}, {machine['cores']} cores",
        fontsize=10,
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_panel(axis, rows: list[tuple[str, float, float | None, str]], title: str) -> None:
    """Horizontal bars of speed ratios (linear, from 0), 1x dashed, roofline notes to the right."""
    positions = np.arange(len(rows))
    vs_hf = [ratio for _, ratio, _, _ in rows]
    vs_llama = [np.nan if ratio is None else ratio for _, _, ratio, _ in rows]
    has_llama = any(ratio is not None for _, _, ratio, _ in rows)
    height = 0.38 if has_llama else 0.6
    axis.barh(positions - (height / 2 if has_llama else 0), vs_hf, height=height, label="vs transformers")
    if has_llama:
        axis.barh(positions + height / 2, vs_llama, height=height, label="vs llama.cpp")
    right = 1.45 * max([1.0, *vs_hf, *[r for r in vs_llama if np.isfinite(r)]])
    for y, (_, ratio, llama, note) in enumerate(rows):
        text = f"{ratio:.2f}x" + ("" if llama is None else f" / {llama:.2f}x") + (f"   {note}" if note else "")
        axis.text(max(ratio, 0 if llama is None else llama) + right * 0.01, y, text, va="center", fontsize=8)
    axis.axvline(1.0, color="black", linestyle="--", linewidth=1)
    axis.set_xlim(0, right)
    axis.set_yticks(positions, [label for label, _, _, _ in rows], fontsize=8)
    axis.invert_yaxis()
    axis.set_title(title, fontsize=9, loc="left")
    axis.tick_params(axis="x", labelsize=8)
    axis.set_xlabel("jax-gpt2 speed / peer's speed (1x: as fast)", fontsize=8)
    axis.legend(loc="lower right", fontsize=7)


def plot_without_kernels(axis, rows: list[dict]) -> None:
    labels = [f"{row['dtype']} (read as {row['matrix_dtype']})" for row in rows]
    ratios = [row["ratio_to_fp32"] for row in rows]
    positions = np.arange(len(rows))
    axis.barh(positions, ratios, height=0.6, color="tab:gray")
    for y, row in enumerate(rows):
        axis.text(row["ratio_to_fp32"] * 1.01, y, f"{row['ratio_to_fp32']:.2f}x ({row['jax_tok_s']:.1f} tok/s)", va="center", fontsize=8)
    axis.axvline(1.0, color="black", linestyle="--", linewidth=1)
    axis.set_xlim(0, 1.45 * max([1.0, *ratios]))
    axis.set_yticks(positions, labels, fontsize=8)
    axis.invert_yaxis()
    axis.set_title("without the kernels (pack=False): batch-1 decode over fp32's", fontsize=9, loc="left")
    axis.tick_params(axis="x", labelsize=8)
