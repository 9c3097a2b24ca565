"""Ray Jobs for the pipeline's stages: `mtnlg-ray submit STAGE ...` runs a stage's own command on a cluster.

`build_job` parses the stage's arguments with that stage's CLI command and validates its config on
this machine, so a bad key fails before anything is sent; it makes local paths absolute and
resolves the config into one file. `submit` ships that file (working_dir) and this package
(py_modules) with the job and runs `python -m mtnlg_ray <stage command>` on the cluster; the rest
follows, lists and stops jobs through Ray's job server (the dashboard address, port 8265).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path, PurePath
from typing import Any, Callable
from urllib.parse import urlparse

from mtnlg_ray.errors import ConfigError, MtnlgError

# Stage name → the words of its own command (`mtnlg-ray data prepare ...`).
STAGES: dict[str, tuple[str, ...]] = {
    "prepare": ("data", "prepare"),
    "label": ("data", "label"),
    "pretrain": ("pretrain",),
    "finetune": ("finetune",),
    "self-train": ("self-train",),
    "serve": ("serve",),
}
# The shipped config a stage starts from when no --config is given (as its command loads it).
CONFIG_STAGES = {"prepare": "prepare", "label": "prepare", "pretrain": "pretrain", "finetune": "finetune",
                 "self-train": "selftrain"}
# Config keys that hold local paths: made absolute here, since the job runs in a directory of Ray's.
PATH_KEYS = ("data.path", "data.train", "data.dev", "tokenizer.path", "label.model", "init.checkpoint",
             "run.storage_path", "selftrain.unlabelled", "selftrain.teacher", "decontam.eval_files")
CONFIG_NAME = "config.yaml"  # the resolved config, at the top of the job's working_dir
LOG_TAIL_LINES = 20
# What `mtnlg-ray serve` prints once its replicas are up.
SERVING_LINE = re.compile(r"serving \S+ at (http://\S+)/v1")


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


def build_job(stage: str, args: list[str], cwd: str | Path | None = None, env: list[str] = ()) -> JobSpec:
    """Parse and validate a stage's arguments here; relative paths become absolute against `cwd`."""
    cwd = Path(cwd) if cwd is not None else Path.cwd()
    if stage not in STAGES:
        raise MtnlgError(f"unknown stage '{stage}' (expected one of {', '.join(STAGES)})")
    env_vars = _parse_env(env)
    words = STAGES[stage]
    command = _stage_command(words)
    ctx = _parse(command, words, args)
    argv = list(words)
    config_param = _param(command, "--config")
    set_param = _param(command, "--set")
    for param in command.params:
        if param in (config_param, set_param):
            continue
        argv += _tokens(param, ctx.params.get(param.name), ctx.get_parameter_source(param.name), cwd)
    config_yaml = None
    if config_param is not None:
        import yaml

        overrides = list(ctx.params.get(set_param.name) or []) if set_param is not None else []
        if stage == "label":  # `data label` lays its --labeler and --model over the config
            overrides += [f"label.labeler={ctx.params['labeler']}", f"label.model={ctx.params['model']}"]
        config = _load_stage_config(stage, ctx.params.get(config_param.name), overrides)
        _absolute_config_paths(config, cwd)
        config_yaml = yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
        argv += ["--config", CONFIG_NAME]
    return JobSpec(stage=stage, argv=argv, config_yaml=config_yaml, env_vars=env_vars)


def connect(address: str):
    """A JobSubmissionClient for the cluster whose dashboard (or GCS) is at `address`."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    # Ray's client logs each package upload and socket close at INFO; what matters is printed by us.
    for name in list(logging.root.manager.loggerDict):
        if name.startswith(("ray.dashboard", "ray._private.runtime_env")):
            logging.getLogger(name).setLevel(logging.WARNING)
    # Ray lets RAY_ADDRESS / RAY_API_SERVER_ADDRESS win over the address it is given; ours must win.
    saved = {key: os.environ.pop(key) for key in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS") if key in os.environ}
    try:
        try:
            return JobSubmissionClient(address)
        except AuthenticationError:
            if not _send_local_token():
                raise
            return JobSubmissionClient(address)
    except (ConnectionError, RuntimeError, ValueError, AuthenticationError) as exc:
        raise MtnlgError(f"cannot reach a Ray cluster's job server at {address} ({_first_line(exc)})") from None
    finally:
        os.environ.update(saved)


def _send_local_token() -> bool:
    """Send this machine's Ray token (~/.ray/auth_token) to a cluster that asked for one.

    `ray start` turns token authentication on by itself when a token exists, but Ray's clients only
    send it under RAY_AUTH_MODE=token; an explicit RAY_AUTH_MODE is left as the user set it.
    """
    from ray._private.authentication import authentication_token_setup as token_setup

    if os.environ.get(token_setup.AUTH_MODE_ENV_VAR):
        return False
    quiet = logging.getLogger(token_setup.__name__)
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # it warns that token auth is on, which is why we are here
    try:
        return token_setup.maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    finally:
        quiet.setLevel(level)


def resolve_address(address: str | None) -> str:
    """The given address, else the cluster `mtnlg-ray local up` started on this machine."""
    if address:
        return address
    from mtnlg_ray.local_cluster import is_running, read_state

    local = read_state()
    if local is not None and is_running(local):
        return local.dashboard_url
    raise MtnlgError("no Ray cluster to submit to: pass --address http://HEAD:8265, set RAY_ADDRESS, "
                     "or start one on this machine with `mtnlg-ray local up`")


def submit(
    stage: str,
    args: list[str],
    address: str | None = None,
    *,
    no_wait: bool = False,
    env: list[str] = (),
    job_id: str | None = None,
    cwd: str | Path | None = None,
    on_submitted: Callable[[str, str], None] | None = None,
    on_log: Callable[[str], None] | None = None,
) -> JobOutcome:
    """Validate here, submit as a Ray Job, then follow its log to the end (or return at once with `no_wait`).

    A serve job never ends by itself: with `no_wait` this returns once its endpoint is up, with the URL.
    """
    spec = build_job(stage, args, cwd, env)
    address = resolve_address(address)
    client = connect(address)
    submitted = _submit_spec(client, spec, address, job_id)
    if on_submitted is not None:
        on_submitted(submitted, address)
    if stage == "serve" and no_wait:
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
        return JobOutcome(job_id, status, 0, message=_first_line(info.message or ""))
    code = info.driver_exit_code if isinstance(info.driver_exit_code, int) and info.driver_exit_code > 0 else 1
    lines = client.get_job_logs(job_id).rstrip("\n").splitlines()
    return JobOutcome(job_id, status, code, message=_first_line(info.message or ""),
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
            runtime_env["working_dir"] = str(staging)
        return client.submit_job(entrypoint=spec.entrypoint, runtime_env=runtime_env, submission_id=job_id,
                                 metadata={"mtnlg_stage": spec.stage})
    except (RuntimeError, ValueError, ConnectionError) as exc:
        raise MtnlgError(f"submitting the {spec.stage} job to {address} failed: {_first_line(exc)}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _job_info(client, job_id: str):
    try:
        return client.get_job_info(job_id)
    except RuntimeError as exc:
        if "404" in str(exc) or "does not exist" in str(exc):
            raise MtnlgError(f"no job '{job_id}' on this cluster (`mtnlg-ray jobs list` shows them)") from None
        raise MtnlgError(f"job '{job_id}': {_first_line(exc)}") from None


def _stage_command(words: tuple[str, ...]):
    """The click command behind `mtnlg-ray <words>`: the stage parses its own arguments."""
    import typer

    from mtnlg_ray.cli import app

    command = typer.main.get_command(app)
    for word in words:
        sub = getattr(command, "commands", {}).get(word)
        if sub is None:
            raise MtnlgError(f"this mtnlg-ray has no `{' '.join(words)}` command to submit")
        command = sub
    return command


def _parse(command, words: tuple[str, ...], args: list[str]):
    import click
    import typer

    usage_errors = tuple({click.ClickException, typer.TyperException})  # typer >= 0.20 ships its own click
    try:
        return command.make_context(" ".join(words), list(args), resilient_parsing=False)
    except usage_errors as exc:
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        raise MtnlgError(f"submit {' '.join(words)}: {_first_line(message)}") from None


def _param(command, flag: str):
    return next((p for p in command.params if flag in getattr(p, "opts", ())), None)


def _tokens(param, value, source, cwd: Path) -> list[str]:
    """A parsed parameter back as command-line tokens, paths made absolute; defaults are left out."""
    if param.param_type_name == "argument":  # the stages' positional arguments are all INPUTs
        values = value if isinstance(value, (list, tuple)) else [value]
        return [_local_path(str(v), cwd) for v in values if v is not None]
    if source is None or getattr(source, "name", "") != "COMMANDLINE":
        return []  # defaults and environment variables are the cluster's own to supply
    flag = next((o for o in param.opts if o.startswith("--")), param.opts[0])
    if getattr(param, "is_flag", False) and isinstance(value, bool):
        if value:
            return [flag]
        return [param.secondary_opts[0]] if param.secondary_opts else []
    tokens: list[str] = []
    for item in (value if getattr(param, "multiple", False) else [value]):
        parts = item if isinstance(item, tuple) else (item,)
        tokens += [flag, *(_token(part, cwd) for part in parts)]
    return tokens


def _token(value, cwd: Path) -> str:
    if isinstance(value, PurePath):
        return _local_path(str(value), cwd)
    if isinstance(value, Enum):
        return str(value.value)
    return str(value)


def _local_path(value: str, cwd: Path) -> str:
    """Absolute form of a local path or glob; URIs and builtin: inputs are left as they are."""
    if not value or "://" in value or value.startswith("builtin:"):
        return value
    expanded = os.path.expanduser(value)
    return expanded if os.path.isabs(expanded) else os.path.normpath(os.path.join(cwd, expanded))


def _load_stage_config(stage: str, path, overrides: list[str]):
    from mtnlg_ray.config import load_config, shipped_config

    config_stage = CONFIG_STAGES[stage]
    if path is None:
        try:
            shipped_config(config_stage)
        except ConfigError:
            config_stage = "pretrain"  # a stage whose own defaults have not shipped yet
    return load_config(path, overrides, stage=config_stage)


def _absolute_config_paths(config, cwd: Path) -> None:
    for key in PATH_KEYS:
        section_name, name = key.split(".")
        section = getattr(config, section_name, None)
        if section is None or name not in type(section).model_fields:
            continue
        value = getattr(section, name)
        if isinstance(value, str):
            setattr(section, name, _local_path(value, cwd))
        elif isinstance(value, list):
            setattr(section, name, [_local_path(v, cwd) if isinstance(v, str) else v for v in value])
    read = getattr(config, "read", None)
    if read is not None and read.weights:
        # Weights are keyed by INPUT as given, and the INPUTs are made absolute the same way.
        read.weights = {_local_path(source, cwd): weight for source, weight in read.weights.items()}


def _parse_env(items) -> dict[str, str]:
    env = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise MtnlgError(f"--env {item}: expected KEY=VALUE")
        env[key.strip()] = value
    return env


def _reachable_url(url: str, address: str) -> str:
    """A server bound to 0.0.0.0 is reached through the head's own host name."""
    parsed = urlparse(url)
    head = urlparse(address if "://" in address else f"http://{address}").hostname
    if parsed.hostname == "0.0.0.0" and head:
        return url.replace("0.0.0.0", head, 1)
    return url


def _first_line(value) -> str:
    text = str(value).strip()
    return text.splitlines()[0] if text else ""


def _write_stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()
