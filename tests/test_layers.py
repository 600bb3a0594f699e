"""Building blocks that have more than one implementation agree exactly."""

import jax
import jax.numpy as jnp
import numpy as np

from jax_gpt2.layers import cached_attention, causal_attention_in_blocks


def test_block_causal_attention_equals_full_attention_over_a_filled_cache():
    B, T, N, H = 2, 10, 3, 4
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    q_BTNH = jax.random.normal(keys[0], (B, T, N, H)) * 3.0
    k_BNSH = jax.random.normal(keys[1], (B, N, T, H)) * 3.0
    v_BNSH = jax.random.normal(keys[2], (B, N, T, H))
    causal_TS = jnp.tril(jnp.ones((T, T), bool))
    mask_BTS = causal_TS[None] & (jnp.arange(T)[None, None, :] >= jnp.array([0, 3])[:, None, None])  # row 1 left-padded
    full_BTNH = cached_attention(q_BTNH, k_BNSH, v_BNSH, mask_BTS, 0.5)
    # A left-pad query sees no slot at all: its output is a placeholder nobody reads, so only
    # queries with something to see are compared.
    real_BT = np.asarray(mask_BTS.any(axis=-1))
    assert real_BT.sum() == 2 * T - 3
    for block in (1, 3, 4, 10):
        blocked_BTNH = causal_attention_in_blocks(q_BTNH, k_BNSH, v_BNSH, mask_BTS, 0.5, block)
        # Same scores and the same softmax over the visible slots; only the row length differs.
        np.testing.assert_allclose(np.asarray(blocked_BTNH)[real_BT], np.asarray(full_BTNH)[real_BT], rtol=0, atol=2e-6)


def test_attention_over_a_bf16_cache_is_float32_math_on_the_rounded_values():
    """A bf16 cache is widened as it is read: the same float32 result as a float32 cache holding the
    rounded keys and values, not bf16 arithmetic (that would differ by ~1e-2 here)."""
    B, T, N, S, H = 2, 3, 2, 9, 8
    keys = jax.random.split(jax.random.PRNGKey(1), 3)
    q_BTNH = jax.random.normal(keys[0], (B, T, N, H))
    k_BNSH = jax.random.normal(keys[1], (B, N, S, H)).astype(jnp.bfloat16)
    v_BNSH = jax.random.normal(keys[2], (B, N, S, H)).astype(jnp.bfloat16)
    mask_BTS = jnp.broadcast_to(jnp.arange(S)[None, None, :] <= jnp.arange(T)[None, :, None] + 5, (B, T, S))
    bf16_BTNH = cached_attention(q_BTNH, k_BNSH, v_BNSH, mask_BTS, 0.35)
    widened_BTNH = cached_attention(q_BTNH, k_BNSH.astype(jnp.float32), v_BNSH.astype(jnp.float32), mask_BTS, 0.35)
    assert bf16_BTNH.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(bf16_BTNH), np.asarray(widened_BTNH), rtol=0, atol=1e-6)
