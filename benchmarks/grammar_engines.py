"""Structured-output engines on GPT-2's real 50257-token vocabulary: tokenizer set-up, compile time of
a JSON schema, per-token mask time while walking a valid answer, and which schemas each compiles.

Not part of the package (xgrammar pulls in torch): run it in a scratch environment, e.g.

    uv venv /tmp/so/.venv && uv pip install --python /tmp/so/.venv/bin/python \
        llguidance xgrammar tokenizers transformers
    /tmp/so/.venv/bin/python benchmarks/grammar_engines.py VOCAB_FOLDER

VOCAB_FOLDER holds GPT-2's vocab.json and merges.txt (tests/gpt2_vocab.py fetches them).
"""

import json
import statistics
import sys
import time

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "kind": {"enum": ["cat", "dog", "bird"]},
        "alive": {"type": "boolean"},
        "age": {"type": "integer", "minimum": 0, "maximum": 40},
        "owner": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
    },
    "required": ["name", "kind", "alive", "age", "owner", "tags"],
    "additionalProperties": False,
}
ANSWER = '{"name": "Rex", "kind": "dog", "alive": true, "age": 7, "owner": {"city": "Oslo"}, "tags": ["a", "bc"]}'
# Features to probe: what each engine compiles (a failure is a refusal, not a wrong answer).
PROBES = {
    "pattern": {"type": "string", "pattern": "^[a-z]{2,5}$"},
    "format date-time": {"type": "string", "format": "date-time"},
    "anyOf": {"anyOf": [{"type": "integer"}, {"type": "string"}]},
    "$ref/$defs": {"$defs": {"p": {"type": "integer"}}, "type": "object", "properties": {"a": {"$ref": "#/$defs/p"}}},
    "minItems/maxItems": {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 4},
    "exclusiveMinimum number": {"type": "number", "exclusiveMinimum": 0},
    "const": {"const": "x"},
    "oneOf": {"oneOf": [{"type": "integer"}, {"type": "boolean"}]},
    "allOf": {"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}}, {"required": ["a"]}]},
    "recursive $ref": {"$defs": {"n": {"type": "object", "properties": {"next": {"$ref": "#/$defs/n"}}}}, "$ref": "#/$defs/n"},
    "not": {"not": {"type": "string"}},
    "if/then": {"if": {"type": "integer"}, "then": {"minimum": 0}},
}


def gpt2_tokenizer(folder: str) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE.from_file(f"{folder}/vocab.json", f"{folder}/merges.txt"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def bench_llguidance(tokenizer: Tokenizer, answer_ids: list[int]) -> dict:
    import llguidance
    import llguidance.numpy as llnp

    ll_tok, setup_s = timed(lambda: llguidance.LLTokenizer(tokenizer.to_str(), n_vocab=50257, eos_token=50256))
    grammar = llguidance.grammar_from("json_schema", json.dumps(SCHEMA))

    def compile_():
        matcher = llguidance.LLMatcher(ll_tok, grammar)
        assert not matcher.is_error(), matcher.get_error()
        return matcher

    compile_times = [timed(compile_)[1] for _ in range(5)]
    matcher = compile_()
    mask = llnp.allocate_token_bitmask(1, 50257)
    mask_times = []
    for token in answer_ids:
        _, dt = timed(lambda: llnp.fill_next_token_bitmask(matcher, mask, 0))
        mask_times.append(dt)
        assert (mask[0, token // 32] >> (token % 32)) & 1, f"llguidance masks out {token} of the valid answer"
        assert matcher.consume_token(token)
    supported = {}
    for name, schema in PROBES.items():
        try:
            m = llguidance.LLMatcher(ll_tok, llguidance.grammar_from("json_schema", json.dumps(schema)))
            supported[name] = not m.is_error()
        except Exception:
            supported[name] = False
    return dict(setup_s=setup_s, compile_s=compile_times, mask_s=mask_times, supported=supported)


def bench_xgrammar(tokenizer: Tokenizer, answer_ids: list[int]) -> dict:
    import torch
    import transformers
    import xgrammar as xgr

    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>")
    info, setup_s = timed(lambda: xgr.TokenizerInfo.from_huggingface(hf, vocab_size=50257))
    compiler = xgr.GrammarCompiler(info, cache_enabled=False)
    compile_times = []
    for _ in range(5):
        compiled, dt = timed(lambda: compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=True))
        compile_times.append(dt)
    matcher = xgr.GrammarMatcher(compiled)
    mask = xgr.allocate_token_bitmask(1, 50257)
    mask_times = []
    for token in answer_ids:
        _, dt = timed(lambda: matcher.fill_next_token_bitmask(mask))
        mask_times.append(dt)
        assert (int(mask[0, token // 32]) >> (token % 32)) & 1, f"xgrammar masks out {token} of the valid answer"
        assert matcher.accept_token(token)
    supported = {}
    for name, schema in PROBES.items():
        try:
            compiler.compile_json_schema(json.dumps(schema))
            supported[name] = True
        except Exception:
            supported[name] = False
    del torch
    return dict(setup_s=setup_s, compile_s=compile_times, mask_s=mask_times, supported=supported)


def summary(name: str, result: dict) -> str:
    masks_us = np.asarray(result["mask_s"]) * 1e6
    compile_ms = np.asarray(result["compile_s"]) * 1e3
    ok = [k for k, v in result["supported"].items() if v]
    refused = [k for k, v in result["supported"].items() if not v]
    return (f"{name}: tokenizer set-up {result['setup_s'] * 1e3:.0f} ms; schema compile median {np.median(compile_ms):.1f} ms "
            f"(first {compile_ms[0]:.1f}, range {compile_ms.min():.1f}-{compile_ms.max():.1f}); mask per token median "
            f"{np.median(masks_us):.0f} us, p90 {np.percentile(masks_us, 90):.0f}, max {masks_us.max():.0f} "
            f"({len(masks_us)} tokens); compiles: {', '.join(ok)}; refuses: {', '.join(refused) or 'none'}")  # fmt: skip


def main() -> None:
    folder = sys.argv[1]
    tokenizer = gpt2_tokenizer(folder)
    answer_ids = tokenizer.encode(ANSWER).ids + [50256]
    results = {"llguidance": bench_llguidance(tokenizer, answer_ids[:-1]), "xgrammar": bench_xgrammar(tokenizer, answer_ids[:-1])}
    for name, result in results.items():
        print(summary(name, result))
    print(json.dumps({k: {"compile_ms_median": statistics.median(v["compile_s"]) * 1e3,
                          "mask_us_median": statistics.median(v["mask_s"]) * 1e6} for k, v in results.items()}))  # fmt: skip


if __name__ == "__main__":
    main()
