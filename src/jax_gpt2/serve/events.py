"""What the engine sends back for each sequence: its new tokens, their text and logprobs, how it ended.

A leaf module: the engine makes these, the HTTP layer (routes.py) relays them and the wire format
(protocol.py) reads them, so the wire format never imports the engine.
"""

import dataclasses


@dataclasses.dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    token: str  # the token decoded alone
    logprob: float | None  # None for a prompt's first token (nothing predicts it)
    top: tuple[tuple[int, str, float], ...]  # (id, text, logprob) of the best alternatives, best first


@dataclasses.dataclass(frozen=True)
class Event:
    """New output of one sequence: tokens (eos excluded), their text, the logprobs of every token picked
    (an eos included), and finish_reason once it ends."""

    seq_id: int
    token_ids: tuple[int, ...]
    text: str
    logprobs: tuple[TokenLogprob, ...] | None
    finish_reason: str | None  # None while running; "stop", "length" or "error" at the end
    prompt_logprobs: tuple[TokenLogprob, ...] | None = None  # once, in the first event, when asked
    error: str | None = None  # with finish_reason "error": what the client should be told
    cached_tokens: int = 0  # prompt tokens whose keys and values came from the prefix cache
