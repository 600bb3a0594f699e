"""The serving engine: sequences moving in and out of decode slots give exactly what `generate`
gives for the same prompt and settings (greedy, and sampled with the same seed and row), whenever
they join; stop strings, max_tokens, eos and cancellation free their slots; a full queue refuses;
logprobs are the model's; once warmed up, load compiles nothing new."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from checkpoints import TINY, hf_config, random_hf_model, save_safetensors
from jax_gpt2 import load_config, load_weights
from jax_gpt2.engine import (
    SERVER_FLAGS,
    Engine,
    EngineClosed,
    Event,
    QueueFull,
    SequenceRequest,
    compiled_count,
    serve_buckets,
)
from jax_gpt2.generate import generate
from jax_gpt2.model import gpt2_forward
from jax_gpt2.random_model import train_tokenizer
from jax_gpt2.sampling import flags_for, next_tokens, sampling_params
from jax_gpt2.tokenizer import encode, load_tokenizer

MAX_ROUNDS = 500  # every test run ends long before; a scheduling bug fails instead of hanging


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """(weights, config, tokenizer) of a tiny random checkpoint with a trained byte-level BPE."""
    folder = tmp_path_factory.mktemp("tiny-engine")
    vocab_size = train_tokenizer(folder, 300)
    save_safetensors(random_hf_model(hf_config(**{**TINY, "vocab_size": vocab_size, "n_positions": 64}), 0.3), folder)
    return load_weights(folder), load_config(folder), load_tokenizer(folder)


def make_engine(model, **overrides) -> Engine:
    weights, config, tokenizer = model
    return Engine(weights, config, tokenizer, **{"max_batch": 2, "max_seq_len": 64, "max_queue": 16, **overrides})


class Collector:
    """Gathers each sequence's events, as a client would."""

    def __init__(self) -> None:
        self.events: dict[int, list[Event]] = {}

    def __call__(self, event: Event) -> None:
        self.events.setdefault(event.seq_id, []).append(event)

    def ids(self, seq_id: int) -> list[int]:
        return [token for event in self.events[seq_id] for token in event.token_ids]

    def text(self, seq_id: int) -> str:
        return "".join(event.text for event in self.events[seq_id])

    def finish(self, seq_id: int) -> str | None:
        return self.events[seq_id][-1].finish_reason


def run_until_idle(engine: Engine) -> int:
    for rounds in range(1, MAX_ROUNDS + 1):
        if not engine.step():
            return rounds
    raise AssertionError(f"the engine was still busy after {MAX_ROUNDS} rounds")


def reference(model, request: SequenceRequest) -> list[int]:
    """What generate makes for this sequence alone (row `index` of a batch of copies), eos dropped."""
    weights, config, _ = model
    rows = generate(
        [list(request.prompt_ids)] * (request.index + 1), weights, config, max_new_tokens=request.max_tokens,
        temperature=request.temperature, top_k=request.top_k or None, top_p=request.top_p, min_p=request.min_p or None,
        repetition_penalty=request.repetition_penalty, eos_token_id=config.eos_token_id, seed=request.seed,
    )  # fmt: skip
    ids = rows[request.index]
    return ids[:-1] if ids and ids[-1] == config.eos_token_id else ids


PROMPTS = ["Hello world", "The quick brown fox jumps over", "A", "Keys and values of earlier tokens are kept", "42"]


def test_greedy_sequences_equal_generate_while_slots_are_reused(model):
    engine = make_engine(model)
    tokenizer = model[2]
    requests = [SequenceRequest(tuple(encode(tokenizer, p)), max_tokens=3 + 4 * i) for i, p in enumerate(PROMPTS)]
    collector = Collector()
    seq_ids = engine.submit(requests, collector)
    run_until_idle(engine)  # 5 sequences through 2 slots
    for seq_id, request in zip(seq_ids, requests):
        expected = reference(model, request)
        assert collector.ids(seq_id) == expected
        assert collector.text(seq_id) == tokenizer.decode(expected, skip_special_tokens=False)
        assert collector.finish(seq_id) == ("length" if len(expected) == request.max_tokens else "stop")
    assert engine.num_active == 0
    assert engine.num_queued == 0


def test_a_bf16_cache_engine_gives_generates_bf16_cache_tokens(model):
    weights, config, tokenizer = model
    engine = make_engine(model, kv_dtype=jnp.bfloat16)
    assert engine._slots.state.cache.k_LBNSH.dtype == jnp.bfloat16
    requests = [SequenceRequest(tuple(encode(tokenizer, p)), max_tokens=6) for p in PROMPTS[:3]]
    collector = Collector()
    seq_ids = engine.submit(requests, collector)
    run_until_idle(engine)
    for seq_id, request in zip(seq_ids, requests):
        rows = generate([list(request.prompt_ids)], weights, config, max_new_tokens=6, kv_dtype=jnp.bfloat16,
                        eos_token_id=config.eos_token_id)  # fmt: skip
        expected = rows[0][:-1] if rows[0] and rows[0][-1] == config.eos_token_id else rows[0]
        assert collector.ids(seq_id) == expected


def test_sequences_joining_mid_flight_with_mixed_settings_equal_generate(model):
    """Greedy and sampled rows share the compiled step; each sampled row folds in its own step count."""
    engine = make_engine(model, max_batch=3)
    ids = [tuple(encode(model[2], p)) for p in PROMPTS]
    waves = [
        [SequenceRequest(ids[0], 20, temperature=1.0, seed=7), SequenceRequest(ids[1], 12)],
        [SequenceRequest(ids[2], 16, temperature=0.8, top_k=20, seed=3, index=2)],
        [SequenceRequest(ids[3], 10, temperature=1.2, top_p=0.9, min_p=0.05, seed=11, index=1),
         SequenceRequest(ids[4], 14, repetition_penalty=1.5)],
    ]  # fmt: skip
    collector, submitted = Collector(), []
    for wave in waves:
        submitted += zip(engine.submit(wave, collector), wave)
        for _ in range(2):  # the next wave joins rows that are already decoding
            engine.step()
    run_until_idle(engine)
    for seq_id, request in submitted:
        assert collector.ids(seq_id) == reference(model, request), request


def test_greedy_rows_under_all_enabled_flags_are_exactly_greedy():
    """The server always runs every sampler stage; temperature 0 and penalty 1 rows must still be argmax."""
    logits_BV = jax.random.normal(jax.random.PRNGKey(0), (64, 300)) * 5
    logits_BV = logits_BV.at[:, 7].set(logits_BV.max(axis=1))  # ties: argmax picks the first, both ways
    seen_BV = jax.random.bernoulli(jax.random.PRNGKey(1), 0.2, (64, 300))
    keys_B = jax.random.split(jax.random.PRNGKey(2), 64)
    params = sampling_params(64, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0)
    greedy_B = next_tokens(logits_BV, seen_BV, params, keys_B, flags_for(0.0))
    assert not flags_for(0.0).sample
    np.testing.assert_array_equal(next_tokens(logits_BV, seen_BV, params, keys_B, SERVER_FLAGS), greedy_B)
    np.testing.assert_array_equal(greedy_B, np.argmax(logits_BV, axis=1))


def test_logprobs_are_the_models_log_softmax_over_the_picked_distribution(model):
    weights, config, tokenizer = model
    engine = make_engine(model)
    prompt = encode(tokenizer, "Hello world")
    collector = Collector()
    [seq_id] = engine.submit([SequenceRequest(tuple(prompt), 6, num_logprobs=3)], collector)
    run_until_idle(engine)
    generated = collector.ids(seq_id)
    logprobs = [lp for event in collector.events[seq_id] for lp in event.logprobs]
    assert [lp.token_id for lp in logprobs] == generated
    for t, lp in enumerate(logprobs):
        logits_V = gpt2_forward(np.asarray([prompt + generated[:t]]), weights, config)[0, -1]
        expected_V = np.asarray(jax.nn.log_softmax(logits_V))
        # float32 logits differ by ~1e-5 between the cached and full passes (see checkpoints.logit_tolerance)
        assert lp.logprob == pytest.approx(expected_V[lp.token_id], abs=1e-4)
        assert [alt for alt, _, _ in lp.top] == np.argsort(-expected_V)[:3].tolist()
        assert lp.top[0][0] == lp.token_id  # greedy: the chosen token is the best one
        assert lp.token == tokenizer.decode([lp.token_id], skip_special_tokens=False)


def test_a_stop_string_ends_the_text_there_and_frees_the_slot(model):
    engine = make_engine(model, max_batch=1)
    prompt = tuple(encode(model[2], "The quick brown fox jumps over"))
    collector = Collector()
    [free_id] = engine.submit([SequenceRequest(prompt, 16)], collector)
    run_until_idle(engine)
    full = collector.text(free_id)
    stop = full[3:5]
    [stopped_id, next_id] = engine.submit([SequenceRequest(prompt, 16, stops=(stop,)), SequenceRequest(prompt, 4)], collector)
    run_until_idle(engine)
    assert collector.text(stopped_id) == full[: full.index(stop)]
    assert collector.finish(stopped_id) == "stop"
    assert collector.ids(next_id) == collector.ids(free_id)[:4]  # the freed slot served the next one


def test_cancel_frees_a_running_slot_and_drops_a_waiting_sequence(model):
    engine = make_engine(model, max_batch=1)
    prompt = tuple(encode(model[2], "Hello"))
    collector = Collector()
    running, waiting, last = engine.submit([SequenceRequest(prompt, 40)] * 3, collector)
    engine.step()
    assert engine.num_active == 1
    assert engine.num_queued == 2
    engine.cancel([running, waiting])
    run_until_idle(engine)
    assert collector.finish(last) is not None
    assert len(collector.ids(running)) < 40  # stopped early
    assert waiting not in collector.events
    assert (engine.num_active, engine.num_queued) == (0, 0)


def test_a_full_queue_refuses_and_bad_requests_raise_value_errors(model):
    engine = make_engine(model, max_batch=1, max_queue=2)
    prompt = tuple(encode(model[2], "Hello"))
    engine.submit([SequenceRequest(prompt, 4)] * 2, Collector())
    with pytest.raises(QueueFull):
        engine.submit([SequenceRequest(prompt, 4)], Collector())
    for bad, message in [
        (SequenceRequest((), 4), "empty"),
        (SequenceRequest((1, 9999), 4), r"\[0, "),
        (SequenceRequest(prompt, 0), "max_tokens"),
        (SequenceRequest(prompt, 64), "context is 64 tokens"),
        (SequenceRequest(prompt, 4, temperature=-1.0), "temperature"),
        (SequenceRequest(prompt, 4, top_p=0.0), "top_p"),
        (SequenceRequest(prompt, 4, min_p=1.5), "min_p"),
        (SequenceRequest(prompt, 4, repetition_penalty=0.0), "repetition_penalty"),
        (SequenceRequest(prompt, 4, seed=2**32), "seed"),
        (SequenceRequest(prompt, 4, num_logprobs=6), "logprobs"),
    ]:
        with pytest.raises(ValueError, match=message):
            engine.submit([bad], Collector())
    run_until_idle(engine)
    engine.shutdown()
    with pytest.raises(EngineClosed):
        engine.submit([SequenceRequest(prompt, 4)], Collector())


def test_a_warm_engine_compiles_nothing_new_under_load(model):
    engine = make_engine(model, max_batch=2)
    assert serve_buckets(64) == [8, 16, 32, 64]
    engine.warm_up()
    compiled = compiled_count()
    lengths = [1, 5, 9, 17, 30, 33, 50]  # every bucket
    requests = [SequenceRequest(tuple(range(1, n + 1)), 64 - n if n == 50 else 3, temperature=n % 2) for n in lengths]
    engine.submit(requests, Collector())
    run_until_idle(engine)
    assert compiled_count() == compiled


def test_the_background_thread_drains_every_submitted_sequence_on_shutdown(model):
    engine = make_engine(model, max_batch=2)
    prompt = tuple(encode(model[2], "Hello"))
    collector = Collector()
    engine.start()
    seq_ids = engine.submit([SequenceRequest(prompt, 12)] * 5, collector)
    engine.shutdown(drain=True, timeout=120)
    assert [collector.finish(seq_id) for seq_id in seq_ids].count(None) == 0
    assert all(collector.ids(seq_id) == collector.ids(seq_ids[0]) for seq_id in seq_ids)
