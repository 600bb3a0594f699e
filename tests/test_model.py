"""The public forward functions: concrete inputs are checked on the host with errors a user can act
on (JAX itself would clamp an out-of-range gather silently), traced inputs pass straight through,
and the cache is a value, never mutated.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_gpt2 import block_hidden_states, empty_cache, gpt2_forward, gpt2_forward_cached

# The tiny model: vocab_size 97, n_positions 32.
BAD_IDS = {
    "negative id": (np.array([[3, -1, 5]]), r"\[0, 97\).*-1"),
    "id equal to vocab_size": (np.array([[3, 97, 5]]), r"\[0, 97\).*97"),
    "float ids": (np.array([[3.0, 4.0]]), "integers"),
    "1-D ids": (np.array([3, 4, 5]), "2-D"),
    "3-D ids": (np.zeros((1, 2, 3), np.int32), "2-D"),
    "empty batch": (np.zeros((0, 4), np.int32), "at least one row"),
    "zero tokens": (np.zeros((2, 0), np.int32), "at least one"),
}


@pytest.mark.parametrize("case", BAD_IDS)
def test_forward_rejects_bad_ids(case, tiny):
    ids, message = BAD_IDS[case]
    with pytest.raises(ValueError, match=message):
        gpt2_forward(ids, tiny.weights, tiny.config)


def test_forward_rejects_sequence_longer_than_n_positions(tiny):
    ids_BT = tiny.random_ids(1, tiny.config.n_positions + 1)
    with pytest.raises(ValueError, match="n_positions=32"):
        gpt2_forward(ids_BT, tiny.weights, tiny.config)


def test_block_hidden_states_rejects_sequence_longer_than_n_positions(tiny):
    ids_BT = tiny.random_ids(1, tiny.config.n_positions + 1)
    with pytest.raises(ValueError, match="n_positions=32"):
        block_hidden_states(ids_BT, tiny.weights, tiny.config)


@pytest.mark.parametrize("case", BAD_IDS)
def test_cached_forward_rejects_bad_ids(case, tiny):
    ids, message = BAD_IDS[case]
    cache = empty_cache(tiny.config, jnp.zeros((max(1, len(ids)),), jnp.int32), max_len=8)
    with pytest.raises(ValueError, match=message):
        gpt2_forward_cached(ids, cache, tiny.weights, tiny.config)


def test_cached_forward_rejects_tokens_past_the_cache_end(tiny):
    cache = empty_cache(tiny.config, jnp.zeros((1,), jnp.int32), max_len=8)
    _, cache = gpt2_forward_cached(tiny.random_ids(1, 6), cache, tiny.weights, tiny.config)
    with pytest.raises(ValueError, match="past the cache's end"):
        gpt2_forward_cached(tiny.random_ids(1, 3), cache, tiny.weights, tiny.config)


def test_cached_forward_rejects_positions_past_n_positions(tiny):
    """A cache longer than n_positions still cannot hold a row longer than n_positions."""
    P = tiny.config.n_positions
    cache = empty_cache(tiny.config, jnp.zeros((1,), jnp.int32), max_len=P + 4)
    _, cache = gpt2_forward_cached(tiny.random_ids(1, P), cache, tiny.weights, tiny.config)
    with pytest.raises(ValueError, match="n_positions=32"):
        gpt2_forward_cached(tiny.random_ids(1, 1), cache, tiny.weights, tiny.config)


def test_cached_forward_rejects_batch_not_matching_the_cache(tiny):
    cache = empty_cache(tiny.config, jnp.zeros((2,), jnp.int32), max_len=8)
    with pytest.raises(ValueError, match="3 rows.*2 rows"):
        gpt2_forward_cached(tiny.random_ids(3, 4), cache, tiny.weights, tiny.config)


def test_forward_works_inside_jit(tiny):
    ids_BT = tiny.random_ids(2, 8)
    jitted = jax.jit(gpt2_forward, static_argnames="config")
    logits_BTV = jitted(jnp.asarray(ids_BT), tiny.weights, config=tiny.config)
    np.testing.assert_array_equal(logits_BTV, gpt2_forward(ids_BT, tiny.weights, tiny.config))


def test_forward_inside_jit_rejects_sequence_longer_than_n_positions(tiny):
    """T is a static shape even under jit: past n_positions the position gather would silently clamp."""
    ids_BT = jnp.asarray(tiny.random_ids(1, tiny.config.n_positions + 1))
    jitted = jax.jit(gpt2_forward, static_argnames="config")
    with pytest.raises(ValueError, match="n_positions=32"):
        jitted(ids_BT, tiny.weights, config=tiny.config)


def test_cached_forward_works_inside_jit(tiny):
    ids_BT = tiny.random_ids(2, 8)
    cache = empty_cache(tiny.config, jnp.zeros((2,), jnp.int32), max_len=8)
    jitted = jax.jit(gpt2_forward_cached, static_argnames="config")
    logits_BTV, _ = jitted(jnp.asarray(ids_BT), cache, tiny.weights, config=tiny.config)
    expected_BTV, _ = gpt2_forward_cached(ids_BT, cache, tiny.weights, tiny.config)
    np.testing.assert_array_equal(logits_BTV, expected_BTV)


def test_cached_forward_leaves_the_old_cache_unchanged(tiny):
    cache = empty_cache(tiny.config, jnp.array([0, 2], jnp.int32), max_len=8)
    _, cache = gpt2_forward_cached(tiny.random_ids(2, 4), cache, tiny.weights, tiny.config)
    before = jax.tree_util.tree_map(np.array, cache)
    _, new_cache = gpt2_forward_cached(tiny.random_ids(2, 1, seed=1), cache, tiny.weights, tiny.config)
    assert (np.asarray(new_cache.end_B) == np.asarray(before.end_B) + 1).all()
    for old, kept in zip(jax.tree_util.tree_leaves(cache), jax.tree_util.tree_leaves(before), strict=True):
        np.testing.assert_array_equal(old, kept)


@pytest.mark.parametrize("num_new", [1, 3])  # one token: the native decode attention where it runs; three: XLA's
def test_the_first_rows_of_a_wider_cache_step_as_a_cache_of_only_those_rows(tiny, num_new):
    """The server steps rows [0, B) of a cache that holds more: logits, keys and values equal those of a
    cache of exactly B rows, and the rows past B are not touched."""
    B, extra, S = 2, 3, 16
    narrow = empty_cache(tiny.config, jnp.zeros((B,), jnp.int32), S)
    _, narrow = gpt2_forward_cached(tiny.random_ids(B, 5), narrow, tiny.weights, tiny.config)
    others = jax.random.normal(jax.random.PRNGKey(0), (2, tiny.config.n_layer, extra, *narrow.k_LBNSH.shape[2:]))
    wide = narrow.__class__(
        k_LBNSH=jnp.concatenate([narrow.k_LBNSH, others[0]], axis=1),
        v_LBNSH=jnp.concatenate([narrow.v_LBNSH, others[1]], axis=1),
        start_B=narrow.start_B,
        end_B=narrow.end_B,
    )
    ids_BT = tiny.random_ids(B, num_new, seed=1)
    narrow_logits_BTV, narrow = gpt2_forward_cached(ids_BT, narrow, tiny.weights, tiny.config)
    wide_logits_BTV, wide = gpt2_forward_cached(ids_BT, wide, tiny.weights, tiny.config)
    np.testing.assert_array_equal(np.asarray(wide_logits_BTV), np.asarray(narrow_logits_BTV))
    np.testing.assert_array_equal(np.asarray(wide.k_LBNSH[:, :B]), np.asarray(narrow.k_LBNSH))
    np.testing.assert_array_equal(np.asarray(wide.v_LBNSH[:, :B]), np.asarray(narrow.v_LBNSH))
    np.testing.assert_array_equal(np.asarray(wide.k_LBNSH[:, B:]), np.asarray(others[0]))
    np.testing.assert_array_equal(np.asarray(wide.v_LBNSH[:, B:]), np.asarray(others[1]))
