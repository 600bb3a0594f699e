"""Attention over the whole (L, B, N, S, H) cache by the C++ kernels, as XLA calls: one new query per
row (decode) and many (prefill, scoring and perplexity windows, verify passes)."""

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
PREFILL_TARGETS = {"float32": "prefill_attention", "bfloat16": "prefill_attention_bf16"}
assert set(PREFILL_TARGETS) == set(KV_DTYPES.values()), "a prefill kernel for every cache dtype"
assert set(PREFILL_TARGETS.values()) <= set(native.TARGETS)


def has_decode_kernel(cache_dtype) -> bool:
    """Whether the built library registered a decode attention over a cache of this dtype."""
    name = DECODE_TARGETS.get(jnp.dtype(cache_dtype).name)
    return name is not None and native.is_registered(name)


def has_prefill_kernel(cache_dtype) -> bool:
    """Whether the built library registered a many-query attention over a cache of this dtype."""
    name = PREFILL_TARGETS.get(jnp.dtype(cache_dtype).name)
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


def prefill_attention(
    q_BTE: jax.Array, k_LBNSH: jax.Array, v_LBNSH: jax.Array, start_B: jax.Array, end_B: jax.Array,
    layer: int, scale: float,
) -> jax.Array:  # fmt: skip
    """Softmax attention of T new queries per row over layer `layer` of the cache, which already
    holds their keys and values: query t of row b sits at slot end_B[b] + t and sees slots
    [start_B[b], end_B[b] + t] (end_B: the slot of the row's first new token, before the write).
    Returns out_BTNH.

    The queries are the first N * H values of each row of q_BTE: the queries alone as (B, T, N * H),
    or the fused qkv projection itself (E = 3 N H, q first, HF's order), read in place, so XLA need
    not slice them out. The kernel (core.cc, "Attention of many new queries") computes scores a
    block of queries at a time against the keys they share, in scratch, so no (B, N, T, S) array is
    ever made, and stops each block at its last query's slot, so the masked triangle is skipped.
    """
    B, T, E = q_BTE.shape
    N, H = k_LBNSH.shape[2], k_LBNSH.shape[4]
    assert q_BTE.dtype == jnp.float32
    assert E >= N * H, f"rows of {E} values hold no {N} x {H} queries"
    assert k_LBNSH.shape[1] >= B  # rows [0, B) of the cache are the batch (see kvcache.py)
    assert v_LBNSH.shape == k_LBNSH.shape
    assert v_LBNSH.dtype == k_LBNSH.dtype
    kv_dtype = kv_dtype_of(k_LBNSH)
    assert has_prefill_kernel(kv_dtype), f"no prefill-attention kernel over a {kv_dtype} cache"
    result = jax.ShapeDtypeStruct((B, T, N, H), jnp.float32)
    call = jax.ffi.ffi_call(native.target_name(PREFILL_TARGETS[kv_dtype.name]), result, vmap_method="sequential")
    out_BTNH = call(
        q_BTE, k_LBNSH, v_LBNSH, start_B.astype(jnp.int32), end_B.astype(jnp.int32),
        layer=np.int64(layer), scale=np.float32(scale),
    )  # fmt: skip
    assert out_BTNH.shape == (B, T, N, H)
    assert out_BTNH.dtype == jnp.float32
    return out_BTNH
