"""Speculative decoding is exact: greedy tokens equal plain decoding's token for token (ragged
batches, eos, max_new_tokens, streaming), sampled tokens follow the same distribution (a
chi-square test against plain sampling), and the drafts really were verified and accepted (a test
whose speculation never ran would prove nothing)."""

import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from checkpoints import TINY, hf_config, random_hf_model, save_safetensors
from jax_gpt2 import DraftModel, PromptLookup, load_config, load_weights
from jax_gpt2.generate import generate, generate_speculative, settings_from_arguments, stream_generate
from jax_gpt2.speculate import lookup_draft

# Repeating prompts: the lookups hit, and a random model's greedy output falls into loops.
PROMPTS = [[5, 6, 7, 8, 5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 1, 2, 3], [42], [9, 9, 9, 9, 9]]
FIXED = PromptLookup(max_draft=4, adaptive=False)  # drafts whenever a lookup hits: every path runs
# Adaptive, with passes priced as a host where four rows of a few positions cost little: PASS_COSTS'
# gpt2-shape prices at batch 4 make every width dearer than any gain, and the batch never drafts.
CHEAP_PASSES = PromptLookup(pass_costs=((4, (1.0, 1.02, 1.04, 1.06, 1.08, 1.1)),))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    save_safetensors(random_hf_model(hf_config(**dict(TINY, n_positions=64)), std=0.3), folder)
    return load_weights(folder), load_config(folder)


def speculative(prompts, weights, config, speculate, eos_token_id=None, **sampling):
    """(tokens, stats) of a speculative generate call with generate's keyword arguments."""
    arguments = dict(max_new_tokens=24, temperature=0.0, top_k=None, top_p=None, min_p=None,
                     repetition_penalty=None, seed=0) | sampling  # fmt: skip
    settings = settings_from_arguments(**arguments)
    return generate_speculative(prompts, weights, config, settings, eos_token_id, np.float32, speculate)


@pytest.mark.parametrize("speculate", [FIXED, PromptLookup(max_draft=1, adaptive=False), CHEAP_PASSES])
def test_greedy_tokens_equal_plain_decoding_for_a_ragged_batch(model, speculate):
    weights, config = model
    tokens, stats = speculative(PROMPTS, weights, config, speculate)
    assert tokens == generate(PROMPTS, weights, config, max_new_tokens=24)
    assert stats.accepted_B.sum() > 0, "no draft was accepted: the test proved nothing"
    assert (stats.accepted_B <= stats.drafted_B).all()


def test_the_public_generate_takes_speculate(model):
    weights, config = model
    plain = generate(PROMPTS, weights, config, max_new_tokens=20, repetition_penalty=1.3)
    assert generate(PROMPTS, weights, config, max_new_tokens=20, repetition_penalty=1.3, speculate=FIXED) == plain


@pytest.mark.parametrize("max_new_tokens", [1, 2, 3, 7])
def test_max_new_tokens_ends_each_row_at_the_same_place(model, max_new_tokens):
    weights, config = model
    tokens, _ = speculative(PROMPTS, weights, config, FIXED, max_new_tokens=max_new_tokens)
    assert tokens == generate(PROMPTS, weights, config, max_new_tokens=max_new_tokens)
    assert all(len(row) == max_new_tokens for row in tokens)


def test_each_row_stops_at_its_own_eos_inside_an_accepted_draft(model):
    weights, config = model
    free_run = generate(PROMPTS, weights, config, max_new_tokens=24)
    eos = free_run[3][5]
    tokens, stats = speculative(PROMPTS, weights, config, FIXED, eos_token_id=[eos])
    assert tokens == generate(PROMPTS, weights, config, max_new_tokens=24, eos_token_id=eos)
    assert any(row[-1] == eos and len(row) < 24 for row in tokens)
    assert stats.accepted_B.sum() > 0


def test_greedy_repetition_penalty_applies_at_every_verified_position(model):
    weights, config = model
    tokens, stats = speculative(PROMPTS, weights, config, FIXED, repetition_penalty=1.2)
    assert tokens == generate(PROMPTS, weights, config, max_new_tokens=24, repetition_penalty=1.2)
    assert stats.accepted_B.sum() > 0


# Processors that read the row's output so far (issue 25's): each verify position must see the
# drafts before it as output, or a penalized draft would be accepted where plain decoding differs.
OUTPUT_PROCESSORS = [
    dict(frequency_penalty=1.5), dict(presence_penalty=-1.0), dict(frequency_penalty=0.7, presence_penalty=0.9),
    dict(logit_bias={7: 5.0, 8: -100.0}),
]


@pytest.mark.parametrize("processors", OUTPUT_PROCESSORS)
def test_greedy_output_penalties_and_logit_bias_apply_at_every_verified_position(model, processors):
    weights, config = model
    plain = generate(PROMPTS, weights, config, max_new_tokens=24, **processors)
    assert plain != generate(PROMPTS, weights, config, max_new_tokens=24), "the processor changed nothing"
    tokens = generate(PROMPTS, weights, config, max_new_tokens=24, speculate=FIXED, **processors)
    assert tokens == plain


@pytest.mark.parametrize("chunk_steps", [1, 3])
def test_streaming_yields_the_same_steps_as_plain_streaming(model, chunk_steps):
    weights, config = model
    eos = generate(PROMPTS, weights, config, max_new_tokens=16)[1][6]
    plain = list(stream_generate(PROMPTS, weights, config, max_new_tokens=16, eos_token_id=eos))
    spec = stream_generate(PROMPTS, weights, config, max_new_tokens=16, eos_token_id=eos, chunk_steps=chunk_steps,
                           speculate=FIXED)  # fmt: skip
    assert list(spec) == plain


def test_a_bad_speculate_argument_is_a_value_error(model):
    weights, config = model
    with pytest.raises(ValueError, match="PromptLookup"):
        generate(PROMPTS, weights, config, max_new_tokens=4, speculate="lookup")
    with pytest.raises(ValueError, match="max_draft"):
        PromptLookup(max_draft=0)


def draft_of(text: list[int], lookup: PromptLookup) -> tuple[list[int], bool]:
    history_BS = np.array([[0, 0, *text, 0, 0, 0]], np.int32)  # two slots of left padding, spare slots after
    draft_BT, found_B = lookup_draft(history_BS, np.array([2]), np.array([2 + len(text) - 1]), lookup)
    return np.asarray(draft_BT)[0].tolist(), bool(found_B[0])


def test_the_draft_follows_the_latest_occurrence_of_the_longest_ngram():
    lookup = PromptLookup(max_draft=3, adaptive=False)
    # "2 3" occurs twice before the end: the latest one (followed by 9) wins over the first (followed by 4)
    assert draft_of([1, 2, 3, 4, 5, 2, 3, 9, 8, 7, 2, 3], lookup) == ([9, 8, 7], True)
    # the 3-gram "5 2 3" beats the later 1-gram match of "3"
    assert draft_of([5, 2, 3, 6, 6, 6, 3, 1, 5, 2, 3], lookup) == ([6, 6, 6], True)


def test_a_continuation_that_reaches_the_end_goes_on_with_the_draft_itself():
    assert draft_of([7, 1, 2, 1, 2], PromptLookup(max_draft=5, adaptive=False)) == ([1, 2, 1, 2, 1], True)


def test_no_occurrence_means_no_draft():
    assert draft_of([1, 2, 3, 4], PromptLookup(max_draft=3, adaptive=False))[1] is False
    # the padding before the text (zeros) is never matched
    assert draft_of([5, 0], PromptLookup(max_draft=3, min_ngram=1, adaptive=False))[1] is False


def six_token_model(folder, n_layer: int = 2, seed: int = 0):
    save_safetensors(random_hf_model(hf_config(**dict(TINY, vocab_size=6, n_positions=32, n_layer=n_layer)), std=0.15,
                                     seed=seed), folder)  # fmt: skip
    return load_weights(folder), load_config(folder)


@pytest.mark.parametrize("drafter", ["lookup", "draft-model"])
def test_sampled_tokens_follow_the_distribution_of_plain_sampling(tmp_path, drafter):
    """Many rows (each its own random stream) sampled with and without speculation: the joint counts of
    tokens 3 and 4 must not tell the two apart (chi-square, p > 0.001), while speculation really ran."""
    weights, config = six_token_model(tmp_path / "target")
    if drafter == "lookup":
        speculate = PromptLookup(max_draft=3, adaptive=False)
    else:
        speculate = DraftModel(*six_token_model(tmp_path / "draft", n_layer=1, seed=1), max_draft=3, adaptive=False)
    prompts = [[1, 2, 3, 1, 2, 3, 1, 2]] * 3000
    sampling = dict(max_new_tokens=5, temperature=1.3, top_k=5, repetition_penalty=1.1, seed=1)
    plain = np.array(generate(prompts, weights, config, **sampling))
    spec, stats = speculative(prompts, weights, config, speculate, **sampling)
    spec = np.array(spec)
    assert stats.accepted_B.sum() > 1000, "too few drafts accepted to test the acceptance rule"
    assert (stats.drafted_B - stats.accepted_B).sum() > 1000, "too few drafts rejected to test the residual"
    cells = config.vocab_size**2
    counts = [np.bincount(run[:, 3] * config.vocab_size + run[:, 4], minlength=cells) for run in (plain, spec)]
    table = np.array(counts)[:, np.array(counts).sum(axis=0) > 0]
    assert scipy.stats.chi2_contingency(table).pvalue > 1e-3
    for position in range(5):  # and each position's marginal
        marginal = [np.bincount(run[:, position], minlength=config.vocab_size) for run in (plain, spec)]
        marginal = np.array(marginal)[:, np.array(marginal).sum(axis=0) > 0]
        assert scipy.stats.chi2_contingency(marginal).pvalue > 1e-3


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A tiny random checkpoint with a byte-level BPE trained to its vocabulary size, for the CLI."""
    from jax_gpt2.tools.random_model import train_tokenizer

    folder = tmp_path_factory.mktemp("tiny-cli")
    vocab_size = train_tokenizer(folder, 300)
    save_safetensors(random_hf_model(hf_config(**{**TINY, "vocab_size": vocab_size}), std=0.3), folder)
    return folder


def test_the_cli_prints_the_same_text_with_speculate_lookup_stop_strings_included(tiny_model_dir, capsys):
    from jax_gpt2.cli import main

    args = ["generate", "the cache the cache the", "--model", str(tiny_model_dir), "--max-new-tokens", "16",
            "--ignore-eos"]  # fmt: skip
    assert main(args) == 0
    full = capsys.readouterr().out
    stop = full.rstrip("\n")[-6:-4]  # two characters from late in the continuation
    runs = []
    for extra in ([], ["--speculate", "lookup", "--max-draft", "4"], ["--speculate", "lookup", "--fixed-draft"]):
        assert main([*args, "--stop", stop, *extra]) == 0
        runs.append(capsys.readouterr().out)
    assert len(runs[0]) < len(full), "the stop string cut nothing"
    assert runs[1] == runs[0]
    assert runs[2] == runs[0]
    assert main([*args, "--speculate", "lookup", "--fixed-draft"]) == 0
    assert capsys.readouterr().out == full


def test_the_cli_batch_with_speculate_lookup_prints_the_same_texts(tiny_model_dir, tmp_path, capsys):
    from jax_gpt2.cli import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hello Hello Hello\nThe cache\nA token a token a\n")
    args = ["generate", "--file", str(prompts), "--model", str(tiny_model_dir), "--max-new-tokens", "12"]
    assert main(args) == 0
    plain = capsys.readouterr().out
    assert main([*args, "--speculate", "lookup", "--fixed-draft"]) == 0
    assert capsys.readouterr().out == plain


def test_the_bench_reports_speculative_beside_plain_decoding(tmp_path, capsys):
    import json

    from jax_gpt2.cli import main

    out = tmp_path / "speculative.json"
    args = ["bench", "--preset", "distilgpt2", "--layers", "1", "--dtypes", "fp32", "--batch-sizes", "1",
            "--new-tokens", "3", "--repeats", "1", "--speculate", "lookup", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    results = json.loads(out.read_text())
    assert [row["workload"] for row in results["rows"]] == ["loop", "repeat", "sampled"]
    for row in results["rows"]:
        assert row["plain_tok_s"]["median"] > 0
        assert row["speculative_tok_s"]["median"] > 0
        assert 0 <= row["acceptance_rate"] <= 1
    assert sorted(int(k) for k in results["costs"][0]["widths"]) == list(range(8))  # T = 1..8, as PASS_COSTS
    assert "acc/pass" in capsys.readouterr().out


@pytest.fixture(scope="module")
def draft(tmp_path_factory):
    """A one-layer random model of the same vocabulary: a poor draft, so both outcomes occur."""
    folder = tmp_path_factory.mktemp("draft")
    save_safetensors(random_hf_model(hf_config(**dict(TINY, n_positions=64, n_layer=1)), std=0.3, seed=1), folder)
    return load_weights(folder), load_config(folder)


def test_a_draft_model_gives_the_same_greedy_tokens_and_streams(model, draft):
    weights, config = model
    speculate = DraftModel(*draft, max_draft=3, adaptive=False)
    tokens, stats = speculative(PROMPTS, weights, config, speculate)
    assert tokens == generate(PROMPTS, weights, config, max_new_tokens=24)
    assert stats.drafted_B.sum() > stats.accepted_B.sum()
    streamed = stream_generate(PROMPTS, weights, config, max_new_tokens=10, speculate=speculate, chunk_steps=2)
    assert list(streamed) == list(stream_generate(PROMPTS, weights, config, max_new_tokens=10))


def test_the_model_drafting_for_itself_has_every_greedy_draft_accepted(model):
    """The draft's own cache must hold exactly the accepted tokens: with the model as its own draft,
    every greedy draft agrees (a stale or shifted draft cache would make it disagree)."""
    weights, config = model
    tokens, stats = speculative(PROMPTS, weights, config, DraftModel(weights, config, max_draft=4, adaptive=False))
    assert tokens == generate(PROMPTS, weights, config, max_new_tokens=24)
    assert (stats.accepted_B == stats.drafted_B).all()
    assert stats.accepted_B.sum() >= 4 * 16


def test_an_adaptive_draft_model_drafts_wide_when_it_is_cheap_and_right_and_stops_when_it_is_wrong(model, draft):
    """The width weighs each draft step's price: the model as its own draft at a token's price of 1%
    of a step is always right, so it drafts wide every pass; priced as what it is (a whole step a
    token) the same drafts buy nothing, and it takes plain steps. A small random draft that is
    rarely right, priced cheap enough that a new row's prior makes it try, stops drafting after a
    few passes. Greedy tokens are the plain ones throughout."""
    weights, config = model
    plain = generate(PROMPTS, weights, config, max_new_tokens=24)
    cheap = DraftModel(weights, config, max_draft=4, step_cost=0.01)
    tokens, stats = speculative(PROMPTS, weights, config, cheap)
    assert tokens == plain
    assert (stats.accepted_B == stats.drafted_B).all()
    assert stats.accepted_B.sum() >= 3 * 16, "nearly every pass drafts the widest"
    tokens, stats = speculative(PROMPTS, weights, config, DraftModel(weights, config, max_draft=4))
    assert tokens == plain
    assert stats.drafted_B.sum() == 0, "a draft step as dear as the model's own never pays"
    tokens, adaptive = speculative(PROMPTS, weights, config, DraftModel(*draft, max_draft=3, step_cost=0.05))
    _, fixed = speculative(PROMPTS, weights, config, DraftModel(*draft, max_draft=3, adaptive=False))
    assert tokens == plain
    assert fixed.accepted_B.sum() < fixed.drafted_B.sum() / 2, "the random draft is mostly wrong"
    assert 0 < adaptive.drafted_B.sum() < fixed.drafted_B.sum() / 2, "it tries, then stops"


def test_a_draft_step_is_priced_by_the_weights_it_reads(model, draft):
    from jax_gpt2.speculate import pass_prices, step_bytes

    weights, config = model
    drafter = DraftModel(*draft, max_draft=4)
    ratio = step_bytes(drafter.weights) / step_bytes(weights)
    assert 0 < ratio < 1, "the draft has fewer layers"
    verify_only = drafter.costs(np.float32, 2)
    prices = pass_prices(drafter, weights, 2)
    assert drafter.widths == (0, 1, 2, 4)
    np.testing.assert_allclose(prices, [cost + width * ratio for cost, width in zip(verify_only, drafter.widths)])
    assert prices[0] == verify_only[0] == 1.0, "a plain step runs no draft"
    with pytest.raises(ValueError, match="step_cost"):
        DraftModel(*draft, step_cost=0.0)


def test_a_draft_model_of_another_vocabulary_is_a_clear_error(model, tmp_path):
    weights, config = model
    other = tmp_path / "other-vocab"
    save_safetensors(random_hf_model(hf_config(**dict(TINY, vocab_size=50, n_positions=64, n_layer=1)), std=0.3), other)
    with pytest.raises(ValueError, match="vocabulary"):
        generate(PROMPTS, weights, config, max_new_tokens=4, speculate=DraftModel(load_weights(other), load_config(other)))


def test_each_verify_position_counts_the_tokens_before_it_as_output():
    """picked_at_positions equals pick_logits run position by position, where position t has the row's
    output so far plus ids_BT[:, :t + 1] (repeated ids within one pass, so the counts matter)."""
    from jax_gpt2.sampling import SamplingSettings, flags_for, pick_logits, sampling_params
    from jax_gpt2.speculate import picked_at_positions

    B, T, V = 2, 5, 11
    rng = np.random.default_rng(0)
    logits_BTV = jnp.asarray(rng.normal(size=(B, T, V)), jnp.float32)
    ids_BT = jnp.array([[3, 3, 4, 3, 4], [1, 2, 1, 1, 0]], jnp.int32)
    seen_BV = jnp.asarray(rng.random((B, V)) < 0.3)
    counts_BV = jnp.asarray(rng.integers(0, 3, (B, V)), jnp.int32)
    settings = [SamplingSettings(frequency_penalty=0.8, presence_penalty=0.3, repetition_penalty=1.3, min_tokens=9)] * B
    params, flags = sampling_params(settings, eos_ids=[4]), flags_for(settings)
    picked_BTV = np.asarray(picked_at_positions(logits_BTV, ids_BT, seen_BV, counts_BV, params, flags))
    for t in range(T):
        prefix_BTV = jnp.eye(V, dtype=jnp.int32)[ids_BT[:, : t + 1]]
        expected_BV = pick_logits(logits_BTV[:, t], seen_BV | (prefix_BTV.sum(1) > 0), counts_BV + prefix_BTV.sum(1),
                                  params, flags)  # fmt: skip
        np.testing.assert_array_equal(picked_BTV[:, t], np.asarray(expected_BV))


def test_the_cli_drafts_with_a_draft_model_and_refuses_another_vocabulary(tiny_model_dir, tmp_path, capsys):
    import shutil

    from jax_gpt2.cli import main

    draft_dir, other_dir = tmp_path / "draft", tmp_path / "other"
    vocab_size = load_config(tiny_model_dir).vocab_size
    for folder, vocab in ((draft_dir, vocab_size), (other_dir, vocab_size - 1)):
        save_safetensors(random_hf_model(hf_config(**{**TINY, "vocab_size": vocab, "n_layer": 1}), std=0.3, seed=2),
                         folder)  # fmt: skip
        for name in ("vocab.json", "merges.txt", "tokenizer.json"):
            if (tiny_model_dir / name).is_file():
                shutil.copy(tiny_model_dir / name, folder / name)
    args = ["generate", "the cache the cache", "--model", str(tiny_model_dir), "--max-new-tokens", "12", "--ignore-eos"]
    assert main(args) == 0
    plain = capsys.readouterr().out
    assert main([*args, "--speculate", "draft", "--draft-model", str(draft_dir)]) == 0
    assert capsys.readouterr().out == plain
    assert main([*args, "--speculate", "draft", "--draft-model", str(other_dir)]) == 2
    assert "vocabulary" in capsys.readouterr().err
    assert main([*args, "--speculate", "draft"]) == 2
    assert "--draft-model" in capsys.readouterr().err


def width_for(hits, trials, rows: int = 1, dtype=np.float32, remaining=None) -> int:
    """The draft width choose_width picks when `rows` rows all hit a lookup, with this acceptance
    evidence (one value for every row, or one per row); remaining: each row's tokens to go, for a batch
    that returns when its last row is done (None: a server's rows)."""
    from jax_gpt2.speculate import choose_width

    lookup = PromptLookup(max_draft=5)
    hits_B = np.broadcast_to(np.asarray(hits, np.float32), (rows,))
    trials_B = np.broadcast_to(np.asarray(trials, np.float32), (rows,))
    yes_B, limit_B = np.ones((rows,), bool), np.full((rows,), 5)
    remaining_B = None if remaining is None else np.broadcast_to(np.asarray(remaining, np.float32), (rows,))
    costs = lookup.costs(dtype, rows)
    index = choose_width(hits_B, trials_B, yes_B, limit_B, yes_B, lookup, costs, remaining_B)
    return lookup.widths[int(index)]


def test_a_row_whose_guesses_all_fail_falls_back_to_plain_steps_and_wastes_under_one_step():
    """Lookups that hit text the model never copies: from the prior, each pass verifies one guess
    (a width-0 pass still checks its guess for free) and none holds. The width must reach 0 and stay
    there; a prior added afresh at every choice kept it at 1 forever (0.86x plain, measured). While
    it tries, the passes wider than a plain step cost, all told, less than one more plain step."""
    from jax_gpt2.speculate import PRIOR_HITS, PRIOR_TRIALS, decayed_evidence

    lookup = PromptLookup(max_draft=5)
    cost_of = dict(zip(lookup.widths, lookup.costs(np.float32, 1)))
    hits_B, trials_B = np.full((1,), PRIOR_HITS, np.float32), np.full((1,), PRIOR_TRIALS, np.float32)
    widths = []
    for _ in range(24):
        widths.append(width_for(float(hits_B[0]), float(trials_B[0])))
        hits_B, trials_B = decayed_evidence(hits_B, trials_B, np.zeros(1, np.float32), np.ones(1, np.float32))
    assert widths[0] > 0, "a new row starts by drafting"
    assert widths[-8:] == [0] * 8, widths
    wasted = sum(cost_of[width] - cost_of[0] for width in widths)
    assert 0 < wasted < 1.0, (wasted, widths)


def test_the_width_follows_the_acceptance_down_to_plain_decoding():
    assert width_for(hits=0.0, trials=20.0) == 0  # nothing accepted lately: plain decode steps
    assert width_for(hits=20.0, trials=20.0) == 5  # everything accepted: the widest pass
    assert 0 < width_for(hits=12.0, trials=20.0) <= 5
    # a pass costs more per token at batch 8 (each position is 8 rows), so the same evidence drafts less
    assert width_for(hits=12.0, trials=20.0, rows=8) <= width_for(hits=12.0, trials=20.0)
    # int8 steps are cheap, so the arithmetic of a wide pass weighs more: it drafts no wider than fp32
    assert width_for(hits=14.0, trials=20.0, dtype=np.int8) <= width_for(hits=14.0, trials=20.0)


def test_a_batch_that_ends_together_drafts_only_when_its_slowest_row_gains():
    """generate returns when its last row is done: seven rows that copy and one that never does finish
    no sooner with drafts (the eighth still makes one token a pass) and pay for wider passes, so the
    batch takes plain steps. A server's rows are replaced as they finish: there the seven copiers'
    tokens per unit of cost count, and it drafts."""
    rates = [19.0] * 7 + [0.0]
    assert width_for(hits=rates, trials=20.0, rows=8, remaining=40.0) == 0
    assert width_for(hits=rates, trials=20.0, rows=8) > 0
    # the row that never copies is nearly done: the copiers set the finish, and drafting pays
    assert width_for(hits=rates, trials=20.0, rows=8, remaining=[40.0] * 7 + [2.0]) > 0


def test_pass_costs_come_from_the_row_of_the_next_larger_batch_and_continue_past_the_table():
    from jax_gpt2.speculate import width_costs

    table = ((1, (1.0, 1.1, 1.3)), (4, (1.0, 2.0, 2.5)))
    assert width_costs(table, 1, (0, 1, 2)) == (1.0, 1.1, 1.3)
    assert width_costs(table, 3, (0, 1, 2)) == (1.0, 2.0, 2.5)  # batch 3 pays batch 4's price
    assert width_costs(table, 9, (1,)) == (2.0,)  # past the table: its largest batch
    np.testing.assert_allclose(width_costs(table, 4, (3, 4)), (3.0, 3.5))  # the last slope, continued
    with pytest.raises(ValueError, match="batches must rise"):
        PromptLookup(pass_costs=((4, (1.0, 2.0)), (1, (1.0, 1.1))))
    with pytest.raises(ValueError, match="from 1.0"):
        PromptLookup(pass_costs=((1, (1.2, 1.3)),))


def test_repetition_penalty_sees_only_emitted_tokens_never_the_padding_after_them(model):
    # A penalty below 1 favours seen tokens, and a bias puts the padding id (0) near the top: had a
    # verify pass that emits fewer tokens than its width marked the padding as seen, token 0 would
    # flood the speculative output (it did: 0 zeros plain, 36 speculative, before the fix).
    weights, config = model
    settings = dict(max_new_tokens=24, repetition_penalty=0.3, logit_bias={0: 3.0})
    plain = generate(PROMPTS, weights, config, **settings)
    tokens, stats = speculative(PROMPTS, weights, config, FIXED, **settings)
    assert tokens == plain
    assert stats.drafted_B.sum() > stats.accepted_B.sum(), "no draft was rejected: no padding was written"
