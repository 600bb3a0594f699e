"""KVCache: the keys and values of every layer, preallocated, updated functionally.

Layout (L, B, N, S, H): one layer's cache for one row is a contiguous (N, S, H) block, and a new
token is written with one `lax.dynamic_update_slice` (measured ~2x faster decode than B,S,N,H).

Row b holds real tokens in slots [start_B[b], end_B[b]) and writes its next token at end_B[b].
A left-padded batch (generate) starts with start_B[b] = its padding and every end equal; a
server slot gets its own start and end when a request moves in. A slot's position id is
`slot - start_B[b]`, so the first real token of every row has position 0, whatever its padding.

The buffers may hold more rows than are in use: with start_B and end_B of B entries, rows [0, B)
of k_LBNSH / v_LBNSH are the batch and the rows after them are neither read nor written. The
server keeps one cache of max_batch rows and runs each step over the prefix of rows that holds
its running sequences (a prefix, not a gather: taking rows out of the cache would copy them).

Keys and values are float32 or bfloat16 (half the bytes a long-context decode step reads);
attention widens a bfloat16 cache to float32 as it reads it, so only the stored values are rounded.
A bfloat16 cache is stored as its bits, in uint16 arrays (`STORED_AS`): XLA's CPU backend does no
bfloat16 arithmetic, so it widens every bfloat16 op to float32, the cache's in-place slot update
included: each write read and wrote the whole (L, B, N, S, H) cache twice (seen in a decode
step's optimized HLO). Measured here, 12 layers x one slot written into a 1024-slot cache:
float32 1.8 ms a step, bfloat16 446 ms, its bits in uint16 1.0 ms. `values` gives the bfloat16
view back to a reader (a bitcast, fused into the read); `KVCache.kv_dtype` names the dtype.
"""

import dataclasses

import jax
import jax.numpy as jnp

from jax_gpt2 import config


CACHE_DTYPE_NAMES = tuple(config.KV_DTYPES.values())  # numpy names of config.KV_DTYPES (keyed by CLI names)
STORED_AS = {"float32": jnp.dtype(jnp.float32), "bfloat16": jnp.dtype(jnp.uint16)}  # the arrays' dtype
assert set(STORED_AS) == set(CACHE_DTYPE_NAMES)
assert len(set(STORED_AS.values())) == len(STORED_AS), "the stored dtype names the cache dtype"
KV_DTYPE_OF_STORED = {stored.name: jnp.dtype(name) for name, stored in STORED_AS.items()}


def check_kv_dtype(kv_dtype) -> jnp.dtype:
    """A cache dtype the model supports, as a dtype; anything else is a ValueError that names the choices."""
    try:
        dtype = jnp.dtype(kv_dtype)
    except TypeError:
        raise ValueError(f"kv_dtype must be one of {', '.join(CACHE_DTYPE_NAMES)}; got {kv_dtype!r}") from None
    if dtype.name not in CACHE_DTYPE_NAMES:
        raise ValueError(f"kv_dtype must be one of {', '.join(CACHE_DTYPE_NAMES)}; got {dtype.name}")
    assert jnp.issubdtype(dtype, jnp.floating)
    return dtype


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """The keys and values of every layer, preallocated for S slots per row (layout L, B, N, S, H),
    with each row's first real slot (`start_B`: rows are left-padded) and next free slot (`end_B`).
    A cached forward pass returns a new cache; the old one is left as it was."""

    k_LBNSH: jax.Array
    v_LBNSH: jax.Array
    start_B: jax.Array  # int32: first slot of each row that holds a real (not padding) token
    end_B: jax.Array  # int32: the next slot each row writes

    @property
    def max_len(self) -> int:
        """S: the number of slots, fixed at allocation."""
        return self.k_LBNSH.shape[3]

    @property
    def kv_dtype(self) -> jnp.dtype:
        """float32 or bfloat16: the dtype of the keys and values (a bfloat16 cache stores uint16 bits)."""
        return kv_dtype_of(self.k_LBNSH)


def kv_dtype_of(cache_x: jax.Array) -> jnp.dtype:
    """The key/value dtype held by an array of cache storage (any slice of k_LBNSH or v_LBNSH)."""
    assert cache_x.dtype.name in KV_DTYPE_OF_STORED, f"{cache_x.dtype} is not a cache storage dtype"
    dtype = KV_DTYPE_OF_STORED[cache_x.dtype.name]
    assert dtype.name in CACHE_DTYPE_NAMES
    return dtype


def values(cache_x: jax.Array) -> jax.Array:
    """Cache storage as keys or values: float32 as it is, uint16 bits as the bfloat16 they hold."""
    dtype = kv_dtype_of(cache_x)
    values_x = cache_x if cache_x.dtype == dtype else jax.lax.bitcast_convert_type(cache_x, dtype)
    assert values_x.shape == cache_x.shape
    assert values_x.dtype == dtype
    return values_x


def stored(new_x: jax.Array, kv_dtype) -> jax.Array:
    """New keys or values (float32) rounded to kv_dtype, in that dtype's storage form."""
    rounded_x, stored_dtype = new_x.astype(kv_dtype), STORED_AS[jnp.dtype(kv_dtype).name]
    stored_x = rounded_x if rounded_x.dtype == stored_dtype else jax.lax.bitcast_convert_type(rounded_x, stored_dtype)
    assert stored_x.shape == new_x.shape
    assert kv_dtype_of(stored_x) == jnp.dtype(kv_dtype)
    return stored_x


def init_cache(
    n_layer: int, n_head: int, head_dim: int, start_B: jax.Array, max_len: int, dtype=jnp.float32
) -> KVCache:
    """An empty cache of max_len slots for len(start_B) rows; row b's prompt begins at slot start_B[b]."""
    assert start_B.ndim == 1
    assert max_len >= 1
    assert jnp.dtype(dtype).name in CACHE_DTYPE_NAMES
    assert jnp.issubdtype(start_B.dtype, jnp.integer)
    shape = (n_layer, start_B.shape[0], n_head, max_len, head_dim)
    stored_dtype = STORED_AS[jnp.dtype(dtype).name]  # zero bits are a bfloat16 zero too
    cache = KVCache(
        k_LBNSH=jnp.zeros(shape, stored_dtype),
        v_LBNSH=jnp.zeros(shape, stored_dtype),
        start_B=start_B.astype(jnp.int32),
        end_B=jnp.zeros_like(start_B, jnp.int32),
    )
    assert cache.k_LBNSH.shape == cache.v_LBNSH.shape
    assert cache.kv_dtype == jnp.dtype(dtype)
    return cache


def write_layer(cache_LBNSH: jax.Array, layer: int, end_B: jax.Array, new_BTNH: jax.Array) -> jax.Array:
    """Write T new keys (or values) of one layer, row b at slots [end_B[b], end_B[b] + T).

    A scatter rather than one dynamic_update_slice, because rows may end at different slots; inside
    the decode loop XLA updates the cache buffer in place. Slots past the end are dropped, never
    wrapped (JAX's default for out-of-bounds scatter).
    """
    B, T = new_BTNH.shape[:2]
    assert cache_LBNSH.shape[1] >= B  # rows [0, B) of the cache are the batch
    assert new_BTNH.shape[2:] == (cache_LBNSH.shape[2], cache_LBNSH.shape[4])
    new_BTNH = stored(new_BTNH, kv_dtype_of(cache_LBNSH))
    if T == cache_LBNSH.shape[3]:
        # A block that fills every slot (a full forward, a perplexity window) starts at slot 0 (the host
        # checks refuse anything else): one static update. On a mesh it stays on each row's device; the
        # scatter below made XLA gather the whole (B, T, N, H) block across "data" first. On one device
        # it is faster too: 12 layers of 8 x 1024 tokens, 1.0 s against 1.8 s for the scatter here.
        return cache_LBNSH.at[layer].set(new_BTNH.transpose(0, 2, 1, 3))
    rows_BT = jnp.broadcast_to(jnp.arange(B)[:, None], (B, T))
    slots_BT = end_B[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
    return cache_LBNSH.at[layer, rows_BT, :, slots_BT, :].set(new_BTNH, mode="drop")


def query_slots(cache: KVCache, num_new: int) -> jax.Array:
    """slots_BT: where each of the T new tokens of each row goes."""
    assert num_new >= 1
    assert cache.end_B.ndim == 1
    return cache.end_B[:, None] + jnp.arange(num_new, dtype=jnp.int32)[None, :]


def visible_mask(cache: KVCache, num_new: int) -> jax.Array:
    """mask_BTS: True where new query t of row b may attend to slot s (causal, no padding)."""
    slots_S = jnp.arange(cache.max_len, dtype=jnp.int32)
    after_start_BS = slots_S[None, :] >= cache.start_B[:, None]
    causal_BTS = slots_S[None, None, :] <= query_slots(cache, num_new)[:, :, None]
    mask_BTS = after_start_BS[:, None, :] & causal_BTS
    assert mask_BTS.shape == (cache.start_B.shape[0], num_new, cache.max_len)
    return mask_BTS


def positions(cache: KVCache, num_new: int) -> jax.Array:
    """positions_BT: the position id of each new token; padding slots get 0 (they are never seen)."""
    positions_BT = jnp.maximum(query_slots(cache, num_new) - cache.start_B[:, None], 0)
    assert positions_BT.shape == (cache.start_B.shape[0], num_new)
    return positions_BT
