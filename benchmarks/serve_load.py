"""A bounded load test of `jax-gpt2 serve` on loopback, beside sequential `generate` on the same prompts.

    uv run jax-gpt2 random-model /tmp/serve-gpt2 --preset gpt2
    uv run python benchmarks/serve_load.py --model /tmp/serve-gpt2 --requests 16 --max-tokens 32

Starts the server as a subprocess (or uses --url), then for each concurrency level runs `--requests`
greedy streaming completions through that many concurrent clients (each level also stops after
`--time-limit` seconds), and reports:

    throughput      completion tokens / wall time of the level
    TTFT p50/p99    request sent -> first streamed text
    ITL p50/p99     per request, (last event - first event) / (tokens - 1): the mean time per token
                    after the first (events carry a chunk of tokens, so per-event gaps are bursty)

The baseline runs `generate` on the same prompts one after another in this process (after one
warm-up call per shape), while the server sits idle: its throughput, and its per-request latency
as its TTFT (generate returns all tokens at once).
"""

import argparse
import asyncio
import contextlib
import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

TEXT = (
    "The quick brown fox jumps over the lazy dog. A language model reads a sequence of tokens and predicts the "
    "next one. Keys and values of earlier tokens are kept in a cache, so a new token costs one pass. "
)


def prompts_for(count: int, lengths: list[int]) -> list[str]:
    """count prompts cycling through the given lengths (in characters), each starting at a new offset."""
    assert count >= 1
    assert all(n >= 1 for n in lengths)
    text = TEXT * 20
    prompts = [text[i % 50 : i % 50 + lengths[i % len(lengths)]] for i in range(count)]
    assert len(prompts) == count
    return prompts


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


async def one_request(client: httpx.AsyncClient, model: str, prompt: str, max_tokens: int) -> dict:
    """Stream one greedy completion; the times of its events and its token count."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    sent, times, tokens = time.perf_counter(), [], 0
    async with client.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[len("data: ") :])
            if event["choices"] and event["choices"][0]["text"]:
                times.append(time.perf_counter())
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    assert times, "no text came back"
    itl = (times[-1] - times[0]) / (tokens - 1) if tokens > 1 else None
    return {"ttft": times[0] - sent, "itl": itl, "tokens": tokens}


async def run_level(url: str, model: str, prompts: list[str], concurrency: int, max_tokens: int, limit_s: float) -> dict:
    """`concurrency` clients take prompts from one list until it is empty or the time limit passes."""
    assert concurrency >= 1
    assert prompts
    pending, results = list(reversed(prompts)), []
    deadline = time.perf_counter() + limit_s

    async def worker(client: httpx.AsyncClient) -> None:
        while pending and time.perf_counter() < deadline:
            results.append(await one_request(client, model, pending.pop(), max_tokens))

    start = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=concurrency)) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    wall = time.perf_counter() - start
    return summarize(f"serve, {concurrency} clients", results, wall)


def summarize(name: str, results: list[dict], wall: float) -> dict:
    tokens = sum(r["tokens"] for r in results)
    ttft = [r["ttft"] for r in results]
    itl = [r["itl"] for r in results if r["itl"] is not None]
    return {
        "name": name, "requests": len(results), "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
        "ttft_p50_ms": 1e3 * percentile(ttft, 50), "ttft_p99_ms": 1e3 * percentile(ttft, 99),
        "itl_p50_ms": 1e3 * percentile(itl, 50), "itl_p99_ms": 1e3 * percentile(itl, 99),
    }  # fmt: skip


def sequential_generate(folder: Path, prompts: list[str], max_tokens: int) -> dict:
    """The baseline: `generate` on each prompt alone, one after another, warm."""
    from jax_gpt2 import load_config, load_weights
    from jax_gpt2.generate import generate
    from jax_gpt2.tokenizer import encode, load_tokenizer

    config, tokenizer = load_config(folder), load_tokenizer(folder)
    weights = load_weights(folder, config=config)
    ids = [encode(tokenizer, prompt) for prompt in prompts]
    for prompt_ids in {len(p): p for p in ids}.values():  # compile each prompt bucket first
        generate([prompt_ids], weights, config, max_new_tokens=max_tokens, eos_token_id=config.eos_token_id)
    results, start = [], time.perf_counter()
    for prompt_ids in ids:
        sent = time.perf_counter()
        new = generate([prompt_ids], weights, config, max_new_tokens=max_tokens, eos_token_id=config.eos_token_id)[0]
        tokens = len(new) - (1 if new and new[-1] == config.eos_token_id else 0)
        results.append({"ttft": time.perf_counter() - sent, "itl": None, "tokens": tokens})
    return summarize("sequential generate", results, time.perf_counter() - start)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def server_process(args: argparse.Namespace):
    """`jax-gpt2 serve` in a subprocess until the block ends (then SIGTERM), or the given --url."""
    if args.url:
        yield args.url
        return
    port = free_port()
    command = [sys.executable, "-m", "jax_gpt2.cli", "serve", "--model", str(args.model), "--port", str(port),
               "--max-batch", str(args.max_batch), "--max-seq-len", str(args.max_seq_len)]  # fmt: skip
    log = open(args.server_log, "w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + args.startup_limit
        while time.time() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            if process.poll() is not None:
                raise SystemExit(f"the server exited; see {args.server_log}")
            time.sleep(0.5)
        else:
            raise SystemExit(f"the server did not start in {args.startup_limit} s; see {args.server_log}")
        yield url
    finally:
        process.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(60)
        if process.poll() is None:
            process.kill()
        log.close()


def format_row(r: dict) -> str:
    return (f"{r['name']:<24} {r['requests']:>4} {r['tokens']:>6} {r['wall_s']:>8.1f} {r['tokens_per_s']:>9.1f} "
            f"{r['ttft_p50_ms']:>9.0f} {r['ttft_p99_ms']:>9.0f} {r['itl_p50_ms']:>8.1f} {r['itl_p99_ms']:>8.1f}")  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="a local model folder")
    parser.add_argument("--url", default=None, help="use this running server instead of starting one")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--requests", type=int, default=16, help="requests per concurrency level")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--prompt-chars", type=int, nargs="+", default=[20, 60, 120, 240])
    parser.add_argument("--time-limit", type=float, default=120.0, help="seconds per level at most")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--max-seq-len", type=int, default=256)
    parser.add_argument("--startup-limit", type=float, default=600.0)
    parser.add_argument("--server-log", type=Path, default=Path("serve_load.server.log"))
    parser.add_argument("--out", type=Path, default=None, help="write the rows as JSON")
    args = parser.parse_args()
    prompts = prompts_for(args.requests, args.prompt_chars)
    model_id = str(args.model)
    rows = []
    with server_process(args) as url:
        print(f"{'':<24} {'reqs':>4} {'tokens':>6} {'wall s':>8} {'tok/s':>9} {'TTFT p50':>9} {'TTFT p99':>9} "
              f"{'ITL p50':>8} {'ITL p99':>8}   (ms)", flush=True)  # fmt: skip
        for concurrency in args.concurrency:
            rows.append(asyncio.run(run_level(url, model_id, prompts, concurrency, args.max_tokens, args.time_limit)))
            print(format_row(rows[-1]), flush=True)
    rows.append(sequential_generate(args.model, prompts, args.max_tokens))
    print(format_row(rows[-1]), flush=True)
    if args.out is not None:
        args.out.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
