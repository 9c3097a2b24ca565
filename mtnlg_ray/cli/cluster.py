"""Cluster commands: `submit` (a stage as a Ray Job), `jobs list|status|logs|stop`, and `local up|down|status`
(a one-machine cluster to submit to)."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import List, Optional

import typer

from mtnlg_ray.cli.app import ADDRESS_HELP, app, jobs_app, local_app


def _report_job_end(result) -> None:
    """Exit with the job's result: nothing more when it succeeded, else the end of its log and its exit code."""
    if result.exit_code == 0:
        if result.status == "SUCCEEDED":
            typer.echo(f"job {result.job_id} succeeded", err=True)
        return
    if result.log_tail:
        typer.echo(f"--- last lines of the log of job {result.job_id} ---", err=True)
        typer.echo(result.log_tail, err=True)
    why = "its log ends above" if result.log_tail else (result.message or "no log")
    typer.echo(f"error: job {result.job_id} {result.status} with exit code {result.exit_code} ({why})", err=True)
    raise typer.Exit(result.exit_code)


@app.command("submit", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def submit(
    ctx: typer.Context,
    stage: str = typer.Argument(..., metavar="STAGE", help="prepare | label | pretrain | finetune | self-train | serve"),
    address: Optional[str] = typer.Option(None, "--address", envvar="RAY_ADDRESS", help=ADDRESS_HELP),
    no_wait: bool = typer.Option(False, "--no-wait", help="Print the job id and return (serve: once it answers)."),
    env: List[str] = typer.Option([], "--env", metavar="KEY=VALUE", help="KEY=VALUE for the job's environment (repeatable)."),
    job_id: Optional[str] = typer.Option(None, "--job-id", help="Submission id to use instead of a generated one (letters, digits, ., _, -; not one the cluster has used)."),
) -> None:
    """Run a stage as a Ray Job: STAGE, then the same arguments as the stage's own command.

    Example: `mtnlg-ray submit prepare builtin:python-docs --output work/data --set pack.seq_len=64`.
    The arguments and the config are checked here first, so a bad key fails before anything is sent.
    Relative paths become absolute (right when the cluster is this machine; on a remote cluster give
    paths every node sees). The job runs this machine's mtnlg_ray package with the config as set (the
    stage's file, --config, --set); what a run derives when unset, it derives there.
    Follows the log and exits with the job's result; `--no-wait` prints the job id instead (for
    serve, once the endpoint answers, with its URL). Ctrl-C stops following, not the job.
    """
    from mtnlg_ray.cli.jobspec import build_job
    from mtnlg_ray.jobs import check_job_id
    from mtnlg_ray.jobs import submit as run

    check_job_id(job_id)
    spec = build_job(ctx.find_root().command, stage, list(ctx.args), env=env)
    submitted: list[str] = []
    # The follow-up commands printed below name the cluster this one used: without --address they
    # went to the default one (none, or another), not to the job's.
    at = f" --address {shlex.quote(address)}" if address else ""

    def on_submitted(job: str, where: str) -> None:
        submitted.append(job)
        typer.echo(f"submitted job {job} to {where}", err=True)
        if no_wait:
            typer.echo(job)

    try:
        result = run(spec, address, no_wait=no_wait, job_id=job_id, on_submitted=on_submitted)
    except KeyboardInterrupt:
        job = submitted[0] if submitted else "JOB_ID"
        typer.echo(f"stopped following; job {job} keeps running (`mtnlg-ray jobs stop {job}{at}` stops it)", err=True)
        raise typer.Exit(130)
    if result.url:
        typer.echo(f"{result.url}/v1")
        typer.echo(f"serving at {result.url}/v1; job {result.job_id} keeps running "
                   f"(`mtnlg-ray jobs stop {result.job_id}{at}` stops it)", err=True)
        auth = " -H \"Authorization: Bearer $MTNLG_API_KEY\"" if "MTNLG_API_KEY_SHA256" in spec.env_vars else ""
        typer.echo(f"try:  curl {result.url}/v1/completions -H 'Content-Type: application/json'{auth} "
                   "-d '{\"prompt\": \"def \", \"max_tokens\": 32, \"temperature\": 0}'", err=True)
    elif no_wait and result.exit_code == 0:
        typer.echo(f"job {result.job_id} is {result.status}: `mtnlg-ray jobs logs {result.job_id} --follow{at}` "
                   f"follows it, `mtnlg-ray jobs stop {result.job_id}{at}` stops it", err=True)
    _report_job_end(result)


@jobs_app.command("list")
def jobs_list(address: Optional[str] = typer.Option(None, "--address", envvar="RAY_ADDRESS", help=ADDRESS_HELP)) -> None:
    """Every job on the cluster, oldest first: id, stage, status, start time, entrypoint."""
    import datetime

    from rich.console import Console
    from rich.table import Table

    from mtnlg_ray.jobs import list_jobs

    table = Table()
    for column in ("job", "stage", "status", "started", "entrypoint"):
        table.add_column(column)
    for job in list_jobs(address):
        started = (datetime.datetime.fromtimestamp(job.start_time / 1000).strftime("%Y-%m-%d %H:%M:%S")
                   if job.start_time else "")
        table.add_row(job.submission_id or job.job_id or "", (job.metadata or {}).get("mtnlg_stage", ""),
                      str(job.status), started, job.entrypoint or "")
    Console(width=200).print(table)


@jobs_app.command("status")
def jobs_status(
    job_id: str = typer.Argument(..., help="A job id from `mtnlg-ray submit` or `mtnlg-ray jobs list`."),
    address: Optional[str] = typer.Option(None, "--address", envvar="RAY_ADDRESS", help=ADDRESS_HELP),
) -> None:
    """Print the job's status (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED); a failed or stopped job's log tail on stderr."""
    from mtnlg_ray.jobs import job_status

    result = job_status(address, job_id)
    typer.echo(result.status)
    if result.log_tail:
        why = "stopped" if result.status == "STOPPED" else f"exit code {result.exit_code}"
        typer.echo(f"{why}; last lines of its log:\n{result.log_tail}", err=True)


@jobs_app.command("logs")
def jobs_logs(
    job_id: str = typer.Argument(..., help="A job id from `mtnlg-ray submit` or `mtnlg-ray jobs list`."),
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing until the job ends; exit with its result."),
    address: Optional[str] = typer.Option(None, "--address", envvar="RAY_ADDRESS", help=ADDRESS_HELP),
) -> None:
    """Print the job's log (stdout and stderr of its driver)."""
    from mtnlg_ray.jobs import job_logs

    try:
        result = job_logs(address, job_id, follow_log=follow)
    except KeyboardInterrupt:
        raise typer.Exit(130)
    if result is not None:
        _report_job_end(result)


@jobs_app.command("stop")
def jobs_stop(
    job_id: str = typer.Argument(..., help="A job id from `mtnlg-ray submit` or `mtnlg-ray jobs list`."),
    address: Optional[str] = typer.Option(None, "--address", envvar="RAY_ADDRESS", help=ADDRESS_HELP),
) -> None:
    """Stop a job (SIGTERM to its driver, SIGKILL after a grace period) and print its final status."""
    from mtnlg_ray.jobs import stop_job

    typer.echo(f"job {job_id}: {stop_job(address, job_id)}")


@local_app.command("up", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def local_up(
    ctx: typer.Context,
    num_cpus: Optional[int] = typer.Option(None, "--num-cpus", help="CPUs Ray may schedule (default: all)."),
    num_gpus: Optional[int] = typer.Option(None, "--num-gpus", help="GPUs Ray may schedule (default: all)."),
    port: int = typer.Option(6379, "--port", help="Port of the cluster's GCS."),
    dashboard_port: int = typer.Option(8265, "--dashboard-port", help="Port of the dashboard and its job server."),
    temp_dir: Optional[Path] = typer.Option(None, "--temp-dir", help="Ray's session files (default: Ray's, /tmp/ray)."),
) -> None:
    """Start a Ray head on 127.0.0.1 for `submit` (its default cluster); arguments after `--` go to `ray start`.

    Commands on this machine (`mtnlg-ray pretrain`, `ray status`) join it too.
    """
    from mtnlg_ray.local_cluster import authentication_mode, start_local_cluster

    cluster = start_local_cluster(num_cpus=num_cpus, num_gpus=num_gpus, port=port, dashboard_port=dashboard_port,
                                  temp_dir=temp_dir, ray_args=list(ctx.args))
    where = f" --temp-dir {temp_dir}" if temp_dir else ""
    address = f" --address {cluster.dashboard_url}" if temp_dir else ""
    typer.echo(f"Ray is up: dashboard and job server {cluster.dashboard_url}, GCS {cluster.gcs_address}")
    typer.echo(f"submit:  mtnlg-ray submit prepare builtin:python-docs --output work/data{address}")
    typer.echo(f"stop:    mtnlg-ray local down{where}")
    if authentication_mode(cluster.dashboard_url) == "token":
        typer.echo("token authentication is on (Ray's default once ~/.ray/auth_token exists): mtnlg-ray sends "
                   "the token; for Ray's own CLI, export RAY_AUTH_MODE=token")


@local_app.command("down")
def local_down(
    temp_dir: Optional[Path] = typer.Option(None, "--temp-dir", help="The --temp-dir given to `local up`."),
) -> None:
    """Stop the cluster `local up` started (its processes only; other Ray instances keep running)."""
    from mtnlg_ray.local_cluster import stop_local_cluster

    cluster = stop_local_cluster(temp_dir)
    typer.echo(f"stopped the local cluster at {cluster.dashboard_url}" if cluster else "no local cluster is up")


@local_app.command("status")
def local_status(
    temp_dir: Optional[Path] = typer.Option(None, "--temp-dir", help="The --temp-dir given to `local up`."),
) -> None:
    """Whether the cluster of `local up` runs, and where; exit code 1 when it does not."""
    from mtnlg_ray.local_cluster import is_running, read_state, session_processes

    cluster = read_state(temp_dir)
    if cluster is None or not is_running(cluster):
        typer.echo("no local cluster is up (`mtnlg-ray local up` starts one)")
        raise typer.Exit(1)
    typer.echo(f"up: dashboard and job server {cluster.dashboard_url}, GCS {cluster.gcs_address}, "
               f"{len(session_processes(cluster.session_id))} processes, session {cluster.session_dir}")


