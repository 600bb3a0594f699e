"""The logits processors equal transformers' on the same logits, and sampling draws from
softmax(logits / temperature)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from scipy import stats
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from jax_gpt2.sampling import (
    SamplerFlags,
    apply_repetition_penalty,
    flags_for,
    next_tokens,
    sampling_params,
    warp_for_sampling,
)

B, V = 4, 300


@pytest.fixture
def logits_BV():
    # Spread wide enough that top-p and min-p keep a handful of tokens, not one and not all.
    return np.random.default_rng(0).normal(0.0, 3.0, (B, V)).astype(np.float32)


def kept(scores) -> np.ndarray:
    return np.isfinite(np.asarray(scores))


def test_repetition_penalty_equals_transformers_processor(logits_BV):
    history_BT = np.random.default_rng(1).integers(0, V, (B, 12))
    seen_BV = np.zeros((B, V), bool)
    np.put_along_axis(seen_BV, history_BT, True, axis=1)
    reference = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor(history_BT), torch.tensor(logits_BV)).numpy()
    ours = apply_repetition_penalty(jnp.asarray(logits_BV), jnp.asarray(seen_BV), jnp.full((B,), 1.3))
    # Equal to one float32 ulp: XLA rewrites division by a per-row (broadcast) penalty as multiplication
    # by its reciprocal, which can round the last bit differently from torch's true division.
    np.testing.assert_allclose(np.asarray(ours), reference, rtol=1.2e-7, atol=0)
    np.testing.assert_array_equal(np.asarray(ours) != logits_BV, seen_BV)


@pytest.mark.parametrize(
    "settings",
    [
        dict(top_k=7),
        dict(top_p=0.8),
        dict(min_p=0.1),
        dict(top_k=50, top_p=0.9),
        dict(top_k=50, top_p=0.95, min_p=0.05),
        dict(temperature=0.7, top_k=20, top_p=0.9, min_p=0.02),
    ],
)
def test_warping_keeps_exactly_the_tokens_transformers_keeps(logits_BV, settings):
    temperature = settings.get("temperature", 1.0)
    scores = torch.tensor(logits_BV)
    warpers = [TemperatureLogitsWarper(temperature)]
    if "top_k" in settings:
        warpers.append(TopKLogitsWarper(settings["top_k"]))
    if "top_p" in settings:
        warpers.append(TopPLogitsWarper(settings["top_p"]))
    if "min_p" in settings:
        warpers.append(MinPLogitsWarper(settings["min_p"]))
    for warper in warpers:
        scores = warper(None, scores)
    params = sampling_params(B, **{"temperature": 1.0, **settings})
    ours = warp_for_sampling(jnp.asarray(logits_BV), params, flags_for(**{"temperature": 1.0, **settings}))
    np.testing.assert_array_equal(kept(ours), kept(scores.numpy()))
    assert 1 < kept(ours).sum(axis=1).min()  # the case is not degenerate
    np.testing.assert_allclose(np.asarray(ours)[kept(ours)], scores.numpy()[kept(ours)], rtol=1e-6)


def test_temperature_zero_rows_are_greedy_even_beside_sampling_rows(logits_BV):
    params = sampling_params(B, temperature=1.0)
    params = params.__class__(**{**params.__dict__, "temperature_B": jnp.array([0.0, 1.0, 0.0, 1.0])})
    keys_B = jax.random.split(jax.random.PRNGKey(0), B)
    flags = SamplerFlags(sample=True, filter=False, penalize=False)
    tokens_B = np.asarray(next_tokens(jnp.asarray(logits_BV), jnp.zeros((B, V), bool), params, keys_B, flags))
    assert tokens_B[0] == logits_BV[0].argmax()
    assert tokens_B[2] == logits_BV[2].argmax()


def test_sampled_frequencies_follow_softmax_of_logits_over_temperature():
    """Chi-square goodness of fit at significance 0.001, fixed seed: 20,000 draws over 6 tokens."""
    logits_V = np.array([2.0, 1.0, 0.5, 0.0, -1.0, -3.0], np.float32)
    temperature, draws = 0.7, 20_000
    logits_BV = jnp.broadcast_to(jnp.asarray(logits_V), (draws, logits_V.size))
    keys_B = jax.random.split(jax.random.PRNGKey(1234), draws)
    params = sampling_params(draws, temperature=temperature)
    flags = flags_for(temperature=temperature)
    tokens_B = np.asarray(next_tokens(logits_BV, jnp.zeros(logits_BV.shape, bool), params, keys_B, flags))
    observed = np.bincount(tokens_B, minlength=logits_V.size)

    def expected_counts(scaled_logits):
        probs = np.exp(scaled_logits.astype(np.float64) - scaled_logits.max())
        return probs / probs.sum() * observed.sum()

    assert stats.chisquare(observed, expected_counts(logits_V / temperature)).pvalue > 0.001
    # and the test has power: the untempered softmax is rejected
    assert stats.chisquare(observed, expected_counts(logits_V)).pvalue < 1e-6
