"""benchmarks/gpu_check.sh, the one command that checks the GPU path on a card, exercised on CPU:
its `--dry-run` runs every step with tiny settings and lists the card's commands; without a GPU
it stops with one line; its install step names a CUDA plugin that the lock resolves."""

import json
import os
import subprocess
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
STEPS = ["card", "parity", "generate", "precision", "bench"]


def run_script(*args: str, out: Path, path: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OUT": str(out)}
    # The dry run's steps are five Python processes: with bytecode caching off, each one compiles
    # torch's and transformers' sources again (about 10 s of CPU apiece on this host).
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    if path is not None:
        env["PATH"] = path
    return subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=1200)


def fake_nvidia_smi(folder: Path, body: str) -> str:
    """A PATH whose first folder holds an `nvidia-smi` that runs `body`: a card we do not have."""
    folder.mkdir()
    tool = folder / "nvidia-smi"
    tool.write_text(f"#!/bin/sh\n{body}\n")
    tool.chmod(0o755)
    return f"{folder}:{os.environ['PATH']}"


def path_without_nvidia_smi() -> str:
    return ":".join(part for part in os.environ["PATH"].split(":") if not (Path(part) / "nvidia-smi").exists())


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    result = run_script("--dry-run", out=out)
    return result, out


def test_dry_run_runs_every_step_on_cpu_and_passes(dry_run):
    result, out = dry_run
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "dry"
    assert [step["name"] for step in summary["steps"]] == STEPS
    assert [step["exit_code"] for step in summary["steps"]] == [0] * len(STEPS)
    assert summary["all_passed"] is True
    assert f"results in {out}" in result.stdout


def test_dry_run_lists_the_commands_a_card_runs(dry_run):
    _, out = dry_run
    commands = json.loads((out / "summary.json").read_text())["card_commands"]
    assert commands[0] == "uv sync --frozen --extra cuda"
    assert len(commands) == 1 + len(STEPS)
    card, parity, generate, precision, bench = commands[1:]
    assert card.startswith("nvidia-smi && ")
    assert "assert jax.default_backend() == 'gpu'" in card
    assert "tests/test_parity.py" in parity
    assert "--collect-only" not in parity
    assert "--presets gpt2 gpt2-medium --torch-device cuda" in generate
    assert "--preset gpt2 " in precision
    assert "--dtypes fp32 bf16 --batch-sizes 1 8 64" in bench
    assert "--torch-device cuda" in bench
    for command in commands[2:]:
        assert "uv run --no-sync python" in command  # a plain `uv run` would sync the cuda extra away
        assert str(out) in command  # every result lands under $OUT


def test_dry_run_parity_selection_holds_the_gpt2_and_gpt2_medium_shapes(dry_run):
    _, out = dry_run
    log = (out / "gpu_check.log").read_text()
    assert "test_parity.py::test_logits_match_transformers[gpt2]" in log
    assert "test_parity.py::test_logits_match_transformers[gpt2-medium]" in log
    assert "test_generate.py::test_greedy_matches_transformers_for_each_prompt_alone" in log
    assert "test_parity.py::test_logits_match_transformers[tiny]" not in log


def test_dry_run_python_steps_write_their_results(dry_run):
    _, out = dry_run
    generate = json.loads((out / "generate.json").read_text())
    assert [row["identical"] for row in generate["rows"]] == [True]  # float32 on both sides, on CPU
    precision = json.loads((out / "precision.json").read_text())
    assert [row["precision"] for row in precision["rows"]] == ["highest", "default"]
    assert precision["rows"][0]["within_parity_bar"] is True
    bench = json.loads((out / "bench-gpt2.json").read_text())
    assert [run["dtype"] for run in bench["runs"]] == ["fp32", "bf16"]
    assert {run["transformers_device"] for run in bench["runs"]} == {"cpu"}


@pytest.mark.parametrize(
    "path_kind", ["no nvidia-smi", "nvidia-smi lists no GPU"],
)
def test_without_a_gpu_it_stops_with_one_line_and_writes_nothing(path_kind, tmp_path):
    if path_kind == "no nvidia-smi":
        path = path_without_nvidia_smi()
    else:
        path = fake_nvidia_smi(tmp_path / "bin", 'echo "No devices were found"; exit 6')
    result = run_script(out=tmp_path / "out", path=path)
    assert result.returncode == 1
    assert result.stdout == ""
    [line] = result.stderr.splitlines()
    assert line.startswith("gpu_check: no NVIDIA GPU visible")
    assert not (tmp_path / "out").exists()


def test_a_driver_older_than_cuda_13_is_refused_before_any_install(tmp_path):
    listing = 'if [ "$1" = -L ]; then echo "GPU 0: NVIDIA Fake (UUID: GPU-0)"; else echo "| Driver Version: 550.54 CUDA Version: 12.4 |"; fi'
    result = run_script(out=tmp_path / "out", path=fake_nvidia_smi(tmp_path / "bin", listing))
    assert result.returncode == 1
    [line] = result.stderr.splitlines()
    assert "supports CUDA 12" in line
    assert "driver >= 580" in line
    assert not (tmp_path / "out").exists()


def test_an_unknown_argument_prints_the_usage(tmp_path):
    result = run_script("--gpu", out=tmp_path / "out")
    assert result.returncode == 2
    assert result.stderr.startswith("usage: benchmarks/gpu_check.sh")


def locked_packages() -> dict[str, list[dict]]:
    lock = tomllib.loads((ROOT / "uv.lock").read_text())
    packages: dict[str, list[dict]] = {}
    for package in lock["package"]:
        packages.setdefault(package["name"], []).append(package)
    return packages


def test_the_cuda_extra_resolves_to_the_jax_cuda13_plugin_of_the_same_version():
    packages = locked_packages()
    [ours] = packages["jax-gpt2"]
    assert {extra for dep in ours["optional-dependencies"]["cuda"] for extra in dep["extra"]} == {"cuda13"}
    for jax in packages["jax"]:
        [plugin] = [dep for dep in jax["optional-dependencies"]["cuda13"] if dep["name"] == "jax-cuda13-plugin"]
        assert plugin["version"] == jax["version"]


def test_the_jax_plugin_and_torch_use_the_same_cuda_13_libraries():
    """One CUDA generation in the environment: jax[cuda12] would add nvidia-*-cu12 wheels that write
    the same files as torch's cu13 ones (nvidia-nvshmem-cu12 ships nvidia/nvshmem/lib/libnvshmem_host.so.3,
    as nvidia-nvshmem-cu13 does)."""
    packages = locked_packages()
    torch_deps = {dep["name"] for dep in packages["torch"][0]["dependencies"]}
    for plugin in packages["jax-cuda13-plugin"]:
        plugin_deps = {dep["name"] for dep in plugin["optional-dependencies"]["with-cuda"]}
        assert {"nvidia-cudnn-cu13", "nvidia-nccl-cu13"} <= plugin_deps & torch_deps
        assert not any(name.endswith("-cu12") for name in plugin_deps)


def test_help_describes_the_steps_and_the_modes(tmp_path):
    result = run_script("--help", out=tmp_path / "out")
    assert result.returncode == 0
    for word in ["install", "parity", "precision", "bench", "--dry-run", "--python", "$OUT"]:
        assert word in result.stdout
    assert not (tmp_path / "out").exists()
