"""What float32 at `Precision.HIGHEST` costs against XLA's default precision, and what it buys.

Part of benchmarks/gpu_check.sh. On a GPU, XLA's default precision for a float32 dot may use
TF32 (a 10-bit mantissa); the parity contract (max |logit diff| <= 1e-4, scaled by the logits'
magnitude) is why the library pins HIGHEST. This measures both on the same random weights of a
preset shape: the forward pass's time and its distance from transformers (float32, TF32 off),
and greedy decode tokens/s at a few batch sizes. On a CPU both settings are full float32.

    python benchmarks/gpu_precision.py --preset gpt2 --torch-device cuda --out precision.json
"""

import argparse
import contextlib
import dataclasses
import json
import sys
from pathlib import Path

import jax
import numpy as np
import torch

from jax_gpt2 import layers, model
from jax_gpt2.tools.bench import make_models, median_of_finite, paired_rates, time_repeats, wait_for_torch
from jax_gpt2.config import PRESETS
from jax_gpt2.generate import generate
from jax_gpt2.loader import weights_for_dtype

PRECISIONS = {"highest": jax.lax.Precision.HIGHEST, "default": jax.lax.Precision.DEFAULT}


@contextlib.contextmanager
def model_precision(precision: jax.lax.Precision):
    """Every einsum of the model at `precision`, inside this block only.

    The library pins HIGHEST in one constant, layers.PRECISION (model.py imports it by name), read
    when a function is traced: swap both, drop JAX's compiled functions so that they are traced
    again, and put everything back afterwards. A measurement's tool, never a library switch.
    """
    saved = layers.PRECISION, model.PRECISION
    layers.PRECISION = model.PRECISION = precision
    jax.clear_caches()
    try:
        yield
    finally:
        layers.PRECISION, model.PRECISION = saved
        jax.clear_caches()


def lowered_precisions(ids_BT, weights, config) -> set[str]:
    """The precision names in the forward pass's lowered program: proof the swap reached the dots."""
    text = model._forward_jit.lower(ids_BT, weights, config=config).as_text()
    return {name for name in ("HIGHEST", "HIGH", "DEFAULT") if f"{name}," in text or f"{name}]" in text}


def reference_logits(hf_model, ids_BT: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        logits = hf_model(torch.as_tensor(ids_BT, device=hf_model.device)).logits
    wait_for_torch(logits.device)
    return logits.float().cpu().numpy()


def measure(name, config, weights, ids_BT, reference_BTV, batches, new_tokens, repeats) -> dict:
    """Forward time and distance from transformers, then decode tokens/s, at one precision."""
    logits_BTV = np.asarray(model.gpt2_forward(ids_BT, weights, config))
    forward = time_repeats(lambda: model.gpt2_forward(ids_BT, weights, config).block_until_ready(), repeats)
    tolerance = 1e-4 * max(1.0, float(np.abs(reference_BTV).max()))  # tests/checkpoints.logit_tolerance
    max_diff = float(np.abs(logits_BTV - reference_BTV).max())
    decode = []
    for batch in batches:
        prompts = np.random.default_rng(batch).integers(0, config.vocab_size, (batch, 20)).tolist()
        rates, _ = paired_rates(
            lambda p=prompts: generate(p, weights, config, max_new_tokens=new_tokens),
            lambda p=prompts: generate(p, weights, config, max_new_tokens=1),
            batch * (new_tokens - 1), repeats,
        )  # fmt: skip
        decode.append(dict(batch=batch, tok_s=median_of_finite(rates), rates=rates))
    assert len(decode) == len(batches)
    return dict(
        precision=name, forward_T=ids_BT.shape[1], forward_median_s=forward.median_s, max_abs_diff=max_diff,
        tolerance=tolerance, within_parity_bar=max_diff <= tolerance,
        argmax_agreement=float((logits_BTV.argmax(-1) == reference_BTV.argmax(-1)).mean()), decode=decode,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="gpt2")
    parser.add_argument("--layers", type=int, default=None, help="override n_layer (the CPU dry run)")
    parser.add_argument("--prompt-len", type=int, default=128, help="tokens in the timed forward pass")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--torch-device", choices=["cpu", "cuda"], default="cuda")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = False  # the reference is float32 through and through
    config = PRESETS[args.preset] if args.layers is None else dataclasses.replace(PRESETS[args.preset], n_layer=args.layers)
    state, hf_model = make_models(config)
    hf_model = hf_model.to(args.torch_device)
    weights = weights_for_dtype(state, config, np.float32, pack=False)  # the XLA path, where precision applies
    ids_BT = np.random.default_rng(0).integers(0, config.vocab_size, (1, args.prompt_len))
    reference_BTV = reference_logits(hf_model, ids_BT)
    rows = []
    for name, precision in PRECISIONS.items():
        with model_precision(precision):
            lowered = lowered_precisions(ids_BT, weights, config)
            assert lowered == {precision.name}, f"{name}: the lowered dots carry {lowered}"
            rows.append(measure(name, config, weights, ids_BT, reference_BTV, args.batch_sizes, args.new_tokens, args.repeats))
    highest, default = rows
    results = dict(
        preset=args.preset, n_layer=config.n_layer, jax=jax.__version__, device_kind=jax.devices()[0].device_kind,
        transformers_device=str(hf_model.device), rows=rows,
        forward_highest_over_default_time=highest["forward_median_s"] / default["forward_median_s"],
    )  # fmt: skip
    args.out.write_text(json.dumps(results, indent=2))
    for row in rows:
        decode = ", ".join(f"B={d['batch']} {d['tok_s']:.1f} tok/s" for d in row["decode"])
        print(f"{row['precision']:>8} on {results['device_kind']}: forward T={row['forward_T']} "
              f"{1e3 * row['forward_median_s']:.2f} ms, max |diff| {row['max_abs_diff']:.3g} "
              f"(bar {row['tolerance']:.3g}), decode {decode}")  # fmt: skip
    return 0 if highest["within_parity_bar"] else 1


if __name__ == "__main__":
    sys.exit(main())
