"""What structured output costs in the serving engine: tokens/s of one constrained stream against an
unconstrained one at batch 1, and at batch 8 with one constrained row among seven unconstrained ones
(the others' tokens/s against eight unconstrained rows). The engine runs in this process (no HTTP),
greedy, every row decoding exactly --max-tokens tokens (eos ignored; the constraint is a regex that
cannot finish sooner), alternating the cases --repeats times; the median is reported.

    uv run jax-gpt2 random-model /tmp/gpt2-real --preset gpt2 --tokenizer-from VOCAB_FOLDER
    uv run python benchmarks/constrained_cost.py --model /tmp/gpt2-real
"""

import argparse
import json
import statistics
import time
from pathlib import Path

from jax_gpt2 import constraints, load_config, load_weights
from jax_gpt2.sampling import SamplingSettings
from jax_gpt2.serve.engine import Engine, SequenceRequest
from jax_gpt2.tokenizer import encode, load_tokenizer

PROMPT = "The quick brown fox jumps over the lazy dog. A language model reads a sequence of tokens and"


def run(engine: Engine, requests: list[SequenceRequest]) -> list[float]:
    """tokens/s of each request: its tokens over the time from submit to its last event."""
    start, finished, counts = time.perf_counter(), {}, {}

    def deliver(event) -> None:
        counts[event.seq_id] = counts.get(event.seq_id, 0) + len(event.token_ids)
        if event.finish_reason is not None:
            finished[event.seq_id] = time.perf_counter() - start

    ids = engine.submit(requests, deliver)
    while engine.step():
        pass
    assert set(finished) == set(ids), "every sequence finishes"
    return [counts[i] / finished[i] for i in ids]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunk-steps", type=int, default=4)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    config, tokenizer = load_config(args.model), load_tokenizer(args.model)
    engine = Engine(load_weights(args.model), config, tokenizer, max_batch=8, max_seq_len=256, chunk_steps=args.chunk_steps)
    engine.warm_up()
    tokens = constraints.grammar_tokenizer(tokenizer, config.vocab_size, config.eos_token_id)
    # Lower-case words and spaces, longer than any answer here: every row runs to max_tokens.
    constraint = constraints.compile_constraint(constraints.regex("[a-z ]{2000}"), tokens)
    prompt = tuple(encode(tokenizer, PROMPT))
    settings = SamplingSettings(max_new_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)

    def request(i: int, constrained: bool) -> SequenceRequest:
        return SequenceRequest(prompt[: len(prompt) - i % 3], settings, index=i, constraint=constraint if constrained else None)

    cases = {
        "batch 1, unconstrained": [request(0, False)],
        "batch 1, constrained": [request(0, True)],
        "batch 8, all unconstrained": [request(i, False) for i in range(8)],
        "batch 8, row 0 constrained": [request(0, True)] + [request(i, False) for i in range(1, 8)],
    }
    run(engine, cases["batch 8, row 0 constrained"])  # warm: the first masks, the matchers' lazy tables
    samples: dict[str, list[list[float]]] = {name: [] for name in cases}
    for _ in range(args.repeats):
        for name, requests in cases.items():
            samples[name].append(run(engine, requests))
    median = {name: [statistics.median(r[i] for r in runs) for i in range(len(runs[0]))] for name, runs in samples.items()}
    b1 = median["batch 1, constrained"][0] / median["batch 1, unconstrained"][0]
    others = statistics.mean(median["batch 8, row 0 constrained"][1:]) / statistics.mean(median["batch 8, all unconstrained"][1:])
    b8 = median["batch 8, row 0 constrained"][0] / statistics.mean(median["batch 8, all unconstrained"])
    for name, rates in median.items():
        print(f"{name:28s} tokens/s per row: " + " ".join(f"{r:.1f}" for r in rates))
    print(f"batch 1: constrained / unconstrained = {b1:.2f}x")
    print(f"batch 8: constrained row / unconstrained rows = {b8:.2f}x; the other 7 rows keep {others:.2f}x")
    if args.out is not None:
        args.out.write_text(json.dumps({"median_tokens_per_s": median, "samples": samples, "chunk_steps": args.chunk_steps,
                                        "max_tokens": args.max_tokens, "b1_ratio": b1, "b8_constrained_ratio": b8,
                                        "b8_others_ratio": others}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
