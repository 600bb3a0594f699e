"""jax-gpt2: GPT-2 inference in pure JAX, matching Hugging Face transformers to float32 precision.

    from jax_gpt2 import load_config, load_weights, gpt2_forward
    config = load_config("./my-gpt2")
    weights = load_weights("./my-gpt2")
    logits_BTV = gpt2_forward(input_ids_BT, weights, config)

On x86-64 and aarch64 CPUs, where the C++ kernels (kernels/) build and run, load_weights packs the
matrices for them (they read each weight byte once per token) and records that choice in the
weights (use_kernels); dtype=jnp.bfloat16 or jnp.int8 narrows them, and empty_cache / generate take
kv_dtype=jnp.bfloat16 for a cache of half the bytes.
"""

from jax_gpt2.config import PRESETS, GPT2Config
from jax_gpt2.generate import generate, stream_generate
from jax_gpt2.kvcache import KVCache
from jax_gpt2.loader import ModelNotFoundError, load_config, load_weights
from jax_gpt2.kernels import kernels_available
from jax_gpt2.model import block_hidden_states, empty_cache, gpt2_forward, gpt2_forward_cached
from jax_gpt2.perplexity import perplexity
from jax_gpt2.speculate import DraftModel, PromptLookup
from jax_gpt2.weights import BlockWeights, GPT2Weights, PackedMatrix, pack_weights

__all__ = [
    "PRESETS",
    "BlockWeights",
    "GPT2Config",
    "GPT2Weights",
    "KVCache",
    "PackedMatrix",
    "ModelNotFoundError",
    "block_hidden_states",
    "empty_cache",
    "gpt2_forward",
    "gpt2_forward_cached",
    "generate",
    "stream_generate",
    "load_config",
    "load_weights",
    "kernels_available",
    "pack_weights",
    "perplexity",
    "PromptLookup",
    "DraftModel",
]
