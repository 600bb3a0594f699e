"""Speculation against plain decoding at one batch size, decode only, many paired repeats: for the
small effects at batch 8 (a percent or less) that `bench --speculate`'s few repeats cannot tell.

    uv run python benchmarks/speculate_paired.py --batch 8 --dtype fp32 --workload sampled --repeats 61
    uv run python benchmarks/speculate_paired.py --shape tiny --workload sampled --repeats 25

Each repeat prefills both sides (untimed) and then times one decode call of each, in turns: plain
decoding's loop (new_tokens - 1 steps and a last pick) and speculative decoding's (the same tokens,
its last one picked without a forward pass too). A repeat's ratio (speculative / plain time) pairs
two calls a few seconds apart, so the host's slow drifts (this 2-core VM's memory bandwidth wanders
between ~31 and ~54 GB/s) cancel out of it; the median and mean of the ratios are reported with
their quartiles. `--shape tiny` (one layer, 64 wide, GPT-2's 50257-token vocabulary) makes the
forward pass nearly free, so what is left is speculation's own bookkeeping in ms a step.

Workloads: `sampled` (temperature 1, top-p 0.95, a random prompt: lookups rarely find anything the
model then agrees with) or `loop` (greedy: a random model's greedy output falls into loops, which
lookups copy). Weights are the bench's std-0.1 random ones.
"""

import argparse
import warnings
import dataclasses
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jax_gpt2 import PromptLookup
from jax_gpt2.config import PRESETS
from jax_gpt2.generate import (
    _decode_speculative_jit, _prefill_jit, _start_speculating_jit, bucket_length, decode, pick_next,
    place_request, prepare_request, settings_from_arguments,
)  # fmt: skip
from jax_gpt2.loader import normalize_keys
from jax_gpt2.tools.bench import BENCH_SEED, load_quietly
from jax_gpt2.tools.bench_speculate import workload_prompts
from jax_gpt2.tools.random_model import random_state_dict

PROMPT_TOKENS = 16  # short: the prefill is not timed, but a short one keeps the repeats quick


@functools.partial(jax.jit, static_argnames=("config", "flags", "num_slots"), donate_argnames=("state",))
def plain_decode(state, max_steps, eos_U, params, weights, config, flags, num_slots):
    """generate's decode loop after its prefill: max_steps - 1 steps and a last pick (no forward pass)."""
    state, tokens_BY, _ = decode(state, max_steps - 1, eos_U, params, weights, config, flags, num_slots)
    token_B, _ = pick_next(state, params, flags)
    return jax.lax.dynamic_update_slice(tokens_BY, token_B[:, None], (0, max_steps - 1))


def timed(call) -> float:
    start = time.perf_counter()
    jax.block_until_ready(call())
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--dtype", choices=["fp32", "bf16", "int8"], default="fp32")
    parser.add_argument("--workload", choices=["loop", "sampled"], default="sampled")
    parser.add_argument("--shape", choices=["gpt2", "tiny"], default="gpt2")
    parser.add_argument("--repeats", type=int, default=25)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
    assert args.new_tokens >= 2
    assert args.repeats >= 2
    config = PRESETS["gpt2"]
    if args.shape == "tiny":
        config = dataclasses.replace(config, n_layer=1, n_embd=64, n_head=1)
    weights = load_quietly(normalize_keys(random_state_dict(config, std=0.1, seed=BENCH_SEED)), config, args.dtype, None)
    sampled = args.workload == "sampled"
    settings = settings_from_arguments(args.new_tokens, 1.0 if sampled else 0.0, None, 0.95 if sampled else None,
                                       None, None, 0)  # fmt: skip
    prompts = workload_prompts(args.workload, args.batch, PROMPT_TOKENS, config.vocab_size)
    request = prepare_request(prompts, config, settings, None)
    placed, lookup, N = place_request(request, None), PromptLookup(), args.new_tokens
    slots = bucket_length(N)
    max_len = placed.ids_BT.shape[1] + slots
    prefill_args = (placed.ids_BT, placed.start_B, placed.keys_B2, weights, config, max_len, jnp.float32)

    def plain():
        state = jax.block_until_ready(_prefill_jit(*prefill_args))
        return timed(lambda: plain_decode(state, np.int32(N), placed.eos_U, placed.params, weights, config,
                                          request.flags, slots))  # fmt: skip

    def speculative_decode(state):
        return _decode_speculative_jit(state, np.int32(N), placed.eos_U, placed.params, weights, config, request.flags,
                                       lookup, slots, slots)  # fmt: skip

    def speculative():
        state = jax.block_until_ready(_start_speculating_jit(*prefill_args, lookup))
        return timed(lambda: speculative_decode(state))

    for run in (plain, speculative, plain, speculative):  # compile, then one warm call each
        run()
    seconds = {"plain": [], "speculative": []}
    for _ in range(args.repeats):
        seconds["plain"].append(plain())
        seconds["speculative"].append(speculative())
    state, _, _ = speculative_decode(_start_speculating_jit(*prefill_args, lookup))
    report(args, seconds, N, int(np.sum(state.passes_B)))


def report(args, seconds: dict, N: int, passes: int) -> None:
    plain_ms = [s * 1e3 / (N - 1) for s in seconds["plain"]]  # N - 1 forward passes each side
    spec_ms = [s * 1e3 / (N - 1) for s in seconds["speculative"]]
    ratios = [s / p for s, p in zip(spec_ms, plain_ms)]
    q1, q3 = np.percentile(ratios, [25, 75])
    print(f"{args.shape} shape, {args.dtype}, batch {args.batch}, {args.workload}, {N} new tokens, "
          f"{args.repeats} paired repeats; {passes} verify passes had a draft")  # fmt: skip
    print(f"plain        {statistics.median(plain_ms):8.3f} ms a step (median)")
    print(f"speculative  {statistics.median(spec_ms):8.3f} ms a step (median); "
          f"difference of the medians {statistics.median(spec_ms) - statistics.median(plain_ms):+.3f} ms")  # fmt: skip
    print(f"speculative / plain, paired: median {statistics.median(ratios):.4f}, mean {statistics.mean(ratios):.4f} "
          f"(standard error {statistics.stdev(ratios) / len(ratios) ** 0.5:.4f}), quartiles {q1:.4f}-{q3:.4f}")  # fmt: skip


if __name__ == "__main__":
    main()
