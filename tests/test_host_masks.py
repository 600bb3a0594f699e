"""kernels/host_masks.py: a jitted program asks the host for masks between its steps, through the
kernel library's FFI target and the writer registered under a table number."""

import gc

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_gpt2.kernels import host_masks, native

pytestmark = pytest.mark.skipif(not native.kernels_available(), reason="the host_masks target is in the kernel library")


class RecordingWriter:
    """Writes row w's mask as word k = 100 * token + 10 * picks + k for rows it narrows, and records its calls."""

    def __init__(self, narrowed_rows: set[int]) -> None:
        self.narrowed_rows, self.calls = narrowed_rows, []

    def __call__(self, token_W: np.ndarray, picks_W: np.ndarray, allowed_WK: np.ndarray) -> None:
        self.calls.append((token_W.tolist(), picks_W.tolist(), allowed_WK.copy()))
        for w in self.narrowed_rows:
            allowed_WK[w] = 100 * token_W[w] + 10 * picks_W[w] + np.arange(allowed_WK.shape[1])


def three_steps(table_1: jax.Array, num_words: int) -> jax.Array:
    """A loop whose step i asks for masks with token_W = (i, i + 1) and picks_W = (i + 1, i + 1)."""

    def step(i, carry):
        token_W, masks_YWK = carry
        allowed_WK = host_masks.host_masks(table_1, token_W, jnp.full((2,), i + 1, jnp.int32), num_words)
        return token_W + 1, masks_YWK.at[i].set(allowed_WK)

    start = (jnp.array([0, 1], jnp.int32), jnp.zeros((3, 2, num_words), jnp.int32))
    return jax.lax.fori_loop(0, 3, step, start)[1]


def test_a_program_gets_each_steps_masks_from_the_registered_writer_in_order():
    writer = RecordingWriter(narrowed_rows={1})
    table_1 = np.array([host_masks.register(writer)], np.int32)
    masks_YWK = np.asarray(jax.jit(three_steps, static_argnums=1)(table_1, 5))
    assert [(tokens, picks) for tokens, picks, _ in writer.calls] == [([0, 1], [1, 1]), ([1, 2], [2, 2]), ([2, 3], [3, 3])]
    assert all((entry == -1).all() for _, _, entry in writer.calls), "every word starts with every token allowed"
    np.testing.assert_array_equal(masks_YWK[:, 0], -1)  # a row the writer leaves alone allows every token
    for i in range(3):
        np.testing.assert_array_equal(masks_YWK[i, 1], 100 * (i + 1) + 10 * (i + 1) + np.arange(5))


def test_a_writer_that_raises_fails_the_program_with_a_message():
    def broken(token_W, picks_W, allowed_WK) -> None:
        raise RuntimeError("grammar refused the token")

    table_1 = np.array([host_masks.register(broken)], np.int32)
    with pytest.raises(Exception, match="mask writer failed"):
        np.asarray(jax.jit(three_steps, static_argnums=1)(table_1, 2))


def test_a_forgotten_writer_is_an_error_not_a_crash():
    writer = RecordingWriter(narrowed_rows=set())
    table_1 = np.array([host_masks.register(writer)], np.int32)
    del writer
    gc.collect()  # the table holds writers weakly: an engine's writer goes with the engine
    with pytest.raises(Exception, match="mask writer failed"):
        np.asarray(jax.jit(three_steps, static_argnums=1)(table_1, 2))
