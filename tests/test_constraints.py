"""Structured output through `generate`: on a random-weight model at temperature 1, every answer that
ends (its grammar complete) is valid by construction: JSON that validates against its schema (checked
with the `jsonschema` package), a regex match, one of the choices; a schema llguidance cannot
compile is a ValueError before any decoding."""

import json
import re

import jax.numpy as jnp
import jsonschema
import numpy as np
import pytest

from checkpoints import TINY, hf_config, random_hf_model, save_safetensors
from jax_gpt2 import constraints, load_config, load_weights
from jax_gpt2.generate import generate, stream_generate
from jax_gpt2.sampling import apply_allowed_tokens, apply_allowed_words, mask_words
from jax_gpt2.tokenizer import encode, load_tokenizer
from jax_gpt2.tools.random_model import train_tokenizer

SCHEMA = {
    "type": "object",
    "properties": {
        "kind": {"enum": ["cat", "dog", "bird"]},
        "alive": {"type": "boolean"},
        "age": {"type": "integer", "minimum": 0, "maximum": 40},
        "owner": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8}}, "required": ["city"],
                  "additionalProperties": False},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 2},
    },
    "required": ["kind", "alive", "age", "owner", "tags"],
    "additionalProperties": False,
}  # fmt: skip


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("constrained")
    vocab_size = train_tokenizer(folder, 300)
    hf = random_hf_model(hf_config(**{**TINY, "vocab_size": vocab_size, "n_positions": 256}), 0.3)
    save_safetensors(hf, folder)
    tokenizer, config = load_tokenizer(folder), load_config(folder)
    return load_weights(folder), config, tokenizer, constraints.grammar_tokenizer(tokenizer, vocab_size, config.eos_token_id)


def answers(model, constraint, max_new_tokens: int, seeds=range(4)) -> list[tuple[str, bool]]:
    """(text, complete) of one prompt, sampled at temperature 1 with each seed (two rows per call)."""
    weights, config, tokenizer, tokens = model
    compiled = constraints.compile_constraint(constraint, tokens)
    prompt = encode(tokenizer, "Answer:")
    results = []
    for seed in seeds:
        for row in generate([prompt, prompt], weights, config, max_new_tokens=max_new_tokens, temperature=1.0, seed=seed,
                            eos_token_id=config.eos_token_id, constraint=compiled):  # fmt: skip
            matcher = compiled.new_matcher()
            kept = [t for t in row if t != config.eos_token_id]
            for token in row:
                matcher.advance(token)
            results.append((tokenizer.decode(kept, skip_special_tokens=False), matcher.done))
    return results


def test_every_complete_json_answer_validates_against_its_schema(model):
    results = answers(model, constraints.json_schema(SCHEMA), 160)
    complete = [text for text, done in results if done]
    assert len(complete) >= len(results) // 2, f"most answers should finish in 160 tokens: {results}"
    for text in complete:
        jsonschema.validate(json.loads(text), SCHEMA)


def test_json_object_answers_parse_as_objects(model):
    results = answers(model, constraints.json_object(), 60)
    assert any(done for _, done in results), results
    for text, done in results:
        if done:
            assert isinstance(json.loads(text), dict)


def test_regex_and_choice_hold(model):
    pattern = r"[0-9]{3}-[a-c]{2}"
    for text, done in answers(model, constraints.regex(pattern), 12):
        assert done
        assert re.fullmatch(pattern, text)
    for text, done in answers(model, constraints.choice(["yes", "no", "maybe later"]), 10):
        assert done
        assert text in ("yes", "no", "maybe later")


def test_streaming_gives_the_same_tokens(model):
    weights, config, tokenizer, tokens = model
    compiled = constraints.compile_constraint(constraints.json_schema(SCHEMA), tokens)
    prompts = [encode(tokenizer, "Answer:"), encode(tokenizer, "A longer prompt here:")]
    whole = generate(prompts, weights, config, max_new_tokens=30, temperature=1.0, seed=3, constraint=compiled)
    steps = list(stream_generate(prompts, weights, config, max_new_tokens=30, temperature=1.0, seed=3, constraint=compiled))
    assert [[s[row] for s in steps if s[row] is not None] for row in range(2)] == whole


@pytest.mark.parametrize("constraint", [
    lambda: constraints.json_schema({"type": "object", "not": {"required": ["a"]}}),
    lambda: constraints.json_schema({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}),
    lambda: constraints.regex("a(b"),
])  # fmt: skip
def test_what_cannot_compile_is_a_value_error_naming_it(model, constraint):
    with pytest.raises(ValueError, match="cannot be compiled"):
        constraints.compile_constraint(constraint(), model[3])


def test_a_packed_mask_keeps_exactly_the_tokens_its_grammar_allows(model):
    """The server sends each row's mask as the grammar engine writes it, 32 tokens an int32 word
    (bit v % 32 of word v // 32), and the step unpacks it: the same tokens survive as from the bool
    mask, the last partial word and bit 31 included; -1 words allow everything."""
    _, config, _, tokens = model
    V = config.vocab_size
    matcher = constraints.compile_constraint(constraints.regex("[a-c]{2,5}"), tokens).new_matcher()
    words_K = np.zeros((mask_words(V),), np.int32)
    matcher.write_allowed(words_K)
    allowed_V = np.unpackbits(words_K.view(np.uint8), bitorder="little")[:V].astype(bool)
    assert 0 < allowed_V.sum() < V  # the grammar allows some tokens, not all
    rng = np.random.default_rng(0)
    odd_V = rng.random(V) < 0.5
    odd_V[31] = odd_V[V - 1] = True  # a word's sign bit, and the last partial word's last token
    odd_words_K = np.packbits(np.pad(odd_V, (0, mask_words(V) * 32 - V)), bitorder="little").view(np.int32)
    logits_2V = jnp.asarray(rng.normal(size=(2, V)), jnp.float32)
    for bool_V, packed_K in ((allowed_V, words_K), (odd_V, odd_words_K)):
        expected = apply_allowed_tokens(logits_2V, jnp.asarray(np.stack([bool_V, np.ones(V, bool)])))
        packed_2K = jnp.asarray(np.stack([packed_K, np.full_like(packed_K, -1)]))
        np.testing.assert_array_equal(apply_allowed_words(logits_2V, packed_2K), expected)
    np.testing.assert_array_equal(apply_allowed_words(logits_2V, jnp.full((2, mask_words(V)), -1, jnp.int32)), logits_2V)
