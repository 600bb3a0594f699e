"""The OpenAI API's shapes: request bodies (pydantic models that check types only; values are checked
by SamplingSettings and the server's limits), errors, and the response bodies built from engine events.

    completions   text_completion / text_completion chunks; logprobs as parallel lists
                  (tokens, token_logprobs, top_logprobs as {text: logprob}, text_offset)
    chat          chat.completion / chat.completion.chunk; logprobs as {"content": [{token, logprob,
                  bytes, top_logprobs}]}
"""

import dataclasses
import time
import uuid

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from jax_gpt2.serve.events import TokenLogprob


class APIError(Exception):
    """An error the client caused (or may retry): becomes an OpenAI-style error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error") -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# Fields that ask for something GPT-2 cannot do at all: refused with a message saying why.
TOOL_FIELDS = ("tools", "tool_choice", "functions", "function_call")


class _Body(BaseModel):
    # An unknown field is refused (400), never ignored: a field this server does not know may change
    # the output, and a client that asked for it must not get something else with a 200.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class StreamOptions(_Body):
    include_usage: bool = False
    include_obfuscation: bool | None = None  # accepted and unused: padding against side channels, no output change


class JsonSchemaFormat(_Body):
    name: str
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None  # always strict here: the grammar enforces the schema
    description: str | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class SamplingBody(_Body):
    """Fields the two generation endpoints share; None means the OpenAI default."""

    model: str
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # extension; 0 or -1 is off
    min_p: float | None = None  # extension; 0 is off
    repetition_penalty: float | None = None  # extension; 1 is off
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    # structured output: OpenAI's response_format, or vLLM's guided_* extensions (at most one of them)
    response_format: ResponseFormat | None = None
    guided_json: dict[str, Any] | StrictStr | None = None
    guided_regex: StrictStr | None = None
    guided_choice: list[StrictStr] | None = None
    # vLLM's extensions
    min_tokens: int | None = None
    stop_token_ids: list[StrictInt] | None = None
    ignore_eos: StrictBool = False
    include_stop_str_in_output: StrictBool = False
    # Accepted and unused: they change nothing in the output (bookkeeping, or a tool setting without tools).
    user: str | None = None
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    service_tier: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    parallel_tool_calls: bool | None = None


# The legacy completions API's prompt: text, texts, token ids, or lists of token ids (strict: a
# string of digits is not a token id, a token id is not a string).
Prompt = StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]


class CompletionBody(SamplingBody):
    prompt: Prompt
    max_tokens: int | None = None
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


class ChatMessage(_Body):
    role: str
    content: str | list[dict] | None = None


class ChatBody(SamplingBody):
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None


class TokenizeBody(_Body):
    """vLLM's /tokenize: a prompt, or chat messages (as the chat endpoint lays them out)."""

    model: str
    prompt: StrictStr | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True  # GPT-2's tokenizer adds none either way
    return_token_strs: bool = False


class DetokenizeBody(_Body):
    model: str
    tokens: list[StrictInt]


def _by_text(top: tuple[tuple[int, str, float], ...]) -> dict[str, float]:
    """Alternatives as {text: logprob}. Two tokens can decode to the same text (say, halves of one UTF-8
    character, both U+FFFD): the better one keeps the key, so the best alternative is always there."""
    by_text: dict[str, float] = {}
    for _, text, value in top:  # best first
        by_text.setdefault(text, value)
    return by_text


def completion_logprobs(logprobs: list[TokenLogprob], offset: int) -> dict:
    """The completions API's logprobs: parallel lists, alternatives as {text: logprob}; a prompt's
    first token has null for both (nothing predicts it)."""
    assert offset >= 0
    offsets = []
    for entry in logprobs:
        offsets.append(offset)
        offset += len(entry.token)
    result = {
        "tokens": [entry.token for entry in logprobs],
        "token_logprobs": [entry.logprob for entry in logprobs],
        "top_logprobs": [None if entry.logprob is None else _by_text(entry.top) for entry in logprobs],
        "text_offset": offsets,
    }
    assert len(offsets) == len(logprobs)
    return result


def chat_logprobs(logprobs: list[TokenLogprob]) -> dict:
    def entry(text: str, value: float) -> dict:
        return {"token": text, "logprob": value, "bytes": list(text.encode())}

    content = [{**entry(lp.token, lp.logprob), "top_logprobs": [entry(t, v) for _, t, v in lp.top]} for lp in logprobs]
    assert len(content) == len(logprobs)
    assert all(lp.logprob is not None and lp.logprob <= 0 for lp in logprobs)
    return {"content": content}


@dataclasses.dataclass(frozen=True)
class Reply:
    """How one request's response looks: completions or chat, its id, echo prefixes, usage."""

    chat: bool
    model: str
    prefixes: list[str]  # per choice: the prompt's text when echo is on, else ""
    first_choices: tuple[int, ...]  # the first choice of each prompt: its cached tokens are the prompt's
    prompt_tokens: int
    with_logprobs: bool
    include_usage: bool
    token: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex)
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))

    @property
    def id(self) -> str:
        return ("chatcmpl-" if self.chat else "cmpl-") + self.token

    def choice(
        self, index: int, text: str, logprobs: list[TokenLogprob], finish: str | None, chunk: bool, offset: int = 0
    ) -> dict:
        """One choice, or a chunk of one; `offset` is where the chunk's text begins in the choice's text."""
        assert 0 <= index < len(self.prefixes)
        assert finish in (None, "stop", "length")
        if self.chat:
            message_key, message = ("delta", {"content": text}) if chunk else ("message", {"role": "assistant", "content": text})
            lp = chat_logprobs(logprobs) if self.with_logprobs else None
            return {"index": index, message_key: message, "logprobs": lp, "finish_reason": finish}
        lp = completion_logprobs(logprobs, offset) if self.with_logprobs else None
        return {"index": index, "text": text, "logprobs": lp, "finish_reason": finish}

    def envelope(self, choices: list[dict], chunk: bool, completion_tokens: int | None, cached_tokens: int = 0) -> dict:
        """The response (or a chunk) around its choices; usage when completion_tokens is given, with
        cached_tokens: prompt tokens the prefix cache supplied (OpenAI's prompt_tokens_details)."""
        assert completion_tokens is None or completion_tokens >= 0
        assert chunk or completion_tokens is not None  # a whole reply always reports usage
        assert 0 <= cached_tokens <= self.prompt_tokens
        kind = ("chat.completion" if self.chat else "text_completion") + (".chunk" if chunk and self.chat else "")
        body = {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices}
        if completion_tokens is not None:
            total = self.prompt_tokens + completion_tokens
            body["usage"] = {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": total,
                             "prompt_tokens_details": {"cached_tokens": cached_tokens}}  # fmt: skip
        return body
