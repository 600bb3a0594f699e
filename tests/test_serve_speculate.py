"""`jax-gpt2 serve --speculate lookup` through the real HTTP server: greedy replies are token for token the
plain server's (concurrent rows, different max_tokens, stop strings, stop tokens, penalties, logprobs, a
constrained row beside them), seeded sampling completes within max_tokens and reproduces, and /metrics
counts the drafts; a warmed-up speculating server compiles nothing new. The plain server is the
reference: test_serve.py holds it equal to `generate`."""

import json
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import numpy as np
import pytest

from jax_gpt2.cli import main
from jax_gpt2.serve.engine import Engine
from jax_gpt2.serve.slots import compiled_count
from jax_gpt2.speculate import DraftModel, PromptLookup
from test_serve import CONTEXT, MODEL_ID, SMALL_SCHEMA, metric_values, model, running_server  # noqa: F401 (a fixture)

PASSAGE = "the cat sat on the mat. "
PROMPTS = [PASSAGE * 3, "Hello world", PASSAGE + "Hello " + PASSAGE, "a b a b a b a b"]
MAX_TOKENS = [40, 7, 25, 33]
LOGPROB_TOLERANCE = 1e-5  # float32 logits of a 1- or a 5-position pass: the same sums in another order


@pytest.fixture(scope="module")
def servers(model):  # noqa: F811 (the fixture imported above)
    """The same engine settings with and without speculation (a fixed width: every lookup hit drafts)."""
    settings = dict(max_batch=4, max_seq_len=CONTEXT, max_queue=16, prefill_chunk=16)
    with running_server(model, **settings) as plain:
        with running_server(model, speculate=PromptLookup(max_draft=4, adaptive=False), **settings) as speculating:
            yield plain, speculating


def replies(running, requests: list[dict]) -> list[tuple]:
    """(text, finish_reason, completion tokens, logprobs) of each request, all sent at once."""
    client = running.client()

    def one(request: dict) -> tuple:
        choice_usage = client.completions.create(model=MODEL_ID, **request)
        choice = choice_usage.choices[0]
        logprobs = None if choice.logprobs is None else (choice.logprobs.tokens, choice.logprobs.token_logprobs)
        return choice.text, choice.finish_reason, choice_usage.usage.completion_tokens, logprobs

    with ThreadPoolExecutor(len(requests)) as pool:
        return list(pool.map(one, requests))


def test_concurrent_greedy_replies_equal_the_plain_servers_and_the_drafts_are_counted(servers):
    plain, speculating = servers
    requests = [dict(prompt=p, max_tokens=m, temperature=0) for p, m in zip(PROMPTS, MAX_TOKENS)]
    before, programs = metric_values(speculating.url), compiled_count()
    assert replies(speculating, requests) == replies(plain, requests)
    assert compiled_count() == programs, "warm_up compiles every speculating chunk"
    after = metric_values(speculating.url)
    count = lambda name: after[(name, ())] - before[(name, ())]  # noqa: E731
    assert count("jax_gpt2_draft_tokens_total") > 0
    assert 0 < count("jax_gpt2_accepted_draft_tokens_total") <= count("jax_gpt2_draft_tokens_total")
    assert count("jax_gpt2_verify_passes_total") > 0
    assert metric_values(plain.url)[("jax_gpt2_draft_tokens_total", ())] == 0


def test_stop_strings_stop_tokens_and_min_tokens_end_where_the_plain_server_ends(servers):
    plain, speculating = servers
    [(free, _, _, _)] = replies(plain, [dict(prompt=PASSAGE * 2, max_tokens=40, temperature=0,
                                             extra_body={"ignore_eos": True})])  # fmt: skip
    stop = free[len(free) // 2 : len(free) // 2 + 3]
    [(_, _, _, (tokens, _))] = replies(plain, [dict(prompt=PASSAGE * 2, max_tokens=40, temperature=0, logprobs=0)])
    requests = [
        dict(prompt=PASSAGE * 2, max_tokens=40, temperature=0, stop=[stop]),
        dict(prompt=PASSAGE * 2, max_tokens=40, temperature=0, stop=[stop],
             extra_body={"include_stop_str_in_output": True}),
        dict(prompt=PASSAGE * 2, max_tokens=40, temperature=0, extra_body={"stop_token_ids": [0], "ignore_eos": True}),
        dict(prompt=PASSAGE * 2, max_tokens=40, temperature=0, extra_body={"min_tokens": 30}),
    ]  # fmt: skip
    speculated = replies(speculating, requests)
    assert speculated == replies(plain, requests)
    assert speculated[0][1] == "stop"


def test_penalties_and_logprobs_stay_exact(servers):
    plain, speculating = servers
    requests = [
        dict(prompt=PASSAGE * 2, max_tokens=30, temperature=0, frequency_penalty=0.9, presence_penalty=0.6),
        dict(prompt=PASSAGE * 2, max_tokens=30, temperature=0, frequency_penalty=-0.5, logit_bias={"3": -100}),
        dict(prompt=PASSAGE * 2, max_tokens=30, temperature=0, extra_body={"repetition_penalty": 1.3}),
    ]  # fmt: skip
    assert replies(speculating, requests) == replies(plain, requests)


def test_a_row_reporting_logprobs_takes_plain_steps_with_the_same_logprobs(servers):
    """Its logprobs may come from a wider pass (others' drafts): float32 sums in another order."""
    plain, speculating = servers
    requests = [dict(prompt=PASSAGE * 2, max_tokens=30, temperature=0, logprobs=3),
                dict(prompt=PASSAGE * 3, max_tokens=30, temperature=0)]  # fmt: skip
    speculated, reference = replies(speculating, requests), replies(plain, requests)
    assert [r[:3] for r in speculated] == [r[:3] for r in reference]
    assert speculated[0][3][0] == reference[0][3][0]
    np.testing.assert_allclose(speculated[0][3][1], reference[0][3][1], rtol=0, atol=LOGPROB_TOLERANCE)


def test_a_seeded_sampled_request_completes_within_max_tokens_and_reproduces(servers):
    _, speculating = servers
    requests = [dict(prompt=PASSAGE * 3, max_tokens=m, temperature=0.7, seed=5, extra_body={"ignore_eos": True})
                for m in (9, 31)]  # fmt: skip
    first, again = replies(speculating, requests), replies(speculating, requests)
    assert first == again
    assert [r[2] for r in first] == [9, 31]
    assert [r[1] for r in first] == ["length", "length"]


def test_sampling_with_top_k_1_follows_the_sampled_acceptance_path_to_the_greedy_reply(servers):
    """At temperature 1 with top_k 1, p is one-hot on the greedy token: a draft is accepted exactly
    when it is that token, and a rejected one leaves it to the pick; the reply is the greedy one."""
    plain, speculating = servers
    sampled = [dict(prompt=PASSAGE * 3, max_tokens=30, temperature=1.0, seed=seed, extra_body={"top_k": 1})
               for seed in (1, 2)]  # fmt: skip
    greedy = [dict(prompt=PASSAGE * 3, max_tokens=30, temperature=0)] * 2
    assert replies(speculating, sampled) == replies(plain, greedy)


def test_a_constrained_row_takes_plain_steps_beside_speculating_rows(servers):
    plain, speculating = servers
    constrained = dict(prompt="Data:", max_tokens=60, temperature=0, extra_body={"guided_json": SMALL_SCHEMA})
    requests = [constrained, dict(prompt=PASSAGE * 3, max_tokens=40, temperature=0)]
    speculated = replies(speculating, requests)
    assert speculated == replies(plain, requests)
    if speculated[0][1] == "stop":
        jsonschema.validate(json.loads(speculated[0][0]), SMALL_SCHEMA)


def test_serve_refuses_a_draft_model_naming_lookup(model, capsys):  # noqa: F811
    with pytest.raises(ValueError, match="prompt lookup"):
        Engine(model.weights, model.config, model.tokenizer, speculate=DraftModel(model.weights, model.config))
    assert main(["serve", "--model", str(model.folder), "--speculate", "draft"]) == 2
    assert "--speculate lookup" in capsys.readouterr().err
