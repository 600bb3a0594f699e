"""`jax-gpt2 serve`: an OpenAI-compatible HTTP layer (FastAPI on uvicorn) over the engine.

    POST /v1/completions        prompt (string or list), max_tokens, temperature, top_p, stop, seed, n,
                                logprobs, echo, stream; extensions: top_k, min_p, repetition_penalty
    POST /v1/chat/completions   the messages as "role: content" lines, then "assistant:" (GPT-2 has no
                                chat template); logprobs / top_logprobs as in the chat API
    GET  /v1/models, GET /health

The engine runs on its own thread (JAX calls block); each HTTP request submits its sequences and
receives their events through a `_Relay`, which hops them onto the event loop. Bad input is a 400
with OpenAI's error body; a full queue a 503 with Retry-After; a stream whose client goes away
cancels its sequences, which frees their slots.
"""

import asyncio
import contextlib
import dataclasses
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from jax_gpt2.engine import MAX_SEED, TOP_LOGPROBS, Engine, EngineClosed, Event, QueueFull, SequenceRequest, TokenLogprob
from jax_gpt2.tokenizer import encode

MAX_STOPS = 4  # as the OpenAI API
RETRY_AFTER_S = 1
DISCONNECT_CHECK_S = 1.0  # how often a non-streamed request looks for a client that went away


class APIError(Exception):
    """An error the client caused (or may retry): becomes an OpenAI-style error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error") -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind


def error_response(error: APIError, headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": error.message, "type": error.kind, "param": error.param, "code": error.code}}
    return JSONResponse(body, status_code=error.status, headers=headers)


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class StreamOptions(_Body):
    include_usage: bool = False


class _SamplingBody(_Body):
    """Fields the two generation endpoints share; None means the OpenAI default."""

    model: str
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)  # extension; 0 or -1 is off
    min_p: float | None = Field(None, ge=0, le=1)  # extension; 0 is off
    repetition_penalty: float | None = Field(None, gt=0)  # extension; 1 is off
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    n: int = Field(1, ge=1, le=128)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop):
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if len(stops) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop strings")
        if any(not s for s in stops):
            raise ValueError("stop strings must be non-empty")
        return stops


class CompletionBody(_SamplingBody):
    prompt: str | list[str]
    max_tokens: int | None = Field(None, ge=1)
    logprobs: int | None = Field(None, ge=0, le=TOP_LOGPROBS)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


class ChatMessage(_Body):
    role: str
    content: str | list[dict] | None = None


class ChatBody(_SamplingBody):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=TOP_LOGPROBS)


def chat_prompt(messages: list[ChatMessage]) -> str:
    """GPT-2 has no chat template: one "role: content" line per message, then "assistant:"."""
    assert len(messages) >= 1
    lines = []
    for index, message in enumerate(messages):
        content = message.content or ""
        if isinstance(content, list):
            if any(part.get("type") != "text" or not isinstance(part.get("text"), str) for part in content):
                raise APIError(400, "only text content parts are supported", f"messages.{index}.content")
            content = "".join(part["text"] for part in content)
        lines.append(f"{message.role}: {content}\n")
    prompt = "".join(lines) + "assistant:"
    assert prompt.endswith("assistant:")
    return prompt


def _check_supported(body: _SamplingBody) -> None:
    """Refuse, rather than silently ignore, OpenAI parameters this server does not implement."""
    for name in ("frequency_penalty", "presence_penalty"):
        if getattr(body, name) not in (None, 0, 0.0):
            raise APIError(400, f"{name} is not supported; use repetition_penalty (an extension)", name)
    if body.logit_bias:
        raise APIError(400, "logit_bias is not supported", "logit_bias")
    if isinstance(body, CompletionBody):
        if body.best_of not in (None, 1):
            raise APIError(400, "best_of is not supported (use n)", "best_of")
        if body.suffix:
            raise APIError(400, "suffix is not supported", "suffix")
        if body.echo and body.logprobs is not None:
            raise APIError(400, "echo with logprobs (prompt log-probabilities) is not supported", "echo")


def _encode_prompts(engine: Engine, prompts: list[str], max_tokens: int | None, param: str) -> list[list[int]]:
    """Token ids of each prompt, checked against the context: (prompt + max_tokens) must fit it."""
    if not prompts:
        raise APIError(400, "the prompt list is empty", param)
    assert max_tokens is None or max_tokens >= 1
    prompt_ids = [encode(engine.tokenizer, prompt) for prompt in prompts]
    for ids in prompt_ids:
        if not ids:
            raise APIError(400, "the prompt encodes to no tokens", param)
        wanted = len(ids) + (max_tokens or 1)
        if wanted > engine.context_length:
            raise APIError(
                400,
                f"this model's maximum context length is {engine.context_length} tokens; you asked for {wanted} "
                f"({len(ids)} in the prompt, {max_tokens or 1} for the completion)",
                "max_tokens" if max_tokens else param,
                "context_length_exceeded",
            )
    assert len(prompt_ids) == len(prompts)
    return prompt_ids


def _sequences(body: _SamplingBody, prompt_ids: list[list[int]], max_tokens: int, num_logprobs: int | None):
    """One SequenceRequest per choice, prompt-major: choice j of a seeded request reproduces row j of
    `generate(prompts repeated n times, seed=seed)`."""
    assert max_tokens >= 1
    seed = body.seed if body.seed is not None else secrets.randbelow(MAX_SEED + 1)
    settings = dict(
        temperature=1.0 if body.temperature is None else body.temperature,
        top_k=max(body.top_k or 0, 0), top_p=1.0 if body.top_p is None else body.top_p,
        min_p=body.min_p or 0.0, repetition_penalty=body.repetition_penalty or 1.0,
        seed=seed, stops=tuple(body.stop or ()), num_logprobs=num_logprobs,
    )  # fmt: skip
    requests = [
        SequenceRequest(tuple(ids), max_tokens, index=p * body.n + i, **settings)
        for p, ids in enumerate(prompt_ids)
        for i in range(body.n)
    ]
    assert len(requests) == len(prompt_ids) * body.n
    return requests


class _Relay:
    """Moves one HTTP request's events from the engine thread onto its event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[Event] = asyncio.Queue()

    def __call__(self, event: Event) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)


def _submit(engine: Engine, requests: list[SequenceRequest]) -> tuple[_Relay, list[int]]:
    """Hand the sequences to the engine; its refusals become 503 (busy, closing) or 400 (bad values)."""
    assert requests
    relay = _Relay(asyncio.get_running_loop())
    try:
        return relay, engine.submit(requests, relay)
    except QueueFull as error:
        raise APIError(503, f"the server is busy: {error}; retry later", None, "queue_full", "overloaded_error")
    except EngineClosed as error:
        raise APIError(503, str(error), None, "shutting_down", "overloaded_error")
    except ValueError as error:
        raise APIError(400, str(error))


async def _events(
    engine: Engine, relay: _Relay, seq_ids: list[int], gone: Callable[[], Awaitable[bool]] | None = None
) -> AsyncIterator[tuple[int, Event]]:
    """(choice index, event) until every sequence has finished; the unfinished ones are cancelled
    if the consumer stops early (a client that went away), so their slots free at once."""
    assert len(seq_ids) >= 1
    index = {seq_id: choice for choice, seq_id in enumerate(seq_ids)}
    running = set(seq_ids)
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
            if event.finish_reason is not None:
                running.discard(event.seq_id)
            yield index[event.seq_id], event
    finally:
        if running:
            engine.cancel(sorted(running))


@dataclasses.dataclass
class _Choice:
    """One choice's output so far (host bookkeeping of a non-streamed reply)."""

    text: str = ""
    num_tokens: int = 0
    logprobs: list[TokenLogprob] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None

    def add(self, event: Event) -> None:
        assert self.finish_reason is None
        self.text += event.text
        self.num_tokens += len(event.token_ids)
        self.logprobs += event.logprobs or []
        self.finish_reason = event.finish_reason


def _completion_logprobs(logprobs: list[TokenLogprob], offset: int) -> dict:
    """The completions API's logprobs: parallel lists, alternatives as {text: logprob}."""
    assert offset >= 0
    offsets = []
    for lp in logprobs:
        offsets.append(offset)
        offset += len(lp.token)
    result = {
        "tokens": [lp.token for lp in logprobs],
        "token_logprobs": [lp.logprob for lp in logprobs],
        "top_logprobs": [{text: value for _, text, value in lp.top} for lp in logprobs],
        "text_offset": offsets,
    }
    assert len(offsets) == len(logprobs)
    return result


def _chat_logprobs(logprobs: list[TokenLogprob]) -> dict:
    def entry(text: str, value: float) -> dict:
        return {"token": text, "logprob": value, "bytes": list(text.encode())}

    content = [{**entry(lp.token, lp.logprob), "top_logprobs": [entry(t, v) for _, t, v in lp.top]} for lp in logprobs]
    assert len(content) == len(logprobs)
    assert all(lp.logprob <= 0 for lp in logprobs)
    return {"content": content}


@dataclasses.dataclass(frozen=True)
class _Reply:
    """How one request's response looks: completions or chat, its id, echo prefixes, usage."""

    chat: bool
    model: str
    prefixes: list[str]  # per choice: the prompt when echo is on, else ""
    prompt_tokens: int
    with_logprobs: bool
    include_usage: bool
    token: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex)
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))

    @property
    def id(self) -> str:
        return ("chatcmpl-" if self.chat else "cmpl-") + self.token

    def choice(self, index: int, text: str, logprobs: list[TokenLogprob], finish: str | None, chunk: bool, offset: int) -> dict:
        assert 0 <= index < len(self.prefixes)
        assert finish in (None, "stop", "length")
        if self.chat:
            message_key, message = ("delta", {"content": text}) if chunk else ("message", {"role": "assistant", "content": text})
            lp = _chat_logprobs(logprobs) if self.with_logprobs else None
            return {"index": index, message_key: message, "logprobs": lp, "finish_reason": finish}
        lp = _completion_logprobs(logprobs, offset) if self.with_logprobs else None
        return {"index": index, "text": text, "logprobs": lp, "finish_reason": finish}

    def envelope(self, choices: list[dict], chunk: bool, completion_tokens: int | None) -> dict:
        assert completion_tokens is None or completion_tokens >= 0
        assert chunk or completion_tokens is not None  # a whole reply always reports usage
        kind = ("chat.completion" if self.chat else "text_completion") + (".chunk" if chunk and self.chat else "")
        body = {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices}
        if completion_tokens is not None:
            total = self.prompt_tokens + completion_tokens
            body["usage"] = {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": total}
        return body


def _sse(body: dict | str) -> str:
    return f"data: {body if isinstance(body, str) else json.dumps(body)}\n\n"


async def _stream(engine: Engine, relay: _Relay, seq_ids: list[int], reply: _Reply) -> AsyncIterator[str]:
    """Server-sent events: a chunk per engine event, an optional usage chunk, then [DONE]."""
    assert len(seq_ids) == len(reply.prefixes)
    assert not (reply.chat and any(reply.prefixes))
    prefixes = list(reply.prefixes)  # echo: a choice's first chunk starts with its prompt
    offsets = [len(prefix) for prefix in reply.prefixes]  # of each token in the choice's text (logprobs)
    completion_tokens = 0
    if reply.chat:  # the chat API opens every choice with the assistant's role
        opening = [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                   for i in range(len(seq_ids))]  # fmt: skip
        yield _sse(reply.envelope(opening, chunk=True, completion_tokens=None))
    async with contextlib.aclosing(_events(engine, relay, seq_ids)) as events:
        async for index, event in events:
            if event.finish_reason == "error":
                yield _sse({"error": {"message": "generation failed", "type": "server_error", "param": None, "code": None}})
                return
            text, prefixes[index] = prefixes[index] + event.text, ""
            choice = reply.choice(index, text, list(event.logprobs or []), event.finish_reason, True, offsets[index])
            offsets[index] += sum(len(lp.token) for lp in event.logprobs or [])
            completion_tokens += len(event.token_ids)
            yield _sse(reply.envelope([choice], chunk=True, completion_tokens=None))
    if reply.include_usage:
        yield _sse(reply.envelope([], chunk=True, completion_tokens=completion_tokens))
    yield _sse("[DONE]")


async def _respond(engine: Engine, requests: list[SequenceRequest], reply: _Reply, request: Request, stream: bool):
    """Submit, then stream the events as SSE or gather them into one reply."""
    assert len(requests) == len(reply.prefixes)
    relay, seq_ids = _submit(engine, requests)
    assert len(seq_ids) == len(requests)
    if stream:
        return StreamingResponse(_stream(engine, relay, seq_ids, reply), media_type="text/event-stream")
    choices = [_Choice() for _ in seq_ids]
    async with contextlib.aclosing(_events(engine, relay, seq_ids, request.is_disconnected)) as events:
        async for index, event in events:
            choices[index].add(event)
    if any(choice.finish_reason == "error" for choice in choices):
        raise APIError(500, "generation failed", kind="server_error")
    rendered = [
        reply.choice(i, reply.prefixes[i] + c.text, c.logprobs, c.finish_reason, False, len(reply.prefixes[i]))
        for i, c in enumerate(choices)
    ]
    return reply.envelope(rendered, chunk=False, completion_tokens=sum(c.num_tokens for c in choices))


def _engine_for(request: Request, model: str) -> Engine:
    if model != request.app.state.model_id:
        raise APIError(400, f"the model {model!r} does not exist; this server has {request.app.state.model_id!r}",
                       "model", "model_not_found")  # fmt: skip
    return request.app.state.engine


async def create_completion(body: CompletionBody, request: Request):
    engine = _engine_for(request, body.model)
    _check_supported(body)
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    max_tokens = 16 if body.max_tokens is None else body.max_tokens  # the OpenAI default
    prompt_ids = _encode_prompts(engine, prompts, max_tokens, "prompt")
    requests = _sequences(body, prompt_ids, max_tokens, body.logprobs)
    reply = _Reply(
        chat=False, model=body.model, prefixes=[prompts[j // body.n] if body.echo else "" for j in range(len(requests))],
        prompt_tokens=sum(len(ids) for ids in prompt_ids), with_logprobs=body.logprobs is not None,
        include_usage=bool(body.stream_options and body.stream_options.include_usage),
    )  # fmt: skip
    assert len(requests) == len(prompt_ids) * body.n
    assert max_tokens >= 1
    return await _respond(engine, requests, reply, request, body.stream)


async def create_chat_completion(body: ChatBody, request: Request):
    engine = _engine_for(request, body.model)
    _check_supported(body)
    max_tokens = body.max_completion_tokens or body.max_tokens
    [prompt_ids] = _encode_prompts(engine, [chat_prompt(body.messages)], max_tokens, "messages")
    max_tokens = max_tokens or engine.context_length - len(prompt_ids)  # the chat API's default: the rest
    num_logprobs = (body.top_logprobs or 0) if body.logprobs else None
    requests = _sequences(body, [prompt_ids], max_tokens, num_logprobs)
    reply = _Reply(
        chat=True, model=body.model, prefixes=[""] * len(requests), prompt_tokens=len(prompt_ids),
        with_logprobs=body.logprobs, include_usage=bool(body.stream_options and body.stream_options.include_usage),
    )  # fmt: skip
    assert len(requests) == body.n
    assert max_tokens >= 1
    return await _respond(engine, requests, reply, request, body.stream)


async def list_models(request: Request) -> dict:
    model = {"id": request.app.state.model_id, "object": "model", "created": 0, "owned_by": "jax-gpt2"}
    return {"object": "list", "data": [model]}


async def health(request: Request) -> dict:
    engine: Engine = request.app.state.engine
    return {"status": "ok", "active": engine.num_active, "queued": engine.num_queued, "max_batch": engine.max_batch,
            "context_length": engine.context_length}  # fmt: skip


def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    first = error.errors()[0]
    if first.get("type") == "json_invalid":
        return error_response(APIError(400, "we could not parse the JSON body of your request", None, "invalid_json"))
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(location) or None
    message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
    return error_response(APIError(400, message, param, first.get("type")))


def _api_error(request: Request, error: APIError) -> JSONResponse:
    headers = {"Retry-After": str(RETRY_AFTER_S)} if error.status == 503 else None
    return error_response(error, headers)


def _unexpected_error(request: Request, error: Exception) -> JSONResponse:
    """A bug, not bad input: still an OpenAI-style body, and the server keeps running."""
    return error_response(APIError(500, f"internal error: {type(error).__name__}", None, None, "server_error"))


def create_app(engine: Engine, model_id: str) -> FastAPI:
    """The ASGI app. Its lifespan runs the engine's thread; at shutdown (after uvicorn has let the open
    responses finish) the engine drains what is left and stops."""
    assert model_id
    assert engine.max_batch >= 1

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        await asyncio.to_thread(engine.shutdown, True)

    app = FastAPI(title="jax-gpt2", lifespan=lifespan)
    app.state.engine, app.state.model_id = engine, model_id
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(Exception, _unexpected_error)
    app.add_api_route("/v1/completions", create_completion, methods=["POST"])
    app.add_api_route("/v1/chat/completions", create_chat_completion, methods=["POST"])
    app.add_api_route("/v1/models", list_models, methods=["GET"])
    app.add_api_route("/health", health, methods=["GET"])
    return app


def run_server(
    model_id: str, folder, config, weights, host: str, port: int, max_batch: int, max_seq_len: int, max_queue: int,
    chunk_steps: int, kv_dtype,
) -> None:  # fmt: skip
    """Compile every shape the engine uses for a loaded model, then serve it as `model_id` until
    Ctrl-C / SIGTERM, which stop new connections, let the open responses finish (the engine keeps
    decoding them), and exit."""
    import uvicorn

    from jax_gpt2.tokenizer import load_tokenizer

    assert model_id
    assert port >= 0
    engine = Engine(weights, config, load_tokenizer(folder), max_batch, max_seq_len, max_queue, chunk_steps, kv_dtype)
    print(f"jax-gpt2 serve: compiling for {max_batch} slots x {engine.context_length} positions, "
          f"prefill buckets {engine.buckets} ...", flush=True)  # fmt: skip
    engine.warm_up()
    uvicorn.run(create_app(engine, model_id), host=host, port=port, log_level="info")
