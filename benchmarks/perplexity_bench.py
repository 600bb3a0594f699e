"""Perplexity benchmark: jax-gpt2's `perplexity` against transformers' documented sliding-window recipe.

    uv run python -m benchmarks.perplexity_bench            # ~20k tokens, max_length 1024, stride 512

A gpt2-shape model with random weights (std 0.1) is written to a temporary folder, with GPT-2's
own vocabulary when a copy is cached (~/.cache/jax-gpt2-tests/gpt2-vocab, see tests/gpt2_vocab.py),
else a small trained BPE. The text is generated deterministically from a word list. Both sides
score the same token ids in the same run, transformers with torch.set_num_threads(2). Wall and
process CPU seconds are both printed: on a shared machine the CPU seconds are the steadier figure.

jax-gpt2 is timed after a warm-up on one batch's worth of windows (same shapes, so the timed run
does not compile); the warm-up time, compilation included, is reported too. transformers' recipe
counts (labels kept - 1) tokens per window, one too few whenever the window's first label is
masked, so its perplexity is printed as is and with the count fixed (the definition jax-gpt2
implements): the fixed one should agree with jax-gpt2 to float32 precision.
"""

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np

from jax_gpt2 import PRESETS, load_config, load_weights, perplexity
from jax_gpt2.tools.random_model import write_random_model
from jax_gpt2.tokenizer import encode, load_tokenizer

GPT2_VOCAB = Path.home() / ".cache" / "jax-gpt2-tests" / "gpt2-vocab"
WORDS = (
    "the of and to in is was for on that with as by at from his her it an are were which be this has had "
    "not but they their one all new more first two after who about into time over most also other some "
    "model language token window stride cache layer head attention weight river mountain city music "
    "history science winter market garden letter station engine bridge forest ocean island village "
    "quickly slowly because however although during between without before under around against"
).split()


def generated_text(num_words: int, seed: int = 0) -> str:
    """Sentences of 6-18 words drawn from WORDS with a fixed seed: the same text on every run."""
    assert num_words >= 1
    rng = np.random.default_rng(seed)
    sentences, written = [], 0
    while written < num_words:
        length = int(rng.integers(6, 19))
        words = [WORDS[i] for i in rng.integers(0, len(WORDS), length)]
        sentences.append(" ".join(words).capitalize() + ".")
        written += length
    return " ".join(sentences)


def time_jax(ids: np.ndarray, folder: Path, max_length: int, stride: int, batch_size: int) -> dict:
    config, weights = load_config(folder), load_weights(folder)
    warm_ids = ids[: max_length + (batch_size - 1) * stride]  # one full batch: the shapes the timed run uses
    start = time.perf_counter()
    perplexity(warm_ids, weights, config, max_length, stride, batch_size)
    warm_seconds = time.perf_counter() - start
    start, cpu_start = time.perf_counter(), time.process_time()
    ppl = perplexity(ids, weights, config, max_length, stride, batch_size)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    return {"perplexity": ppl, "seconds": seconds, "cpu_seconds": cpu_seconds,
            "tokens_per_second": len(ids) / seconds,
            "warmup_seconds": warm_seconds, "warmup_tokens": len(warm_ids)}  # fmt: skip


def time_transformers_recipe(ids: np.ndarray, folder: Path, max_length: int, stride: int) -> dict:
    """The loop from transformers' docs ("Perplexity of fixed-length models"), batch of one window."""
    import torch
    import transformers

    torch.set_num_threads(2)
    model = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
    input_ids = torch.as_tensor(ids[None, :], dtype=torch.long)
    seq_len = input_ids.size(1)
    nll_sum, n_tokens, fixed_nll_sum, fixed_n_tokens, prev_end_loc = 0.0, 0, 0.0, 0, 0
    start, cpu_start = time.perf_counter(), time.process_time()
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc
        window_ids = input_ids[:, begin_loc:end_loc]
        target_ids = window_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            neg_log_likelihood = model(window_ids, labels=target_ids).loss
        num_valid_tokens = (target_ids != -100).sum().item()
        num_loss_tokens = num_valid_tokens - target_ids.size(0)  # the recipe's count
        scored = (target_ids[:, 1:] != -100).sum().item()  # the tokens the loss actually averaged
        nll_sum += neg_log_likelihood.item() * num_loss_tokens
        n_tokens += num_loss_tokens
        fixed_nll_sum += neg_log_likelihood.double().item() * scored
        fixed_n_tokens += scored
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    return {"perplexity": math.exp(nll_sum / n_tokens),
            "perplexity_count_fixed": math.exp(fixed_nll_sum / fixed_n_tokens),
            "scored_tokens_recipe": n_tokens, "scored_tokens_fixed": fixed_n_tokens,
            "seconds": seconds, "cpu_seconds": cpu_seconds, "tokens_per_second": len(ids) / seconds}  # fmt: skip


def time_llama_perplexity(text: str, binary: Path, gguf: Path, max_length: int, batch_size: int) -> dict:
    """llama.cpp's llama-perplexity on the same text: chunks of max_length tokens, batch_size of them a
    batch, 2 threads. It scores (and computes logits for) only the second half of each chunk, so its
    lm_head does half of the work ours does at stride = max_length; the weights are its own GGUF copy
    (another random model), so only the speed compares, not the perplexity."""
    import re
    import subprocess

    with tempfile.TemporaryDirectory() as work:
        path = Path(work) / "text.txt"
        path.write_text(text)
        command = [str(binary), "-m", str(gguf), "-f", str(path), "-c", str(max_length),
                   "-b", str(max_length * batch_size), "-t", "2", "-tb", "2"]  # fmt: skip
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        seconds = time.perf_counter() - start
    log = done.stdout + done.stderr
    # Its log lines start with a timestamp, minutes.seconds.ms.us: the scoring runs from the line that
    # announces the chunks to the one with the final estimate.
    stamp = r"(\d+)\.(\d+)\.(\d+)\.(\d+) I "
    begin = re.search(stamp + r"perplexity: calculating perplexity over (\d+) chunks, n_ctx=(\d+)", log)
    end = re.search(stamp + r"Final estimate: PPL = ([\d.]+)", log)
    assert begin is not None, f"no chunk count in llama-perplexity's output:\n{log[-2000:]}"
    assert end is not None, f"no final estimate in llama-perplexity's output:\n{log[-2000:]}"

    def at(match) -> float:
        minutes, secs, ms, us = (int(match.group(k)) for k in range(1, 5))
        return 60 * minutes + secs + ms / 1e3 + us / 1e6

    eval_seconds, tokens = at(end) - at(begin), int(begin.group(5)) * int(begin.group(6))
    estimate = end.group(5)
    return {"perplexity": float(estimate), "tokens": tokens,
            "seconds": eval_seconds, "process_seconds": seconds, "tokens_per_second": tokens / eval_seconds}  # fmt: skip


def report(jax_result: dict, hf_result: dict, num_tokens: int) -> None:
    """The figures, one line per side, then the same as one JSON line."""
    fixed = hf_result["perplexity_count_fixed"]
    relative = abs(jax_result["perplexity"] - fixed) / fixed
    for name, result, note in [
        ("jax-gpt2", jax_result, f"warm-up on {jax_result['warmup_tokens']} tokens, compile included: "
                                 f"{jax_result['warmup_seconds']:.1f} s"),
        ("transformers", hf_result, f"the docs recipe, {hf_result['scored_tokens_recipe']} tokens counted"),
    ]:  # fmt: skip
        print(
            f"{name + ':':<14}perplexity {result['perplexity']:.6f}  {result['tokens_per_second']:7.1f} tokens/s "
            f"({result['seconds']:.1f} s wall, {result['cpu_seconds']:.1f} s CPU; {note})"
        )
    print(
        f"transformers, count fixed ({hf_result['scored_tokens_fixed']} tokens): perplexity {fixed:.6f}; "
        f"relative difference to jax-gpt2 {relative:.2e}"
    )
    print(f"speed-up (wall): {jax_result['tokens_per_second'] / hf_result['tokens_per_second']:.2f}x")
    print(json.dumps({"jax_gpt2": jax_result, "transformers": hf_result, "tokens": num_tokens}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=20_000)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--stride", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--llama-perplexity", type=Path, default=None, metavar="BIN",
                        help="also time llama.cpp's llama-perplexity on the same text (needs --gguf)")
    parser.add_argument("--gguf", type=Path, default=None, help="a gpt2-shape GGUF for --llama-perplexity")
    args = parser.parse_args()
    if (args.llama_perplexity is None) != (args.gguf is None):
        parser.error("--llama-perplexity and --gguf go together")
    with tempfile.TemporaryDirectory() as work:
        folder = Path(work) / "random-gpt2"
        vocab = GPT2_VOCAB if (GPT2_VOCAB / "vocab.json").is_file() else None
        write_random_model(folder, PRESETS["gpt2"], std=0.1, tokenizer_from=vocab)
        tokenizer = load_tokenizer(folder)
        ids = np.asarray(encode(tokenizer, generated_text(args.tokens)))[: args.tokens]
        assert len(ids) == args.tokens, f"the generated text gave only {len(ids)} tokens"
        print(f"text: {len(ids)} tokens ({'GPT-2 vocabulary' if vocab else 'trained BPE'}), gpt2 shape, random weights")
        print(f"settings: max_length {args.max_length}, stride {args.stride}, jax batch_size {args.batch_size}")
        jax_result = time_jax(ids, folder, args.max_length, args.stride, args.batch_size)
        hf_result = time_transformers_recipe(ids, folder, args.max_length, args.stride)
        text = tokenizer.decode(ids.tolist())  # the scored tokens exactly, for llama.cpp
    report(jax_result, hf_result, len(ids))
    if args.llama_perplexity is not None:
        llama = time_llama_perplexity(text, args.llama_perplexity, args.gguf, args.max_length, args.batch_size)
        print(f"llama.cpp:    {llama['tokens_per_second']:7.1f} tokens/s over {llama['tokens']} tokens "
              f"({llama['seconds']:.1f} s of prompt eval, {llama['process_seconds']:.1f} s with loading; logits "
              f"for the second half of each {args.max_length}-token chunk only); jax-gpt2 / llama.cpp: "
              f"{jax_result['tokens_per_second'] / llama['tokens_per_second']:.2f}x")
        print(json.dumps({"llama_cpp": llama}))


if __name__ == "__main__":
    main()
