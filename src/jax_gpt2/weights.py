"""GPT2Weights: every parameter of a GPT-2 model as plain arrays, a pytree.

Per-layer parameters are stacked along a leading L axis so the model can `lax.scan` over layers
(one compiled block, short compiles). Matrices keep HF's Conv1D layout (in, out): checkpoints
load with no transposes. E is the fused q|k|v width, 3 * D.
"""

import dataclasses

import jax


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BlockWeights:
    ln1_scale_LD: jax.Array
    ln1_bias_LD: jax.Array
    qkv_w_LDE: jax.Array  # HF h.{i}.attn.c_attn
    qkv_b_LE: jax.Array
    attn_out_w_LDD: jax.Array  # HF h.{i}.attn.c_proj
    attn_out_b_LD: jax.Array
    ln2_scale_LD: jax.Array
    ln2_bias_LD: jax.Array
    fc_w_LDF: jax.Array  # HF h.{i}.mlp.c_fc
    fc_b_LF: jax.Array
    proj_w_LFD: jax.Array  # HF h.{i}.mlp.c_proj
    proj_b_LD: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GPT2Weights:
    wte_VD: jax.Array
    wpe_PD: jax.Array
    blocks: BlockWeights
    lnf_scale_D: jax.Array
    lnf_bias_D: jax.Array
    # None when the output projection is tied to wte (every released GPT-2): no second V x D copy.
    lm_head_VD: jax.Array | None = None


def layer_weights(blocks: BlockWeights, layer: int) -> BlockWeights:
    """One layer's parameters (arrays without the L axis), for code that walks layers one by one."""
    n_layer = blocks.ln1_scale_LD.shape[0]
    assert 0 <= layer
    assert layer < n_layer
    return jax.tree_util.tree_map(lambda stacked: stacked[layer], blocks)
