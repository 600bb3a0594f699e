"""Stop strings: end generated text where a stop string first occurs, and while streaming, hold
back only the tail that could still become one (so nothing printed ever has to be taken back)."""

from collections.abc import Sequence


def find_stop(text: str, stops: Sequence[str]) -> int | None:
    """Index where the earliest stop string begins in text, or None."""
    assert all(isinstance(stop, str) for stop in stops)
    assert all(stop for stop in stops), "stop strings must be non-empty"
    found = [index for index in (text.find(stop) for stop in stops) if index >= 0]
    return min(found) if found else None


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

    def __init__(self, stops: Sequence[str]) -> None:
        if any(not stop for stop in stops):
            raise ValueError("stop strings must be non-empty")
        self.stops = list(stops)
        self.pending = ""

    def push(self, piece: str) -> tuple[str, bool]:
        assert isinstance(piece, str)
        text = self.pending + piece
        stop_at = find_stop(text, self.stops)
        if stop_at is not None:
            self.pending = ""
            return text[:stop_at], True
        cut = printable_length(text, self.stops)
        self.pending = text[cut:]
        return text[:cut], False

    def flush(self) -> str:
        text, self.pending = self.pending, ""
        return text
