"""Stop strings end the text where they first occur, also when split across streamed pieces."""

import pytest

from jax_gpt2.stopping import StopStringStream, find_stop, printable_length


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
