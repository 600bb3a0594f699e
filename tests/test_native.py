"""The native CPU kernels (kernels/: native.py, matmul.py, attention.py, core.cc, ffi.cc) compute what
XLA computes, through the model.

This file tests the host's own build as the library uses it; tests/test_kernels.py runs every
build this CPU can execute (AVX-512, AVX2, SSE2) op by op, tests/test_kernel_core.py the C++ core
alone (and its aarch64 build under qemu).

Tolerances, each with its reason, all in this docstring:

- Packed matmul: per output element |kernel - exact| <= MATMUL_RTOL * sum_i |x_i| |w_io|, where
  exact is the float64 product of x and the *rounded* weights (unpack_matrix), so only float32
  accumulation is measured, never the weight rounding. Summing I float32 products in sequence
  errs by at most ~I * 2^-24 of that sum (4.6e-5 at I = 768) and typically by ~sqrt(I) * 2^-24
  (1.7e-6; measured: at most 2.8e-7 over every shape and dtype here). 1e-5 sits above both and
  far below a wrong product: one dropped input row alone moves a result by ~1/I of the sum
  (1.3e-3 at I = 768), a wrong scale or a leaked column by far more.
- Decode attention: |kernel - XLA| <= ATTENTION_RTOL * max |v|. Both are convex mixtures of the
  v rows; they differ in summation order and in the kernel's own exp (rel. error < 1e-8), so a
  few float32 ulps of the scores (up to ~60 here) decide: measured at most 1.5e-6. The attention
  weights alone are held tighter, each to SOFTMAX_RTOL of itself (see that test).
- Whole model, kernels against XLA alone (the same checkpoint loaded with pack=False) or transformers:
  the parity bar of conftest (`assert_matches_transformers`, 1e-4 scaled by the logit magnitude,
  identical argmax), because both sides compute the same float32 math in another order.
- Weight-only bf16 / int8 against float32: the rounding of the weights themselves, amplified by
  12 random layers, see `test_narrow_weights_stay_near_float32_logits`.
"""

import concurrent.futures
import dataclasses
import os
import subprocess
import sys
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from decode_cases import decode_rows

from jax_gpt2 import empty_cache, generate, gpt2_forward, gpt2_forward_cached, kvcache, load_config, load_weights
from jax_gpt2.generate import left_pad
from jax_gpt2.kernels import decode_attention, native, packed_matmul, prefill_attention
from jax_gpt2.layers import TANH_GELUS, activation, cached_attention, can_use_decode_kernel, can_use_prefill_kernel
from jax_gpt2.weights import PACKED_DTYPES, TILE, PackedMatrix, pack_matrix, unpack_matrix

MATMUL_RTOL = 1e-5
ATTENTION_RTOL = 1e-5
SOFTMAX_RTOL = 1e-5

KERNELS = native.kernels_available()
needs_kernels = pytest.mark.skipif(
    not KERNELS, reason="native kernels unavailable here (need x86-64 or aarch64 Linux or macOS, a C++ compiler, CPU backend)"
)
DTYPES = list(PACKED_DTYPES)  # float32, bfloat16, int8
TESTS_DIR = Path(__file__).parent


# --- inputs --------------------------------------------------------------------------------------


def random_weight_IO(I: int, O: int, seed: int = 0) -> np.ndarray:
    """Columns of very different magnitudes (so int8 scales differ), column 0 all zero when O > 1."""
    rng = np.random.default_rng(seed)
    w_IO = rng.normal(size=(I, O)) * np.exp(rng.normal(size=(1, O)))
    if O > 1:
        w_IO[:, 0] = 0.0
    return w_IO.astype(np.float32)


def random_x_MI(M: int, I: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(M, I)).astype(np.float32)


def exact_product(x_MI: np.ndarray, packed: PackedMatrix) -> tuple[np.ndarray, np.ndarray]:
    """(x @ W, |x| @ |W|) in float64 over the rounded weights the PackedMatrix stands for."""
    w_IO = np.asarray(unpack_matrix(packed), np.float64)
    x_MI = np.asarray(x_MI, np.float64)
    return x_MI @ w_IO, np.abs(x_MI) @ np.abs(w_IO)


def assert_within_accumulation_error(actual_MO, exact_MO: np.ndarray, magnitude_MO: np.ndarray, what: str) -> None:
    actual_MO = np.asarray(actual_MO, np.float64)
    assert actual_MO.shape == exact_MO.shape, f"{what}: shape {actual_MO.shape} != {exact_MO.shape}"
    assert np.isfinite(actual_MO).all(), f"{what}: not finite"
    error_MO = np.abs(actual_MO - exact_MO)
    worst = float((error_MO / np.maximum(magnitude_MO, np.finfo(np.float64).tiny)).max())
    assert (error_MO <= MATMUL_RTOL * magnitude_MO).all(), f"{what}: error {worst:.3g} x sum|x||w| > {MATMUL_RTOL}"


# --- packed matmul -------------------------------------------------------------------------------

MATMUL_SHAPES = [(I, O) for I in (1, 37, 768) for O in (1, 63, 64, 65, 200)]
ROWS = [1, 5, 6, 7, 13]  # below, at and past the kernel's 6-row block, and two blocks plus one


@needs_kernels
@pytest.mark.parametrize("M", ROWS)
@pytest.mark.parametrize(("I", "O"), MATMUL_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_matmul_equals_float64_math_on_the_rounded_weights(dtype, I, O, M):
    packed = pack_matrix(random_weight_IO(I, O), dtype)
    x_MI = random_x_MI(M, I)
    exact_MO, magnitude_MO = exact_product(x_MI, packed)
    y_MO = packed_matmul(jnp.asarray(x_MI), packed, use_kernel=True)
    assert_within_accumulation_error(y_MO, exact_MO, magnitude_MO, f"{dtype} kernel")


@needs_kernels
@pytest.mark.parametrize("M", ROWS)
@pytest.mark.parametrize(("I", "O"), MATMUL_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_matmul_equals_the_xla_fallback(dtype, I, O, M):
    packed = pack_matrix(random_weight_IO(I, O), dtype)
    x_MI = jnp.asarray(random_x_MI(M, I))
    _, magnitude_MO = exact_product(x_MI, packed)
    fallback_MO = np.asarray(packed_matmul(x_MI, packed, use_kernel=False), np.float64)
    y_MO = packed_matmul(x_MI, packed, use_kernel=True)
    assert_within_accumulation_error(y_MO, fallback_MO, magnitude_MO, f"{dtype} kernel vs XLA")


@needs_kernels
@pytest.mark.parametrize("M", [1, 7, 40])  # the matvec path, and the GEMM's from 16 rows
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_epilogue_is_the_bias_then_gelu_of_xla(dtype, M):
    """A bias alone is exactly the plain product plus the bias (one float32 add, as XLA's); with
    GELU, the model's own XLA gelu_new of that within the float32 rounding of both."""
    I, O = 96, 200
    packed = pack_matrix(random_weight_IO(I, O), dtype)
    x_MI = jnp.asarray(random_x_MI(M, I))
    bias_O = jnp.asarray(np.random.default_rng(3).normal(size=O).astype(np.float32))
    plain_MO = packed_matmul(x_MI, packed, use_kernel=True)
    biased_MO = packed_matmul(x_MI, packed, use_kernel=True, bias_O=bias_O)
    np.testing.assert_array_equal(np.asarray(biased_MO), np.asarray(plain_MO + bias_O))
    fused_MO = np.asarray(packed_matmul(x_MI, packed, use_kernel=True, bias_O=bias_O, gelu=True))
    reference_MO = np.asarray(activation("gelu_new", biased_MO))
    np.testing.assert_allclose(fused_MO, reference_MO, rtol=2e-6, atol=2e-6 * float(np.abs(reference_MO).max()))


@needs_kernels
@pytest.mark.parametrize("M", [1, 7, 40])  # the matvec path, and the GEMM's from 16 rows
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_residual_is_added_last_exactly_as_the_model_adds_it(dtype, M):
    """residual_MO + (x @ W + b) in one float32 add after everything else, bit for bit what the
    model's XLA form computes (`x + linear(...)`), so fusing the residual changes no logit."""
    I, O = 96, 200
    packed = pack_matrix(random_weight_IO(I, O), dtype)
    x_MI = jnp.asarray(random_x_MI(M, I))
    bias_O = jnp.asarray(np.random.default_rng(4).normal(size=O).astype(np.float32))
    residual_MO = jnp.asarray(np.random.default_rng(5).normal(size=(M, O)).astype(np.float32))
    for gelu in (False, True):
        alone_MO = packed_matmul(x_MI, packed, use_kernel=True, bias_O=bias_O, gelu=gelu)
        fused_MO = packed_matmul(x_MI, packed, use_kernel=True, bias_O=bias_O, gelu=gelu, residual_MO=residual_MO)
        np.testing.assert_array_equal(np.asarray(fused_MO), np.asarray(residual_MO + alone_MO))
    with pytest.raises(AssertionError, match="shape"):
        packed_matmul(x_MI, packed, use_kernel=True, residual_MO=residual_MO[:, :-1])


def test_every_tanh_gelu_name_and_only_those_fuse_into_the_matmul():
    assert TANH_GELUS == {"gelu_new", "gelu_fast", "gelu_pytorch_tanh", "gelu_python_tanh", "gelu_accurate"}


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_leaves_an_all_zero_weight_column_exactly_zero(dtype):
    packed = pack_matrix(random_weight_IO(768, 65), dtype)
    y_MO = np.asarray(packed_matmul(jnp.asarray(random_x_MI(7, 768)), packed, use_kernel=True))
    assert (y_MO[:, 0] == 0).all()
    assert (y_MO[:, 1:] != 0).all()


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_under_jit_takes_a_transposed_operand(dtype):
    """XLA hands the kernel a row-major copy whatever layout the operand had in the graph."""
    packed = pack_matrix(random_weight_IO(37, 65), dtype)
    x_IM = jnp.asarray(random_x_MI(13, 37).T)
    jitted_MO = jax.jit(lambda x_IM: packed_matmul(x_IM.T, packed, use_kernel=True))(x_IM)
    eager_MO = packed_matmul(jnp.asarray(np.ascontiguousarray(x_IM.T)), packed, use_kernel=True)
    np.testing.assert_array_equal(np.asarray(jitted_MO), np.asarray(eager_MO))


@needs_kernels
def test_kernel_under_vmap_equals_each_slice():
    packed = pack_matrix(random_weight_IO(37, 200), "int8")
    x_BMI = jnp.asarray(np.random.default_rng(2).normal(size=(3, 5, 37)).astype(np.float32))
    batched_BMO = jax.vmap(lambda x_MI: packed_matmul(x_MI, packed, use_kernel=True))(x_BMI)
    for b in range(3):
        np.testing.assert_array_equal(np.asarray(batched_BMO[b]), np.asarray(packed_matmul(x_BMI[b], packed, True)))


@needs_kernels
def test_kernel_calls_from_many_threads_each_get_their_own_result():
    """One thread pool serves every call in the process: concurrent callers must not mix their tiles."""
    packed = pack_matrix(random_weight_IO(768, 200), "bfloat16")
    xs = [jnp.asarray(random_x_MI(7, 768, seed=seed)) for seed in range(8)]
    matmul = jax.jit(lambda x_MI: packed_matmul(x_MI, packed, use_kernel=True))
    expected = [np.asarray(matmul(x_MI)) for x_MI in xs]
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda i: np.asarray(matmul(xs[i % 8])), range(64)))
    for i, y_MO in enumerate(results):
        np.testing.assert_array_equal(y_MO, expected[i % 8])


@needs_kernels
def test_independent_kernel_calls_inside_one_jit_each_get_their_own_result():
    """XLA may run independent custom calls of one program at the same time."""
    matrices = [pack_matrix(random_weight_IO(768, 65 + 64 * k, seed=k), DTYPES[k % 3]) for k in range(4)]
    x_MI = jnp.asarray(random_x_MI(5, 768))
    together = jax.jit(lambda x_MI: [packed_matmul(x_MI, packed, use_kernel=True) for packed in matrices])(x_MI)
    for packed, y_MO in zip(matrices, together, strict=True):
        np.testing.assert_array_equal(np.asarray(y_MO), np.asarray(packed_matmul(x_MI, packed, use_kernel=True)))


@needs_kernels
def test_kernel_rejects_a_matrix_whose_out_features_disagree_with_its_tiles():
    """An inconsistent PackedMatrix is an error from the kernel, not a write past the output."""
    packed = pack_matrix(random_weight_IO(37, 64), "float32")
    wrong = PackedMatrix(packed.tiles_GIC, None, out_features=65)  # one tile holds at most 64 columns
    with pytest.raises(Exception, match="O does not match the number of tiles"):
        np.asarray(packed_matmul(jnp.asarray(random_x_MI(5, 37)), wrong, use_kernel=True))


# --- pack_matrix / unpack_matrix -----------------------------------------------------------------


@pytest.mark.parametrize(("I", "O"), MATMUL_SHAPES)
def test_float32_packing_round_trips_exactly(I, O):
    w_IO = random_weight_IO(I, O)
    packed = pack_matrix(w_IO, jnp.float32)
    assert packed.shape == (I, O)
    assert packed.tiles_GIC.shape == (-(-O // TILE), I, TILE)
    assert packed.scale_GC is None
    np.testing.assert_array_equal(np.asarray(unpack_matrix(packed)), w_IO)


@pytest.mark.parametrize(("I", "O"), MATMUL_SHAPES)
def test_bfloat16_packing_rounds_each_weight_to_nearest_bfloat16(I, O):
    w_IO = random_weight_IO(I, O)
    packed = pack_matrix(w_IO, jnp.bfloat16)
    assert packed.dtype == jnp.bfloat16
    assert packed.scale_GC is None
    rounded_IO = w_IO.astype(ml_dtypes.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(unpack_matrix(packed)), rounded_IO)


@pytest.mark.parametrize(("I", "O"), MATMUL_SHAPES)
def test_int8_packing_errs_by_at_most_half_a_step_of_its_column(I, O):
    w_IO = random_weight_IO(I, O)
    packed = pack_matrix(w_IO, jnp.int8)
    assert packed.dtype == jnp.int8
    assert packed.scale_GC.shape == (packed.tiles_GIC.shape[0], TILE)
    scale_O = np.asarray(packed.scale_GC).reshape(-1)[:O]
    column_max_O = np.abs(w_IO).max(axis=0)
    nonzero_O = column_max_O > 0
    np.testing.assert_allclose(scale_O[nonzero_O], column_max_O[nonzero_O] / 127, rtol=1e-6)
    # Each column's largest weight becomes +-127 exactly: the whole int8 range is used.
    tiles_IQ = np.asarray(packed.tiles_GIC).transpose(1, 0, 2).reshape(I, -1)[:, :O]
    assert (np.abs(tiles_IQ).max(axis=0)[nonzero_O] == 127).all()
    # Half a step, plus the float32 rounding of w / scale and of q * scale (a few ulps of 127 steps).
    error_IO = np.abs(np.asarray(unpack_matrix(packed)) - w_IO)
    assert (error_IO <= scale_O * (0.5 + 1e-4)).all(), f"worst {float((error_IO / scale_O).max()):.6f} steps"


def test_int8_packing_keeps_an_all_zero_column_zero():
    w_IO = random_weight_IO(37, 65)
    assert (w_IO[:, 0] == 0).all()
    unpacked_IO = np.asarray(unpack_matrix(pack_matrix(w_IO, jnp.int8)))
    assert (unpacked_IO[:, 0] == 0).all()
    assert np.isfinite(unpacked_IO).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_padding_columns_of_the_last_tile_are_zero(dtype):
    packed = pack_matrix(random_weight_IO(37, 65), dtype)
    assert packed.tiles_GIC.shape == (2, 37, TILE)
    assert (np.asarray(packed.tiles_GIC[1, :, 1:].astype(jnp.float32)) == 0).all()


@pytest.mark.parametrize("use_kernel", [False, pytest.param(True, marks=needs_kernels)], ids=["xla", "kernel"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_values_in_padding_columns_never_reach_the_output(dtype, use_kernel):
    """Fill the padding past O with garbage: the product's O columns must not change by a bit."""
    I, O, M = 37, 65, 7
    packed = pack_matrix(random_weight_IO(I, O), dtype)
    garbage_GIC = np.array(packed.tiles_GIC.astype(jnp.float32))
    garbage_GIC[-1, :, O % TILE :] = 99.0
    dirty = PackedMatrix(jnp.asarray(garbage_GIC, packed.dtype), packed.scale_GC, O)
    if packed.scale_GC is not None:
        scale_GC = np.asarray(packed.scale_GC).copy()
        scale_GC[-1, O % TILE :] = 1e6
        dirty = dataclasses.replace(dirty, scale_GC=jnp.asarray(scale_GC))
    x_MI = jnp.asarray(random_x_MI(M, I))
    clean_MO = np.asarray(packed_matmul(x_MI, packed, use_kernel=use_kernel))
    dirty_MO = np.asarray(packed_matmul(x_MI, dirty, use_kernel=use_kernel))
    assert dirty_MO.shape == (M, O)
    np.testing.assert_array_equal(dirty_MO, clean_MO)


# --- decode attention ----------------------------------------------------------------------------


def xla_decode_attention(q_BTNH, k_LBNSH, v_LBNSH, start_B, end_B, layer, scale) -> np.ndarray:
    """cached_attention with the mask that [start, end] implies."""
    slots_S = np.arange(k_LBNSH.shape[3])
    visible_BS = (slots_S[None, :] >= start_B[:, None]) & (slots_S[None, :] <= end_B[:, None])
    mask_BTS = jnp.asarray(visible_BS[:, None, :])
    k_BNSH, v_BNSH = kvcache.values(k_LBNSH[layer]), kvcache.values(v_LBNSH[layer])
    return np.asarray(cached_attention(q_BTNH, k_BNSH, v_BNSH, mask_BTS, scale))


def random_attention_inputs(L: int, B: int, N: int, S: int, H: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    q_BTNH = jnp.asarray(rng.normal(size=(B, 1, N, H)).astype(np.float32))
    k_LBNSH = jnp.asarray(rng.normal(size=(L, B, N, S, H)).astype(np.float32))
    v_LBNSH = jnp.asarray(rng.normal(size=(L, B, N, S, H)).astype(np.float32))
    return q_BTNH, k_LBNSH, v_LBNSH


def assert_attention_close(actual_BTNH, reference_BTNH: np.ndarray, v_LBNSH, what: str) -> None:
    actual_BTNH = np.asarray(actual_BTNH)
    assert actual_BTNH.shape == reference_BTNH.shape
    assert np.isfinite(actual_BTNH).all(), f"{what}: not finite"
    tolerance = ATTENTION_RTOL * float(np.abs(np.asarray(v_LBNSH)).max())
    diff = float(np.abs(actual_BTNH - reference_BTNH).max())
    assert diff <= tolerance, f"{what}: max abs diff {diff:.3g} > {tolerance:.3g}"


@needs_kernels
@pytest.mark.parametrize("scale_name", ["1/sqrt(H)", "2", "1/(3 sqrt(H))"])
@pytest.mark.parametrize("S", [1, 37, 1030])
@pytest.mark.parametrize("H", [7, 16, 24, 64])
def test_decode_attention_equals_xla_masked_attention(H, S, scale_name):
    """Every row case of decode_rows, every layer of a 3-layer cache, several scales."""
    scale = {"1/sqrt(H)": H**-0.5, "2": 2.0, "1/(3 sqrt(H))": H**-0.5 / 3}[scale_name]
    start_B, end_B = decode_rows(S)
    L, B, N = 3, len(start_B), 2
    q_BTNH, k_LBNSH, v_LBNSH = random_attention_inputs(L, B, N, S, H)
    assert can_use_decode_kernel(q_BTNH, k_LBNSH, use_kernels=True)
    for layer in range(L):
        kernel_BTNH = decode_attention(q_BTNH, k_LBNSH, v_LBNSH, jnp.asarray(start_B), jnp.asarray(end_B), layer, scale)
        reference_BTNH = xla_decode_attention(q_BTNH, k_LBNSH, v_LBNSH, start_B, end_B, layer, scale)
        assert_attention_close(kernel_BTNH, reference_BTNH, v_LBNSH, f"layer {layer}")


def test_the_decode_kernel_takes_a_bf16_cache_only_where_its_kernel_is_registered():
    q_BTNH, k_LBNSH, _ = random_attention_inputs(1, 2, 2, 5, 8)
    k_bf16_LBNSH = kvcache.stored(k_LBNSH, jnp.bfloat16)  # as the model stores it: the bits, uint16
    assert can_use_decode_kernel(q_BTNH, k_bf16_LBNSH, use_kernels=True) == native.is_registered("attention_bf16")
    assert can_use_decode_kernel(q_BTNH, k_LBNSH, use_kernels=True) == KERNELS
    assert not can_use_decode_kernel(q_BTNH, k_LBNSH, use_kernels=False)
    assert not can_use_decode_kernel(jnp.concatenate([q_BTNH, q_BTNH], axis=1), k_LBNSH, use_kernels=True)


@pytest.mark.skipif(
    not native.is_registered("attention_bf16"), reason="no bf16-cache decode kernel in this build (issue 15's C++ side)"
)
@pytest.mark.parametrize("S", [1, 37, 1030])
@pytest.mark.parametrize("H", [7, 64])
def test_bf16_cache_decode_attention_equals_xla_masked_attention(H, S):
    """Every row case of decode_rows over a bf16 cache: the kernel widens what it reads, so it meets the
    float32 kernel's bound against XLA's float32 attention over the same rounded values."""
    start_B, end_B = decode_rows(S)
    L, B, N = 2, len(start_B), 3
    q_BTNH, k_LBNSH, v_LBNSH = random_attention_inputs(L, B, N, S, H)
    k_LBNSH, v_LBNSH = kvcache.stored(k_LBNSH, jnp.bfloat16), kvcache.stored(v_LBNSH, jnp.bfloat16)
    assert can_use_decode_kernel(q_BTNH, k_LBNSH, use_kernels=True)
    for layer in range(L):
        kernel_BTNH = decode_attention(q_BTNH, k_LBNSH, v_LBNSH, jnp.asarray(start_B), jnp.asarray(end_B), layer, H**-0.5)
        reference_BTNH = xla_decode_attention(q_BTNH, k_LBNSH, v_LBNSH, start_B, end_B, layer, H**-0.5)
        assert_attention_close(kernel_BTNH, reference_BTNH, kvcache.values(v_LBNSH).astype(jnp.float32), f"layer {layer}")


@needs_kernels
@pytest.mark.parametrize("scale", [0.1, 0.3, 1.0])  # score ranges of about 4, 13 and 43
def test_decode_attention_weights_are_the_float64_softmax_to_float32_accuracy(scale):
    """With v the identity (S = H) the output is the attention weights themselves: each must be the
    float64 softmax within SOFTMAX_RTOL of its own size, down to weights of 1e-19.

    float32 scores of size up to ~45 err by a few ulps (~4e-6) absolute, which is each weight's
    relative error; XLA's softmax measures 4.3e-6 here, the kernel 4.0e-6. A cruder exp (the
    degree-4 series instead of degree 7, 5e-5) fails.
    """
    L, B, N, S, H = 1, 2, 3, 64, 64
    q_BTNH, k_LBNSH, _ = random_attention_inputs(L, B, N, S, H)
    v_LBNSH = jnp.broadcast_to(jnp.eye(S, H, dtype=jnp.float32), (L, B, N, S, H))
    start_B, end_B = jnp.zeros((B,), jnp.int32), jnp.full((B,), S - 1, jnp.int32)
    weights_BNS = np.asarray(decode_attention(q_BTNH, k_LBNSH, v_LBNSH, start_B, end_B, 0, scale))[:, 0]
    scores_BNS = np.einsum("BNH,BNSH->BNS", np.asarray(q_BTNH, np.float64)[:, 0], np.asarray(k_LBNSH[0], np.float64))
    exact_BNS = np.exp(scale * (scores_BNS - scores_BNS.max(-1, keepdims=True)))
    exact_BNS /= exact_BNS.sum(-1, keepdims=True)
    relative_error = float((np.abs(weights_BNS - exact_BNS) / exact_BNS).max())
    assert relative_error <= SOFTMAX_RTOL, f"worst weight off by {relative_error:.3g} of itself"


@needs_kernels
def test_decode_attention_with_nothing_visible_is_the_uniform_average_xla_gives():
    """A parked row (start > end): every score masked alike in XLA, so the plain mean of all S values,
    finite (no division by an empty sum)."""
    L, B, N, S, H = 2, 2, 3, 37, 24
    q_BTNH, k_LBNSH, v_LBNSH = random_attention_inputs(L, B, N, S, H)
    start_B, end_B = np.array([5, 0], np.int32), np.array([4, -1], np.int32)
    kernel_BTNH = decode_attention(q_BTNH, k_LBNSH, v_LBNSH, jnp.asarray(start_B), jnp.asarray(end_B), 1, 0.2)
    mean_BTNH = np.asarray(v_LBNSH[1]).mean(axis=2)[:, None]
    assert_attention_close(kernel_BTNH, mean_BTNH, v_LBNSH, "uniform")
    reference_BTNH = xla_decode_attention(q_BTNH, k_LBNSH, v_LBNSH, start_B, end_B, 1, 0.2)
    assert_attention_close(kernel_BTNH, reference_BTNH, v_LBNSH, "vs XLA")


@needs_kernels
def test_decode_attention_clamps_an_end_past_the_cache_to_its_last_slot():
    L, B, N, S, H = 1, 1, 2, 37, 64
    q_BTNH, k_LBNSH, v_LBNSH = random_attention_inputs(L, B, N, S, H)
    start_B = jnp.array([4], jnp.int32)
    past_BTNH = decode_attention(q_BTNH, k_LBNSH, v_LBNSH, start_B, jnp.array([S + 10], jnp.int32), 0, 0.125)
    last_BTNH = decode_attention(q_BTNH, k_LBNSH, v_LBNSH, start_B, jnp.array([S - 1], jnp.int32), 0, 0.125)
    np.testing.assert_array_equal(np.asarray(past_BTNH), np.asarray(last_BTNH))


@needs_kernels
def test_decode_attention_reads_only_its_own_layer_and_visible_slots():
    """Poison everything the row may not see with NaN: the output stays finite and unchanged."""
    L, B, N, S, H = 3, 2, 2, 40, 24
    q_BTNH, k_LBNSH, v_LBNSH = random_attention_inputs(L, B, N, S, H)
    start_B, end_B = np.array([3, 0], np.int32), np.array([20, 39], np.int32)
    clean_BTNH = decode_attention(q_BTNH, k_LBNSH, v_LBNSH, jnp.asarray(start_B), jnp.asarray(end_B), 1, 0.3)
    slots_S = np.arange(S)
    hidden_BS = (slots_S[None, :] < start_B[:, None]) | (slots_S[None, :] > end_B[:, None])

    def poisoned(cache_LBNSH) -> jax.Array:
        """NaN in layers 0 and 2, and in the slots of layer 1 that each row may not see."""
        cache_LBNSH = np.array(cache_LBNSH)
        cache_LBNSH[[0, 2]] = np.nan
        cache_LBNSH[1][np.broadcast_to(hidden_BS[:, None, :], (B, N, S))] = np.nan
        return jnp.asarray(cache_LBNSH)

    start_B, end_B = jnp.asarray(start_B), jnp.asarray(end_B)
    poisoned_BTNH = decode_attention(q_BTNH, poisoned(k_LBNSH), poisoned(v_LBNSH), start_B, end_B, 1, 0.3)
    np.testing.assert_array_equal(np.asarray(poisoned_BTNH), np.asarray(clean_BTNH))


# --- attention of many new queries ---------------------------------------------------------------


def xla_prefill_attention(q_BTNH, k_LBNSH, v_LBNSH, start_B, end_B, layer, scale) -> np.ndarray:
    """cached_attention with the model's own mask for T queries written at slots end_B + t."""
    B, T = q_BTNH.shape[:2]
    cache = kvcache.KVCache(k_LBNSH[:, :B], v_LBNSH[:, :B], jnp.asarray(start_B), jnp.asarray(end_B))
    mask_BTS = kvcache.visible_mask(cache, T)
    k_BNSH, v_BNSH = kvcache.values(k_LBNSH[layer, :B]), kvcache.values(v_LBNSH[layer, :B])
    return np.asarray(cached_attention(q_BTNH, k_BNSH, v_BNSH, mask_BTS, scale))


def prefill_rows(S: int, T: int) -> tuple[np.ndarray, np.ndarray]:
    """A whole prompt, a left-padded one (its first queries see nothing), a chunk after earlier
    ones, a chunk running past the cache's end, and a start past the cache (nothing ever visible)."""
    start_B = np.array([0, min(3, T - 1), 2, 0, S], np.int32)
    end_B = np.array([0, 0, max(0, min(S - T, 9)), max(0, S - T + 4), 0], np.int32)
    return start_B, end_B


@needs_kernels
@pytest.mark.parametrize("kv_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize(("S", "T"), [(37, 2), (37, 15), (37, 16), (37, 37), (300, 70), (300, 300)])
@pytest.mark.parametrize("H", [7, 64])
def test_prefill_attention_equals_xla_masked_attention(H, S, T, kv_dtype):
    """T queries per row against XLA's masked attention over the same cache, for every row case of
    prefill_rows, every layer of a 2-layer cache with one cache row more than the batch; both
    sides of the 16-query line (one by one below it, in blocks from it)."""
    start_B, end_B = prefill_rows(S, T)
    L, B, N = 2, len(start_B), 3
    rng = np.random.default_rng(H + S + T)
    q_BTNH = jnp.asarray(rng.normal(size=(B, T, N, H)).astype(np.float32))
    _, k_LBNSH, v_LBNSH = random_attention_inputs(L, B + 1, N, S, H, seed=T)
    if kv_dtype == "bfloat16":
        k_LBNSH, v_LBNSH = kvcache.stored(k_LBNSH, jnp.bfloat16), kvcache.stored(v_LBNSH, jnp.bfloat16)
    assert can_use_prefill_kernel(q_BTNH, k_LBNSH, use_kernels=True)
    for layer, scale in enumerate([H**-0.5, 1.5]):
        q_BTE = q_BTNH.reshape(B, T, N * H)
        kernel_BTNH = prefill_attention(q_BTE, k_LBNSH, v_LBNSH, jnp.asarray(start_B), jnp.asarray(end_B), layer, scale)
        reference_BTNH = xla_prefill_attention(q_BTNH, k_LBNSH, v_LBNSH, start_B, end_B, layer, scale)
        values_LBNSH = kvcache.values(v_LBNSH).astype(jnp.float32)
        assert_attention_close(kernel_BTNH, reference_BTNH, values_LBNSH, f"layer {layer}")


def test_the_prefill_kernel_takes_many_float32_queries_only():
    q_BTNH, k_LBNSH, _ = random_attention_inputs(1, 2, 2, 5, 8)
    many_BTNH = jnp.concatenate([q_BTNH, q_BTNH], axis=1)
    k_bf16_LBNSH = kvcache.stored(k_LBNSH, jnp.bfloat16)
    assert can_use_prefill_kernel(many_BTNH, k_LBNSH, use_kernels=True) == KERNELS
    assert can_use_prefill_kernel(many_BTNH, k_bf16_LBNSH, use_kernels=True) == native.is_registered("prefill_attention_bf16")
    assert not can_use_prefill_kernel(many_BTNH, k_LBNSH, use_kernels=False)
    assert not can_use_prefill_kernel(q_BTNH, k_LBNSH, use_kernels=True)  # one query: the decode kernel's
    assert not can_use_prefill_kernel(many_BTNH.astype(jnp.bfloat16), k_LBNSH, use_kernels=True)


@needs_kernels
def test_a_query_attends_the_same_whatever_prompt_chunk_holds_it():
    """The last 50 of 120 queries, run alone after a cache holding the first 70, give the same bits
    as inside the whole 120-query prefill: no query's numbers depend on its block or unit."""
    L, B, N, S, H, T, later = 1, 2, 3, 128, 64, 120, 50
    rng = np.random.default_rng(5)
    q_BTNH = jnp.asarray(rng.normal(size=(B, T, N, H)).astype(np.float32))
    _, k_LBNSH, v_LBNSH = random_attention_inputs(L, B, N, S, H, seed=6)
    start_B = jnp.array([0, 4], jnp.int32)
    q_BTE = q_BTNH.reshape(B, T, N * H)
    whole_BTNH = prefill_attention(q_BTE, k_LBNSH, v_LBNSH, start_B, jnp.zeros((B,), jnp.int32), 0, 0.125)
    chunk_BTNH = prefill_attention(
        q_BTNH[:, T - later :].reshape(B, later, N * H), k_LBNSH, v_LBNSH, start_B, jnp.full((B,), T - later, jnp.int32), 0, 0.125
    )
    np.testing.assert_array_equal(np.asarray(chunk_BTNH), np.asarray(whole_BTNH)[:, T - later :])


@needs_kernels
def test_prefill_attention_reads_the_queries_out_of_the_fused_projection():
    """Given the whole (B, T, 3 N H) qkv block, the kernel reads the first third as the queries and
    nothing else: the same bits as the queries alone, with NaN in the keys' and values' thirds."""
    L, B, N, S, H, T = 1, 2, 3, 64, 16, 40
    rng = np.random.default_rng(11)
    q_BTNH = jnp.asarray(rng.normal(size=(B, T, N, H)).astype(np.float32))
    _, k_LBNSH, v_LBNSH = random_attention_inputs(L, B, N, S, H, seed=12)
    qkv_BTE = jnp.concatenate([q_BTNH.reshape(B, T, N * H), jnp.full((B, T, 2 * N * H), jnp.nan)], axis=-1)
    start_B, end_B = jnp.array([0, 5], jnp.int32), jnp.array([0, 10], jnp.int32)
    alone_BTNH = prefill_attention(q_BTNH.reshape(B, T, N * H), k_LBNSH, v_LBNSH, start_B, end_B, 0, 0.25)
    fused_BTNH = prefill_attention(qkv_BTE, k_LBNSH, v_LBNSH, start_B, end_B, 0, 0.25)
    np.testing.assert_array_equal(np.asarray(fused_BTNH), np.asarray(alone_BTNH))


@needs_kernels
def test_prefill_attention_reads_only_its_own_layer_rows_and_visible_slots():
    """NaN in the other layers, in the cache row past the batch and in every slot after a row's last
    query or before its start: the output stays finite and unchanged."""
    L, B, N, S, H, T = 3, 2, 2, 90, 24, 40
    rng = np.random.default_rng(8)
    q_BTNH = jnp.asarray(rng.normal(size=(B, T, N, H)).astype(np.float32))
    _, k_LBNSH, v_LBNSH = random_attention_inputs(L, B + 1, N, S, H, seed=9)
    start_B, end_B = np.array([3, 0], np.int32), np.array([10, 30], np.int32)
    q_BTE = q_BTNH.reshape(B, T, N * H)
    clean_BTNH = prefill_attention(q_BTE, k_LBNSH, v_LBNSH, jnp.asarray(start_B), jnp.asarray(end_B), 1, 0.3)
    slots_S = np.arange(S)
    hidden_BS = (slots_S[None, :] < start_B[:, None]) | (slots_S[None, :] >= end_B[:, None] + T)

    def poisoned(cache_LBNSH) -> jax.Array:
        cache_LBNSH = np.array(cache_LBNSH)
        cache_LBNSH[[0, 2]] = np.nan
        cache_LBNSH[1, B:] = np.nan
        cache_LBNSH[1, :B][np.broadcast_to(hidden_BS[:, None, :], (B, N, S))] = np.nan
        return jnp.asarray(cache_LBNSH)

    poisoned_BTNH = prefill_attention(
        q_BTE, poisoned(k_LBNSH), poisoned(v_LBNSH), jnp.asarray(start_B), jnp.asarray(end_B), 1, 0.3
    )
    np.testing.assert_array_equal(np.asarray(poisoned_BTNH), np.asarray(clean_BTNH))


# --- whole model: kernels against XLA alone ------------------------------------------------------

PROMPT_LENGTHS = (7, 2, 5)  # a ragged batch: 0, 5 and 2 slots of left padding
NEW_TOKENS = 6


def model_inputs(vocab_size: int) -> tuple[list[list[int]], np.ndarray]:
    """Prompts and a teacher-forced continuation_BY, the same in every process."""
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, vocab_size, length).tolist() for length in PROMPT_LENGTHS]
    return prompts, rng.integers(0, vocab_size, (len(prompts), NEW_TOKENS))


def teacher_forced_logits(prompts, continuation_BY: np.ndarray, weights, config, kv_dtype=jnp.float32) -> np.ndarray:
    """Prefill the left-padded prompts (T > 1), then one token per row per step (the decode kernel's
    T = 1 path): the logits at every slot, (B, T + K, V)."""
    ids_BT, start_B = left_pad(prompts, max(PROMPT_LENGTHS))
    cache = empty_cache(config, jnp.asarray(start_B), ids_BT.shape[1] + NEW_TOKENS, kv_dtype)
    logits_BTV, cache = gpt2_forward_cached(ids_BT, cache, weights, config)
    steps = [np.asarray(logits_BTV)]
    for step in range(NEW_TOKENS):
        logits_B1V, cache = gpt2_forward_cached(continuation_BY[:, step : step + 1], cache, weights, config)
        steps.append(np.asarray(logits_B1V))
    return np.concatenate(steps, axis=1)


def model_outputs(folder: str, pack: bool) -> dict[str, np.ndarray]:
    """Everything the whole-model tests compare between a kernel model (pack=True) and an XLA one (pack=False),
    both loaded in this process."""
    config = load_config(folder)
    prompts, continuation_BY = model_inputs(config.vocab_size)
    outputs = {}
    for dtype in DTYPES:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # narrow weights widened without kernels: test_loader checks the warning
            weights = load_weights(folder, dtype=dtype, config=config, pack=pack)
        outputs[f"{dtype}_use_kernels"] = np.asarray(weights.use_kernels)
        outputs[f"{dtype}_packed"] = np.asarray(isinstance(weights.blocks[0].qkv_w_DE, PackedMatrix))
        outputs[f"{dtype}_tokens"] = np.asarray(generate(prompts, weights, config, max_new_tokens=NEW_TOKENS))
        outputs[f"{dtype}_logits"] = teacher_forced_logits(prompts, continuation_BY, weights, config)
        if dtype == "float32":
            bf16_cache_BSV = teacher_forced_logits(prompts, continuation_BY, weights, config, jnp.bfloat16)
            outputs["float32_bf16_cache_logits"] = bf16_cache_BSV
    return outputs


def kernel_probe(_: str) -> dict[str, np.ndarray]:
    """A matmul of each dtype and a decode attention, for the tests of the build cache and the thread pool."""
    x_MI = jnp.asarray(random_x_MI(13, 768))
    outputs = {"kernels_available": np.asarray(native.kernels_available())}
    if not native.kernels_available():
        return outputs
    for dtype in DTYPES:
        outputs[dtype] = np.asarray(packed_matmul(x_MI, pack_matrix(random_weight_IO(768, 200), dtype), use_kernel=True))
    start_B, end_B = decode_rows(37)
    q_BTNH, k_LBNSH, v_LBNSH = random_attention_inputs(2, len(start_B), 3, 37, 24)
    attention_BTNH = decode_attention(q_BTNH, k_LBNSH, v_LBNSH, jnp.asarray(start_B), jnp.asarray(end_B), 1, 0.2)
    outputs["attention"] = np.asarray(attention_BTNH)
    return outputs


def load_probe(folder: str) -> dict[str, np.ndarray]:
    """What load_weights decided for a default load (pack=None) in this process."""
    return {"use_kernels": np.asarray(load_weights(folder).use_kernels)}


SUBPROCESS = """
import sys
sys.path.insert(0, sys.argv[1])
import jax
jax.config.update("jax_default_matmul_precision", "highest")  # as conftest sets it for this process
import numpy as np
import test_native
np.savez(sys.argv[4], **getattr(test_native, sys.argv[2])(sys.argv[3]))
"""


def run_in_subprocess(function: str, argument: str, out: Path, **env: str) -> tuple[dict[str, np.ndarray], str]:
    """test_native.<function>(argument) in a fresh Python with these environment variables set;
    its outputs and its stderr."""
    command = [sys.executable, "-c", SUBPROCESS, str(TESTS_DIR), function, argument, str(out)]
    result = subprocess.run(command, env={**os.environ, **env}, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"subprocess {function} failed:\n{result.stderr[-4000:]}"
    with np.load(out) as npz:
        return {key: npz[key] for key in npz.files}, result.stderr


def model_outputs_fixture(build_checkpoint, pack: bool):
    computed: dict[str, dict[str, np.ndarray]] = {}

    def outputs(name: str) -> dict[str, np.ndarray]:
        if name not in computed:
            computed[name] = model_outputs(str(build_checkpoint(name).folder), pack)
        return computed[name]

    return outputs


@pytest.fixture(scope="module")
def with_kernels(build_checkpoint):
    """name -> model_outputs with the kernels for every matmul and the one-token attention."""
    return model_outputs_fixture(build_checkpoint, pack=True)


@pytest.fixture(scope="module")
def xla_only(build_checkpoint):
    """name -> model_outputs of the same checkpoint loaded with pack=False: XLA for every matmul and attention."""
    return model_outputs_fixture(build_checkpoint, pack=False)


MODEL_SHAPES = ["tiny", "gpt2"]


@needs_kernels
def test_with_kernels_every_dtype_loads_packed(with_kernels):
    outputs = with_kernels("tiny")
    for dtype in DTYPES:
        assert outputs[f"{dtype}_use_kernels"], f"{dtype} weights loaded with pack=True should use the kernels"
        assert outputs[f"{dtype}_packed"], f"{dtype} weights should be packed where the kernels run"


def test_without_kernels_no_dtype_loads_packed_on_a_cpu(xla_only):
    """XLA's CPU dot gains nothing from tiles: int8 too is widened at load (test_loader checks the values)."""
    outputs = xla_only("tiny")
    for dtype in DTYPES:
        assert not outputs[f"{dtype}_use_kernels"]
        assert not outputs[f"{dtype}_packed"]


@needs_kernels
@pytest.mark.parametrize("name", MODEL_SHAPES)
def test_greedy_generate_with_kernels_equals_xla_alone(name, with_kernels, xla_only):
    np.testing.assert_array_equal(with_kernels(name)["float32_tokens"], xla_only(name)["float32_tokens"])


@needs_kernels
@pytest.mark.parametrize("name", MODEL_SHAPES)
def test_prefill_and_decode_logits_with_kernels_match_xla_alone(name, with_kernels, xla_only, assert_matches_transformers):
    ours_BSV, theirs_BSV = with_kernels(name)["float32_logits"], xla_only(name)["float32_logits"]
    assert_matches_transformers(ours_BSV, theirs_BSV, what="float32 logits vs XLA alone")


@needs_kernels
@pytest.mark.parametrize("name", MODEL_SHAPES)
@pytest.mark.parametrize("dtype", ["bfloat16", "int8"])
def test_narrow_weights_without_kernels_equal_narrow_weights_with_kernels(
    dtype, name, with_kernels, xla_only, assert_matches_transformers
):
    """Same rounded weights either way (tiles read by the kernel, or widened once at load for
    XLA's float32 dot): the kernel's math in another order, so the float32 parity bar holds."""
    ours_BSV, theirs_BSV = with_kernels(name)[f"{dtype}_logits"], xla_only(name)[f"{dtype}_logits"]
    assert_matches_transformers(ours_BSV, theirs_BSV, what=f"{dtype} logits")
    np.testing.assert_array_equal(with_kernels(name)[f"{dtype}_tokens"], xla_only(name)[f"{dtype}_tokens"])


# The kernel and XLA models differ in float32 summation order (~1e-7 relative, see above); over a
# bf16 cache, a key or value within that distance of a bf16 rounding midpoint rounds the other way
# in the other model, moving by a whole bf16 step (2^-8 relative): the float32 parity bar cannot
# hold. Measured on the std-0.1 gpt2 shape: max abs diff 0.021 (logits up to |15|), a twentieth of
# what the bf16 cache itself moves the logits (0.39, test_kvcache). The bound, 0.1, leaves 5x
# headroom and stays well below what a kernel reading the wrong slots or layer would do (the size
# of the bf16 cache's own error or more).
BF16_CACHE_PATH_BOUND = 0.1


@needs_kernels
@pytest.mark.parametrize("name", MODEL_SHAPES)
def test_bf16_cache_logits_with_kernels_match_xla_alone(name, with_kernels, xla_only):
    """The bf16 cache read by the bf16 decode kernel where it is registered (else by XLA in both models)."""
    ours_BSV, theirs_BSV = with_kernels(name)["float32_bf16_cache_logits"], xla_only(name)["float32_bf16_cache_logits"]
    diff = float(np.abs(ours_BSV - theirs_BSV).max())
    assert diff <= BF16_CACHE_PATH_BOUND, f"bf16-cache logits, kernels vs XLA: max abs diff {diff:.3g}"


@needs_kernels
@pytest.mark.parametrize("name", MODEL_SHAPES)
def test_prefill_and_decode_logits_with_kernels_match_transformers(
    name, build_checkpoint, with_kernels, assert_matches_transformers
):
    """Each row's real slots (past its left padding) against transformers running that row alone."""
    import checkpoints  # here, not at the top: the subprocesses import this module and need no torch

    checkpoint = build_checkpoint(name)
    prompts, continuation_BY = model_inputs(checkpoint.config.vocab_size)
    logits_BSV = with_kernels(name)["float32_logits"]
    for row, prompt in enumerate(prompts):
        alone_1T = np.concatenate([prompt, continuation_BY[row]])[None]
        start = max(PROMPT_LENGTHS) - len(prompt)
        reference_1TV = checkpoints.hf_logits(checkpoint.hf_model, alone_1T)
        assert_matches_transformers(logits_BSV[row : row + 1, start:], reference_1TV, what=f"row {row}")


# --- whole model: bf16 and int8 weights ----------------------------------------------------------


def rounded_float32_weights(weights, dtype):
    """The float32 (unpacked, XLA-only matmuls) model whose matrices hold exactly the values that
    weights packed as `dtype` stand for; the tied output projection becomes its own rounded copy,
    since packing rounds lm_head but the embedding gather keeps float32 wte."""

    def rounded(w_IO):
        return unpack_matrix(pack_matrix(np.asarray(w_IO), dtype))

    blocks = tuple(
        dataclasses.replace(
            w, qkv_w_DE=rounded(w.qkv_w_DE), attn_out_w_DD=rounded(w.attn_out_w_DD),
            fc_w_DF=rounded(w.fc_w_DF), proj_w_FD=rounded(w.proj_w_FD),
        )  # fmt: skip
        for w in weights.blocks
    )
    assert weights.lm_head_VD is None, "the shapes used here tie lm_head to wte"
    return dataclasses.replace(weights, blocks=blocks, lm_head_VD=rounded(weights.wte_VD.T).T)


@needs_kernels
@pytest.mark.parametrize("dtype", ["bfloat16", "int8"])
def test_narrow_weight_model_is_the_float32_model_on_rounded_weights(dtype, gpt2_shape, assert_matches_transformers):
    """All of the narrow models' error is the weight rounding: none is added by packing or the kernels."""
    ids_BT = gpt2_shape.random_ids(2, 64)
    narrow = load_weights(gpt2_shape.folder, dtype=dtype, pack=True)
    reference = rounded_float32_weights(load_weights(gpt2_shape.folder, pack=False), dtype)
    logits_BTV = gpt2_forward(ids_BT, narrow, gpt2_shape.config)
    assert_matches_transformers(logits_BTV, gpt2_forward(ids_BT, reference, gpt2_shape.config), what=f"{dtype} logits")


# Measured on the std 0.1 gpt2-shaped model, 2 x 64 tokens (logits up to |14|, std 2.8): max abs
# diff 0.48 (bf16) and 2.8 (int8), mean 0.049 and 0.22; argmax agrees at 94% and 82% of positions.
# The errors are the weight rounding (bf16: 8-bit mantissa, rms ~0.16% of |w|; int8: a step of
# max|w|/127 per column, rms ~0.7% of |w|), amplified through 12 random layers; the test above
# shows the kernels add nothing to them. The bounds leave ~2x headroom over the measurement.
NARROW_BOUNDS = {"bfloat16": dict(max=1.0, mean=0.1, argmax=0.85), "int8": dict(max=5.0, mean=0.5, argmax=0.7)}


@pytest.fixture(scope="module")
def narrow_logit_errors(gpt2_shape) -> dict[str, tuple[np.ndarray, float]]:
    """dtype -> |logits - float32 logits| on 2 x 64 tokens, and the argmax agreement."""
    ids_BT = gpt2_shape.random_ids(2, 64)
    float32_BTV = np.asarray(gpt2_forward(ids_BT, gpt2_shape.weights, gpt2_shape.config))
    errors = {}
    for dtype in NARROW_BOUNDS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # without kernels: widened at load, test_loader checks the warning
            weights = load_weights(gpt2_shape.folder, dtype=dtype)  # weight-only, with or without kernels
        logits_BTV = np.asarray(gpt2_forward(ids_BT, weights, gpt2_shape.config))
        errors[dtype] = (np.abs(logits_BTV - float32_BTV), float((logits_BTV.argmax(-1) == float32_BTV.argmax(-1)).mean()))
    return errors


@pytest.mark.parametrize("dtype", ["bfloat16", "int8"])
def test_narrow_weights_stay_near_float32_logits(dtype, narrow_logit_errors, capsys):
    diff_BTV, argmax_agreement = narrow_logit_errors[dtype]
    from checkpoints import check_rounding_error  # torch only where it is needed

    what = f"{dtype} weights vs float32 logits (gpt2 shape, std 0.1)"
    check_rounding_error(what, diff_BTV, argmax_agreement, NARROW_BOUNDS[dtype], capsys)


def test_int8_errs_more_than_bfloat16(narrow_logit_errors):
    """int8's step (max|w|/127) is ~4x bf16's rounding: a bf16 'int8' or an int8 'bf16' fails here."""
    bf16_BTV, _ = narrow_logit_errors["bfloat16"]
    int8_BTV, _ = narrow_logit_errors["int8"]
    assert int8_BTV.mean() > 2 * bf16_BTV.mean()
    assert int8_BTV.max() > bf16_BTV.max()


# --- the bf16 dot option (load_weights(..., bf16_dot=True)) --------------------------------------
#
# Kernel tolerance: against float64 math on x rounded to bfloat16 (nearest even, as ml_dtypes and
# vcvtne2ps2bf16 round) times the rounded weights, the same MATMUL_RTOL: each vdpbf16ps step adds two
# exact products (8-bit mantissas multiply exactly in float32) into a float32 sum, so only float32
# accumulation is measured. Rounding x wrongly (truncating it, say) errs by ~2^-9 of the sum, 40x more.

needs_bf16_dot = pytest.mark.skipif(
    not (KERNELS and native.has_bf16_dot()),
    reason="the bf16 dot path needs the kernels built with AVX512_BF16 (no avx512_bf16 in /proc/cpuinfo here)",
)
DOT_SHAPES = [(37, 63), (769, 200), (768, 64)]  # odd I: a last pair padded with zero; O short of whole tiles
DOT_ROWS = [16, 23, 49, 100]  # at the dot threshold, past the 6-row register block and the 48-row unit


def bf16_dot_matrix(w_IO: np.ndarray) -> PackedMatrix:
    return dataclasses.replace(pack_matrix(w_IO, jnp.bfloat16), dot=True)


@needs_bf16_dot
@pytest.mark.parametrize("M", DOT_ROWS)
@pytest.mark.parametrize(("I", "O"), DOT_SHAPES)
def test_bf16_dot_matmul_is_float64_math_on_bf16_rounded_activations(I, O, M):
    packed = bf16_dot_matrix(random_weight_IO(I, O))
    x_MI = random_x_MI(M, I)
    rounded_MI = x_MI.astype(ml_dtypes.bfloat16).astype(np.float32)
    exact_MO, magnitude_MO = exact_product(rounded_MI, packed)
    y_MO = packed_matmul(jnp.asarray(x_MI), packed, use_kernel=True)
    assert_within_accumulation_error(y_MO, exact_MO, magnitude_MO, f"bf16 dot M={M}")


@needs_bf16_dot
def test_bf16_dot_rounds_activation_ties_to_even():
    """1 + 2^-8 lies halfway between bf16's 1 and 1 + 2^-7 (rounds down, to even); -(1 + 3 2^-8)
    halfway between -(1 + 2^-7) and -(1 + 2^-6) (rounds to the latter): with unit weights each row
    sums 32 of each, exactly."""
    x_MI = np.tile(np.array([1 + 2**-8, -(1 + 3 * 2**-8)], np.float32), (16, 32))
    y_MO = np.asarray(packed_matmul(jnp.asarray(x_MI), bf16_dot_matrix(np.ones((64, 3), np.float32)), use_kernel=True))
    np.testing.assert_array_equal(y_MO, np.full((16, 3), 32 * (1 - (1 + 2**-6)), np.float32))


@needs_kernels
@pytest.mark.parametrize("M", [1, 7, 15])
def test_bf16_dot_below_the_gemm_threshold_is_the_exact_bf16_path(M):
    """Decode-sized matmuls keep the exact widening path, bit for bit (on any host with the kernels:
    the target exists in every build)."""
    assert M < native.dot_min_rows()
    packed = pack_matrix(random_weight_IO(769, 200), jnp.bfloat16)
    x_MI = jnp.asarray(random_x_MI(M, 769))
    dot_MO = packed_matmul(x_MI, dataclasses.replace(packed, dot=True), use_kernel=True)
    np.testing.assert_array_equal(np.asarray(dot_MO), np.asarray(packed_matmul(x_MI, packed, use_kernel=True)))


def test_bf16_dot_is_refused_for_other_weight_dtypes(tiny):
    for dtype in (jnp.float32, jnp.int8):
        with pytest.raises(ValueError, match="dtype=bfloat16"):
            load_weights(tiny.folder, dtype=dtype, bf16_dot=True)


def test_bf16_dot_is_refused_without_the_kernels(tiny):
    with pytest.raises(ValueError, match="CPU kernels"):
        load_weights(tiny.folder, dtype=jnp.bfloat16, pack=False, bf16_dot=True)


@needs_kernels
def test_bf16_dot_is_refused_where_the_kernels_lack_avx512_bf16(tiny, monkeypatch):
    """Not a silent exact path: on such a host (a Zen 3, an AVX2 Xeon) the option would mean nothing."""
    monkeypatch.setattr(native, "has_bf16_dot", lambda march="native": False)
    with pytest.raises(ValueError, match="AVX512_BF16"):
        load_weights(tiny.folder, dtype=jnp.bfloat16, bf16_dot=True)


@needs_kernels
def test_bf16_weights_without_the_option_are_the_exact_path(tiny):
    """Off by default: no matrix is marked, and the logits are those of bf16_dot=False, bit for bit."""
    default = load_weights(tiny.folder, dtype=jnp.bfloat16)
    explicit = load_weights(tiny.folder, dtype=jnp.bfloat16, bf16_dot=False)
    ids_BT = tiny.random_ids(2, 24)
    assert not default.bf16_dot
    assert not any(leaf.dot for leaf in jax.tree.leaves(default, is_leaf=lambda leaf: isinstance(leaf, PackedMatrix))
                   if isinstance(leaf, PackedMatrix))  # fmt: skip
    np.testing.assert_array_equal(gpt2_forward(ids_BT, default, tiny.config), gpt2_forward(ids_BT, explicit, tiny.config))


@needs_bf16_dot
def test_bf16_dot_model_at_batch_1_below_the_threshold_is_the_exact_bf16_model(gpt2_shape):
    """A prompt of fewer tokens than the dot threshold (and so every decode step at batch 1): every
    matmul takes the exact path, so the logits are the exact bf16 model's, bit for bit."""
    ids_BT = gpt2_shape.random_ids(1, native.dot_min_rows() - 1)
    dot = load_weights(gpt2_shape.folder, dtype=jnp.bfloat16, bf16_dot=True)
    exact = load_weights(gpt2_shape.folder, dtype=jnp.bfloat16)
    assert dot.bf16_dot
    np.testing.assert_array_equal(gpt2_forward(ids_BT, dot, gpt2_shape.config), gpt2_forward(ids_BT, exact, gpt2_shape.config))


@pytest.fixture(scope="module")
def bf16_dot_logit_errors(gpt2_shape) -> dict[str, tuple[np.ndarray, float]]:
    """"exact" (weight-only bf16) and "dot" (bf16_dot=True) -> |logits - float32 logits| on 2 x 64
    tokens (every matmul 128 rows: the dot path throughout), and the argmax agreement."""
    ids_BT = gpt2_shape.random_ids(2, 64)
    float32_BTV = np.asarray(gpt2_forward(ids_BT, gpt2_shape.weights, gpt2_shape.config))
    errors = {}
    for name, bf16_dot in [("exact", False), ("dot", True)]:
        weights = load_weights(gpt2_shape.folder, dtype=jnp.bfloat16, bf16_dot=bf16_dot)
        logits_BTV = np.asarray(gpt2_forward(ids_BT, weights, gpt2_shape.config))
        errors[name] = (np.abs(logits_BTV - float32_BTV), float((logits_BTV.argmax(-1) == float32_BTV.argmax(-1)).mean()))
    return errors


# Measured on the std 0.1 gpt2-shaped model, 2 x 64 tokens (logits up to |14|, std 2.8): max abs diff
# 0.63, mean 0.072 (2.6% of the logits' std), argmax agrees at 92% of positions; the exact bf16 path
# (weights alone rounded) errs by 0.48 / 0.049 / 94% (NARROW_BOUNDS), so rounding the activations as
# well, with the same 8-bit mantissa, multiplies the error by ~1.46, about the sqrt(2) of two
# independent roundings of one size. The bounds leave ~2x headroom over the measurement.
BF16_DOT_BOUNDS = dict(max=1.5, mean=0.15, argmax=0.8)


@needs_bf16_dot
def test_bf16_dot_stays_near_float32_logits(bf16_dot_logit_errors, capsys):
    diff_BTV, argmax_agreement = bf16_dot_logit_errors["dot"]
    from checkpoints import check_rounding_error  # torch only where it is needed

    what = "bf16 weights and activations (bf16_dot) vs float32 logits (gpt2 shape, std 0.1)"
    check_rounding_error(what, diff_BTV, argmax_agreement, BF16_DOT_BOUNDS, capsys)


@needs_bf16_dot
def test_bf16_dot_errs_like_a_second_bf16_rounding(bf16_dot_logit_errors):
    """Rounding the activations as well as the weights: more error than the weights alone, and
    about sqrt(2) times it (two independent roundings of one size), far from a broken product."""
    exact_BTV, _ = bf16_dot_logit_errors["exact"]
    dot_BTV, _ = bf16_dot_logit_errors["dot"]
    assert dot_BTV.mean() > exact_BTV.mean()
    assert dot_BTV.mean() < 2 * exact_BTV.mean()


# --- the int8 dot option (load_weights(..., int8_dot=True)) --------------------------------------
#
# Kernel tolerance: against float64 math on x quantized as the option defines it (per row and block
# of 256 inputs: scale = max|x| / 127 in float32, q = x * (127 / max|x|) rounded to nearest even)
# times the int8 weights, the same MATMUL_RTOL: the integer sums are exact, so only the float32
# scaling and the sum over blocks are measured. And against the float32 activations, within the
# quantization's own bound (half a step of each block times sum |w|).

needs_int8_dot = pytest.mark.skipif(
    not (KERNELS and native.has_int8_dot()),
    reason="the int8 dot path needs the kernels built with AVX512_VNNI (no avx512_vnni in /proc/cpuinfo here)",
)
INT8_DOT_SHAPES = [(37, 63), (257, 130), (769, 200)]  # I across the 256-input blocks, not a multiple of 4
QUANT_BLOCK = 256


def int8_dot_matrix(w_IO: np.ndarray) -> PackedMatrix:
    return dataclasses.replace(pack_matrix(w_IO, jnp.int8), dot=True)


def quantized_activations(x_MI: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(q_MI, step_MI): x quantized per row and 256-input block as the option defines it, and each
    input's block scale (max|x| / 127), both in float32 arithmetic like the kernel's."""
    M, I = x_MI.shape
    q_MI, step_MI = np.zeros((M, I), np.float64), np.zeros((M, I), np.float64)
    for first in range(0, I, QUANT_BLOCK):
        block_MK = x_MI[:, first : first + QUANT_BLOCK]
        max_M1 = np.abs(block_MK).max(axis=1, keepdims=True).astype(np.float32)
        with np.errstate(divide="ignore"):
            inverse_M1 = np.where(max_M1 > 0, np.float32(127) / max_M1, np.float32(0)).astype(np.float32)
        q_MI[:, first : first + QUANT_BLOCK] = np.rint(block_MK * inverse_M1)  # float32 product, then nearest even
        step_MI[:, first : first + QUANT_BLOCK] = max_M1 / np.float32(127)
    return q_MI, step_MI


@needs_int8_dot
@pytest.mark.parametrize("M", DOT_ROWS)
@pytest.mark.parametrize(("I", "O"), INT8_DOT_SHAPES)
def test_int8_dot_matmul_is_float64_math_on_int8_quantized_activations(I, O, M):
    packed = int8_dot_matrix(random_weight_IO(I, O))
    x_MI = random_x_MI(M, I)
    x_MI[0, 0] = 40.0  # an outlier: only its own block's step grows
    q_MI, step_MI = quantized_activations(x_MI)
    exact_MO, magnitude_MO = exact_product(q_MI * step_MI, packed)
    y_MO = packed_matmul(jnp.asarray(x_MI), packed, use_kernel=True)
    assert_within_accumulation_error(y_MO, exact_MO, magnitude_MO, f"int8 dot M={M}")
    float_MO, float_magnitude_MO = exact_product(x_MI, packed)
    bound_MO = 0.5 * step_MI @ np.abs(np.asarray(unpack_matrix(packed), np.float64)) + MATMUL_RTOL * float_magnitude_MO
    assert (np.abs(np.asarray(y_MO, np.float64) - float_MO) <= bound_MO).all(), "past the quantization bound"


@needs_int8_dot
def test_int8_dot_rows_do_not_depend_on_their_neighbours():
    """Each row is quantized alone and summed exactly: from the dot threshold on, a row's result is
    the same among any other rows, bit for bit."""
    packed = int8_dot_matrix(random_weight_IO(300, 130))
    x_MI = random_x_MI(40, 300)
    alone_MO = np.asarray(packed_matmul(jnp.asarray(x_MI[:16]), packed, use_kernel=True))
    among_MO = np.asarray(packed_matmul(jnp.asarray(x_MI), packed, use_kernel=True))
    np.testing.assert_array_equal(among_MO[:16], alone_MO)


@needs_kernels
@pytest.mark.parametrize("M", [1, 7, 15])
def test_int8_dot_below_the_gemm_threshold_is_the_exact_int8_path(M):
    assert M < native.dot_min_rows()
    packed = pack_matrix(random_weight_IO(769, 200), jnp.int8)
    x_MI = jnp.asarray(random_x_MI(M, 769))
    dot_MO = packed_matmul(x_MI, dataclasses.replace(packed, dot=True), use_kernel=True)
    np.testing.assert_array_equal(np.asarray(dot_MO), np.asarray(packed_matmul(x_MI, packed, use_kernel=True)))


def test_int8_dot_is_refused_for_other_weight_dtypes(tiny):
    for dtype in (jnp.float32, jnp.bfloat16):
        with pytest.raises(ValueError, match="dtype=int8"):
            load_weights(tiny.folder, dtype=dtype, int8_dot=True)


def test_int8_dot_is_refused_without_the_kernels(tiny):
    with pytest.raises(ValueError, match="CPU kernels"):
        load_weights(tiny.folder, dtype=jnp.int8, pack=False, int8_dot=True)


@needs_kernels
def test_int8_dot_is_refused_where_the_kernels_lack_avx512_vnni(tiny, monkeypatch):
    """Not a silent exact path: on an AVX2 build or a CPU without VNNI the option would mean nothing."""
    monkeypatch.setattr(native, "has_int8_dot", lambda march="native": False)
    with pytest.raises(ValueError, match="AVX512_VNNI"):
        load_weights(tiny.folder, dtype=jnp.int8, int8_dot=True)


@needs_kernels
def test_int8_weights_without_the_option_are_the_exact_path(tiny):
    default = load_weights(tiny.folder, dtype=jnp.int8)
    explicit = load_weights(tiny.folder, dtype=jnp.int8, int8_dot=False)
    ids_BT = tiny.random_ids(2, 24)
    assert not default.int8_dot
    assert not default.bf16_dot
    np.testing.assert_array_equal(gpt2_forward(ids_BT, default, tiny.config), gpt2_forward(ids_BT, explicit, tiny.config))


@needs_int8_dot
def test_int8_dot_model_at_batch_1_below_the_threshold_is_the_exact_int8_model(gpt2_shape):
    ids_BT = gpt2_shape.random_ids(1, native.dot_min_rows() - 1)
    dot = load_weights(gpt2_shape.folder, dtype=jnp.int8, int8_dot=True)
    exact = load_weights(gpt2_shape.folder, dtype=jnp.int8)
    assert dot.int8_dot
    assert not dot.bf16_dot
    np.testing.assert_array_equal(gpt2_forward(ids_BT, dot, gpt2_shape.config), gpt2_forward(ids_BT, exact, gpt2_shape.config))


@needs_int8_dot
def test_int8_dot_model_rows_do_not_depend_on_the_batch(gpt2_shape):
    """A prompt's logits alone and beside another prompt (every matmul past the threshold both ways)."""
    ids_BT = gpt2_shape.random_ids(2, 32)
    dot = load_weights(gpt2_shape.folder, dtype=jnp.int8, int8_dot=True)
    pair_BTV = np.asarray(gpt2_forward(ids_BT, dot, gpt2_shape.config))
    alone_BTV = np.asarray(gpt2_forward(ids_BT[1:], dot, gpt2_shape.config))
    np.testing.assert_array_equal(pair_BTV[1:], alone_BTV)


@pytest.fixture(scope="module")
def int8_dot_logit_errors(gpt2_shape) -> dict[str, tuple[np.ndarray, float]]:
    """"exact" (weight-only int8) and "dot" (int8_dot=True) -> |logits - float32 logits| on 2 x 64 tokens."""
    ids_BT = gpt2_shape.random_ids(2, 64)
    float32_BTV = np.asarray(gpt2_forward(ids_BT, gpt2_shape.weights, gpt2_shape.config))
    errors = {}
    for name, int8_dot in [("exact", False), ("dot", True)]:
        weights = load_weights(gpt2_shape.folder, dtype=jnp.int8, int8_dot=int8_dot)
        logits_BTV = np.asarray(gpt2_forward(ids_BT, weights, gpt2_shape.config))
        errors[name] = (np.abs(logits_BTV - float32_BTV), float((logits_BTV.argmax(-1) == float32_BTV.argmax(-1)).mean()))
    return errors


# Measured on the std 0.1 gpt2-shaped model, 2 x 64 tokens (2026-12-07, Xeon with AVX512_VNNI): max
# abs diff 2.92, mean 0.295, argmax agrees at 74% of positions, against 2.8 / 0.22 / 82% for the
# exact int8 path (weights alone quantized, NARROW_BOUNDS): quantizing the activations too, with
# 127 steps per 256-input block, multiplies the mean error by ~1.35. The bounds leave ~2x headroom.
INT8_DOT_BOUNDS = dict(max=6.0, mean=0.6, argmax=0.6)


@needs_int8_dot
def test_int8_dot_stays_near_float32_logits(int8_dot_logit_errors, capsys):
    diff_BTV, argmax_agreement = int8_dot_logit_errors["dot"]
    from checkpoints import check_rounding_error  # torch only where it is needed

    what = "int8 weights and activations (int8_dot) vs float32 logits (gpt2 shape, std 0.1)"
    check_rounding_error(what, diff_BTV, argmax_agreement, INT8_DOT_BOUNDS, capsys)


@needs_int8_dot
def test_int8_dot_errs_like_a_second_int8_rounding(int8_dot_logit_errors):
    """Quantizing the activations as well as the weights: more error than the weights alone, and
    less than twice it (two roundings of about one size), far from a broken product."""
    exact_BTV, _ = int8_dot_logit_errors["exact"]
    dot_BTV, _ = int8_dot_logit_errors["dot"]
    assert dot_BTV.mean() > exact_BTV.mean()
    assert dot_BTV.mean() < 2 * exact_BTV.mean()


# --- build cache, thread pool, switches ----------------------------------------------------------


@needs_kernels
def test_a_fresh_cache_dir_builds_the_library_once(tmp_path):
    cache = tmp_path / "cache"
    first, _ = run_in_subprocess("kernel_probe", "", tmp_path / "first.npz", JAX_GPT2_CACHE_DIR=str(cache))
    libraries = sorted((cache / "kernels").glob("kernels-native-*.so"))
    assert first["kernels_available"]
    assert len(libraries) == 1
    built_at = libraries[0].stat().st_mtime_ns
    second, _ = run_in_subprocess("kernel_probe", "", tmp_path / "second.npz", JAX_GPT2_CACHE_DIR=str(cache))
    assert second["kernels_available"]
    assert sorted((cache / "kernels").glob("kernels-native-*.so")) == libraries
    assert libraries[0].stat().st_mtime_ns == built_at, "the second process rebuilt instead of loading"


POOL_SETTINGS = {
    "1 thread": dict(JAX_GPT2_KERNEL_THREADS="1"),
    "3 threads": dict(JAX_GPT2_KERNEL_THREADS="3"),  # more threads than this machine's 2 cores
    "1 chunk per thread": dict(JAX_GPT2_KERNEL_CHUNKS="1"),  # long runs of tiles per thread
    "single tiles": dict(JAX_GPT2_KERNEL_CHUNKS="100000"),
}


@needs_kernels
@pytest.mark.parametrize("setting", list(POOL_SETTINGS))
def test_kernel_results_do_not_depend_on_how_the_pool_splits_the_work(setting, tmp_path):
    """Each output tile (and each attention head) is computed by one thread, in one order: bit-identical."""
    here = kernel_probe("")
    there, _ = run_in_subprocess("kernel_probe", "", tmp_path / "probe.npz", **POOL_SETTINGS[setting])
    assert there["kernels_available"]
    for key in [*DTYPES, "attention"]:
        np.testing.assert_array_equal(there[key], here[key], err_msg=key)


def test_native_zero_turns_the_kernels_off(tmp_path):
    there, _ = run_in_subprocess("kernel_probe", "", tmp_path / "probe.npz", JAX_GPT2_NATIVE="0")
    assert not there["kernels_available"]


def test_native_zero_makes_a_default_load_choose_xla(tiny, tmp_path):
    """The user's switch is read once, at load, and lands in the weights."""
    there, _ = run_in_subprocess("load_probe", str(tiny.folder), tmp_path / "probe.npz", JAX_GPT2_NATIVE="0")
    assert not there["use_kernels"]
    assert bool(load_probe(str(tiny.folder))["use_kernels"]) == KERNELS  # this process: kernels wherever they run


@needs_kernels  # elsewhere nothing is built, so nothing can fail
def test_a_failed_build_falls_back_to_xla_with_a_warning(tmp_path):
    """A compiler that fails (here `false`) leaves no library behind, warns, and turns the kernels off."""
    cache = tmp_path / "cache"
    env = dict(JAX_GPT2_CACHE_DIR=str(cache), CXX="false", JAX_GPT2_NATIVE="1")
    there, stderr = run_in_subprocess("kernel_probe", "", tmp_path / "probe.npz", **env)
    assert not there["kernels_available"]
    assert "CPU kernels unavailable, using XLA's dot" in stderr
    assert list(cache.rglob("*.so")) == [], "a failed build must not leave a (partial) library to load"


# --- errors --------------------------------------------------------------------------------------


def test_pack_true_where_the_kernels_cannot_run_is_a_value_error(tiny, monkeypatch):
    from jax_gpt2 import kernels

    monkeypatch.setattr(kernels, "kernels_available", lambda: False)
    with pytest.raises(ValueError, match="pack=True asks for the CPU kernels"):
        load_weights(tiny.folder, pack=True)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.float64, jnp.int4])
def test_unsupported_dtype_is_a_value_error(dtype, tiny):
    with pytest.raises(ValueError, match="dtype must be one of"):
        load_weights(tiny.folder, dtype=dtype)


# --- the GEMM path (many rows) and batch invariance -----------------------------------------------


@needs_kernels
@pytest.mark.parametrize("name", MODEL_SHAPES)
def test_a_long_prompt_through_the_gemm_path_matches_transformers(name, build_checkpoint, assert_matches_transformers):
    """One 30-token row: every matmul has 30 rows, past every build's GEMM threshold (16 at most)."""
    import checkpoints

    checkpoint = build_checkpoint(name)
    weights = load_weights(str(checkpoint.folder), pack=True)
    ids_1T = checkpoint.random_ids(1, 30, seed=3)
    reference_1TV = checkpoints.hf_logits(checkpoint.hf_model, ids_1T)
    assert_matches_transformers(np.asarray(gpt2_forward(ids_1T, weights, checkpoint.config)), reference_1TV)


def logits_in_batches(weights, config, row_T: np.ndarray, batches: list[int], seed: int) -> dict[int, np.ndarray]:
    """batch size -> the logits of row_T placed at a random row among random neighbours (B = 1: alone)."""
    rng = np.random.default_rng(seed)
    logits = {}
    for B in batches:
        ids_BT = rng.integers(0, config.vocab_size, (B, len(row_T)))
        at = int(rng.integers(0, B))
        ids_BT[at] = row_T
        logits[B] = np.asarray(gpt2_forward(ids_BT, weights, config))[at]
    return logits


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
def test_a_rows_logits_do_not_depend_on_the_rows_beside_it(dtype, tiny):
    """Batch invariance, bit for bit: a 9-token row alone (9-row matmuls, the matvec path) and among
    1 to 4 random neighbours (18 to 45 rows, the GEMM path) gives the same logits."""
    weights = load_weights(str(tiny.folder), dtype=dtype, pack=True)
    row_T = tiny.random_ids(1, 9, seed=5)[0]
    logits = logits_in_batches(weights, tiny.config, row_T, [1, 2, 3, 4, 5], seed=6)
    for B in (2, 3, 4, 5):
        np.testing.assert_array_equal(logits[B], logits[1], err_msg=f"{dtype}: the row among {B} rows")


@needs_kernels
def test_a_gpt2_shape_rows_logits_do_not_depend_on_the_rows_beside_it(gpt2_shape):
    """The same at gpt2's shape (768 features, a panel boundary inside each 3072-row matrix), float32."""
    weights = load_weights(str(gpt2_shape.folder), pack=True)
    row_T = gpt2_shape.random_ids(1, 9, seed=5)[0]
    logits = logits_in_batches(weights, gpt2_shape.config, row_T, [1, 3], seed=7)
    np.testing.assert_array_equal(logits[3], logits[1], err_msg="the row among 3 rows")
