"""Stop strings end the text where they first occur, also when split across streamed pieces."""

import pytest

from jax_gpt2.stopping import StopStringStream, TextFinisher, find_stop, finish_text, printable_length


def test_find_stop_returns_the_earliest_occurrence_of_any_stop():
    assert find_stop("abc END def STOP", ["STOP", "END"]) == 4
    assert find_stop("nothing here", ["STOP"]) is None


def test_only_a_possible_beginning_of_a_stop_string_is_held_back():
    assert printable_length("hello wor", ["world!"]) == len("hello ")
    assert printable_length("hello", ["\n\n"]) == 5
    assert printable_length("hello\n", ["\n\n"]) == 5


def test_a_stop_string_split_across_pieces_is_caught_and_never_printed():
    stream = StopStringStream(["\n\nQ:"])
    printed, stopped = "", False
    for piece in ["The answer", " is 4.\n", "\nQ", ": next", " question"]:
        text, stopped = stream.push(piece)
        printed += text
        if stopped:
            break
    assert stopped
    assert printed == "The answer is 4."


def test_text_without_a_stop_comes_through_whole():
    stream = StopStringStream(["STOP"])
    printed = "".join(stream.push(piece)[0] for piece in ["ST", "ONE ", "S", "T"]) + stream.flush()
    assert printed == "STONE ST"


def test_empty_stop_string_is_rejected():
    with pytest.raises(ValueError, match="non-empty"):
        StopStringStream([""])


class Characters:
    """A tokenizer stand-in: token i is the character chr(i) (decode joins them)."""

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(i) for i in ids)


def test_the_finisher_ends_at_eos_without_its_text_and_counts_kept_tokens():
    finisher = TextFinisher(Characters(), [], eos_ids=[0], max_new_tokens=10)
    assert [finisher.push(ord(c)) for c in "ab"] == ["a", "b"]
    assert finisher.push(0) == ""
    assert finisher.finish_reason == "stop"
    assert finisher.num_tokens == 2


def test_the_finisher_ends_at_max_new_tokens_and_at_a_stop_string():
    assert finish_text(Characters(), [ord(c) for c in "abcdef"], [], [0], 4) == ("abcd", "length")
    assert finish_text(Characters(), [ord(c) for c in "abXYcd"], ["XY"], [0], 10) == ("ab", "stop")
    assert finish_text(Characters(), [ord(c) for c in "abX"], ["XY"], [0], 10) == ("abX", None)
    assert finish_text(Characters(), [ord(c) for c in "abc"], [], [0], 0) == ("", "length")
