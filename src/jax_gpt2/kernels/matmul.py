"""x @ W for a PackedMatrix (weights.py): the C++ kernel's XLA call, or XLA's own dot on the unpacked matrix.

Which one runs is the caller's explicit choice (GPT2Weights.use_kernels, decided at load), never
read from the process here; so are the dot options (PackedMatrix.dot: a target of their own for
bfloat16 and for int8 tiles). The XLA form exists for packed weights without the kernels (int8 on a GPU, where the
dequantization fuses into the dot) and as the reference the kernel tests check against; on a CPU
without the kernels the loader widens narrow weights to float32 once instead, since XLA's CPU dot
would widen them again before every product.
"""

import jax
import jax.numpy as jnp

from jax_gpt2.kernels import native
from jax_gpt2.weights import PackedMatrix, unpack_matrix


def packed_matmul(
    x_MI: jax.Array, packed: PackedMatrix, use_kernel: bool, bias_O: jax.Array | None = None, gelu: bool = False,
    residual_MO: jax.Array | None = None,
) -> jax.Array:  # fmt: skip
    """x_MI @ W in float32: by the native kernel (use_kernel) or by XLA on the unpacked matrix.

    With the kernel, `bias_O` (float32), `gelu` (GELU's tanh form, GPT-2's "gelu_new") and then
    `residual_MO + y` (a block's residual add) happen inside it, on each tile's results as they are
    finished (core.h's Epilogue), so no separate pass over the (M, O) result; the XLA form takes none
    of them (layers.linear applies them there, in the same order).

    With `packed.dot` (kernels only), M >= native.dot_min_rows() narrows x to the tiles' dtype:
    bfloat16 tiles round x to bfloat16 and sum the products in pairs by AVX512_BF16's vdpbf16ps, as
    transformers' bf16 path does (the result then depends on M: batch invariance is lost); int8
    tiles quantize x to int8 per row and block of 256 inputs and sum exactly in integers by
    AVX512_VNNI's vpdpbusd, as llama.cpp's q8_0 does. Fewer rows take the exact path."""
    M, I = x_MI.shape
    assert I == packed.shape[0], f"x has {I} features, the matrix takes {packed.shape[0]}"
    assert x_MI.dtype == jnp.float32, "packed weights take float32 activations"
    assert use_kernel or not packed.dot, "the dot paths are the kernels'"
    assert use_kernel or (bias_O is None and not gelu), "the epilogue is the kernels'"
    assert use_kernel or residual_MO is None, "the epilogue is the kernels'"
    assert bias_O is None or bias_O.shape == (packed.out_features,)
    assert residual_MO is None or residual_MO.shape == (M, packed.out_features), "the residual has y's shape (M, O)"
    assert residual_MO is None or residual_MO.dtype == jnp.float32
    if not use_kernel:
        return jnp.dot(x_MI, unpack_matrix(packed), precision=jax.lax.Precision.HIGHEST)
    result = jax.ShapeDtypeStruct((M, packed.out_features), jnp.float32)
    kernel = f"{packed.dtype.name}_dot" if packed.dot else packed.dtype.name
    call = jax.ffi.ffi_call(native.target_name(kernel), result, vmap_method="sequential")
    bias = jnp.zeros((0,), jnp.float32) if bias_O is None else bias_O.astype(jnp.float32)
    residual = jnp.zeros((0,), jnp.float32) if residual_MO is None else residual_MO
    scales = () if packed.scale_GC is None else (packed.scale_GC,)
    y_MO = call(x_MI, packed.tiles_GIC, *scales, bias, residual, gelu=bool(gelu))
    assert y_MO.shape == (M, packed.out_features)
    return y_MO


def packed_matmul_BT(
    x_BTI: jax.Array, packed: PackedMatrix, use_kernel: bool, bias_O: jax.Array | None = None, gelu: bool = False,
    residual_BTO: jax.Array | None = None,
) -> jax.Array:  # fmt: skip
    """`packed_matmul` over every (batch, time) row: the kernel sees one (B*T, I) matrix."""
    B, T, I = x_BTI.shape
    residual_MO = None if residual_BTO is None else residual_BTO.reshape(B * T, packed.out_features)
    y_MO = packed_matmul(x_BTI.reshape(B * T, I), packed, use_kernel, bias_O, gelu, residual_MO)
    y_BTO = y_MO.reshape(B, T, packed.out_features)
    assert y_BTO.dtype == jnp.float32
    return y_BTO
