"""ssh and rsync, run unattended from here: how `jax-gpt2 remote` reaches a host.

The command lines are built by plain functions, so a dry run prints the very lines a run executes
(remote.py); the functions that run them turn a failure into a `RemoteError`, one line, no
traceback. Standard library only, like the rest of the remote runner.
"""

import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

SSH_FAILED_EXIT_CODE = 255  # ssh's own code for "could not connect or log in".


class RemoteError(Exception):
    """A failure whose message is the whole story: printed as one line, no traceback."""


def say(message: str) -> None:
    """Progress for the person at the terminal; stderr, so stdout stays the remote's output."""
    assert message
    assert "\n" not in message
    print(f"jax-gpt2 remote: {message}", file=sys.stderr, flush=True)


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


# ---------------------------------------------------------------------------------------------
# Command lines


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


def ssh_argv(settings: SshSettings, target: SshTarget, remote_script: str, tty: bool = False) -> tuple[str, ...]:
    """ssh running remote_script; `tty`: `ssh -t`, so Ctrl-C here stops the remote script too."""
    assert remote_script
    options = ["-t", *ssh_option_args(settings, target.port)] if tty else ssh_option_args(settings, target.port)
    argv = ("ssh", *options, f"{target.user}@{target.host}", remote_script)
    assert argv[-1] == remote_script
    return argv


def rsync_argv(
    settings: SshSettings, target: SshTarget, local_dir: str, remote_dir: str, excluded: tuple[str, ...]
) -> tuple[str, ...]:
    """Mirror local_dir into remote_dir, minus what git ignores; itemized, so you see what went.

    `excluded` paths (relative to the tree's root) are neither sent nor, despite --delete,
    deleted on the remote.
    """
    assert local_dir
    assert remote_dir
    remote_shell = shlex.join(["ssh", *ssh_option_args(settings, target.port)])
    argv = (
        "rsync", "--archive", "--compress", "--itemize-changes", "--delete",
        *(f"--exclude=/{path}" for path in excluded),
        "--filter=:- .gitignore",  # Each directory's .gitignore, read as rsync exclude rules.
        "-e", remote_shell,
        local_dir.rstrip("/") + "/",  # Trailing slash: sync the contents, not the directory.
        f"{target.user}@{target.host}:{remote_dir.rstrip('/')}/",
    )  # fmt: skip
    assert argv[0] == "rsync"
    return argv


# ---------------------------------------------------------------------------------------------
# Running them


def last_line(text: str) -> str:
    """The last non-empty line of a tool's stderr: the one that usually says what went wrong."""
    assert isinstance(text, str)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    summary = lines[-1] if lines else "no error output"
    assert "\n" not in summary
    return summary


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
