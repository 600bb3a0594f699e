"""Every build of the CPU kernels this host can run computes what float64 math and XLA compute.

One source (kernels/core.cc) compiles to a different vector unit per `-march`: the host's own build
(`native`: AVX-512 here), and on x86-64 also the AVX2+FMA build (`x86-64-v3`, the Zen 3 / Haswell
class) and the SSE2-only build (`x86-64`), which an AVX-512 CPU runs as well. Each build is loaded
into this one process and registered under its own target names (`native.target_name(kernel,
march)`; XLA refuses a second handler under a name already taken), and called directly through
jax.ffi, so every build meets the same inputs and the same references. A build the CPU cannot run
is skipped, with the reason.

The packed layout is written out here in numpy (`pack_tiles`) rather than taken from packed.py:
the kernels' contract is the layout, so the test states it independently. Tolerances are those of
tests/test_native.py, argued in its docstring: MATMUL_RTOL of sum |x||w| (float32 accumulation
only, over the rounded weights), ATTENTION_RTOL of max |v| (both sides are convex mixtures of the
visible v rows).
"""

import platform
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from decode_cases import decode_rows

from jax_gpt2 import layers
from jax_gpt2.kernels import native
from jax_gpt2.layers import cached_attention

MATMUL_RTOL = 1e-5
ATTENTION_RTOL = 1e-5
TILE = 64
X86 = platform.machine() in ("x86_64", "AMD64")
# march -> the ISA its build reports. "native" depends on the host; see test_native_build_targets_this_cpu.
BUILDS = {"native": None, "x86-64-v3": "avx2", "x86-64": "generic"} if X86 else {"native": None}


def cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux lists them ('avx512f', 'avx2', 'fma', 'asimd', ...)."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        return set()
    for line in cpuinfo.read_text().splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


def expected_native_isa() -> str:
    flags = cpu_flags()
    if not X86:
        return "neon"
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
        return "avx512"
    return "avx2" if {"avx2", "fma"} <= flags else "generic"


@pytest.fixture(params=list(BUILDS), scope="module")
def march(request) -> str:
    if not native.kernels_available(request.param):
        pytest.skip(f"the {request.param} build of the kernels cannot run here (no compiler, CPU or backend)")
    return request.param


# --- inputs and references -----------------------------------------------------------------------


def random_weight_IO(I: int, O: int, seed: int = 0) -> np.ndarray:
    """Columns of very different magnitudes (so int8 scales differ), column 0 all zero when O > 1."""
    rng = np.random.default_rng(seed)
    w_IO = rng.normal(size=(I, O)) * np.exp(rng.normal(size=(1, O)))
    if O > 1:
        w_IO[:, 0] = 0.0
    return w_IO.astype(np.float32)


def pack_tiles(w_IO: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """(tiles_GIC, scale_GC or None, the float32 (I, O) values they stand for): columns padded with
    zeros to G = ceil(O / 64) tiles of 64; int8 with one scale per column, max |w| / 127."""
    I, O = w_IO.shape
    G = -(-O // TILE)
    padded_IQ = np.zeros((I, G * TILE), np.float32)
    padded_IQ[:, :O] = w_IO
    scale_Q = None
    if dtype == "bfloat16":
        padded_IQ = padded_IQ.astype(ml_dtypes.bfloat16)
    if dtype == "int8":
        scale_Q = np.abs(padded_IQ).max(axis=0) / 127.0
        scale_Q[scale_Q == 0] = 1.0
        padded_IQ = np.clip(np.rint(padded_IQ / scale_Q), -127, 127).astype(np.int8)
    rounded_IQ = padded_IQ.astype(np.float32) * (1.0 if scale_Q is None else scale_Q)
    tiles_GIC = np.ascontiguousarray(padded_IQ.reshape(I, G, TILE).transpose(1, 0, 2))
    scale_GC = None if scale_Q is None else scale_Q.reshape(G, TILE).astype(np.float32)
    return tiles_GIC, scale_GC, rounded_IQ[:, :O]


def kernel_matmul(x_MI: np.ndarray, tiles_GIC: np.ndarray, scale_GC, O: int, dtype: str, march: str) -> np.ndarray:
    result = jax.ShapeDtypeStruct((x_MI.shape[0], O), jnp.float32)
    call = jax.ffi.ffi_call(native.target_name(dtype, march), result, vmap_method="sequential")
    none = np.zeros((0,), np.float32)  # no bias, no residual
    scales = () if scale_GC is None else (scale_GC,)
    operands = (x_MI, tiles_GIC, *scales, none, none)
    return np.asarray(call(*map(jnp.asarray, operands), gelu=False))


def assert_within_accumulation_error(actual_MO, reference_MO, x_MI, rounded_IO, what: str) -> None:
    magnitude_MO = np.abs(x_MI.astype(np.float64)) @ np.abs(rounded_IO.astype(np.float64))
    actual_MO = np.asarray(actual_MO, np.float64)
    assert actual_MO.shape == reference_MO.shape, f"{what}: shape {actual_MO.shape} != {reference_MO.shape}"
    assert np.isfinite(actual_MO).all(), f"{what}: not finite"
    error_MO = np.abs(actual_MO - reference_MO)
    worst = float((error_MO / np.maximum(magnitude_MO, np.finfo(np.float64).tiny)).max())
    assert (error_MO <= MATMUL_RTOL * magnitude_MO).all(), f"{what}: error {worst:.3g} x sum|x||w| > {MATMUL_RTOL}"


# --- packed matmul -------------------------------------------------------------------------------

MATMUL_SHAPES = [(I, O) for I in (1, 37, 768) for O in (1, 63, 64, 65, 200)]
ROWS = [1, 2, 3, 5, 6, 7, 13, 17, 49]  # around every row block (2, 3, 6 rows), the GEMM from 16 rows, its 48-row blocks
DTYPES = ["float32", "bfloat16", "int8"]


@pytest.mark.parametrize(("I", "O"), MATMUL_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_build_multiplies_like_float64_math_on_the_rounded_weights(march, dtype, I, O):
    tiles_GIC, scale_GC, rounded_IO = pack_tiles(random_weight_IO(I, O), dtype)
    for M in ROWS:
        x_MI = np.random.default_rng(M).normal(size=(M, I)).astype(np.float32)
        y_MO = kernel_matmul(x_MI, tiles_GIC, scale_GC, O, dtype, march)
        exact_MO = x_MI.astype(np.float64) @ rounded_IO.astype(np.float64)
        assert_within_accumulation_error(y_MO, exact_MO, x_MI, rounded_IO, f"{march} {dtype} M={M}")
        if O > 1:
            assert (y_MO[:, 0] == 0).all(), "an all-zero weight column must give exactly zero"


@pytest.mark.parametrize(("I", "O"), [(37, 65), (768, 200)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_build_multiplies_like_xla(march, dtype, I, O):
    tiles_GIC, scale_GC, rounded_IO = pack_tiles(random_weight_IO(I, O), dtype)
    x_MI = np.random.default_rng(3).normal(size=(13, I)).astype(np.float32)
    xla_MO = np.asarray(jnp.dot(x_MI, rounded_IO, precision=jax.lax.Precision.HIGHEST), np.float64)
    y_MO = kernel_matmul(x_MI, tiles_GIC, scale_GC, O, dtype, march)
    assert_within_accumulation_error(y_MO, xla_MO, x_MI, rounded_IO, f"{march} {dtype} vs XLA")


@pytest.mark.parametrize("dtype", DTYPES)
def test_no_build_lets_the_padding_columns_reach_the_output(march, dtype):
    """Garbage past column O (and huge int8 scales there) must not change the O columns by a bit."""
    I, O = 37, 65
    tiles_GIC, scale_GC, _ = pack_tiles(random_weight_IO(I, O), dtype)
    x_MI = np.random.default_rng(4).normal(size=(7, I)).astype(np.float32)
    clean_MO = kernel_matmul(x_MI, tiles_GIC, scale_GC, O, dtype, march)
    dirty_GIC = tiles_GIC.copy()
    dirty_GIC[-1, :, O % TILE :] = 99
    dirty_scale_GC = None
    if scale_GC is not None:
        dirty_scale_GC = scale_GC.copy()
        dirty_scale_GC[-1, O % TILE :] = 1e6
    np.testing.assert_array_equal(kernel_matmul(x_MI, dirty_GIC, dirty_scale_GC, O, dtype, march), clean_MO)


def test_builds_for_different_vector_units_agree_closely():
    """The same product from every build: each within float32 accumulation error of the others."""
    tiles_GIC, scale_GC, rounded_IO = pack_tiles(random_weight_IO(768, 200), "bfloat16")
    x_MI = np.random.default_rng(5).normal(size=(7, 768)).astype(np.float32)
    builds = [march for march in BUILDS if native.kernels_available(march)]
    assert "native" in builds or not native.kernels_available(), "the host's own build must load"
    results = {march: kernel_matmul(x_MI, tiles_GIC, scale_GC, 200, "bfloat16", march) for march in builds}
    for march, y_MO in results.items():
        for other in builds:
            assert_within_accumulation_error(y_MO, results[other].astype(np.float64), x_MI, rounded_IO, f"{march} vs {other}")


# --- decode attention, float32 and bfloat16 caches -------------------------------------------------


def attention_inputs(L: int, B: int, N: int, S: int, H: int, cache_dtype: str, seed: int = 0):
    """q_BNH float32 and caches k_LBNSH, v_LBNSH of `cache_dtype` (bfloat16 rounded from normal draws)."""
    rng = np.random.default_rng(seed)
    q_BNH = rng.normal(size=(B, N, H)).astype(np.float32)
    dtype = ml_dtypes.bfloat16 if cache_dtype == "bfloat16" else np.float32
    k_LBNSH = rng.normal(size=(L, B, N, S, H)).astype(dtype)
    v_LBNSH = rng.normal(size=(L, B, N, S, H)).astype(dtype)
    return q_BNH, k_LBNSH, v_LBNSH


def kernel_attention(q_BNH, k_LBNSH, v_LBNSH, start_B, end_B, layer: int, scale: float, march: str) -> np.ndarray:
    bf16 = k_LBNSH.dtype == ml_dtypes.bfloat16
    kernel = "attention_bf16" if bf16 else "attention"
    if bf16:  # the kernel takes a bfloat16 cache as its bits, as the model stores it (kvcache.py)
        k_LBNSH, v_LBNSH = k_LBNSH.view(np.uint16), v_LBNSH.view(np.uint16)
    result = jax.ShapeDtypeStruct(q_BNH.shape, jnp.float32)
    call = jax.ffi.ffi_call(native.target_name(kernel, march), result, vmap_method="sequential")
    operands = map(jnp.asarray, (q_BNH, k_LBNSH, v_LBNSH, start_B, end_B))
    return np.asarray(call(*operands, layer=np.int64(layer), scale=np.float32(scale)))


def exact_attention(q_BNH, k_LBNSH, v_LBNSH, start_B, end_B, layer: int, scale: float) -> np.ndarray:
    """float64 softmax over the visible slots; a row with none: all S slots, scores alike (XLA's answer)."""
    q_BNH, k_BNSH, v_BNSH = (np.asarray(a, np.float64) for a in (q_BNH, k_LBNSH[layer], v_LBNSH[layer]))
    S = k_BNSH.shape[2]
    slots_S = np.arange(S)
    visible_BS = (slots_S >= start_B[:, None]) & (slots_S <= end_B[:, None])
    scores_BNS = np.einsum("BNH,BNSH->BNS", q_BNH, k_BNSH) * scale
    none_B = ~visible_BS.any(axis=1)
    scores_BNS[none_B] = 0.0
    visible_BS[none_B] = True
    scores_BNS = np.where(visible_BS[:, None, :], scores_BNS, -np.inf)
    weights_BNS = np.exp(scores_BNS - scores_BNS.max(axis=-1, keepdims=True))
    weights_BNS /= weights_BNS.sum(axis=-1, keepdims=True)
    return np.einsum("BNS,BNSH->BNH", weights_BNS, v_BNSH)


def xla_attention(q_BNH, k_LBNSH, v_LBNSH, start_B, end_B, layer: int, scale: float) -> np.ndarray:
    """The model's own masked attention (layers.cached_attention) over the caches widened to float32."""
    slots_S = np.arange(k_LBNSH.shape[3])
    mask_BTS = jnp.asarray(((slots_S >= start_B[:, None]) & (slots_S <= end_B[:, None]))[:, None, :])
    k_BNSH, v_BNSH = (jnp.asarray(np.asarray(cache[layer], np.float32)) for cache in (k_LBNSH, v_LBNSH))
    out_BTNH = cached_attention(jnp.asarray(q_BNH)[:, None], k_BNSH, v_BNSH, mask_BTS, scale)
    return np.asarray(out_BTNH)[:, 0]


def assert_attention_close(actual_BNH, reference_BNH, v_LBNSH, what: str) -> None:
    assert actual_BNH.shape == reference_BNH.shape
    assert np.isfinite(actual_BNH).all(), f"{what}: not finite"
    tolerance = ATTENTION_RTOL * float(np.abs(np.asarray(v_LBNSH, np.float32)).max())
    diff = float(np.abs(actual_BNH - reference_BNH).max())
    assert diff <= tolerance, f"{what}: max abs diff {diff:.3g} > {tolerance:.3g}"


@pytest.mark.parametrize("S", [1, 37, 1030])
@pytest.mark.parametrize("H", [7, 16, 24, 64])
@pytest.mark.parametrize("cache_dtype", ["float32", "bfloat16"])
def test_every_build_attends_like_float64_math_and_xla(march, cache_dtype, H, S):
    """Every row case of decode_rows, every layer of a 3-layer cache, two scales."""
    start_B, end_B = decode_rows(S)
    q_BNH, k_LBNSH, v_LBNSH = attention_inputs(3, len(start_B), 2, S, H, cache_dtype)
    for layer in range(3):
        for scale in (H**-0.5, 2.0):
            out_BNH = kernel_attention(q_BNH, k_LBNSH, v_LBNSH, start_B, end_B, layer, scale, march)
            what = f"{march} {cache_dtype} layer {layer} scale {scale:.3g}"
            exact_BNH = exact_attention(q_BNH, k_LBNSH, v_LBNSH, start_B, end_B, layer, scale)
            assert_attention_close(out_BNH, exact_BNH, v_LBNSH, f"{what} vs float64")
            xla_BNH = xla_attention(q_BNH, k_LBNSH, v_LBNSH, start_B, end_B, layer, scale)
            assert_attention_close(out_BNH, xla_BNH, v_LBNSH, f"{what} vs XLA")


@pytest.mark.parametrize("cache_dtype", ["float32", "bfloat16"])
def test_every_build_reads_only_its_layer_and_the_visible_slots(march, cache_dtype):
    """NaN in the other layers and in the slots each row may not see: the output does not change by a bit."""
    L, B, N, S, H = 3, 2, 2, 40, 64
    q_BNH, k_LBNSH, v_LBNSH = attention_inputs(L, B, N, S, H, cache_dtype)
    start_B, end_B = np.array([3, 0], np.int32), np.array([20, 39], np.int32)
    clean_BNH = kernel_attention(q_BNH, k_LBNSH, v_LBNSH, start_B, end_B, 1, 0.3, march)
    slots_S = np.arange(S)
    hidden_BNS = np.broadcast_to(((slots_S < start_B[:, None]) | (slots_S > end_B[:, None]))[:, None], (B, N, S))

    def poisoned(cache_LBNSH: np.ndarray) -> np.ndarray:
        cache_LBNSH = cache_LBNSH.copy()
        cache_LBNSH[[0, 2]] = np.nan
        cache_LBNSH[1][hidden_BNS] = np.nan
        return cache_LBNSH

    poisoned_BNH = kernel_attention(q_BNH, poisoned(k_LBNSH), poisoned(v_LBNSH), start_B, end_B, 1, 0.3, march)
    np.testing.assert_array_equal(poisoned_BNH, clean_BNH)


def test_bfloat16_cache_attention_is_float32_attention_over_the_rounded_cache(march):
    """The bf16 kernel widens exactly: over a float32 cache holding the same (bf16-representable)
    values, the float32 kernel gives the same numbers, to float32 summation order."""
    start_B, end_B = decode_rows(37)
    q_BNH, k_LBNSH, v_LBNSH = attention_inputs(2, len(start_B), 3, 37, 64, "bfloat16")
    narrow_BNH = kernel_attention(q_BNH, k_LBNSH, v_LBNSH, start_B, end_B, 1, 0.125, march)
    wide = (np.asarray(cache, np.float32) for cache in (k_LBNSH, v_LBNSH))
    wide_BNH = kernel_attention(q_BNH, *wide, start_B, end_B, 1, 0.125, march)
    assert_attention_close(narrow_BNH, wide_BNH, v_LBNSH, f"{march} bf16 vs f32 cache")


def test_the_bfloat16_attention_target_rejects_a_float32_cache(march):
    q_BNH, k_LBNSH, v_LBNSH = attention_inputs(1, 1, 2, 8, 16, "float32")
    result = jax.ShapeDtypeStruct(q_BNH.shape, jnp.float32)
    call = jax.ffi.ffi_call(native.target_name("attention_bf16", march), result, vmap_method="sequential")
    start_B, end_B = jnp.zeros((1,), jnp.int32), jnp.full((1,), 7, jnp.int32)
    with pytest.raises(Exception, match="(?i)type|dtype"):
        np.asarray(call(q_BNH, k_LBNSH, v_LBNSH, start_B, end_B, layer=np.int64(0), scale=np.float32(0.25)))


# --- log-sum-exp of rows -------------------------------------------------------------------------

LSE_WIDTHS = [1, 15, 16, 17, 1000, 2049, 50257]  # around every vector width and the 512-2048-value summing block


def kernel_logsumexp(x_MV: np.ndarray, march: str) -> np.ndarray:
    result = jax.ShapeDtypeStruct((x_MV.shape[0],), jnp.float32)
    call = jax.ffi.ffi_call(native.target_name("logsumexp_rows", march), result, vmap_method="sequential")
    return np.asarray(call(jnp.asarray(x_MV)))


def float64_logsumexp(x_MV: np.ndarray) -> np.ndarray:
    high_M = x_MV.max(axis=1)
    return high_M + np.log(np.exp(x_MV - high_M[:, None]).sum(axis=1))


@pytest.mark.parametrize("V", LSE_WIDTHS)
def test_every_build_takes_the_log_sum_exp_of_rows_like_float64_math(march, V):
    """Within the float32 rounding of the result (2^-22 of it) plus 2e-6 for the float32 sums of e^x;
    XLA's logsumexp keeps the same bound. Logit-sized values (std 10), so most terms underflow."""
    x_MV = (np.random.default_rng(V).normal(size=(5, V)) * 10).astype(np.float32)
    x_MV[1, -1] = 80.0  # the largest value last in one row, first in another: no vector left out
    x_MV[2, 0] = 80.0
    exact_M = float64_logsumexp(x_MV.astype(np.float64))
    bound_M = 2e-6 + np.abs(exact_M) * 2.0**-22
    for name, lse_M in [(march, kernel_logsumexp(x_MV, march)), ("xla", np.asarray(jax.nn.logsumexp(x_MV, axis=-1)))]:
        assert lse_M.dtype == np.float32
        assert (np.abs(lse_M - exact_M) <= bound_M).all(), f"{name} V={V}: error {np.abs(lse_M - exact_M).max():.3g}"


def test_every_build_gives_xlas_log_sum_exp_of_special_rows(march):
    inf = np.inf
    x_MV = np.full((5, 40), -1.0, np.float32)
    x_MV[0, 39] = np.nan
    x_MV[1, 3] = inf
    x_MV[2] = -inf
    x_MV[3, :33] = -inf  # a -inf adds nothing: the row is 7 values of -1
    x_MV[4, ::2] = -inf  # sampling's filtered tokens, every other one
    expected_M = np.asarray(jax.nn.logsumexp(x_MV, axis=-1))
    assert np.isnan(expected_M[0]) and expected_M[1] == inf and expected_M[2] == -inf  # what XLA gives
    actual_M = kernel_logsumexp(x_MV, march)
    assert np.isnan(actual_M[0])
    np.testing.assert_array_equal(actual_M[1:3], expected_M[1:3])
    np.testing.assert_allclose(actual_M[3:], expected_M[3:], rtol=0, atol=1e-6)


def test_every_build_gives_a_row_the_same_log_sum_exp_alone_and_among_others(march):
    x_MV = (np.random.default_rng(7).normal(size=(9, 3001)) * 10).astype(np.float32)
    together_M = kernel_logsumexp(x_MV, march)
    for m in (0, 4, 8):
        assert kernel_logsumexp(x_MV[m : m + 1], march)[0] == together_M[m]


def kernel_logsumexp_top(x_MV: np.ndarray, k: int, march: str) -> tuple[np.ndarray, ...]:
    M = x_MV.shape[0]
    results = (jax.ShapeDtypeStruct((M,), jnp.float32), jax.ShapeDtypeStruct((M, k), jnp.int32),
               jax.ShapeDtypeStruct((M, k), jnp.float32))  # fmt: skip
    call = jax.ffi.ffi_call(native.target_name("logsumexp_top_rows", march), results, vmap_method="sequential")
    return tuple(np.asarray(part) for part in call(jnp.asarray(x_MV)))


@pytest.mark.parametrize("k", [1, 5, 20])
def test_every_build_gives_xlas_top_k_beside_the_log_sum_exp(march, k):
    """Ids and values exactly as jax.lax.top_k gives them (ties broken toward the lower index: values in
    steps of 0.5), rows of -inf and a row with two finite values included; the log-sum-exp bit for bit
    the one the kernel gives alone."""
    x_MV = np.round(np.random.default_rng(k).normal(size=(6, 50257)) * 4) / 2
    x_MV[3] = -np.inf
    x_MV[4] = -np.inf
    x_MV[4, [7, 40000]] = 1.0
    x_MV = x_MV.astype(np.float32)
    lse_M, ids_MK, values_MK = kernel_logsumexp_top(x_MV, k, march)
    expected_values_MK, expected_ids_MK = (np.asarray(part) for part in jax.lax.top_k(jnp.asarray(x_MV), k))
    np.testing.assert_array_equal(ids_MK, expected_ids_MK)
    np.testing.assert_array_equal(values_MK, expected_values_MK)
    np.testing.assert_array_equal(lse_M, kernel_logsumexp(x_MV, march))


def test_the_top_k_target_refuses_k_past_the_row(march):
    x_MV = np.zeros((2, 4), np.float32)
    with pytest.raises(Exception, match="k <= V"):
        kernel_logsumexp_top(x_MV, 5, march)


# --- which build is which ------------------------------------------------------------------------


# --- layer norm of rows --------------------------------------------------------------------------

NORM_WIDTHS = [1, 15, 16, 17, 37, 768, 1600]  # around every vector width, gpt2's and gpt2-xl's D


def kernel_layer_norm(x_MD: np.ndarray, scale_D: np.ndarray, bias_D: np.ndarray, eps: float, march: str) -> np.ndarray:
    result = jax.ShapeDtypeStruct(x_MD.shape, jnp.float32)
    call = jax.ffi.ffi_call(native.target_name("layer_norm_rows", march), result, vmap_method="sequential")
    return np.asarray(call(jnp.asarray(x_MD), jnp.asarray(scale_D), jnp.asarray(bias_D), eps=np.float32(eps)))


def float64_layer_norm(x_MD: np.ndarray, scale_D: np.ndarray, bias_D: np.ndarray, eps: float) -> np.ndarray:
    x_MD = x_MD.astype(np.float64)
    centered_MD = x_MD - x_MD.mean(axis=1, keepdims=True)
    variance_M1 = (centered_MD**2).mean(axis=1, keepdims=True)  # biased, as torch.nn.LayerNorm
    return centered_MD / np.sqrt(variance_M1 + eps) * scale_D + bias_D


def norm_inputs(M: int, D: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows off-centre (mean 30, std 3: a residual stream's drift) and a random affine map."""
    rng = np.random.default_rng(seed)
    x_MD = rng.normal(30.0, 3.0, (M, D)).astype(np.float32)
    return x_MD, rng.normal(1.0, 0.5, D).astype(np.float32), rng.normal(0.0, 0.5, D).astype(np.float32)


@pytest.mark.parametrize("D", NORM_WIDTHS)
def test_every_build_normalises_rows_like_float64_math(march, D):
    """Within 2e-6 plus 2^-20 of the value, XLA's float32 layer norm alike. A 1-wide row has no spread:
    it normalises to exactly its bias."""
    x_MD, scale_D, bias_D = norm_inputs(5, D, seed=D)
    exact_MD = float64_layer_norm(x_MD, scale_D, bias_D, 1e-5)
    bound_MD = 2e-6 + np.abs(exact_MD) * 2.0**-20
    xla_MD = np.asarray(layers.layer_norm(jnp.asarray(x_MD), jnp.asarray(scale_D), jnp.asarray(bias_D), 1e-5))
    for name, out_MD in [(march, kernel_layer_norm(x_MD, scale_D, bias_D, 1e-5, march)), ("xla", xla_MD)]:
        assert out_MD.dtype == np.float32
        error = np.abs(out_MD - exact_MD).max()
        assert (np.abs(out_MD - exact_MD) <= bound_MD).all(), f"{name} D={D}: error {error:.3g}"
    if D == 1:
        only_bias_MD = np.broadcast_to(bias_D, (5, 1))
        np.testing.assert_array_equal(kernel_layer_norm(x_MD, scale_D, bias_D, 1e-5, march), only_bias_MD)


def test_every_build_normalises_a_row_the_same_alone_and_among_others(march):
    x_MD, scale_D, bias_D = norm_inputs(19, 768, seed=3)
    together_MD = kernel_layer_norm(x_MD, scale_D, bias_D, 1e-5, march)
    for m in (0, 8, 9, 18):  # the first and last rows of the kernel's tasks of 8 rows, and the odd one out
        alone_1D = kernel_layer_norm(x_MD[m : m + 1], scale_D, bias_D, 1e-5, march)
        np.testing.assert_array_equal(alone_1D[0], together_MD[m])


def test_every_build_adds_eps_to_the_variance_before_the_root(march):
    """eps = 0.5 against rows of variance ~1: eps misplaced or dropped moves every value by ~20%."""
    x_MD, scale_D, bias_D = norm_inputs(3, 40, seed=4)
    x_MD = (x_MD - 30.0) / 3.0
    exact_MD = float64_layer_norm(x_MD, scale_D, bias_D, 0.5)
    np.testing.assert_allclose(kernel_layer_norm(x_MD, scale_D, bias_D, 0.5, march), exact_MD, rtol=0, atol=2e-6)


def test_the_layer_norm_target_refuses_a_scale_of_the_wrong_width(march):
    x_MD, scale_D, bias_D = norm_inputs(2, 16, seed=5)
    with pytest.raises(Exception, match="scale and bias"):
        kernel_layer_norm(x_MD, scale_D[:15], bias_D, 1e-5, march)


def test_each_build_reports_the_vector_unit_it_targets(march):
    expected = BUILDS[march] or expected_native_isa()
    assert native.kernel_isa(march) == expected


def test_builds_for_different_cpus_never_share_a_cache_entry(monkeypatch):
    """The cache name follows what the compiler targets: another CPU (other feature macros) gets
    another library, so a home folder shared by two machines never hands one the other's build."""
    compiler = native._compiler()
    if compiler is None:
        pytest.skip("no C++ compiler")
    here = native.library_path(compiler, "native")
    assert here == native.library_path(compiler, "native"), "the same CPU must find its build again"
    other_marches = {native.library_path(compiler, march) for march in ("x86-64-v3", "x86-64")} if X86 else set()
    assert here not in other_marches
    real_features = native.target_features
    monkeypatch.setattr(native, "target_features", lambda c, m: real_features(c, m) + "\n#define __AVX512FP16__ 1")
    assert native.library_path(compiler, "native") != here


def test_a_build_for_extensions_this_cpu_lacks_is_refused(recwarn):
    """x86-64-v4 needs AVX-512 F/BW/VL/DQ: it loads exactly where the CPU has them, and elsewhere
    falls back (kernels_available False, a warning) instead of dying of SIGILL at the first call."""
    if not X86:
        pytest.skip("x86-64 levels exist only on x86-64")
    if native._compiler() is None:
        pytest.skip("no C++ compiler")
    has_avx512 = {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= cpu_flags()
    assert native.kernels_available("x86-64-v4") == has_avx512
    if not has_avx512:
        assert any("cannot run the kernels built for x86-64-v4" in str(w.message) for w in recwarn)
