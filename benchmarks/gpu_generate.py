"""Greedy generate of jax-gpt2 against transformers' generate, both on the same device.

Part of benchmarks/gpu_check.sh: on a card, JAX runs on the GPU and transformers on CUDA beside
it (float32, TF32 off), and every greedy token must be identical. Random weights of each preset
shape (no hub access), the same ones `jax-gpt2 bench` uses. Writes one JSON file; exits 1 when
any token differs.

    python benchmarks/gpu_generate.py --presets gpt2 gpt2-medium --torch-device cuda --out generate.json
"""

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import jax
import numpy as np
import torch

from jax_gpt2.tools.bench import hf_greedy, make_models
from jax_gpt2.config import PRESETS
from jax_gpt2.generate import generate
from jax_gpt2.loader import weights_for_dtype


def compare_greedy(preset: str, layers: int | None, batch: int, prompt_len: int, new_tokens: int, torch_device: str):
    """Both sides' greedy tokens for the same random prompts, and where they first differ."""
    config = PRESETS[preset] if layers is None else dataclasses.replace(PRESETS[preset], n_layer=layers)
    state, model = make_models(config)
    model = model.to(torch_device)
    weights = weights_for_dtype(state, config, np.float32, pack=False)  # the XLA path: what a GPU runs
    prompts_BT = np.random.default_rng(0).integers(0, config.vocab_size, (batch, prompt_len))
    start = time.perf_counter()
    ours = generate(prompts_BT.tolist(), weights, config, max_new_tokens=new_tokens)
    ours_s = time.perf_counter() - start
    start = time.perf_counter()
    theirs = hf_greedy(model, torch.as_tensor(prompts_BT, device=model.device), new_tokens)[:, prompt_len:].tolist()
    theirs_s = time.perf_counter() - start
    first_differences = [next((t for t, (a, b) in enumerate(zip(x, y, strict=True)) if a != b), None)
                         for x, y in zip(ours, theirs, strict=True)]  # fmt: skip
    assert len(ours) == batch
    assert len(first_differences) == batch
    return dict(
        preset=preset, n_layer=config.n_layer, batch=batch, prompt_len=prompt_len, new_tokens=new_tokens,
        jax_device=str(jax.devices()[0]), jax_device_kind=jax.devices()[0].device_kind,
        transformers_device=str(model.device), identical=ours == theirs, first_difference_per_row=first_differences,
        jax_s_with_compile=ours_s, transformers_s=theirs_s,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", choices=sorted(PRESETS), default=["gpt2", "gpt2-medium"])
    parser.add_argument("--layers", type=int, default=None, help="override n_layer (the CPU dry run)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=20)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--torch-device", choices=["cpu", "cuda"], default="cuda")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 means float32 on both sides (torch's default, made sure)
    rows = [
        compare_greedy(preset, args.layers, args.batch, args.prompt_len, args.new_tokens, args.torch_device)
        for preset in args.presets
    ]
    args.out.write_text(json.dumps(dict(torch=torch.__version__, jax=jax.__version__, rows=rows), indent=2))
    for row in rows:
        verdict = "identical" if row["identical"] else f"DIFFER (first per row: {row['first_difference_per_row']})"
        print(f"generate {row['preset']} B={row['batch']} +{row['new_tokens']} tokens, jax on "
              f"{row['jax_device_kind']} vs transformers on {row['transformers_device']}: {verdict}")  # fmt: skip
    return 0 if all(row["identical"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
