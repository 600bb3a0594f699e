"""Speculation against plain decoding at one batch size, many repeats: `bench --speculate`'s own
comparison (`tools.bench_speculate.compare_workload`: plain and speculative calls alternating, the
prefill left out by subtracting a 1-token call) on the bench's std-0.1 weights, for one workload.
For the small effects at batch 8 (a percent or two), where `bench`'s few repeats cannot tell.

    uv run python benchmarks/speculate_paired.py --batch 8 --new-tokens 48 --dtype fp32 --workload sampled --repeats 21

Workloads: `loop` (greedy, a random 64-token prompt) or `sampled` (temperature 1, top-p 0.95); the
model is the gpt2 shape with GPT-2's 50257-token vocabulary, so lookups rarely find anything to copy.
"""

import argparse

from jax_gpt2 import PromptLookup
from jax_gpt2.config import PRESETS
from jax_gpt2.loader import normalize_keys
from jax_gpt2.tools.bench import BENCH_SEED, load_quietly
from jax_gpt2.tools.bench_speculate import compare_workload
from jax_gpt2.tools.random_model import random_state_dict


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--dtype", choices=["fp32", "bf16", "int8"], default="fp32")
    parser.add_argument("--workload", choices=["loop", "sampled"], default="sampled")
    parser.add_argument("--repeats", type=int, default=11)
    args = parser.parse_args()
    config = PRESETS["gpt2"]
    weights = load_quietly(normalize_keys(random_state_dict(config, std=0.1, seed=BENCH_SEED)), config, args.dtype, None)
    row = compare_workload(args.workload, weights, config, PromptLookup(), args.batch, 64, args.new_tokens, args.repeats)
    plain, spec = row["plain_tok_s"], row["speculative_tok_s"]
    print(f"plain        {plain['median']:7.1f} tok/s ({plain['min']:.1f}-{plain['max']:.1f}, {args.repeats} repeats)")
    print(f"speculative  {spec['median']:7.1f} tok/s ({spec['min']:.1f}-{spec['max']:.1f}); "
          f"{row['verify_passes']} passes verified a draft")  # fmt: skip
    print(f"speculative / plain: {row['speedup']:.4f}x tokens/s ({1 / row['speedup']:.4f}x the time a step)")


if __name__ == "__main__":
    main()
