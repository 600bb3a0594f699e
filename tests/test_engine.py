"""The serving engine: sequences moving in and out of decode slots give exactly what `generate`
gives for the same prompt and settings (greedy, and sampled with the same seed and row), whenever
they join; stop strings, max_tokens, eos and cancellation free their slots; a full queue refuses;
logprobs are the model's; once warmed up, load compiles nothing new."""

import dataclasses
import re
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import checkpoints
from checkpoints import TINY, hf_config, random_hf_model, save_safetensors
from jax_gpt2 import load_config, load_weights
from jax_gpt2.generate import generate, prefill
from jax_gpt2.kernels import native
from jax_gpt2.model import gpt2_forward
from jax_gpt2.tools.random_model import train_tokenizer
from jax_gpt2.sampling import SamplingSettings, flags_for, next_tokens, runtime_flags, sampling_params
from jax_gpt2.serve import slots
from jax_gpt2.serve.engine import Engine, EngineClosed, Event, QueueFull, SequenceRequest, _Chunk, batch_buckets
from jax_gpt2.serve.slots import PREFIX_BLOCK, compiled_count, empty_staging
from jax_gpt2.speculate import PromptLookup
from jax_gpt2.tokenizer import encode, load_tokenizer

MAX_ROUNDS = 500  # every test run ends long before; a scheduling bug fails instead of hanging


def tiny_model(tmp_path_factory, positions: int):
    """(weights, config, tokenizer) of a tiny random checkpoint with a trained byte-level BPE."""
    folder = tmp_path_factory.mktemp(f"tiny-engine-{positions}")
    vocab_size = train_tokenizer(folder, 300)
    config = hf_config(**{**TINY, "vocab_size": vocab_size, "n_positions": positions})
    save_safetensors(random_hf_model(config, 0.3), folder)
    return load_weights(folder), load_config(folder), load_tokenizer(folder)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_model(tmp_path_factory, 64)


@pytest.fixture(scope="module")
def long_model(tmp_path_factory):
    """The same kind of model with 256 positions: room for prompts of several prefix blocks."""
    return tiny_model(tmp_path_factory, 256)


def make_engine(model, config=None, **overrides) -> Engine:
    weights, model_config, tokenizer = model
    settings = {"max_batch": 2, "max_seq_len": model_config.n_positions, "max_queue": 16, **overrides}
    return Engine(weights, config or model_config, tokenizer, **settings)


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


def sequence(prompt_ids, max_tokens: int, index: int = 0, num_logprobs=None, **settings) -> SequenceRequest:
    settings = SamplingSettings(max_new_tokens=max_tokens, **settings)
    return SequenceRequest(tuple(prompt_ids), settings, index=index, num_logprobs=num_logprobs)


def reference(model, request: SequenceRequest) -> list[int]:
    """What generate makes for this sequence alone (row `index` of a batch of copies), eos dropped."""
    weights, config, _ = model
    s = request.settings
    rows = generate(
        [list(request.prompt_ids)] * (request.index + 1), weights, config, max_new_tokens=s.max_new_tokens,
        temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, min_p=s.min_p,
        repetition_penalty=s.repetition_penalty, eos_token_id=config.eos_token_id, seed=s.seed,
    )  # fmt: skip
    ids = rows[request.index]
    return ids[:-1] if ids and ids[-1] == config.eos_token_id else ids


PROMPTS = ["Hello world", "The quick brown fox jumps over", "A", "Keys and values of earlier tokens are kept", "42"]


def test_greedy_sequences_equal_generate_while_slots_are_reused(model):
    engine = make_engine(model)
    tokenizer = model[2]
    requests = [sequence(encode(tokenizer, p), max_tokens=3 + 4 * i) for i, p in enumerate(PROMPTS)]
    collector = Collector()
    seq_ids = engine.submit(requests, collector)
    run_until_idle(engine)  # 5 sequences through 2 slots
    for seq_id, request in zip(seq_ids, requests):
        expected = reference(model, request)
        assert collector.ids(seq_id) == expected
        assert collector.text(seq_id) == tokenizer.decode(expected, skip_special_tokens=False)
        assert collector.finish(seq_id) == ("length" if len(expected) == request.settings.max_new_tokens else "stop")
    assert engine.num_active == 0
    assert engine.num_queued == 0


def test_a_bf16_cache_engine_gives_generates_bf16_cache_tokens(model):
    weights, config, tokenizer = model
    engine = make_engine(model, kv_dtype=jnp.bfloat16)
    assert engine._slots.cache.kv_dtype == jnp.bfloat16
    assert engine._staging.kv_dtype == jnp.bfloat16  # prefill chunks are written in the cache's dtype
    requests = [sequence(encode(tokenizer, p), max_tokens=6) for p in PROMPTS[:3]]
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
        [sequence(ids[0], 20, temperature=1.0, seed=7), sequence(ids[1], 12)],
        [sequence(ids[2], 16, temperature=0.8, top_k=20, seed=3, index=2)],
        [sequence(ids[3], 10, temperature=1.2, top_p=0.9, min_p=0.05, seed=11, index=1),
         sequence(ids[4], 14, repetition_penalty=1.5)],
    ]  # fmt: skip
    collector, submitted = Collector(), []
    for wave in waves:
        submitted += zip(engine.submit(wave, collector), wave)
        for _ in range(2):  # the next wave joins rows that are already decoding
            engine.step()
    run_until_idle(engine)
    for seq_id, request in submitted:
        assert collector.ids(seq_id) == reference(model, request), request


def test_short_prompts_arriving_together_are_prefilled_in_one_pass_and_equal_generate(model, monkeypatch):
    """Short prompts at the head of the queue share one batched prefill (as many as rows are free); a
    prompt longer than a chunk goes through staging; every sequence still equals generate."""
    engine = make_engine(model, max_batch=4, prefill_chunk=16)
    assert engine.batch_limit == 16
    batches, prefill_rows = [], slots.prefill_rows_jit
    monkeypatch.setattr(slots, "prefill_rows_jit",
                        lambda *args: batches.append(int((args[3] < 4).sum())) or prefill_rows(*args))  # fmt: skip
    ids = [tuple(encode(model[2], p))[:12] for p in PROMPTS]
    long = tuple(encode(model[2], " ".join(PROMPTS)))[:20]  # over one chunk of 16
    requests = [
        sequence(ids[0], 12), sequence(ids[2], 9, temperature=1.0, seed=5, index=1), sequence(ids[3], 2),
        sequence(long, 10), sequence(ids[4], 6), sequence(ids[1], 8, top_k=5, temperature=0.7, seed=2),
    ]  # fmt: skip
    assert [len(r.prompt_ids) <= engine.batch_limit for r in requests] == [True, True, True, False, True, True]
    collector = Collector()
    seq_ids = engine.submit(requests, collector)
    run_until_idle(engine)
    assert batches[0] == 3  # the three short prompts before the long one, in one pass
    assert sum(batches) == 5  # every short prompt went the batched way; the long one through staging
    for seq_id, request in zip(seq_ids, requests):
        assert collector.ids(seq_id) == reference(model, request), request
    assert collector.finish(seq_ids[2]) in ("length", "stop")
    assert engine.num_active == 0


def test_greedy_rows_beside_sampling_rows_are_exactly_greedy():
    """A batch with a sampling, filtering, penalizing row runs every sampler stage; its temperature 0,
    penalty 1 rows must still take the argmax."""
    logits_BV = jax.random.normal(jax.random.PRNGKey(0), (64, 300)) * 5
    logits_BV = logits_BV.at[:, 7].set(logits_BV.max(axis=1))  # ties: argmax picks the first, both ways
    seen_BV = jax.random.bernoulli(jax.random.PRNGKey(1), 0.2, (64, 300))
    keys_B2 = jax.random.split(jax.random.PRNGKey(2), 64)
    rows = [SamplingSettings()] * 63 + [SamplingSettings(temperature=1.0, top_p=0.5, repetition_penalty=1.3)]
    params = sampling_params(rows)
    active_B = jnp.ones((64,), bool)
    counts_BV = jnp.zeros((64, 300), jnp.int32)
    mixed_B = jax.jit(lambda p: next_tokens(logits_BV, seen_BV, counts_BV, p, keys_B2, runtime_flags(p, active_B)))(params)
    assert flags_for(rows).sample
    np.testing.assert_array_equal(np.asarray(mixed_B)[:63], np.argmax(logits_BV, axis=1)[:63])


def test_logprobs_are_the_models_log_softmax_over_the_picked_distribution(model):
    weights, config, tokenizer = model
    engine = make_engine(model)
    prompt = encode(tokenizer, "Hello world")
    collector = Collector()
    [seq_id] = engine.submit([sequence(prompt, 6, num_logprobs=3)], collector)
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
    [free_id] = engine.submit([sequence(prompt, 16)], collector)
    run_until_idle(engine)
    full = collector.text(free_id)
    stop = full[3:5]
    [stopped_id, next_id] = engine.submit([sequence(prompt, 16, stop=(stop,)), sequence(prompt, 4)], collector)
    run_until_idle(engine)
    assert collector.text(stopped_id) == full[: full.index(stop)]
    assert collector.finish(stopped_id) == "stop"
    assert collector.ids(next_id) == collector.ids(free_id)[:4]  # the freed slot served the next one


def test_a_round_leaves_its_chunk_running_and_feeds_a_constrained_rows_grammar_first(model):
    # A round dispatches its chunk and hands out the previous one, so a chunk is still in flight
    # after the round (the cores decode while the host delivers). A constrained row's next mask needs
    # its last token: the round fetches the previous chunk and feeds that token to the row's grammar
    # before it dispatches, so constrained answers are what generate makes under the same grammar.
    from jax_gpt2 import constraints

    weights, config, tokenizer = model
    prompt = tuple(encode(tokenizer, "Hello world"))
    free = make_engine(model)
    free_collector = Collector()
    [free_id] = free.submit([sequence(prompt, 12)], free_collector)
    free.step()
    assert free._in_flight is not None
    run_until_idle(free)
    assert free._in_flight is None
    assert free_collector.ids(free_id) == reference(model, sequence(prompt, 12))

    grammar = constraints.grammar_tokenizer(tokenizer, config.vocab_size, config.eos_token_id)
    pattern = "([a-m][n-z]){1,20}"  # the allowed tokens change with every character: a stale mask shows
    compiled = constraints.compile_constraint(constraints.regex(pattern), grammar)
    constrained = SequenceRequest(prompt, SamplingSettings(max_new_tokens=12), constraint=compiled)
    engine = make_engine(model)
    collector = Collector()
    constrained_id, free_id = engine.submit([constrained, sequence(prompt, 12)], collector)
    for _ in range(3):
        engine.step()
        assert engine._in_flight is not None
    run_until_idle(engine)
    [expected] = generate([list(prompt)], weights, config, max_new_tokens=12, eos_token_id=config.eos_token_id,
                          constraint=compiled)  # fmt: skip
    assert collector.ids(constrained_id) == [t for t in expected if t != config.eos_token_id]
    assert re.fullmatch("[a-m]?([n-z][a-m])*[n-z]?", collector.text(constrained_id))  # a prefix of an answer
    assert len(collector.ids(constrained_id)) >= 2
    assert collector.ids(free_id) == reference(model, sequence(prompt, 12))


def test_a_constrained_row_decodes_whole_chunks_beside_unconstrained_ones(model):
    # Its masks come from the host inside the chunk (kernels/host_masks.py), so neither it nor its
    # neighbours drop to one step a round: the same rounds as with no constraint at all.
    from jax_gpt2 import constraints

    weights, config, tokenizer = model
    if not native.kernels_available():
        pytest.skip("the in-chunk masks need the kernel library; without it constrained chunks are one step")
    prompt = tuple(encode(tokenizer, "Hello world"))
    grammar = constraints.grammar_tokenizer(tokenizer, config.vocab_size, config.eos_token_id)
    # No end before 200 letters: both rows run all 13 tokens.
    compiled = constraints.compile_constraint(constraints.regex("[a-z]{200,}"), grammar)
    settings = SamplingSettings(max_new_tokens=13, ignore_eos=True)
    rounds = {}
    for name, constraint in [("free", None), ("constrained", compiled)]:
        engine = make_engine(model, chunk_steps=4)
        collector = Collector()
        ids = engine.submit([SequenceRequest(prompt, settings, constraint=constraint), sequence(prompt, 13, ignore_eos=True)],
                            collector)  # fmt: skip
        rounds[name] = run_until_idle(engine)
        assert [collector.finish(i) for i in ids] == ["length", "length"]
    assert re.fullmatch("[a-z]+", collector.text(ids[0]))
    assert rounds["constrained"] == rounds["free"]
    assert rounds["free"] <= 1 + 13 // 4 + 2  # a first token, three 4-step chunks, the hand-out of the last


def test_cancel_frees_a_running_slot_and_drops_a_waiting_sequence(model):
    engine = make_engine(model, max_batch=1)
    prompt = tuple(encode(model[2], "Hello"))
    collector = Collector()
    running, waiting, last = engine.submit([sequence(prompt, 40)] * 3, collector)
    engine.step()
    assert engine.num_active == 1
    assert engine.num_queued == 2
    engine.cancel([running, waiting])
    run_until_idle(engine)
    assert collector.finish(last) is not None
    assert len(collector.ids(running)) < 40  # stopped early
    assert waiting not in collector.events
    assert (engine.num_active, engine.num_queued) == (0, 0)


def test_a_full_engine_refuses_and_bad_requests_raise_value_errors(model):
    engine = make_engine(model, max_batch=1, max_queue=2)
    prompt = tuple(encode(model[2], "Hello"))
    engine.submit([sequence(prompt, 4)] * 3, Collector())  # one slot and a waiting room of two
    with pytest.raises(QueueFull):
        engine.submit([sequence(prompt, 4)], Collector())
    for bad, message in [
        (sequence((), 4), "empty"),
        (sequence((1, 9999), 4), r"\[0, "),
        (sequence(prompt, 64), "context is 64 tokens"),
        (SequenceRequest(prompt, SamplingSettings(max_new_tokens=4), num_logprobs=6), "logprobs"),
        (SequenceRequest(prompt, SamplingSettings(max_new_tokens=4), prompt_logprobs=-1), "logprobs"),
    ]:
        with pytest.raises(ValueError, match=message):
            engine.submit([bad], Collector())
    with pytest.raises(ValueError, match="at most 3 sequences per request"):
        engine.submit([sequence(prompt, 4)] * 4, Collector())
    run_until_idle(engine)
    engine.shutdown()
    with pytest.raises(EngineClosed):
        engine.submit([sequence(prompt, 4)], Collector())


def test_max_queue_zero_takes_requests_while_slots_are_free_and_refuses_the_rest(model):
    engine = make_engine(model, max_batch=2, max_queue=0)
    prompt = tuple(encode(model[2], "Hello"))
    collector = Collector()
    [first, second] = engine.submit([sequence(prompt, 4)] * 2, collector)  # both slots
    with pytest.raises(QueueFull):
        engine.submit([sequence(prompt, 4)], collector)  # it would have to wait
    run_until_idle(engine)
    [third] = engine.submit([sequence(prompt, 4)], collector)  # a slot is free again
    run_until_idle(engine)
    assert collector.ids(first) == collector.ids(second) == collector.ids(third)


def test_a_warm_engine_compiles_nothing_new_under_load(model):
    """Every prefill bucket, width, copy size and sampler setting is compiled at warm-up."""
    engine = make_engine(model, max_batch=4, prefill_chunk=16)
    assert engine.chunk_buckets == [8, 16]
    assert engine.widths == [1, 2, 4]
    engine.warm_up()
    compiled = compiled_count()
    lengths = [1, 5, 9, 17, 30, 33, 50]
    requests = [
        SequenceRequest(tuple(range(1, n + 1)), SamplingSettings(max_new_tokens=64 - n if n == 50 else 3 + n % 7,
                        temperature=n % 2, top_k=n % 3, repetition_penalty=1 + n % 2 / 2),
                        num_logprobs=n % 3 or None, prompt_logprobs=n % 4 or None)  # fmt: skip
        for n in lengths
    ]
    engine.submit(requests, Collector())
    engine.submit([SequenceRequest((3, 4, 5), SamplingSettings(max_new_tokens=0), prompt_logprobs=2)], Collector())
    run_until_idle(engine)
    short = [SequenceRequest(tuple(range(1, n + 1)), SamplingSettings(max_new_tokens=4, temperature=n % 2)) for n in (2, 7, 12)]
    engine.submit(short, Collector())  # prefilled together (prefill_rows), as a batch of 3 in width 4
    run_until_idle(engine)
    assert compiled_count() == compiled


class BackendCompiles:
    """Counts XLA compiles (JAX's backend-compile events) while active: the one sure sign of a compile."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, event: str, duration_secs: float, **kwargs) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            self.count += 1

    def __enter__(self) -> "BackendCompiles":
        jax.monitoring.register_event_duration_secs_listener(self)
        return self

    def __exit__(self, *exc) -> None:
        jax.monitoring.unregister_event_duration_listener(self)


@pytest.mark.parametrize("speculate", [None, PromptLookup()], ids=["plain", "speculating"])
def test_programs_compiled_ahead_on_a_background_thread_are_the_ones_the_engine_then_runs(long_model, speculate):
    """The serving start-up path: compile on abstract shapes in another thread, then serve with no
    XLA compile at all (the engine's calls find those executables; a speculating engine's chunk
    program is speculate_chunk)."""
    jax.clear_caches()  # nothing compiled by earlier tests may stand in for the background's work
    engine = make_engine(long_model, max_batch=4, prefill_chunk=16, speculate=speculate)
    assert not engine.ready
    assert not engine.warm
    engine.compile_for_first_request()
    assert engine.ready
    assert not engine.warm
    background = threading.Thread(target=engine.compile_the_rest)
    background.start()
    background.join(300)
    assert engine.warm
    assert engine.programs.num_compiled == len(engine.programs.keys)
    lengths = [1, 5, 9, 17, 30, 33, 50, 70]  # short (batched), staged in chunks, and past a prefix block
    requests = [SequenceRequest(tuple(range(1, n + 1)), SamplingSettings(max_new_tokens=3 + n % 5, temperature=n % 2),
                                prompt_logprobs=n % 3 or None) for n in lengths]  # fmt: skip
    with BackendCompiles() as compiles:
        engine.submit(requests, Collector())
        run_until_idle(engine)
        engine.submit([sequence(tuple(range(1, n + 1)), 4) for n in (2, 7, 12, 75)], Collector())  # 75: a reused block
        run_until_idle(engine)
    assert compiles.count == 0
    assert engine.reused_tokens > 0


class ChunkInFlight:
    """Stands for a decode chunk's first output on the device: done after `polls` looks at it."""

    def __init__(self, polls: int) -> None:
        self.polls, self.looks = polls, 0

    def is_ready(self) -> bool:
        self.looks += 1
        return self.looks > self.polls


def test_after_rows_free_up_a_round_takes_the_clients_next_requests_that_arrive_while_the_chunk_runs(model):
    engine = make_engine(model, max_batch=2)
    running = ChunkInFlight(polls=2000)  # ~2 s of 1 ms polls: far longer than the clients take
    engine._in_flight = chunk = _Chunk((running,), (), (None, None))
    prompt = tuple(encode(model[2], "Hello"))
    clients = [threading.Timer(0.01 * k, engine.submit, ([sequence(prompt, 2)], Collector())) for k in (1, 2)]
    for client in clients:
        client.start()
    engine._await_returns(chunk)
    assert len(engine._waiting) == 2, "both requests are in before the round dispatches its chunk"
    assert running.looks < running.polls, "and the round went on as soon as every free row had one"


def test_the_wait_for_returning_clients_ends_when_the_chunk_in_flight_does(model):
    engine = make_engine(model, max_batch=2)
    engine._in_flight = chunk = _Chunk((ChunkInFlight(polls=3),), (), (None, None))
    engine._await_returns(chunk)
    assert len(engine._waiting) == 0
    assert chunk.outputs[0].looks == 4, "three polls of ~1 ms while it ran, then the one that saw it done"


def recorded_prefills(engine: Engine) -> list[int]:
    """The number of prompts in each batched prefill the engine runs from now on."""
    sizes, take = [], engine._prefill_batch
    engine._prefill_batch = lambda batch: sizes.append(len(batch)) or take(batch)
    return sizes


class ReturningClients:
    """Clients that send their next request as soon as an answer ends (as a benchmark's do), and
    the size of every batched prefill the engine runs for them."""

    def __init__(self, engine: Engine, prompt: tuple[int, ...], max_tokens: int, answers: int) -> None:
        self.engine, self.prompt, self.max_tokens, self.left = engine, prompt, max_tokens, answers
        self.prefills = recorded_prefills(engine)

    def send(self) -> None:
        self.engine.submit([sequence(self.prompt, self.max_tokens, ignore_eos=True)], self)

    def __call__(self, event: Event) -> None:
        if event.finish_reason is not None and self.left > 0:
            self.left -= 1
            self.send()


def test_rows_out_of_step_end_together_after_one_round_and_then_prefill_in_one_pass(model):
    engine = make_engine(model, max_batch=4, chunk_steps=2)
    clients = ReturningClients(engine, tuple(encode(model[2], "Hello")), max_tokens=7, answers=12)
    clients.send()
    engine.step()  # the first client's prompt is prefilled alone and its row decodes a chunk ahead
    for _ in range(3):
        clients.send()
    run_until_idle(engine)
    assert clients.prefills[:2] == [1, 3], "the first round out of step, as the clients came"
    assert clients.prefills[2:] == [4, 4, 4], (
        "when the rows behind end in the chunk in flight, it is handed out first and the freed "
        "clients' requests wait for it: every later round is one pass of all four"
    )


def test_an_idle_engine_waits_for_the_requests_the_server_is_still_preparing(model):
    engine = make_engine(model, max_batch=4)
    engine.compile_for_first_request()
    prefills, done = recorded_prefills(engine), threading.Semaphore(0)
    prompt = tuple(encode(model[2], "Hello"))

    def finished(event: Event) -> None:
        if event.finish_reason is not None:
            done.release()

    def second_client() -> None:  # the server parses and tokenizes it while the first one is taken
        with engine.arriving():
            time.sleep(0.02)
            engine.submit([sequence(prompt, 3)], finished)

    engine.start()
    preparing = threading.Thread(target=second_client)
    preparing.start()
    time.sleep(0.005)
    engine.submit([sequence(prompt, 3)], finished)
    assert done.acquire(timeout=60) and done.acquire(timeout=60)
    preparing.join()
    engine.shutdown()
    assert prefills == [2], "both prompts in one prefill pass: their rows decode in step"


def test_the_wait_for_requests_being_prepared_is_bounded(model):
    engine = make_engine(model, max_batch=4)
    engine.compile_for_first_request()
    done = threading.Event()
    engine.start()
    with engine.arriving():  # a request that never reaches submit (say, its client went away)
        engine.submit([sequence(tuple(encode(model[2], "Hello")), 3)], lambda e: e.finish_reason and done.set())
        assert done.wait(timeout=60), "the waiting request is served though the other never comes"
    engine.shutdown()


def test_batched_prefill_buckets_grow_by_at_most_half_from_16_tokens_on():
    buckets = batch_buckets([8, 16, 32, 64, 128], longest=128)
    assert buckets == [8, 16, 24, 32, 48, 64, 80, 96, 112, 128]
    assert all(upper <= 1.5 * lower for lower, upper in zip(buckets[1:], buckets[2:]))
    assert batch_buckets([8, 16], longest=16) == [8, 16], "no bucket past the longest"


def test_only_one_caller_may_start_the_background_compile(model):
    engine = make_engine(model, max_batch=2)
    claims = []
    threads = [threading.Thread(target=lambda: claims.append(engine.programs.claim_background())) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(claims) == [False] * 7 + [True]
    assert engine.programs.claim_background() is False


def test_a_program_the_background_has_not_compiled_yet_is_compiled_when_first_needed(model):
    engine = make_engine(model, max_batch=2)
    engine.compile_for_first_request()
    assert ("decode_chunk", 2, False) not in engine.programs._compiled
    collector = Collector()
    engine.submit([sequence(tuple(encode(model[2], "Hello")), 5)] * 2, collector)  # two rows: width 2
    run_until_idle(engine)
    assert ("decode_chunk", 2, False) in engine.programs._compiled
    assert collector.finish(0) is not None


def test_the_background_thread_drains_every_submitted_sequence_on_shutdown(model):
    engine = make_engine(model, max_batch=2)
    prompt = tuple(encode(model[2], "Hello"))
    collector = Collector()
    engine.start()
    seq_ids = engine.submit([sequence(prompt, 12)] * 5, collector)
    engine.shutdown(drain=True, timeout=120)
    assert [collector.finish(seq_id) for seq_id in seq_ids].count(None) == 0
    assert all(collector.ids(seq_id) == collector.ids(seq_ids[0]) for seq_id in seq_ids)


def test_after_the_drain_timeout_running_sequences_end_with_an_error_event(model):
    engine = make_engine(model, max_batch=1)
    prompt = tuple(encode(model[2], "Hello"))
    collector = Collector()
    running, waiting = engine.submit([sequence(prompt, 60)] * 2, collector)
    engine.step()
    engine.begin_drain(timeout_s=0)
    with pytest.raises(EngineClosed):
        engine.submit([sequence(prompt, 4)], collector)
    engine.start()
    engine.shutdown(drain=True, timeout=120)
    for seq_id in (running, waiting):
        assert collector.finish(seq_id) == "error"
        assert "shutting down" in collector.events[seq_id][-1].error
    assert len(collector.ids(running)) < 60
    assert (engine.num_active, engine.num_queued) == (0, 0)


def test_a_lone_sequence_decodes_at_width_one_and_a_survivor_moves_down(model, monkeypatch):
    """One sequence runs at batch 1. Three run at width 4; when the two in rows 0 and 1 end, the one in
    row 2 moves to row 0 and runs at width 1 again, its tokens unchanged by the move."""
    config = dataclasses.replace(model[1], eos_token_id=None)  # sequences run to their max_tokens
    engine = make_engine(model, config, max_batch=4)
    widths, decode_chunk = [], slots.decode_chunk_jit
    monkeypatch.setattr(slots, "decode_chunk_jit", lambda *args: widths.append(args[5]) or decode_chunk(*args))
    prompt = encode(model[2], "Hello world")
    collector = Collector()
    [lone] = engine.submit([sequence(prompt, 9)], collector)
    run_until_idle(engine)
    assert set(widths) == {1}
    widths.clear()
    short, other, survivor = engine.submit([sequence(prompt, 5), sequence(prompt, 5), sequence(prompt, 30)], collector)
    run_until_idle(engine)
    assert 4 in widths
    assert widths[-3:] == [1, 1, 1]
    weights = model[0]
    [alone] = generate([prompt], weights, config, max_new_tokens=30)
    assert collector.ids(survivor) == alone
    assert collector.ids(lone) == alone[:9]
    assert collector.ids(short) == collector.ids(other) == alone[:5]


def test_a_row_moved_while_its_chunk_runs_keeps_the_slots_that_chunk_writes(model):
    """A row is moved down (`_compact`) while the chunk dispatched before the last hand-out still runs
    and writes chunk_steps more of its slots than the host has counted. Here the host counts 8 filled
    slots (3 prompt tokens, 5 picked) when the survivor moves, so a copy of the first 8 would leave
    3 of that chunk's slots behind (and attend to the old row's there): the survivor's logprobs must
    be those of the same sequence run alone, which never moves."""
    config = dataclasses.replace(model[1], eos_token_id=None)  # sequences run to their max_tokens
    prompt = encode(model[2], "Hello world, and more words")[:3]
    assert len(prompt) == 3

    def survivor_logprobs(requests: list[SequenceRequest]) -> list[float]:
        engine, collector = make_engine(model, config, max_batch=2, chunk_steps=4), Collector()
        seq_id = engine.submit(requests, collector)[-1]
        run_until_idle(engine)
        return [entry.logprob for event in collector.events[seq_id] for entry in event.logprobs]

    survivor = sequence(prompt, 20, num_logprobs=0)
    alone, moved = survivor_logprobs([survivor]), survivor_logprobs([sequence(prompt, 5), survivor])
    assert len(moved) == len(alone) == 20
    np.testing.assert_allclose(moved, alone, atol=1e-5)


def test_a_prompt_prefilled_in_chunks_has_the_cache_and_logits_of_a_whole_prefill(long_model):
    """Chunks of 16, 16 and 5 (padded to 8) against one pass over all 37 tokens, at the parity bar."""
    weights, config, _ = long_model
    prompt = [int(t) for t in np.random.default_rng(0).integers(1, config.vocab_size, 37)]
    staging, done = empty_staging(config, 64, jnp.float32), 0
    for size, bucket in [(16, 16), (16, 16), (5, 8)]:
        ids_1T = np.zeros((1, bucket), np.int32)
        ids_1T[0, :size] = prompt[done : done + size]
        staging, last_logits_1V, _ = slots.prefill_chunk_jit(
            staging, ids_1T, np.int32(size), ids_1T, np.bool_(False), weights, config
        )
        done += size
    whole = prefill(np.asarray([prompt]), np.zeros((1,), np.int32), np.zeros((1, 2), np.uint32), weights, config, 64)
    assert int(staging.end_B[0]) == 37
    for chunked, full in [(staging.k_LBNSH, whole.cache.k_LBNSH), (staging.v_LBNSH, whole.cache.v_LBNSH)]:
        full_37 = np.asarray(full[:, :, :, :37])
        assert np.abs(np.asarray(chunked[:, :, :, :37]) - full_37).max() <= checkpoints.logit_tolerance(full_37)
    reference = np.asarray(whole.logits_BV)
    assert np.abs(np.asarray(last_logits_1V) - reference).max() <= checkpoints.logit_tolerance(reference)


def test_prompt_logprobs_are_the_log_softmax_of_the_full_forward(long_model):
    """A scoring-only sequence (max_tokens 0) prefilled in chunks of 8: entry j is log p(token j | tokens < j)."""
    weights, config, tokenizer = long_model
    engine = make_engine(long_model, prefill_chunk=8)
    prompt = encode(tokenizer, "The quick brown fox jumps over the lazy dog")
    collector = Collector()
    [seq_id] = engine.submit([SequenceRequest(tuple(prompt), SamplingSettings(max_new_tokens=0), prompt_logprobs=3)],
                             collector)  # fmt: skip
    run_until_idle(engine)
    [event] = collector.events[seq_id]
    assert (event.finish_reason, event.token_ids, event.text) == ("length", (), "")
    entries = event.prompt_logprobs
    assert [entry.token_id for entry in entries] == prompt
    assert entries[0].logprob is None
    expected_TV = np.asarray(jax.nn.log_softmax(gpt2_forward(np.asarray([prompt]), weights, config)[0]))
    for j in range(1, len(prompt)):
        assert entries[j].logprob == pytest.approx(expected_TV[j - 1, prompt[j]], abs=1e-4)
        assert [alt for alt, _, _ in entries[j].top] == np.argsort(-expected_TV[j - 1])[:3].tolist()


def counted(function, calls: dict[str, int], name: str):
    """function, counting its calls in calls[name]."""

    def call(*args, **kwargs):
        calls[name] += 1
        return function(*args, **kwargs)

    return call


def test_scoring_requests_are_prefilled_together_and_score_like_the_full_forward(long_model, monkeypatch):
    """What evaluation harnesses send (prompt logprobs, one new token): prompts up to a chunk long go in
    one batched pass (no staging chunk), and each entry j is log p(token j | tokens < j), as scored alone
    by the full forward; a prompt longer than a chunk takes the staging path and scores the same way."""
    weights, config, _ = long_model
    engine = make_engine(long_model, max_batch=4, prefill_chunk=32)
    calls = {"prefill_rows": 0, "prefill_chunk": 0}
    for name in calls:
        monkeypatch.setattr(slots, f"{name}_jit", counted(getattr(slots, f"{name}_jit"), calls, name))
    rng = np.random.default_rng(5)
    prompts = [tuple(int(t) for t in rng.integers(1, config.vocab_size, n)) for n in (3, 17, 32)]
    collector = Collector()
    ids = engine.submit([SequenceRequest(prompt, SamplingSettings(max_new_tokens=1), prompt_logprobs=2) for prompt in prompts],
                        collector)  # fmt: skip
    run_until_idle(engine)
    assert calls == {"prefill_rows": 1, "prefill_chunk": 0}
    long_prompt = tuple(int(t) for t in rng.integers(1, config.vocab_size, 45))  # past the 32-token chunk
    [long_id] = engine.submit([SequenceRequest(long_prompt, SamplingSettings(max_new_tokens=1), prompt_logprobs=2)],
                              collector)  # fmt: skip
    run_until_idle(engine)
    assert calls["prefill_chunk"] == 2
    for seq_id, prompt in [*zip(ids, prompts), (long_id, long_prompt)]:
        entries = collector.events[seq_id][0].prompt_logprobs
        assert [entry.token_id for entry in entries] == list(prompt)
        assert entries[0].logprob is None
        expected_TV = np.asarray(jax.nn.log_softmax(gpt2_forward(np.asarray([prompt]), weights, config)[0]))
        for j in range(1, len(prompt)):
            assert entries[j].logprob == pytest.approx(expected_TV[j - 1, prompt[j]], abs=1e-4)
            assert [alt for alt, _, _ in entries[j].top] == np.argsort(-expected_TV[j - 1])[:2].tolist()


def test_a_shared_prefix_is_reused_and_gives_the_same_tokens(long_model):
    """Two prompts sharing 150 tokens: the second restores the cached blocks they cover (144 tokens) and prefills
    the rest; its tokens equal an engine's without a prefix cache, and generate's."""
    weights, config, _ = long_model
    rng = np.random.default_rng(1)
    shared = [int(t) for t in rng.integers(1, config.vocab_size, 150)]
    first, second = shared + [5, 6, 7], shared + [8, 9]
    with_cache, without = make_engine(long_model), make_engine(long_model, prefix_cache_mib=0)
    outputs = []
    for engine in (with_cache, without):
        collector = Collector()
        ids = [engine.submit([sequence(prompt, 12)], collector)[0] for prompt in (first, second)]
        run_until_idle(engine)
        outputs.append([collector.ids(seq_id) for seq_id in ids])
    assert with_cache.reused_tokens == 150 // PREFIX_BLOCK * PREFIX_BLOCK
    assert without.reused_tokens == 0
    assert outputs[0] == outputs[1]
    assert outputs[0][1] == reference(long_model, sequence(second, 12))


def scored(engine: Engine, prompts) -> list[tuple]:
    """Each prompt's prompt logprobs (top 2), scored one request after another, as a harness sends them."""
    entries = []
    for prompt in prompts:
        collector = Collector()
        [seq_id] = engine.submit(
            [SequenceRequest(tuple(prompt), SamplingSettings(max_new_tokens=1), prompt_logprobs=2)], collector
        )  # fmt: skip
        run_until_idle(engine)
        entries.append(collector.events[seq_id][0].prompt_logprobs)
    return entries


# (context tokens, whether every chunk computed has 16 or more query slots): 70, batched first, then
# chunks of 16 slots or more; 150, staged first, where a chunk of 8 slots comes up without the cache.
@pytest.mark.parametrize("context_length, block_chunks_only", [(70, True), (150, False)])
def test_scoring_prompts_after_one_context_reuse_its_scored_blocks_and_score_the_same(
    long_model, context_length, block_chunks_only
):
    """A harness's multiple choice: one context, several continuations, each scored whole. The first
    computes everything and keeps the context's whole blocks with their prompt logprobs; the others
    restore them and compute from the blocks' last token on. Each prompt's logprobs equal an engine's
    without a prefix cache: bit for bit with the kernels where every chunk has 16 query slots or more
    (each row's and each query's sums are fixed whatever else a pass computes); a chunk of fewer
    attends by the decode kernel's arithmetic, which rounds differently, so there to float32 rounding."""
    weights, config, _ = long_model
    rng = np.random.default_rng(7)
    context = [int(t) for t in rng.integers(1, config.vocab_size, context_length)]
    prompts = [context + [int(t) for t in rng.integers(1, config.vocab_size, n)] for n in (9, 4, 13)]
    with_cache, without = make_engine(long_model), make_engine(long_model, prefix_cache_mib=0)
    reused = scored(with_cache, prompts)
    fresh = scored(without, prompts)
    blocks = context_length // PREFIX_BLOCK
    assert with_cache.reused_tokens == 2 * (blocks * PREFIX_BLOCK - 1)  # the last reused token is computed again
    assert without.reused_tokens == 0
    def top_ids(entries) -> list[list[int]]:
        return [[alt for alt, _, _ in entry.top] for entry in entries]

    def values(entries) -> np.ndarray:
        """Every logprob of the entries: each token's (the first has none), then their tops'."""
        return np.array([entry.logprob for entry in entries[1:]] + [value for e in entries for _, _, value in e.top])

    for got, expected in zip(reused, fresh):
        assert [entry.token_id for entry in got] == [entry.token_id for entry in expected]
        assert top_ids(got) == top_ids(expected)
        got_T, expected_T = values(got), values(expected)
        if weights.use_kernels and block_chunks_only:
            np.testing.assert_array_equal(got_T, expected_T)
        else:
            np.testing.assert_allclose(got_T, expected_T, rtol=0, atol=1e-5)


def test_blocks_a_generating_prompt_saved_carry_no_scores_until_a_scoring_prompt_computes_them(long_model):
    """Keys and values alone cannot give a scoring prompt the logprobs of the block's tokens: a block
    that a generating request saved is not reused for scoring; once a scoring prompt has computed the
    same block, its scores are kept and the next scoring prompt reuses it."""
    rng = np.random.default_rng(8)
    weights, config, _ = long_model
    context = [int(t) for t in rng.integers(1, config.vocab_size, 80)]
    engine = make_engine(long_model)
    engine.submit([sequence(context + [3, 4], 2)], Collector())
    run_until_idle(engine)
    assert engine.reused_tokens == 0
    assert engine.prefix_cache.num_scored(context + [5], len(context)) == 0
    scored(engine, [context + [5, 6, 7]])
    assert engine.reused_tokens == 0
    assert engine.prefix_cache.num_scored(context + [8], len(context)) == len(context) // PREFIX_BLOCK
    scored(engine, [context + [8, 9]])
    assert engine.reused_tokens == len(context) // PREFIX_BLOCK * PREFIX_BLOCK - 1
