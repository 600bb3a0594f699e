"""Weight matrices re-laid for the CPU kernels (native.py), in float32, bfloat16 or int8.

A PackedMatrix is a Conv1D weight w_IO (in, out) cut into tiles of 64 output columns,
tiles_GIC[g, i, c] = w_IO[i, 64 g + c] (zero past O), so a kernel streams each tile as one
contiguous run and reads every weight byte once per call. int8 tiles are symmetric per output
column: w_IO[i, o] ~ tiles * scale[o], scale = max |w[:, o]| / 127.

Activations stay float32; only the weights are narrowed ("weight-only" bf16 / int8). Without the
kernels (a GPU, a CPU without AVX-512, no compiler) `packed_matmul` unpacks in XLA: slower, same
numbers, so int8 weights work everywhere.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jax_gpt2.kernels import native
from jax_gpt2.weights import BlockWeights, GPT2Weights

TILE = 64  # output columns per tile; the kernel's four 16-float registers
PACKED_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "int8": jnp.int8}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PackedMatrix:
    tiles_GIC: jax.Array  # (ceil(O / 64), I, 64), float32 | bfloat16 | int8
    scale_GC: jax.Array | None  # float32 per output column, int8 only
    out_features: int = dataclasses.field(metadata=dict(static=True))

    @property
    def shape(self) -> tuple[int, int]:
        """The logical (in, out) shape of the matrix this packs."""
        return (self.tiles_GIC.shape[1], self.out_features)

    @property
    def dtype(self):
        return self.tiles_GIC.dtype


def pack_matrix(w_IO: np.ndarray, dtype) -> PackedMatrix:
    """Cut a float32 (in, out) matrix into 64-column tiles of `dtype` (host-side, once at load time)."""
    w_IO = np.asarray(w_IO, np.float32)
    assert w_IO.ndim == 2
    assert jnp.dtype(dtype).name in PACKED_DTYPES, f"cannot pack to {dtype}"
    I, O = w_IO.shape
    G = -(-O // TILE)
    padded_IQ = np.zeros((I, G * TILE), np.float32)
    padded_IQ[:, :O] = w_IO
    scale_GC = None
    if jnp.dtype(dtype) == jnp.int8:
        scale_Q = np.abs(padded_IQ).max(axis=0) / 127.0
        scale_Q[scale_Q == 0] = 1.0  # an all-zero column (or padding) stays zero whatever its scale
        padded_IQ = np.clip(np.rint(padded_IQ / scale_Q), -127, 127)
        scale_GC = jnp.asarray(scale_Q.reshape(G, TILE), jnp.float32)
    tiles_GIC = np.ascontiguousarray(padded_IQ.reshape(I, G, TILE).transpose(1, 0, 2))
    packed = PackedMatrix(jnp.asarray(tiles_GIC, dtype), scale_GC, O)
    if native.kernels_available():
        native.advise_huge_pages(packed.tiles_GIC)  # weights are streamed every token: fewer TLB misses
    assert packed.shape == (I, O)
    assert (scale_GC is None) == (jnp.dtype(dtype) != jnp.int8)
    return packed


def unpack_matrix(packed: PackedMatrix) -> jax.Array:
    """The float32 (in, out) matrix a PackedMatrix stands for (the rounded values, not the original)."""
    G, I, C = packed.tiles_GIC.shape
    assert C == TILE
    w_IQ = packed.tiles_GIC.astype(jnp.float32).transpose(1, 0, 2).reshape(I, G * C)
    if packed.scale_GC is not None:
        w_IQ = w_IQ * packed.scale_GC.reshape(G * C)
    w_IO = w_IQ[:, : packed.out_features]
    assert w_IO.shape == packed.shape
    return w_IO


def packed_matmul(x_MI: jax.Array, packed: PackedMatrix, use_kernel: bool | None = None) -> jax.Array:
    """x_MI @ W in float32, with the native kernel when it is available (use_kernel None) or asked for."""
    M, I = x_MI.shape
    assert I == packed.shape[0], f"x has {I} features, the matrix takes {packed.shape[0]}"
    assert x_MI.dtype == jnp.float32, "packed weights take float32 activations"
    if use_kernel is None:
        use_kernel = native.kernels_available()
    if not use_kernel:
        return jnp.dot(x_MI, unpack_matrix(packed), precision=jax.lax.Precision.HIGHEST)
    result = jax.ShapeDtypeStruct((M, packed.out_features), jnp.float32)
    call = jax.ffi.ffi_call(native.target_name(packed.dtype.name), result, vmap_method="sequential")
    operands = (x_MI, packed.tiles_GIC) if packed.scale_GC is None else (x_MI, packed.tiles_GIC, packed.scale_GC)
    y_MO = call(*operands)
    assert y_MO.shape == (M, packed.out_features)
    return y_MO


def packed_matmul_BT(x_BTI: jax.Array, packed: PackedMatrix) -> jax.Array:
    """`packed_matmul` over every (batch, time) row: the kernel sees one (B*T, I) matrix."""
    B, T, I = x_BTI.shape
    y_BTO = packed_matmul(x_BTI.reshape(B * T, I), packed).reshape(B, T, packed.out_features)
    assert y_BTO.dtype == jnp.float32
    return y_BTO


def pack_weights(weights: GPT2Weights, dtype) -> GPT2Weights:
    """Pack every block matrix and the output projection; embeddings, norms and biases stay float32.

    The tied output projection gets its own packed copy of wte (transposed): the embedding
    gather still reads wte, the per-token lm_head stream reads the tiles.
    """
    assert weights.wte_VD.dtype == jnp.float32, "pack from float32 weights"
    assert not isinstance(weights.blocks[0].qkv_w_DE, PackedMatrix), "already packed"

    def pack(w) -> PackedMatrix:
        return pack_matrix(np.asarray(w), dtype)

    def pack_block(w: BlockWeights) -> BlockWeights:
        return dataclasses.replace(
            w, qkv_w_DE=pack(w.qkv_w_DE), attn_out_w_DD=pack(w.attn_out_w_DD),
            fc_w_DF=pack(w.fc_w_DF), proj_w_FD=pack(w.proj_w_FD),
        )  # fmt: skip

    head_VD = weights.wte_VD if weights.lm_head_VD is None else weights.lm_head_VD
    packed = dataclasses.replace(
        weights, blocks=tuple(pack_block(w) for w in weights.blocks),
        lm_head_VD=None, lm_head_DV=pack(np.asarray(head_VD).T),
    )  # fmt: skip
    assert packed.lm_head_DV.shape == head_VD.shape[::-1]
    assert len(packed.blocks) == len(weights.blocks)
    return packed
