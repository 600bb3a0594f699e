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
    SamplingSettings,
    apply_repetition_penalty,
    first_argmax,
    flags_for,
    _fold_rows,
    next_tokens,
    row_keys,
    runtime_flags,
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
    rows = [SamplingSettings(**{"temperature": 1.0, **settings})] * B
    ours = warp_for_sampling(jnp.asarray(logits_BV), sampling_params(rows), flags_for(rows))
    np.testing.assert_array_equal(kept(ours), kept(scores.numpy()))
    assert 1 < kept(ours).sum(axis=1).min()  # the case is not degenerate
    np.testing.assert_allclose(np.asarray(ours)[kept(ours)], scores.numpy()[kept(ours)], rtol=1e-6)


def sorted_top_k_top_p(row_V: np.ndarray, top_k: int, top_p: float) -> np.ndarray:
    """Top-k then top-p by their definitions over the sorted row, the probability in float64."""
    best_V = -np.sort(-row_V)
    k = min(top_k, len(row_V)) if top_k > 0 else len(row_V)
    row_V = np.where(row_V < best_V[k - 1], -np.inf, row_V).astype(np.float32)
    if top_p >= 1.0:
        return row_V
    probs_V = np.exp(row_V.astype(np.float64) - row_V.max())
    probs_V /= probs_V.sum()
    kept = [v for v in np.unique(row_V[np.isfinite(row_V)]) if probs_V[row_V > v].sum() < top_p]
    return np.where(row_V < min(kept), -np.inf, row_V).astype(np.float32)


def test_top_k_and_top_p_found_by_bisection_keep_what_the_sorted_definition_keeps():
    # The thresholds come from bisections over the logits' bit patterns, not a sort (a sort of the
    # vocabulary cost more than a decode step): ties, banned tokens (-inf), a k past the vocabulary
    # and every top_p regime must keep exactly the tokens the sorted definition keeps.
    from jax_gpt2.sampling import apply_top_k, apply_top_p

    rng = np.random.default_rng(5)
    for case in range(60):
        rows_BV = (rng.normal(size=(B, V)) * rng.choice([0.1, 1.0, 30.0])).astype(np.float32)
        if case % 2 == 0:
            rows_BV = np.round(rows_BV)  # many ties
        if case % 3 == 0:
            rows_BV[:, rng.integers(0, V, V // 2)] = -np.inf
            rows_BV[:, 0] = 1.0
        top_k_B = rng.integers(0, V + 5, B).astype(np.int32)
        top_p_B = rng.choice([0.05, 0.5, 0.9, 0.999, 1.0], B).astype(np.float32)
        ours_BV = apply_top_p(apply_top_k(jnp.asarray(rows_BV), jnp.asarray(top_k_B)), jnp.asarray(top_p_B))
        for b in range(B):
            expected_V = sorted_top_k_top_p(rows_BV[b], int(top_k_B[b]), float(top_p_B[b]))
            np.testing.assert_array_equal(np.asarray(ours_BV[b]), expected_V, err_msg=f"case {case} row {b}")


def test_the_greedy_pick_is_numpys_argmax_with_ties_infinities_and_nans():
    rows_BV = np.random.default_rng(1).normal(0.0, 3.0, (6, V)).astype(np.float32)
    rows_BV[0, [7, 40, 299]] = 50.0  # a tie: the first index wins
    rows_BV[1, :] = -np.inf  # nothing finite: index 0
    rows_BV[2, [3, 250]] = np.inf
    rows_BV[3, [90, 12]] = np.nan  # NaN counts as the maximum, first NaN wins
    rows_BV[4, :] = 0.0
    rows_BV[5, V - 1] = 1e30  # the last index
    expected_B = np.argmax(rows_BV, axis=-1)
    assert expected_B.tolist() == [7, 0, 3, 12, 0, V - 1]
    assert np.asarray(jax.jit(first_argmax)(jnp.asarray(rows_BV))).tolist() == expected_B.tolist()
    assert np.asarray(jnp.argmax(jnp.asarray(rows_BV), axis=-1)).tolist() == expected_B.tolist()


def test_temperature_zero_rows_are_greedy_even_beside_sampling_rows(logits_BV):
    params = sampling_params([SamplingSettings(temperature=1.0)] * B)
    params = params.__class__(**{**params.__dict__, "temperature_B": jnp.array([0.0, 1.0, 0.0, 1.0])})
    keys_B2 = jax.random.split(jax.random.PRNGKey(0), B)
    flags = SamplerFlags(sample=True, filter=False, penalize=False)
    tokens_B = np.asarray(next_tokens(jnp.asarray(logits_BV), jnp.zeros((B, V), bool), jnp.zeros((B, V), jnp.int32), params, keys_B2, flags))
    assert tokens_B[0] == logits_BV[0].argmax()
    assert tokens_B[2] == logits_BV[2].argmax()


def test_sampled_frequencies_follow_softmax_of_logits_over_temperature():
    """Chi-square goodness of fit at significance 0.001, fixed seed: 20,000 draws over 6 tokens."""
    logits_V = np.array([2.0, 1.0, 0.5, 0.0, -1.0, -3.0], np.float32)
    temperature, draws = 0.7, 20_000
    logits_BV = jnp.broadcast_to(jnp.asarray(logits_V), (draws, logits_V.size))
    keys_B2 = jax.random.split(jax.random.PRNGKey(1234), draws)
    rows = [SamplingSettings(temperature=temperature)] * draws
    params, flags = sampling_params(rows), flags_for(rows)
    tokens_B = np.asarray(next_tokens(logits_BV, jnp.zeros(logits_BV.shape, bool), jnp.zeros(logits_BV.shape, jnp.int32), params, keys_B2, flags))
    observed = np.bincount(tokens_B, minlength=logits_V.size)

    def expected_counts(scaled_logits):
        probs = np.exp(scaled_logits.astype(np.float64) - scaled_logits.max())
        return probs / probs.sum() * observed.sum()

    assert stats.chisquare(observed, expected_counts(logits_V / temperature)).pvalue > 0.001
    # and the test has power: the untempered softmax is rejected
    assert stats.chisquare(observed, expected_counts(logits_V)).pvalue < 1e-6


@pytest.mark.parametrize(
    "settings",
    [
        dict(temperature=0.0),
        dict(temperature=0.0, repetition_penalty=1.3),
        dict(temperature=0.8, top_k=20),
        dict(temperature=1.1, top_p=0.8, min_p=0.02, repetition_penalty=1.2),
    ],
)
def test_flags_decided_at_run_time_pick_what_static_flags_pick(logits_BV, settings):
    """The server's compiled step decides each stage with lax.cond from the rows' values; the tokens
    (greedy, or drawn with the same keys) equal those of the step whose stages are fixed on the host."""
    rows = [SamplingSettings(**settings)] * B
    params = sampling_params(rows)
    seen_BV = jax.random.bernoulli(jax.random.PRNGKey(1), 0.2, (B, V))
    keys_B2 = jax.random.split(jax.random.PRNGKey(2), B)
    counts_BV = jax.random.randint(jax.random.PRNGKey(3), (B, V), 0, 3) * seen_BV
    static = next_tokens(jnp.asarray(logits_BV), seen_BV, counts_BV, params, keys_B2, flags_for(rows))
    active_B = jnp.ones((B,), bool)
    traced = jax.jit(lambda p: next_tokens(jnp.asarray(logits_BV), seen_BV, counts_BV, p, keys_B2,
                                           runtime_flags(p, active_B)))(params)  # fmt: skip
    np.testing.assert_array_equal(np.asarray(traced), np.asarray(static))


@pytest.mark.parametrize(
    "field, value",
    [
        ("max_new_tokens", -1), ("max_new_tokens", 2.5), ("temperature", -0.1), ("temperature", float("nan")),
        ("top_k", -1), ("top_k", 1.5), ("top_p", 0.0), ("top_p", 1.5), ("min_p", -0.1), ("min_p", 2.0),
        ("repetition_penalty", 0.0), ("seed", -1), ("seed", 2**32), ("stop", ("",)), ("stop", ["x"]),
    ],
)  # fmt: skip
def test_settings_out_of_range_raise_one_error_that_names_the_field(field, value):
    with pytest.raises(ValueError, match=field) as caught:
        SamplingSettings(**{field: value})
    assert caught.value.field == field


def test_a_draw_over_a_vocabulary_of_many_blocks_follows_the_softmax_and_never_takes_a_banned_token():
    """draw_tokens picks a block of DRAW_BLOCK tokens, then a token in it: over 700 tokens (three
    blocks, the last one short) with every 7th banned (-inf), 60,000 draws fit the softmax."""
    from jax_gpt2.sampling import DRAW_BLOCK, draw_tokens

    vocab, draws = 700, 60_000
    assert vocab > 2 * DRAW_BLOCK
    logits_V = (np.random.default_rng(4).normal(size=vocab) * 2.0).astype(np.float32)
    logits_V[::7] = -np.inf
    keys_B2 = jax.random.split(jax.random.PRNGKey(99), draws)
    tokens_B = np.asarray(jax.jit(draw_tokens)(keys_B2, jnp.broadcast_to(jnp.asarray(logits_V), (draws, vocab))))
    observed_V = np.bincount(tokens_B, minlength=vocab)
    assert observed_V[::7].sum() == 0
    allowed_V = np.isfinite(logits_V)
    probs_V = np.exp(logits_V[allowed_V].astype(np.float64) - logits_V[allowed_V].max())
    expected_V = probs_V / probs_V.sum() * draws
    assert stats.chisquare(observed_V[allowed_V], expected_V).pvalue > 0.001
    # the test has power: a flatter softmax is rejected
    flatter_V = np.exp(0.9 * (logits_V[allowed_V].astype(np.float64) - logits_V[allowed_V].max()))
    assert stats.chisquare(observed_V[allowed_V], flatter_V / flatter_V.sum() * draws).pvalue < 1e-6


def test_off_values_are_valid_settings():
    settings = SamplingSettings(max_new_tokens=0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0, seed=2**32 - 1)
    assert flags_for([settings]) == SamplerFlags(sample=False, filter=False, penalize=False)


def test_an_inactive_rows_settings_switch_no_stage_on():
    """A finished sequence's row keeps its settings; the server's step must not filter for it."""
    params = sampling_params([SamplingSettings(temperature=0.9, top_p=0.5, repetition_penalty=1.2), SamplingSettings()])
    flags = runtime_flags(params, jnp.array([False, True]))
    assert (bool(flags.sample), bool(flags.filter), bool(flags.penalize)) == (False, False, False)
    flags = runtime_flags(params, jnp.array([True, True]))
    assert (bool(flags.sample), bool(flags.filter), bool(flags.penalize)) == (True, True, True)


@pytest.mark.parametrize("seed", [0, 7, 2**31 - 1, 2**31, 2**32 - 1])
def test_row_keys_are_fold_in_of_the_seed_key(seed):
    """Each row's key is fold_in(PRNGKey(seed), index), computed eagerly here one row at a time, for
    seeds at both ends of the range and counts on both sides of a power-of-two width."""
    for count in (1, 2, 3, 5, 8, 9):
        indices = list(range(3, 3 + count))
        expected_B2 = np.stack([np.asarray(jax.random.fold_in(jax.random.PRNGKey(seed), i)) for i in indices])
        keys_B2 = row_keys(seed, indices)
        assert keys_B2.dtype == np.uint32
        assert keys_B2.shape == (count, 2)
        np.testing.assert_array_equal(keys_B2, expected_B2)


def test_row_keys_compile_once_per_power_of_two_width():
    _fold_rows.clear_cache()
    for count in (5, 6, 7, 8):
        row_keys(count, range(count))
    assert _fold_rows._cache_size() == 1  # every count from 5 to 8 shares width 8
    row_keys(1, range(9))
    assert _fold_rows._cache_size() == 2
