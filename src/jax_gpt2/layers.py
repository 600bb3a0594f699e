"""The building blocks of a GPT-2 block: pure functions on shape-suffixed arrays (jax, plus the CPU kernels).

Shape key: see model.py. Every function asserts shapes at trace time; none reads a traced value.
Two functions reach the kernels, each told explicitly whether to (use_kernels, the weights'
static field, decided at load): `matmul` (under `linear`) for the matmuls and `attention` for attention.
"""

import math

import jax
import jax.numpy as jnp

from jax_gpt2 import kernels, kvcache
from jax_gpt2.config import SUPPORTED_ACTIVATIONS
from jax_gpt2.weights import PackedMatrix

# Full float32 matmuls: GPUs would otherwise use TF32 and miss transformers' float32 logits by 1e-3.
# On CPU this changes nothing; bf16 weights still run bf16 matmuls.
PRECISION = jax.lax.Precision.HIGHEST


def layer_norm(
    x_BTD: jax.Array, scale_D: jax.Array, bias_D: jax.Array, eps: float, use_kernels: bool = False
) -> jax.Array:  # fmt: skip
    """LayerNorm over the last axis with biased variance, as torch.nn.LayerNorm computes it: by the
    native kernel for float32 activations where the weights use the kernels, else by XLA."""
    assert x_BTD.shape[-1] == scale_D.shape[0]
    assert scale_D.shape == bias_D.shape
    assert eps > 0
    if use_kernels and x_BTD.dtype == jnp.float32:
        D = x_BTD.shape[-1]
        out_MD = kernels.layer_norm_rows(x_BTD.reshape(-1, D), scale_D, bias_D, eps)
        return out_MD.reshape(x_BTD.shape)
    # Normalise in float32 even for bf16 activations: the variance of a 768-wide row loses too much in bf16.
    x32_BTD = x_BTD.astype(jnp.float32)
    mean_BT1 = jnp.mean(x32_BTD, axis=-1, keepdims=True)
    centered_BTD = x32_BTD - mean_BT1
    var_BT1 = jnp.mean(jnp.square(centered_BTD), axis=-1, keepdims=True)
    normed_BTD = centered_BTD * jax.lax.rsqrt(var_BT1 + eps)
    out_BTD = normed_BTD * scale_D.astype(jnp.float32) + bias_D.astype(jnp.float32)
    return out_BTD.astype(x_BTD.dtype)


_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def _gelu_tanh(x: jax.Array) -> jax.Array:
    # OpenAI's GPT-2 "gelu_new": the tanh approximation, written as transformers writes it.
    return 0.5 * x * (1.0 + jnp.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * jnp.power(x, 3.0))))


def _gelu_erf(x: jax.Array) -> jax.Array:
    return 0.5 * x * (1.0 + jax.lax.erf(x / math.sqrt(2.0)))


_ACTIVATIONS = {
    "gelu_new": _gelu_tanh,
    "gelu_fast": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_python_tanh": _gelu_tanh,
    "gelu_accurate": _gelu_tanh,
    "gelu": _gelu_erf,
    "gelu_python": _gelu_erf,
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
    "linear": lambda x: x,
}


# config accepts exactly the activations implemented here: a name added to one table only is an import error.
assert set(_ACTIVATIONS) == set(SUPPORTED_ACTIVATIONS), set(_ACTIVATIONS) ^ set(SUPPORTED_ACTIVATIONS)


def activation(name: str, x_BTF: jax.Array) -> jax.Array:
    """The MLP nonlinearity named by config.activation_function."""
    assert name in _ACTIVATIONS, f"unknown activation {name!r}"
    assert jnp.issubdtype(x_BTF.dtype, jnp.floating)
    y_BTF = _ACTIVATIONS[name](x_BTF)
    assert y_BTF.shape == x_BTF.shape
    return y_BTF


def matmul(x_BTI: jax.Array, w_IO: "jax.Array | PackedMatrix", use_kernels: bool) -> jax.Array:
    """x @ w: a PackedMatrix goes to the native kernel (use_kernels) or to XLA unpacked; a plain array to XLA's dot."""
    assert x_BTI.shape[-1] == w_IO.shape[0]
    assert isinstance(w_IO, PackedMatrix) or not use_kernels, "the kernels multiply packed matrices only"
    if isinstance(w_IO, PackedMatrix):
        return kernels.packed_matmul_BT(x_BTI, w_IO, use_kernels)
    y_BTO = jnp.einsum("BTI,IO->BTO", x_BTI, w_IO.astype(x_BTI.dtype), precision=PRECISION)
    assert y_BTO.shape == (*x_BTI.shape[:-1], w_IO.shape[1])
    return y_BTO


def linear(
    x_BTI: jax.Array, w_IO: "jax.Array | PackedMatrix", b_O: jax.Array, use_kernels: bool, gelu: bool = False,
    residual_BTO: jax.Array | None = None,
) -> jax.Array:  # fmt: skip
    """x @ w + b in HF's Conv1D layout (in, out), so checkpoints load without transposes; with
    `gelu`, GELU's tanh form of it; with `residual_BTO`, residual + that (a block's residual add).
    The kernels do all three inside the matmul (kernels.packed_matmul's epilogue), as each tile's
    results are finished; XLA does them after, in the same order, so the numbers are the same."""
    assert b_O.shape == (w_IO.shape[1],)
    assert residual_BTO is None or residual_BTO.shape == (*x_BTI.shape[:-1], w_IO.shape[1])
    if use_kernels and isinstance(w_IO, PackedMatrix):
        y_BTO = kernels.packed_matmul_BT(x_BTI, w_IO, True, b_O, gelu, residual_BTO)
        assert y_BTO.shape == (*x_BTI.shape[:-1], w_IO.shape[1])
        return y_BTO
    y_BTO = matmul(x_BTI, w_IO, use_kernels)
    y_BTO = y_BTO + b_O.astype(y_BTO.dtype)
    y_BTO = _gelu_tanh(y_BTO) if gelu else y_BTO
    return y_BTO if residual_BTO is None else residual_BTO + y_BTO


# The activation names that are GELU's tanh form: the kernels fuse these into the first MLP matmul.
TANH_GELUS = frozenset(name for name, function in _ACTIVATIONS.items() if function is _gelu_tanh)


def mlp(
    x_BTD, fc_w_DF, fc_b_F, proj_w_FD, proj_b_D, activation_name: str, use_kernels: bool,
    residual_BTD: jax.Array | None = None,
) -> jax.Array:  # fmt: skip
    """GPT-2's feed-forward: D -> F, nonlinearity, F -> D (then residual_BTD + that, if given: the
    block's residual add, inside the last matmul where the kernels run it)."""
    assert x_BTD.shape[-1] == fc_w_DF.shape[0]
    assert proj_w_FD.shape == fc_w_DF.shape[::-1]
    if activation_name in TANH_GELUS:
        hidden_BTF = linear(x_BTD, fc_w_DF, fc_b_F, use_kernels, gelu=True)
    else:
        hidden_BTF = activation(activation_name, linear(x_BTD, fc_w_DF, fc_b_F, use_kernels))
    out_BTD = linear(hidden_BTF, proj_w_FD, proj_b_D, use_kernels, residual_BTO=residual_BTD)
    assert out_BTD.shape == x_BTD.shape
    return out_BTD


def cached_attention(
    q_BTNH: jax.Array, k_BNSH: jax.Array, v_BNSH: jax.Array, mask_BTS: jax.Array, scale: jax.Array
) -> jax.Array:
    """Softmax attention of T new queries over the S slots of one layer's cache.

    mask_BTS is True where query t may see slot s. Masked scores get the float32 minimum rather
    than -inf, as transformers does, so a row with no visible slot (a left-pad query) gives a
    uniform, finite distribution instead of NaN. A bfloat16 cache is widened as it is read: the
    scores, the softmax and the weighted sum are float32 (for float32 queries) either way.
    """
    B, T, N, H = q_BTNH.shape
    assert k_BNSH.shape[:2] == (B, N)
    assert k_BNSH.shape[3] == H
    assert v_BNSH.shape == k_BNSH.shape
    assert mask_BTS.shape == (B, T, k_BNSH.shape[2])
    assert mask_BTS.dtype == jnp.bool_
    # Put q in the cache's (B, N, ., H) order first: given "BTNH,BNSH->BNTS" directly, XLA transposed
    # the whole cache on every call (measured: 6x slower decode attention at 1056 slots).
    q_BNTH = q_BTNH.transpose(0, 2, 1, 3)
    scores_BNTS = jnp.einsum("BNTH,BNSH->BNTS", q_BNTH, k_BNSH.astype(q_BTNH.dtype), precision=PRECISION)
    scores_BNTS = scores_BNTS.astype(jnp.float32) * scale
    scores_BNTS = jnp.where(mask_BTS[:, None, :, :], scores_BNTS, jnp.finfo(jnp.float32).min)
    probs_BNTS = jax.nn.softmax(scores_BNTS, axis=-1).astype(q_BTNH.dtype)
    out_BNTH = jnp.einsum("BNTS,BNSH->BNTH", probs_BNTS, v_BNSH.astype(q_BTNH.dtype), precision=PRECISION)
    out_BTNH = out_BNTH.transpose(0, 2, 1, 3)
    assert out_BTNH.shape == q_BTNH.shape
    return out_BTNH.astype(q_BTNH.dtype)


def causal_attention_in_blocks(
    q_BTNH: jax.Array, k_BNSH: jax.Array, v_BNSH: jax.Array, mask_BTS: jax.Array, scale, block: int
) -> jax.Array:
    """`cached_attention` for a prompt that fills the whole cache (T == S, so slot = position):
    query block [lo, hi) attends only to slots [0, hi), skipping the masked upper triangle.

    Exact: the skipped scores would get probability exp(float32 min - max) = 0. Measured on
    8 x 1024 tokens, 12 heads: 299 ms against 504 ms per layer with blocks of 256.
    """
    T, S = q_BTNH.shape[1], k_BNSH.shape[2]
    assert T == S, "only a prompt that fills the cache has its keys at slots [0, T)"
    assert block >= 1
    outputs = []
    for lo in range(0, T, block):
        hi = min(lo + block, T)
        q_block = q_BTNH[:, lo:hi]
        mask_block = mask_BTS[:, lo:hi, :hi]
        outputs.append(cached_attention(q_block, k_BNSH[:, :, :hi], v_BNSH[:, :, :hi], mask_block, scale))
    out_BTNH = jnp.concatenate(outputs, axis=1)
    assert out_BTNH.shape == q_BTNH.shape
    return out_BTNH


# Query block for prompts that fill the cache (full forward, perplexity windows): 256 measured best.
ATTENTION_BLOCK = 256


def can_use_decode_kernel(q_BTNH: jax.Array, k_LBNSH: jax.Array, use_kernels: bool) -> bool:
    """The native decode attention takes one float32 query per row, over a cache whose dtype it has a kernel for."""
    assert q_BTNH.ndim == 4
    assert k_LBNSH.ndim == 5
    one_query = q_BTNH.shape[1] == 1
    kv_dtype = kvcache.kv_dtype_of(k_LBNSH)
    return use_kernels and one_query and q_BTNH.dtype == jnp.float32 and kernels.has_decode_kernel(kv_dtype)


def can_use_prefill_kernel(q_BTNH: jax.Array, k_LBNSH: jax.Array, use_kernels: bool) -> bool:
    """The native many-query attention takes T > 1 float32 queries per row, over a cache whose dtype
    it has a kernel for."""
    assert q_BTNH.ndim == 4
    assert k_LBNSH.ndim == 5
    many_queries = q_BTNH.shape[1] > 1
    kv_dtype = kvcache.kv_dtype_of(k_LBNSH)
    return use_kernels and many_queries and q_BTNH.dtype == jnp.float32 and kernels.has_prefill_kernel(kv_dtype)


def attention(
    q_BTNH: jax.Array, k_LBNSH: jax.Array, v_LBNSH: jax.Array, start_B: jax.Array, end_B: jax.Array,
    mask_BTS: jax.Array, layer: int, scale: float, use_kernels: bool, qkv_BTE: jax.Array | None = None,
) -> jax.Array:  # fmt: skip
    """Attention of T new queries over layer `layer` of the cache (already holding their own keys),
    by one of four routes, each chosen from static facts (shapes, dtypes, use_kernels):

    - kernels on, one query per row: the native decode kernel, reading the cache in place;
    - kernels on, many queries (prefill, scoring and perplexity windows, verify passes): the native
      many-query kernel, in place too, with no (B, N, T, S) score array and no masked triangle;
    - kernels off, a prompt that fills the whole cache (T == S, a full forward or a perplexity
      window), longer than one block: `causal_attention_in_blocks`, skipping the masked upper triangle;
    - anything else (prefill into a longer cache, decode without kernels): `cached_attention`.

    `qkv_BTE`, where given, is the fused projection q_BTNH is the first third of (HF's order): the
    many-query kernel reads the queries out of it in place rather than from a sliced copy.
    """
    B, T, N, H = q_BTNH.shape
    assert k_LBNSH.shape[1] >= B  # rows [0, B) of the cache are the batch (see kvcache.py)
    assert k_LBNSH.shape[2] == N
    assert mask_BTS.shape == (B, T, k_LBNSH.shape[3])
    if can_use_decode_kernel(q_BTNH, k_LBNSH, use_kernels):
        return kernels.decode_attention(q_BTNH, k_LBNSH, v_LBNSH, start_B, end_B, layer, scale)
    if can_use_prefill_kernel(q_BTNH, k_LBNSH, use_kernels):
        q_BTE = q_BTNH.reshape(B, T, N * H) if qkv_BTE is None else qkv_BTE
        assert q_BTE.shape[:2] == (B, T)
        return kernels.prefill_attention(q_BTE, k_LBNSH, v_LBNSH, start_B, end_B, layer, scale)
    k_BNSH, v_BNSH = kvcache.values(k_LBNSH[layer, :B]), kvcache.values(v_LBNSH[layer, :B])
    if T == k_BNSH.shape[2] and T > ATTENTION_BLOCK:
        out_BTNH = causal_attention_in_blocks(q_BTNH, k_BNSH, v_BNSH, mask_BTS, scale, ATTENTION_BLOCK)
    else:
        out_BTNH = cached_attention(q_BTNH, k_BNSH, v_BNSH, mask_BTS, scale)
    assert out_BTNH.shape == q_BTNH.shape
    return out_BTNH
