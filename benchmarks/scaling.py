"""Scaling on one CPU host: perplexity tokens/s and greedy generate (B=8) decode tokens/s, for one
process, two processes joined by jax.distributed (gloo), and forced host-device meshes.

    uv run python benchmarks/scaling.py                  # every configuration, gpt2 shape
    uv run python benchmarks/scaling.py --layers 2       # a quick run
    uv run python benchmarks/scaling.py --out benchmarks/scaling_cpu.json

Each configuration runs in fresh processes (XLA_FLAGS must be set before JAX starts). On a host
with two cores, forced host devices and a second process share the same two cores and the same
memory bus as one process: these figures measure what a mesh costs (collectives, smaller
matmuls, no CPU kernels), not a speed-up. Nothing here is a test.

Every process builds the same random weights (seeded), so every configuration computes the same
perplexity; the table shows it, to show they did the same work.
"""

import argparse
import dataclasses
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

# (name, processes, forced host devices per process, mesh "DATAxMODEL" or None, packed CPU kernels)
CONFIGURATIONS = [
    ("1 process, 1 device, CPU kernels", 1, 1, None, True),
    ("1 process, 1 device, XLA dot", 1, 1, None, False),
    ("1 process, 2 host devices, mesh 2x1", 1, 2, "2x1", False),
    ("1 process, 2 host devices, mesh 1x2", 1, 2, "1x2", False),
    ("1 process, 4 host devices, mesh 2x2", 1, 4, "2x2", False),
    ("1 process, 4 host devices, mesh 1x4", 1, 4, "1x4", False),
    ("2 processes, 1 device each, mesh 2x1", 2, 1, "2x1", False),
    ("2 processes, 1 device each, mesh 1x2", 2, 1, "1x2", False),
]
BATCH = 8  # generate's batch
PROMPT_TOKENS, NEW_TOKENS = 20, 32
PPL_TOKENS, PPL_WINDOW, PPL_STRIDE, PPL_BATCH = 4096, 1024, 512, 4


def worker(args: argparse.Namespace) -> None:
    """One process of one configuration: build, warm up, time; process 0 prints one JSON line."""
    from jax_gpt2 import launch, sharding

    if args.coordinator:
        launch.initialize(args.coordinator, args.num_processes, args.process_id, timeout_s=300)
    import jax
    import numpy as np

    from jax_gpt2.config import PRESETS
    from jax_gpt2.loader import normalize_keys, weights_for_dtype
    from jax_gpt2.tools.random_model import random_state_dict

    config = dataclasses.replace(PRESETS[args.preset], n_layer=args.layers or PRESETS[args.preset].n_layer)
    state = normalize_keys(random_state_dict(config, std=0.1, seed=0))
    mesh = None if args.mesh is None else sharding.make_mesh(*sharding.parse_mesh(args.mesh))
    weights = weights_for_dtype(state, config, np.float32, pack=None if args.packed else False)
    if mesh is not None:
        weights = sharding.place_weights(weights, config, mesh)
    rng = np.random.default_rng(0)
    result = dict(
        processes=jax.process_count(), devices=jax.device_count(), mesh=args.mesh, packed=weights.lm_head_DV is not None,
        **measure_generate(weights, config, rng.integers(0, config.vocab_size, (BATCH, PROMPT_TOKENS)).tolist(), args.repeats),
        **measure_perplexity(weights, config, rng.integers(0, config.vocab_size, PPL_TOKENS)),
    )  # fmt: skip
    if jax.process_index() == 0:
        print(json.dumps(result), flush=True)


def measure_generate(weights, config, prompts: list[list[int]], repeats: int) -> dict:
    """Decode tokens/s of B rows: (time for NEW_TOKENS - time for 1) per extra token, from back-to-back pairs."""
    from jax_gpt2 import generate

    def run(count: int) -> float:
        start = time.perf_counter()
        generate(prompts, weights, config, max_new_tokens=count, eos_token_id=None)
        return time.perf_counter() - start

    run(NEW_TOKENS), run(1)  # compile both
    rates = []
    for _ in range(repeats):
        full, first = run(NEW_TOKENS), run(1)
        rates.append(len(prompts) * (NEW_TOKENS - 1) / (full - first))
    return dict(decode_tok_s=statistics.median(rates), decode_rates=rates, first_token_s=first)


def measure_perplexity(weights, config, ids) -> dict:
    """Sliding-window perplexity tokens/s over PPL_TOKENS tokens, compiled first on a short text."""
    from jax_gpt2 import perplexity

    settings = dict(max_length=PPL_WINDOW, stride=PPL_STRIDE, batch_size=PPL_BATCH)
    perplexity(ids[: PPL_WINDOW + PPL_STRIDE], weights, config, **settings)  # the same batch shape: compiles
    start = time.perf_counter()
    value = perplexity(ids, weights, config, **settings)
    seconds = time.perf_counter() - start
    return dict(perplexity=value, perplexity_tok_s=len(ids) / seconds, perplexity_s=seconds)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_configuration(processes: int, devices: int, mesh: str | None, packed: bool, args) -> dict:
    """Start the configuration's processes (fresh, with their XLA_FLAGS) and read process 0's line."""
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu"}
    command = [sys.executable, __file__, "--worker", "--preset", args.preset, "--repeats", str(args.repeats)]
    command += ["--layers", str(args.layers)] if args.layers else []
    command += ["--mesh", mesh] if mesh else []
    command += ["--packed"] if packed else []
    address = f"127.0.0.1:{free_port()}"
    runs = []
    for process_id in range(processes):
        flags = ["--coordinator", address, "--num-processes", str(processes), "--process-id", str(process_id)]
        runs.append(subprocess.Popen(command + (flags if processes > 1 else []), env=env, stdout=subprocess.PIPE, text=True))
    outputs = [run.communicate()[0] for run in runs]
    if any(run.returncode != 0 for run in runs):
        raise RuntimeError(f"a process of {processes} x {devices} devices, mesh {mesh}, failed")
    return json.loads(outputs[0].strip().splitlines()[-1])


def machine() -> dict:
    cpu = platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        names = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")]
        cpu = names[0] if names else cpu
    return dict(cpu=cpu, cores=os.cpu_count())


def format_table(results: dict) -> str:
    lines = [
        f"{results['machine']['cpu']}, {results['machine']['cores']} cores; {results['preset']}, "
        f"{results['layers']} layers; generate B={BATCH}, {PROMPT_TOKENS}+{NEW_TOKENS} tokens; perplexity "
        f"{PPL_TOKENS} tokens, windows {PPL_WINDOW}/{PPL_STRIDE}, {PPL_BATCH} per batch",
        "",
        "| configuration | decode B=8 tok/s | perplexity tok/s | perplexity |",
        "|---|---:|---:|---:|",
    ]
    for row in results["rows"]:
        lines.append(
            f"| {row['name']} | {row['decode_tok_s']:.1f} | {row['perplexity_tok_s']:.1f} | {row['perplexity']:.6f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="gpt2")
    parser.add_argument("--layers", type=int, default=None, help="override n_layer (quick runs)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", nargs="*", default=None, help="run only configurations whose name has one of these")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mesh", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--packed", action="store_true", help=argparse.SUPPRESS)
    for flag in ("--coordinator", "--num-processes", "--process-id"):
        parser.add_argument(flag, default=None, type=str if flag == "--coordinator" else int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    from jax_gpt2.config import PRESETS

    results = dict(machine=machine(), preset=args.preset, layers=args.layers or PRESETS[args.preset].n_layer, rows=[])
    for name, processes, devices, mesh, packed in CONFIGURATIONS:
        if args.only and not any(part in name for part in args.only):
            continue
        row = dict(name=name, **run_configuration(processes, devices, mesh, packed, args))
        results["rows"].append(row)
        print(f"{name}: decode {row['decode_tok_s']:.1f} tok/s, perplexity {row['perplexity_tok_s']:.1f} tok/s", flush=True)
    print(format_table(results))
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
