"""The GPT-2 forward pass: full (`gpt2_forward`) and cached (`gpt2_forward_cached`), one code path.

Shape key: every array name ends in its shape, and each letter means one thing in every file of
the package (tests included). The model:
    B batch            T query length      S key/cache length (slots in the cache)
    D model width      F MLP hidden (4D)   N heads            H head dim (D // N)
    V vocab            L layers            P max positions    E fused q|k|v width (3D)
    K kv heads: reserved (GPT-2 has none apart from its N heads), so no array uses it
Around it:
    Y tokens one call yields per row (decode steps)      W rows one server call runs (a subset of B)
    A top-logprob alternatives per token                 U eos (stop) token ids
    R scored positions (perplexity)                      X positions per lm_head chunk (perplexity)
    M rows of a matmul (B * T flattened)                 I, O a matrix's in and out features
    G 64-column tiles of a packed matrix                 C columns per tile (64)    Q G * C
    Z qkv column groups (the mesh's "model" shards)      J heads per group (N / Z)
A slice keeps its axis's letter: the kernels' x_MI also names a pointer to a block of rows.
Digits are sizes: keys_B2 holds two uint32 words per row; k_L1NTH is one row's slots.

`gpt2_forward` is the cached path run over an empty cache exactly T slots long, so the full
forward and incremental decoding cannot drift apart. The public functions check concrete token
ids on the host (JAX would silently clamp an out-of-range gather); the traced cores only assert
shapes and dtypes.
"""

import functools
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

from jax_gpt2 import kvcache
from jax_gpt2.config import GPT2Config, tokens_in_vocabulary
from jax_gpt2.kvcache import KVCache
from jax_gpt2.sharding import constrain_cache, model_shards
from jax_gpt2.layers import PRECISION, attention, layer_norm, linear, matmul, mlp
from jax_gpt2.weights import BlockWeights, GPT2Weights

if TYPE_CHECKING:
    from jax.sharding import Mesh


def embed(ids_BT: jax.Array, positions_BT: jax.Array, weights: GPT2Weights) -> jax.Array:
    """Token plus position embeddings."""
    assert ids_BT.shape == positions_BT.shape
    assert jnp.issubdtype(ids_BT.dtype, jnp.integer)
    x_BTD = weights.wte_VD[ids_BT] + weights.wpe_PD[positions_BT]
    assert x_BTD.shape == (*ids_BT.shape, weights.wte_VD.shape[1])
    return x_BTD


def attention_scale(config: GPT2Config, layer: int) -> float:
    """The factor on q.k: 1/sqrt(H) unless disabled, further divided by (layer + 1) if the config asks."""
    assert 0 <= layer < config.n_layer
    assert config.head_dim >= 1
    scale = config.head_dim**-0.5 if config.scale_attn_weights else 1.0
    if config.scale_attn_by_inverse_layer_idx:
        scale = scale / float(layer + 1)
    return scale


def split_qkv(qkv_BTE: jax.Array, config: GPT2Config, groups: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """q, k, v as (B, T, N, H) from the fused projection, whose columns come in `groups` runs of
    [q | k | v] heads: 1 is HF's order; on a mesh, one run per "model" shard (sharding.qkv_column_order),
    so each device already holds whole heads of all three and the split moves no data.

    Z groups of J = N / Z heads each.
    """
    B, T, E = qkv_BTE.shape
    N, H = config.n_head, config.head_dim
    assert E == 3 * N * H
    assert N % groups == 0
    qkv_BTZ3JH = qkv_BTE.reshape(B, T, groups, 3, N // groups, H)
    q_BTNH, k_BTNH, v_BTNH = (qkv_BTZ3JH[:, :, :, i].reshape(B, T, N, H) for i in range(3))
    return q_BTNH, k_BTNH, v_BTNH


def block(
    x_BTD: jax.Array, w: BlockWeights, layer: int, cache: KVCache, cache_layer: int, mask_BTS: jax.Array,
    config: GPT2Config, use_kernels: bool, mesh: "Mesh | None" = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:  # fmt: skip
    """Transformer block `layer`: writes its keys/values into the cache at `cache_layer` and attends there.

    Returns the new residual stream and the cache's updated k_LBNSH, v_LBNSH. `use_kernels` and
    `mesh` are the weights' static fields: `mesh` sets the qkv column grouping (weights on a mesh
    never use the kernels, which XLA cannot split across devices: see sharding.py).
    """
    B, T, D = x_BTD.shape
    assert D == config.n_embd
    assert w.qkv_w_DE.shape == (D, 3 * D)
    assert 0 <= cache_layer < cache.k_LBNSH.shape[0]
    h_BTD = layer_norm(x_BTD, w.ln1_scale_D, w.ln1_bias_D, config.layer_norm_epsilon, use_kernels)
    qkv_BTE = linear(h_BTD, w.qkv_w_DE, w.qkv_b_E, use_kernels)
    q_BTNH, k_BTNH, v_BTNH = split_qkv(qkv_BTE, config, model_shards(mesh))
    k_LBNSH = kvcache.write_layer(cache.k_LBNSH, cache_layer, cache.end_B, k_BTNH)
    v_LBNSH = kvcache.write_layer(cache.v_LBNSH, cache_layer, cache.end_B, v_BTNH)
    scale = attention_scale(config, layer)
    fused_BTE = qkv_BTE if model_shards(mesh) == 1 else None  # q is its first third only in HF's order
    attn_BTNH = attention(
        q_BTNH, k_LBNSH, v_LBNSH, cache.start_B, cache.end_B, mask_BTS, cache_layer, scale, use_kernels, fused_BTE
    )
    return finish_block(x_BTD, attn_BTNH, w, config, use_kernels), k_LBNSH, v_LBNSH


def finish_block(
    x_BTD: jax.Array, attn_BTNH: jax.Array, w: BlockWeights, config: GPT2Config, use_kernels: bool
) -> jax.Array:
    """The rest of a block after attention: output projection, residual, then the MLP half."""
    B, T, D = x_BTD.shape
    assert attn_BTNH.shape == (B, T, config.n_head, config.head_dim)
    # Both residual adds inside the matmuls that produce their terms (the kernels' epilogue).
    x_BTD = linear(attn_BTNH.reshape(B, T, D), w.attn_out_w_DD, w.attn_out_b_D, use_kernels, residual_BTO=x_BTD)
    h_BTD = layer_norm(x_BTD, w.ln2_scale_D, w.ln2_bias_D, config.layer_norm_epsilon, use_kernels)
    x_BTD = mlp(
        h_BTD, w.fc_w_DF, w.fc_b_F, w.proj_w_FD, w.proj_b_D, config.activation_function, use_kernels, x_BTD
    )  # fmt: skip
    assert x_BTD.shape == (B, T, D)
    return x_BTD


def residual_streams(
    ids_BT: jax.Array, cache: KVCache, weights: GPT2Weights, config: GPT2Config
) -> tuple[list[jax.Array], KVCache]:
    """Run T new tokens through every block: the residual stream before the first block (the
    embeddings) and after each one (L + 1 arrays, before ln_f), and the cache holding their keys
    and values. The one layer loop: `transformer` and `block_hidden_states` both read it.

    The cache holds every layer, or one layer that every block writes over in turn (`shared_cache`:
    for a caller that keeps no cache, the same numbers without an (L, B, N, S, H) cache nobody
    reads); the cache returned then holds the last layer's keys alone.

    A Python loop over layers, unrolled at trace time: each layer's weights are their own buffers
    (see weights.py for why not a scan over stacked weights).
    """
    B, T = ids_BT.shape
    assert cache.start_B.shape == (B,)
    assert cache.k_LBNSH.shape[0] in (1, config.n_layer)
    assert cache.k_LBNSH.shape[1] >= B  # rows [0, B) of the cache are the batch (see kvcache.py)
    assert cache.k_LBNSH.shape[2] == config.n_head
    assert len(weights.blocks) == config.n_layer
    every_layer = cache.k_LBNSH.shape[0] == config.n_layer
    cache = constrain_cache(cache, weights.mesh)
    streams_BTD = [embed(ids_BT, kvcache.positions(cache, T), weights)]
    mask_BTS = kvcache.visible_mask(cache, T)
    k_LBNSH, v_LBNSH = cache.k_LBNSH, cache.v_LBNSH
    for layer, w in enumerate(weights.blocks):
        layer_cache = KVCache(k_LBNSH, v_LBNSH, cache.start_B, cache.end_B)
        x_BTD, k_LBNSH, v_LBNSH = block(
            streams_BTD[-1], w, layer, layer_cache, layer if every_layer else 0, mask_BTS, config,
            weights.use_kernels, weights.mesh,
        )  # fmt: skip
        streams_BTD.append(x_BTD)
    assert len(streams_BTD) == config.n_layer + 1
    return streams_BTD, KVCache(k_LBNSH, v_LBNSH, cache.start_B, cache.end_B + T)


def shared_cache(config: GPT2Config, start_B: jax.Array, max_len: int, kv_dtype=jnp.float32) -> KVCache:
    """A fresh one-layer cache that every block writes over in turn (residual_streams), for a caller
    that keeps no cache (a forward with every logit, a scoring window): the same numbers, since a
    layer is done with its keys before the next one writes (left-padding slots stay zero and
    masked). At 512 tokens with the dot paths, zeroing and copying a 12-layer cache took ~20 ms of
    a ~230 ms forward; one layer's copy takes ~9 ms.
    """
    kv_dtype = kvcache.check_kv_dtype(kv_dtype)
    return kvcache.init_cache(1, config.n_head, config.head_dim, jnp.asarray(start_B), max_len, kv_dtype)


def transformer(
    ids_BT: jax.Array, cache: KVCache, weights: GPT2Weights, config: GPT2Config
) -> tuple[jax.Array, KVCache]:
    """Run T new tokens through every block; returns the final hidden states after ln_f, and the cache."""
    streams_BTD, new_cache = residual_streams(ids_BT, cache, weights, config)
    hidden_BTD = layer_norm(
        streams_BTD[-1], weights.lnf_scale_D, weights.lnf_bias_D, config.layer_norm_epsilon, weights.use_kernels
    )
    assert hidden_BTD.shape == (*ids_BT.shape, config.n_embd)
    return hidden_BTD, new_cache


def transformer_from_empty(
    ids_BT: jax.Array, start_B: jax.Array, max_len: int, weights: GPT2Weights, config: GPT2Config,
    kv_dtype=jnp.float32,
) -> tuple[jax.Array, KVCache]:  # fmt: skip
    """`transformer` over a fresh cache of max_len slots whose rows start at start_B (left padding
    before): the full forward, a perplexity window and generate's prefill all begin this way."""
    B, T = ids_BT.shape
    assert start_B.shape == (B,)
    assert max_len >= T
    return transformer(ids_BT, empty_cache(config, start_B, max_len, kv_dtype), weights, config)


def lm_logits(hidden_BTD: jax.Array, weights: GPT2Weights) -> jax.Array:
    """Project hidden states onto the vocabulary (lm_head, tied to wte unless the checkpoint unties it)."""
    if weights.lm_head_DV is not None:
        assert hidden_BTD.shape[-1] == weights.lm_head_DV.shape[0]
        logits_BTV = matmul(hidden_BTD, weights.lm_head_DV, weights.use_kernels)
        assert logits_BTV.shape == (*hidden_BTD.shape[:2], weights.lm_head_DV.shape[1])
        assert logits_BTV.dtype == jnp.float32
        return logits_BTV
    head_VD = weights.wte_VD if weights.lm_head_VD is None else weights.lm_head_VD
    V = weights.wte_VD.shape[0]  # on a mesh lm_head may carry zero rows past V, to split evenly (sharding.py)
    assert hidden_BTD.shape[-1] == head_VD.shape[1]
    logits_BTV = jnp.einsum("BTD,VD->BTV", hidden_BTD, head_VD.astype(hidden_BTD.dtype), precision=PRECISION)[..., :V]
    assert logits_BTV.shape == (*hidden_BTD.shape[:2], V)
    return logits_BTV.astype(jnp.float32)


def empty_cache(config: GPT2Config, start_B: jax.Array, max_len: int, kv_dtype=jnp.float32) -> KVCache:
    """A cache of max_len slots; row b's first real token goes to slot start_B[b] (left padding before it).

    kv_dtype float32 (the default) or bfloat16: keys and values are stored in it and widened to
    float32 when attention reads them.
    """
    kv_dtype = kvcache.check_kv_dtype(kv_dtype)
    return kvcache.init_cache(config.n_layer, config.n_head, config.head_dim, jnp.asarray(start_B), max_len, kv_dtype)


@functools.partial(jax.jit, static_argnames=("config",))
def _forward_jit(ids_BT: jax.Array, weights: GPT2Weights, config: GPT2Config) -> jax.Array:
    B, T = ids_BT.shape
    hidden_BTD, _ = transformer(ids_BT, shared_cache(config, jnp.zeros((B,), jnp.int32), T), weights, config)
    return lm_logits(hidden_BTD, weights)


@functools.partial(jax.jit, static_argnames=("config",))
def _forward_cached_jit(ids_BT, cache: KVCache, weights: GPT2Weights, config: GPT2Config):
    hidden_BTD, cache = transformer(ids_BT, cache, weights, config)
    return lm_logits(hidden_BTD, weights), cache


def _is_traced(x) -> bool:
    return isinstance(x, jax.core.Tracer)


def check_token_ids(ids_BT, config: GPT2Config) -> np.ndarray:
    """Validate concrete token ids on the host: a clear ValueError instead of a silently clamped gather."""
    ids = np.asarray(ids_BT)
    if ids.ndim != 2:
        raise ValueError(f"token ids must be 2-D (batch, time); got shape {ids.shape}")
    if ids.shape[0] == 0 or ids.shape[1] == 0:
        raise ValueError(f"token ids must have at least one row and one token; got shape {ids.shape}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"token ids must be integers; got dtype {ids.dtype}")
    if not tokens_in_vocabulary(ids, config.vocab_size):
        raise ValueError(f"token ids must be in [0, {config.vocab_size}); got [{ids.min()}, {ids.max()}]")
    return ids.astype(np.int32)


def check_length(num_tokens: int, config: GPT2Config) -> None:
    """A sequence must fit the position table (a static shape, so this holds under jit too)."""
    if num_tokens > config.n_positions:
        raise ValueError(f"sequence of {num_tokens} tokens is longer than n_positions={config.n_positions}")


def gpt2_forward(input_ids_BT, weights: GPT2Weights, config: GPT2Config) -> jax.Array:
    """Logits for every position of every row: (B, T) int ids -> (B, T, V) float32 logits."""
    if _is_traced(input_ids_BT):
        assert input_ids_BT.ndim == 2
        assert jnp.issubdtype(input_ids_BT.dtype, jnp.integer), "token ids must be integers"
        check_length(input_ids_BT.shape[1], config)
        return _forward_jit(input_ids_BT, weights, config)
    ids_BT = check_token_ids(input_ids_BT, config)
    check_length(ids_BT.shape[1], config)
    logits_BTV = _forward_jit(jnp.asarray(ids_BT), weights, config)
    assert logits_BTV.shape == (*ids_BT.shape, config.vocab_size)
    return logits_BTV


def gpt2_forward_cached(
    input_ids_BT, cache: KVCache, weights: GPT2Weights, config: GPT2Config
) -> tuple[jax.Array, KVCache]:
    """Append T tokens per row to the cache and return their logits and the new cache (the old one is untouched)."""
    if _is_traced(input_ids_BT) or _is_traced(cache.end_B):
        return _forward_cached_jit(input_ids_BT, cache, weights, config)
    ids_BT = check_token_ids(input_ids_BT, config)
    B, T = ids_BT.shape
    if B != cache.start_B.shape[0]:
        raise ValueError(f"batch of {B} rows does not match the cache's {cache.start_B.shape[0]} rows")
    end_B, start_B = np.asarray(cache.end_B), np.asarray(cache.start_B)
    if end_B.max() + T > cache.max_len:
        raise ValueError(f"{T} new tokens at slot {end_B.max()} run past the cache's end ({cache.max_len} slots)")
    last_position = int((end_B + T - start_B).max()) - 1
    if last_position >= config.n_positions:
        raise ValueError(f"a row would reach position {last_position}, past n_positions={config.n_positions}")
    return _forward_cached_jit(jnp.asarray(ids_BT), cache, weights, config)


def block_hidden_states(input_ids_BT, weights: GPT2Weights, config: GPT2Config) -> list[jax.Array]:
    """The residual stream after each block (before ln_f), layer by layer: a failing parity test names its layer."""
    ids_BT = jnp.asarray(check_token_ids(input_ids_BT, config))
    check_length(ids_BT.shape[1], config)
    B, T = ids_BT.shape
    streams_BTD, _ = residual_streams(ids_BT, shared_cache(config, jnp.zeros((B,), jnp.int32), T), weights, config)
    assert len(streams_BTD) == config.n_layer + 1
    return streams_BTD[1:]
