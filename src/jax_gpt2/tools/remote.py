"""`jax-gpt2 remote`: check the JAX backend on a GPU from a machine that has none.

Two ways in:
  * `--use-existing user@host:port` (or a NAME remembered from an earlier provisioning) uses a
    machine you already have;
  * without it, a GPU pod is rented through RunPod's REST API, waited for, and remembered under
    `--name`, so the next run is `--use-existing NAME` (sync + test, about 30 s).

Each run syncs the working tree with rsync over ssh (respecting .gitignore), bootstraps the
remote once (uv + `uv sync --extra cuda`, remembered by a marker file there), runs the commands
with their output streamed, and exits with the remote exit code.

A run is planned first: one `RemotePlan`, built from the options and the state file (nothing
contacted, nothing changed). `--dry-run` prints it (describe_plan), a normal run executes it
(execute_plan); both take their ssh and rsync lines from session_commands, so what a dry run
shows is what a run does.

This file is the command: the plan, the scripts run on the remote, the remembered pods and the
options. ssh.py builds and runs the ssh and rsync lines; runpod.py is the RunPod REST client.
All three import only the standard library and each other, no model code: the runner itself
needs neither JAX nor a GPU here.
"""

import argparse
import json
import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from jax_gpt2.tools.runpod import (
    POD_SSH_USER,
    RUNPOD_API_URL,
    PodSpec,
    RunPodSettings,
    create_pod,
    create_pod_body,
    describe_request,
    describe_wait_for_pod,
    terminate_pod,
    wait_for_pod,
)
from jax_gpt2.tools.ssh import (
    SSH_FAILED_EXIT_CODE,
    RemoteError,
    SshSettings,
    SshTarget,
    forget_stale_host_key,
    format_ssh_address,
    last_line,
    parse_ssh_address,
    rsync_argv,
    run_captured,
    run_streaming,
    say,
    ssh_argv,
    wait_for_ssh,
)

DEFAULT_GPU_TYPE = "NVIDIA GeForce RTX 4090"
DEFAULT_IMAGE = "runpod/pytorch:2.4.0-py3.11-cuda12.4.1-devel-ubuntu22.04"
DEFAULT_POD_NAME = "jax-gpt2"
DEFAULT_CONTAINER_DISK_GB = 40
# Relative remote paths resolve against the remote user's home, for ssh and rsync alike.
DEFAULT_REMOTE_DIR = "jax-gpt2"
BOOTSTRAP_MARKER = ".jax-gpt2-bootstrapped"
# Never sent, and never deleted by rsync's --delete: the remote keeps its own .venv and marker.
SYNC_EXCLUDED = (".git", ".venv", BOOTSTRAP_MARKER)
ERROR_EXIT_CODE = 2

# What a plain `jax-gpt2 remote` runs, in order, stopping at the first failure. `--extra cuda`
# keeps uv's implicit sync from ever settling on the CPU-only environment.
DEFAULT_STEPS = (
    "uv run --extra cuda pytest",
    "uv run --extra cuda jax-gpt2 compare",
    "uv run --extra cuda jax-gpt2 bench",
)


# ---------------------------------------------------------------------------------------------
# The plan: everything one run does, decided before any of it is done


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


def session_commands(plan: RemotePlan, target: SshTarget) -> SessionCommands:
    """The lines run_session executes and describe_plan prints: one function, so they cannot differ."""
    assert target.host
    assert plan.workload.remote_dir
    workload, ssh = plan.workload, plan.ssh
    bootstrap = ssh_argv(ssh, target, bootstrap_script(workload.remote_dir, workload.remote_uv))
    commands = SessionCommands(
        prepare=ssh_argv(ssh, target, prepare_script(workload.remote_dir)),
        sync=rsync_argv(ssh, target, workload.local_dir, workload.remote_dir, SYNC_EXCLUDED),
        bootstrap=bootstrap if workload.bootstrap else None,
        run=ssh_argv(ssh, target, run_script(workload.remote_dir, workload.commands), tty=plan.remote_tty),
    )
    assert commands.run[-1].endswith(")")
    return commands


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
# --dry-run: the plan as lines


# Stand-ins for what only exists once the pod has been created.
PLACEHOLDER_POD_ID = "<pod-id>"
PLACEHOLDER_POD_TARGET = SshTarget(user=POD_SSH_USER, host="<pod-public-ip>", port=22)


def describe_plan(plan: RemotePlan) -> list[str]:
    """Every action of execute_plan in order, one entry each (a request body as an entry of its own).

    The remote script of the run step holds a newline (see run_script), quoted, so an entry may
    span two terminal lines; pasted into a shell it is still one command.
    """
    lines = []
    if plan.new_pod is not None:  # rent_pod
        assert plan.runpod is not None
        probe = shlex.join(ssh_argv(plan.ssh, PLACEHOLDER_POD_TARGET, "true"))
        record = json.dumps(instance_record(PLACEHOLDER_POD_ID, PLACEHOLDER_POD_TARGET), sort_keys=True)
        lines += describe_request(plan.runpod, "POST", "/pods", create_pod_body(plan.new_pod))
        lines.append(describe_wait_for_pod(plan.runpod, PLACEHOLDER_POD_ID))
        lines.append(f"{probe}  (retried until it answers)")
        lines.append(f"record {plan.instance_name} = {record} in {plan.state_path}")
    commands = session_commands(plan, plan.target or PLACEHOLDER_POD_TARGET)  # run_session
    bootstrap = [commands.bootstrap] if commands.bootstrap is not None else []
    lines += [shlex.join(argv) for argv in (commands.prepare, commands.sync, *bootstrap, commands.run)]
    if plan.terminate:
        assert plan.runpod is not None
        lines += describe_request(plan.runpod, "DELETE", f"/pods/{plan.pod_id or PLACEHOLDER_POD_ID}", None)
        lines.append(f"remove {plan.instance_name} from {plan.state_path}")
    assert lines
    assert all(line.strip() for line in lines)
    return lines


# ---------------------------------------------------------------------------------------------
# A run: the plan executed


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


def rent_pod(plan: RemotePlan) -> tuple[str, SshTarget]:
    """Create the plan's new pod, wait until SSH answers, remember it; one that never answers is deleted."""
    spec, runpod = plan.new_pod, plan.runpod
    assert spec is not None
    assert runpod is not None
    pod_id = create_pod(runpod, spec)
    say(f"created pod {pod_id} ({spec.gpu_type}); waiting for it to start")
    try:
        target = wait_for_pod(runpod, pod_id)
        forget_stale_host_key(plan.ssh, target)
        wait_for_ssh(plan.ssh, target, runpod.wait_timeout_s, runpod.poll_interval_s)
    except BaseException:  # Ctrl-C included: an unreachable pod is only a bill.
        say(f"pod {pod_id} did not become reachable; terminating it")
        try:
            terminate_pod(runpod, pod_id)
        except RemoteError as error:  # Report a failed delete, but never mask why we got here.
            say(f"could not terminate pod {pod_id} ({error}); delete it in the RunPod console")
        raise
    remember_instance(plan.state_path, plan.instance_name, pod_id, target)
    say(f"pod {plan.instance_name} ({pod_id}) is up at {format_ssh_address(target)}")
    say(f"iterate with: jax-gpt2 remote --use-existing {plan.instance_name}")
    return pod_id, target


def run_session(plan: RemotePlan, target: SshTarget) -> int:
    """Prepare, sync, bootstrap and run on target; the remote commands' exit code comes back."""
    assert target.host
    assert plan.workload.commands
    commands = session_commands(plan, target)
    address, remote_dir = format_ssh_address(target), plan.workload.remote_dir
    prepared = run_captured(commands.prepare)  # The session's first login: does the host answer?
    if prepared.returncode == SSH_FAILED_EXIT_CODE:
        raise RemoteError(f"cannot reach {address} over SSH: {last_line(prepared.stderr)}")
    if prepared.returncode != 0:
        raise RemoteError(f"preparing {remote_dir} on {address} failed: {last_line(prepared.stderr)}")
    say(f"syncing {plan.workload.local_dir} -> {address}:{remote_dir}")
    exit_code = run_streaming(commands.sync)
    if exit_code != 0:
        raise RemoteError(f"rsync to {address} failed with exit code {exit_code}")
    if commands.bootstrap is not None:
        exit_code = run_streaming(commands.bootstrap)
        if exit_code != 0:
            raise RemoteError(f"bootstrap on {address} failed with exit code {exit_code} (its output is above)")
    return run_remote_commands(commands.run)


def run_remote_commands(argv: tuple[str, ...]) -> int:
    assert argv[0] == "ssh"
    assert len(argv) >= 3
    exit_code = run_streaming(argv)
    if exit_code == SSH_FAILED_EXIT_CODE:
        say(f"exit code {exit_code}: the SSH connection failed, or the command itself exited {exit_code}")
    assert 0 <= exit_code <= 255
    return exit_code


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
            for line in describe_plan(plan):
                print(f"[dry-run] {line}", flush=True)
            return 0
        exit_code = execute_plan(plan)
    except RemoteError as error:
        print(f"jax-gpt2 remote: error: {error}", file=sys.stderr, flush=True)
        return ERROR_EXIT_CODE
    assert 0 <= exit_code <= 255
    return exit_code


# ---------------------------------------------------------------------------------------------
# Command-line options


def add_remote_command(subparsers: argparse._SubParsersAction) -> None:
    """Register `jax-gpt2 remote` on the CLI's subparsers."""
    assert subparsers is not None
    parser = subparsers.add_parser(
        "remote",
        help="sync this tree to a GPU machine over SSH and run the tests and benchmarks there",
        description=__doc__.split("\n\n")[0],
    )
    target = parser.add_argument_group("where and how to log in")
    target.add_argument(
        "--use-existing", metavar="NAME_OR_ADDRESS",
        help="a NAME from an earlier provisioning, or user@host[:port]; without it a RunPod pod is created",
    )  # fmt: skip
    target.add_argument(
        "--ssh-key", metavar="PATH", help="private key to log in with (default: $SSH_KEY_PATH, else ssh's own)"
    )
    target.add_argument(
        "--known-hosts", metavar="PATH",
        help="known_hosts file for these hosts (default: known_hosts in the jax-gpt2 config dir)",
    )  # fmt: skip
    target.add_argument("--connect-timeout-s", type=int, default=10, help="ssh ConnectTimeout (default: 10)")

    work = parser.add_argument_group("what to run")
    work.add_argument("--local-dir", default=".", help="working tree to sync (default: the current directory)")
    work.add_argument(
        "--remote-dir", default=DEFAULT_REMOTE_DIR,
        help=f"where the tree lands on the remote; relative to its home (default: {DEFAULT_REMOTE_DIR})",
    )  # fmt: skip
    work.add_argument(
        # dest: the CLI already uses args.command for the subcommand's name.
        "--command", dest="remote_command", metavar="SHELL_COMMAND",
        help="run this in the synced tree instead of pytest, compare and bench",
    )  # fmt: skip
    work.add_argument("--no-bootstrap", action="store_true", help="skip installing uv and `uv sync --extra cuda`")
    work.add_argument(
        "--remote-uv", default="uv", help="uv executable on the remote (default: uv, installed if missing)"
    )
    work.add_argument("--dry-run", action="store_true", help="print every ssh, rsync and HTTP action; do none")

    pod = parser.add_argument_group("RunPod provisioning (needs RUNPOD_API_KEY)")
    pod.add_argument(
        "--name", default=DEFAULT_POD_NAME, help=f"pod name, remembered locally (default: {DEFAULT_POD_NAME})"
    )
    pod.add_argument("--gpu-type", default=DEFAULT_GPU_TYPE, help=f"RunPod GPU type id (default: {DEFAULT_GPU_TYPE})")
    pod.add_argument("--image", default=DEFAULT_IMAGE, help=f"container image (default: {DEFAULT_IMAGE})")
    pod.add_argument("--container-disk-gb", type=int, default=DEFAULT_CONTAINER_DISK_GB, help="container disk size")
    pod.add_argument(
        "--api-url", metavar="URL", help=f"RunPod REST API base (default: $RUNPOD_API_URL, else {RUNPOD_API_URL})"
    )
    pod.add_argument(
        "--wait-timeout-s", type=float, default=600.0, help="bound on each wait for the pod (default: 600)"
    )
    pod.add_argument("--poll-interval-s", type=float, default=5.0, help="seconds between polls (default: 5)")
    pod.add_argument("--terminate", action="store_true", help="delete the pod after the run, also on failure or Ctrl-C")

    parser.set_defaults(run=run_remote)
    assert parser.get_default("run") is run_remote
    assert parser.get_default("remote_dir") == DEFAULT_REMOTE_DIR
