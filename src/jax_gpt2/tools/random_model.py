"""Write a random-weight GPT-2 checkpoint folder in Hugging Face format, for trying jax-gpt2 offline.

The folder holds config.json, model.safetensors (HF key names, `transformer.` prefix, lm_head
tied) and a tokenizer: GPT-2's own vocab.json + merges.txt copied from a folder you name, or a
small byte-level BPE trained here on a built-in text (then the model's vocab_size is that
tokenizer's size, so every id the model can emit decodes).
"""

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np

from jax_gpt2.config import GPT2Config, config_to_hf_dict
from jax_gpt2.loader import expected_shapes

_TRAINING_TEXT = """\
The quick brown fox jumps over the lazy dog. A language model reads a sequence of tokens and
predicts the next one. GPT-2 is a decoder-only transformer: token and position embeddings, a stack
of blocks with causal self-attention and a feed-forward network, and a final layer norm. Each block
adds its output to a residual stream. Keys and values of earlier tokens are kept in a cache, so a new
token costs one pass through the blocks. Hello world! Numbers like 1, 2, 3, 42 and 2026 appear too.
"""


def train_tokenizer(folder: Path, vocab_size: int) -> int:
    """Train a byte-level BPE on the built-in text, save vocab.json + merges.txt; return its vocab size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    assert vocab_size >= 257
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<|endoftext|>"]
    )
    tokenizer.train_from_iterator([_TRAINING_TEXT] * 4, trainer=trainer)
    tokenizer.model.save(str(folder))
    size = tokenizer.get_vocab_size()
    assert (folder / "vocab.json").is_file()
    assert size >= 257
    return size


def random_state_dict(config: GPT2Config, std: float, seed: int) -> dict[str, np.ndarray]:
    """Normal(0, std) for every parameter; LayerNorm scales 1 + noise so activations keep their size."""
    assert std > 0
    rng = np.random.default_rng(seed)
    state = {}
    for key, shape in expected_shapes(config).items():
        noise = rng.standard_normal(shape, dtype=np.float32) * np.float32(std)
        is_ln_scale = key.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight"))
        state["transformer." + key] = noise + np.float32(1.0) if is_ln_scale else noise
    assert len(state) == len(expected_shapes(config))
    return state


def write_random_model(
    folder: Path, config: GPT2Config, std: float = 0.1, seed: int = 0, tokenizer_from: Path | None = None
) -> GPT2Config:
    """Create folder with a tokenizer, config.json and model.safetensors; return the config written."""
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    if tokenizer_from is not None:
        for name in ("vocab.json", "merges.txt"):
            shutil.copyfile(Path(tokenizer_from) / name, folder / name)
        vocab_size = len(json.loads((folder / "vocab.json").read_text()))
    else:
        vocab_size = train_tokenizer(folder, min(config.vocab_size, 2048))
    eos = vocab_size - 1 if tokenizer_from is not None else 0  # <|endoftext|>: last in GPT-2, first when trained
    config = dataclasses.replace(config, vocab_size=vocab_size, bos_token_id=eos, eos_token_id=eos)
    (folder / "config.json").write_text(json.dumps(config_to_hf_dict(config), indent=2))
    save_file(random_state_dict(config, std, seed), folder / "model.safetensors", metadata={"format": "pt"})
    assert (folder / "model.safetensors").is_file()
    return config
