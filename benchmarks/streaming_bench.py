"""Decode speed of `generate` and `stream_generate` (several chunk sizes) beside transformers' generate.

    uv run python -m benchmarks.streaming_bench

gpt2-shape random weights, float32, greedy, batch 1 and 8, 20-token prompts. Decode speed leaves
the prompt's prefill out: each side runs the same call for 33 new tokens and for 1, and the 32
extra tokens per row are divided by the extra time (fastest of 3 runs each).
"""

import numpy as np
import torch

from jax_gpt2.bench import make_models, time_repeats
from jax_gpt2.config import PRESETS
from jax_gpt2.generate import generate, stream_generate

NEW_TOKENS = 33


def fastest(run) -> float:
    return time_repeats(run, repeats=3).min_s


def hf_generate(model, prompts: list[list[int]], count: int) -> None:
    ids = torch.as_tensor(prompts)
    with torch.no_grad():
        model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=count, min_new_tokens=count,
            do_sample=False, pad_token_id=0, eos_token_id=None,
        )  # fmt: skip


def main() -> None:
    torch.set_num_threads(2)  # XLA's CPU client uses both cores too
    config = PRESETS["gpt2"]
    weights, model = make_models(config)
    for batch in (1, 8):
        prompts = np.random.default_rng(batch).integers(0, config.vocab_size, (batch, 20)).tolist()
        extra = batch * (NEW_TOKENS - 1)
        first = fastest(lambda: generate(prompts, weights, config, max_new_tokens=1))
        full = fastest(lambda: generate(prompts, weights, config, max_new_tokens=NEW_TOKENS))
        row = f"batch {batch}: generate {extra / (full - first):.1f} tok/s"
        for chunk in (1, 4, 8):
            stream = fastest(
                lambda: list(stream_generate(prompts, weights, config, max_new_tokens=NEW_TOKENS, chunk_steps=chunk))
            )
            row += f", stream chunk {chunk} {extra / (stream - first):.1f} tok/s"
        hf_first = fastest(lambda: hf_generate(model, prompts, 1))
        hf_full = fastest(lambda: hf_generate(model, prompts, NEW_TOKENS))
        print(f"{row}; transformers {extra / (hf_full - hf_first):.1f} tok/s", flush=True)


if __name__ == "__main__":
    main()
