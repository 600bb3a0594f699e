"""Many devices and many hosts (sharding.py).

Meshes need several devices, and on CPU those exist only if XLA_FLAGS asks for them before JAX
starts: tests/mesh_checks.py holds the mesh tests and runs here in its own pytest process on
four host devices. The multi-process tests start real `jax-gpt2` processes joined by
jax.distributed on 127.0.0.1 (one device each, gloo collectives), and kill one of them.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from jax_gpt2.cli import main
from jax_gpt2.config import GPT2Config
from jax_gpt2.model import split_qkv
from jax_gpt2.tools.random_model import write_random_model
from jax_gpt2.launch import JAX_FATAL_MARK, STDERR_FILTER, parse_coordinator
from jax_gpt2.sharding import pad_rows, padded_rows, parse_mesh, qkv_column_order

TESTS = Path(__file__).parent
# Bound given to the processes (--timeout): the wait for the coordinator and the other processes.
TIMEOUT_S = 20
# How long a survivor may take to end after its peer is killed: the bound, plus a loaded machine's slack.
SURVIVOR_BOUND_S = TIMEOUT_S + 10
PERPLEXITY_RELATIVE = 1e-6
TEXT = "The quick brown fox jumps over the lazy dog. Keys and values of earlier tokens are kept in a cache. "


def test_every_mesh_shape_matches_one_device():
    """tests/mesh_checks.py on four host devices: forward, cached decode, generate, perplexity, placement."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(TESTS / "mesh_checks.py")]
    run = subprocess.run(command, cwd=TESTS.parent, env=env, capture_output=True, text=True, timeout=1500)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    assert re.search(r"\b\d+ passed", run.stdout)
    assert not re.search(r"\b(failed|skipped|error)", run.stdout.splitlines()[-1])


def test_regrouped_qkv_columns_split_into_hf_q_k_and_v():
    config = GPT2Config(n_embd=24, n_head=6, n_layer=1, vocab_size=11, n_positions=8)
    qkv_BTE = np.random.default_rng(0).normal(size=(2, 3, 72)).astype(np.float32)
    expected = [part.reshape(2, 3, 6, 4) for part in np.split(qkv_BTE, 3, axis=-1)]
    for groups in (1, 2, 3, 6):
        regrouped_BTE = qkv_BTE[..., qkv_column_order(config, groups)]
        for ours, theirs in zip(split_qkv(jax.numpy.asarray(regrouped_BTE), config, groups), expected, strict=True):
            np.testing.assert_array_equal(np.asarray(ours), theirs)
    np.testing.assert_array_equal(qkv_column_order(config, 1), np.arange(72))


def test_padded_rows_copy_the_last_row_up_to_a_multiple_of_the_data_axis():
    assert padded_rows(3, None) == 3
    np.testing.assert_array_equal(pad_rows(np.array([[1, 2], [3, 4], [5, 6]]), 4), [[1, 2], [3, 4], [5, 6], [5, 6]])
    np.testing.assert_array_equal(pad_rows(np.array([7]), 1), [7])


@pytest.mark.parametrize("text", ["2", "2x", "x2", "2x2x1", "0x2", "2by2", "-1x2"])
def test_a_mesh_is_two_positive_integers(text):
    with pytest.raises(ValueError, match="DATAxMODEL|>= 1"):
        parse_mesh(text)


def test_mesh_flag_reads_data_then_model():
    assert parse_mesh("2x1") == (2, 1)
    assert parse_mesh("1X4") == (1, 4)


def test_a_mesh_larger_than_this_process_is_refused(tmp_path, capsys):
    # Only in this file's one-device process: the same call with four devices is in mesh_checks.py.
    from jax_gpt2.sharding import make_mesh

    with pytest.raises(ValueError, match="needs 2 devices but 1 are visible.*XLA_FLAGS"):
        make_mesh(1, 2)


@pytest.mark.parametrize("address", ["127.0.0.1", "127.0.0.1:", "127.0.0.1:http", ":1234", "127.0.0.1:70000"])
def test_a_coordinator_address_needs_a_host_and_a_port(address):
    with pytest.raises(ValueError, match="HOST:PORT"):
        parse_coordinator(address)


@pytest.fixture(scope="module")
def cli_model(tmp_path_factory) -> tuple[Path, Path]:
    """(model folder, text file): four heads, so a 1x2 mesh splits them; a trained tokenizer."""
    folder = tmp_path_factory.mktemp("mp-model")
    config = GPT2Config(vocab_size=300, n_positions=64, n_embd=32, n_layer=2, n_head=4)
    write_random_model(folder, config, std=0.3)
    text_file = folder / "text.txt"
    text_file.write_text(TEXT * 12)
    return folder, text_file


PPL_FLAGS = ["--max-length", "64", "--stride", "32", "--batch-size", "3", "--json"]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--coordinator", "127.0.0.1", "--num-processes", "2", "--process-id", "0"], "HOST:PORT"),
        (["--coordinator", "127.0.0.1:1234", "--num-processes", "0", "--process-id", "0"], "num_processes must be"),
        (["--coordinator", "127.0.0.1:1234", "--num-processes", "2", "--process-id", "2"], r"process_id must be in \[0, 2\)"),
        (["--coordinator", "127.0.0.1:1234", "--num-processes", "2", "--process-id", "-1"], r"process_id must be in"),
        (["--coordinator", "127.0.0.1:1234", "--num-processes", "2"], "needs --num-processes P and --process-id I"),
        (["--num-processes", "2", "--process-id", "0"], "need --coordinator"),
        (["--coordinator", "127.0.0.1:1234", "--num-processes", "2", "--process-id", "1", "--timeout", "0"], "--timeout"),
        (["--mesh", "1x4"], "needs 4 devices but 1 are visible"),
    ],
)  # fmt: skip
def test_bad_distributed_flags_are_one_clear_error(cli_model, capsys, flags, message):
    folder, text_file = cli_model
    assert main(["perplexity", str(text_file), "--model", str(folder), *PPL_FLAGS, *flags]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1
    assert re.search(message, error[0]), error[0]


def test_a_malformed_mesh_flag_is_a_usage_error(cli_model, capsys):
    folder, text_file = cli_model
    with pytest.raises(SystemExit) as exit_info:
        main(["perplexity", str(text_file), "--model", str(folder), "--mesh", "2by2"])
    assert exit_info.value.code == 2
    assert "DATAxMODEL" in capsys.readouterr().err


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_processes(command: list[str], num_processes: int, tmp_path: Path, process_ids=None) -> list:
    """`jax-gpt2 COMMAND` for each process id (default: all), one CPU device each; stdout/stderr into files."""
    env = {key: value for key, value in os.environ.items() if key != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    address = f"127.0.0.1:{free_port()}"
    processes = []
    for process_id in range(num_processes) if process_ids is None else process_ids:
        flags = ["--coordinator", address, "--num-processes", str(num_processes), "--process-id", str(process_id)]
        flags += [] if "--timeout" in command else ["--timeout", str(TIMEOUT_S)]
        out, err = tmp_path / f"{process_id}.out", tmp_path / f"{process_id}.err"
        process = subprocess.Popen(
            [sys.executable, "-m", "jax_gpt2.cli", *command, *flags], stdout=out.open("w"), stderr=err.open("w"), env=env
        )
        process.out, process.err = out, err
        processes.append(process)
    return processes


def finish(processes: list, timeout: float = 600) -> None:
    try:
        for process in processes:
            process.wait(timeout=timeout)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()


def last_line(path: Path, wait_s: float = 5.0) -> str:
    """The last line a process wrote to a file (its stderr helper may write a moment after it exits)."""
    deadline = time.monotonic() + wait_s
    while True:
        lines = [line for line in re.split(r"[\r\n]", path.read_text()) if line.strip()]
        if (lines and "error" in lines[-1]) or time.monotonic() > deadline:
            return lines[-1] if lines else ""
        time.sleep(0.1)


def test_two_processes_split_the_windows_and_report_the_one_process_perplexity(cli_model, tmp_path, capsys):
    folder, text_file = cli_model
    command = ["perplexity", str(text_file), "--model", str(folder), *PPL_FLAGS]
    processes = start_processes(command, 2, tmp_path)
    assert main(command) == 0
    single = json.loads(capsys.readouterr().out)
    finish(processes)
    for process in processes:
        assert process.returncode == 0, process.err.read_text()[-3000:]
    results = [json.loads(process.out.read_text()) for process in processes]
    assert [result["process_id"] for result in results] == [0, 1]
    assert all(result["processes"] == 2 and result["mesh"] == "2x1" for result in results)
    assert results[0]["perplexity"] == results[1]["perplexity"]  # one program, one set of sums
    assert abs(results[0]["perplexity"] - single["perplexity"]) / single["perplexity"] <= PERPLEXITY_RELATIVE
    assert results[0]["scored_tokens"] == single["scored_tokens"]


def test_two_processes_generate_from_a_file_and_process_0_prints_in_input_order(cli_model, tmp_path, capsys):
    folder, _ = cli_model
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The quick brown fox\nKeys and values\nHello world! Numbers like 1, 2, 3\n")
    command = ["generate", "--file", str(prompts), "--model", str(folder), "--max-new-tokens", "8", "--ignore-eos"]
    processes = start_processes(command, 2, tmp_path)
    assert main(command) == 0
    single = capsys.readouterr().out
    finish(processes)
    for process in processes:
        assert process.returncode == 0, process.err.read_text()[-3000:]
    assert processes[0].out.read_text() == single
    assert [line for line in single.splitlines() if line.startswith("--- ")] == [
        "--- 'The quick brown fox'", "--- 'Keys and values'", "--- 'Hello world! Numbers like 1, 2, 3'",
    ]  # fmt: skip
    assert processes[1].out.read_text() == ""


def progress_started(path: Path) -> bool:
    """The progress bar has counted at least one batch of windows: the process is in the batch loop."""
    return re.search(r"\|\s*[1-9]\d*/\d+ \[", path.read_text()) is not None


@pytest.mark.parametrize("victim", [1, 0], ids=["a peer", "the coordinator"])
def test_a_killed_process_ends_the_other_with_one_line_within_the_bound(cli_model, tmp_path, victim):
    folder, text_file = cli_model
    long_text = tmp_path / "long.txt"
    long_text.write_text(TEXT * 600)  # hundreds of batches: still running when the victim dies
    command = ["perplexity", str(long_text), "--model", str(folder), *PPL_FLAGS[:4], "--batch-size", "2"]
    processes = start_processes(command, 2, tmp_path)
    survivor = processes[1 - victim]
    try:
        deadline = time.monotonic() + 300
        while not all(progress_started(process.err) for process in processes):
            assert time.monotonic() < deadline, "the processes never started their batches"
            assert all(process.poll() is None for process in processes), survivor.err.read_text()[-3000:]
            time.sleep(0.2)
        processes[victim].send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        survivor.wait(timeout=SURVIVOR_BOUND_S)
        elapsed = time.monotonic() - killed_at
    finally:
        finish(processes, timeout=10)
    assert survivor.returncode != 0
    assert elapsed <= SURVIVOR_BOUND_S
    line = last_line(survivor.err)
    assert re.match(rf"jax-gpt2 perplexity: error: process {1 - victim} of 2: ", line), line
    errors = [text for text in re.split(r"[\r\n]", survivor.err.read_text()) if "error" in text.lower()]
    assert len(errors) == 1, errors
    assert "Traceback" not in survivor.err.read_text()
    assert "Check failure" not in survivor.err.read_text()


# What a survivor's stderr held in a run where the coordinator died (the first record's text is
# abridged): a gRPC failure's record goes on over two more lines, then the preemption barrier's.
FAILED_GRPC_RECORD = (
    b"E1202 02:25:13.073000   24782 coordination_service_agent.cc:440] Failed to get a key: UNAVAILABLE\n"
    b"Additional GRPC error information from remote target coordination_service while calling "
    b"/xla.coordination.CoordinationService/GetKeyValue:\n"
    b":UNKNOWN:Error received from peer  {grpc_status:14, grpc_message:\"Socket closed\"}. This is only expected "
    b"if one of the tasks is unhealthy. Check the logs for the actual root cause.\n"
    b"E1202 02:25:13.073586   24782 preemption_sync_manager.cc:159] Failed to cancel preemption barrier: "
    b"FAILED_PRECONDITION: Tried to cancel non-existent barrier PREEMPTION_SYNC_BARRIER.\n"
)


def filtered_stderr(written: bytes) -> bytes:
    """What the command's stderr filter passes on of `written` (given in one write)."""
    result = subprocess.run(
        [sys.executable, str(STDERR_FILTER), JAX_FATAL_MARK, "jax-gpt2 perplexity: error: THE LINE"],
        input=written, capture_output=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stderr


def test_the_stderr_filter_drops_a_failed_grpc_record_with_its_lines_and_keeps_ours():
    progress = b"perplexity:  40%|####      | 4/10 [00:01<00:01]\r"
    gloo = b"[Gloo] Rank 1 is connected to 1 peer ranks. Expected number of connected peer ranks is : 1\n"
    ours = b"jax-gpt2 perplexity: error: process 1 of 2: JAX's coordination service failed\n"
    assert filtered_stderr(gloo + progress + FAILED_GRPC_RECORD + ours) == gloo + progress + ours
    assert filtered_stderr(FAILED_GRPC_RECORD + progress + b"more text\n") == progress + b"more text\n"
    fatal = b"F1202 02:25:14.000000   24782 client.cc:80] " + JAX_FATAL_MARK.encode() + b"\n*** stack trace\n"
    assert filtered_stderr(progress + FAILED_GRPC_RECORD + fatal) == progress + b"\njax-gpt2 perplexity: error: THE LINE\n"


def test_the_stderr_filter_passes_text_that_is_no_record_of_the_service():
    other_record = b"W1202 02:25:13.000000   24782 cpu_client.cc:10] some other warning\n"
    text = b"Traceback (most recent call last):\n  File x, line 1\nValueError: not ours to hide\n"
    assert filtered_stderr(other_record + text) == other_record + text


@pytest.mark.parametrize(
    ("alone", "message"),
    [(1, "the coordinator 127.0.0.1:\\d+ did not answer within 4 s"), (0, "not every process joined the coordinator")],
    ids=["no coordinator", "no peer"],
)
def test_a_process_left_alone_ends_with_one_line_after_the_timeout(cli_model, tmp_path, alone, message):
    folder, text_file = cli_model
    command = ["perplexity", str(text_file), "--model", str(folder), *PPL_FLAGS, "--timeout", "4"]
    start = time.monotonic()
    [process] = start_processes(command, 2, tmp_path, process_ids=[alone])
    finish([process], timeout=120)
    assert process.returncode != 0
    assert time.monotonic() - start <= 4 + 60  # the bound, plus starting Python and JAX on a loaded machine
    line = last_line(process.err)
    assert re.search(message, line), line
    assert len([text for text in process.err.read_text().splitlines() if text.strip()]) == 1
