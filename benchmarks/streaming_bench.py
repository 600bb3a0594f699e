"""Decode speed of `stream_generate` (several chunk sizes) beside `generate` and transformers' generate.

    uv run python -m benchmarks.streaming_bench

gpt2-shape random weights, float32, greedy, batch 1 and 8, 20-token prompts. Decode speed leaves
the prompt's prefill out, as `jax-gpt2 bench` measures it: each call runs for 33 new tokens and
for 1, and the 32 extra tokens per row are divided by the extra time (fastest of 3 runs each).
"""

import numpy as np
import torch

from jax_gpt2.tools.bench import bench_decode, make_models, rate, time_repeats
from jax_gpt2.config import PRESETS
from jax_gpt2.loader import weights_for_dtype
from jax_gpt2.generate import generate, stream_generate

NEW_TOKENS = 33
REPEATS = 3


def main() -> None:
    torch.set_num_threads(2)  # XLA's CPU client uses both cores too
    config = PRESETS["gpt2"]
    state, model = make_models(config)
    weights = weights_for_dtype(state, config, np.float32, pack=None)
    for batch in (1, 8):
        both = bench_decode(config, weights, model, batch, 20, NEW_TOKENS, REPEATS)
        # bench_decode draws its prompts from the batch size as seed: the same prompts here.
        prompts = np.random.default_rng(batch).integers(0, config.vocab_size, (batch, 20)).tolist()
        first = time_repeats(lambda: generate(prompts, weights, config, max_new_tokens=1), REPEATS).min_s
        row = f"batch {batch}: generate {both['jax_tok_s']:.1f} tok/s"
        for chunk in (1, 4, 8):
            stream = time_repeats(
                lambda: list(stream_generate(prompts, weights, config, max_new_tokens=NEW_TOKENS, chunk_steps=chunk)),
                REPEATS,
            ).min_s
            row += f", stream chunk {chunk} {rate(batch * (NEW_TOKENS - 1), stream - first):.1f} tok/s"
        print(f"{row}; transformers {both['hf_tok_s']:.1f} tok/s", flush=True)


if __name__ == "__main__":
    main()
