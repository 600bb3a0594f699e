"""GPT2Weights: every parameter of a GPT-2 model as plain arrays, a pytree.

Each layer's parameters are their own arrays (a tuple of BlockWeights), not slices of arrays
stacked along L. Measured here (jax 0.10.2, 2-core CPU): XLA copies a layer's slice out of a
stacked weight before every matmul, so a `lax.scan` over stacked weights read gpt2's MLP weights
at 9 GB/s against 18 GB/s for separate buffers, and decoded at about half the speed. The model
walks the tuple in a Python loop, unrolled at trace time.

Matrices keep HF's Conv1D layout (in, out): checkpoints load with no transposes. E is the fused
q|k|v width, 3 * D.

On a CPU with the native kernels, `packed.pack_weights` replaces the four matrices of each block
with PackedMatrix tiles (float32, bfloat16 or int8) and sets lm_head_DV; the suffixes still name
the logical (in, out) shape.
"""

import dataclasses
from typing import TYPE_CHECKING

import jax

if TYPE_CHECKING:
    from jax_gpt2.kernels.matmul import PackedMatrix


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BlockWeights:
    ln1_scale_D: jax.Array
    ln1_bias_D: jax.Array
    qkv_w_DE: "jax.Array | PackedMatrix"  # HF h.{i}.attn.c_attn
    qkv_b_E: jax.Array
    attn_out_w_DD: "jax.Array | PackedMatrix"  # HF h.{i}.attn.c_proj
    attn_out_b_D: jax.Array
    ln2_scale_D: jax.Array
    ln2_bias_D: jax.Array
    fc_w_DF: "jax.Array | PackedMatrix"  # HF h.{i}.mlp.c_fc
    fc_b_F: jax.Array
    proj_w_FD: "jax.Array | PackedMatrix"  # HF h.{i}.mlp.c_proj
    proj_b_D: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GPT2Weights:
    wte_VD: jax.Array
    wpe_PD: jax.Array
    blocks: tuple[BlockWeights, ...]  # one per layer, in order
    lnf_scale_D: jax.Array
    lnf_bias_D: jax.Array
    # None when the output projection is tied to wte (every released GPT-2): no second V x D copy.
    lm_head_VD: jax.Array | None = None
    # The output projection packed for the CPU kernels (from wte or lm_head_VD); lm_logits uses it when set.
    lm_head_DV: "PackedMatrix | None" = None
