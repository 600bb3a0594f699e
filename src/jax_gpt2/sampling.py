"""Logits processors and the sampler: pure, jit-friendly, one parameter value per row.

Applied in transformers' order: repetition penalty, then (sampling rows only) temperature, top-k,
top-p, min-p, then a draw from the softmax. Each control has an "off" value so that rows with
different settings share one compiled step (the server batches different requests together):

    temperature 0 -> greedy (argmax after the repetition penalty, as transformers' greedy search)
    top_k 0 -> off      top_p 1 -> off      min_p 0 -> off      repetition_penalty 1 -> off

Which processors run at all is decided once, on the host, by `SamplerFlags` (a static argument):
a greedy batch never sorts the vocabulary.
"""

import dataclasses

import jax
import jax.numpy as jnp

FILTERED = -jnp.inf  # transformers' filter_value: a removed token gets probability exactly 0


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplingParams:
    temperature_B: jax.Array  # float32; 0 means greedy
    top_k_B: jax.Array  # int32; 0 means off
    top_p_B: jax.Array  # float32 in (0, 1]; 1 means off
    min_p_B: jax.Array  # float32 in [0, 1]; 0 means off
    repetition_penalty_B: jax.Array  # float32 > 0; 1 means off


@dataclasses.dataclass(frozen=True)
class SamplerFlags:
    """Which stages any row needs: static, so unused stages are not even traced."""

    sample: bool  # some row has temperature > 0
    filter: bool  # some sampling row uses top_k, top_p or min_p
    penalize: bool  # some row has repetition_penalty != 1


def sampling_params(
    batch: int, temperature=0.0, top_k=None, top_p=None, min_p=None, repetition_penalty=None
) -> SamplingParams:
    """The same settings for every row, with None meaning off (host values; validated by the caller)."""
    assert batch >= 1
    assert temperature >= 0

    def full(value, dtype):
        return jnp.full((batch,), value, dtype)

    return SamplingParams(
        temperature_B=full(temperature, jnp.float32),
        top_k_B=full(0 if top_k is None else top_k, jnp.int32),
        top_p_B=full(1.0 if top_p is None else top_p, jnp.float32),
        min_p_B=full(0.0 if min_p is None else min_p, jnp.float32),
        repetition_penalty_B=full(1.0 if repetition_penalty is None else repetition_penalty, jnp.float32),
    )


def flags_for(temperature=0.0, top_k=None, top_p=None, min_p=None, repetition_penalty=None) -> SamplerFlags:
    sample = temperature > 0
    uses_filter = bool(top_k) or (top_p is not None and top_p < 1.0) or bool(min_p)
    penalize = repetition_penalty is not None and repetition_penalty != 1.0
    return SamplerFlags(sample=sample, filter=sample and uses_filter, penalize=penalize)


def apply_repetition_penalty(logits_BV: jax.Array, seen_BV: jax.Array, penalty_B: jax.Array) -> jax.Array:
    """Make every token already in the row (prompt or output) less likely: divide a positive logit by
    the penalty, multiply a negative one (CTRL's rule, as transformers applies it)."""
    assert logits_BV.shape == seen_BV.shape
    assert penalty_B.shape == logits_BV.shape[:1]
    penalty_B1 = penalty_B[:, None]
    penalized_BV = jnp.where(logits_BV < 0, logits_BV * penalty_B1, logits_BV / penalty_B1)
    return jnp.where(seen_BV, penalized_BV, logits_BV)


def apply_top_k(
    logits_BV: jax.Array, sorted_desc_BV: jax.Array, top_k_B: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Keep the tokens scoring at least the k-th best (ties at the k-th all stay, as in transformers).

    Returns the filtered logits and the filtered sorted logits (still sorted), for top-p to use.
    """
    vocab = logits_BV.shape[-1]
    assert sorted_desc_BV.shape == logits_BV.shape
    assert top_k_B.shape == logits_BV.shape[:1]
    k_B = jnp.where(top_k_B > 0, jnp.minimum(top_k_B, vocab), vocab)
    kth_B1 = jnp.take_along_axis(sorted_desc_BV, (k_B - 1)[:, None], axis=-1)
    filtered_BV = jnp.where(logits_BV < kth_B1, FILTERED, logits_BV)
    return filtered_BV, jnp.where(sorted_desc_BV < kth_B1, FILTERED, sorted_desc_BV)


def apply_top_p(logits_BV: jax.Array, sorted_desc_BV: jax.Array, top_p_B: jax.Array) -> jax.Array:
    """Keep the smallest set of best tokens whose probability reaches top_p (the best token always stays).

    transformers removes a token when the probability of all tokens at or below it is <= 1 - top_p;
    in descending order that is: the probability of the tokens strictly above it is >= top_p.
    """
    assert sorted_desc_BV.shape == logits_BV.shape
    assert top_p_B.shape == logits_BV.shape[:1]
    probs_BV = jax.nn.softmax(sorted_desc_BV, axis=-1)
    above_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
    keep_sorted_BV = (above_BV < top_p_B[:, None]) | (top_p_B[:, None] >= 1.0)
    # The kept tokens are a prefix of the sorted order: the smallest kept value is the cutoff.
    cutoff_B1 = jnp.min(jnp.where(keep_sorted_BV, sorted_desc_BV, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits_BV < cutoff_B1, FILTERED, logits_BV)


def apply_min_p(logits_BV: jax.Array, min_p_B: jax.Array) -> jax.Array:
    """Drop tokens whose probability is below min_p times the best token's probability (min_p 0: none)."""
    assert min_p_B.shape == logits_BV.shape[:1]
    assert logits_BV.ndim == 2
    probs_BV = jax.nn.softmax(logits_BV, axis=-1)
    threshold_B1 = min_p_B[:, None] * jnp.max(probs_BV, axis=-1, keepdims=True)
    return jnp.where(probs_BV < threshold_B1, FILTERED, logits_BV)


def warp_for_sampling(logits_BV: jax.Array, params: SamplingParams, flags: SamplerFlags) -> jax.Array:
    """Temperature, then top-k, top-p and min-p: the distribution a sampling row draws from."""
    assert flags.sample
    assert logits_BV.ndim == 2
    temperature_B1 = jnp.where(params.temperature_B > 0, params.temperature_B, 1.0)[:, None]
    logits_BV = logits_BV / temperature_B1
    if flags.filter:
        sorted_desc_BV = -jnp.sort(-logits_BV, axis=-1)
        logits_BV, sorted_desc_BV = apply_top_k(logits_BV, sorted_desc_BV, params.top_k_B)
        logits_BV = apply_top_p(logits_BV, sorted_desc_BV, params.top_p_B)
        logits_BV = apply_min_p(logits_BV, params.min_p_B)  # min_p 0 removes nothing
    return logits_BV


def pick_logits(logits_BV: jax.Array, seen_BV: jax.Array, params: SamplingParams, flags: SamplerFlags) -> jax.Array:
    """The logits each row's next token is picked from: repetition-penalized, then for sampling rows
    warped (temperature, top-k, top-p, min-p). A greedy row takes their argmax, a sampling row draws
    from their softmax; so their log-softmax is the distribution a token was chosen from."""
    assert logits_BV.ndim == 2
    assert seen_BV.shape == logits_BV.shape
    logits_BV = logits_BV.astype(jnp.float32)
    if flags.penalize:
        logits_BV = apply_repetition_penalty(logits_BV, seen_BV, params.repetition_penalty_B)
    if not flags.sample:
        return logits_BV
    warped_BV = warp_for_sampling(logits_BV, params, flags)
    return jnp.where(params.temperature_B[:, None] > 0, warped_BV, logits_BV)


def choose_tokens(picked_BV: jax.Array, params: SamplingParams, keys_B: jax.Array, flags: SamplerFlags) -> jax.Array:
    """One token per row from `pick_logits`' output: argmax for greedy rows, a draw for sampling rows."""
    assert picked_BV.ndim == 2
    assert keys_B.shape[0] == picked_BV.shape[0]
    greedy_B = jnp.argmax(picked_BV, axis=-1).astype(jnp.int32)
    if not flags.sample:
        return greedy_B
    sampled_B = jax.vmap(jax.random.categorical)(keys_B, picked_BV).astype(jnp.int32)
    tokens_B = jnp.where(params.temperature_B > 0, sampled_B, greedy_B)
    assert tokens_B.shape == picked_BV.shape[:1]
    return tokens_B


def next_tokens(
    logits_BV: jax.Array, seen_BV: jax.Array, params: SamplingParams, keys_B: jax.Array, flags: SamplerFlags
) -> jax.Array:
    """One token per row: argmax for greedy rows, a draw from the warped softmax for sampling rows."""
    assert logits_BV.ndim == 2
    assert keys_B.shape[0] == logits_BV.shape[0]
    return choose_tokens(pick_logits(logits_BV, seen_BV, params, flags), params, keys_B, flags)
