"""`jax-gpt2 serve` through the real `openai` client (and raw HTTP where the wire format matters):
completions and chat equal `generate`, streaming equals the one-shot reply, stop strings, seeds and
n choices, logprobs, echo; 16 concurrent streams through 4 slots each get exactly their lone
result with no new compiles; a full queue answers 503 + Retry-After; bad input a 400 with
OpenAI's error body; a client that goes away frees its slot; shutdown drains, then exits."""

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time

from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import numpy as np
import openai
import pytest
import torch
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from checkpoints import TINY, hf_config, random_hf_model, save_safetensors
from jax_gpt2 import load_config, load_weights
from jax_gpt2.generate import generate
from jax_gpt2.tools.random_model import train_tokenizer
from jax_gpt2.serve.engine import Engine
from jax_gpt2.serve.slots import PREFIX_BLOCK, compiled_count
from jax_gpt2.serve.protocol import ChatMessage
from jax_gpt2.serve.routes import ServerLimits, chat_prompt, create_app
from jax_gpt2.tokenizer import IncrementalDecoder, encode, load_tokenizer

MODEL_ID = "tiny-gpt2"
CONTEXT = 128


@dataclasses.dataclass(frozen=True)
class Model:
    folder: object
    weights: object
    config: object
    tokenizer: object
    hf: object  # the transformers model the checkpoint was written from


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Model:
    folder = tmp_path_factory.mktemp("tiny-serve")
    vocab_size = train_tokenizer(folder, 300)
    hf = random_hf_model(hf_config(**{**TINY, "vocab_size": vocab_size, "n_positions": CONTEXT}), 0.3)
    save_safetensors(hf, folder)
    return Model(folder, load_weights(folder), load_config(folder), load_tokenizer(folder), hf)


@dataclasses.dataclass(frozen=True)
class Running:
    url: str
    engine: Engine
    server: uvicorn.Server
    thread: threading.Thread

    def client(self, api_key: str = "unused") -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=60)


@contextlib.contextmanager
def running_server(model: Model, config=None, limits=None, api_key=None, gate: threading.Event | None = None,
                   **engine_settings):  # fmt: skip
    """uvicorn on a free loopback port in a thread, the engine warmed up first; or, with a gate, as
    `jax-gpt2 serve` starts: nothing compiled, the first programs compiled once the test opens the gate."""
    engine = Engine(model.weights, config or model.config, model.tokenizer, **engine_settings)
    if gate is None:
        engine.warm_up()
    else:
        compile_first = engine.compile_for_first_request

        def gated() -> None:
            assert gate.wait(120), "the test never opened the gate"
            compile_first()

        engine.compile_for_first_request = gated
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(engine, MODEL_ID, limits, api_key), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    for _ in range(600):
        if server.started:
            break
        time.sleep(0.05)
    assert server.started, "uvicorn did not start in 30 s"
    try:
        yield Running(f"http://127.0.0.1:{sock.getsockname()[1]}", engine, server, thread)
    finally:
        server.should_exit = True
        thread.join(60)


@pytest.fixture(scope="module")
def server(model):
    limits = ServerLimits(max_body_bytes=1 << 20, max_n=8)
    with running_server(model, limits=limits, max_batch=4, max_seq_len=CONTEXT, max_queue=32, prefill_chunk=16) as running:
        yield running


@pytest.fixture(scope="module")
def one_slot_server(model):
    """One slot, a queue of one, and no eos, so a sequence runs to its max_tokens."""
    config = dataclasses.replace(model.config, eos_token_id=None)
    with running_server(model, config, max_batch=1, max_seq_len=CONTEXT, max_queue=1) as running:
        yield running


def server_text(model: Model, ids: list[int]) -> str:
    """The text the server makes of these tokens: incremental decoding, as it streams."""
    decoder = IncrementalDecoder(model.tokenizer)
    return "".join(decoder.push(token) for token in ids) + decoder.flush()


def expected(model: Model, prompts: list[str], max_tokens: list[int], **settings) -> list[tuple[str, str, int]]:
    """(text, finish_reason, completion tokens) that `generate` gives each prompt (one batch: rows are
    independent), eos ending a row early; greedy unless settings say otherwise."""
    eos = model.config.eos_token_id
    ids = [encode(model.tokenizer, prompt) for prompt in prompts]
    rows = generate(ids, model.weights, model.config, max_new_tokens=max(max_tokens), eos_token_id=eos, **settings)
    results = []
    for row, limit in zip(rows, max_tokens):
        row = row[:limit]
        if eos in row:
            results.append((server_text(model, row[: row.index(eos)]), "stop", row.index(eos)))
        else:
            results.append((server_text(model, row), "length", len(row)))
    return results


def test_models_and_health(server):
    assert [m.id for m in server.client().models.list().data] == [MODEL_ID]
    health = httpx.get(f"{server.url}/health").json()
    assert health["status"] == "ok"
    assert health["max_batch"] == 4


def test_health_is_503_loading_and_requests_503_with_retry_after_until_the_first_programs_compile(model):
    """The start-up state machine: loading (port open, nothing compiled) -> ready (a first request's
    programs compiled; /health 200, a request served while the rest compile) -> warm (all compiled)."""
    gate = threading.Event()
    with running_server(model, gate=gate, max_batch=2, max_seq_len=64, prefill_chunk=16) as running:
        health = httpx.get(f"{running.url}/health")
        assert health.status_code == 503
        assert health.headers["retry-after"] == "1"
        assert health.json()["status"] == "loading"
        assert health.json()["compiled"] == 0
        body = {"model": MODEL_ID, "prompt": "Hello", "max_tokens": 3}
        refused = httpx.post(f"{running.url}/v1/completions", json=body)
        assert refused.status_code == 503
        assert refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["code"] == "model_loading"
        assert httpx.get(f"{running.url}/metrics").status_code == 200
        gate.set()
        assert running.engine.programs.ready.wait(120)
        health = httpx.get(f"{running.url}/health")
        assert health.status_code == 200
        assert health.json()["status"] == "ok"
        reply = running.client().completions.create(model=MODEL_ID, prompt="Hello world", max_tokens=6, temperature=0)
        assert reply.choices[0].text == expected(model, ["Hello world"], [6])[0][0]
        assert running.engine.programs.warm.wait(300)
        health = httpx.get(f"{running.url}/health").json()
        assert health["warm"] is True
        assert health["compiled"] == health["programs"]


def test_greedy_completion_equals_generate(server, model):
    reply = server.client().completions.create(model=MODEL_ID, prompt="Hello world", max_tokens=12, temperature=0)
    [(text, finish, tokens)] = expected(model, ["Hello world"], [12])
    assert reply.choices[0].text == text
    assert reply.choices[0].finish_reason == finish
    assert reply.usage.prompt_tokens == len(encode(model.tokenizer, "Hello world"))
    assert reply.usage.completion_tokens == tokens
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + tokens


def test_chat_continues_the_role_lines_and_assistant_prompt(server, model):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello world"}]
    prompt = chat_prompt([ChatMessage(**m) for m in messages])
    assert prompt == "system: Be brief.\nuser: Hello world\nassistant:"
    reply = server.client().chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=10, temperature=0)
    [(text, finish, _)] = expected(model, [prompt], [10])
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == text
    assert reply.choices[0].finish_reason == finish


def test_streaming_equals_the_one_shot_reply_and_ends_with_done(server):
    settings = dict(model=MODEL_ID, prompt="The quick brown fox", max_tokens=14, temperature=0.9, seed=3)
    whole = server.client().completions.create(**settings)
    chunks = list(server.client().completions.create(stream=True, **settings))
    assert "".join(chunk.choices[0].text for chunk in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    raw = httpx.post(f"{server.url}/v1/completions", json={**settings, "stream": True}, timeout=60)
    assert raw.headers["content-type"].startswith("text/event-stream")
    events = [line for line in raw.text.split("\n\n") if line]
    assert all(event.startswith("data: ") for event in events)
    assert events[-1] == "data: [DONE]"


def test_streamed_chat_opens_with_the_role_and_can_report_usage(server, model):
    stream = server.client().chat.completions.create(
        model=MODEL_ID, messages=[{"role": "user", "content": "Hi"}], max_tokens=6, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    [(text, finish, tokens)] = expected(model, ["user: Hi\nassistant:"], [6])
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks[:-1]) == text
    assert chunks[-2].choices[0].finish_reason == finish
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == tokens


def test_a_stop_string_ends_the_text_where_it_begins(server):
    client = server.client()
    full = client.completions.create(model=MODEL_ID, prompt="Hello world", max_tokens=16, temperature=0).choices[0]
    stop = full.text[4:6]
    stopped = client.completions.create(model=MODEL_ID, prompt="Hello world", max_tokens=16, temperature=0, stop=[stop])
    assert stopped.choices[0].text == full.text[: full.text.index(stop)]
    assert stopped.choices[0].finish_reason == "stop"
    streamed = client.completions.create(
        model=MODEL_ID, prompt="Hello world", max_tokens=16, temperature=0, stop=stop, stream=True
    )
    assert "".join(chunk.choices[0].text for chunk in streamed) == stopped.choices[0].text


def test_a_seed_reproduces_and_n_choices_are_the_rows_of_generate(server, model):
    client = server.client()
    settings = dict(model=MODEL_ID, prompt="Hello world", max_tokens=10, temperature=1.0, n=3)
    first = client.completions.create(seed=5, **settings)
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.text for c in client.completions.create(seed=5, **settings).choices] == [c.text for c in first.choices]
    assert [c.text for c in client.completions.create(seed=6, **settings).choices] != [c.text for c in first.choices]
    rows = expected(model, ["Hello world"] * 3, [10] * 3, temperature=1.0, seed=5)
    assert [c.text for c in first.choices] == [text for text, _, _ in rows]
    assert first.usage.completion_tokens == sum(tokens for _, _, tokens in rows)


def test_a_prompt_list_gives_choices_prompt_by_prompt(server, model):
    prompts = ["Hello world", "A"]
    reply = server.client().completions.create(model=MODEL_ID, prompt=prompts, max_tokens=5, temperature=0, n=2)
    texts = [text for text, _, _ in expected(model, prompts, [5, 5])]
    assert [c.text for c in reply.choices] == [texts[0], texts[0], texts[1], texts[1]]
    assert reply.usage.prompt_tokens == sum(len(encode(model.tokenizer, p)) for p in prompts)


def test_logprobs_and_echo(server):
    client = server.client()
    reply = client.completions.create(model=MODEL_ID, prompt="Hello", max_tokens=4, temperature=0, logprobs=2)
    logprobs = reply.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 4
    assert "".join(logprobs.tokens) == reply.choices[0].text
    for token, value, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs):
        assert value <= 0
        assert max(top.values()) == pytest.approx(value)  # greedy: the chosen token is the best
    echoed = client.completions.create(model=MODEL_ID, prompt="Hello", max_tokens=4, temperature=0, echo=True)
    assert echoed.choices[0].text == "Hello" + reply.choices[0].text
    chat = client.chat.completions.create(
        model=MODEL_ID, messages=[{"role": "user", "content": "Hi"}], max_tokens=3, temperature=0, logprobs=True,
        top_logprobs=2,
    )  # fmt: skip
    assert len(chat.choices[0].logprobs.content) <= 3
    assert all(len(entry.top_logprobs) == 2 for entry in chat.choices[0].logprobs.content)


def test_16_concurrent_streams_through_4_slots_each_get_their_lone_result(server, model):
    """Different prompt and output lengths, so sequences join and leave at different steps and slots
    are reused; a second wave compiles nothing new."""
    prompts = [("The quick brown fox jumps over the lazy dog. " * 3)[: 2 + 3 * i] for i in range(16)]
    max_tokens = [3 + (5 * i) % 17 for i in range(16)]
    wanted = expected(model, prompts, max_tokens)

    async def one(client: openai.AsyncOpenAI, prompt: str, limit: int) -> tuple[str, str]:
        stream = await client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=limit, temperature=0, stream=True)
        pieces, finish = [], None
        async for chunk in stream:
            pieces.append(chunk.choices[0].text)
            finish = chunk.choices[0].finish_reason or finish
        return "".join(pieces), finish

    async def wave() -> list[tuple[str, str]]:
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
        async with client:
            return await asyncio.gather(*(one(client, p, m) for p, m in zip(prompts, max_tokens)))

    assert asyncio.run(wave()) == [(text, finish) for text, finish, _ in wanted]
    compiled = compiled_count()
    assert asyncio.run(wave()) == [(text, finish) for text, finish, _ in wanted]
    assert compiled_count() == compiled


def test_a_full_queue_answers_503_with_retry_after(one_slot_server, monkeypatch):
    engine, gate = one_slot_server.engine, threading.Event()
    step = engine.step
    monkeypatch.setattr(engine, "step", lambda: gate.wait(30) and step())  # hold the engine between rounds
    body = {"model": MODEL_ID, "prompt": "Hello", "max_tokens": 4}
    with httpx.Client(base_url=one_slot_server.url, timeout=60) as http:
        with (http.stream("POST", "/v1/completions", json={**body, "stream": True}) as first,
              http.stream("POST", "/v1/completions", json={**body, "stream": True}) as second):  # fmt: skip
            assert (first.status_code, second.status_code) == (200, 200)
            assert engine.num_queued == 2  # one for the slot, one in the queue of one
            refused = http.post("/v1/completions", json=body)
            gate.set()
            assert "data: [DONE]" in first.read().decode()
            assert "data: [DONE]" in second.read().decode()
        assert refused.status_code == 503
        assert refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["code"] == "queue_full"
        assert http.post("/v1/completions", json=body).status_code == 200  # served once there is room


def test_a_client_that_goes_away_mid_stream_frees_its_slot(one_slot_server, monkeypatch):
    engine = one_slot_server.engine
    step, cancelled = engine.step, []
    monkeypatch.setattr(engine, "step", lambda: time.sleep(0.05) or step())  # >= 50 ms a round: 60 tokens take > 0.7 s
    monkeypatch.setattr(engine, "cancel", lambda ids: cancelled.extend(ids) or Engine.cancel(engine, ids))
    body = {"model": MODEL_ID, "prompt": "Hello", "max_tokens": 60, "stream": True}
    with httpx.Client(base_url=one_slot_server.url, timeout=60) as http:
        with http.stream("POST", "/v1/completions", json=body) as response:
            first = next(response.iter_lines())
            assert first.startswith("data: ")
            assert engine.num_active == 1
        # the connection is closed here, long before 60 tokens
        for _ in range(100):
            if engine.num_active == 0:
                break
            time.sleep(0.05)
        assert engine.num_active == 0
        assert len(cancelled) == 1
        reply = http.post("/v1/completions", json={**body, "stream": False, "max_tokens": 3})
        assert reply.json()["choices"][0]["finish_reason"] == "length"


def test_a_non_streaming_client_that_goes_away_frees_its_slot_too(one_slot_server, monkeypatch):
    engine = one_slot_server.engine
    step, cancelled = engine.step, []
    monkeypatch.setattr(engine, "step", lambda: time.sleep(0.1) or step())  # 60 tokens take > 1.5 s
    monkeypatch.setattr(engine, "cancel", lambda ids: cancelled.extend(ids) or Engine.cancel(engine, ids))
    body = {"model": MODEL_ID, "prompt": "Hello", "max_tokens": 60}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{one_slot_server.url}/v1/completions", json=body, timeout=0.5)
    for _ in range(100):  # the server looks for a disconnect each second while it waits
        if cancelled and engine.num_active == 0:
            break
        time.sleep(0.05)
    assert len(cancelled) == 1
    assert engine.num_active == 0


GOOD = {"model": MODEL_ID, "prompt": "Hello", "max_tokens": 4}
CHAT = {"model": MODEL_ID, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}


@pytest.mark.parametrize(
    "path, body, param",
    [
        ("/v1/completions", "{not json", None),
        ("/v1/completions", {**GOOD, "model": "gpt-4"}, "model"),
        ("/v1/completions", {**GOOD, "max_tokens": -1}, "max_tokens"),
        ("/v1/completions", {**GOOD, "max_tokens": CONTEXT}, "max_tokens"),  # prompt + max_tokens > context
        ("/v1/completions", {**GOOD, "temperature": "hot"}, "temperature"),
        ("/v1/completions", {**GOOD, "temperature": -0.1}, "temperature"),
        ("/v1/completions", {**GOOD, "top_p": 0}, "top_p"),
        ("/v1/completions", {**GOOD, "top_k": -2}, "top_k"),
        ("/v1/completions", {**GOOD, "min_p": 1.5}, "min_p"),
        ("/v1/completions", {**GOOD, "repetition_penalty": 0}, "repetition_penalty"),
        ("/v1/completions", {**GOOD, "n": 0}, "n"),
        ("/v1/completions", {**GOOD, "n": 9}, "n"),  # the server's limit
        ("/v1/completions", {**GOOD, "logprobs": 6}, "logprobs"),
        ("/v1/completions", {**GOOD, "seed": -1}, "seed"),
        ("/v1/completions", {**GOOD, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ("/v1/completions", {**GOOD, "stop": ""}, "stop"),
        ("/v1/completions", {**GOOD, "prompt": []}, "prompt"),
        ("/v1/completions", {**GOOD, "prompt": 7}, "prompt"),
        ("/v1/completions", {**GOOD, "prompt": [1, 99999]}, "prompt"),  # a token id outside the vocabulary
        ("/v1/completions", {**GOOD, "prompt": [[1, 2], []]}, "prompt"),
        ("/v1/completions", {**GOOD, "prompt": [1, "a"]}, "prompt"),
        ("/v1/completions", {**GOOD, "prompt": [1] * CONTEXT}, "prompt"),  # the prompt alone fills the context
        ("/v1/completions", {**GOOD, "prompt": [1] * 100, "max_tokens": 40}, "max_tokens"),  # together they do not fit
        ("/v1/completions", {**GOOD, "prompt": "x" * 100_000}, "prompt"),  # can never fit: refused untokenized
        ("/v1/completions", {**GOOD, "frequency_penalty": 2.5}, "frequency_penalty"),
        ("/v1/completions", {**GOOD, "presence_penalty": -3}, "presence_penalty"),
        ("/v1/completions", {**GOOD, "logit_bias": {"5": 101}}, "logit_bias"),
        ("/v1/completions", {**GOOD, "logit_bias": {"abc": 1}}, "logit_bias"),
        ("/v1/completions", {**GOOD, "logit_bias": {"99999": 1}}, "logit_bias"),  # outside the vocabulary
        ("/v1/completions", {**GOOD, "logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias"),
        ("/v1/completions", {**GOOD, "min_tokens": 5, "max_tokens": 4}, "min_tokens"),
        ("/v1/completions", {**GOOD, "stop_token_ids": [99999]}, "stop_token_ids"),
        ("/v1/completions", {**GOOD, "response_formats": {"type": "json_object"}}, "response_formats"),  # a typo
        ("/v1/completions", {**GOOD, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ("/v1/chat/completions", {**CHAT, "tool_choice": "auto"}, "tool_choice"),
        ("/v1/chat/completions", {**CHAT, "functions": [{"name": "f"}]}, "functions"),
        ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "hi", "tool_calls": []}]}, "messages"),
        ("/v1/chat/completions", {**CHAT, "audio": {"voice": "alloy"}}, "audio"),
        ("/v1/completions", {**GOOD, "guided_regex": "a+", "min_tokens": 1}, "min_tokens"),
        ("/v1/completions", {**GOOD, "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
        ("/v1/completions", {**GOOD, "response_format": {"type": "xml"}}, "response_format"),
        ("/v1/completions", {**GOOD, "guided_json": "{not json"}, "guided_json"),
        ("/v1/completions", {"model": MODEL_ID}, "prompt"),
        ("/v1/chat/completions", {**CHAT, "messages": []}, "messages"),
        ("/v1/chat/completions", {**CHAT, "max_completion_tokens": CONTEXT}, "max_tokens"),
        ("/v1/chat/completions", {**CHAT, "top_logprobs": 9}, "top_logprobs"),
    ],
)
def test_bad_input_is_a_400_with_an_openai_error_body(server, path, body, param):
    kwargs = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, str) else {"json": body}
    response = httpx.post(f"{server.url}{path}", timeout=60, **kwargs)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["message"]
    assert error["param"] == param or (error["param"] or "").startswith(f"{param}.")


def test_tools_are_refused_saying_why_and_the_next_request_is_served(server):
    client = server.client()
    tool = {"type": "function", "function": {"name": "weather", "parameters": {"type": "object", "properties": {}}}}
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "hi"}], tools=[tool])
    assert "tool-calling" in caught.value.body["message"]
    assert caught.value.body["param"] == "tools"
    reply = client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_harmless_bookkeeping_fields_are_accepted(server):
    reply = server.client().completions.create(
        model=MODEL_ID, prompt="Hello", max_tokens=3, temperature=0, user="u1",
        extra_body={"metadata": {"run": "7"}, "store": False, "service_tier": "auto"},
    )  # fmt: skip
    assert len(reply.choices) == 1


def test_logit_bias_and_penalties_through_the_openai_client_equal_generate(server, model):
    client = server.client()
    forced = 65
    reply = client.completions.create(model=MODEL_ID, prompt="Hello", max_tokens=6, temperature=1.0, seed=1,
                                      logit_bias={str(forced): 100})  # fmt: skip
    assert reply.choices[0].text == server_text(model, [forced] * 6)
    eos = model.config.eos_token_id
    ids = encode(model.tokenizer, "Hello there")
    [row] = generate([ids], model.weights, model.config, max_new_tokens=12, eos_token_id=eos, frequency_penalty=0.9,
                     presence_penalty=0.6, logit_bias={3: -100.0})  # fmt: skip
    reply = client.completions.create(model=MODEL_ID, prompt="Hello there", max_tokens=12, temperature=0,
                                      frequency_penalty=0.9, presence_penalty=0.6, logit_bias={"3": -100})  # fmt: skip
    assert reply.choices[0].text == server_text(model, [t for t in row if t != eos])


def test_vllm_extensions_min_tokens_ignore_eos_stop_token_ids_and_including_the_stop_string(server, model):
    client = server.client()
    ids = encode(model.tokenizer, "Hello there")
    [free] = generate([ids], model.weights, model.config, max_new_tokens=12, eos_token_id=None)
    stop_id = free[3]
    first_stop = free.index(stop_id)
    reply = client.completions.create(model=MODEL_ID, prompt="Hello there", max_tokens=12, temperature=0,
                                      extra_body={"stop_token_ids": [stop_id], "ignore_eos": True})  # fmt: skip
    assert reply.choices[0].text == server_text(model, free[:first_stop])
    assert reply.choices[0].finish_reason == "stop"
    reply = client.completions.create(model=MODEL_ID, prompt="Hello there", max_tokens=12, temperature=0,
                                      extra_body={"stop_token_ids": [stop_id], "ignore_eos": True, "min_tokens": 12})  # fmt: skip
    assert reply.usage.completion_tokens == 12
    assert reply.choices[0].finish_reason == "length"
    text = server_text(model, free)
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    cut = text.index(stop)
    for include, expected_text in ((False, text[:cut]), (True, text[: cut + len(stop)])):
        reply = client.completions.create(model=MODEL_ID, prompt="Hello there", max_tokens=12, temperature=0, stop=[stop],
                                          extra_body={"ignore_eos": True, "include_stop_str_in_output": include})  # fmt: skip
        assert reply.choices[0].text == expected_text


def test_tokenize_and_detokenize_round_trip_against_the_tokenizer(server, model):
    text = "Hello there, tokens and bytes: é"
    tokens = httpx.post(f"{server.url}/tokenize", json={"model": MODEL_ID, "prompt": text}, timeout=60).json()
    assert tokens["tokens"] == encode(model.tokenizer, text)
    assert tokens["count"] == len(tokens["tokens"])
    assert tokens["max_model_len"] == CONTEXT
    back = httpx.post(f"{server.url}/detokenize", json={"model": MODEL_ID, "tokens": tokens["tokens"]}, timeout=60).json()
    assert back == {"prompt": text}
    messages = [{"role": "user", "content": "Hi"}]
    chat = httpx.post(f"{server.url}/tokenize", json={"model": MODEL_ID, "messages": messages}, timeout=60).json()
    assert chat["tokens"] == encode(model.tokenizer, chat_prompt([ChatMessage(**m) for m in messages]))
    bad = httpx.post(f"{server.url}/detokenize", json={"model": MODEL_ID, "tokens": [99999]}, timeout=60)
    assert bad.status_code == 400
    assert bad.json()["error"]["param"] == "tokens"


def test_usage_reports_the_prompt_tokens_the_prefix_cache_supplied(server):
    """The server saves whole blocks of prompts prefilled through staging; the same prompt again
    takes the whole blocks before its last token from the cache (80 of 90 tokens in 16-token
    blocks), and usage says so (OpenAI's prompt_tokens_details)."""
    client = server.client()
    prompt = list(range(200, 290))  # 90 token ids no other test sends
    cached = 90 // PREFIX_BLOCK * PREFIX_BLOCK
    first = client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=2, temperature=0)
    again = client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=2, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert again.usage.prompt_tokens_details.cached_tokens == cached
    assert again.choices[0].text == first.choices[0].text
    stream = client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=2, temperature=0, stream=True,
                                       stream_options={"include_usage": True})  # fmt: skip
    usage = [chunk.usage for chunk in stream if chunk.usage is not None]
    assert usage[-1].prompt_tokens_details.cached_tokens == cached


def test_scoring_requests_sharing_a_context_reuse_its_blocks_and_echo_the_same_logprobs(server, model):
    """As an evaluation harness scores multiple choice (echo, logprobs, one new token): the second
    continuation of a context takes the context's whole blocks and their logprobs from the cache,
    computing again only the last of them, and its context's logprobs are the first request's."""
    client = server.client()
    context = [int(t) for t in np.random.default_rng(11).integers(1, model.config.vocab_size, 40)]
    replies = [client.completions.create(model=MODEL_ID, prompt=context + ending, max_tokens=1, temperature=0,
                                         echo=True, logprobs=1) for ending in ([5, 6, 7], [8, 9])]  # fmt: skip
    assert replies[0].usage.prompt_tokens_details.cached_tokens == 0
    assert replies[1].usage.prompt_tokens_details.cached_tokens == 40 // PREFIX_BLOCK * PREFIX_BLOCK - 1
    first, second = (reply.choices[0].logprobs for reply in replies)
    assert second.token_logprobs[: len(context)] == pytest.approx(first.token_logprobs[: len(context)], abs=1e-5)
    assert second.top_logprobs[1 : len(context)] == [
        pytest.approx(top, abs=1e-5) for top in first.top_logprobs[1 : len(context)]
    ]  # fmt: skip


SMALL_SCHEMA = {
    "type": "object",
    "properties": {
        "k": {"enum": ["ab", "cd"]}, "ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0, "maximum": 99},
        "o": {"type": "object", "properties": {"c": {"type": "string", "maxLength": 3}}, "required": ["c"],
              "additionalProperties": False},
        "t": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "maxItems": 2},
    },
    "required": ["k", "ok", "n", "o", "t"],
    "additionalProperties": False,
}  # fmt: skip


def test_json_schema_answers_validate_at_temperature_1(server):
    """16 seeds, sampled at temperature 1 from a random model, four requests at a time: every answer
    that ends with finish_reason "stop" is JSON valid against the schema, and most end within 100 tokens."""
    client = server.client()
    response_format = {"type": "json_schema", "json_schema": {"name": "pet", "schema": SMALL_SCHEMA, "strict": True}}

    def answer(seed: int):
        return client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "Describe"}],
                                              max_tokens=100, temperature=1.0, seed=seed,
                                              response_format=response_format).choices[0]  # fmt: skip

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        choices = list(pool.map(answer, range(16)))
    finished = [c.message.content for c in choices if c.finish_reason == "stop"]
    assert len(finished) >= 8
    for text in finished:
        jsonschema.validate(json.loads(text), SMALL_SCHEMA)


def test_json_object_regex_and_choice_hold_on_completions(server):
    client = server.client()
    reply = client.completions.create(model=MODEL_ID, prompt="Data:", max_tokens=80, temperature=1.0, seed=4, n=4,
                                      extra_body={"response_format": {"type": "json_object"}})  # fmt: skip
    finished = [c.text for c in reply.choices if c.finish_reason == "stop"]
    assert finished
    assert all(isinstance(json.loads(text), dict) for text in finished)
    reply = client.completions.create(model=MODEL_ID, prompt="Code:", max_tokens=20, temperature=1.0, seed=1, n=4,
                                      extra_body={"guided_regex": "[0-9]{3}-[ab]{2}"})  # fmt: skip
    assert all(c.finish_reason == "stop" and re.fullmatch("[0-9]{3}-[ab]{2}", c.text) for c in reply.choices)
    reply = client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "Yes or no?"}],
                                           max_tokens=10, temperature=1.0, seed=2, n=4,
                                           extra_body={"guided_choice": ["yes", "no"]})  # fmt: skip
    assert all(c.finish_reason == "stop" and c.message.content in ("yes", "no") for c in reply.choices)


def test_a_constrained_stream_gives_the_one_shot_text_beside_unconstrained_rows(server, model):
    """Streamed and not, with an unconstrained request running in the same batch both times."""
    client = server.client()
    settings = dict(model=MODEL_ID, prompt="Data:", max_tokens=60, temperature=1.0, seed=9,
                    extra_body={"guided_json": SMALL_SCHEMA})  # fmt: skip
    results = {}
    for stream in (False, True):
        with ThreadPoolExecutor(2) as pool:
            other = pool.submit(client.completions.create, model=MODEL_ID, prompt="Hello", max_tokens=40, temperature=0)
            if stream:
                results[stream] = "".join(chunk.choices[0].text for chunk in client.completions.create(**settings, stream=True)
                                          if chunk.choices)  # fmt: skip
            else:
                results[stream] = client.completions.create(**settings).choices[0].text
            results[(stream, "other")] = other.result().choices[0].text
    assert results[True] == results[False]
    assert results[(True, "other")] == results[(False, "other")]
    [(expected_text, _, _)] = expected(model, ["Hello"], [40])
    assert results[(False, "other")] == expected_text


def test_a_schema_that_cannot_compile_is_a_400_and_the_next_request_is_served(server):
    client = server.client()
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "not": {"type": "string"}}}}
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=MODEL_ID, prompt="Hi", max_tokens=5, extra_body={"response_format": bad})
    assert "not" in caught.value.body["message"]
    assert caught.value.body["param"] == "response_format"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL_ID, prompt="Hi", max_tokens=5, extra_body={"guided_regex": "a(b"})
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL_ID, prompt="Hi", max_tokens=5,
                                  extra_body={"guided_regex": "a", "guided_choice": ["a"]})  # fmt: skip
    assert len(client.completions.create(model=MODEL_ID, prompt="Hi", max_tokens=3).choices) == 1


def test_the_openai_client_sees_a_400_as_bad_request_and_the_server_lives_on(server):
    with pytest.raises(openai.BadRequestError) as caught:
        server.client().completions.create(model=MODEL_ID, prompt="Hello", max_tokens=4, temperature=-1)
    assert caught.value.status_code == 400
    assert httpx.get(f"{server.url}/health").status_code == 200


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_shutdown_lets_open_streams_finish_with_queued_sequences_too(model, monkeypatch):
    """What Ctrl-C / SIGTERM trigger in uvicorn (should_exit): no new connections, the open response
    runs to its end (one choice decoding, one still queued), then the engine drains and stops."""
    config = dataclasses.replace(model.config, eos_token_id=None)
    with running_server(model, config, max_batch=1, max_seq_len=CONTEXT, max_queue=4) as running:
        step = running.engine.step
        monkeypatch.setattr(running.engine, "step", lambda: time.sleep(0.02) or step())  # 2 x 30 tokens > 0.3 s
        body = {"model": MODEL_ID, "prompt": "Hello", "max_tokens": 30, "n": 2, "stream": True}
        with httpx.stream("POST", f"{running.url}/v1/completions", json=body, timeout=60) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
            running.server.should_exit = True
            events = [line[len("data: ") :] for line in lines if line]
        assert events[-1] == "[DONE]"
        finished = [c for e in events[:-1] for c in json.loads(e)["choices"] if c["finish_reason"]]
        assert sorted((c["index"], c["finish_reason"]) for c in finished) == [(0, "length"), (1, "length")]
        running.thread.join(60)
        assert not running.thread.is_alive()
        assert not running.engine._thread.is_alive()


def test_the_cli_serves_and_exits_on_sigterm(model):
    port = free_port()
    command = [sys.executable, "-m", "jax_gpt2.cli", "serve", "--model", str(model.folder), "--port", str(port),
               "--max-batch", "2", "--max-seq-len", str(CONTEXT)]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        for _ in range(240):
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            assert process.poll() is None, process.stdout.read().decode()
            time.sleep(0.25)
        body = {"model": str(model.folder), "prompt": "Hello", "max_tokens": 5, "temperature": 0}
        reply = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=60).json()
        assert reply["choices"][0]["text"] == expected(model, ["Hello"], [5])[0][0]
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once shut down
        assert "Application shutdown complete" in process.stdout.read().decode()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def hf_log_softmax(model: Model, ids: list[int]) -> np.ndarray:
    """log_softmax of transformers' float32 logits at every position of one prompt."""
    with torch.no_grad():
        logits_TV = model.hf(torch.tensor([ids])).logits[0].double()
    return torch.log_softmax(logits_TV, dim=-1).numpy()


def test_echo_with_logprobs_and_no_new_tokens_scores_token_id_prompts_as_transformers(server, model):
    """Two token-id prompts, one choice each: the prompt's text, token 0 with null logprob, then
    log p(token j | tokens < j) and the top 3, equal to transformers' float32 log_softmax within 1e-4."""
    rng = np.random.default_rng(3)
    prompts = [[int(t) for t in rng.integers(1, model.config.vocab_size, n)] for n in (21, 40)]
    reply = server.client().completions.create(model=MODEL_ID, prompt=prompts, max_tokens=0, echo=True, logprobs=3)
    assert [choice.index for choice in reply.choices] == [0, 1]
    assert reply.usage.prompt_tokens == 61
    assert reply.usage.completion_tokens == 0
    for choice, ids in zip(reply.choices, prompts):
        logprobs, expected_TV = choice.logprobs, hf_log_softmax(model, ids)
        assert choice.text == model.tokenizer.decode(ids, skip_special_tokens=False)
        assert choice.finish_reason == "length"
        assert logprobs.tokens == [model.tokenizer.decode([t], skip_special_tokens=False) for t in ids]
        assert logprobs.token_logprobs[0] is None
        assert logprobs.top_logprobs[0] is None
        assert logprobs.text_offset == list(np.cumsum([0] + [len(token) for token in logprobs.tokens[:-1]]))
        for j in range(1, len(ids)):
            assert logprobs.token_logprobs[j] == pytest.approx(expected_TV[j - 1, ids[j]], abs=1e-4)
            top = {}  # {text: logprob} of the best 3; two tokens with one text (halves of a character) keep the better
            for t in np.argsort(-expected_TV[j - 1])[:3]:
                top.setdefault(model.tokenizer.decode([int(t)], skip_special_tokens=False), expected_TV[j - 1, t])
            assert logprobs.top_logprobs[j].keys() == top.keys()
            for text, value in top.items():
                assert logprobs.top_logprobs[j][text] == pytest.approx(value, abs=1e-4)


def test_the_lm_evaluation_harness_loglikelihood_request_reads_the_continuation(server, model):
    """What lm-evaluation-harness's local-completions sends for loglikelihood (token ids, echo, logprobs 1,
    max_tokens 1, temperature 0) and how it reads the reply: token_logprobs[ctxlen:-1] sums to the
    continuation's log-likelihood under transformers, and is_greedy compares with top_logprobs' max."""
    rng = np.random.default_rng(4)
    contexts = [[int(t) for t in rng.integers(1, model.config.vocab_size, n)] for n in (12, 30)]
    continuations = [[int(t) for t in rng.integers(1, model.config.vocab_size, 4)], None]
    continuations[1] = [int(np.argmax(hf_log_softmax(model, contexts[1])[-1]))]  # a greedy one-token continuation
    requests = [context + continuation for context, continuation in zip(contexts, continuations)]
    body = {"model": MODEL_ID, "prompt": requests, "temperature": 0, "max_tokens": 1, "logprobs": 1, "seed": 1234,
            "echo": True}  # fmt: skip
    reply = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).json()
    for choice, context, continuation, ids in zip(sorted(reply["choices"], key=lambda c: c["index"]), contexts,
                                                  continuations, requests):  # fmt: skip
        ctxlen = len(context)
        token_logprobs = choice["logprobs"]["token_logprobs"][ctxlen:-1]
        top_logprobs = choice["logprobs"]["top_logprobs"][ctxlen:-1]
        expected_TV = hf_log_softmax(model, ids)
        expected = sum(expected_TV[ctxlen - 1 + k, token] for k, token in enumerate(continuation))
        assert sum(token_logprobs) == pytest.approx(expected, abs=1e-4 * len(continuation))
        is_greedy = all(value == max(top.values()) for value, top in zip(token_logprobs, top_logprobs))
        assert is_greedy == all(expected_TV[ctxlen - 1 + k].argmax() == t for k, t in enumerate(continuation))
    assert len(reply["choices"][1]["logprobs"]["token_logprobs"]) == len(requests[1]) + 1  # the new token's too


def test_echo_with_n_choices_gives_each_its_prompt_then_its_own_tokens(server, model):
    client = server.client()
    reply = client.completions.create(model=MODEL_ID, prompt="Hello world", max_tokens=5, echo=True, logprobs=1, n=2,
                                      temperature=1.0, seed=9)  # fmt: skip
    plain = client.completions.create(model=MODEL_ID, prompt="Hello world", max_tokens=5, n=2, temperature=1.0, seed=9)
    num_prompt = len(encode(model.tokenizer, "Hello world"))
    for echoed, alone in zip(reply.choices, plain.choices):
        assert echoed.text == "Hello world" + alone.text
        assert "".join(echoed.logprobs.tokens[:num_prompt]) == "Hello world"
        assert len(echoed.logprobs.tokens) > num_prompt  # and the generated tokens' after them
        assert echoed.logprobs.token_logprobs[0] is None
        assert all(value <= 0 for value in echoed.logprobs.token_logprobs[1:])
    streamed = list(client.completions.create(model=MODEL_ID, prompt="Hello world", max_tokens=5, echo=True,
                                              logprobs=1, stream=True, temperature=0))  # fmt: skip
    assert streamed[0].choices[0].text.startswith("Hello world")
    assert streamed[0].choices[0].logprobs.token_logprobs[0] is None
    assert streamed[0].choices[0].logprobs.text_offset[0] == 0


def test_chat_logprobs_have_the_chat_api_shape(server):
    chat = server.client().chat.completions.create(
        model=MODEL_ID, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0, logprobs=True,
        top_logprobs=3,
    )  # fmt: skip
    content = chat.choices[0].logprobs.content
    assert 1 <= len(content) <= 4
    for entry in content:
        assert entry.bytes == list(entry.token.encode())
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)  # greedy: the chosen token is the best


def test_a_prompt_prefilled_in_chunks_of_16_equals_generate(server, model):
    """The server fixture prefills 16 tokens a round: a 100-token prompt takes 7 chunks, between decode rounds."""
    prompt = ("The quick brown fox jumps over the lazy dog. " * 8)[:400]
    ids = encode(model.tokenizer, prompt)
    assert len(ids) > 3 * 16
    ids = ids[: CONTEXT - 12]
    reply = server.client().completions.create(model=MODEL_ID, prompt=ids, max_tokens=12, temperature=0)
    eos = model.config.eos_token_id
    [row] = generate([ids], model.weights, model.config, max_new_tokens=12, eos_token_id=eos)
    row = row[: row.index(eos)] if eos in row else row
    assert reply.choices[0].text == server_text(model, row)


def test_a_shared_prefix_gives_the_same_output_with_and_without_reuse(model):
    """The same long prompt through a server whose prefix cache holds it and one without a prefix cache."""
    ids = [int(t) for t in np.random.default_rng(5).integers(1, model.config.vocab_size, 100)]
    texts = []
    for prefix_cache_mib in (16, 0):
        with running_server(model, max_batch=2, max_seq_len=CONTEXT, prefix_cache_mib=prefix_cache_mib) as running:
            client = running.client()
            first = client.completions.create(model=MODEL_ID, prompt=ids, max_tokens=10, temperature=0).choices[0].text
            second = client.completions.create(model=MODEL_ID, prompt=ids + [7], max_tokens=10, temperature=0)
            texts.append((first, second.choices[0].text))
            assert running.engine.reused_tokens == (100 // PREFIX_BLOCK * PREFIX_BLOCK if prefix_cache_mib else 0)
    assert texts[0] == texts[1]


def metric_values(url: str, headers=None) -> dict[tuple[str, tuple], float]:
    """Every sample of GET /metrics, parsed by prometheus_client's own parser: (name, labels) -> value."""
    text = httpx.get(f"{url}/metrics", headers=headers, timeout=60).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in text_string_to_metric_families(text) for s in f.samples}


def test_metrics_parse_as_prometheus_text_and_their_counters_move(server):
    ok = ("jax_gpt2_requests_total", (("route", "/v1/completions"), ("status", "200")))
    bad = ("jax_gpt2_requests_total", (("route", "/v1/completions"), ("status", "400")))
    before = metric_values(server.url)
    reply = server.client().completions.create(model=MODEL_ID, prompt="Hello world", max_tokens=6, temperature=0,
                                               stream=True, stream_options={"include_usage": True})  # fmt: skip
    usage = list(reply)[-1].usage
    httpx.post(f"{server.url}/v1/completions", json={"model": MODEL_ID, "prompt": "x", "n": 0}, timeout=60)
    after = metric_values(server.url)
    assert after[ok] == before.get(ok, 0) + 1
    assert after[bad] == before.get(bad, 0) + 1
    key = lambda name: (name, ())  # noqa: E731
    assert after[key("jax_gpt2_prompt_tokens_total")] - before[key("jax_gpt2_prompt_tokens_total")] == usage.prompt_tokens
    assert after[key("jax_gpt2_generated_tokens_total")] - before[key("jax_gpt2_generated_tokens_total")] == usage.completion_tokens
    ttft, itl = key("jax_gpt2_time_to_first_token_seconds_count"), key("jax_gpt2_inter_token_latency_seconds_count")
    assert after[ttft] == before[ttft] + 1
    assert after[itl] == before[itl] + usage.completion_tokens - 1
    assert after[key("jax_gpt2_queue_depth")] == 0
    assert after[key("jax_gpt2_active_sequences")] == 0


def test_an_api_key_guards_every_route_but_health(model):
    with running_server(model, api_key="s3cret", max_batch=2, max_seq_len=CONTEXT) as running:
        with pytest.raises(openai.AuthenticationError) as caught:
            running.client(api_key="wrong").completions.create(model=MODEL_ID, prompt="Hi", max_tokens=2)
        assert caught.value.body["code"] == "invalid_api_key"
        for path in ("/v1/models", "/metrics"):
            assert httpx.get(f"{running.url}{path}", timeout=60).status_code == 401
        assert httpx.get(f"{running.url}/health", timeout=60).status_code == 200
        reply = running.client(api_key="s3cret").completions.create(model=MODEL_ID, prompt="Hi", max_tokens=2)
        assert reply.choices[0].finish_reason in ("stop", "length")
        assert metric_values(running.url, {"Authorization": "Bearer s3cret"})


@pytest.mark.parametrize(
    "path, body",
    [
        ("/v1/completions", '{"model": "tiny-gpt2", "prompt": "hi \\ud800", "max_tokens": 2}'),
        ("/v1/completions", '{"model": "tiny-gpt2", "prompt": ["ok", "hi \\ud800"], "max_tokens": 2}'),
        ("/v1/completions", '{"model": "tiny-gpt2", "prompt": "ok", "stop": ["\\udc00"], "max_tokens": 2}'),
        ("/v1/chat/completions", '{"model": "tiny-gpt2", "messages": [{"role": "user", "content": "hi \\ud800"}]}'),
    ],
)
def test_a_lone_surrogate_is_a_400_and_the_server_lives_on(server, path, body):
    response = httpx.post(f"{server.url}{path}", content=body, headers={"content-type": "application/json"}, timeout=60)
    assert response.status_code == 400, response.text
    assert "surrogate" in response.json()["error"]["message"]
    assert server.client().completions.create(model=MODEL_ID, prompt="ok", max_tokens=2).choices


def test_unknown_routes_wrong_methods_and_broken_json_answer_in_the_openai_error_shape(server):
    for response, status in [
        (httpx.get(f"{server.url}/v1/nothing-here", timeout=60), 404),
        (httpx.get(f"{server.url}/v1/completions", timeout=60), 405),
        (httpx.post(f"{server.url}/v1/completions", content=b"\xff\xfe{", timeout=60), 400),
        (httpx.post(f"{server.url}/v1/completions", json=[1, 2], timeout=60), 400),
    ]:
        assert response.status_code == status
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["message"]


def test_a_body_over_the_limit_is_refused_before_it_is_read_and_others_keep_going(server, model, monkeypatch):
    """A 20 MB body announced by its Content-Length gets its 413 after 64 KiB of it were sent: the server
    did not wait for the rest. Meanwhile /health answers and a running stream gets all its tokens."""
    step = server.engine.step
    monkeypatch.setattr(server.engine, "step", lambda: time.sleep(0.01) or step())
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as raw, httpx.Client(base_url=server.url, timeout=60) as http:
        with http.stream("POST", "/v1/completions", json={**GOOD, "max_tokens": 40, "stream": True}) as stream:
            raw.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                        b"Content-Length: 20000000\r\n\r\n" + b'{"prompt": "' + b"The quick brown fox. " * 3000)  # fmt: skip
            assert raw.recv(4096).startswith(b"HTTP/1.1 413")
            assert http.get("/health").status_code == 200
            assert "data: [DONE]" in stream.read().decode()
    assert server.client().completions.create(model=MODEL_ID, prompt="ok", max_tokens=2).choices


def test_a_50_MB_prompt_through_the_openai_client_is_a_413_and_the_next_request_is_served(server):
    with pytest.raises(openai.APIStatusError) as caught:
        server.client().completions.create(model=MODEL_ID, prompt="The quick brown fox. " * 2_500_000, max_tokens=2)
    assert caught.value.status_code == 413
    assert caught.value.body["code"] == "request_too_large"
    assert server.client().completions.create(model=MODEL_ID, prompt="ok", max_tokens=2).choices


def test_max_queue_zero_serves_while_a_slot_is_free(model):
    with running_server(model, max_batch=1, max_seq_len=CONTEXT, max_queue=0) as running:
        for _ in range(2):
            assert running.client().completions.create(model=MODEL_ID, prompt="Hi", max_tokens=3).choices


def serve_process(model: Model, *flags: str) -> tuple[subprocess.Popen, str]:
    """`jax-gpt2 serve` in a subprocess, once /health answers."""
    port = free_port()
    command = [sys.executable, "-m", "jax_gpt2.cli", "serve", "--model", str(model.folder), "--port", str(port),
               "--max-batch", "2", "--max-seq-len", str(CONTEXT), *flags]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    for _ in range(480):
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return process, f"http://127.0.0.1:{port}"
        assert process.poll() is None, process.stdout.read().decode()
        time.sleep(0.25)
    process.kill()
    raise AssertionError("the server did not start")


def long_stream(url: str, model: Model, n: int = 1):
    """A sampled stream of n choices of CONTEXT - 8 tokens each (the tiny model makes ~500 tokens/s:
    n = 16 over 2 slots keeps the stream open for seconds, not a fraction of one)."""
    body = {"model": str(model.folder), "prompt": "Hello", "max_tokens": CONTEXT - 8, "stream": True, "temperature": 1.0,
            "seed": 1, "n": n}  # fmt: skip
    return httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120)


def test_after_sigterm_the_drain_timeout_ends_open_streams_with_an_error_event(model):
    process, url = serve_process(model, "--drain-timeout", "0", "--chunk-steps", "1")
    try:
        with long_stream(url, model) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
            process.send_signal(signal.SIGTERM)
            events = [line[len("data: ") :] for line in lines if line]
        assert "[DONE]" not in events
        assert "shutting down" in json.loads(events[-1])["error"]["message"]
        assert process.wait(60) in (0, -signal.SIGTERM)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def wait_until_refused(url: str) -> None:
    """Until the server has closed its listening socket, the sign that it has handled a SIGTERM: a
    refused connection, or one reset unanswered (it sat in the backlog of the socket being closed)."""
    for _ in range(200):
        try:
            httpx.get(f"{url}/health", timeout=1)
        except (httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError):
            return
        time.sleep(0.05)
    raise AssertionError("the server still takes connections 10 s after SIGTERM")


def test_a_second_sigterm_exits_at_once(model):
    process, url = serve_process(model, "--drain-timeout", "600", "--chunk-steps", "1")
    try:
        with long_stream(url, model, n=16) as response:
            lines = (line for line in response.iter_lines() if line)
            assert next(lines).startswith("data: ")
            process.send_signal(signal.SIGTERM)
            wait_until_refused(url)  # else both signals may reach Python as one, and one signal drains
            assert next(lines).startswith("data: ")  # the first signal drains: the stream goes on
            assert process.poll() is None
            process.send_signal(signal.SIGTERM)
            assert process.wait(30) == -signal.SIGTERM  # uvicorn re-raises the signal it caught
            with contextlib.suppress(httpx.HTTPError):
                assert "data: [DONE]" not in list(lines)  # cut short, not finished
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
