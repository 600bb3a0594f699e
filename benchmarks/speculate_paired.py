"""Speculation against plain decoding, paired in one process: both runs of `generate` timed in turns
(prefill timed alone and subtracted), so that a host whose bandwidth wanders between runs still
compares like with like. Prints each variant's median time a step and the ratio, per round and
over the medians.

    uv run python benchmarks/speculate_paired.py --batch 8 --new-tokens 48 --dtype fp32 --sampled --rounds 21

The model is the gpt2 shape with random weights (std 0.1, the bench's seed) and GPT-2's 50257-token
vocabulary; prompts are 64 random tokens a row, so a lookup rarely finds anything to copy.
"""

import argparse
import statistics
import time

import numpy as np

from jax_gpt2 import PromptLookup
from jax_gpt2.config import PRESETS
from jax_gpt2.generate import generate
from jax_gpt2.loader import normalize_keys
from jax_gpt2.tools.bench import BENCH_SEED, load_quietly
from jax_gpt2.tools.random_model import random_state_dict


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--dtype", choices=["fp32", "bf16", "int8"], default="fp32")
    parser.add_argument("--sampled", action="store_true", help="temperature 1, top-p 0.95 (default: greedy)")
    parser.add_argument("--rounds", type=int, default=11)
    args = parser.parse_args()
    config = PRESETS["gpt2"]
    weights = load_quietly(normalize_keys(random_state_dict(config, std=0.1, seed=BENCH_SEED)), config, args.dtype, None)
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (args.batch, 64)).tolist()
    sampling = dict(temperature=1.0, top_p=0.95, seed=3) if args.sampled else {}
    runs = {
        "plain": lambda: generate(ids, weights, config, **sampling, max_new_tokens=args.new_tokens),
        "speculative": lambda: generate(ids, weights, config, **sampling, max_new_tokens=args.new_tokens,
                                        speculate=PromptLookup()),  # fmt: skip
        "prefill": lambda: generate(ids, weights, config, **sampling, max_new_tokens=1),
    }
    if not args.sampled:
        assert runs["plain"]() == runs["speculative"](), "greedy speculation makes the plain tokens"
    seconds = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - start)
    prefill = statistics.median(seconds.pop("prefill"))
    step_ms = {name: (statistics.median(s) - prefill) * 1e3 / (args.new_tokens - 1) for name, s in seconds.items()}
    for name, ms in step_ms.items():
        print(f"{name:12s} {ms:6.2f} ms a step (median of {args.rounds})")
    per_round = sorted((s - prefill) / (p - prefill) for s, p in zip(seconds["speculative"], seconds["plain"]))
    quarter = len(per_round) // 4
    print(f"speculative / plain: {step_ms['speculative'] / step_ms['plain']:.4f} (medians); per round: median "
          f"{statistics.median(per_round):.4f}, quartiles {per_round[quarter]:.4f}-{per_round[-quarter - 1]:.4f}")


if __name__ == "__main__":
    main()
