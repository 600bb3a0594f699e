"""A small client for RunPod's REST API (v1): create a GPU pod, wait for its SSH address, delete it.

What `jax-gpt2 remote` uses to rent a machine when it is not given one. The API key is a secret:
it goes only into the Authorization header, never into a repr, a progress line, an error or a
dry run's output (even when a server echoes it back). Standard library only.
"""

import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

from jax_gpt2.tools.ssh import RemoteError, SshTarget, say

RUNPOD_API_URL = "https://rest.runpod.io/v1"
HTTP_TIMEOUT_S = 30
POD_SSH_USER = "root"  # RunPod's images log in as root.
REDACTED = "<redacted>"


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
# Requests


def redact(text: str, secret: str) -> str:
    """Belt and braces: whatever a server echoes back, the secret never reaches the terminal."""
    assert isinstance(text, str)
    assert isinstance(secret, str)
    return text.replace(secret, REDACTED) if secret else text


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
    """How a dry run shows one request: the key is never shown, only that one is sent."""
    assert method in ("GET", "POST", "DELETE")
    assert path.startswith("/")
    lines = [f"{method} {settings.api_url.rstrip('/')}{path}  (Authorization: Bearer {REDACTED})"]
    if body is not None:
        lines.append(f"  body: {json.dumps(body, sort_keys=True)}")
    return lines


# ---------------------------------------------------------------------------------------------
# A pod's life: create, wait for its address, terminate


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


def describe_wait_for_pod(settings: RunPodSettings, pod_id: str) -> str:
    """How a dry run shows wait_for_pod."""
    assert pod_id
    assert settings.wait_timeout_s > 0
    return (
        f"GET {settings.api_url.rstrip('/')}/pods/{pod_id} every {settings.poll_interval_s:g} s until "
        f"desiredStatus is RUNNING with a publicIp and portMappings['22'] (at most {settings.wait_timeout_s:g} s)"
    )


def terminate_pod(settings: RunPodSettings, pod_id: str) -> None:
    assert pod_id
    assert settings.api_url
    say(f"terminating pod {pod_id}")
    runpod_request(settings, "DELETE", f"/pods/{pod_id}", None)
