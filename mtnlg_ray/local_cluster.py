"""A one-machine Ray cluster to submit jobs to: `ray start --head` on 127.0.0.1, and stopping just that cluster.

`mtnlg-ray local up|down|status` call these; `mtnlg-ray submit` finds the cluster's dashboard here
when given no address. Every process of the cluster shares one Unix session (`ray start` runs in
a new one), so `down` stops exactly those, where `ray stop` would stop every Ray on the machine.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from mtnlg_ray.dashboard import connect
from mtnlg_ray.errors import MtnlgError
from mtnlg_ray.runtime import NICENESS_VARIABLE, WORKER_NICENESS

STATE_FILE = "mtnlg-local.json"


@dataclass
class LocalCluster:
    dashboard_url: str
    gcs_address: str
    session_id: int  # the Unix session every process of this cluster belongs to
    session_dir: str
    temp_dir: str
    started_at: float


def default_temp_dir() -> Path:
    """Where `ray start` keeps its files unless told otherwise (/tmp/ray, or $RAY_TMPDIR/ray)."""
    from ray._common.utils import get_default_ray_temp_dir

    return Path(get_default_ray_temp_dir())


def read_state(temp_dir: str | Path | None = None) -> LocalCluster | None:
    """The cluster `local up` recorded under `temp_dir`, whether or not it still runs."""
    path = Path(temp_dir or default_temp_dir()) / STATE_FILE
    try:
        if path.stat().st_uid != os.getuid():  # /tmp/ray is everyone's: another user's file is not our cluster
            return None
        return LocalCluster(**json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        return None


def session_processes(session_id: int) -> list[int]:
    """Live (not zombie) processes in a Unix session; `ps` and `getsid` work on Linux and macOS alike."""
    out = subprocess.run(["ps", "-A", "-o", "pid=,stat="], capture_output=True, text=True, check=True).stdout
    pids = []
    for line in out.splitlines():
        fields = line.split()
        if len(fields) < 2 or fields[1].startswith("Z"):
            continue
        try:
            if os.getsid(int(fields[0])) == session_id:
                pids.append(int(fields[0]))
        except (ProcessLookupError, PermissionError):
            continue
    return pids


def is_running(cluster: LocalCluster) -> bool:
    """True while the cluster's own processes live (a session id alone could have been reused)."""
    pids = session_processes(cluster.session_id)
    if not pids or not cluster.session_dir:  # an empty session_dir would match any process
        return False
    out = subprocess.run(["ps", "-o", "args=", "-p", ",".join(map(str, pids))], capture_output=True, text=True).stdout
    return cluster.session_dir in out


def start_local_cluster(
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    port: int = 6379,
    dashboard_port: int = 8265,
    temp_dir: str | Path | None = None,
    ray_args: list[str] | tuple[str, ...] = (),
    timeout_s: float = 120.0,
) -> LocalCluster:
    """Start a Ray head on 127.0.0.1 and wait until its job server answers."""
    temp = Path(temp_dir).absolute() if temp_dir else default_temp_dir()
    existing = read_state(temp)
    if existing is not None and is_running(existing):
        down = f"mtnlg-ray local down --temp-dir {temp}" if temp_dir else "mtnlg-ray local down"
        raise MtnlgError(f"a local cluster is already up (dashboard {existing.dashboard_url}); `{down}` stops it")
    # A port another Ray holds: `ray start` answered with a GCS session mismatch, or came up without a
    # dashboard of its own while the other cluster's job server answered at the URL (and took the jobs).
    given = {arg.split("=", 1)[0] for arg in ray_args}  # `-- --port N` goes to `ray start` after ours, and wins
    for option, number, host in (("--port", port, "0.0.0.0"), ("--dashboard-port", dashboard_port, "127.0.0.1")):
        if option in given:
            continue
        if not 0 < number < 65536:
            raise MtnlgError(f"{option} {number}: expected a port number from 1 to 65535")
        if _port_taken(host, number):
            raise MtnlgError(f"{option} {number}: the port is taken (by another Ray?); {option} picks another")
    command = [
        sys.executable, "-m", "ray.scripts.scripts", "start", "--head",
        "--node-ip-address", "127.0.0.1", "--dashboard-host", "127.0.0.1",
        "--port", str(port), "--dashboard-port", str(dashboard_port), "--disable-usage-stats",
    ]
    if num_cpus is not None:
        command += ["--num-cpus", str(num_cpus)]
    if num_gpus is not None:
        command += ["--num-gpus", str(num_gpus)]
    if temp_dir:
        command += ["--temp-dir", str(temp)]
    command += _free_default_ports(ray_args)
    command += list(ray_args)
    # A new session: every daemon `ray start` spawns inherits it, which is what `down` stops.
    # Workers at the driver's priority, as on the Ray `ensure_ray` starts (see runtime.py).
    env = {NICENESS_VARIABLE: WORKER_NICENESS, **os.environ}
    proc = subprocess.Popen(command, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env)
    try:
        return _finish_start(proc, temp, dashboard_port, timeout_s)
    except BaseException:  # Ctrl-C too: `ray start` runs in its own session, which the terminal's
        _stop_session(proc.pid)  # interrupt never reaches, and nothing would be left to stop it by
        raise


def _finish_start(proc: subprocess.Popen, temp: Path, dashboard_port: int, timeout_s: float) -> "LocalCluster":
    """Wait for `ray start`, check the cluster it left and record it; raises on any failure (the caller
    stops the session)."""
    try:
        output, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise MtnlgError(f"ray start did not finish within {timeout_s:.0f} s") from None
    if proc.returncode != 0:
        raise MtnlgError(f"ray start failed: {_last_message(output)}")
    try:
        gcs_address = (temp / "ray_current_cluster").read_text(encoding="utf-8").strip()
        session_dir = str((temp / "session_latest").resolve())
    except OSError as exc:
        raise MtnlgError(f"ray start left no cluster address in {temp} ({exc})") from None
    cluster = LocalCluster(
        dashboard_url=f"http://127.0.0.1:{dashboard_port}", gcs_address=gcs_address, session_id=proc.pid,
        session_dir=session_dir, temp_dir=str(temp), started_at=time.time(),
    )
    if not _wait_for_job_server(cluster.dashboard_url, deadline=time.time() + timeout_s):
        raise MtnlgError(f"Ray started but its job server did not answer at {cluster.dashboard_url} "
                         f"(is port {dashboard_port} taken? --dashboard-port picks another)")
    (temp / STATE_FILE).write_text(json.dumps(asdict(cluster), indent=2), encoding="utf-8")
    return cluster


def stop_local_cluster(temp_dir: str | Path | None = None, grace_s: float = 5.0) -> LocalCluster | None:
    """Stop the cluster `local up` started under `temp_dir`; None when there was none."""
    temp = Path(temp_dir).absolute() if temp_dir else default_temp_dir()
    cluster = read_state(temp)
    if cluster is None:
        return None
    if is_running(cluster):
        _stop_session(cluster.session_id, grace_s)
    (temp / STATE_FILE).unlink(missing_ok=True)
    address_file = temp / "ray_current_cluster"
    try:
        if address_file.read_text(encoding="utf-8").strip() == cluster.gcs_address:
            address_file.unlink()  # else a later plain ray.init() would try to join a dead cluster
    except OSError:
        pass
    return cluster


def authentication_mode(dashboard_url: str) -> str | None:
    """'token' or 'disabled', as the cluster's dashboard reports it (None if it does not say)."""
    import urllib.request

    try:
        with urllib.request.urlopen(f"{dashboard_url}/api/authentication_mode", timeout=10) as response:
            return json.loads(response.read()).get("authentication_mode")
    except (OSError, ValueError):
        return None


def _stop_session(session_id: int, grace_s: float = 5.0) -> None:
    """SIGTERM every process of the session, then SIGKILL what is left after `grace_s`."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        pids = session_processes(session_id)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):  # gone, or not ours to stop
                pass
        deadline = time.time() + wait_s
        while pids and time.time() < deadline:
            time.sleep(0.2)
            pids = session_processes(session_id)
        if not pids:
            return


# Ports `ray start` takes unless told otherwise. Another Ray on this machine (a second `local up`
# with its own --port and --temp-dir) holds them: the dashboard agent, which accepts jobs, then stays
# up without its HTTP service, and every submit fails with "No available agent to submit job".
DEFAULT_PORTS = {"--dashboard-agent-listen-port": 52365, "--ray-client-server-port": 10001}


def _port_taken(host: str, port: int) -> bool:
    """Whether something listens on `port` (a socket in TIME_WAIT, left by a cluster just stopped, does not count)."""
    import socket

    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return True
    return False


def _free_default_ports(ray_args) -> list[str]:
    """For each of `DEFAULT_PORTS` the user did not set, a free port instead when the default is taken."""
    import socket

    given = {arg.split("=", 1)[0] for arg in ray_args}
    extra = []
    for option, default in DEFAULT_PORTS.items():
        if option in given:
            continue
        with socket.socket() as probe:
            try:
                probe.bind(("0.0.0.0", default))
                continue  # free: Ray's default stays
            except OSError:
                pass
        with socket.socket() as probe:
            probe.bind(("0.0.0.0", 0))
            extra += [option, str(probe.getsockname()[1])]
    return extra


def _wait_for_job_server(url: str, deadline: float) -> bool:
    while True:
        try:
            connect(url)
            return True
        except MtnlgError:
            if time.time() > deadline:
                return False
            time.sleep(1.0)


def _last_message(output: str) -> str:
    """The last meaningful line `ray start` printed (colour codes stripped)."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in output.splitlines()]
    lines = [line for line in lines if line and not set(line) <= {"-", "="}]
    errors = [line for line in lines if re.match(r"^[\w.]+(Error|Exception): ", line)]
    return (errors or lines or ["no output"])[-1]
