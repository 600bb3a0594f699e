"""Each building block against the matching transformers module, on the same weights.

The whole-model tests (test_parity.py) say THAT the logits differ; these say WHERE: layer norm,
each activation, attention (full causal, cached, block-causal, the native decode kernel) and the
MLP, each fed the same random weights and inputs as its transformers counterpart.

Weights are random with std 0.5 (LayerNorm scales 1 + 0.5 noise) and inputs have std 2 and a
non-zero mean, so every term matters: attention scores reach several units (a peaked softmax, so a
wrong mask or scale moves the output) and MLP pre-activations span the bend of every nonlinearity.

Tolerance for the modules: the project's parity bar, `checkpoints.logit_tolerance(reference)`
(1e-4 absolute, scaled by the reference's magnitude above 1): both sides do the same float32 ops
and differ only in summation order. For the activations, applied element by element with no sums,
the bar is tighter (ACTIVATION_TOLERANCE below), because the nearest wrong formula (the erf gelu in
place of the tanh one) is within 5e-4 of the right one, inside the module bar at these magnitudes.

The `ours_*` helpers are the only place that calls jax_gpt2.layers: a renamed function or a new
argument there is one edit here.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from transformers.activations import ACT2FN
from transformers.models.gpt2.modeling_gpt2 import GPT2Attention, GPT2MLP

import checkpoints
from jax_gpt2 import kernels, kvcache, layers
from jax_gpt2.config import SUPPORTED_ACTIVATIONS, GPT2Config, config_from_hf_dict
from jax_gpt2.model import attention_scale

STD = 0.5
INPUT_STD = 2.0
INPUT_MEAN = 0.7
# Element-wise float32 functions: a few ulps of the output, or of 1 near zero.
ACTIVATION_TOLERANCE = dict(rtol=2e-6, atol=2e-6)


# ---------------------------------------------------------------------------------------------
# The calls into jax_gpt2.layers (and the cache it attends over), in one place


def ours_layer_norm(x_BTD, ln: torch.nn.LayerNorm, use_kernels: bool = False) -> np.ndarray:
    out_BTD = layers.layer_norm(jnp.asarray(x_BTD), as_jax(ln.weight), as_jax(ln.bias), ln.eps, use_kernels)
    return np.asarray(out_BTD)


def ours_activation(name: str, x_BTF) -> np.ndarray:
    return np.asarray(layers.activation(name, jnp.asarray(x_BTF)))


def ours_mlp(x_BTD, hf_mlp: GPT2MLP, activation_name: str) -> np.ndarray:
    fc, proj = hf_mlp.c_fc, hf_mlp.c_proj  # Conv1D: weight is (in, out), as ours.
    out_BTD = layers.mlp(
        jnp.asarray(x_BTD), as_jax(fc.weight), as_jax(fc.bias), as_jax(proj.weight), as_jax(proj.bias), activation_name,
        use_kernels=False,
    )  # fmt: skip
    return np.asarray(out_BTD)


def ours_qkv(x_BTD, hf_attention: GPT2Attention, config: GPT2Config):
    """q, k, v (B, T, N, H) of the fused c_attn projection."""
    B, T, _ = x_BTD.shape
    c_attn = hf_attention.c_attn
    qkv_BTE = layers.linear(jnp.asarray(x_BTD), as_jax(c_attn.weight), as_jax(c_attn.bias), use_kernels=False)
    q_BTD, k_BTD, v_BTD = jnp.split(qkv_BTE, 3, axis=-1)
    shape_BTNH = (B, T, config.n_head, config.head_dim)
    return q_BTD.reshape(shape_BTNH), k_BTD.reshape(shape_BTNH), v_BTD.reshape(shape_BTNH)


def ours_out_projection(attn_BTNH, hf_attention: GPT2Attention) -> np.ndarray:
    B, T, N, H = attn_BTNH.shape
    proj = hf_attention.c_proj
    out_BTD = layers.linear(attn_BTNH.reshape(B, T, N * H), as_jax(proj.weight), as_jax(proj.bias), use_kernels=False)
    return np.asarray(out_BTD)


def ours_attention_full(x_BTD, hf_attention, config, layer: int, start_B, block: int | None = None) -> np.ndarray:
    """A prompt over a cache it fills exactly (T == S): cached_attention, or in query blocks."""
    B, T, _ = x_BTD.shape
    q_BTNH, k_BTNH, v_BTNH = ours_qkv(x_BTD, hf_attention, config)
    k_BNSH, v_BNSH = k_BTNH.transpose(0, 2, 1, 3), v_BTNH.transpose(0, 2, 1, 3)
    cache = kvcache.init_cache(1, config.n_head, config.head_dim, jnp.asarray(start_B), T)
    mask_BTS = kvcache.visible_mask(cache, T)
    scale = attention_scale(config, layer)
    if block is None:
        attn_BTNH = jax.jit(layers.cached_attention)(q_BTNH, k_BNSH, v_BNSH, mask_BTS, scale)
    else:
        # Under jit, as the model runs it: one compilation, not one per op of every block.
        in_blocks = jax.jit(layers.causal_attention_in_blocks, static_argnums=5)
        attn_BTNH = in_blocks(q_BTNH, k_BNSH, v_BNSH, mask_BTS, scale, block)
    return ours_out_projection(attn_BTNH, hf_attention)


def ours_attention_cached(x_BTD, cache: kvcache.KVCache, hf_attention, config, layer: int, decode_kernel: bool):
    """T new tokens appended at the cache's end, attending over every slot written so far.

    The cache has L layers and this module is layer `layer` of them, as in the model. Returns the
    output and the cache with the new keys and values (and end_B moved past them).
    """
    _, T, _ = x_BTD.shape
    q_BTNH, k_BTNH, v_BTNH = ours_qkv(x_BTD, hf_attention, config)
    k_LBNSH = kvcache.write_layer(cache.k_LBNSH, layer, cache.end_B, k_BTNH)
    v_LBNSH = kvcache.write_layer(cache.v_LBNSH, layer, cache.end_B, v_BTNH)
    scale = attention_scale(config, layer)
    if decode_kernel:
        assert layers.can_use_decode_kernel(q_BTNH, k_LBNSH, use_kernels=True)
        attn_BTNH = kernels.decode_attention(q_BTNH, k_LBNSH, v_LBNSH, cache.start_B, cache.end_B, layer, scale)
    else:
        mask_BTS = kvcache.visible_mask(cache, T)
        attn_BTNH = layers.cached_attention(q_BTNH, k_LBNSH[layer], v_LBNSH[layer], mask_BTS, scale)
    new_cache = kvcache.KVCache(k_LBNSH, v_LBNSH, cache.start_B, cache.end_B + T)
    return ours_out_projection(attn_BTNH, hf_attention), new_cache


# ---------------------------------------------------------------------------------------------
# The transformers side


def as_jax(parameter: torch.Tensor):
    return jnp.asarray(parameter.detach().numpy())


def randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter random with std STD; LayerNorm scales around 1, as in checkpoints.py."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=generator) * STD
            param.copy_(1.0 + noise if isinstance(module, torch.nn.LayerNorm) and name == "weight" else noise)
    return module.eval()


def hf_and_our_config(**overrides) -> tuple[transformers.GPT2Config, GPT2Config]:
    """The transformers config (eager attention: it takes the additive mask we build) and ours, read
    from its config.json form as the loader reads it."""
    hf_config = checkpoints.hf_config(**{**checkpoints.TINY, **overrides})
    hf_config._attn_implementation = "eager"
    return hf_config, config_from_hf_dict(json.loads(hf_config.to_json_string()))


def random_inputs(*shape: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (INPUT_MEAN + INPUT_STD * rng.standard_normal(shape)).astype(np.float32)


def additive_mask(visible_BTS: np.ndarray) -> torch.Tensor:
    """transformers' form of a mask for eager attention: 0 where visible, the dtype's minimum where not."""
    minimum = torch.finfo(torch.float32).min
    mask = torch.where(torch.as_tensor(visible_BTS), 0.0, minimum)
    return mask[:, None, :, :]  # (B, 1, T, S): the same mask for every head


def causal_visible(start_B, T: int, S: int) -> np.ndarray:
    """visible_BTS for T queries that are the last T of S slots, each row's real tokens from start_B[b]."""
    slots_S = np.arange(S)
    queries_T = np.arange(S - T, S)
    causal_TS = slots_S[None, :] <= queries_T[:, None]
    return causal_TS[None] & (slots_S[None, None, :] >= np.asarray(start_B)[:, None, None])


def hf_attention_step(hf_attention, x_BTD, visible_BTS, cache=None) -> np.ndarray:
    with torch.no_grad():
        out, _ = hf_attention(torch.as_tensor(x_BTD), cache=cache, attention_mask=additive_mask(visible_BTS))
    return out.numpy()


def real_queries(visible_BTS: np.ndarray) -> np.ndarray:
    """Queries with at least one visible slot. A left-pad query sees none: its output is a placeholder
    nobody reads, and the two sides fill it differently (uniform over all slots vs. over the masked
    scores), so it is left out of the comparison."""
    real_BT = visible_BTS.any(axis=-1)
    assert real_BT.any()
    return real_BT


# ---------------------------------------------------------------------------------------------
# Layer norm and activations


@pytest.mark.parametrize("use_kernels", [False, True], ids=["xla", "kernel"])
@pytest.mark.parametrize("eps", [1e-5, 0.5])  # 0.5: a dropped or misplaced eps moves the output visibly
def test_layer_norm_matches_torch_layer_norm(eps, use_kernels, assert_matches_transformers):
    D = 24
    ln = randomize(torch.nn.LayerNorm(D, eps=eps), seed=1)
    x_BTD = random_inputs(2, 5, D)
    with torch.no_grad():
        reference_BTD = ln(torch.as_tensor(x_BTD)).numpy()
    ours_BTD = ours_layer_norm(x_BTD, ln, use_kernels)
    assert_matches_transformers(ours_BTD, reference_BTD, what="layer norm", check_argmax=False)


def activation_inputs() -> np.ndarray:
    """A grid over [-10, 10] (both tails and the bend of every gelu) plus the inputs an MLP sees."""
    grid_F = np.linspace(-10.0, 10.0, 2001, dtype=np.float32)
    return np.concatenate([grid_F, random_inputs(500)])[None, None, :]


@pytest.mark.parametrize("name", SUPPORTED_ACTIVATIONS)
def test_activation_matches_transformers_act2fn(name):
    x_BTF = activation_inputs()
    with torch.no_grad():
        reference_BTF = ACT2FN[name](torch.as_tensor(x_BTF)).numpy()
    np.testing.assert_allclose(ours_activation(name, x_BTF), reference_BTF, **ACTIVATION_TOLERANCE, err_msg=name)


def test_activation_tolerance_tells_the_two_gelus_apart():
    """Guards the bar above: the erf gelu must fail it where the tanh gelu is asked for."""
    x_BTF = activation_inputs()
    with torch.no_grad():
        tanh_gelu_BTF = ACT2FN["gelu_new"](torch.as_tensor(x_BTF)).numpy()
    with pytest.raises(AssertionError):
        np.testing.assert_allclose(ours_activation("gelu", x_BTF), tanh_gelu_BTF, **ACTIVATION_TOLERANCE)


# ---------------------------------------------------------------------------------------------
# MLP


@pytest.mark.parametrize("activation_name", ["gelu_new", "gelu", "quick_gelu", "relu"])
@pytest.mark.parametrize("n_inner", [None, 37])
def test_mlp_matches_transformers_gpt2_mlp(activation_name, n_inner, assert_matches_transformers):
    hf_config, config = hf_and_our_config(activation_function=activation_name, n_inner=n_inner)
    hf_mlp = randomize(GPT2MLP(config.d_mlp, hf_config), seed=2)
    x_BTD = random_inputs(2, 5, config.n_embd)
    with torch.no_grad():
        reference_BTD = hf_mlp(torch.as_tensor(x_BTD)).numpy()
    actual_BTD = ours_mlp(x_BTD, hf_mlp, activation_name)
    assert_matches_transformers(actual_BTD, reference_BTD, what="mlp", check_argmax=False)


# ---------------------------------------------------------------------------------------------
# Attention

# The config knobs that change attention, each with the layer index it applies to.
ATTENTION_VARIANTS = {
    "default": ({}, 0),
    "scale-attn-by-inverse-layer-idx": ({"scale_attn_by_inverse_layer_idx": True, "n_layer": 3}, 2),
    "unscaled-attn-weights": ({"scale_attn_weights": False}, 0),
    "reorder-and-upcast-attn": ({"reorder_and_upcast_attn": True}, 0),
    "three-heads-of-width-7": ({"n_embd": 21, "n_head": 3}, 0),
}


def hf_attention_module(variant: str, layer: int | None = None, seed: int = 3):
    overrides, variant_layer = ATTENTION_VARIANTS[variant]
    layer = variant_layer if layer is None else layer
    hf_config, config = hf_and_our_config(**overrides)
    assert 0 <= layer < config.n_layer
    hf_attention = randomize(GPT2Attention(hf_config, layer_idx=layer), seed=seed)
    return hf_attention, config, layer


@pytest.mark.parametrize("variant", ATTENTION_VARIANTS)
def test_causal_attention_matches_transformers_gpt2_attention(variant, assert_matches_transformers):
    hf_attention, config, layer = hf_attention_module(variant)
    start_B = [0, 3]  # row 1 is left-padded by three tokens
    T = 16
    x_BTD = random_inputs(2, T, config.n_embd)
    visible_BTS = causal_visible(start_B, T, T)
    real_BT = real_queries(visible_BTS)
    reference_BTD = hf_attention_step(hf_attention, x_BTD, visible_BTS)
    actual_BTD = ours_attention_full(x_BTD, hf_attention, config, layer, start_B)
    assert_matches_transformers(actual_BTD[real_BT], reference_BTD[real_BT], what="attention", check_argmax=False)


@pytest.mark.parametrize("block", [1, 5, 16])
def test_block_causal_attention_matches_transformers_gpt2_attention(block, assert_matches_transformers):
    hf_attention, config, layer = hf_attention_module("default")
    start_B = [0, 3]
    T = 16
    x_BTD = random_inputs(2, T, config.n_embd)
    visible_BTS = causal_visible(start_B, T, T)
    real_BT = real_queries(visible_BTS)
    reference_BTD = hf_attention_step(hf_attention, x_BTD, visible_BTS)
    actual_BTD = ours_attention_full(x_BTD, hf_attention, config, layer, start_B, block=block)
    assert_matches_transformers(
        actual_BTD[real_BT], reference_BTD[real_BT], what=f"block-causal attention ({block})", check_argmax=False
    )


def incremental_attention_matches(variant: str, step_lengths: list[int], decode_kernel: bool, check) -> None:
    """Feed the chunks one after another to both sides' caches; every chunk's output must agree.

    Our cache has more slots than are ever filled (the mask must hide the empty ones) and two
    layers, so a read of the wrong layer shows; this module is the second.
    """
    hf_attention, config, layer = hf_attention_module(variant, layer=1)
    start_B = [0, 2]  # row 1 is left-padded by two tokens
    B, S = len(start_B), sum(step_lengths) + 5
    hf_cache = transformers.DynamicCache()
    cache = kvcache.init_cache(2, config.n_head, config.head_dim, jnp.asarray(start_B), S)
    x_BTD = random_inputs(B, sum(step_lengths), config.n_embd, seed=4)
    done = 0
    for T in step_lengths:
        chunk_BTD = np.ascontiguousarray(x_BTD[:, done : done + T])  # torch views it flat
        visible_BTS = causal_visible(start_B, T, done + T)
        real_BT = real_queries(visible_BTS)
        reference_BTD = hf_attention_step(hf_attention, chunk_BTD, visible_BTS, cache=hf_cache)
        use_kernel = decode_kernel and T == 1
        actual_BTD, cache = ours_attention_cached(chunk_BTD, cache, hf_attention, config, layer, use_kernel)
        what = f"attention, tokens {done}..{done + T - 1}{' (decode kernel)' if use_kernel else ''}"
        check(actual_BTD[real_BT], reference_BTD[real_BT], what=what, check_argmax=False)
        done += T
    assert int(cache.end_B[0]) == done


@pytest.mark.parametrize("variant", ["default", "scale-attn-by-inverse-layer-idx"])
def test_cached_attention_matches_transformers_with_a_kv_cache(variant, assert_matches_transformers):
    incremental_attention_matches(variant, [6, 3, 1, 1], decode_kernel=False, check=assert_matches_transformers)


def test_decode_attention_kernel_matches_transformers_with_a_kv_cache(assert_matches_transformers):
    if not kernels.kernels_available():
        pytest.skip("the native CPU kernels do not run here (no g++, not x86-64 Linux with AVX-512F, or not CPU)")
    incremental_attention_matches("default", [6, 1, 1, 1], decode_kernel=True, check=assert_matches_transformers)
