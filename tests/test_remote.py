"""`jax-gpt2 remote`, tested for real where that is possible on one machine.

* SSH and rsync are real: a throwaway OpenSSH server listens on 127.0.0.1 for the test session,
  and the "remote" is a temporary directory on this same machine, so a test can look at what
  arrived there.
* RunPod is a stand-in: a small HTTP server in a thread that answers with the shapes of RunPod's
  REST API v1. Its pods point at the local sshd, so provisioning runs end to end through SSH.

Nothing leaves 127.0.0.1. If OpenSSH's server or rsync is missing the session fixture installs them
(`apt-get install`, root only) and skips the SSH tests with the reason only when that fails.
"""

import ast
import getpass
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from jax_gpt2.tools import remote
from jax_gpt2.cli import main

SSHD = "/usr/sbin/sshd"
APT_PACKAGES = ["openssh-server", "openssh-client", "rsync"]
API_KEY = "rp-test-SECRET-5f0c2d9e"  # Must never show up in any output.
POLL_S = "0.05"  # Polls and waits in these tests are fast; the bounds are what is being tested.


# ---------------------------------------------------------------------------------------------
# A real OpenSSH server on loopback


@dataclass(frozen=True)
class LocalSshd:
    user: str
    port: int
    key_path: Path
    address: str


def missing_ssh_tools() -> list[str]:
    missing = [] if Path(SSHD).is_file() else [SSHD]
    return missing + [tool for tool in ("ssh", "ssh-keygen", "rsync") if shutil.which(tool) is None]


def install_ssh_tools() -> str:
    """Try apt-get (CI runs as root on Debian); returns why it could not, or '' on success."""
    if os.geteuid() != 0:
        return "not root, so cannot apt-get install them"
    if shutil.which("apt-get") is None:
        return "no apt-get on this machine"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *APT_PACKAGES]
    for commands in ([install], [["apt-get", "update", "-q"], install]):  # Stale package lists: update once.
        results = (
            subprocess.run(command, env=env, check=False, capture_output=True, timeout=600) for command in commands
        )
        if all(result.returncode == 0 for result in results):
            return ""
    return f"`{' '.join(install)}` failed"


def free_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def write_sshd_config(directory: Path, port: int) -> Path:
    config = directory / "sshd_config"
    config.write_text(
        f"Port {port}\nListenAddress 127.0.0.1\n"
        f"HostKey {directory / 'host_key'}\nPidFile {directory / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {directory / 'authorized_keys'}\n"
        # The tmp dir's permissions are not sshd's business here; PAM would want a real login.
        "StrictModes no\nUsePAM no\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\n"
    )
    return config


def wait_until_sshd_logs_in(sshd: LocalSshd, known_hosts: Path) -> bool:
    probe = ["ssh", "-p", str(sshd.port), "-i", str(sshd.key_path), "-o", "IdentitiesOnly=yes",
             "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=accept-new",
             "-o", f"UserKnownHostsFile={known_hosts}", f"{sshd.user}@127.0.0.1", "true"]  # fmt: skip
    for _ in range(50):  # At most ~10 s for sshd to start listening.
        if subprocess.run(probe, check=False, capture_output=True, timeout=30).returncode == 0:
            return True
        time.sleep(0.2)
    return False


@pytest.fixture(scope="session")
def sshd(tmp_path_factory):
    if missing_ssh_tools():
        why_not = install_ssh_tools()
        if missing_ssh_tools():
            missing = ", ".join(missing_ssh_tools())
            pytest.skip(f"OpenSSH server / rsync missing ({missing}) and {why_not or 'installing did not add them'}")
    directory = tmp_path_factory.mktemp("sshd")
    for key in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(directory / key)], check=True)
    shutil.copy(directory / "client_key.pub", directory / "authorized_keys")
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # sshd's privilege separation dir.
    port = free_loopback_port()
    config = write_sshd_config(directory, port)
    log = (directory / "sshd.log").open("w")
    process = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stdout=log, stderr=subprocess.STDOUT)
    user = getpass.getuser()
    server = LocalSshd(user=user, port=port, key_path=directory / "client_key", address=f"{user}@127.0.0.1:{port}")
    try:
        if not wait_until_sshd_logs_in(server, directory / "probe_known_hosts"):
            pytest.skip(f"sshd could not start or log in here: {(directory / 'sshd.log').read_text()[-500:]}")
        yield server
    finally:
        process.terminate()
        process.wait(timeout=10)
        log.close()


# ---------------------------------------------------------------------------------------------
# A stand-in for RunPod's REST API v1


@dataclass
class FakeRunPod:
    """Answers like RunPod; its pods' SSH address is the local sshd. Records every request."""

    ssh_port: int
    starting_polls: int = 1  # GETs that answer "still starting" before the pod is ready.
    fail_status: int | None = None  # Answer every request with this HTTP error instead.
    requests: list = field(default_factory=list)
    url: str = ""


def pod_json(pod_id: str, ssh_port: int | None) -> dict:
    # v1 shapes: desiredStatus is RUNNING right away; the public IP and port mapping come later.
    if ssh_port is None:
        return {"id": pod_id, "desiredStatus": "RUNNING", "publicIp": "", "portMappings": {}}
    return {"id": pod_id, "desiredStatus": "RUNNING", "publicIp": "127.0.0.1", "portMappings": {"22": ssh_port}}


def make_handler(fake: FakeRunPod):
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            self.answer()

        def do_GET(self):
            self.answer()

        def do_DELETE(self):
            self.answer()

        def answer(self):
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length)) if length else None
            fake.requests.append((self.command, self.path, self.headers.get("Authorization"), body))
            if fake.fail_status is not None:
                # A careless server that echoes the credentials back: the client must redact them.
                return self.reply(fake.fail_status, {"error": f"denied for {self.headers.get('Authorization')}"})
            if self.command == "POST" and self.path == "/v1/pods":
                return self.reply(201, pod_json("pod-123", None))
            if self.command == "GET" and self.path == "/v1/pods/pod-123":
                polls = sum(1 for request in fake.requests if request[0] == "GET")
                ready = fake.starting_polls is not None and polls > fake.starting_polls
                return self.reply(200, pod_json("pod-123", fake.ssh_port if ready else None))
            if self.command == "DELETE" and self.path == "/v1/pods/pod-123":
                return self.reply(204, None)
            return self.reply(404, {"error": "not found"})

        def reply(self, status: int, payload: dict | None):
            data = b"" if payload is None else json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):  # Keep the test output for the client's lines.
            pass

    return Handler


def serve_fake_runpod(ssh_port: int):
    fake = FakeRunPod(ssh_port=ssh_port)
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(fake))
    fake.url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return fake, server


@pytest.fixture
def runpod(sshd):
    fake, server = serve_fake_runpod(sshd.port)
    yield fake
    server.shutdown()
    server.server_close()


@pytest.fixture
def runpod_without_sshd():
    """For API-only behaviour (errors, dry run): the pods' SSH port is never dialled."""
    fake, server = serve_fake_runpod(ssh_port=1)
    yield fake
    server.shutdown()
    server.server_close()


# ---------------------------------------------------------------------------------------------
# Helpers


@pytest.fixture(autouse=True)
def isolated_environment(tmp_path, monkeypatch):
    """Every test gets its own config dir (state file, known_hosts) and no inherited secrets."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    for name in ("RUNPOD_API_KEY", "RUNPOD_API_URL", "SSH_KEY_PATH"):
        monkeypatch.delenv(name, raising=False)
    for name in ("NO_PROXY", "no_proxy"):  # The RunPod stand-in is on loopback: never via a proxy.
        monkeypatch.setenv(name, "127.0.0.1,localhost")


def make_tree(root: Path, files: dict[str, str]) -> Path:
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def fake_uv(directory: Path, exit_codes: dict[str, int] | None = None) -> Path:
    """A stand-in for uv on the remote: logs its arguments; fails for a chosen subcommand word."""
    cases = "".join(f"  *{word}*) exit {code} ;;\n" for word, code in (exit_codes or {}).items())
    script = directory / "fake-uv"
    script.write_text(f'#!/bin/sh\necho "fake-uv $*" | tee -a {directory / "uv.log"}\ncase "$*" in\n{cases}esac\n')
    script.chmod(0o755)
    return script


def unused_key_pair(directory: Path) -> Path:
    """A key pair for tests that never log in: only the public half is read (into the pod spec)."""
    (directory / "key").write_text("private half, never read by these tests\n")
    (directory / "key.pub").write_text("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAt3stOnlyPubl1cKey test@jax-gpt2\n")
    return directory / "key"


def remote_args(sshd: LocalSshd, remote_dir: Path, local_dir: Path, *more: str) -> list[str]:
    return ["remote", "--use-existing", sshd.address, "--ssh-key", str(sshd.key_path),
            "--local-dir", str(local_dir), "--remote-dir", str(remote_dir), *more]  # fmt: skip


def itemized_paths(stdout: str) -> list[str]:
    """Files rsync's --itemize-changes says it sent (`<f...`: pushed to the remote) or deleted."""
    lines = [line.split() for line in stdout.splitlines()]
    return [parts[-1] for parts in lines if len(parts) == 2 and (parts[0].startswith("<f") or parts[0] == "*deleting")]


def press_ctrl_c(*_args):
    """Stands in for a step the user interrupts: Ctrl-C arrives as KeyboardInterrupt."""
    raise KeyboardInterrupt


def assert_one_clean_error_line(stderr: str, expected: str) -> None:
    assert "Traceback" not in stderr
    error_lines = [line for line in stderr.splitlines() if "error:" in line]
    assert len(error_lines) == 1, stderr
    assert expected in error_lines[0], stderr


# ---------------------------------------------------------------------------------------------
# Running on an existing host


def test_command_output_and_exit_code_come_back(sshd, tmp_path, capfd):
    tree = make_tree(tmp_path / "tree", {"hello.txt": "hello from the tree\n"})
    command = "cat hello.txt; echo to-stderr >&2; exit 3"
    exit_code = main(remote_args(sshd, tmp_path / "remote", tree, "--no-bootstrap", "--command", command))
    out, err = capfd.readouterr()
    assert exit_code == 3
    assert "hello from the tree" in out
    assert "to-stderr" in err


def test_command_may_end_in_a_shell_comment(sshd, tmp_path, capfd):
    tree = make_tree(tmp_path / "tree", {"a.txt": "a\n"})
    command = "echo still-runs  # a note for the reader"
    assert main(remote_args(sshd, tmp_path / "remote", tree, "--no-bootstrap", "--command", command)) == 0
    assert "still-runs" in capfd.readouterr().out


def test_sync_skips_gitignored_files_and_the_git_and_venv_dirs(sshd, tmp_path):
    tree = make_tree(tmp_path / "tree", {
        ".gitignore": "*.log\nbuild/\n", "src/keep.py": "x = 1\n", "debug.log": "noise\n",
        "build/artifact": "big\n", ".git": "gitdir: elsewhere\n", ".venv/bin/python": "local venv\n",
    })  # fmt: skip
    remote_dir = tmp_path / "remote"
    assert main(remote_args(sshd, remote_dir, tree, "--no-bootstrap", "--command", "true")) == 0
    synced = sorted(str(path.relative_to(remote_dir)) for path in remote_dir.rglob("*") if path.is_file())
    assert synced == [".gitignore", "src/keep.py"]


def test_sync_leaves_the_remote_venv_alone(sshd, tmp_path):
    tree = make_tree(tmp_path / "tree", {"a.txt": "a\n"})
    remote_venv = make_tree(tmp_path / "remote", {".venv/bin/python": "the remote's own env\n"})
    assert main(remote_args(sshd, remote_venv, tree, "--no-bootstrap", "--command", "true")) == 0
    assert (tmp_path / "remote" / ".venv" / "bin" / "python").read_text() == "the remote's own env\n"


def test_second_run_sends_only_what_changed(sshd, tmp_path, capfd):
    tree = make_tree(tmp_path / "tree", {"same.txt": "unchanged\n", "edited.txt": "v1\n"})
    args = remote_args(sshd, tmp_path / "remote", tree, "--no-bootstrap", "--command", "true")
    assert main(args) == 0
    assert sorted(itemized_paths(capfd.readouterr().out)) == ["edited.txt", "same.txt"]
    (tree / "edited.txt").write_text("version two, longer\n")  # New size: rsync's quick check sees it.
    assert main(args) == 0
    assert itemized_paths(capfd.readouterr().out) == ["edited.txt"]
    assert (tmp_path / "remote" / "edited.txt").read_text() == "version two, longer\n"


def test_files_deleted_locally_are_deleted_remotely(sshd, tmp_path, capfd):
    tree = make_tree(tmp_path / "tree", {"stays.txt": "a\n", "goes.txt": "b\n"})
    args = remote_args(sshd, tmp_path / "remote", tree, "--no-bootstrap", "--command", "true")
    assert main(args) == 0
    (tree / "goes.txt").unlink()
    capfd.readouterr()
    assert main(args) == 0
    assert itemized_paths(capfd.readouterr().out) == ["goes.txt"]
    assert not (tmp_path / "remote" / "goes.txt").exists()


def test_bootstrap_runs_once_then_the_marker_skips_it(sshd, tmp_path, capfd):
    tree = make_tree(tmp_path / "tree", {"pyproject.toml": "[project]\n"})
    uv = fake_uv(tmp_path)
    args = remote_args(sshd, tmp_path / "remote", tree, "--remote-uv", str(uv), "--command", "true")
    assert main(args) == 0
    assert main(args) == 0  # The sync in between must not delete the marker.
    assert (tmp_path / "uv.log").read_text().splitlines() == ["fake-uv sync --extra cuda"]
    assert (tmp_path / "remote" / remote.BOOTSTRAP_MARKER).is_file()
    assert "bootstrap already done" in capfd.readouterr().err


def test_failed_bootstrap_is_one_line_and_is_retried_next_run(sshd, tmp_path, capfd):
    tree = make_tree(tmp_path / "tree", {"pyproject.toml": "[project]\n"})
    uv = fake_uv(tmp_path, exit_codes={"sync": 1})
    args = remote_args(sshd, tmp_path / "remote", tree, "--remote-uv", str(uv), "--command", "true")
    assert main(args) == remote.ERROR_EXIT_CODE
    assert_one_clean_error_line(capfd.readouterr().err, "bootstrap on")
    assert not (tmp_path / "remote" / remote.BOOTSTRAP_MARKER).exists()
    assert main(args) == remote.ERROR_EXIT_CODE
    assert len((tmp_path / "uv.log").read_text().splitlines()) == 2


def test_default_run_is_pytest_then_compare_then_bench(sshd, tmp_path, capfd):
    tree = make_tree(tmp_path / "tree", {"pyproject.toml": "[project]\n"})
    uv = fake_uv(tmp_path)
    assert main(remote_args(sshd, tmp_path / "remote", tree, "--no-bootstrap", "--remote-uv", str(uv))) == 0
    assert (tmp_path / "uv.log").read_text().splitlines() == [
        "fake-uv run --extra cuda pytest",
        "fake-uv run --extra cuda jax-gpt2 compare",
        "fake-uv run --extra cuda jax-gpt2 bench",
    ]


def test_default_run_stops_at_the_first_failing_step_with_its_exit_code(sshd, tmp_path):
    tree = make_tree(tmp_path / "tree", {"pyproject.toml": "[project]\n"})
    uv = fake_uv(tmp_path, exit_codes={"pytest": 4})
    assert main(remote_args(sshd, tmp_path / "remote", tree, "--no-bootstrap", "--remote-uv", str(uv))) == 4
    assert (tmp_path / "uv.log").read_text().splitlines() == ["fake-uv run --extra cuda pytest"]


def test_ssh_key_can_come_from_the_environment(sshd, tmp_path, capfd, monkeypatch):
    monkeypatch.setenv("SSH_KEY_PATH", str(sshd.key_path))
    tree = make_tree(tmp_path / "tree", {"a.txt": "a\n"})
    args = ["remote", "--use-existing", sshd.address, "--local-dir", str(tree), "--remote-dir", str(tmp_path / "remote"),
            "--no-bootstrap", "--command", "echo logged-in"]  # fmt: skip
    assert main(args) == 0
    assert "logged-in" in capfd.readouterr().out


def test_unreachable_host_is_one_clear_line(sshd, tmp_path, capfd):
    closed = f"root@127.0.0.1:{free_loopback_port()}"
    args = ["remote", "--use-existing", closed, "--ssh-key", str(sshd.key_path), "--command", "true"]
    assert main(args) == remote.ERROR_EXIT_CODE
    assert_one_clean_error_line(capfd.readouterr().err, f"cannot reach {closed} over SSH")


def test_unknown_name_is_one_clear_line(tmp_path, capfd):
    assert main(["remote", "--use-existing", "no-such-pod", "--command", "true"]) == remote.ERROR_EXIT_CODE
    assert_one_clean_error_line(capfd.readouterr().err, "'no-such-pod' is neither a remembered instance")


# ---------------------------------------------------------------------------------------------
# Provisioning through the RunPod stand-in


def provision_args(sshd: LocalSshd, fake: FakeRunPod, tmp_path: Path, *more: str) -> list[str]:
    tree = make_tree(tmp_path / "tree", {"hello.txt": "hi\n"})
    return ["remote", "--api-url", fake.url, "--ssh-key", str(sshd.key_path), "--local-dir", str(tree),
            "--remote-dir", str(tmp_path / "remote"), "--no-bootstrap",
            "--poll-interval-s", POLL_S, "--wait-timeout-s", "5", *more]  # fmt: skip


def remembered(tmp_path: Path) -> dict:
    path = tmp_path / "config" / "jax-gpt2" / "remote.json"
    return json.loads(path.read_text())["instances"] if path.exists() else {}


def skip_unless_root(sshd: LocalSshd) -> None:
    if sshd.user != "root":
        pytest.skip("RunPod pods log in as root; the local sshd only lets this user in")


def test_provisioning_creates_polls_runs_and_terminates(sshd, runpod, tmp_path, capfd, monkeypatch):
    skip_unless_root(sshd)
    monkeypatch.setenv("RUNPOD_API_KEY", API_KEY)
    assert main(provision_args(sshd, runpod, tmp_path, "--command", "cat hello.txt", "--terminate")) == 0
    out, err = capfd.readouterr()
    assert [(method, path) for method, path, _, _ in runpod.requests] == [
        ("POST", "/v1/pods"), ("GET", "/v1/pods/pod-123"), ("GET", "/v1/pods/pod-123"), ("DELETE", "/v1/pods/pod-123"),
    ]  # fmt: skip
    assert {auth for _, _, auth, _ in runpod.requests} == {f"Bearer {API_KEY}"}
    assert "hi" in out
    assert API_KEY not in out + err
    assert remembered(tmp_path) == {}  # Terminated, so forgotten.


def test_create_request_has_runpods_v1_shape(sshd, runpod, tmp_path, monkeypatch):
    skip_unless_root(sshd)
    monkeypatch.setenv("RUNPOD_API_KEY", API_KEY)
    args = provision_args(
        sshd,
        runpod,
        tmp_path,
        "--command",
        "true",
        "--terminate",
        "--name",
        "box",
        "--gpu-type",
        "NVIDIA H100 80GB HBM3",
    )
    assert main(args) == 0
    body = runpod.requests[0][3]
    assert body["name"] == "box"
    assert body["gpuTypeIds"] == ["NVIDIA H100 80GB HBM3"]
    assert body["gpuCount"] == 1
    assert body["ports"] == ["22/tcp"]
    assert body["imageName"] == remote.DEFAULT_IMAGE
    assert body["env"]["PUBLIC_KEY"] == Path(f"{sshd.key_path}.pub").read_text().strip()


def test_provisioning_remembers_the_name_for_use_existing(sshd, runpod, tmp_path, capfd, monkeypatch):
    skip_unless_root(sshd)
    monkeypatch.setenv("RUNPOD_API_KEY", API_KEY)
    assert main(provision_args(sshd, runpod, tmp_path, "--command", "true", "--name", "gpu-box")) == 0
    assert remembered(tmp_path)["gpu-box"] == {
        "provider": "runpod",
        "pod_id": "pod-123",
        "address": f"root@127.0.0.1:{sshd.port}",
    }
    assert "--use-existing gpu-box" in capfd.readouterr().err
    assert "DELETE" not in [method for method, _, _, _ in runpod.requests]

    monkeypatch.delenv("RUNPOD_API_KEY")  # Iterating needs no API at all.
    requests_so_far = len(runpod.requests)
    iterate = ["remote", "--use-existing", "gpu-box", "--ssh-key", str(sshd.key_path), "--no-bootstrap",
               "--local-dir", str(tmp_path / "tree"), "--remote-dir", str(tmp_path / "remote"),
               "--command", "echo again"]  # fmt: skip
    assert main(iterate) == 0
    assert "again" in capfd.readouterr().out
    assert len(runpod.requests) == requests_so_far

    monkeypatch.setenv("RUNPOD_API_KEY", API_KEY)
    assert main([*iterate, "--terminate", "--api-url", runpod.url]) == 0
    assert runpod.requests[-1][:2] == ("DELETE", "/v1/pods/pod-123")
    assert remembered(tmp_path) == {}


def test_pod_is_terminated_when_the_remote_command_fails(sshd, runpod, tmp_path, monkeypatch):
    skip_unless_root(sshd)
    monkeypatch.setenv("RUNPOD_API_KEY", API_KEY)
    assert main(provision_args(sshd, runpod, tmp_path, "--command", "exit 7", "--terminate")) == 7
    assert runpod.requests[-1][:2] == ("DELETE", "/v1/pods/pod-123")


def test_pod_is_terminated_on_ctrl_c(sshd, runpod, tmp_path, monkeypatch, capfd):
    skip_unless_root(sshd)
    monkeypatch.setenv("RUNPOD_API_KEY", API_KEY)

    monkeypatch.setattr(remote, "run_remote_commands", press_ctrl_c)
    assert main(provision_args(sshd, runpod, tmp_path, "--command", "true", "--terminate")) == 130
    assert runpod.requests[-1][:2] == ("DELETE", "/v1/pods/pod-123")
    assert "interrupted" in capfd.readouterr().err


def test_pod_is_terminated_on_ctrl_c_while_waiting_for_it(runpod_without_sshd, tmp_path, capfd, monkeypatch):
    monkeypatch.setenv("RUNPOD_API_KEY", API_KEY)
    key = unused_key_pair(tmp_path)

    monkeypatch.setattr(remote, "wait_for_ssh", press_ctrl_c)
    args = ["remote", "--api-url", runpod_without_sshd.url, "--ssh-key", str(key), "--poll-interval-s", POLL_S]
    assert main(args) == 130
    assert runpod_without_sshd.requests[-1][:2] == ("DELETE", "/v1/pods/pod-123")
    assert remembered(tmp_path) == {}


def test_pod_that_never_gets_an_address_times_out_and_is_deleted(runpod_without_sshd, tmp_path, capfd, monkeypatch):
    monkeypatch.setenv("RUNPOD_API_KEY", API_KEY)
    runpod_without_sshd.starting_polls = 10**6
    key = unused_key_pair(tmp_path)
    args = ["remote", "--api-url", runpod_without_sshd.url, "--ssh-key", str(key),
            "--poll-interval-s", POLL_S, "--wait-timeout-s", "0.3", "--command", "true"]  # fmt: skip
    started = time.monotonic()
    assert main(args) == remote.ERROR_EXIT_CODE
    assert time.monotonic() - started < 5
    out, err = capfd.readouterr()
    assert_one_clean_error_line(err, "pod pod-123 had no public SSH address within 0.3 s")
    assert runpod_without_sshd.requests[-1][:2] == ("DELETE", "/v1/pods/pod-123")
    assert API_KEY not in out + err
    assert remembered(tmp_path) == {}


@pytest.mark.parametrize(("status", "expected"), [
    (401, "RunPod refused the API key (HTTP 401 on POST /pods): check RUNPOD_API_KEY"),
    (500, "RunPod API error: HTTP 500 on POST /pods"),
])  # fmt: skip
def test_api_errors_are_one_line_without_the_key(runpod_without_sshd, tmp_path, capfd, monkeypatch, status, expected):
    monkeypatch.setenv("RUNPOD_API_KEY", API_KEY)
    runpod_without_sshd.fail_status = status
    key = unused_key_pair(tmp_path)
    assert main(["remote", "--api-url", runpod_without_sshd.url, "--ssh-key", str(key)]) == remote.ERROR_EXIT_CODE
    out, err = capfd.readouterr()
    assert_one_clean_error_line(err, expected)
    assert API_KEY not in out + err  # Even though the server echoed it back.
    assert runpod_without_sshd.requests[0][2] == f"Bearer {API_KEY}"


def test_unreachable_api_is_one_line(tmp_path, capfd, monkeypatch):
    monkeypatch.setenv("RUNPOD_API_KEY", API_KEY)
    key = unused_key_pair(tmp_path)
    closed = f"http://127.0.0.1:{free_loopback_port()}/v1"
    assert main(["remote", "--api-url", closed, "--ssh-key", str(key)]) == remote.ERROR_EXIT_CODE
    out, err = capfd.readouterr()
    assert_one_clean_error_line(err, f"cannot reach the RunPod API at {closed}")
    assert API_KEY not in out + err


def test_missing_api_key_is_one_line_and_sends_nothing(runpod_without_sshd, capfd):
    assert main(["remote", "--api-url", runpod_without_sshd.url]) == remote.ERROR_EXIT_CODE
    assert_one_clean_error_line(capfd.readouterr().err, "RUNPOD_API_KEY is not set")
    assert runpod_without_sshd.requests == []


def test_provisioning_refuses_a_name_already_recorded(runpod_without_sshd, tmp_path, capfd, monkeypatch):
    monkeypatch.setenv("RUNPOD_API_KEY", API_KEY)
    target = remote.SshTarget(user="root", host="203.0.113.7", port=22022)
    remote.remember_instance(remote.state_path(), "busy", "pod-old", target)
    assert main(["remote", "--api-url", runpod_without_sshd.url, "--name", "busy"]) == remote.ERROR_EXIT_CODE
    assert_one_clean_error_line(capfd.readouterr().err, "an instance named 'busy' is already recorded (pod pod-old)")
    assert runpod_without_sshd.requests == []


# ---------------------------------------------------------------------------------------------
# Dry run


def test_dry_run_prints_every_action_and_does_none(runpod_without_sshd, tmp_path, capfd, monkeypatch):
    monkeypatch.setenv("RUNPOD_API_KEY", API_KEY)
    key = unused_key_pair(tmp_path)
    monkeypatch.setenv("RUNPOD_API_URL", runpod_without_sshd.url)
    args = ["remote", "--dry-run", "--terminate", "--ssh-key", str(key), "--remote-dir", str(tmp_path / "remote")]
    assert main(args) == 0
    out, err = capfd.readouterr()
    actions = [
        line.removeprefix("[dry-run] ").split()[0]
        for line in out.splitlines()
        if line.startswith("[dry-run] ") and not line.startswith("[dry-run]   ")
    ]
    assert actions == ["POST", "GET", "ssh", "record", "ssh", "rsync", "ssh", "ssh", "DELETE", "remove"]
    assert "uv run --extra cuda pytest" in out
    assert f"POST {runpod_without_sshd.url}/pods  (Authorization: Bearer <redacted>)" in out
    assert API_KEY not in out + err
    assert runpod_without_sshd.requests == []
    assert not (tmp_path / "remote").exists()
    assert not (tmp_path / "config").exists()


def test_dry_run_on_an_existing_host_contacts_nothing(tmp_path, capfd):
    closed = f"root@127.0.0.1:{free_loopback_port()}"  # A real attempt would fail to connect.
    assert main(["remote", "--dry-run", "--use-existing", closed, "--command", "nvidia-smi"]) == 0
    out, _ = capfd.readouterr()
    assert out.count("[dry-run] ssh ") == 3  # prepare, bootstrap, run
    assert out.count("[dry-run] rsync ") == 1
    assert "nvidia-smi" in out


def test_dry_run_lines_are_the_commands_a_run_executes(sshd, tmp_path, capfd):
    """Run the printed ssh and rsync lines by hand: they sync the tree and run the command."""
    tree = make_tree(tmp_path / "tree", {"hello.txt": "hello from the plan\n"})
    args = remote_args(sshd, tmp_path / "remote", tree, "--no-bootstrap", "--command", "cat hello.txt")
    assert main([*args, "--dry-run"]) == 0
    # An entry may span terminal lines (the run script's quoted newline): split on the prefix.
    lines = [entry.rstrip("\n") for entry in capfd.readouterr().out.split("[dry-run] ")[1:]]
    assert [line.split()[0] for line in lines] == ["ssh", "rsync", "ssh"]  # prepare, sync, run
    assert not (tmp_path / "remote").exists()
    results = [subprocess.run(shlex.split(line), capture_output=True, text=True, timeout=60) for line in lines]
    assert [result.returncode for result in results] == [0, 0, 0]
    assert (tmp_path / "remote" / "hello.txt").read_text() == "hello from the plan\n"
    assert results[-1].stdout == "hello from the plan\n"


def test_missing_local_dir_is_refused_before_anything_is_contacted(tmp_path, capfd):
    closed = f"root@127.0.0.1:{free_loopback_port()}"  # Contacting it would fail differently.
    args = ["remote", "--use-existing", closed, "--local-dir", str(tmp_path / "nowhere"), "--command", "true"]
    assert main(args) == remote.ERROR_EXIT_CODE
    assert_one_clean_error_line(capfd.readouterr().err, f"local directory to sync does not exist: {tmp_path}")


def test_plan_with_both_an_address_and_a_new_pod_is_refused(tmp_path):
    ssh = remote.SshSettings(key_path=None, known_hosts_path=str(tmp_path / "known_hosts"), connect_timeout_s=5)
    workload = remote.Workload(local_dir=".", remote_dir="r", remote_uv="uv", commands=("true",), bootstrap=False)
    spec = remote.PodSpec(name="box", gpu_type="g", image="i", container_disk_gb=1, public_key="ssh-ed25519 AAAA")
    settings = remote.RunPodSettings(api_url="http://x", api_key=API_KEY, poll_interval_s=1.0, wait_timeout_s=1.0)
    with pytest.raises(AssertionError, match="either an existing target or a new pod"):
        remote.RemotePlan(
            ssh=ssh, workload=workload, remote_tty=False, target=remote.SshTarget("root", "1.2.3.4", 22),
            new_pod=spec, pod_id=None, runpod=settings, terminate=False, instance_name="box",
            state_path=tmp_path / "remote.json",
        )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Small pieces


@pytest.mark.parametrize(("text", "expected"), [
    ("root@1.2.3.4:22022", remote.SshTarget("root", "1.2.3.4", 22022)),
    ("me@gpu.example.org", remote.SshTarget("me", "gpu.example.org", 22)),
])  # fmt: skip
def test_ssh_address_parses_user_host_and_port(text, expected):
    assert remote.parse_ssh_address(text) == expected


@pytest.mark.parametrize(
    "text", ["1.2.3.4:22", "@host:22", "root@:22", "root@host:0", "root@host:99999", "root@host:ssh"]
)
def test_bad_ssh_addresses_are_rejected(text):
    with pytest.raises(remote.RemoteError, match="user@host:port"):
        remote.parse_ssh_address(text)


def test_runpod_settings_repr_hides_the_key():
    settings = remote.RunPodSettings(api_url="http://x", api_key=API_KEY, poll_interval_s=1.0, wait_timeout_s=1.0)
    assert API_KEY not in repr(settings)


def test_remote_modules_import_only_the_standard_library_and_each_other():
    """No model code (jax, numpy, ...) anywhere in the runner, not even inside a function."""
    siblings = {"jax_gpt2.tools.runpod", "jax_gpt2.tools.ssh"}
    for name in ("remote", "runpod", "ssh"):
        tree = ast.parse((Path(remote.__file__).parent / f"{name}.py").read_text())
        imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        imported |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        others = {module for module in imported - siblings if module.split(".")[0] not in sys.stdlib_module_names}
        assert others == set(), (name, others)
