"""A private, token-authenticated Ray head for tests that exercise `ray job submit`.

`ray_head(tmp_path)` starts `ray start --head` with its own temp dir, free ports and a fresh token, waits until the
job server answers, yields the environment a client needs, and on exit stops only the processes of that head.
`ray stop` is not used: it stops every Ray process on the machine, including a test session's own `ray.init()`.

Linux only for the clean-up scan (it reads /proc); elsewhere it falls back to killing the head's process session.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

START_TIMEOUT_S = 60.0
STOP_GRACE_S = 2.0  # gcs_server, raylet and the runtime-env agent often outlive SIGTERM for minutes; then SIGKILL
_MARKER = "RAY_AEKD_TEST_HEAD"  # set only in the head's environment; every process it spawns inherits it


def _free_ports(count: int) -> list[int]:
    """Distinct ports that are free right now (all sockets stay bound until every port is picked)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:
            sock.bind(("", 0))
        return [sock.getsockname()[1] for sock in socks]


def _tail(path: pathlib.Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(missing)"


def _head_pids(session_id: int, tag: str) -> list[int]:
    """Live processes of this head: those in the session of the `ray start` we launched, plus those that carry our
    marker variable (job drivers and their watchers run in sessions of their own but inherit the environment)."""
    marker = f"{_MARKER}={tag}".encode()
    pids = []
    for entry in pathlib.Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError):
            continue
        state, session = fields[0], int(fields[3])
        if state not in ("Z", "X") and (session == session_id or marker in environ):
            pids.append(int(entry.name))
    return pids


def _stop_head(session_id: int, tag: str) -> None:
    """SIGTERM the head's processes, then SIGKILL whatever is left after STOP_GRACE_S."""
    if not pathlib.Path("/proc").is_dir():
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(session_id, signal.SIGKILL)
        return
    deadline = time.monotonic() + STOP_GRACE_S
    for pid in _head_pids(session_id, tag):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)
    give_up = deadline + 30.0
    while (pids := _head_pids(session_id, tag)) and time.monotonic() < give_up:
        if time.monotonic() > deadline:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)


def _wait_until_ready(proc: subprocess.Popen[bytes], url: str, token: str, temp_dir: str, log: pathlib.Path) -> None:
    """Wait for `ray start` to return and the job server to answer an authenticated request."""
    deadline = time.monotonic() + START_TIMEOUT_S
    last_error = "no answer yet"
    while time.monotonic() < deadline:
        code = proc.poll()
        if code not in (None, 0):
            last_error = f"`ray start` exited with {code}"
            break
        if code == 0:
            request = urllib.request.Request(f"{url}/api/jobs/", headers={"Authorization": f"Bearer {token}"})
            try:
                with urllib.request.urlopen(request, timeout=5) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError) as exc:
                last_error = repr(exc)
        time.sleep(0.5)
    logs = pathlib.Path(temp_dir, "session_latest", "logs")
    raise RuntimeError(
        f"Ray head did not serve jobs at {url} within {START_TIMEOUT_S:.0f} s ({last_error}).\n"
        f"--- ray start output ---\n{_tail(log)}\n"
        f"--- dashboard.log ---\n{_tail(logs / 'dashboard.log')}\n"
        f"--- dashboard.err ---\n{_tail(logs / 'dashboard.err')}"
    )


@contextlib.contextmanager
def ray_head(tmp_path: pathlib.Path, num_cpus: int = 4) -> Iterator[dict[str, str]]:
    """Start a local Ray head with `ray start --head` (token authentication on), yield the environment a client
    needs (`os.environ` plus RAY_ADDRESS=http://127.0.0.1:<dashboard port>, RAY_AUTH_MODE=token and
    RAY_AUTH_TOKEN_PATH, with this interpreter's bin dir first on PATH), and always stop that head, and only it.

    Job drivers inherit the environment of the head (so also PATH: `python` in an entrypoint is this venv's python)
    and get RAY_ADDRESS set to the head's GCS address. Pass per-job variables with `--runtime-env-json`.
    """
    token = secrets.token_hex(32)  # same format as `ray get-auth-token --generate`, without touching ~/.ray
    token_path = tmp_path / "ray_auth_token"
    token_path.write_text(token)
    token_path.chmod(0o600)
    # Short path: Ray puts Unix sockets under it (about 107 characters at most).
    temp_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp")
    gcs_port, dashboard_port, agent_port, client_port = _free_ports(4)
    url = f"http://127.0.0.1:{dashboard_port}"

    base = {key: value for key, value in os.environ.items() if key not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
    bin_dir = str(pathlib.Path(sys.executable).parent)
    base.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN_PATH=str(token_path),
        PATH=os.pathsep.join([bin_dir, base.get("PATH", "")]),
    )
    head_env = {**base, _MARKER: temp_dir}
    client_env = {**base, "RAY_ADDRESS": url}
    command = [
        sys.executable, "-m", "ray.scripts.scripts", "start", "--head",
        f"--temp-dir={temp_dir}",
        f"--port={gcs_port}",
        f"--dashboard-port={dashboard_port}",
        f"--dashboard-agent-listen-port={agent_port}",
        f"--ray-client-server-port={client_port}",
        "--include-dashboard=true",
        f"--num-cpus={num_cpus}",
        "--disable-usage-stats",
    ]  # fmt: skip
    log = tmp_path / "ray_start.log"
    proc: subprocess.Popen[bytes] | None = None
    try:
        with log.open("wb") as out:
            proc = subprocess.Popen(
                command, env=head_env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )  # fmt: skip
        _wait_until_ready(proc, url, token, temp_dir, log)
        yield client_env
    finally:
        if proc is not None:
            _stop_head(proc.pid, temp_dir)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        shutil.rmtree(temp_dir, ignore_errors=True)
