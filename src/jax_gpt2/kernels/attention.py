"""One-token decode attention over the whole (L, B, N, S, H) cache, by the C++ kernel, as an XLA call."""

import jax
import jax.numpy as jnp
import numpy as np

from jax_gpt2.config import KV_DTYPES
from jax_gpt2.kernels import native
from jax_gpt2.kvcache import kv_dtype_of

# The kernel for each cache dtype, by its name in native.TARGETS. A float32 query either way:
# the bfloat16 cache is widened as it is read, so the attention math stays float32.
DECODE_TARGETS = {"float32": "attention", "bfloat16": "attention_bf16"}
assert set(DECODE_TARGETS) == set(KV_DTYPES.values()), "a decode kernel for every cache dtype"
assert set(DECODE_TARGETS.values()) <= set(native.TARGETS)


def has_decode_kernel(cache_dtype) -> bool:
    """Whether the built library registered a decode attention over a cache of this dtype."""
    name = DECODE_TARGETS.get(jnp.dtype(cache_dtype).name)
    return name is not None and native.is_registered(name)


def decode_attention(
    q_BTNH: jax.Array, k_LBNSH: jax.Array, v_LBNSH: jax.Array, start_B: jax.Array, end_B: jax.Array,
    layer: int, scale: float,
) -> jax.Array:  # fmt: skip
    """Softmax attention of one new query per row (T = 1, at slot end_B) over slots [start_B, end_B].

    Reads layer `layer` of the whole caches in place: slicing k_LBNSH[layer] in XLA copies the
    layer out on every step (measured 1.4 ms per gpt2 token, 12 layers x 2), and the kernel
    touches only the filled slots [start_B, end_B], not the whole bucket.
    """
    B, T, N, H = q_BTNH.shape
    assert T == 1
    assert q_BTNH.dtype == jnp.float32
    assert k_LBNSH.shape[1] >= B  # rows [0, B) of the cache are the batch (see kvcache.py)
    assert k_LBNSH.shape[2] == N
    assert k_LBNSH.shape[4] == H
    assert v_LBNSH.shape == k_LBNSH.shape
    assert v_LBNSH.dtype == k_LBNSH.dtype
    kv_dtype = kv_dtype_of(k_LBNSH)  # a bfloat16 cache comes as its uint16 bits (kvcache.py), read as such
    assert has_decode_kernel(kv_dtype), f"no decode-attention kernel over a {kv_dtype} cache"
    result = jax.ShapeDtypeStruct((B, N, H), jnp.float32)
    target = native.target_name(DECODE_TARGETS[kv_dtype.name])
    call = jax.ffi.ffi_call(target, result, vmap_method="sequential")
    out_BNH = call(
        q_BTNH.reshape(B, N, H), k_LBNSH, v_LBNSH, start_B.astype(jnp.int32), end_B.astype(jnp.int32),
        layer=np.int64(layer), scale=np.float32(scale),
    )  # fmt: skip
    out_BTNH = out_BNH.reshape(B, 1, N, H)
    assert out_BTNH.shape == q_BTNH.shape
    assert out_BTNH.dtype == jnp.float32
    return out_BTNH
