"""`jax-gpt2 serve`: the OpenAI-compatible HTTP routes (FastAPI on uvicorn) over the engine.

    POST /v1/completions        prompt (text, texts, token ids or lists of them), max_tokens, temperature,
                                top_p, stop, seed, n, logprobs, echo (with logprobs: the prompt's own
                                logprobs), stream; extensions: top_k, min_p, repetition_penalty
    POST /v1/chat/completions   the messages as "role: content" lines, then "assistant:" (GPT-2 has no
                                chat template); logprobs / top_logprobs as in the chat API
    POST /tokenize, /detokenize  vLLM's: text (or chat messages) -> token ids, and back
    GET  /v1/models, GET /metrics (Prometheus text), GET /health (never needs the API key)

Every field a request may carry is in protocol.py, and docs/serving.md says what each does; a field
that is not there is a 400, never ignored.

The event loop only moves bytes: parsing, validation and tokenization of a request run on a worker
thread, the model on the engine's thread; each request's events hop onto the loop through a
`Relay`. Before a route sees a request, `RequestGate` checks the API key (401), that the server has
finished loading (503 `model_loading` with Retry-After; /health and /metrics answer while it loads)
and the body size (413, answered as soon as the size is known). Bad input is a 400 with OpenAI's
error body, a full engine a 503 with Retry-After, a stream whose client goes away cancels its sequences.

Start-up: the port opens at once; the programs a short single request runs compile first (/health:
503 `{"status": "loading", ...}`), then /health turns 200 and the other programs compile on a
background thread while the server serves (see programs.py).
"""

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import secrets
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pydantic
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from jax_gpt2 import constraints
from jax_gpt2.config import tokens_in_vocabulary
from jax_gpt2.constraints import CompiledConstraint
from jax_gpt2.loader import collapse_weight_pages
from jax_gpt2.sampling import MAX_SEED, InvalidSetting, SamplingSettings, check_token_settings
from jax_gpt2.serve.engine import TOP_LOGPROBS, Engine, EngineClosed, Event, QueueFull, SequenceRequest, TokenLogprob
from jax_gpt2.serve.metrics import ServerMetrics
from jax_gpt2.serve.protocol import (
    TOOL_FIELDS, APIError, ChatBody, ChatMessage, CompletionBody, DetokenizeBody, Reply, SamplingBody, TokenizeBody,
)  # fmt: skip
from jax_gpt2.tokenizer import encode_many, longest_token_bytes

RETRY_AFTER_S = 1
LOADING_ROUTES_OPEN = ("/health", "/metrics")  # the routes that answer while the first programs compile
log = logging.getLogger("uvicorn.error")  # uvicorn's own start-up lines go there, at its --log-level
DISCONNECT_CHECK_S = 1.0  # how often a non-streamed request looks for a client that went away
PARAMS = {"max_new_tokens": "max_tokens"}  # SamplingSettings' field names that the API spells otherwise


@dataclasses.dataclass(frozen=True)
class ServerLimits:
    """What one request may ask for; past these, a 413 (body) or a 400 naming the parameter."""

    max_body_bytes: int = 2 << 20
    max_prompt_tokens: int = 65536  # over all of a request's prompts
    max_n: int = 16
    max_tokens: int | None = None  # None: the context length
    max_stops: int = 4  # as the OpenAI API

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_prompt_tokens", "max_n", "max_stops"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1; got {self.max_tokens}")


@dataclasses.dataclass(frozen=True)
class ServeState:
    """Everything a route needs, on app.state.serve."""

    engine: Engine
    model_id: str
    limits: ServerLimits
    metrics: ServerMetrics
    longest_token: int  # bytes of the longest token: a prompt has at least len(utf8) / this many tokens
    # The tokenizer as structured output reads it: built on a thread of its own at start-up (~0.25 s
    # for GPT-2's vocabulary, out of the GIL), so the port opens without waiting for it.
    grammar_tokenizer: "concurrent.futures.Future[constraints.GrammarTokenizer]"


@dataclasses.dataclass(frozen=True)
class Prepared:
    """A request turned into engine sequences and the shape of its reply (built on a worker thread)."""

    requests: list[SequenceRequest]
    reply: Reply
    stream: bool


def error_response(error: APIError, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


def _parse(raw: bytes, model: type[pydantic.BaseModel]):
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise APIError(400, "we could not parse the JSON body of your request", None, "invalid_json")
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object", None, "invalid_json")
    for name in TOOL_FIELDS:
        if data.get(name) is not None:
            raise APIError(400, f"{name} is not supported: GPT-2 has no tool-calling format (it was never trained "
                                "to call functions)", name, "unsupported_parameter")  # fmt: skip
    try:
        return model.model_validate(data)
    except pydantic.ValidationError as error:
        first = error.errors()[0]
        if first.get("type") == "extra_forbidden":
            param = ".".join(str(part) for part in first.get("loc", ()))
            raise APIError(400, f"unknown parameter {param!r}: this server refuses parameters it does not implement "
                                "rather than ignore them", param, "unsupported_parameter")  # fmt: skip
        # A union's errors name the member tried ("str", "list[int]"): the client named only the field.
        param = ".".join(str(part) for part in first.get("loc", ()) if not str(part).startswith(("list[", "str", "int")))
        message = str(first.get("msg"))
        if param.startswith("prompt") and first.get("type") != "missing":
            message = "must be a string, a list of strings, a list of token ids, or a list of lists of token ids"
        raise APIError(400, f"{param}: {message}" if param else message, param or None, first.get("type"))


def check_text(text: str, param: str) -> str:
    """JSON may carry a lone UTF-16 surrogate ("\\ud800"), which is no Unicode text: a 400, not a tokenizer crash."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        bad = text[error.start]
        raise APIError(400, f"{param}: not valid Unicode text (a lone surrogate U+{ord(bad):04X})", param)
    return text


def _check_engine_model(state: ServeState, model: str) -> None:
    if model != state.model_id:
        raise APIError(400, f"the model {model!r} does not exist; this server has {state.model_id!r}", "model",
                       "model_not_found")  # fmt: skip


def _check_supported(body: SamplingBody) -> None:
    """Refuse, rather than silently ignore, OpenAI parameters this server does not implement (unknown
    fields are refused by the request models already)."""
    if isinstance(body, CompletionBody):
        if body.best_of not in (None, 1):
            raise APIError(400, "best_of is not supported (use n)", "best_of")
        if body.suffix:
            raise APIError(400, "suffix is not supported", "suffix")


def _constraint(state: ServeState, body: SamplingBody) -> CompiledConstraint | None:
    """The body's structured-output request (response_format or one of vLLM's guided_* fields),
    compiled: what cannot compile is a 400 naming the problem, before anything is decoded."""
    fmt = body.response_format if body.response_format is not None and body.response_format.type != "text" else None
    given = [name for name, value in (("response_format", fmt), ("guided_json", body.guided_json),
                                      ("guided_regex", body.guided_regex), ("guided_choice", body.guided_choice))
             if value is not None]  # fmt: skip
    if not given:
        return None
    if len(given) > 1:
        raise APIError(400, f"give one structured-output field at most; got {', '.join(given)}", given[1])
    if body.min_tokens:  # its ban of the end tokens could leave a complete answer nothing to pick
        raise APIError(400, "min_tokens cannot be combined with structured output", "min_tokens")
    param = given[0]
    try:
        if fmt is not None and fmt.type == "json_object":
            constraint = constraints.json_object()
        elif fmt is not None:
            if fmt.json_schema is None or fmt.json_schema.schema_ is None:
                raise APIError(400, "response_format json_schema needs json_schema.schema", "response_format")
            constraint = constraints.json_schema(fmt.json_schema.schema_)
        elif body.guided_json is not None:
            schema = json.loads(body.guided_json) if isinstance(body.guided_json, str) else body.guided_json
            constraint = constraints.json_schema(schema)
        elif body.guided_regex is not None:
            constraint = constraints.regex(body.guided_regex)
        else:
            constraint = constraints.choice(body.guided_choice)
        return constraints.compile_constraint(constraint, state.grammar_tokenizer.result())
    except (ValueError, TypeError) as error:  # json.JSONDecodeError is a ValueError
        raise APIError(400, f"{param}: {error}", param, "invalid_grammar")


def _check_range(value: int | None, low: int, high: int, param: str) -> None:
    if value is not None and not low <= value <= high:
        raise APIError(400, f"{param} must be in [{low}, {high}]; got {value}", param)


def _logit_bias(body: SamplingBody) -> tuple[tuple[int, float], ...]:
    """OpenAI's logit_bias: token ids as strings of digits ("50256"), each mapped to a value."""
    entries = []
    for key, value in (body.logit_bias or {}).items():
        if not key.isascii() or not key.isdigit():
            raise APIError(400, f"logit_bias keys must be token ids written as strings of digits; got {key!r}", "logit_bias")
        entries.append((int(key), value))
    return tuple(entries)


def _settings(body: SamplingBody, max_tokens: int, limits: ServerLimits, vocab_size: int) -> SamplingSettings:
    """The body's sampling fields (OpenAI defaults for the unset ones) as SamplingSettings, which checks them."""
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stops) > limits.max_stops:
        raise APIError(400, f"at most {limits.max_stops} stop strings; got {len(stops)}", "stop")
    try:
        settings = SamplingSettings(
            max_new_tokens=max_tokens, temperature=1.0 if body.temperature is None else body.temperature,
            top_k=0 if body.top_k in (None, -1) else body.top_k, top_p=1.0 if body.top_p is None else body.top_p,
            min_p=body.min_p or 0.0, repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
            seed=secrets.randbelow(MAX_SEED + 1) if body.seed is None else body.seed,
            stop=tuple(check_text(stop, "stop") for stop in stops), logit_bias=_logit_bias(body),
            frequency_penalty=body.frequency_penalty or 0.0, presence_penalty=body.presence_penalty or 0.0,
            min_tokens=body.min_tokens or 0, stop_token_ids=tuple(body.stop_token_ids or ()),
            ignore_eos=body.ignore_eos, include_stop_str_in_output=body.include_stop_str_in_output,
        )  # fmt: skip
        check_token_settings(settings, vocab_size)
        return settings
    except InvalidSetting as error:
        raise APIError(400, str(error), PARAMS.get(error.field, error.field))


def _tokenize(state: ServeState, prompts: list[str] | list[list[int]], max_tokens: int, param: str) -> list[list[int]]:
    """Token ids of each prompt (texts are encoded, id lists checked), each fitting the context with max_tokens."""
    if not prompts:
        raise APIError(400, "the prompt list is empty", param)
    engine, vocab_size = state.engine, state.engine.config.vocab_size
    room = engine.context_length - max_tokens
    if all(isinstance(prompt, str) for prompt in prompts):
        for prompt in prompts:  # a prompt that can never fit is refused before it is tokenized
            fewest = math.ceil(len(check_text(prompt, param).encode("utf-8")) / state.longest_token)
            _check_fits(engine.context_length, fewest, max_tokens, param, at_least=True)
        prompt_ids = encode_many(engine.tokenizer, prompts)
    else:
        prompt_ids = [list(prompt) for prompt in prompts]
        for ids in prompt_ids:
            if not tokens_in_vocabulary(ids, vocab_size):
                raise APIError(400, f"{param}: token ids must be in [0, {vocab_size})", param)
    total = sum(len(ids) for ids in prompt_ids)
    if total > state.limits.max_prompt_tokens:
        raise APIError(400, f"at most {state.limits.max_prompt_tokens} prompt tokens per request; got {total}", param)
    for ids in prompt_ids:
        if not ids:
            raise APIError(400, "a prompt has no tokens", param)
        if len(ids) > room:
            _check_fits(engine.context_length, len(ids), max_tokens, param, at_least=False)
    assert len(prompt_ids) == len(prompts)
    return prompt_ids


def _check_fits(context: int, num_prompt: int, max_tokens: int, param: str, at_least: bool) -> None:
    if num_prompt + max_tokens > context:
        count = f"at least {num_prompt}" if at_least else f"{num_prompt}"
        raise APIError(
            400,
            f"this model's maximum context length is {context} tokens; you asked for {count} in the prompt and "
            f"{max_tokens} for the completion",
            param if num_prompt >= context or not max_tokens else "max_tokens", "context_length_exceeded",
        )  # fmt: skip


def _prompt_list(prompt) -> list[str] | list[list[int]]:
    """The completions API's four prompt forms as a list of prompts."""
    if isinstance(prompt, str):
        return [prompt]
    if prompt and all(isinstance(token, int) for token in prompt):
        return [prompt]
    return list(prompt)


def prepare_completion(state: ServeState, raw: bytes) -> Prepared:
    body: CompletionBody = _parse(raw, CompletionBody)
    _check_engine_model(state, body.model)
    _check_supported(body)
    limits, context = state.limits, state.engine.context_length
    max_tokens = 16 if body.max_tokens is None else body.max_tokens  # the OpenAI default
    _check_range(max_tokens, 0, limits.max_tokens or context, "max_tokens")
    _check_range(body.n, 1, limits.max_n, "n")
    _check_range(body.logprobs, 0, TOP_LOGPROBS, "logprobs")
    prompts = _prompt_list(body.prompt)
    settings = _settings(body, max_tokens, limits, state.engine.config.vocab_size)
    constraint = _constraint(state, body)
    prompt_ids = _tokenize(state, prompts, max_tokens, "prompt")
    prompt_logprobs = body.logprobs if body.echo else None
    requests = [
        SequenceRequest(tuple(ids), settings, index=p * body.n + i, num_logprobs=body.logprobs,
                        prompt_logprobs=prompt_logprobs, constraint=constraint)  # fmt: skip
        for p, ids in enumerate(prompt_ids)
        for i in range(body.n)
    ]  # fmt: skip
    texts = [prompt if isinstance(prompt, str) else state.engine.tokenizer.decode(prompt, skip_special_tokens=False)
             for prompt in prompts]  # fmt: skip
    reply = Reply(
        chat=False, model=body.model, prefixes=[texts[j // body.n] if body.echo else "" for j in range(len(requests))],
        first_choices=tuple(range(0, len(requests), body.n)),
        prompt_tokens=sum(len(ids) for ids in prompt_ids), with_logprobs=body.logprobs is not None,
        include_usage=bool(body.stream_options and body.stream_options.include_usage),
    )  # fmt: skip
    assert len(requests) == len(prompt_ids) * body.n
    return Prepared(requests, reply, body.stream)


def chat_prompt(messages: list[ChatMessage]) -> str:
    """GPT-2 has no chat template: one "role: content" line per message, then "assistant:"."""
    if not messages:
        raise APIError(400, "messages: at least one message is needed", "messages")
    lines = []
    for index, message in enumerate(messages):
        content, param = message.content or "", f"messages.{index}.content"
        if isinstance(content, list):
            if any(part.get("type") != "text" or not isinstance(part.get("text"), str) for part in content):
                raise APIError(400, "only text content parts are supported", param)
            content = "".join(part["text"] for part in content)
        lines.append(f"{check_text(message.role, f'messages.{index}.role')}: {check_text(content, param)}\n")
    prompt = "".join(lines) + "assistant:"
    assert prompt.endswith("assistant:")
    return prompt


def prepare_chat(state: ServeState, raw: bytes) -> Prepared:
    body: ChatBody = _parse(raw, ChatBody)
    _check_engine_model(state, body.model)
    _check_supported(body)
    limits, context = state.limits, state.engine.context_length
    prompt = chat_prompt(body.messages)
    asked = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    _check_range(asked, 1, limits.max_tokens or context, "max_tokens")
    _check_range(body.n, 1, limits.max_n, "n")
    _check_range(body.top_logprobs, 0, TOP_LOGPROBS, "top_logprobs")
    [prompt_ids] = _tokenize(state, [prompt], asked or 1, "messages")
    max_tokens = asked or min(context - len(prompt_ids), limits.max_tokens or context)  # the chat API's default: the rest
    settings = _settings(body, max_tokens, limits, state.engine.config.vocab_size)
    constraint = _constraint(state, body)
    num_logprobs = (body.top_logprobs or 0) if body.logprobs else None
    requests = [SequenceRequest(tuple(prompt_ids), settings, index=i, num_logprobs=num_logprobs, constraint=constraint)
                for i in range(body.n)]  # fmt: skip
    reply = Reply(
        chat=True, model=body.model, prefixes=[""] * len(requests), first_choices=(0,), prompt_tokens=len(prompt_ids),
        with_logprobs=body.logprobs, include_usage=bool(body.stream_options and body.stream_options.include_usage),
    )  # fmt: skip
    assert max_tokens >= 1
    return Prepared(requests, reply, body.stream)


class Relay:
    """Moves one HTTP request's events from the engine thread onto its event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[Event] = asyncio.Queue()

    def __call__(self, event: Event) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)


def _submit(engine: Engine, requests: list[SequenceRequest]) -> tuple[Relay, list[int]]:
    """Hand the sequences to the engine; its refusals become 503 (busy, closing) or 400 (bad values)."""
    assert requests
    relay = Relay(asyncio.get_running_loop())
    try:
        return relay, engine.submit(requests, relay)
    except QueueFull as error:
        raise APIError(503, f"the server is busy: {error}; retry later", None, "queue_full", "overloaded_error")
    except EngineClosed as error:
        raise APIError(503, str(error), None, "shutting_down", "overloaded_error")
    except ValueError as error:
        raise APIError(400, str(error))


async def _events(
    state: ServeState, relay: Relay, seq_ids: list[int], arrived: float,
    gone: Callable[[], Awaitable[bool]] | None = None,
) -> AsyncIterator[tuple[int, Event]]:  # fmt: skip
    """(choice index, event) until every sequence has finished, timed into the metrics; the unfinished
    ones are cancelled if the consumer stops early (a client that went away), so their slots free at once."""
    assert len(seq_ids) >= 1
    index = {seq_id: choice for choice, seq_id in enumerate(seq_ids)}
    running = set(seq_ids)
    clock = state.metrics.clock(arrived)
    loop = asyncio.get_running_loop()
    checked = loop.time()
    try:
        while running:
            try:
                event = await asyncio.wait_for(relay.queue.get(), timeout=DISCONNECT_CHECK_S)
            except TimeoutError:
                event = None
            if gone is not None and loop.time() - checked >= DISCONNECT_CHECK_S:
                checked = loop.time()
                if await gone():
                    return
            if event is None:
                continue
            clock.tokens(event.seq_id, len(event.token_ids))
            if event.finish_reason is not None:
                running.discard(event.seq_id)
            yield index[event.seq_id], event
    finally:
        if running:
            state.engine.cancel(sorted(running))


def _failure(event: Event) -> APIError:
    if event.error and "shutting down" in event.error:
        return APIError(503, event.error, None, "shutting_down", "overloaded_error")
    return APIError(500, event.error or "generation failed", None, None, "server_error")


def _sse(body: dict | str) -> str:
    return f"data: {body if isinstance(body, str) else json.dumps(body)}\n\n"


async def _stream(state: ServeState, relay: Relay, seq_ids: list[int], reply: Reply, arrived: float) -> AsyncIterator[str]:
    """Server-sent events: a chunk per engine event, an optional usage chunk, then [DONE]; an error
    (say, the drain timeout at shutdown) is one error event, and the stream ends there."""
    assert len(seq_ids) == len(reply.prefixes)
    assert not (reply.chat and any(reply.prefixes))
    prefixes = list(reply.prefixes)  # echo: a choice's first chunk starts with its prompt
    offsets = [0] * len(seq_ids)  # of each chunk's first token in its choice's text (logprobs)
    cached = [0] * len(seq_ids)
    completion_tokens = 0
    if reply.chat:  # the chat API opens every choice with the assistant's role
        opening = [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                   for i in range(len(seq_ids))]  # fmt: skip
        yield _sse(reply.envelope(opening, chunk=True, completion_tokens=None))
    async with contextlib.aclosing(_events(state, relay, seq_ids, arrived)) as events:
        async for index, event in events:
            if event.finish_reason == "error":
                yield _sse(_failure(event).body())
                return
            logprobs = list(event.prompt_logprobs or []) + list(event.logprobs or [])
            text, prefixes[index] = prefixes[index] + event.text, ""
            choice = reply.choice(index, text, logprobs, event.finish_reason, True, offsets[index])
            offsets[index] += sum(len(lp.token) for lp in logprobs)
            completion_tokens += len(event.token_ids)
            cached[index] = event.cached_tokens
            yield _sse(reply.envelope([choice], chunk=True, completion_tokens=None))
    if reply.include_usage:
        cached_tokens = sum(cached[i] for i in reply.first_choices)
        yield _sse(reply.envelope([], chunk=True, completion_tokens=completion_tokens, cached_tokens=cached_tokens))
    yield _sse("[DONE]")


@dataclasses.dataclass
class _Choice:
    """One choice's output so far (host bookkeeping of a non-streamed reply)."""

    text: str = ""
    num_tokens: int = 0
    logprobs: list[TokenLogprob] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    error: Event | None = None
    cached_tokens: int = 0

    def add(self, event: Event) -> None:
        assert self.finish_reason is None
        if event.finish_reason == "error":
            self.error = event
        self.text += event.text
        self.num_tokens += len(event.token_ids)
        self.logprobs += list(event.prompt_logprobs or []) + list(event.logprobs or [])
        self.finish_reason = event.finish_reason
        self.cached_tokens = event.cached_tokens


async def _submit_prepared(state: ServeState, raw: bytes, prepare) -> tuple[Prepared, Relay, list[int]]:
    """prepare(state, raw) off the event loop, then submit: inside the engine's `arriving` block, so an
    idle engine that takes another request meanwhile waits for this one."""
    with state.engine.arriving():
        prepared = await asyncio.to_thread(prepare, state, raw)
        relay, seq_ids = _submit(state.engine, prepared.requests)
    state.metrics.prompt_tokens.inc(prepared.reply.prompt_tokens)
    assert len(seq_ids) == len(prepared.requests)
    return prepared, relay, seq_ids


async def _respond(request: Request, prepared: Prepared, relay: Relay, seq_ids: list[int], arrived: float) -> Response:
    """Stream the submitted sequences' events as SSE or gather them into one reply."""
    state: ServeState = request.app.state.serve
    reply = prepared.reply
    if prepared.stream:
        return StreamingResponse(_stream(state, relay, seq_ids, reply, arrived), media_type="text/event-stream")
    choices = [_Choice() for _ in seq_ids]
    async with contextlib.aclosing(_events(state, relay, seq_ids, arrived, request.is_disconnected)) as events:
        async for index, event in events:
            choices[index].add(event)
    failed = [choice.error for choice in choices if choice.error is not None]
    if failed:
        raise _failure(failed[0])
    rendered = [reply.choice(i, reply.prefixes[i] + c.text, c.logprobs, c.finish_reason, False) for i, c in enumerate(choices)]
    cached_tokens = sum(choices[i].cached_tokens for i in reply.first_choices)
    body = reply.envelope(rendered, chunk=False, completion_tokens=sum(c.num_tokens for c in choices),
                          cached_tokens=cached_tokens)  # fmt: skip
    content = await asyncio.to_thread(json.dumps, body)  # an echoed, logprobbed batch can be megabytes
    return Response(content, media_type="application/json")


async def create_completion(request: Request) -> Response:
    arrived = time.perf_counter()
    prepared, relay, seq_ids = await _submit_prepared(request.app.state.serve, await request.body(), prepare_completion)
    return await _respond(request, prepared, relay, seq_ids, arrived)


async def create_chat_completion(request: Request) -> Response:
    arrived = time.perf_counter()
    prepared, relay, seq_ids = await _submit_prepared(request.app.state.serve, await request.body(), prepare_chat)
    return await _respond(request, prepared, relay, seq_ids, arrived)


def tokenize(state: ServeState, raw: bytes) -> dict:
    """vLLM's /tokenize: {"tokens", "count", "max_model_len"} (and "token_strs" when asked)."""
    body: TokenizeBody = _parse(raw, TokenizeBody)
    _check_engine_model(state, body.model)
    if (body.prompt is None) == (body.messages is None):
        raise APIError(400, "give either prompt or messages", "prompt")
    text = chat_prompt(body.messages) if body.messages is not None else check_text(body.prompt, "prompt")
    if len(text.encode("utf-8")) > state.limits.max_body_bytes:
        raise APIError(400, "the prompt is longer than the body limit", "prompt")
    [ids] = encode_many(state.engine.tokenizer, [text])
    result = {"tokens": ids, "count": len(ids), "max_model_len": state.engine.context_length}
    if body.return_token_strs:
        result["token_strs"] = [state.engine.tokenizer.decode([t], skip_special_tokens=False) for t in ids]
    assert result["count"] == len(result["tokens"])
    return result


def detokenize(state: ServeState, raw: bytes) -> dict:
    """vLLM's /detokenize: token ids -> {"prompt": text}."""
    body: DetokenizeBody = _parse(raw, DetokenizeBody)
    _check_engine_model(state, body.model)
    vocab_size = state.engine.config.vocab_size
    if not tokens_in_vocabulary(body.tokens, vocab_size):
        raise APIError(400, f"tokens: token ids must be in [0, {vocab_size})", "tokens")
    return {"prompt": state.engine.tokenizer.decode(body.tokens, skip_special_tokens=False)}


async def tokenize_route(request: Request) -> dict:
    return await asyncio.to_thread(tokenize, request.app.state.serve, await request.body())


async def detokenize_route(request: Request) -> dict:
    return await asyncio.to_thread(detokenize, request.app.state.serve, await request.body())


async def list_models(request: Request) -> dict:
    model = {"id": request.app.state.serve.model_id, "object": "model", "created": 0, "owned_by": "jax-gpt2"}
    return {"object": "list", "data": [model]}


async def health(request: Request) -> JSONResponse:
    """200 {"status": "ok", ...} once a first request is served without a compile; until then 503
    {"status": "loading", ...} with Retry-After (load balancers and `kubectl` probes read the status code).
    `compiled` of `programs` says how far the compiles are; `warm` that all are done (none is left for a request)."""
    engine: Engine = request.app.state.serve.engine
    body = {"status": "ok" if engine.ready else "loading", "active": engine.num_active, "queued": engine.num_queued,
            "max_batch": engine.max_batch, "context_length": engine.context_length, "warm": engine.warm,
            "compiled": engine.programs.num_compiled, "programs": len(engine.programs.keys)}  # fmt: skip
    assert body["compiled"] <= body["programs"]
    assert engine.ready or not engine.warm
    if engine.ready:
        return JSONResponse(body)
    return JSONResponse(body, status_code=503, headers={"Retry-After": str(RETRY_AFTER_S)})


async def metrics(request: Request) -> Response:
    content, content_type = request.app.state.serve.metrics.render()
    return Response(content, media_type=content_type)


def _http_error(request: Request, error: HTTPException) -> JSONResponse:
    """404, 405 and the like, in the OpenAI error shape the rest of the API uses."""
    message = f"{error.detail}: {request.method} {request.url.path}"
    code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code)
    return error_response(APIError(error.status_code, message, None, code), dict(error.headers or {}))


def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    return error_response(APIError(400, str(error.errors()[0].get("msg")), None, "invalid_request"))


def _api_error(request: Request, error: APIError) -> JSONResponse:
    headers = {"Retry-After": str(RETRY_AFTER_S)} if error.status == 503 else None
    return error_response(error, headers)


def _unexpected_error(request: Request, error: Exception) -> JSONResponse:
    """A bug, not bad input: still an OpenAI-style body, and the server keeps running."""
    return error_response(APIError(500, f"internal error: {type(error).__name__}", None, None, "server_error"))


class RequestGate:
    """ASGI middleware in front of every route: counts answers by status, checks the API key (401,
    compared in constant time; /health is open), and reads a body of at most max_body_bytes. A
    larger body gets its 413 as soon as its size is known (its Content-Length, or the first byte
    past the limit) and is then read to its end and dropped, so the client can read the answer while
    nothing past the limit is kept; the route receives the body whole, already read."""

    ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/tokenize", "/detokenize", "/metrics", "/health")

    def __init__(self, app, state: ServeState, api_key: str | None) -> None:
        self.app, self.state = app, state
        self.key_digest = None if api_key is None else hashlib.sha256(api_key.encode()).digest()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope["path"] if scope["path"] in self.ROUTES else "other"

        async def counted_send(message) -> None:
            if message["type"] == "http.response.start":
                self.state.metrics.requests.labels(route=route, status=str(message["status"])).inc()
            await send(message)

        if scope["path"] != "/health" and not self._authorized(scope):
            error = APIError(401, "a valid API key is needed: Authorization: Bearer <key>", None, "invalid_api_key")
            return await _answer_then_drain(error, receive, counted_send, headers={"www-authenticate": "Bearer"})
        if scope["path"] not in LOADING_ROUTES_OPEN and not self.state.engine.ready:
            error = APIError(503, "the model is loading (compiling its first programs); retry shortly", None,
                             "model_loading", "unavailable_error")  # fmt: skip
            return await _answer_then_drain(error, receive, counted_send, headers={"Retry-After": str(RETRY_AFTER_S)})
        body = await self._read_body(scope, receive, counted_send)
        if body is None:
            return None
        return await self.app(scope, _replay(body, receive), counted_send)

    def _authorized(self, scope) -> bool:
        if self.key_digest is None:
            return True
        given = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = given.partition(b" ")
        # Digests of equal length, compared in constant time: the time says nothing about the key.
        return scheme.lower() == b"bearer" and secrets.compare_digest(hashlib.sha256(token.strip()).digest(), self.key_digest)

    async def _read_body(self, scope, receive, send) -> bytes | None:
        """The whole body if it fits the limit; else None, once a 413 has been sent and the rest dropped."""
        limit = self.state.limits.max_body_bytes
        too_large = APIError(413, f"the request body is larger than {limit} bytes", None, "request_too_large")
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            await _answer_then_drain(too_large, receive, send)
            return None
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > limit:
                await _answer_then_drain(too_large, receive, send, more)
                return None
        return bytes(body)


async def _answer_then_drain(error: APIError, receive, send, more: bool = True, headers: dict | None = None) -> None:
    """Send the error's status and body at once, then read the request body to its end, dropping it,
    before ending the response: the client reads the answer after it has sent its body (a server
    that closed with the body unread would reset the connection under the client's feet)."""
    body = json.dumps(error.body()).encode()
    all_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    all_headers += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": error.status, "headers": all_headers})
    await send({"type": "http.response.body", "body": body, "more_body": True})
    while more:
        message = await receive()
        more = message["type"] == "http.request" and message.get("more_body", False)
    await send({"type": "http.response.body", "body": b"", "more_body": False})


def _replay(body: bytes, receive):
    """An ASGI receive that hands over the body read already, then the connection's own messages
    (so a route still hears the client disconnect)."""
    sent = False

    async def replayed():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


def create_app(engine: Engine, model_id: str, limits: ServerLimits | None = None, api_key: str | None = None) -> FastAPI:
    """The ASGI app. Its lifespan runs the engine's thread; at shutdown (after uvicorn has let the open
    responses finish, or the drain timeout has ended them) the engine stops."""
    assert model_id
    assert api_key is None or api_key
    config = engine.config
    grammar = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="jax-gpt2-grammar")
    state = ServeState(engine, model_id, limits or ServerLimits(), ServerMetrics(engine), longest_token_bytes(engine.tokenizer),
                       grammar.submit(constraints.grammar_tokenizer, engine.tokenizer, config.vocab_size, config.eos_token_id))  # fmt: skip
    grammar.shutdown(wait=False)  # the one job runs on; the thread ends with it

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        if engine.warm:
            engine.start()
        elif engine.weights.mesh is not None:
            threading.Thread(target=_warm_up_then_start, args=(engine,), name="jax-gpt2-compile", daemon=True).start()
        else:
            engine.start()
            _start_compiling(engine)
        yield
        await asyncio.to_thread(engine.shutdown, False)  # every connection is closed: nobody waits for the rest

    app = FastAPI(title="jax-gpt2", lifespan=lifespan)
    app.state.serve = state
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(Exception, _unexpected_error)
    app.add_api_route("/v1/completions", create_completion, methods=["POST"])
    app.add_api_route("/v1/chat/completions", create_chat_completion, methods=["POST"])
    app.add_api_route("/v1/models", list_models, methods=["GET"])
    app.add_api_route("/tokenize", tokenize_route, methods=["POST"])
    app.add_api_route("/detokenize", detokenize_route, methods=["POST"])
    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/metrics", metrics, methods=["GET"])
    app.add_middleware(RequestGate, state=state, api_key=api_key)
    return app


def _start_compiling(engine: Engine) -> None:
    """_compile_programs on a daemon thread, once per engine (run_server starts it before it builds
    the app, so the first programs compile while the app and uvicorn start)."""
    assert engine.weights.mesh is None
    if engine.programs.claim_background():
        threading.Thread(target=_compile_programs, args=(engine,), name="jax-gpt2-compile", daemon=True).start()


def _compile_programs(engine: Engine) -> None:
    """The start-up work, off the event loop: the first request's programs (then /health says ok),
    the weights onto 2 MiB pages (`jax-gpt2 serve` loads them without, to answer ~1 s sooner), then
    the rest. Daemon thread: a shutdown does not wait for compiles nobody will use."""
    assert not engine.warm
    assert engine.programs.num_compiled <= len(engine.programs.keys)
    started = time.perf_counter()
    engine.compile_for_first_request()
    log.info("ready: the first request's %d programs compiled in %.1f s", len(engine.programs.first),
             time.perf_counter() - started)  # fmt: skip
    collapse_weight_pages(engine.weights)
    engine.compile_the_rest()
    log.info("warm: all %d programs compiled in %.1f s", len(engine.programs.keys), time.perf_counter() - started)


def _warm_up_then_start(engine: Engine) -> None:
    """A mesh engine's start-up (see Engine.__init__): run every program once, then start the engine
    thread. Nothing else touches the engine meanwhile: every route but /health and /metrics answers
    503 until `ready`, and warm_up sets it last."""
    assert engine.weights.mesh is not None
    assert not engine.ready
    started = time.perf_counter()
    engine.warm_up()
    engine.start()
    log.info("ready: every program compiled (eagerly, on a mesh) in %.1f s", time.perf_counter() - started)


def _uvicorn_server(app: FastAPI, engine: Engine, host: str, port: int, drain_timeout_s: float):
    """uvicorn with a bounded shutdown. The first SIGTERM / Ctrl-C stops new connections and starts
    the engine's drain: open responses run on for at most drain_timeout_s, then end with an error
    event; a second signal exits at once (uvicorn's own would ignore a second SIGTERM)."""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            if self.should_exit:
                self.force_exit = True
            else:
                engine.begin_drain(drain_timeout_s)  # plain assignments: safe in a signal handler
            super().handle_exit(sig, frame)

    # uvicorn's own timeout is the backstop: it cancels what is still open a little after the drain.
    config = uvicorn.Config(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=drain_timeout_s + 5)
    return DrainingServer(config)


def run_server(
    model_id: str, engine: Engine, host: str, port: int, limits: ServerLimits, api_key: str | None,
    drain_timeout_s: float,
) -> None:  # fmt: skip
    """Serve `engine`'s model as `model_id` until SIGTERM / Ctrl-C (a drain of at most drain_timeout_s),
    or a second one (at once). The port opens before anything is compiled: /health answers 503
    `loading` until a first request's programs are compiled, the rest compile in the background."""
    assert model_id
    assert drain_timeout_s >= 0
    print(f"jax-gpt2 serve: {engine.max_batch} slots x {engine.context_length} positions (widths {engine.widths}, "
          f"prefill chunks {engine.chunk_buckets}); compiling {len(engine.programs.keys)} programs, "
          f"/health answers 200 once the first {len(engine.programs.first)} are", flush=True)  # fmt: skip
    if engine.weights.mesh is None and not engine.warm:
        _start_compiling(engine)
    _uvicorn_server(create_app(engine, model_id, limits, api_key), engine, host, port, drain_timeout_s).run()
