"""lm_head split along V (what sharding.place_weights does) against lm_head replicated, on
forced host-device meshes: greedy decode B=8 tokens/s and perplexity tokens/s, gpt2 shape.

    XLA_FLAGS=--xla_force_host_platform_device_count=4 uv run python benchmarks/vocab_split.py 1x2 1x4

The host's cores and memory bus are shared by every forced device: this compares the two
placements against each other, it is not a speed-up over one device.
"""

import dataclasses
import statistics
import sys
import time

import numpy as np
from jax.sharding import PartitionSpec as P

from jax_gpt2 import generate, perplexity
from jax_gpt2.config import GPT2Config
from jax_gpt2.loader import normalize_keys, weights_for_dtype
from jax_gpt2.tools.random_model import random_state_dict
from jax_gpt2.sharding import make_mesh, padded_lm_head, parse_mesh, place_weights, put

CONFIG = GPT2Config()  # gpt2 shape: V = 50257 divides by no even count, so the split one is padded
PROMPTS = np.random.default_rng(0).integers(0, CONFIG.vocab_size, (8, 20)).tolist()
TEXT = np.random.default_rng(1).integers(0, CONFIG.vocab_size, 4096)


def decode_tok_s(weights, repeats: int = 3) -> float:
    """Extra tokens over extra time: 32 new tokens against 1, back to back (prefill cancels out)."""

    def run(count: int) -> float:
        start = time.perf_counter()
        generate(PROMPTS, weights, CONFIG, max_new_tokens=count, eos_token_id=None)
        return time.perf_counter() - start

    run(32), run(1)
    return statistics.median(8 * 31 / (run(32) - run(1)) for _ in range(repeats))


def perplexity_tok_s(weights) -> float:
    settings = dict(max_length=1024, stride=512, batch_size=4)
    perplexity(TEXT[:1536], weights, CONFIG, **settings)
    start = time.perf_counter()
    perplexity(TEXT, weights, CONFIG, **settings)
    return len(TEXT) / (time.perf_counter() - start)


def main() -> None:
    host = weights_for_dtype(normalize_keys(random_state_dict(CONFIG, 0.1, 0)), CONFIG, np.float32, pack=False)
    for text in sys.argv[1:]:
        mesh = make_mesh(*parse_mesh(text))
        split = place_weights(host, CONFIG, mesh)
        replicated = dataclasses.replace(split, lm_head_VD=put(padded_lm_head(host, 1), mesh, P()))
        for name, weights in (("lm_head replicated", replicated), ("lm_head split on V", split)):
            print(f"{text} {name}: decode B=8 {decode_tok_s(weights):.1f} tok/s, "
                  f"perplexity {perplexity_tok_s(weights):.1f} tok/s", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
