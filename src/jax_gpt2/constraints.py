"""Structured output: the tokens that may come next so that the text stays a valid answer (a JSON
schema, any JSON object, a regular expression, one of fixed choices), from llguidance.

    Constraint (what to obey: an llguidance grammar, built by json_schema / json_object / regex / choice)
      --compile_constraint(constraint, GrammarTokenizer)--> CompiledConstraint (checked: an uncompilable
        schema is a ValueError here, before any decoding)
      --new_matcher()--> Matcher: per row, `write_allowed(words)` before each token, `advance(token)` after it

llguidance was chosen over xgrammar after measuring both on GPT-2's 50257-token vocabulary
(benchmarks/grammar_engines.py; docs/structured-output.md has the figures): it compiles a schema in
about a millisecond (lazily, so the first request never waits for a table over the vocabulary), its
masks take tens of microseconds (against ~20 ms for a gpt2 decode step), it refuses the JSON Schema
keywords it does not implement instead of ignoring them, and it is one small wheel (xgrammar pulls
in torch and triton). JSON is compact by construction ("x-guidance" whitespace_flexible off:
separators ", " and ": ", no other whitespace), so a model cannot pad an answer forever.

Masks are computed on the host, one token at a time, and enter the jitted step packed 32 tokens to
an int32 word, as llguidance writes it (allowed_BK, sampling.apply_allowed_words), ahead of every
other logits processor. generate's constrained path runs one decode step per dispatch; the server's
decode chunks ask the host for them between steps (kernels/host_masks.py), so a constrained row
decodes whole chunks beside unconstrained ones.
"""

import dataclasses
import json
from collections.abc import Sequence

import llguidance
import numpy as np

from jax_gpt2.sampling import mask_words

# Compact JSON, no free whitespace: an answer cannot be padded forever.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclasses.dataclass(frozen=True)
class Constraint:
    """What a generated text must match: an llguidance grammar (build it with the functions below)."""

    grammar: str  # llguidance's grammar text (JSON)
    what: str  # for messages: "json_schema", "regex", ...


def json_schema(schema: dict | bool) -> Constraint:
    """Text that is JSON valid against the schema (compact: ", " and ": " separators, no other whitespace)."""
    if not isinstance(schema, (dict, bool)):
        raise ValueError(f"a JSON schema must be an object (or a boolean); got {type(schema).__name__}")
    schema = {"x-guidance": JSON_OPTIONS, **schema} if isinstance(schema, dict) else schema
    return Constraint(llguidance.grammar_from("json_schema", json.dumps(schema)), "json_schema")


def json_object() -> Constraint:
    """Any JSON object (OpenAI's response_format json_object)."""
    return json_schema({"type": "object"})


def regex(pattern: str) -> Constraint:
    """Text that the regular expression matches whole (Rust regex syntax)."""
    if not isinstance(pattern, str) or not pattern:
        raise ValueError("a regular expression must be a non-empty string")
    return Constraint(llguidance.grammar_from("regex", pattern), "regex")


def choice(options: Sequence[str]) -> Constraint:
    """Exactly one of these strings."""
    if isinstance(options, str) or not options or not all(isinstance(o, str) and o for o in options):
        raise ValueError("choices must be a non-empty list of non-empty strings")
    return Constraint(llguidance.grammar_from("choice", json.dumps(list(options))), "choice")


@dataclasses.dataclass(frozen=True)
class GrammarTokenizer:
    """The model's tokenizer as llguidance reads it (its byte-level tokens), for masks of vocab_size
    entries. Building one reads the whole vocabulary (~0.3 s for GPT-2's): build it once per model."""

    tokenizer: llguidance.LLTokenizer
    vocab_size: int


def grammar_tokenizer(tokenizer, vocab_size: int, eos_token_id: int | None) -> GrammarTokenizer:
    """From a `tokenizers.Tokenizer` (tokenizer.load_tokenizer's); eos ends an answer once it is complete."""
    assert vocab_size >= 1
    assert eos_token_id is None or 0 <= eos_token_id < vocab_size
    eos = vocab_size - 1 if eos_token_id is None else eos_token_id  # llguidance wants one; unused without eos
    ll = llguidance.LLTokenizer(tokenizer.to_str(), n_vocab=vocab_size, eos_token=eos)
    return GrammarTokenizer(ll, vocab_size)


@dataclasses.dataclass(frozen=True)
class CompiledConstraint:
    constraint: Constraint
    grammar_tokenizer: GrammarTokenizer

    def new_matcher(self) -> "Matcher":
        return Matcher(llguidance.LLMatcher(self.grammar_tokenizer.tokenizer, self.constraint.grammar, log_level=0),
                       self.grammar_tokenizer.vocab_size)  # fmt: skip


def compile_constraint(constraint: Constraint, tokens: GrammarTokenizer) -> CompiledConstraint:
    """Check the grammar against the tokenizer: a ValueError naming the problem if it cannot be used."""
    assert isinstance(constraint, Constraint)
    assert isinstance(tokens, GrammarTokenizer)
    matcher = llguidance.LLMatcher(tokens.tokenizer, constraint.grammar, log_level=0)
    if matcher.is_error():
        raise ValueError(f"the {constraint.what} cannot be compiled: {matcher.get_error()}")
    return CompiledConstraint(constraint, tokens)


class Matcher:
    """One row's place in its grammar: which tokens may come next, and the token that came."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int) -> None:
        assert not matcher.is_error(), matcher.get_error()
        self.matcher, self.vocab_size = matcher, vocab_size

    @property
    def done(self) -> bool:
        """The answer is complete: nothing but an end token may follow."""
        return self.matcher.is_stopped()

    def write_allowed(self, words_K: np.ndarray) -> None:
        """The tokens that keep the text a prefix of a valid answer (eos once it is complete) into
        words_K, packed as the grammar engine computes them (sampling.apply_allowed_words): bit v % 32
        of int32 word v // 32 allows token v."""
        assert words_K.shape == (mask_words(self.vocab_size),)
        assert words_K.dtype == np.int32
        assert words_K.flags.c_contiguous, "the grammar engine writes through a pointer"
        self.matcher.unsafe_compute_mask_ptr(words_K.ctypes.data, words_K.nbytes)

    def advance(self, token: int) -> None:
        """Take the token the row picked (one `write_allowed` said was allowed)."""
        assert 0 <= token < self.vocab_size
        if not self.matcher.consume_token(token):
            raise RuntimeError(f"the grammar refused token {token}, which its mask allowed: {self.matcher.get_error()}")
