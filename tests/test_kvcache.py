"""The KV cache in float32 or bfloat16: what is stored, what attention reads, and how far a bf16
cache moves the logits.

Bound for the bf16 cache, measured on the std-0.1 gpt2-shaped model (conftest), 2 rows x (64-token
prefill + 32 one-token steps), against the same model with a float32 cache: max abs logit diff
0.39, mean 0.040, argmax agreeing at 92-93% of positions (logits up to |15|, std 2.8), with the
kernels and with XLA alike. That is the rounding of every key and value to bf16 (8-bit mantissa,
relative error <= 2^-9), amplified through 12 random layers: the same size as bf16 *weights* add
(test_native: 0.48 max, 0.049 mean, 94%). The bounds leave ~2x headroom over the measurement.
"""

import warnings

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jax_gpt2 import empty_cache, generate, gpt2_forward_cached, kvcache, load_weights, stream_generate
from jax_gpt2.generate import left_pad

BF16_CACHE_BOUNDS = dict(max=0.8, mean=0.08, argmax=0.85)


def test_a_cache_is_float32_unless_asked_for_bfloat16(tiny):
    start_B = jnp.zeros((2,), jnp.int32)
    fp32 = empty_cache(tiny.config, start_B, 8)
    assert fp32.kv_dtype == jnp.float32
    assert fp32.k_LBNSH.dtype == jnp.float32
    bf16 = empty_cache(tiny.config, start_B, 8, jnp.bfloat16)
    assert bf16.kv_dtype == jnp.bfloat16
    assert bf16.k_LBNSH.dtype == jnp.uint16  # its bits: XLA's CPU backend widens any bfloat16 update
    assert bf16.v_LBNSH.dtype == jnp.uint16


@pytest.mark.parametrize("kv_dtype", [jnp.float16, jnp.int8, "fp32", "bf16"])
def test_an_unsupported_kv_dtype_is_a_value_error_naming_the_choices(kv_dtype, tiny):
    with pytest.raises(ValueError, match="kv_dtype must be one of float32, bfloat16"):
        empty_cache(tiny.config, jnp.zeros((1,), jnp.int32), 8, kv_dtype)
    with pytest.raises(ValueError, match="kv_dtype must be one of float32, bfloat16"):
        generate([[1, 2]], tiny.weights, tiny.config, max_new_tokens=2, kv_dtype=kv_dtype)


def test_a_bf16_cache_holds_the_float32_keys_and_values_rounded(tiny):
    """Layer 0's keys and values depend only on the embeddings, so they are the float32 cache's, rounded."""
    ids_BT = tiny.random_ids(2, 7)
    caches = {}
    for kv_dtype in (jnp.float32, jnp.bfloat16):
        _, caches[kv_dtype] = gpt2_forward_cached(ids_BT, empty_cache(tiny.config, jnp.zeros((2,), jnp.int32), 9, kv_dtype), tiny.weights, tiny.config)
    for name in ("k_LBNSH", "v_LBNSH"):
        float32_BNSH = np.asarray(getattr(caches[jnp.float32], name)[0])
        bf16_BNSH = np.asarray(kvcache.values(getattr(caches[jnp.bfloat16], name)[0]).astype(jnp.float32))
        np.testing.assert_array_equal(bf16_BNSH, float32_BNSH.astype(ml_dtypes.bfloat16).astype(np.float32))
        assert (bf16_BNSH != float32_BNSH).any(), "the stored values must actually be rounded"


def teacher_forced_logits(weights, config, ids_BT: np.ndarray, prefill: int, kv_dtype) -> np.ndarray:
    """Prefill `prefill` tokens, then one token per step: the logits at every position."""
    B, T = ids_BT.shape
    cache = empty_cache(config, jnp.zeros((B,), jnp.int32), T, kv_dtype)
    logits_BTV, cache = gpt2_forward_cached(ids_BT[:, :prefill], cache, weights, config)
    steps = [np.asarray(logits_BTV)]
    for t in range(prefill, T):
        logits_B1V, cache = gpt2_forward_cached(ids_BT[:, t : t + 1], cache, weights, config)
        steps.append(np.asarray(logits_B1V))
    return np.concatenate(steps, axis=1)


def test_bf16_cache_logits_stay_near_float32_cache_logits(gpt2_shape, capsys):
    ids_BT = gpt2_shape.random_ids(2, 96)
    float32_BTV = teacher_forced_logits(gpt2_shape.weights, gpt2_shape.config, ids_BT, 64, jnp.float32)
    bf16_BTV = teacher_forced_logits(gpt2_shape.weights, gpt2_shape.config, ids_BT, 64, jnp.bfloat16)
    diff_BTV = np.abs(bf16_BTV - float32_BTV)
    argmax_agreement = float((bf16_BTV.argmax(-1) == float32_BTV.argmax(-1)).mean())
    from checkpoints import check_rounding_error  # torch only where it is needed

    what = f"bf16 vs float32 cache logits (gpt2 shape, std 0.1, kernels {gpt2_shape.weights.use_kernels})"
    check_rounding_error(what, diff_BTV, argmax_agreement, BF16_CACHE_BOUNDS, capsys)


def test_streaming_with_a_bf16_cache_yields_generates_tokens(tiny):
    prompts = [tiny.random_ids(1, 5, seed=1)[0].tolist(), tiny.random_ids(1, 2, seed=2)[0].tolist()]
    expected = generate(prompts, tiny.weights, tiny.config, max_new_tokens=9, kv_dtype=jnp.bfloat16)
    steps = list(stream_generate(prompts, tiny.weights, tiny.config, max_new_tokens=9, kv_dtype=jnp.bfloat16, chunk_steps=3))
    streamed = [[step[row] for step in steps if step[row] is not None] for row in range(len(prompts))]
    assert streamed == expected


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8"])
def test_a_bf16_cache_works_with_every_weight_dtype(dtype, tiny):
    """Ragged rows, greedy: the bf16 cache runs with each weight form the loader makes here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # narrow weights widened without kernels (test_loader)
        weights = load_weights(tiny.folder, dtype=dtype)
    prompts = [[3, 5, 7, 9], [11]]
    ids_BT, start_B = left_pad(prompts, 4)
    cache = empty_cache(tiny.config, jnp.asarray(start_B), 8, jnp.bfloat16)
    logits_BTV, cache = gpt2_forward_cached(ids_BT, cache, weights, tiny.config)
    assert cache.kv_dtype == jnp.bfloat16
    assert np.isfinite(np.asarray(logits_BTV)).all()
    rows = generate(prompts, weights, tiny.config, max_new_tokens=4, kv_dtype=jnp.bfloat16)
    assert [len(row) for row in rows] == [4, 4]
