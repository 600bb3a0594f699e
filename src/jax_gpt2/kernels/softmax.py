"""log-softmax's normalizer over the vocabulary, log(sum_v e^(logits[v])), and the top k logits, by the
C++ kernel or by XLA.

Scoring needs them at every position: perplexity's windows and a server's prompt logprobs take one
per scored token over 50257 logits. XLA's CPU reduction of exp over such rows ran ~150 ms for a
(512, 50257) block on a 2-core Xeon, about as long as the lm_head matmul that made the block; the
kernel (core.cc, "Log-sum-exp of rows") reads each row twice with vector exp over the pool, and a
third time for the top k. Both targets are in every build of the library (native.target_name
asserts it is registered).
"""

import jax
import jax.numpy as jnp

from jax_gpt2.kernels import native


def logsumexp_rows(x_MV: jax.Array, use_kernel: bool) -> jax.Array:
    """lse_M = log(sum_v e^(x_MV[m, v])) in float32: by the kernel (use_kernel) or by XLA.

    Each row is summed by one thread in one order, so a row's value never depends on the others.
    NaN in a row gives NaN, +inf gives +inf, a row of -inf gives -inf, as XLA's logsumexp does.
    """
    M, V = x_MV.shape
    assert x_MV.dtype == jnp.float32, "log-softmax runs in float32"
    assert M >= 1
    assert V >= 1
    if not use_kernel:
        return jax.nn.logsumexp(x_MV, axis=-1)
    call = jax.ffi.ffi_call(native.target_name("logsumexp_rows"), jax.ShapeDtypeStruct((M,), jnp.float32),
                            vmap_method="sequential")  # fmt: skip
    lse_M = call(x_MV)
    assert lse_M.shape == (M,)
    return lse_M


def logsumexp_top_rows(x_MV: jax.Array, k: int, use_kernel: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(lse_M, top_ids_MK, top_values_MK): each row's log-sum-exp, as logsumexp_rows, and its k largest
    values and their indices (int32), largest first, the lower index first among equal values, as
    jax.lax.top_k gives them; by the kernel (use_kernel: a third pass over each row while it is still in
    cache, instead of XLA's sort-based top_k) or by XLA."""
    M, V = x_MV.shape
    assert x_MV.dtype == jnp.float32, "log-softmax runs in float32"
    assert M >= 1
    assert 1 <= k <= V
    if not use_kernel:
        top_values_MK, top_ids_MK = jax.lax.top_k(x_MV, k)
        return jax.nn.logsumexp(x_MV, axis=-1), top_ids_MK.astype(jnp.int32), top_values_MK
    results = (jax.ShapeDtypeStruct((M,), jnp.float32), jax.ShapeDtypeStruct((M, k), jnp.int32),
               jax.ShapeDtypeStruct((M, k), jnp.float32))  # fmt: skip
    call = jax.ffi.ffi_call(native.target_name("logsumexp_top_rows"), results, vmap_method="sequential")
    lse_M, top_ids_MK, top_values_MK = call(x_MV)
    assert top_ids_MK.shape == (M, k)
    return lse_M, top_ids_MK, top_values_MK
