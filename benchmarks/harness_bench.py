"""lm-evaluation-harness on a loglikelihood task: its own `hf` backend against `local-completions`
through `jax-gpt2 serve`, on the same model and documents, in one run.

    uv run python -m benchmarks.harness_bench --model /tmp/gpt2-real --lm-eval /tmp/lmeval/bin/lm_eval

lm-eval is not a dependency of jax-gpt2 (it pins much of the ecosystem), so it lives in a side
environment that sees this project's packages (torch, transformers) through a .pth file; the recipe
is in docs/benchmarks.md. The task is written here, offline: a local multiple-choice task (YAML and
JSONL in a temporary folder, `--include_path`) of `--docs` documents, each a context of 2-8 generated
sentences and 4 one-sentence continuations, scored by summed log-likelihood (`acc`): 4 loglikelihood
requests a document, the shape of HellaSwag or ARC. The model must be a folder that both sides read
(safetensors, config.json, vocab.json and merges.txt: `jax-gpt2 random-model DIR --tokenizer-from`).

Both sides run `lm_eval` as a user would, as a subprocess with the same task, and are timed from
launch to exit (the server is started and warmed before its side's clock starts, as a server
would be); the harness's own start-up (~15 s: imports, the dataset, the hf model's load) is
measured by a run of one document and reported taken off too. The hf side is lm-eval's
reference recipe (`--model hf --model_args pretrained=F,dtype=float32 --device cpu --batch_size B`,
torch on the machine's cores); the serve side sends `--lm-batch` prompts per request (lm-eval's own
default is 1) with `--num-concurrent` requests in flight (default 1: it waits for each). Every per-choice log-likelihood of the two sides (`--log_samples`)
is compared: both compute the same float32 model, so they must agree to float32 rounding, and their
accuracies must be equal. tokens/s = tokens of every request (context + continuation) / wall seconds.
"""

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.perplexity_bench import WORDS
from benchmarks.serve_load import server_process
from jax_gpt2.tokenizer import encode, load_tokenizer

TASK = "jax_gpt2_synthetic_choice"
TASK_YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
target_delimiter: " "
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def sentence(rng: np.random.Generator) -> str:
    words = [WORDS[i] for i in rng.integers(0, len(WORDS), int(rng.integers(6, 19)))]
    return " ".join(words).capitalize() + "."


def documents(count: int, seed: int = 0) -> list[dict]:
    """count documents: a context of 2-8 sentences, 4 one-sentence choices, a label (any: the model is random)."""
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(count):
        context = " ".join(sentence(rng) for _ in range(int(rng.integers(2, 9))))
        docs.append({"context": context, "choices": [sentence(rng) for _ in range(4)], "label": int(rng.integers(4))})
    return docs


def request_tokens(docs: list[dict], folder: Path) -> int:
    """Tokens the requests hold: each choice's context + " " + choice, as both sides tokenize it whole."""
    tokenizer = load_tokenizer(folder)
    return sum(len(encode(tokenizer, doc["context"] + " " + choice)) for doc in docs for choice in doc["choices"])


def write_task(folder: Path, docs: list[dict]) -> None:
    data = folder / "docs.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in docs))
    (folder / f"{TASK}.yaml").write_text(TASK_YAML.format(task=TASK, data=data))


def run_lm_eval(args: argparse.Namespace, task_dir: Path, out_dir: Path, model: str, model_args: str,
                batch_size: int, limit: int | None = None) -> tuple[float, dict, list[dict]]:  # fmt: skip
    """One `lm_eval` run (of the first `limit` documents, or all): (wall seconds, the task's results, its logged samples)."""
    command = [str(args.lm_eval), "run", "--model", model, "--model_args", model_args, "--tasks", TASK,
               "--include_path", str(task_dir), "--batch_size", str(batch_size), "--output_path", str(out_dir),
               "--log_samples"]  # fmt: skip
    if limit is not None:
        command += ["--limit", str(limit)]
    if model == "hf":
        command += ["--device", "cpu"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"lm_eval {model} failed:\n{result.stderr[-3000:]}")
    results = json.loads(next(out_dir.rglob("results_*.json")).read_text())["results"][TASK]
    samples = [json.loads(line) for line in next(out_dir.rglob(f"samples_{TASK}_*.jsonl")).read_text().splitlines()]
    return seconds, results, samples


def loglikelihoods(samples: list[dict]) -> np.ndarray:
    """(docs, 4) summed log-likelihoods, ordered by document id."""
    ordered = sorted(samples, key=lambda sample: sample["doc_id"])
    return np.array([[float(resp[0][0]) for resp in sample["resps"]] for sample in ordered])


def side_report(seconds: float, one_doc_seconds: float, tokens: int, results: dict) -> dict:
    """One side's figures: whole runs, and with a one-document run's time (start-up) taken off."""
    assert seconds > one_doc_seconds > 0
    return {"seconds": seconds, "one_doc_seconds": one_doc_seconds, "tokens_per_second": tokens / seconds,
            "tokens_per_second_after_startup": tokens / (seconds - one_doc_seconds), "acc": results["acc,none"]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="a model folder with GPT-2's tokenizer files")
    parser.add_argument("--lm-eval", type=Path, required=True, help="the lm_eval command of the side environment")
    parser.add_argument("--docs", type=int, default=100)
    parser.add_argument("--hf-batch", type=int, default=8, help="the hf backend's --batch_size")
    parser.add_argument("--lm-batch", type=int, default=8, help="prompts per request on the serve side")
    parser.add_argument("--num-concurrent", type=int, default=1, help="requests in flight on the serve side")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--server-log", type=Path, default=Path("harness_bench_server.log"))
    parser.add_argument("--startup-limit", type=float, default=900, help="seconds for the server to get warm")
    parser.set_defaults(kernel_build=None)  # serve_load.server_process starts the host's own kernels
    args = parser.parse_args()
    docs = documents(args.docs)
    tokens = request_tokens(docs, args.model)
    with tempfile.TemporaryDirectory(prefix="jax-gpt2-harness-") as scratch:
        scratch = Path(scratch)
        task_dir = scratch / "task"
        task_dir.mkdir()
        write_task(task_dir, docs)
        with server_process(args) as (url, _):
            serve_args = (f"model={args.model},base_url={url}/v1/completions,tokenizer_backend=huggingface,"
                          f"tokenizer={args.model},max_length=1023,num_concurrent={args.num_concurrent}")  # fmt: skip
            serve_one = run_lm_eval(args, task_dir, scratch / "serve-1", "local-completions", serve_args, args.lm_batch, 1)
            serve = run_lm_eval(args, task_dir, scratch / "serve", "local-completions", serve_args, args.lm_batch)
        hf_args = f"pretrained={args.model},dtype=float32"
        hf_one = run_lm_eval(args, task_dir, scratch / "hf-1", "hf", hf_args, args.hf_batch, 1)
        hf = run_lm_eval(args, task_dir, scratch / "hf", "hf", hf_args, args.hf_batch)
    (serve_s, serve_results, serve_samples), (hf_s, hf_results, hf_samples) = serve, hf
    serve_ll, hf_ll = loglikelihoods(serve_samples), loglikelihoods(hf_samples)
    difference = float(np.abs(serve_ll - hf_ll).max())
    report = {
        "docs": args.docs, "requests": 4 * args.docs, "tokens": tokens, "cpu_count": os.cpu_count(),
        "serve": side_report(serve_s, serve_one[0], tokens, serve_results)
        | {"lm_batch": args.lm_batch, "num_concurrent": args.num_concurrent},
        "hf": side_report(hf_s, hf_one[0], tokens, hf_results) | {"batch_size": args.hf_batch},
        "max_loglikelihood_difference": difference, "max_abs_loglikelihood": float(np.abs(hf_ll).max()),
        "speedup": hf_s / serve_s, "speedup_after_startup": (hf_s - hf_one[0]) / (serve_s - serve_one[0]),
    }  # fmt: skip
    print(f"{4 * args.docs} loglikelihood requests, {tokens} tokens")
    for name, side in (("serve (local-completions)", report["serve"]), ("hf (lm-eval's own backend)", report["hf"])):
        print(f"{name}: {side['seconds']:.1f} s ({side['one_doc_seconds']:.1f} s for one document), "
              f"{side['tokens_per_second']:.1f} tokens/s, {side['tokens_per_second_after_startup']:.1f} after start-up, "
              f"acc {side['acc']:.4f}")  # fmt: skip
    print(f"speed-up {report['speedup']:.2f}x whole runs, {report['speedup_after_startup']:.2f}x after start-up; "
          f"largest log-likelihood difference {difference:.3g} (largest |log-likelihood| {report['max_abs_loglikelihood']:.1f})")
    assert serve_results["acc,none"] == hf_results["acc,none"], "the two sides chose differently"
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
