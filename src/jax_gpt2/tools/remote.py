"""`jax-gpt2 remote`: check the JAX backend on a GPU from a machine that has none.

Two ways in:
  * `--use-existing user@host:port` (or a NAME remembered from an earlier provisioning) uses a
    machine you already have;
  * without it, a GPU pod is rented through RunPod's REST API, waited for, and remembered under
    `--name`, so the next run is `--use-existing NAME` (sync + test, about 30 s).

Each run syncs the working tree with rsync over ssh (respecting .gitignore), bootstraps the
remote once (uv + `uv sync --extra cuda`, remembered by a marker file there), runs the commands
with their output streamed, and exits with the remote exit code.

A run is decided first, as one `RemotePlan` built from the options and the state file (nothing
contacted, nothing changed); `--dry-run` prints that plan, a normal run executes it.

This module imports no model code on purpose: it must run (and `--dry-run` must print) on a
laptop where JAX or CUDA would not even import. Standard library only, and nothing from
jax_gpt2 either, so moving the file changes only the line that imports it in cli.py.
"""

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

RUNPOD_API_URL = "https://rest.runpod.io/v1"
DEFAULT_GPU_TYPE = "NVIDIA GeForce RTX 4090"
DEFAULT_IMAGE = "runpod/pytorch:2.4.0-py3.11-cuda12.4.1-devel-ubuntu22.04"
DEFAULT_POD_NAME = "jax-gpt2"
DEFAULT_CONTAINER_DISK_GB = 40
# Relative remote paths resolve against the remote user's home, for ssh and rsync alike.
DEFAULT_REMOTE_DIR = "jax-gpt2"
POD_SSH_USER = "root"  # RunPod's images log in as root.
BOOTSTRAP_MARKER = ".jax-gpt2-bootstrapped"
HTTP_TIMEOUT_S = 30
ERROR_EXIT_CODE = 2
SSH_FAILED_EXIT_CODE = 255  # ssh's own code for "could not connect or log in".
REDACTED = "<redacted>"

# What a plain `jax-gpt2 remote` runs, in order, stopping at the first failure. `--extra cuda`
# keeps uv's implicit sync from ever settling on the CPU-only environment.
DEFAULT_STEPS = (
    "uv run --extra cuda pytest",
    "uv run --extra cuda jax-gpt2 compare",
    "uv run --extra cuda jax-gpt2 bench",
)


class RemoteError(Exception):
    """A failure whose message is the whole story: printed as one line, no traceback."""


@dataclass(frozen=True)
class SshTarget:
    """Where to log in: `user@host:port`."""

    user: str
    host: str
    port: int


@dataclass(frozen=True)
class SshSettings:
    """How every ssh and rsync call of a run logs in, without ever stopping to ask."""

    key_path: str | None
    known_hosts_path: str
    connect_timeout_s: int


@dataclass(frozen=True)
class RunPodSettings:
    """How to reach RunPod's REST API and how long to wait for a pod."""

    api_url: str
    api_key: str = field(repr=False)  # A secret: never in a repr, a log line or an error.
    poll_interval_s: float
    wait_timeout_s: float


@dataclass(frozen=True)
class PodSpec:
    """What to rent: the fields of RunPod's create-pod request that this tool sets."""

    name: str
    gpu_type: str
    image: str
    container_disk_gb: int
    public_key: str


# ---------------------------------------------------------------------------------------------
# Addresses and progress


def parse_ssh_address(text: str) -> SshTarget:
    """`user@host[:port]` -> SshTarget; port 22 when absent."""
    assert isinstance(text, str)
    user, at_sign, host_port = text.rpartition("@")
    if not at_sign or not user or not host_port:
        raise RemoteError(f"expected an address like user@host:port, got {text!r}")
    host, colon, port_text = host_port.rpartition(":")
    if not colon:
        host, port_text = host_port, "22"
    if not host or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise RemoteError(f"expected an address like user@host:port with port in 1..65535, got {text!r}")
    target = SshTarget(user=user, host=host, port=int(port_text))
    assert target.user
    assert target.host
    return target


def format_ssh_address(target: SshTarget) -> str:
    assert target.user
    assert 1 <= target.port <= 65535
    return f"{target.user}@{target.host}:{target.port}"


def redact(text: str, secret: str) -> str:
    """Belt and braces: whatever a server echoes back, the secret never reaches the terminal."""
    assert isinstance(text, str)
    assert isinstance(secret, str)
    return text.replace(secret, REDACTED) if secret else text


def say(message: str) -> None:
    """Progress for the person at the terminal; stderr, so stdout stays the remote's output."""
    assert message
    assert "\n" not in message
    print(f"jax-gpt2 remote: {message}", file=sys.stderr, flush=True)


def last_line(text: str) -> str:
    """The last non-empty line of a tool's stderr: the one that usually says what went wrong."""
    assert isinstance(text, str)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    summary = lines[-1] if lines else "no error output"
    assert "\n" not in summary
    return summary


# ---------------------------------------------------------------------------------------------
# ssh and rsync command lines


def ssh_option_args(settings: SshSettings, port: int) -> list[str]:
    """Options shared by ssh and by rsync's `-e ssh ...`, for unattended use."""
    assert 1 <= port <= 65535
    assert settings.connect_timeout_s >= 1
    args = [
        "-p", str(port),
        "-o", "BatchMode=yes",  # Fail instead of prompting for a password or passphrase.
        # A new pod is trusted on first sight; a host whose key later changes is refused.
        "-o", "StrictHostKeyChecking=accept-new",
        # Quoted: ssh reads this option as a list of files separated by spaces.
        "-o", f'UserKnownHostsFile="{settings.known_hosts_path}"',
        "-o", f"ConnectTimeout={settings.connect_timeout_s}",
        # Notice a pod that died mid-run within a minute instead of hanging forever.
        "-o", "ServerAliveInterval=15",
        "-o", "ServerAliveCountMax=4",
    ]  # fmt: skip
    if settings.key_path is not None:
        args += ["-i", settings.key_path, "-o", "IdentitiesOnly=yes"]
    return args


def ssh_argv(settings: SshSettings, target: SshTarget, remote_script: str) -> tuple[str, ...]:
    assert remote_script
    argv = ("ssh", *ssh_option_args(settings, target.port), f"{target.user}@{target.host}", remote_script)
    assert argv[-1] == remote_script
    return argv


def rsync_argv(settings: SshSettings, target: SshTarget, local_dir: str, remote_dir: str) -> tuple[str, ...]:
    """Mirror local_dir into remote_dir, minus what git ignores; itemized, so you see what went."""
    assert local_dir
    assert remote_dir
    remote_shell = shlex.join(["ssh", *ssh_option_args(settings, target.port)])
    argv = (
        "rsync", "--archive", "--compress", "--itemize-changes",
        # Mirror deletions too, but excluded paths (the remote's .venv, the marker) are protected.
        "--delete",
        "--exclude=/.git", "--exclude=/.venv", f"--exclude=/{BOOTSTRAP_MARKER}",
        "--filter=:- .gitignore",  # Each directory's .gitignore, read as rsync exclude rules.
        "-e", remote_shell,
        local_dir.rstrip("/") + "/",  # Trailing slash: sync the contents, not the directory.
        f"{target.user}@{target.host}:{remote_dir.rstrip('/')}/",
    )  # fmt: skip
    assert argv[0] == "rsync"
    return argv


# ---------------------------------------------------------------------------------------------
# Scripts run on the remote


def remote_path_setup(remote_dir: str) -> str:
    """cd into the tree; find uv where its installer puts it even when no profile added it."""
    assert remote_dir
    setup = f'cd {shlex.quote(remote_dir)} && export PATH="$PATH:$HOME/.local/bin"'
    assert setup.startswith("cd ")
    return setup


def prepare_script(remote_dir: str) -> str:
    """Create the remote tree and make sure rsync exists there (fresh pods may lack it)."""
    assert remote_dir
    install_rsync = (
        "{ echo 'installing rsync' >&2; apt-get update -qq >/dev/null && apt-get install -y -qq rsync >/dev/null; }"
    )
    script = f"mkdir -p {shlex.quote(remote_dir)} && {{ command -v rsync >/dev/null 2>&1 || {install_rsync}; }}"
    assert "mkdir -p" in script
    return script


def bootstrap_script(remote_dir: str, remote_uv: str) -> str:
    """Install uv if missing and sync the CUDA environment, once: the marker says it was done."""
    assert remote_dir
    assert remote_uv
    marker = shlex.quote(BOOTSTRAP_MARKER)
    uv = shlex.quote(remote_uv)
    already_done = f"echo 'bootstrap already done (remove {BOOTSTRAP_MARKER} to redo)' >&2"
    install_uv = "echo 'installing uv' >&2; curl -LsSf https://astral.sh/uv/install.sh | sh"
    script = "; ".join([
        "set -e",
        remote_path_setup(remote_dir),
        f"if [ -f {marker} ]; then {already_done}; exit 0; fi",
        f"if ! command -v {uv} >/dev/null 2>&1; then {install_uv}; fi",
        f"{uv} sync --extra cuda",
        f"touch {marker}",  # Last, so a failed sync is retried on the next run.
    ])  # fmt: skip
    return script


def run_script(remote_dir: str, commands: tuple[str, ...]) -> str:
    """Run commands in order in the synced tree; the first failure's exit code is the result."""
    assert commands
    assert all(command.strip() for command in commands)
    # The newline before ")" keeps a trailing `# comment` in a command from swallowing it.
    steps = [f"echo {shlex.quote('>>> ' + command)} >&2 && ( {command}\n)" for command in commands]
    return " && ".join([remote_path_setup(remote_dir), *steps])


def default_commands(remote_uv: str) -> tuple[str, ...]:
    assert remote_uv
    commands = tuple(shlex.quote(remote_uv) + step.removeprefix("uv") for step in DEFAULT_STEPS)
    assert len(commands) == len(DEFAULT_STEPS)
    return commands


# ---------------------------------------------------------------------------------------------
# Running ssh and rsync


def run_streaming(argv: tuple[str, ...]) -> int:
    """Run a local command with its output going straight to ours; the exit code comes back."""
    assert argv
    assert argv[0] in ("ssh", "rsync")
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        exit_code = subprocess.run(argv, check=False).returncode
    except FileNotFoundError:
        raise RemoteError(
            f"`{argv[0]}` is not installed here; install it (e.g. apt-get install -y {argv[0]})"
        ) from None
    # Killed by a signal: report it the way a shell would (128 + signal number).
    return exit_code if exit_code >= 0 else 128 - exit_code


def run_captured(argv: tuple[str, ...]) -> subprocess.CompletedProcess:
    """Run a short local command whose output we only read when it fails."""
    assert argv
    assert argv[0] == "ssh"
    try:
        return subprocess.run(argv, check=False, capture_output=True, text=True)
    except FileNotFoundError:
        raise RemoteError("`ssh` is not installed here; install an OpenSSH client") from None


def prepare_remote(argv: tuple[str, ...], target: SshTarget, remote_dir: str) -> None:
    """The first login of a session: proves the host answers, then creates the tree and rsync."""
    assert argv[0] == "ssh"
    assert remote_dir
    result = run_captured(argv)
    address = format_ssh_address(target)
    if result.returncode == SSH_FAILED_EXIT_CODE:
        raise RemoteError(f"cannot reach {address} over SSH: {last_line(result.stderr)}")
    if result.returncode != 0:
        raise RemoteError(f"preparing {remote_dir} on {address} failed: {last_line(result.stderr)}")


def sync_tree(argv: tuple[str, ...], target: SshTarget, local_dir: str, remote_dir: str) -> None:
    assert argv[0] == "rsync"
    assert local_dir
    say(f"syncing {local_dir} -> {format_ssh_address(target)}:{remote_dir}")
    exit_code = run_streaming(argv)
    if exit_code != 0:
        raise RemoteError(f"rsync to {format_ssh_address(target)} failed with exit code {exit_code}")


def bootstrap_remote(argv: tuple[str, ...], target: SshTarget) -> None:
    assert argv[0] == "ssh"
    assert target.host
    exit_code = run_streaming(argv)
    if exit_code != 0:
        raise RemoteError(
            f"bootstrap on {format_ssh_address(target)} failed with exit code {exit_code} (its output is above)"
        )


def run_remote_commands(argv: tuple[str, ...]) -> int:
    assert argv[0] == "ssh"
    assert len(argv) >= 3
    exit_code = run_streaming(argv)
    if exit_code == SSH_FAILED_EXIT_CODE:
        say(f"exit code {exit_code}: the SSH connection failed, or the command itself exited {exit_code}")
    assert 0 <= exit_code <= 255
    return exit_code


def wait_for_ssh(settings: SshSettings, target: SshTarget, timeout_s: float, poll_interval_s: float) -> None:
    """A RUNNING pod still needs a few seconds before its sshd answers: retry, bounded."""
    assert timeout_s > 0
    assert poll_interval_s > 0
    probe = ssh_argv(settings, target, "true")
    address = format_ssh_address(target)
    started = time.monotonic()
    max_attempts = int(timeout_s / poll_interval_s) + 2
    for attempt in range(1, max_attempts + 1):
        result = run_captured(probe)
        if result.returncode == 0:
            return
        elapsed = time.monotonic() - started
        if elapsed >= timeout_s or attempt == max_attempts:
            raise RemoteError(f"SSH on {address} did not answer within {timeout_s:g} s: {last_line(result.stderr)}")
        say(f"waiting for SSH on {address} ({elapsed:.0f} s of {timeout_s:g} s)")
        time.sleep(min(poll_interval_s, timeout_s - elapsed))
    raise AssertionError("unreachable: the loop returns or raises")


# ---------------------------------------------------------------------------------------------
# RunPod REST API (v1)


def describe_http_error(method: str, path: str, status: int, body: str, api_key: str) -> str:
    assert method
    assert 100 <= status <= 599
    if status in (401, 403):
        return f"RunPod refused the API key (HTTP {status} on {method} {path}): check RUNPOD_API_KEY"
    detail = " ".join(redact(body, api_key).split())[:200] or "no details"
    return f"RunPod API error: HTTP {status} on {method} {path}: {detail}"


def runpod_request(settings: RunPodSettings, method: str, path: str, body: dict | None) -> dict:
    """One authenticated JSON request; any failure becomes a RemoteError without the key in it."""
    assert method in ("GET", "POST", "DELETE")
    assert path.startswith("/")
    url = settings.api_url.rstrip("/") + path
    data = None if body is None else json.dumps(body).encode("utf-8")
    headers = {"Authorization": f"Bearer {settings.api_key}", "Accept": "application/json"}
    if data is not None:
        headers["Content-Type"] = "application/json"
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S) as response:
            text = response.read().decode("utf-8", errors="replace")
    except urllib.error.HTTPError as error:
        error_body = error.read().decode("utf-8", errors="replace")
        raise RemoteError(describe_http_error(method, path, error.code, error_body, settings.api_key)) from None
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise RemoteError(
            f"cannot reach the RunPod API at {settings.api_url}: {redact(str(reason), settings.api_key)}"
        ) from None
    try:
        answer = json.loads(text) if text.strip() else {}
    except json.JSONDecodeError:
        answer = None
    if not isinstance(answer, dict):
        raise RemoteError(f"RunPod API answered {method} {path} with something that is not a JSON object")
    return answer


def describe_request(settings: RunPodSettings, method: str, path: str, body: dict | None) -> list[str]:
    """How a dry run shows one API request: the key is never shown, only that one is sent."""
    assert method in ("GET", "POST", "DELETE")
    assert path.startswith("/")
    lines = [f"{method} {settings.api_url.rstrip('/')}{path}  (Authorization: Bearer {REDACTED})"]
    if body is not None:
        lines.append(f"  body: {json.dumps(body, sort_keys=True)}")
    return lines


def create_pod_body(spec: PodSpec) -> dict:
    assert spec.name
    assert spec.container_disk_gb >= 1
    return {
        "name": spec.name,
        "imageName": spec.image,
        "gpuTypeIds": [spec.gpu_type],
        "gpuCount": 1,
        "containerDiskInGb": spec.container_disk_gb,
        "ports": ["22/tcp"],
        "supportPublicIp": True,  # SSH needs a public IP, not RunPod's HTTP proxy.
        "env": {"PUBLIC_KEY": spec.public_key},  # RunPod's images install this as authorized key.
    }


def create_pod(settings: RunPodSettings, spec: PodSpec) -> str:
    """POST /pods; returns the new pod's id."""
    assert spec.public_key
    assert spec.gpu_type
    pod = runpod_request(settings, "POST", "/pods", create_pod_body(spec))
    pod_id = pod.get("id")
    if not isinstance(pod_id, str) or not pod_id:
        raise RemoteError("RunPod API created a pod but its answer has no pod id")
    return pod_id


def terminate_pod(settings: RunPodSettings, pod_id: str) -> None:
    assert pod_id
    assert settings.api_url
    say(f"terminating pod {pod_id}")
    runpod_request(settings, "DELETE", f"/pods/{pod_id}", None)


def pod_ssh_target(pod: dict) -> SshTarget | None:
    """The pod's public SSH address once it is running and mapped; None while it is starting."""
    assert isinstance(pod, dict)
    status = pod.get("desiredStatus")
    if status in ("EXITED", "TERMINATED"):
        raise RemoteError(f"pod {pod.get('id')} stopped while starting (desiredStatus {status})")
    public_ip = pod.get("publicIp")
    ssh_port = (pod.get("portMappings") or {}).get("22")
    if status != "RUNNING" or not public_ip or not ssh_port:
        return None
    target = SshTarget(user=POD_SSH_USER, host=str(public_ip), port=int(ssh_port))
    assert 1 <= target.port <= 65535
    return target


def wait_for_pod(settings: RunPodSettings, pod_id: str) -> SshTarget:
    """Poll GET /pods/{id} until it has an SSH address, at most wait_timeout_s."""
    assert pod_id
    assert settings.poll_interval_s > 0
    started = time.monotonic()
    max_polls = int(settings.wait_timeout_s / settings.poll_interval_s) + 2
    for _ in range(max_polls):
        pod = runpod_request(settings, "GET", f"/pods/{pod_id}", None)
        target = pod_ssh_target(pod)
        if target is not None:
            return target
        elapsed = time.monotonic() - started
        if elapsed >= settings.wait_timeout_s:
            break
        status = pod.get("desiredStatus", "unknown")
        say(f"waiting for pod {pod_id}: {status} ({elapsed:.0f} s of {settings.wait_timeout_s:g} s)")
        time.sleep(min(settings.poll_interval_s, settings.wait_timeout_s - elapsed))
    raise RemoteError(f"pod {pod_id} had no public SSH address within {settings.wait_timeout_s:g} s")


# ---------------------------------------------------------------------------------------------
# Provisioning


def forget_stale_host_key(settings: SshSettings, target: SshTarget) -> None:
    """RunPod reuses public IP:port pairs, so a new pod would be refused as a changed host."""
    assert target.host
    assert settings.known_hosts_path
    if not Path(settings.known_hosts_path).is_file():
        return
    host_pattern = target.host if target.port == 22 else f"[{target.host}]:{target.port}"
    try:
        subprocess.run(
            ["ssh-keygen", "-R", host_pattern, "-f", settings.known_hosts_path], check=False, capture_output=True
        )
    except FileNotFoundError:
        say("ssh-keygen is not installed here; a stale host key for this address would make ssh refuse it")


def terminate_after_failure(settings: RunPodSettings, pod_id: str) -> None:
    """Clean-up on a path that is already failing: report a failed delete, never mask the cause."""
    assert pod_id
    assert settings.api_url
    try:
        terminate_pod(settings, pod_id)
    except RemoteError as error:
        say(f"could not terminate pod {pod_id} ({error}); delete it in the RunPod console")


def provision_pod(runpod: RunPodSettings, ssh: SshSettings, spec: PodSpec) -> tuple[str, SshTarget]:
    """Create a pod and wait until SSH answers; a pod that never gets there is deleted again."""
    assert spec.name
    assert runpod.wait_timeout_s > 0
    pod_id = create_pod(runpod, spec)
    say(f"created pod {pod_id} ({spec.gpu_type}); waiting for it to start")
    try:
        target = wait_for_pod(runpod, pod_id)
        forget_stale_host_key(ssh, target)
        wait_for_ssh(ssh, target, runpod.wait_timeout_s, runpod.poll_interval_s)
    except BaseException:  # Ctrl-C included: an unreachable pod is only a bill.
        say(f"pod {pod_id} did not become reachable; terminating it")
        terminate_after_failure(runpod, pod_id)
        raise
    assert target.port >= 1
    return pod_id, target


def read_public_key(key_path: str | None) -> str:
    """The public half of the login key, which the pod installs as its authorized key."""
    home_ssh = Path.home() / ".ssh"
    candidates = [Path(key_path + ".pub")] if key_path else [home_ssh / "id_ed25519.pub", home_ssh / "id_rsa.pub"]
    assert candidates
    for candidate in candidates:
        public_key = candidate.read_text().strip() if candidate.is_file() else ""
        if public_key:
            assert public_key == public_key.strip()
            return public_key
    tried = ", ".join(str(candidate) for candidate in candidates)
    raise RemoteError(f"no SSH public key found (tried {tried}); pass --ssh-key PATH with PATH.pub beside it")


# ---------------------------------------------------------------------------------------------
# Remembered instances: a small JSON file in the user's config dir


def config_dir() -> Path:
    """$XDG_CONFIG_HOME/jax-gpt2, defaulting to ~/.config/jax-gpt2 as the XDG spec says."""
    config_home = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    assert config_home
    directory = Path(config_home) / "jax-gpt2"
    assert directory.name == "jax-gpt2"
    return directory


def state_path() -> Path:
    path = config_dir() / "remote.json"
    assert path.suffix == ".json"
    assert path.parent.name == "jax-gpt2"
    return path


def load_instances(path: Path) -> dict[str, dict]:
    """name -> {"provider", "pod_id", "address"}; empty when nothing was provisioned yet."""
    assert path.suffix == ".json"
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise RemoteError(f"cannot read the remote state file {path}: {error}") from None
    instances = data.get("instances") if isinstance(data, dict) else None
    if not isinstance(instances, dict):
        raise RemoteError(f"{path} is not a jax-gpt2 remote state file; move it aside")
    assert all(isinstance(name, str) for name in instances)
    return instances


def save_instances(path: Path, instances: dict[str, dict]) -> None:
    assert path.suffix == ".json"
    assert isinstance(instances, dict)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps({"version": 1, "instances": instances}, indent=2, sort_keys=True) + "\n")
    os.replace(temporary, path)  # Atomic: an interrupted write never leaves half a file.


def instance_record(pod_id: str, target: SshTarget) -> dict:
    """What the state file keeps about one provisioned pod."""
    assert pod_id
    assert target.host
    return {"provider": "runpod", "pod_id": pod_id, "address": format_ssh_address(target)}


def remember_instance(path: Path, name: str, pod_id: str, target: SshTarget) -> None:
    assert name
    assert pod_id
    instances = load_instances(path)
    instances[name] = instance_record(pod_id, target)
    save_instances(path, instances)


def forget_instance(path: Path, name: str) -> None:
    assert name
    assert path.suffix == ".json"
    instances = load_instances(path)
    if instances.pop(name, None) is not None:
        save_instances(path, instances)


def resolve_existing(path: Path, name_or_address: str) -> tuple[SshTarget, str | None]:
    """A remembered NAME (with its pod id) wins; otherwise a plain user@host:port (no pod id)."""
    assert path.suffix == ".json"
    if not name_or_address:
        raise RemoteError("--use-existing needs a remembered NAME or a user@host:port address")
    instances = load_instances(path)
    record = instances.get(name_or_address)
    if record is not None:
        target = parse_ssh_address(str(record.get("address", "")))
        return target, str(record["pod_id"]) if record.get("pod_id") else None
    if "@" not in name_or_address:
        known = ", ".join(sorted(instances)) or "none"
        raise RemoteError(
            f"{name_or_address!r} is neither a remembered instance (known: {known}) nor a user@host:port address"
        )
    target = parse_ssh_address(name_or_address)
    assert target.host
    return target, None


# ---------------------------------------------------------------------------------------------
# The plan: everything one run does, decided before any of it is done.
# `--dry-run` prints it (describe_plan); a normal run executes it (execute_plan). Both build their
# ssh and rsync lines with the same function, so what a dry run shows is what a run does.


@dataclass(frozen=True)
class Workload:
    """What to do once logged in."""

    local_dir: str
    remote_dir: str
    remote_uv: str
    commands: tuple[str, ...]
    bootstrap: bool


@dataclass(frozen=True)
class RemotePlan:
    """One run: maybe rent a pod, then sync, bootstrap and run on the target, maybe delete the pod.

    A pod this run creates has no address until it runs, so `target` is None then: a dry run
    shows its session on a placeholder address, a real run on the address the pod gets.
    """

    ssh: SshSettings
    workload: Workload
    remote_tty: bool  # At a terminal: `ssh -t`, so Ctrl-C stops the remote run too (and pytest has colour).
    target: SshTarget | None  # None: the pod in `new_pod`.
    new_pod: PodSpec | None  # Rent this pod first and remember it under `instance_name`.
    pod_id: str | None  # An existing pod this tool rented earlier (known from the state file).
    runpod: RunPodSettings | None  # Set when the run creates or deletes a pod.
    terminate: bool  # Delete the pod afterwards, also on failure and Ctrl-C.
    instance_name: str
    state_path: Path

    def __post_init__(self):
        assert (self.target is None) != (self.new_pod is None), "either an existing target or a new pod"
        assert self.new_pod is None or self.pod_id is None, "a new pod has no id until it is created"
        assert self.runpod is not None or (self.new_pod is None and not self.terminate), "RunPod calls need settings"
        assert not self.terminate or self.new_pod is not None or self.pod_id is not None, "terminate what?"
        assert self.workload.commands
        assert self.instance_name


@dataclass(frozen=True)
class SessionCommands:
    """The ssh and rsync command lines of one session on one host, in the order they run."""

    prepare: tuple[str, ...]  # ssh: proves the host answers, creates the tree, installs rsync.
    sync: tuple[str, ...]  # rsync: the working tree minus what git ignores.
    bootstrap: tuple[str, ...] | None  # ssh: uv and `uv sync --extra cuda`, once; None: --no-bootstrap.
    run: tuple[str, ...]  # ssh: the commands, output streamed.


# Stand-ins, in a dry run, for what only exists once the pod has been created.
PLACEHOLDER_POD_ID = "<pod-id>"
PLACEHOLDER_POD_TARGET = SshTarget(user=POD_SSH_USER, host="<pod-public-ip>", port=22)


def session_commands(plan: RemotePlan, target: SshTarget) -> SessionCommands:
    assert target.host
    assert plan.workload.remote_dir
    workload, ssh = plan.workload, plan.ssh
    bootstrap = ssh_argv(ssh, target, bootstrap_script(workload.remote_dir, workload.remote_uv))
    run = ssh_argv(ssh, target, run_script(workload.remote_dir, workload.commands))
    commands = SessionCommands(
        prepare=ssh_argv(ssh, target, prepare_script(workload.remote_dir)),
        sync=rsync_argv(ssh, target, workload.local_dir, workload.remote_dir),
        bootstrap=bootstrap if workload.bootstrap else None,
        run=(run[0], "-t", *run[1:]) if plan.remote_tty else run,
    )
    assert commands.run[-1].endswith(")")
    return commands


def describe_new_pod(plan: RemotePlan) -> list[str]:
    """The API requests, the SSH probe and the state-file record that renting a pod takes."""
    assert plan.new_pod is not None
    assert plan.runpod is not None
    runpod = plan.runpod
    probe = shlex.join(ssh_argv(plan.ssh, PLACEHOLDER_POD_TARGET, "true"))
    record = json.dumps(instance_record(PLACEHOLDER_POD_ID, PLACEHOLDER_POD_TARGET), sort_keys=True)
    return [
        *describe_request(runpod, "POST", "/pods", create_pod_body(plan.new_pod)),
        f"GET {runpod.api_url.rstrip('/')}/pods/{PLACEHOLDER_POD_ID} every {runpod.poll_interval_s:g} s until "
        f"desiredStatus is RUNNING with a publicIp and portMappings['22'] (at most {runpod.wait_timeout_s:g} s)",
        f"{probe}  (retried until it answers)",
        f"record {plan.instance_name} = {record} in {plan.state_path}",
    ]


def describe_plan(plan: RemotePlan) -> list[str]:
    """Every action of the plan in order, one entry each (a request body as an entry of its own).

    The remote script of the run step holds a newline (see run_script), quoted, so an entry may
    span two terminal lines; pasted into a shell it is still one command.
    """
    lines = describe_new_pod(plan) if plan.new_pod is not None else []
    commands = session_commands(plan, plan.target or PLACEHOLDER_POD_TARGET)
    bootstrap = [commands.bootstrap] if commands.bootstrap is not None else []
    lines += [shlex.join(argv) for argv in (commands.prepare, commands.sync, *bootstrap, commands.run)]
    if plan.terminate:
        assert plan.runpod is not None
        lines += describe_request(plan.runpod, "DELETE", f"/pods/{plan.pod_id or PLACEHOLDER_POD_ID}", None)
        lines.append(f"remove {plan.instance_name} from {plan.state_path}")
    assert lines
    assert all(line.strip() for line in lines)
    return lines


def show_plan(plan: RemotePlan) -> None:
    """--dry-run: print the plan on stdout and do nothing."""
    lines = describe_plan(plan)
    assert lines
    for line in lines:
        print(f"[dry-run] {line}", flush=True)


def run_session(plan: RemotePlan, target: SshTarget) -> int:
    """Prepare, sync, bootstrap and run on target; the remote commands' exit code comes back."""
    assert target.host
    assert plan.workload.commands
    commands = session_commands(plan, target)
    prepare_remote(commands.prepare, target, plan.workload.remote_dir)
    sync_tree(commands.sync, target, plan.workload.local_dir, plan.workload.remote_dir)
    if commands.bootstrap is not None:
        bootstrap_remote(commands.bootstrap, target)
    return run_remote_commands(commands.run)


def rent_pod(plan: RemotePlan) -> tuple[str, SshTarget]:
    """Create the plan's new pod, wait for SSH, remember it, and say how to come back to it."""
    assert plan.new_pod is not None
    assert plan.runpod is not None
    pod_id, target = provision_pod(plan.runpod, plan.ssh, plan.new_pod)
    remember_instance(plan.state_path, plan.instance_name, pod_id, target)
    say(f"pod {plan.instance_name} ({pod_id}) is up at {format_ssh_address(target)}")
    say(f"iterate with: jax-gpt2 remote --use-existing {plan.instance_name}")
    return pod_id, target


def execute_plan(plan: RemotePlan) -> int:
    """Do what describe_plan shows; the remote commands' exit code comes back."""
    Path(plan.ssh.known_hosts_path).parent.mkdir(parents=True, exist_ok=True)
    if plan.new_pod is not None:
        pod_id, target = rent_pod(plan)
    else:
        assert plan.target is not None
        pod_id, target = plan.pod_id, plan.target
    try:
        exit_code = run_session(plan, target)
    finally:
        if plan.terminate:  # Also on failure and Ctrl-C: a forgotten pod bills by the hour.
            assert plan.runpod is not None
            assert pod_id is not None
            terminate_pod(plan.runpod, pod_id)
            forget_instance(plan.state_path, plan.instance_name)
    if pod_id is not None and not plan.terminate:
        name = plan.instance_name
        say(f"pod {name} keeps running (and billing): --use-existing {name} to iterate, add --terminate to delete it")
    assert 0 <= exit_code <= 255
    return exit_code


# ---------------------------------------------------------------------------------------------
# From the command line to a plan


def ssh_settings_from_args(args: argparse.Namespace) -> SshSettings:
    key_path = args.ssh_key or os.environ.get("SSH_KEY_PATH") or None
    if key_path is not None and not Path(key_path).is_file():
        raise RemoteError(f"SSH key not found: {key_path}")
    if args.connect_timeout_s < 1:
        raise RemoteError("--connect-timeout-s must be at least 1")
    known_hosts = args.known_hosts or str(config_dir() / "known_hosts")
    settings = SshSettings(key_path=key_path, known_hosts_path=known_hosts, connect_timeout_s=args.connect_timeout_s)
    assert settings.connect_timeout_s >= 1
    assert settings.known_hosts_path
    return settings


def runpod_settings_from_args(args: argparse.Namespace) -> RunPodSettings:
    api_key = os.environ.get("RUNPOD_API_KEY", "").strip()
    if not api_key:
        raise RemoteError(
            "RUNPOD_API_KEY is not set: export your RunPod API key to provision a pod, "
            "or pass --use-existing user@host:port"
        )
    api_url = args.api_url or os.environ.get("RUNPOD_API_URL") or RUNPOD_API_URL
    if args.poll_interval_s <= 0 or args.wait_timeout_s <= 0:
        raise RemoteError("--poll-interval-s and --wait-timeout-s must be positive")
    settings = RunPodSettings(
        api_url=api_url, api_key=api_key, poll_interval_s=args.poll_interval_s, wait_timeout_s=args.wait_timeout_s
    )
    assert settings.api_key
    assert settings.api_url
    return settings


def workload_from_args(args: argparse.Namespace) -> Workload:
    commands = (args.remote_command,) if args.remote_command is not None else default_commands(args.remote_uv)
    if not all(command.strip() for command in commands):
        raise RemoteError("--command must not be empty")
    if not Path(args.local_dir).is_dir():
        raise RemoteError(f"local directory to sync does not exist: {args.local_dir}")
    workload = Workload(
        local_dir=args.local_dir,
        remote_dir=args.remote_dir,
        remote_uv=args.remote_uv,
        commands=commands,
        bootstrap=not args.no_bootstrap,
    )
    assert workload.commands
    assert workload.remote_dir
    return workload


def pod_spec_from_args(args: argparse.Namespace, ssh: SshSettings, path: Path) -> PodSpec:
    """What to rent under --name; refused when that name already stands for a pod."""
    assert path.suffix == ".json"
    if not args.name.strip():
        raise RemoteError("--name must not be empty")
    if args.container_disk_gb < 1:
        raise RemoteError("--container-disk-gb must be at least 1")
    remembered = load_instances(path).get(args.name)
    if remembered is not None:
        raise RemoteError(
            f"an instance named {args.name!r} is already recorded (pod {remembered.get('pod_id')}): "
            f"use --use-existing {args.name}, or pick another --name"
        )
    spec = PodSpec(
        name=args.name,
        gpu_type=args.gpu_type,
        image=args.image,
        container_disk_gb=args.container_disk_gb,
        public_key=read_public_key(ssh.key_path),
    )
    assert spec.public_key
    return spec


def plan_from_args(args: argparse.Namespace) -> RemotePlan:
    """Check every option and read the state file; contacts nothing and changes nothing."""
    assert args.command == "remote"
    ssh = ssh_settings_from_args(args)
    workload = workload_from_args(args)
    path = state_path()
    target, pod_id, new_pod, runpod = None, None, None, None
    if args.use_existing is None:
        runpod = runpod_settings_from_args(args)
        new_pod = pod_spec_from_args(args, ssh, path)
    else:
        target, pod_id = resolve_existing(path, args.use_existing)
        if args.terminate and pod_id is None:
            raise RemoteError("--terminate deletes pods this tool provisioned; a plain address has none")
        if args.terminate:
            runpod = runpod_settings_from_args(args)
    return RemotePlan(
        ssh=ssh,
        workload=workload,
        remote_tty=sys.stdin.isatty() and sys.stdout.isatty(),
        target=target,
        new_pod=new_pod,
        pod_id=pod_id,
        runpod=runpod,
        terminate=args.terminate,
        instance_name=args.name if args.use_existing is None else args.use_existing,
        state_path=path,
    )


def run_remote(args: argparse.Namespace) -> int:
    """The subcommand's entry point: RemoteError becomes one line on stderr, never a traceback."""
    assert args.command == "remote"
    try:
        plan = plan_from_args(args)
        if args.dry_run:
            show_plan(plan)
            return 0
        exit_code = execute_plan(plan)
    except RemoteError as error:
        print(f"jax-gpt2 remote: error: {error}", file=sys.stderr, flush=True)
        return ERROR_EXIT_CODE
    assert 0 <= exit_code <= 255
    return exit_code


# ---------------------------------------------------------------------------------------------
# Command-line options


def add_target_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("where and how to log in")
    group.add_argument(
        "--use-existing", metavar="NAME_OR_ADDRESS",
        help="a NAME from an earlier provisioning, or user@host[:port]; without it a RunPod pod is created",
    )  # fmt: skip
    group.add_argument(
        "--ssh-key", metavar="PATH", help="private key to log in with (default: $SSH_KEY_PATH, else ssh's own)"
    )
    group.add_argument(
        "--known-hosts", metavar="PATH",
        help="known_hosts file for these hosts (default: known_hosts in the jax-gpt2 config dir)",
    )  # fmt: skip
    group.add_argument("--connect-timeout-s", type=int, default=10, help="ssh ConnectTimeout (default: 10)")
    assert parser.prog
    assert group.title


def add_work_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("what to run")
    group.add_argument("--local-dir", default=".", help="working tree to sync (default: the current directory)")
    group.add_argument(
        "--remote-dir", default=DEFAULT_REMOTE_DIR,
        help=f"where the tree lands on the remote; relative to its home (default: {DEFAULT_REMOTE_DIR})",
    )  # fmt: skip
    group.add_argument(
        # dest: the CLI already uses args.command for the subcommand's name.
        "--command", dest="remote_command", metavar="SHELL_COMMAND",
        help="run this in the synced tree instead of pytest, compare and bench",
    )  # fmt: skip
    group.add_argument("--no-bootstrap", action="store_true", help="skip installing uv and `uv sync --extra cuda`")
    group.add_argument(
        "--remote-uv", default="uv", help="uv executable on the remote (default: uv, installed if missing)"
    )
    group.add_argument("--dry-run", action="store_true", help="print every ssh, rsync and HTTP action; do none")
    assert parser.prog
    assert group.title


def add_runpod_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("RunPod provisioning (needs RUNPOD_API_KEY)")
    group.add_argument(
        "--name", default=DEFAULT_POD_NAME, help=f"pod name, remembered locally (default: {DEFAULT_POD_NAME})"
    )
    group.add_argument("--gpu-type", default=DEFAULT_GPU_TYPE, help=f"RunPod GPU type id (default: {DEFAULT_GPU_TYPE})")
    group.add_argument("--image", default=DEFAULT_IMAGE, help=f"container image (default: {DEFAULT_IMAGE})")
    group.add_argument("--container-disk-gb", type=int, default=DEFAULT_CONTAINER_DISK_GB, help="container disk size")
    group.add_argument(
        "--api-url", metavar="URL",
        help=f"RunPod REST API base (default: $RUNPOD_API_URL, else {RUNPOD_API_URL})",
    )  # fmt: skip
    group.add_argument(
        "--wait-timeout-s", type=float, default=600.0, help="bound on each wait for the pod (default: 600)"
    )
    group.add_argument("--poll-interval-s", type=float, default=5.0, help="seconds between polls (default: 5)")
    group.add_argument(
        "--terminate", action="store_true", help="delete the pod after the run, also on failure or Ctrl-C"
    )
    assert parser.prog
    assert group.title


def add_remote_command(subparsers: argparse._SubParsersAction) -> None:
    """Register `jax-gpt2 remote` on the CLI's subparsers."""
    assert subparsers is not None
    parser = subparsers.add_parser(
        "remote",
        help="sync this tree to a GPU machine over SSH and run the tests and benchmarks there",
        description=__doc__.split("\n\n")[0],
    )
    add_target_options(parser)
    add_work_options(parser)
    add_runpod_options(parser)
    parser.set_defaults(run=run_remote)
    assert parser.get_default("run") is run_remote
