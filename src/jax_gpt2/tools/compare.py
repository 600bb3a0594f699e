"""Side-by-side logits of jax-gpt2 and transformers' GPT2LMHeadModel on the same checkpoint.

transformers and torch are imported only here, only when called (the `compare` extra).
"""

import dataclasses
from pathlib import Path

import numpy as np

from jax_gpt2.config import GPT2Config
from jax_gpt2.loader import normalize_keys, read_state_dict
from jax_gpt2.model import gpt2_forward
from jax_gpt2.weights import GPT2Weights


@dataclasses.dataclass(frozen=True)
class BatchResult:
    input_ids_BT: np.ndarray
    max_abs_diff: float
    tolerance: float
    argmax_equal: bool

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance and self.argmax_equal


def parity_tolerance(reference_BTV: np.ndarray) -> float:
    """1e-4, relative to the logit scale once logits exceed 1 in magnitude (float32 has ~7 digits)."""
    assert reference_BTV.ndim == 3
    assert np.isfinite(reference_BTV).all()
    return 1e-4 * max(1.0, float(np.abs(reference_BTV).max()))


def load_reference_model(folder: Path):
    """transformers' GPT2LMHeadModel in float32, eval mode, with the folder's weights loaded strictly."""
    try:
        import torch
        import transformers
    except ImportError:
        raise ValueError("compare needs transformers and torch: `uv sync --extra compare`") from None
    hf_config = transformers.GPT2Config.from_pretrained(folder)
    model = transformers.GPT2LMHeadModel(hf_config).eval().float()
    state = {key: torch.from_numpy(value) for key, value in normalize_keys(read_state_dict(folder)).items()}
    missing, unexpected = model.transformer.load_state_dict(
        {k: v for k, v in state.items() if k != "lm_head.weight"}, strict=False
    )
    missing = [key for key in missing if not key.endswith(("attn.bias", "attn.masked_bias"))]
    if missing or unexpected:
        raise ValueError(f"transformers could not load {folder}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if not hf_config.tie_word_embeddings:
        model.lm_head.weight.data.copy_(state["lm_head.weight"])
    return model


def compare_batch(model, input_ids_BT: np.ndarray, weights: GPT2Weights, config: GPT2Config) -> BatchResult:
    import torch

    assert input_ids_BT.ndim == 2
    assert input_ids_BT.dtype.kind == "i"
    with torch.no_grad():
        reference_BTV = model(torch.as_tensor(input_ids_BT, dtype=torch.long)).logits.float().numpy()
    ours_BTV = np.asarray(gpt2_forward(input_ids_BT, weights, config))
    return BatchResult(
        input_ids_BT=input_ids_BT,
        max_abs_diff=float(np.abs(ours_BTV - reference_BTV).max()),
        tolerance=parity_tolerance(reference_BTV),
        argmax_equal=bool((ours_BTV.argmax(-1) == reference_BTV.argmax(-1)).all()),
    )


def random_batches(config: GPT2Config, count: int, seed: int) -> list[np.ndarray]:
    """count different inputs: batch 1-3, length 1 .. min(64, n_positions), random ids."""
    assert count >= 1
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(count):
        batch = int(rng.integers(1, 4))
        length = int(rng.integers(1, min(64, config.n_positions) + 1))
        batches.append(rng.integers(0, config.vocab_size, (batch, length)).astype(np.int64))
    assert len(batches) == count
    return batches
