"""A thin layer over the `tokenizers` library: load GPT-2's byte-level BPE from a model folder,
encode, and decode incrementally for streaming (a multi-byte character split across tokens is
emitted whole, once).
"""

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

# A UTF-8 character is at most 4 bytes, so at most 4 byte-level tokens; past this many pending
# tokens the text is invalid UTF-8 for good and is emitted as it stands.
_MAX_PENDING = 8
END_OF_TEXT = "<|endoftext|>"


def load_tokenizer(folder: Path) -> Tokenizer:
    """tokenizer.json if the folder has one, else GPT-2's vocab.json + merges.txt."""
    folder = Path(folder)
    if (folder / "tokenizer.json").is_file():
        return Tokenizer.from_file(str(folder / "tokenizer.json"))
    vocab, merges = folder / "vocab.json", folder / "merges.txt"
    if vocab.is_file() and merges.is_file():
        tokenizer = Tokenizer(models.BPE.from_file(str(vocab), str(merges)))
        # add_prefix_space=False: what GPT-2's own tokenizer does.
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        # transformers treats GPT-2's end-of-text marker as one special token, never as text to split.
        if tokenizer.token_to_id(END_OF_TEXT) is not None:
            tokenizer.add_special_tokens([END_OF_TEXT])
        return tokenizer
    raise FileNotFoundError(f"{folder} has no tokenizer: expected tokenizer.json, or vocab.json and merges.txt")


def encode(tokenizer: Tokenizer, text: str) -> list[int]:
    """Token ids of text, without special tokens (GPT-2 adds none)."""
    assert isinstance(text, str)
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    assert all(isinstance(token, int) for token in ids)
    return ids


def encode_many(tokenizer: Tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text. `encode_batch` lets go of Python's GIL while it works (measured: a 4 MB
    text held it for the whole encode with `encode`, ~2 s at most with `encode_batch`), so a server
    thread tokenizing a long prompt does not stall the threads serving other requests."""
    assert all(isinstance(text, str) for text in texts)
    encodings = tokenizer.encode_batch(texts, add_special_tokens=False)
    assert len(encodings) == len(texts)
    return [encoding.ids for encoding in encodings]


def longest_token_bytes(tokenizer: Tokenizer) -> int:
    """The most UTF-8 bytes one token stands for: a text of n bytes has at least n / this many tokens,
    so a server can refuse a prompt that could never fit the context without tokenizing it."""
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    # Byte-level BPE spells each byte as one character, so a token's length is its byte count.
    longest = max(len(token.encode("utf-8")) for token in vocab)
    assert longest >= 1
    return longest


class IncrementalDecoder:
    """Turns a growing list of token ids into text pieces, holding back an incomplete UTF-8 character.

    Byte-level BPE can split one character over several tokens; decoding such a prefix yields the
    replacement character U+FFFD. We re-decode the pending tokens and emit only once the result no
    longer ends in U+FFFD. Plain data plus one method; the caller owns it.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.pending: list[int] = []

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes ('' while a character is still incomplete)."""
        assert isinstance(token_id, int)
        assert token_id >= 0
        self.pending.append(token_id)
        text = self.tokenizer.decode(self.pending, skip_special_tokens=False)
        if text.endswith("\ufffd") and len(self.pending) < _MAX_PENDING:
            return ""
        self.pending = []
        return text

    def flush(self) -> str:
        """Whatever is still pending at the end of the stream (possibly with a replacement character)."""
        text = self.tokenizer.decode(self.pending, skip_special_tokens=False) if self.pending else ""
        self.pending = []
        return text
