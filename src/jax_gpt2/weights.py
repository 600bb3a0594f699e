"""GPT2Weights: every parameter of a GPT-2 model as plain arrays, a pytree; and PackedMatrix,
the tiled form its matrices take for the CPU kernels.

Each layer's parameters are their own arrays (a tuple of BlockWeights), not slices of arrays
stacked along L. Measured here (jax 0.10.2, 2-core CPU): XLA copies a layer's slice out of a
stacked weight before every matmul, so a `lax.scan` over stacked weights read gpt2's MLP weights
at 9 GB/s against 18 GB/s for separate buffers, and decoded at about half the speed. The model
walks the tuple in a Python loop, unrolled at trace time.

Matrices keep HF's Conv1D layout (in, out): checkpoints load with no transposes. E is the fused
q|k|v width, 3 * D.

Whether the C++ kernels run is decided once, when the weights are loaded, and carried here as the
static field `GPT2Weights.use_kernels` (part of the jit cache key, never a traced value): the model
reads that field and nothing else, so one process can hold a kernel model and an XLA model side by
side. With the kernels, `pack_weights` replaces the four matrices of each block with PackedMatrix
tiles (float32, bfloat16 or int8) and sets lm_head_DV; the suffixes still name the logical
(in, out) shape.

A PackedMatrix is a Conv1D weight w_IO cut into tiles of 64 output columns,
tiles_GIC[g, i, c] = w_IO[i, 64 g + c] (zero past O), so a kernel streams each tile as one
contiguous run and reads every weight byte once per call. int8 tiles are symmetric per output
column: w_IO[i, o] ~ tiles * scale[o], scale = max |w[:, o]| / 127. Only the weights are narrowed
("weight-only" bf16 / int8); activations stay float32, except under the opt-in dot options
(`PackedMatrix.dot`, static, decided at load like use_kernels): matmuls of at least the kernels'
dot threshold of rows (prefill, scoring; not batch-1 decode) narrow x to the tiles' dtype too and
multiply by that dtype's dot-product instructions. bf16 tiles round x to bf16 for AVX512_BF16's
vdpbf16ps, as transformers' bf16 path does, nearly twice as fast; a row's result then depends on
how many rows share the call (batch invariance is lost). int8 tiles quantize x to int8 per row and
block of 256 inputs for AVX512_VNNI's vpdpbusd, as llama.cpp's q8_0 does, about four times as fast
as widening the weights; a row's result then depends on the row alone from the threshold on.

On a mesh (sharding.place_weights) every array is a global array with its NamedSharding, `mesh`
names the mesh, and each qkv matrix has its columns regrouped per "model" shard (see
sharding.qkv_column_order); the model reads both from here, so nothing else needs to know.
"""

import dataclasses
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

from jax_gpt2.config import WEIGHT_DTYPES
from jax_gpt2.pages import tile_array

if TYPE_CHECKING:
    from jax.sharding import Mesh


TILE = 64  # output columns per tile; the kernel's four 16-float registers
# Every weight dtype packs: the tile types are config.WEIGHT_DTYPES'.
PACKED_DTYPES = {name: jnp.dtype(name) for name in WEIGHT_DTYPES.values()}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PackedMatrix:
    """A weight matrix (I inputs, O outputs) cut into tiles of 64 output columns for the CPU kernels:
    each tile is one contiguous stream. int8 tiles carry a float32 scale per output column.
    `dot` (bfloat16 or int8 tiles, kernels only) multiplies many-row x narrowed to the tiles' dtype by
    that dtype's dot-product instructions instead of widening the tiles (the module docstring says
    what it costs)."""

    tiles_GIC: jax.Array  # (ceil(O / 64), I, 64), float32 | bfloat16 | int8
    scale_GC: jax.Array | None  # float32 per output column, int8 only
    out_features: int = dataclasses.field(metadata=dict(static=True))
    dot: bool = dataclasses.field(default=False, metadata=dict(static=True))

    @property
    def shape(self) -> tuple[int, int]:
        """The logical (in, out) shape of the matrix this packs."""
        return (self.tiles_GIC.shape[1], self.out_features)

    @property
    def dtype(self):
        return self.tiles_GIC.dtype


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BlockWeights:
    """One transformer block's weights: two LayerNorms, attention (fused qkv, output projection) and the
    MLP. Matrices are plain arrays, or `PackedMatrix` tiles where the CPU kernels run."""

    ln1_scale_D: jax.Array
    ln1_bias_D: jax.Array
    qkv_w_DE: jax.Array | PackedMatrix  # HF h.{i}.attn.c_attn
    qkv_b_E: jax.Array
    attn_out_w_DD: jax.Array | PackedMatrix  # HF h.{i}.attn.c_proj
    attn_out_b_D: jax.Array
    ln2_scale_D: jax.Array
    ln2_bias_D: jax.Array
    fc_w_DF: jax.Array | PackedMatrix  # HF h.{i}.mlp.c_fc
    fc_b_F: jax.Array
    proj_w_FD: jax.Array | PackedMatrix  # HF h.{i}.mlp.c_proj
    proj_b_D: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GPT2Weights:
    """The whole model's weights: embeddings, one `BlockWeights` per layer, the final LayerNorm, and
    lm_head where it is not tied to the embedding. `use_kernels` (static) records whether the CPU
    kernels run this model, decided once by `load_weights`."""

    wte_VD: jax.Array
    wpe_PD: jax.Array
    blocks: tuple[BlockWeights, ...]  # one per layer, in order
    lnf_scale_D: jax.Array
    lnf_bias_D: jax.Array
    # None when the output projection is tied to wte (every released GPT-2): no second V x D copy.
    lm_head_VD: jax.Array | None = None
    # The output projection packed (from wte or lm_head_VD); lm_logits uses it when set.
    lm_head_DV: PackedMatrix | None = None
    # The C++ kernels run the packed matmuls and the one-token decode attention (decided at load).
    use_kernels: bool = dataclasses.field(default=False, metadata=dict(static=True))
    # The mesh the arrays are placed on (None: one device). Static: it decides the program's layout.
    mesh: "Mesh | None" = dataclasses.field(default=None, metadata=dict(static=True))

    @property
    def bf16_dot(self) -> bool:
        """Whether the packed matrices take the opt-in bf16 dot path (bfloat16 tiles marked `dot`, set
        by load_weights for all of them alike)."""
        head = self.lm_head_DV
        return head is not None and head.dot and head.dtype == jnp.bfloat16

    @property
    def int8_dot(self) -> bool:
        """Whether the packed matrices take the opt-in int8 dot path (int8 tiles marked `dot`)."""
        head = self.lm_head_DV
        return head is not None and head.dot and head.dtype == jnp.int8


def pack_matrix(w_IO: np.ndarray, dtype) -> PackedMatrix:
    """Cut a float32 (in, out) matrix into 64-column tiles of `dtype` (host-side, once at load time).

    The tiles are written once, into memory XLA then uses as it is (pages.tile_array), on 4 KiB
    pages until load_weights (or a server, once it answers) moves them onto 2 MiB pages."""
    w_IO = np.asarray(w_IO, np.float32)
    assert w_IO.ndim == 2
    assert jnp.dtype(dtype).name in PACKED_DTYPES, f"cannot pack to {dtype}"
    I, O = w_IO.shape
    G = -(-O // TILE)
    scale_GC = None
    if jnp.dtype(dtype) == jnp.int8:
        scale_O = np.abs(w_IO).max(axis=0) / 127.0
        scale_O[scale_O == 0] = 1.0  # an all-zero column stays zero whatever its scale
        w_IO = np.clip(np.rint(w_IO / scale_O), -127, 127)
        scale_GC = jnp.asarray(np.pad(scale_O, (0, G * TILE - O), constant_values=1.0).reshape(G, TILE), jnp.float32)
    tiles_GIC = tile_array((G, I, TILE), jnp.dtype(dtype))
    whole = O // TILE
    tiles_GIC[:whole] = w_IO[:, : whole * TILE].reshape(I, whole, TILE).transpose(1, 0, 2)
    if whole < G:  # the last tile's columns past O are zero
        tiles_GIC[whole, :, : O - whole * TILE] = w_IO[:, whole * TILE :]
        tiles_GIC[whole, :, O - whole * TILE :] = 0
    packed = PackedMatrix(jax.device_put(tiles_GIC, may_alias=True), scale_GC, O)
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


def map_matrices(weights: GPT2Weights, matrix_fn) -> tuple[tuple[BlockWeights, ...], "jax.Array | PackedMatrix"]:
    """matrix_fn applied to the four matrices of every block and to the output projection, given
    as an (in, out) = (D, V) matrix (wte or lm_head_VD, transposed)."""

    def block(w: BlockWeights) -> BlockWeights:
        return dataclasses.replace(
            w, qkv_w_DE=matrix_fn(w.qkv_w_DE), attn_out_w_DD=matrix_fn(w.attn_out_w_DD),
            fc_w_DF=matrix_fn(w.fc_w_DF), proj_w_FD=matrix_fn(w.proj_w_FD),
        )  # fmt: skip

    head_VD = weights.wte_VD if weights.lm_head_VD is None else weights.lm_head_VD
    blocks = tuple(block(w) for w in weights.blocks)
    assert len(blocks) == len(weights.blocks)
    return blocks, matrix_fn(np.asarray(head_VD).T)


def pack_weights(weights: GPT2Weights, dtype, *, use_kernels: bool, dot: bool = False) -> GPT2Weights:
    """Pack every block matrix and the output projection; embeddings, norms and biases stay float32.

    The tied output projection gets its own packed copy of wte (transposed): the embedding
    gather still reads wte, the per-token lm_head stream reads the tiles. use_kernels says who
    multiplies the tiles: the C++ kernels, or XLA after unpacking them (for int8 on a GPU);
    dot (bfloat16 or int8 tiles, on the kernels only) marks every packed matrix for its dtype's dot path.
    """
    assert weights.wte_VD.dtype == jnp.float32, "pack from float32 weights"
    assert not isinstance(weights.blocks[0].qkv_w_DE, PackedMatrix), "already packed"
    assert use_kernels or not dot, "the dot paths are the kernels'"
    assert jnp.dtype(dtype) in (jnp.bfloat16, jnp.int8) or not dot, "the dot paths multiply bfloat16 or int8 tiles"

    def pack(w_IO) -> PackedMatrix:
        return dataclasses.replace(pack_matrix(np.asarray(w_IO), dtype), dot=dot)

    blocks, lm_head_DV = map_matrices(weights, pack)
    packed = dataclasses.replace(weights, blocks=blocks, lm_head_VD=None, lm_head_DV=lm_head_DV, use_kernels=use_kernels)
    assert packed.lm_head_DV.shape == (weights.wte_VD.shape[1], weights.wte_VD.shape[0])
    assert len(packed.blocks) == len(weights.blocks)
    return packed


def round_weights(weights: GPT2Weights, dtype) -> GPT2Weights:
    """The float32 model whose matrices hold exactly the values that `dtype` packing stands for
    (bf16-rounded, or int8 dequantized), for XLA's float32 dot: the narrow model's numbers at
    float32's speed, where no kernel reads the narrow bytes.

    As with packing, only the block matrices and the output projection are rounded; a tied output
    projection becomes its own rounded copy (lm_head_VD), since the embedding gather keeps wte.
    """
    assert weights.wte_VD.dtype == jnp.float32, "round from float32 weights"
    assert not isinstance(weights.blocks[0].qkv_w_DE, PackedMatrix), "round plain arrays"
    blocks, lm_head_DV = map_matrices(weights, lambda w_IO: unpack_matrix(pack_matrix(np.asarray(w_IO), dtype)))
    rounded = dataclasses.replace(weights, blocks=blocks, lm_head_VD=lm_head_DV.T, use_kernels=False)
    assert rounded.lm_head_VD.dtype == jnp.float32
    assert rounded.lm_head_VD.shape == weights.wte_VD.shape
    return rounded
