"""jax-gpt2: GPT-2 inference in pure JAX, matching Hugging Face transformers to float32 precision.

    from jax_gpt2 import load_config, load_weights, gpt2_forward
    config = load_config("./my-gpt2")
    weights = load_weights("./my-gpt2")
    logits_BTV = gpt2_forward(input_ids_BT, weights, config)

On x86-64 and aarch64 CPUs, load_weights packs the matrices for small C++ kernels (native.py,
packed.py) that read each weight byte once per token; dtype=jnp.bfloat16 or jnp.int8 narrows them.
"""

from jax_gpt2.config import PRESETS, GPT2Config
from jax_gpt2.generate import generate, stream_generate
from jax_gpt2.kvcache import KVCache
from jax_gpt2.loader import ModelNotFoundError, load_config, load_weights
from jax_gpt2.native import kernels_available
from jax_gpt2.packed import PackedMatrix, pack_weights
from jax_gpt2.model import block_hidden_states, empty_cache, gpt2_forward, gpt2_forward_cached
from jax_gpt2.perplexity import perplexity
from jax_gpt2.weights import BlockWeights, GPT2Weights

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
]
