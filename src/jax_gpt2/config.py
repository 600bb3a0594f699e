"""GPT2Config: the static shape and numerics of a GPT-2-family model.

A frozen dataclass, hashable, so it can be a static argument of `jax.jit`. `GPT2Config()` is gpt2
(124M). `config_from_hf_dict` reads a Hugging Face `config.json`; a setting this library does not
implement is an error that names it, never silently ignored.
"""

import dataclasses
import json
import numbers
import typing
from pathlib import Path
from typing import Any

import numpy as np

# The one table of weight dtypes, by their command-line names (bf16 and int8 are weight-only): the
# loader's dtypes, the packed tile types (weights.PACKED_DTYPES), the kernels' matmul targets
# (kernels.native.TARGETS), bench's bytes per weight and llama.cpp's matching types
# (llama_cpp.GGUF_TYPES) are made from it or asserted against it where they are defined.
WEIGHT_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "int8": "int8"}
# The KV-cache dtypes by their command-line names (bf16 halves the cache; attention math stays float32):
# kvcache.CACHE_DTYPE_NAMES and the decode kernels (kernels.attention.DECODE_TARGETS) follow it.
KV_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}

# The activations transformers' ACT2FN offers that layers.activation implements.
SUPPORTED_ACTIVATIONS = (
    "gelu_new",
    "gelu_fast",
    "gelu_pytorch_tanh",
    "gelu_python_tanh",
    "gelu_accurate",
    "gelu",
    "gelu_python",
    "quick_gelu",
    "relu",
    "silu",
    "swish",
    "tanh",
    "sigmoid",
    "linear",
)


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    """A GPT-2 model's shape and numerics, read from config.json (`load_config`); frozen and hashable,
    so jit takes it as a static argument. Settings this library does not implement are errors at load."""

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None  # None means 4 * n_embd, as in transformers
    activation_function: str = "gelu_new"
    layer_norm_epsilon: float = 1e-5
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    # Only changes rounding in reduced precision; we always take softmax in float32, which is what it asks for.
    reorder_and_upcast_attn: bool = False
    tie_word_embeddings: bool = True
    bos_token_id: int | None = 50256
    eos_token_id: int | None = 50256

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            check_field_type(field.name, getattr(self, field.name), field.type)
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            if getattr(self, name) < 1:
                raise ValueError(f"config.{name} must be >= 1; got {getattr(self, name)}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"config.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.n_inner is not None and self.n_inner < 1:
            raise ValueError(f"config.n_inner must be None or >= 1; got {self.n_inner}")
        if self.activation_function not in SUPPORTED_ACTIVATIONS:
            raise ValueError(
                f"activation_function {self.activation_function!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_ACTIVATIONS)}"
            )
        if not self.layer_norm_epsilon > 0:
            raise ValueError(f"config.layer_norm_epsilon must be > 0; got {self.layer_norm_epsilon}")

    @property
    def d_mlp(self) -> int:
        """F: the MLP hidden width."""
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    @property
    def head_dim(self) -> int:
        """H: the width of one attention head."""
        return self.n_embd // self.n_head


def check_field_type(name: str, value: Any, annotation: Any) -> None:
    """A ValueError naming the field unless value has its declared type (JSON gives any type).

    bool is an int to Python, but `"n_layer": true` is a mistake, not 1 layer: only a bool field
    takes a bool. A float field takes an integer too (JSON may write 1.0 as 1); None only where
    the field allows it. NumPy scalars pass (they are numbers.Integral / numbers.Real).
    """
    allowed = typing.get_args(annotation) or (annotation,)  # `int | None` -> (int, NoneType)
    assert allowed
    if value is None and type(None) in allowed:
        return
    (kind,) = [t for t in allowed if t is not type(None)]
    assert kind in _ACCEPTED, f"config.{name}: no type check for {kind}"
    type_name, accepted = _ACCEPTED[kind]
    if isinstance(value, accepted) and (kind is bool or not isinstance(value, bool)):
        return
    expected = type_name + (" or null" if type(None) in allowed else "")
    shown = json.dumps(value, default=repr)  # as config.json spells it: "2", true, null
    raise ValueError(f"config.{name} must be {expected}; got {shown} ({type(value).__name__})")


# Each field type: how an error names it, and the Python types that hold it.
_ACCEPTED = {
    int: ("an integer", numbers.Integral),
    float: ("a number", numbers.Real),
    bool: ("true or false", bool),
    str: ("a string", str),
}


PRESETS: dict[str, GPT2Config] = {
    "gpt2": GPT2Config(),
    "gpt2-medium": GPT2Config(n_embd=1024, n_layer=24, n_head=16),
    "gpt2-large": GPT2Config(n_embd=1280, n_layer=36, n_head=20),
    "gpt2-xl": GPT2Config(n_embd=1600, n_layer=48, n_head=25),
    "distilgpt2": GPT2Config(n_layer=6),
}

# Settings a GPT-2 config.json may carry that change nothing at inference, or that we read above.
_IGNORED_KEYS = {
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "n_ctx",
    "attn_pdrop", "embd_pdrop", "resid_pdrop", "summary_activation", "summary_first_dropout",
    "summary_proj_to_labels", "summary_type", "summary_use_proj", "initializer_range",
    "task_specific_params", "use_cache", "pad_token_id", "id2label", "label2id",
    "_name_or_path", "output_past", "gradient_checkpointing", "return_dict",
    "output_hidden_states", "output_attentions", "torchscript", "problem_type", "tokenizer_class",
    "prefix", "sep_token_id", "decoder_start_token_id", "finetuning_task", "chunk_size_feed_forward",
    "is_encoder_decoder", "is_decoder", "cross_attention_hidden_size", "tie_encoder_decoder",
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "temperature", "top_k",
    "top_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size", "bad_words_ids",
    "num_return_sequences", "n_special", "predict_special_tokens", "_attn_implementation",
    "_attn_implementation_autoset", "pruned_heads", "return_dict_in_generate", "output_scores",
}

# Settings whose non-default value would change the computation in a way we do not implement.
_UNSUPPORTED_IF_SET = {"add_cross_attention": False}


def config_from_hf_dict(hf: dict[str, Any]) -> GPT2Config:
    """Build a GPT2Config from the contents of a Hugging Face GPT-2 config.json."""
    assert isinstance(hf, dict)
    model_type = hf.get("model_type", "gpt2")
    if model_type != "gpt2":
        raise ValueError(f"config.json has model_type {model_type!r}; only 'gpt2' checkpoints are supported")
    for key, default in _UNSUPPORTED_IF_SET.items():
        if hf.get(key, default) != default:
            raise ValueError(f"config.json sets {key}={hf[key]!r}, which jax-gpt2 does not support")
    fields = {f.name for f in dataclasses.fields(GPT2Config)}
    unknown = sorted(set(hf) - fields - _IGNORED_KEYS - set(_UNSUPPORTED_IF_SET))
    if unknown:
        raise ValueError(f"config.json has settings jax-gpt2 does not know: {', '.join(unknown)}")
    config = GPT2Config(**{key: value for key, value in hf.items() if key in fields})
    assert config.n_embd == hf.get("n_embd", config.n_embd)
    assert config.n_layer == hf.get("n_layer", config.n_layer)
    return config


def config_from_file(path: Path) -> GPT2Config:
    """Read a config.json file (a clear error if it is missing or is not JSON)."""
    if not path.is_file():
        raise FileNotFoundError(f"no config.json at {path}")
    try:
        hf = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(hf, dict):
        raise ValueError(f"{path} must hold a JSON object; got {type(hf).__name__}")
    return config_from_hf_dict(hf)


def config_to_hf_dict(config: GPT2Config) -> dict[str, Any]:
    """The config.json form of a config: what `save_config` writes and transformers reads."""
    hf = dataclasses.asdict(config)
    hf["model_type"] = "gpt2"
    hf["architectures"] = ["GPT2LMHeadModel"]
    assert hf["n_embd"] == config.n_embd
    assert "d_mlp" not in hf
    return hf


def tokens_in_vocabulary(ids, vocab_size: int) -> bool:
    """Whether every id is in [0, vocab_size): the one range check every entry point makes on the host
    before ids reach the device (a gather clamps an out-of-range index in silence). Each caller
    raises its own error type (ValueError, or the server's 400) with this range."""
    assert vocab_size >= 1
    ids = np.asarray(ids)
    return ids.size == 0 or (int(ids.min()) >= 0 and int(ids.max()) < vocab_size)
