"""`jax-gpt2 serve` under load, through the real openai client, beside `generate` on the same model and prompts.

    uv run jax-gpt2 random-model /tmp/serve-gpt2 --preset gpt2
    uv run python benchmarks/serve_load.py --model /tmp/serve-gpt2 --out benchmarks/serve_load_cpu.json
    uv run python benchmarks/serve_load.py --model /tmp/serve-gpt2 --startup-only   # part 0 alone, ~a minute

One run, in order:

0. Start-up. `jax-gpt2 serve` launched twice with XDG_CACHE_HOME pointing at a new folder, so the
   first launch is cold (JAX's persistent compilation cache, XDG_CACHE_HOME/jax-gpt2/xla, is empty)
   and the second warm (it reads what the first wrote). The C++ kernels built already (in this
   user's cache) are copied in: they are built once per machine, not per start (with none built,
   the cold launch builds them too, and says so). Each launch reports seconds from the process's
   start to: the port answering (/health 503 `loading`), /health 200 (`ready`), and the first
   request done (sent at once after ready: a short greedy completion); with `--until-warm` also
   /health `warm` (every program compiled in the background: minutes, cold, on two cores).
1. Load levels, beside generate. `jax-gpt2 serve` (default flags) runs in a subprocess. For each
   concurrency level c, c clients (openai.AsyncOpenAI, streaming, greedy, `--max-tokens` each) take
   `--requests` prompts from one list; then, the server idle, `generate` runs the same prompts c at a
   time in this process (batch c). The pair is repeated `--repeats` times, alternating, so both
   sides see the same machine (on a shared host the load wanders): tokens/s is the median over the
   repeats, latencies are pooled. tokens/s = completion tokens / wall time; TTFT = request sent ->
   first streamed text (for generate: the whole call, which returns every token at once); ITL = per
   request (last event - first event) / (tokens - 1), the mean gap after the first token.
2. Prefix reuse. TTFT of requests whose 512-token prefix is in the prefix cache (the same prefix,
   new tails) against requests whose 512-token prefix is new each time.
3. Chunked prefill. Four clients stream long completions; ITL samples are every token's share of
   its event's gap (an event of k tokens after g seconds gives k samples of g / k), taken over the
   same length of window with and without one 1000-token prompt arriving in it, for
   `--prefill-chunk` 128 and for a whole-prompt prefill (`--prefill-chunk 1024`): p50, p99, and
   the longest gap between two events of one stream.
"""

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import openai

TEXT = (
    "The quick brown fox jumps over the lazy dog. A language model reads a sequence of tokens and predicts the "
    "next one. Keys and values of earlier tokens are kept in a cache, so a new token costs one pass. "
)


def prompts_for(count: int, chars: int) -> list[str]:
    """count prompts of the same length in characters, each starting at a new offset of one text."""
    assert count >= 1
    text = TEXT * 40
    return [text[i * 7 : i * 7 + chars] for i in range(count)]


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


async def one_stream(client: openai.AsyncOpenAI, model: str, prompt, max_tokens: int, count_tokens: bool = False) -> dict:
    """Stream one greedy completion: when it was sent, when each event with text came (and, with
    count_tokens, how many tokens each carried: logprobs 0 lists them)."""
    sent, times, counts = time.perf_counter(), [], []
    stream = await client.completions.create(
        model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True,
        stream_options={"include_usage": True}, logprobs=0 if count_tokens else None,
    )  # fmt: skip
    tokens = 0
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            times.append(time.perf_counter())
            counts.append(len(chunk.choices[0].logprobs.tokens) if count_tokens else 0)
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    assert times, "no tokens came back"
    itl = (times[-1] - times[0]) / (tokens - 1) if tokens > 1 else None
    return {"sent": sent, "ttft": times[0] - sent, "itl": itl, "tokens": tokens, "times": times, "counts": counts}


def summarize(name: str, results: list[dict], wall: float) -> dict:
    tokens = sum(r["tokens"] for r in results)
    ttft = [r["ttft"] for r in results]
    itl = [r["itl"] for r in results if r["itl"] is not None]
    return {
        "name": name, "requests": len(results), "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
        "ttft_p50_ms": 1e3 * percentile(ttft, 50), "ttft_p99_ms": 1e3 * percentile(ttft, 99),
        "itl_p50_ms": 1e3 * percentile(itl, 50), "itl_p99_ms": 1e3 * percentile(itl, 99),
    }  # fmt: skip


def client_for(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)


def token_gaps(result: dict, start: float, end: float) -> list[float]:
    """Every token's share of its event's gap, for events inside [start, end)."""
    gaps = []
    for before, after, count in zip(result["times"], result["times"][1:], result["counts"][1:]):
        if start <= after < end:
            gaps += [(after - before) / count] * count
    return gaps


async def running_streams_itl(url: str, model: str, prompts: list[str], long_prompt: list[int] | None) -> dict:
    """ITL of four streams over a window in their middle, with a long prompt arriving at its start (or not)."""
    async with client_for(url) as client:
        streams = [asyncio.create_task(one_stream(client, model, prompt, 400, True)) for prompt in prompts[:4]]
        await asyncio.sleep(4.0)  # all four are decoding
        start = time.perf_counter()
        if long_prompt is not None:
            arrival = await one_stream(client, model, long_prompt, 1)
        await asyncio.sleep(4.0 if long_prompt is None else 0.5)
        end = time.perf_counter()
        results = await asyncio.gather(*streams)
    gaps = [gap for result in results for gap in token_gaps(result, start, end)]
    stalls = [after - before for r in results for before, after in zip(r["times"], r["times"][1:]) if start <= after < end]
    row = {"itl_p50_ms": 1e3 * percentile(gaps, 50), "itl_p99_ms": 1e3 * percentile(gaps, 99), "samples": len(gaps),
           "longest_gap_ms": 1e3 * max(stalls, default=float("nan"))}  # fmt: skip
    if long_prompt is not None:
        row["long_prompt_ttft_ms"] = 1e3 * arrival["ttft"]
    return row


async def prefix_ttft(url: str, model: str, prefix_ids: list[list[int]], tails: list[list[int]]) -> list[float]:
    """TTFT of one request per (prefix, tail), one after another."""
    ttft = []
    async with client_for(url) as client:
        for prefix, tail in zip(prefix_ids, tails):
            ttft.append((await one_stream(client, model, prefix + tail, 1))["ttft"])
    return ttft


def cli_command(args: argparse.Namespace) -> list[str]:
    """How to start `jax-gpt2`: plainly, or with --kernel-build's kernels standing in for the host's."""
    if args.kernel_build is None:
        return [sys.executable, "-m", "jax_gpt2.cli"]
    return [sys.executable, str(Path(__file__).with_name("bench_with_kernel_build.py")), args.kernel_build]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_times(args: argparse.Namespace, cache_home: Path) -> dict:
    """One launch of `jax-gpt2 serve` with XDG_CACHE_HOME=cache_home: seconds from Popen to the port
    answering, to /health 200, to a first short request done (sent right after), to every program compiled."""
    port, started = free_port(), time.perf_counter()
    command = [*cli_command(args), "serve", "--model", str(args.model), "--port", str(port)]
    env = {**os.environ, "XDG_CACHE_HOME": str(cache_home)}
    url, times = f"http://127.0.0.1:{port}", {}
    with open(args.server_log, "a") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            while not done(times, args.until_warm) and time.perf_counter() - started < args.startup_limit:
                with contextlib.suppress(httpx.HTTPError):
                    health = httpx.get(f"{url}/health", timeout=1)
                    times.setdefault("port_s", time.perf_counter() - started)
                    if health.status_code == 200 and "ready_s" not in times:
                        times["ready_s"] = time.perf_counter() - started
                        body = {"model": str(args.model), "prompt": "Hello world", "max_tokens": 16, "temperature": 0}
                        httpx.post(f"{url}/v1/completions", json=body, timeout=args.startup_limit).raise_for_status()
                        times["first_request_s"] = time.perf_counter() - started
                    if args.until_warm and health.status_code == 200 and health.json().get("warm"):
                        times["warm_s"] = time.perf_counter() - started
                if process.poll() is not None:
                    raise SystemExit(f"the server exited; see {args.server_log}")
                time.sleep(0.1)
        finally:
            stop(process)
    if not done(times, args.until_warm):
        raise SystemExit(f"the server did not get that far in {args.startup_limit} s; see {args.server_log}")
    return times


def stop(process: subprocess.Popen) -> None:
    """SIGTERM (the server drains and exits), then SIGKILL if it is still there after 60 s."""
    process.send_signal(signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(60)
    if process.poll() is None:
        process.kill()
        process.wait(10)
    assert process.returncode is not None


def done(times: dict, until_warm: bool) -> bool:
    return "warm_s" in times if until_warm else "first_request_s" in times


def startup(args: argparse.Namespace) -> dict:
    """A cold launch (an empty compilation cache) and a warm one (the cache the cold one wrote)."""
    built = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "jax-gpt2" / "kernels"
    with tempfile.TemporaryDirectory(prefix="jax-gpt2-startup-") as cache_home:
        if built.is_dir():
            shutil.copytree(built, Path(cache_home) / "jax-gpt2" / "kernels")
        else:
            print(f"no C++ kernels built in {built}: the cold launch builds them too", flush=True)
        results = {"cold": launch_times(args, Path(cache_home)), "warm": launch_times(args, Path(cache_home))}
    results["kernels_prebuilt"] = built.is_dir()
    print("| launch | port answers s | /health 200 s | first request done s | all compiled s |\n|---|---|---|---|---|")
    for name in ("cold", "warm"):
        t = results[name]
        print(f"| {name} | {t['port_s']:.1f} | {t['ready_s']:.1f} | {t['first_request_s']:.1f} | "
              f"{t.get('warm_s', float('nan')):.1f} |", flush=True)  # fmt: skip
    return results


@contextlib.contextmanager
def server_process(args: argparse.Namespace, *flags: str):
    """`jax-gpt2 serve` in a subprocess until the block ends (then SIGTERM), yielded once /health says
    `warm`: a level timed while the background thread still compiles measures the compiler too (it
    shares the two cores; one client read 0.83x of generate that way, its TTFT p99 3.5 s)."""
    port = free_port()
    command = [*cli_command(args), "serve", "--model", str(args.model), "--port", str(port), *flags]
    log = open(args.server_log, "a")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + args.startup_limit
        while time.time() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                health = httpx.get(f"{url}/health", timeout=1)
                if health.status_code == 200 and health.json().get("warm"):
                    break
            if process.poll() is not None:
                raise SystemExit(f"the server exited; see {args.server_log}")
            time.sleep(0.5)
        else:
            raise SystemExit(f"the server did not start in {args.startup_limit} s; see {args.server_log}")
        yield url, process.pid
    finally:
        stop(process)
        log.close()


class GenerateBaseline:
    """`generate` on the benchmark's prompts in this process, each batch shape compiled once up front."""

    def __init__(self, folder: Path, prompts: list[str], max_tokens: int, batch_sizes: list[int]) -> None:
        from jax_gpt2 import load_config, load_weights
        from jax_gpt2.tokenizer import encode, load_tokenizer

        self.config, tokenizer = load_config(folder), load_tokenizer(folder)
        self.weights = load_weights(folder, config=self.config)
        self.ids, self.max_tokens = [encode(tokenizer, prompt) for prompt in prompts], max_tokens
        for batch in batch_sizes:
            for group in self.groups(batch):
                self.generate(group)  # compile every shape this batch size meets

    def groups(self, batch: int) -> list[list[list[int]]]:
        return [self.ids[i : i + batch] for i in range(0, len(self.ids), batch)]

    def generate(self, group: list[list[int]]) -> list[list[int]]:
        from jax_gpt2.generate import generate

        return generate(group, self.weights, self.config, max_new_tokens=self.max_tokens, eos_token_id=self.config.eos_token_id)

    def run(self, batch: int) -> dict:
        """The prompts, batch at a time, one call after another."""
        eos, results, start = self.config.eos_token_id, [], time.perf_counter()
        for group in self.groups(batch):
            sent = time.perf_counter()
            for new in self.generate(group):
                tokens = len(new) - (1 if new and new[-1] == eos else 0)
                results.append({"ttft": time.perf_counter() - sent, "itl": None, "tokens": tokens})
        return {"results": results, "wall": time.perf_counter() - start}


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far, all its threads (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def median_row(name: str, runs: list[dict]) -> dict:
    """tokens/s: the median over the repeats; latencies pooled over every request of every repeat."""
    rows = [summarize(name, run["results"], run["wall"]) for run in runs]
    pooled = summarize(name, [r for run in runs for r in run["results"]], sum(run["wall"] for run in runs))
    pooled["tokens_per_s"] = float(np.median([row["tokens_per_s"] for row in rows]))
    pooled["tokens_per_s_repeats"] = [row["tokens_per_s"] for row in rows]
    return pooled


async def serve_level(url: str, model: str, prompts: list[str], concurrency: int, max_tokens: int) -> dict:
    """`concurrency` clients take prompts from one list until it is empty."""
    assert concurrency >= 1
    pending, results = list(reversed(prompts)), []

    async def worker(client: openai.AsyncOpenAI) -> None:
        while pending:
            results.append(await one_stream(client, model, pending.pop(), max_tokens))

    async with client_for(url) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        return {"results": results, "wall": time.perf_counter() - start}


def format_row(r: dict, baseline: dict | None = None) -> str:
    ratio = f" ({r['tokens_per_s'] / baseline['tokens_per_s']:.2f}x generate)" if baseline else ""
    itl = f"{r['itl_p50_ms']:.1f} | {r['itl_p99_ms']:.1f}" if r["itl_p50_ms"] == r["itl_p50_ms"] else "- | -"
    return (f"| {r['name']} | {r['requests']} | {r['tokens_per_s']:.1f}{ratio} | {r['ttft_p50_ms']:.0f} | "
            f"{r['ttft_p99_ms']:.0f} | {itl} |")  # fmt: skip


def long_prompt_ids(folder: Path, count: int, seed: int) -> list[int]:
    from jax_gpt2 import load_config

    vocab_size = load_config(folder).vocab_size
    return [int(t) for t in np.random.default_rng(seed).integers(1, vocab_size, count)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="a local model folder")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--requests", type=int, default=16, help="requests per concurrency level")
    parser.add_argument("--repeats", type=int, default=3, help="serve / generate pairs per level")
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--prompt-chars", type=int, default=96)
    parser.add_argument("--skip", nargs="*", default=[], choices=["startup", "prefill", "prefix"],
                        help="parts to leave out")  # fmt: skip
    parser.add_argument("--serve-flags", nargs="*", default=[], metavar="FLAG",
                        help="more flags for the load levels' server, e.g. --serve-flags=--speculate=lookup")  # fmt: skip
    parser.add_argument("--startup-only", action="store_true", help="only part 0: a cold and a warm launch")
    parser.add_argument("--until-warm", action="store_true", help="part 0 also waits until every program is compiled")
    parser.add_argument("--startup-limit", type=float, default=900.0)
    parser.add_argument("--server-log", type=Path, default=Path("serve_load.server.log"))
    parser.add_argument("--kernel-build", default=None, metavar="MARCH",
                        help="run server and generate on the kernels built for MARCH, e.g. x86-64-v3 (AVX2) on an AVX-512 host")  # fmt: skip
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = parser.parse_args()
    if args.kernel_build is not None:
        from bench_with_kernel_build import use_kernel_build

        use_kernel_build(args.kernel_build)
    if args.startup_only or "startup" not in args.skip:
        startup_results = startup(args)
        if args.startup_only:
            if args.out is not None:
                args.out.write_text(json.dumps({"startup": startup_results}, indent=2))
            return 0
    prompts, model_id = prompts_for(args.requests, args.prompt_chars), str(args.model)
    results: dict = {"max_tokens": args.max_tokens, "prompt_chars": args.prompt_chars, "repeats": args.repeats,
                     "kernel_build": args.kernel_build or "native", "levels": []}  # fmt: skip
    if "startup" not in args.skip:
        results["startup"] = startup_results
    baseline = GenerateBaseline(args.model, prompts, args.max_tokens, args.concurrency)
    print("| | requests | tok/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms |\n|---|---|---|---|---|---|---|")
    with server_process(args, *args.serve_flags) as (url, server_pid):
        for concurrency in args.concurrency:
            served, generated = [], []
            cpu = {"server_s": 0.0, "clients_s": 0.0, "wall_s": 0.0}  # where the cores went while serving
            for _ in range(args.repeats):
                server_before, clients_before = cpu_seconds(server_pid), time.process_time()
                served.append(asyncio.run(serve_level(url, model_id, prompts, concurrency, args.max_tokens)))
                cpu["server_s"] += cpu_seconds(server_pid) - server_before
                cpu["clients_s"] += time.process_time() - clients_before
                cpu["wall_s"] += served[-1]["wall"]
                generated.append(baseline.run(concurrency))
            plural = "s" if concurrency > 1 else ""
            level = {"serve": median_row(f"serve, {concurrency} client{plural}", served),
                     "generate": median_row(f"generate, batch {concurrency}", generated), "serve_cpu": cpu}  # fmt: skip
            results["levels"].append(level)
            print(format_row(level["serve"], level["generate"]), flush=True)
            print(format_row(level["generate"]), flush=True)
            print(f"  while serving: server {cpu['server_s']:.1f} CPU-s, clients {cpu['clients_s']:.1f} CPU-s "
                  f"over {cpu['wall_s']:.1f} s of wall time (2 cores: {2 * cpu['wall_s']:.1f} CPU-s)", flush=True)
        if "prefix" not in args.skip:
            prefixes = [long_prompt_ids(args.model, 512, seed) for seed in range(6)]
            tails = [long_prompt_ids(args.model, 16, 100 + seed) for seed in range(6)]
            cold = asyncio.run(prefix_ttft(url, model_id, prefixes, tails))  # a new prefix each time
            asyncio.run(prefix_ttft(url, model_id, prefixes[:1], tails[:1]))  # make sure the first one is cached
            warm = asyncio.run(prefix_ttft(url, model_id, prefixes[:1] * 6, tails))  # the cached prefix, new tails
            results["prefix"] = {"cold_ttft_ms": [1e3 * t for t in cold], "cached_ttft_ms": [1e3 * t for t in warm]}
            print(f"TTFT, 512-token prefix + 16: new prefix p50 {1e3 * np.median(cold):.0f} ms, "
                  f"cached prefix p50 {1e3 * np.median(warm):.0f} ms", flush=True)  # fmt: skip
    if "prefill" not in args.skip:
        results["prefill"] = {}
        long_prompt = long_prompt_ids(args.model, 1000, 7)
        for chunk in (128, 1024):
            with server_process(args, "--prefill-chunk", str(chunk), "--prefix-cache-mib", "0") as (url, _):
                for name, arrival in (("alone", None), ("with a 1000-token prompt", long_prompt)):
                    row = asyncio.run(running_streams_itl(url, model_id, prompts, arrival))
                    results["prefill"][f"prefill chunk {chunk}, {name}"] = row
                    print(f"prefill chunk {chunk}, {name}: running streams' ITL p50 {row['itl_p50_ms']:.1f} ms, "
                          f"p99 {row['itl_p99_ms']:.1f} ms, longest gap {row['longest_gap_ms']:.0f} ms "
                          f"({row['samples']} tokens)", flush=True)  # fmt: skip
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
