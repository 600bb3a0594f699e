"""Random-weight GPT-2 checkpoints written by transformers itself, for parity tests.

The hub is out of reach here, so every test model is a `transformers.GPT2LMHeadModel` with random
weights drawn with a large std (logits are peaked, so a wrong op moves the argmax), saved into a
temporary folder in one of the formats the loader reads.
"""

import json
from pathlib import Path

import numpy as np
import torch
import transformers

# A small vocabulary needs bos/eos inside it, or transformers warns about the default 50256.
TINY = dict(vocab_size=97, n_positions=32, n_embd=24, n_layer=2, n_head=3, bos_token_id=0, eos_token_id=0)


def hf_config(**overrides) -> transformers.GPT2Config:
    """A transformers GPT2Config; keys left out take transformers' defaults (the real gpt2 shape)."""
    return transformers.GPT2Config(**overrides)


def random_hf_model(config: transformers.GPT2Config, std: float, seed: int = 0) -> transformers.GPT2LMHeadModel:
    """A GPT2LMHeadModel in eval mode whose every parameter, LayerNorms and biases included, is random."""
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(config).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator) * std
            # LayerNorm scales stay near 1 so activations neither vanish nor explode across layers.
            param.copy_(1.0 + noise if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")) else noise)
    return model


def save_safetensors(model: transformers.GPT2LMHeadModel, folder: Path) -> Path:
    model.save_pretrained(folder)
    assert (folder / "model.safetensors").is_file()
    return folder


def save_torch_bin(model: transformers.GPT2LMHeadModel, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    return folder


def save_npz(model: transformers.GPT2LMHeadModel, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(folder)
    arrays = {key: value.detach().numpy() for key, value in model.state_dict().items()}
    np.savez(folder / "model.npz", **arrays)
    return folder


def save_bare_gpt2model(model: transformers.GPT2LMHeadModel, folder: Path) -> Path:
    """A GPT2Model checkpoint: keys without the `transformer.` prefix and no lm_head."""
    model.transformer.save_pretrained(folder)
    keys = _safetensors_keys(folder / "model.safetensors")
    assert not any(key.startswith("transformer.") for key in keys)
    return folder


def save_sharded(model: transformers.GPT2LMHeadModel, folder: Path, max_shard_size: str) -> Path:
    model.save_pretrained(folder, max_shard_size=max_shard_size)
    assert (folder / "model.safetensors.index.json").is_file()
    return folder


def _safetensors_keys(path: Path) -> list[str]:
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    header = json.loads(path.read_bytes()[8 : 8 + header_len])
    return [key for key in header if key != "__metadata__"]


def hf_logits(model: transformers.GPT2LMHeadModel, ids_BT: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(ids_BT, dtype=torch.long)).logits.float().numpy()


def logit_tolerance(reference: np.ndarray) -> float:
    """The parity bar: 1e-4 absolute, scaled by the logit magnitude when that exceeds 1.

    float32 carries ~7 significant digits; with large-std random weights the logits reach the
    hundreds, where 1e-4 absolute is below float32's resolution after a few layers of sums.
    """
    return 1e-4 * max(1.0, float(np.abs(reference).max()))


def check_rounding_error(what: str, diff_BTV: np.ndarray, argmax_agreement: float, bounds: dict, capsys) -> None:
    """A narrowed model (bf16/int8 weights, a bf16 cache) against float32: within `bounds` (max and
    mean |logit diff|, argmax agreement), printed for the README, and not zero (it is narrowed)."""
    with capsys.disabled():
        print(
            f"\n{what}: max abs diff {diff_BTV.max():.3g} (bound {bounds['max']}), mean {diff_BTV.mean():.3g} "
            f"(bound {bounds['mean']}), argmax agrees at {argmax_agreement:.0%} (bound {bounds['argmax']:.0%})"
        )
    assert diff_BTV.max() <= bounds["max"]
    assert diff_BTV.mean() <= bounds["mean"]
    assert argmax_agreement >= bounds["argmax"]
    assert diff_BTV.max() > 0, f"{what}: no difference at all, so nothing was narrowed"
