"""Process start-up for a multi-process run: joining the processes, and what a command-line tool
does so that one dying process ends the others with one line each.

Only the command-line tool (and scripts that act as one, such as benchmarks/scaling.py) import this
module: it takes over process-wide things a library must leave alone (the process's stderr, its exit,
a watchdog thread). Where arrays live on the devices once the processes are joined is sharding.py's job.
"""

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils

# What jaxlib's coordination client logs before it aborts the process (it offers no Python hook).
JAX_FATAL_MARK = "Terminating process because the JAX distributed service detected fatal errors"
# The program that rewrites that report on its way out (a file run by path: see its docstring).
STDERR_FILTER = Path(__file__).with_name("stderr_filter.py")
EXIT_LOST_PEER = 3  # the exit code of a process that ends because another process (or the coordinator) is gone


def parse_coordinator(address: str) -> tuple[str, int]:
    """'HOST:PORT' -> (host, port), or a ValueError that shows the expected form."""
    host, colon, port = address.rpartition(":")
    if not colon or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"the coordinator address must be HOST:PORT with a port in 1..65535, e.g. 10.0.0.1:1234; got {address!r}")
    return host.strip("[]"), int(port)


def check_processes(num_processes: int, process_id: int) -> None:
    """A ValueError for a process count below 1 or an id outside [0, num_processes)."""
    if not isinstance(num_processes, (int, np.integer)) or num_processes < 1:
        raise ValueError(f"num_processes must be an integer >= 1; got {num_processes!r}")
    if not isinstance(process_id, (int, np.integer)) or not 0 <= process_id < num_processes:
        raise ValueError(f"process_id must be in [0, {num_processes}) for num_processes={num_processes}; got {process_id!r}")


def wait_for_coordinator(host: str, port: int, timeout_s: float) -> None:
    """Block until something listens at host:port, or raise TimeoutError after timeout_s.

    jax.distributed's own wait ends a process that cannot reach its coordinator with an abort and
    a C++ stack trace; this check turns the common case (wrong address, coordinator not started
    or dead) into one clear error first.
    """
    assert timeout_s > 0
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, port), timeout=min(1.0, timeout_s)):
                return
        except OSError:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"the coordinator {host}:{port} did not answer within {timeout_s:g} s") from None
            time.sleep(0.2)


def initialize(coordinator: str, num_processes: int, process_id: int, timeout_s: float = 60.0) -> None:
    """Join this process to a multi-process JAX run (`jax.distributed.initialize`), before any other JAX call.

    Process 0 hosts the coordinator at `coordinator` (HOST:PORT); every process passes the same
    address and count and its own id. On CPU the processes exchange data with gloo collectives.
    Afterwards `jax.devices()` lists every process's devices and `make_mesh` spans them.
    timeout_s bounds the wait for the coordinator and for the other processes to join, and is the
    heartbeat timeout after which the coordination service declares a silent process dead.
    """
    host, port = parse_coordinator(coordinator)
    check_processes(num_processes, process_id)
    if not timeout_s > 0:
        raise ValueError(f"timeout must be > 0 seconds; got {timeout_s}")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if process_id != 0:
        wait_for_coordinator(host, port, timeout_s)
    # If the others never all join, jax.distributed aborts this process with a C++ stack trace once its
    # own timeout (set to twice ours) runs out: end it first, with one line that says what happened.
    message = (
        f"jax-gpt2: error: process {process_id} of {num_processes}: not every process joined the coordinator "
        f"{coordinator} within {timeout_s:g} s (is each one started, with the same address and count?)"
    )
    watchdog = threading.Timer(timeout_s, exit_with_message, args=(message, EXIT_LOST_PEER))
    watchdog.daemon = True
    watchdog.start()
    try:
        jax.distributed.initialize(
            coordinator, num_processes=int(num_processes), process_id=int(process_id),
            cluster_detection_method="deactivate",  # what the caller passed, never what the environment suggests
            initialization_timeout=int(2 * timeout_s), heartbeat_timeout_seconds=int(2 * timeout_s),
            shutdown_timeout_seconds=int(timeout_s),
        )  # fmt: skip
        # One collective now opens the processes' gloo connections. From then on a process that dies
        # closes them, and the others' next collective fails at once with a Python error, long before
        # the coordination service's heartbeat check (which aborts with a stack trace) would fire.
        with stdout_to_stderr():  # gloo announces its connections on C++ stdout, which belongs to the output
            multihost_utils.sync_global_devices("jax_gpt2.launch.initialize")
    finally:
        watchdog.cancel()
    assert jax.process_count() == num_processes
    assert jax.process_index() == process_id


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Point file descriptor 1 at stderr for a while (C++ code writes there directly, past sys.stdout)."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def exit_with_message(message: str, code: int) -> None:
    """End this process at once with one line on stderr.

    Not sys.exit: JAX's exit handler would wait at a shutdown barrier for processes that are gone,
    then abort with a stack trace. Used only when the multi-process run cannot go on anyway.
    """
    assert code != 0
    assert message
    sys.stdout.flush()
    print(message, file=sys.stderr, flush=True)
    os._exit(code)


def one_line_fatal_reports(line: str) -> None:
    """Replace jaxlib's fatal report (a C++ abort with a stack trace) on this process's stderr by `line`.

    When process 0 (the coordination service) dies, or the service declares a silent process
    dead, jaxlib's client aborts every other process at once from a C++ thread, printing a long
    report: no Python code runs in between. So the report is rewritten on its way out, by a small
    helper process that reads this process's stderr and outlives it. Call once, before
    `initialize`; only the command-line tool does (a library should not take over stderr).
    """
    assert JAX_FATAL_MARK
    assert "\n" not in line
    helper = subprocess.Popen([sys.executable, str(STDERR_FILTER), JAX_FATAL_MARK, line], stdin=subprocess.PIPE)
    sys.stderr.flush()
    os.dup2(helper.stdin.fileno(), 2)
    helper.stdin.close()  # fd 2 now holds the pipe; the helper sees its end when this process is gone
