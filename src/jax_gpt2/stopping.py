"""Where generated text ends: stop strings (held back while streaming only as far as they could
still begin, so nothing printed ever has to be taken back), and `TextFinisher`, the one place
that turns generated token ids into the text a user sees (whole UTF-8 characters, nothing from
an end-of-text token or a stop string on, at most max_new_tokens tokens) for the CLI and the server."""

from collections.abc import Collection, Sequence

from jax_gpt2.tokenizer import IncrementalDecoder


def find_stop(text: str, stops: Sequence[str]) -> int | None:
    """Index where the earliest stop string begins in text, or None."""
    found = find_stop_span(text, stops)
    return None if found is None else found[0]


def find_stop_span(text: str, stops: Sequence[str]) -> tuple[int, int] | None:
    """(begin, end) of the earliest stop string in text (the longest one there if several begin alike), or None."""
    assert all(isinstance(stop, str) for stop in stops)
    assert all(stop for stop in stops), "stop strings must be non-empty"
    found = [(index, index + len(stop)) for stop in stops if (index := text.find(stop)) >= 0]
    return min(found, key=lambda span: (span[0], -span[1])) if found else None


def printable_length(text: str, stops: Sequence[str]) -> int:
    """How much of text is safe to emit: all of it but a tail that is a proper prefix of a stop string."""
    assert all(stop for stop in stops)
    assert find_stop(text, stops) is None
    held = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), held, -1):
            if text.endswith(stop[:size]):
                held = size
                break
    return len(text) - held


class StopStringStream:
    """Feeds streamed text pieces through; `push` returns what may be printed now and whether a stop hit."""

    def __init__(self, stops: Sequence[str], include_stop: bool = False) -> None:
        if any(not stop for stop in stops):
            raise ValueError("stop strings must be non-empty")
        self.stops = list(stops)
        self.include_stop = include_stop  # vLLM's include_stop_str_in_output: the text ends after the stop string
        self.pending = ""

    def push(self, piece: str) -> tuple[str, bool]:
        assert isinstance(piece, str)
        text = self.pending + piece
        span = find_stop_span(text, self.stops)
        if span is not None:
            self.pending = ""
            return text[: span[1] if self.include_stop else span[0]], True
        cut = printable_length(text, self.stops)
        self.pending = text[cut:]
        return text[:cut], False

    def flush(self) -> str:
        text, self.pending = self.pending, ""
        return text


class TextFinisher:
    """Generated token ids in, one at a time; the text they make out, finished as the settings say.

    `push(token)` returns the text that may be shown now; once the sequence ends, `finish_reason`
    is "stop" (an eos token or a stop string) or "length" (max_new_tokens tokens kept) and nothing
    more may be pushed. `close()` flushes a sequence that ended for another reason. `num_tokens`
    counts the kept tokens (an eos is not kept). Plain data plus methods; the caller owns it.
    """

    def __init__(self, tokenizer, stops: Sequence[str], eos_ids: Collection[int], max_new_tokens: int,
                 include_stop: bool = False) -> None:  # fmt: skip
        assert max_new_tokens >= 0
        assert all(isinstance(token, int) for token in eos_ids)
        self.decoder = IncrementalDecoder(tokenizer)
        self.stop_stream = StopStringStream(stops, include_stop)
        self.eos_ids, self.max_new_tokens = frozenset(eos_ids), max_new_tokens
        self.num_tokens = 0
        self.finish_reason: str | None = None if max_new_tokens > 0 else "length"

    def push(self, token: int) -> str:
        assert self.finish_reason is None, "the sequence has already ended"
        assert token >= 0
        if token in self.eos_ids:
            self.finish_reason = "stop"
            return self._flush()
        self.num_tokens += 1
        piece, hit = self.stop_stream.push(self.decoder.push(token))
        if hit:
            self.finish_reason = "stop"
            return piece
        if self.num_tokens >= self.max_new_tokens:
            self.finish_reason = "length"
            return piece + self._flush()
        return piece

    def stop(self) -> str:
        """End the sequence now, with finish_reason "stop" (say, its structured answer is complete):
        the text still held back."""
        assert self.finish_reason is None, "the sequence has already ended"
        self.finish_reason = "stop"
        return self._flush()

    def close(self) -> str:
        """What is still held back, at the end of a stream that stopped without a finish reason."""
        return self._flush() if self.finish_reason is None else ""

    def _flush(self) -> str:
        tail, hit = self.stop_stream.push(self.decoder.flush())
        return tail if hit else tail + self.stop_stream.flush()


def finish_text(tokenizer, token_ids: Sequence[int], stops: Sequence[str], eos_ids: Collection[int],
                max_new_tokens: int) -> tuple[str, str | None]:  # fmt: skip
    """The whole text of a finished list of generated tokens, and why it ended (None: it did not)."""
    finisher = TextFinisher(tokenizer, stops, eos_ids, max_new_tokens)
    pieces = []
    for token in token_ids:
        if finisher.finish_reason is not None:
            break
        pieces.append(finisher.push(int(token)))
    pieces.append(finisher.close())
    assert finisher.num_tokens <= max_new_tokens
    return "".join(pieces), finisher.finish_reason
