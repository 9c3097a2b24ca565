"""A plain Ray Jobs client for the pipeline's stages: submit a `JobSpec`, follow, list and stop jobs.

The CLI builds the spec (`mtnlg_ray/cli/jobspec.py`: the stage's arguments parsed and its config
resolved on this machine). `submit` ships that config (working_dir) and this package (py_modules)
with the job and runs `python -m mtnlg_ray <stage command>` on the cluster; the rest follows, lists
and stops jobs through Ray's job server (the dashboard address, port 8265).
"""

from __future__ import annotations

import asyncio
import re
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlparse

from mtnlg_ray.dashboard import connect
from mtnlg_ray.errors import MtnlgError, first_line
from mtnlg_ray.local_cluster import is_running, read_state

CONFIG_NAME = "config.yaml"  # the config as set (paths absolute), at the top of the job's working_dir
LOG_TAIL_LINES = 20
# What `mtnlg-ray serve` prints once its replicas are up.
JOB_ID = re.compile(r"[A-Za-z0-9._-]+")
SERVING_LINE = re.compile(r"serving .+? at (http://\S+)/v1")  # a model name may hold spaces


@dataclass
class JobSpec:
    """A stage's job as it will run: its command's arguments and the config file that goes with it."""

    stage: str
    argv: list[str]
    config_yaml: str | None = None
    env_vars: dict[str, str] = field(default_factory=dict)

    @property
    def entrypoint(self) -> str:
        return shlex.join(["python", "-m", "mtnlg_ray", *self.argv])


@dataclass
class JobOutcome:
    """How a submitted job stands: terminal when it was waited for, else PENDING / RUNNING."""

    job_id: str
    status: str
    exit_code: int
    message: str = ""
    log_tail: str = ""
    url: str | None = None  # serve: where the endpoint answers


def resolve_address(address: str | None) -> str:
    """The given address, else the cluster `mtnlg-ray local up` started on this machine."""
    if address:
        return address
    local = read_state()
    if local is not None and is_running(local):
        return local.dashboard_url
    raise MtnlgError("no Ray cluster to submit to: pass --address http://HEAD:8265, set RAY_ADDRESS, "
                     "or start one on this machine with `mtnlg-ray local up`")


def submit(
    spec: JobSpec,
    address: str | None = None,
    *,
    no_wait: bool = False,
    job_id: str | None = None,
    on_submitted: Callable[[str, str], None] | None = None,
    on_log: Callable[[str], None] | None = None,
) -> JobOutcome:
    """Submit `spec` as a Ray Job, then follow its log to the end (or return at once with `no_wait`).

    A serve job never ends by itself: with `no_wait` this returns once its endpoint is up, with the URL.
    """
    check_job_id(job_id)
    address = resolve_address(address)
    client = connect(address)
    submitted = _submit_spec(client, spec, address, job_id)
    if on_submitted is not None:
        on_submitted(submitted, address)
    if spec.stage == "serve" and no_wait:
        return wait_until_serving(client, submitted, address)
    if no_wait:
        return JobOutcome(submitted, str(client.get_job_status(submitted)), 0)
    return follow(client, submitted, on_log)


def follow(client, job_id: str, on_log: Callable[[str], None] | None = None, poll_s: float = 0.5) -> JobOutcome:
    """Stream the job's log until it ends; the outcome carries its exit code and, on failure, the log's tail."""
    write = on_log or _write_stdout
    asyncio.run(_stream_log(client, job_id, write, poll_s))
    return outcome(client, job_id)


async def _stream_log(client, job_id: str, write: Callable[[str], None], poll_s: float) -> None:
    """Ray's log stream, stopped as soon as the job's status is final, then the rest of the log in one piece.

    The stream alone closes seconds after the job has ended; the status says so within a poll.
    """
    written = 0

    async def tail() -> None:
        nonlocal written
        async for chunk in client.tail_job_logs(job_id):
            write(chunk)
            written += len(chunk)

    streaming = asyncio.create_task(tail())
    try:
        while not (await asyncio.to_thread(client.get_job_status, job_id)).is_terminal():
            # A stream that closed early (e.g. the runtime env failed) leaves the polling to the status.
            await (asyncio.sleep(poll_s) if streaming.done() else asyncio.wait({streaming}, timeout=poll_s))
    finally:
        streaming.cancel()
        try:
            await streaming
        except (asyncio.CancelledError, RuntimeError):
            pass
    log = await asyncio.to_thread(client.get_job_logs, job_id)
    if len(log) > written:  # the stream reads the same file from its start, so it holds a prefix of it
        write(log[written:])


def outcome(client, job_id: str) -> JobOutcome:
    """The job's status now; for a failed or stopped job, its exit code and the last lines of its log."""
    info = _job_info(client, job_id)
    status = str(info.status)
    if status == "SUCCEEDED":
        return JobOutcome(job_id, status, 0)
    if status not in ("FAILED", "STOPPED"):
        return JobOutcome(job_id, status, 0, message=first_line(info.message or ""))
    code = info.driver_exit_code if isinstance(info.driver_exit_code, int) and info.driver_exit_code > 0 else 1
    lines = client.get_job_logs(job_id).rstrip("\n").splitlines()
    return JobOutcome(job_id, status, code, message=first_line(info.message or ""),
                      log_tail="\n".join(lines[-LOG_TAIL_LINES:]))


def wait_until_serving(client, job_id: str, address: str, poll_s: float = 1.0) -> JobOutcome:
    """Wait for a serve job to print its URL; if it ends first, its outcome is a failure."""
    while True:
        match = SERVING_LINE.search(client.get_job_logs(job_id))
        if match:
            return JobOutcome(job_id, "RUNNING", 0, url=_reachable_url(match.group(1), address))
        if client.get_job_status(job_id).is_terminal():
            ended = outcome(client, job_id)
            ended.exit_code = ended.exit_code or 1  # a serve job that ends has stopped serving
            return ended
        time.sleep(poll_s)


def list_jobs(address: str | None) -> list[Any]:
    """Every job the cluster knows, oldest first (Ray's JobDetails)."""
    client = connect(resolve_address(address))
    return sorted(client.list_jobs(), key=lambda job: job.start_time or 0)


def job_status(address: str | None, job_id: str) -> JobOutcome:
    client = connect(resolve_address(address))
    _job_info(client, job_id)
    return outcome(client, job_id)


def job_logs(address: str | None, job_id: str, follow_log: bool = False,
             on_log: Callable[[str], None] | None = None) -> JobOutcome | None:
    """Print the job's log so far, or follow it to the end with `follow_log`."""
    client = connect(resolve_address(address))
    _job_info(client, job_id)
    if follow_log:
        return follow(client, job_id, on_log)
    (on_log or _write_stdout)(client.get_job_logs(job_id))
    return None


def stop_job(address: str | None, job_id: str, wait_s: float = 30.0) -> str:
    """Ask the job to stop (SIGTERM, then SIGKILL) and return its status once it has ended (or after `wait_s`)."""
    client = connect(resolve_address(address))
    _job_info(client, job_id)
    client.stop_job(job_id)
    deadline = time.time() + wait_s
    while not (status := client.get_job_status(job_id)).is_terminal() and time.time() < deadline:
        time.sleep(0.5)
    return str(status)


def _submit_spec(client, spec: JobSpec, address: str, job_id: str | None) -> str:
    import mtnlg_ray

    staging = Path(tempfile.mkdtemp(prefix="mtnlg-job-"))
    runtime_env: dict[str, Any] = {
        # This machine's package, not whatever the cluster has installed: the job runs the code
        # that validated its arguments.
        "py_modules": [str(Path(mtnlg_ray.__file__).parent)],
        "excludes": ["__pycache__", "*.pyc"],
        # Each stage prints its own progress; Ray Data's bars would become a log line every 10 s.
        "env_vars": {"PYTHONUNBUFFERED": "1", "RAY_DATA_DISABLE_PROGRESS_BARS": "1", **spec.env_vars},
    }
    try:
        if spec.config_yaml is not None:
            (staging / CONFIG_NAME).write_text(spec.config_yaml, encoding="utf-8")
        # Always a working_dir, even empty (serve has no config): `python -m` puts the directory the
        # driver starts in first on sys.path, and without one that is wherever the raylet runs,
        # such as the image's source tree, whose mtnlg_ray would shadow the package shipped above.
        runtime_env["working_dir"] = str(staging)
        return client.submit_job(entrypoint=spec.entrypoint, runtime_env=runtime_env, submission_id=job_id,
                                 metadata={"mtnlg_stage": spec.stage})
    except (RuntimeError, ValueError, ConnectionError) as exc:
        raise MtnlgError(f"submitting the {spec.stage} job to {address} failed: {_server_reason(exc)}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def check_job_id(job_id: str | None) -> None:
    if job_id is not None and not JOB_ID.fullmatch(job_id):
        # Ray took 'a b/c' into its job table and then failed: a job left PENDING for good.
        raise MtnlgError(f"--job-id {job_id!r}: expected letters, digits, '.', '_' and '-' only")


def _server_reason(exc: Exception) -> str:
    """The reason in a job server's error: its text is often 'status code 500: Traceback ...', whose
    first line says nothing and whose last says what went wrong (a job id already taken)."""
    text = str(exc)
    if "Traceback (most recent call last)" not in text:
        return first_line(exc)
    raised = [found.group(2) for line in text.splitlines()
              if (found := re.match(r"\s*([\w.]+(?:Error|Exception)): (.+)", line))]
    return raised[-1].strip() if raised else first_line(exc)


def _job_info(client, job_id: str):
    try:
        return client.get_job_info(job_id)
    except RuntimeError as exc:
        if "404" in str(exc) or "does not exist" in str(exc):
            raise MtnlgError(f"no job '{job_id}' on this cluster (`mtnlg-ray jobs list` shows them)") from None
        raise MtnlgError(f"job '{job_id}': {first_line(exc)}") from None


def _reachable_url(url: str, address: str) -> str:
    """A server bound to 0.0.0.0 is reached through the head's own host name."""
    parsed = urlparse(url)
    head = urlparse(address if "://" in address else f"http://{address}").hostname
    if parsed.hostname == "0.0.0.0" and head:
        return url.replace("0.0.0.0", head, 1)
    return url


def _write_stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()
