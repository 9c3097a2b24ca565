"""Stages as Ray Jobs on a real cluster: `mtnlg-ray local up` (a `ray start --head` on loopback), then
prepare → pretrain → serve through `mtnlg-ray submit`, a job sent with plain `ray job submit`, a bad
config refused before submission, a failing job's exit code and log, and `local down`.

The cluster is separate from the test session's own Ray: its own ports and temp dir (so plain
`ray.init()` elsewhere never finds it), and every command runs in a process of its own.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from mtnlg_ray.errors import ConfigError, MtnlgError
from mtnlg_ray.cli.jobspec import build_job as build_job_under

ROOT = Path(__file__).resolve().parents[1]
EXE = shutil.which("mtnlg-ray") or str(Path(sys.executable).parent / "mtnlg-ray")
TINY_PREPARE = ["--set", "read.txt_mode=paragraph", "--set", "clean.enabled=false", "--set", "dedup.exact=false",
                "--set", "dedup.fuzzy=false", "--set", "tokenizer.vocab_size=300", "--set", "pack.seq_len=32",
                "--set", "pack.val_fraction=0.1"]


def build_job(stage: str, args: list[str], **kwargs):
    """The job `mtnlg-ray submit STAGE ARGS` would send, parsed by the real `mtnlg-ray` command tree."""
    import typer

    from mtnlg_ray.cli import app

    return build_job_under(typer.main.get_command(app), stage, args, **kwargs)


@dataclass
class LocalRay:
    address: str
    temp_dir: Path
    state: dict


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def clean_env(**extra: str) -> dict:
    """This environment without any pointer to another Ray, so only --address decides."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


def cli(*args: str, cwd: Path | None = None, timeout: float = 240, env: dict | None = None):
    return subprocess.run([EXE, *map(str, args)], capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          env=env or clean_env())


def write_corpus(path: Path, paragraphs: int = 60) -> Path:
    import random

    rng = random.Random(0)
    words = ("the list type is a mutable sequence of items while a tuple is an immutable one and a dict maps "
             "keys to values").split()
    path.write_text("\n\n".join(" ".join(rng.choice(words) for _ in range(50)) for _ in range(paragraphs)) + "\n")
    return path


def job_ids(listing: str) -> list[str]:
    return [word for word in listing.split() if word.startswith("raysubmit_")]


@pytest.fixture(scope="module")
def local_ray():
    # Short: Ray's socket paths live under it and must stay under 108 characters.
    temp = Path(tempfile.mkdtemp(prefix="mtj", dir="/tmp"))
    try:
        up = cli("local", "up", "--num-cpus", 2, "--port", free_port(), "--dashboard-port", free_port(),
                 "--temp-dir", temp, "--", "--dashboard-agent-listen-port", free_port(),
                 "--ray-client-server-port", free_port(), timeout=300)
        assert up.returncode == 0, up.stdout + up.stderr
        state = json.loads((temp / "mtnlg-local.json").read_text())
        yield LocalRay(address=state["dashboard_url"], temp_dir=temp, state=state)
    finally:
        cli("local", "down", "--temp-dir", temp)
        shutil.rmtree(temp, ignore_errors=True)


@dataclass
class SideJobs:
    plain: subprocess.Popen  # `ray job submit ... python jobs/prepare.py ...`
    plain_output: Path
    failing: subprocess.Popen  # `mtnlg-ray submit pretrain` on a dataset that is not there
    failing_cwd: Path


@pytest.fixture(scope="module")
def side_jobs(local_ray, tmp_path_factory):
    """Two jobs that need nothing from the pipeline, started beside it and checked by their own tests.

    A job spends most of its time waiting on Ray (actor start-up, status polls), so on CI's two
    cores running these alongside the pipeline saves most of their time.
    """
    from mtnlg_ray.local_cluster import authentication_mode

    base = tmp_path_factory.mktemp("side")
    corpus = write_corpus(base / "corpus.txt", paragraphs=30)
    # Ray's own CLI sends this machine's token only when told to; mtnlg-ray works that out itself.
    token = authentication_mode(local_ray.address) == "token"
    plain = subprocess.Popen(
        [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", local_ray.address,
         "--working-dir", ".", "--", "python", "jobs/prepare.py", str(corpus), "--output", str(base / "plain"),
         *TINY_PREPARE],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=clean_env(RAY_AUTH_MODE="token") if token else clean_env(),
    )
    failing = subprocess.Popen([EXE, "submit", "pretrain", "--set", "data.path=missing", "--address", local_ray.address],
                               cwd=base, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env())
    try:
        yield SideJobs(plain=plain, plain_output=base / "plain", failing=failing, failing_cwd=base)
    finally:
        for proc in (plain, failing):
            if proc.poll() is None:
                proc.kill()


def test_build_job_makes_local_paths_absolute_and_leaves_uris_alone(tmp_path):
    spec = build_job(
        "prepare",
        ["corpus/", "builtin:python-docs", "s3://bucket/crawl/", "--output", "out", "--set", "pack.seq_len=64",
         "--set", "read.weights={'corpus/': 2.0, 's3://bucket/crawl/': 0.5}", "--set", "decontam.eval_files=[evals]"],
        cwd=tmp_path,
    )
    assert spec.argv == ["data", "prepare", str(tmp_path / "corpus"), "builtin:python-docs", "s3://bucket/crawl/",
                         "--output", str(tmp_path / "out"), "--config", "config.yaml"]
    config = __import__("yaml").safe_load(spec.config_yaml)
    assert config["pack"]["seq_len"] == 64
    # Weights stay keyed by the INPUTs as the job will see them.
    assert config["read"]["weights"] == {str(tmp_path / "corpus"): 2.0, "s3://bucket/crawl/": 0.5}
    assert config["decontam"]["eval_files"] == [str(tmp_path / "evals")]
    assert "run" not in config  # data prepare reads no run.*: the job would warn of it
    pretrain = __import__("yaml").safe_load(build_job("pretrain", ["--set", "data.path=d"], cwd=tmp_path).config_yaml)
    assert pretrain["run"]["storage_path"] == str(tmp_path / "runs")
    serve = build_job("serve", ["-c", "ckpt", "--port", "9000"], cwd=tmp_path)
    assert serve.entrypoint == f"python -m mtnlg_ray serve --checkpoint {tmp_path / 'ckpt'} --port 9000"
    assert serve.config_yaml is None
    with pytest.raises(ConfigError, match="train.warmup"):
        build_job("pretrain", ["--set", "train.warmup=5"], cwd=tmp_path)
    with pytest.raises(MtnlgError, match="--output"):
        build_job("prepare", ["corpus/"], cwd=tmp_path)


def test_a_job_carries_what_was_set_and_the_cluster_derives_the_rest_as_here(tmp_path):
    """A job's config.yaml holds what the stage's file, --config and --set set; what a run derives when
    unset (the warm-up and decay from its data and length) is derived on the cluster as it is here. The
    whole config used to be written out, fixing them at the schema's MT-NLG values: a submitted
    fine-tune warmed up over 1B tokens (its LR never left 0.02 % of the peak), a submitted pretraining
    run never decayed (340B tokens)."""
    import yaml

    from mtnlg_ray.config import absolute_paths, load_config
    from mtnlg_ray.finetune.trainer import _default_schedule
    from mtnlg_ray.train.trainer import schedule_over_the_run

    def carried(stage: str, args: list[str]):
        path = tmp_path / f"{stage}.yaml"
        path.write_text(build_job(stage, args, cwd=tmp_path).config_yaml)
        return load_config(path, stage=stage)

    sets = ["data.train=train.tsv", "train.epochs=3"]
    job = carried("finetune", [word for key in sets for word in ("--set", key)])
    here = absolute_paths(load_config(overrides=sets, stage="finetune"), tmp_path)
    assert job.model_dump() == here.model_dump()
    for cfg in (job, here):
        schedule = _default_schedule(cfg, epoch_tokens=10_000, examples_hint=500).train
        assert (schedule.warmup_tokens, schedule.decay_tokens) == (1_500, 30_000)

    sets = ["model.preset=gpt3-125m", "train.max_steps=300"]
    job = carried("pretrain", [word for key in sets for word in ("--set", key)])
    assert "decay_tokens" not in yaml.safe_load((tmp_path / "pretrain.yaml").read_text())["train"]
    here = absolute_paths(load_config(overrides=sets, stage="pretrain"), tmp_path)
    assert job.model_dump() == here.model_dump() and job.train.lr == 6e-4
    for cfg in (job, here):
        schedule = schedule_over_the_run(cfg, 2048).train
        assert (schedule.warmup_tokens, schedule.decay_tokens) == (300 * 32 * 2048 // 10, 300 * 32 * 2048)


@pytest.mark.parametrize("stage, args", [
    ("prepare", ["builtin:python-docs", "--output", "out"]),
    ("label", ["corpus", "--output", "out", "--labeler", "quality", "--model", "q"]),
    ("pretrain", ["--set", "data.path=d"]),
    ("finetune", ["--set", "data.train=t.tsv"]),
])
def test_a_jobs_config_holds_only_sections_its_stage_reads_and_loads_there_without_a_warning(
        stage, args, tmp_path, capsys):
    """A prepare job's config held run.storage_path (made absolute), and the job warned that data prepare
    does not read run.*."""
    import yaml

    from mtnlg_ray.config import STAGE_SECTIONS, load_config

    spec = build_job(stage, args, cwd=tmp_path)
    config_file = tmp_path / "config.yaml"
    config_file.write_text(spec.config_yaml)
    config_stage = stage
    assert set(yaml.safe_load(spec.config_yaml)) <= set(STAGE_SECTIONS[config_stage])
    capsys.readouterr()
    load_config(config_file, stage=config_stage)
    assert capsys.readouterr().err == ""


def test_a_label_job_carries_its_labeler_and_model_path_as_text(tmp_path):
    spec = build_job("label", ["docs/", "--output", "out", "--labeler", "quality", "--model", "qm #2"], cwd=tmp_path)
    config = __import__("yaml").safe_load(spec.config_yaml)
    assert config["label"]["labeler"] == "quality" and config["label"]["model"] == str(tmp_path / "qm #2")
    assert "--labeler" in spec.argv and "quality" in spec.argv


def test_every_path_field_is_made_absolute_and_nothing_else(tmp_path):
    """Path fields are declared once (config.py's path types); `absolute_paths`, which submit, the trainers
    and self-training all use, rewrites exactly those, including ones added after submit was written."""
    from mtnlg_ray.config import LOCAL_PATH, Config, absolute_paths

    declared = {f"{section}.{name}" for section, info in Config.model_fields.items()
                for name, field in getattr(info.annotation, "model_fields", {}).items() if LOCAL_PATH in field.metadata}
    assert {"data.path", "data.train", "data.dev", "tokenizer.path", "label.model", "init.checkpoint",
            "run.storage_path", "selftrain.unlabelled", "selftrain.teacher", "decontam.eval_files",
            "filter.url_blocklist"} <= declared
    config = Config.model_validate({
        "data": {"path": "d", "train": "~/t.tsv", "dev": "dev.tsv"}, "tokenizer": {"path": "tok"},
        "decontam": {"eval_files": ["e1.jsonl", "builtin:python-docs", "s3://bucket/evals.jsonl"]},
        "filter": {"url_blocklist": "block.txt"},
        "read": {"weights": {"a.txt": 2.0}}, "run": {"name": "keep-me"}})
    done = absolute_paths(config, tmp_path)
    assert done.data.path == str(tmp_path / "d") and done.data.train == str(Path("~/t.tsv").expanduser())
    assert done.data.dev == str(tmp_path / "dev.tsv")
    # URIs and builtin: inputs stay as they are (data.* and run.storage_path refuse URIs: they are opened as files)
    assert done.decontam.eval_files == [str(tmp_path / "e1.jsonl"), "builtin:python-docs", "s3://bucket/evals.jsonl"]
    assert done.filter.url_blocklist == str(tmp_path / "block.txt") and done.tokenizer.path == str(tmp_path / "tok")
    assert done.run.storage_path == str(tmp_path / "runs") and done.run.name == "keep-me"
    assert done.read.weights == {str(tmp_path / "a.txt"): 2.0}
    assert config.data.path == "d"  # a copy: the given config is unchanged
    # What no path changed stays unset: a submitted job's config (what was set) held an empty decontam
    # section, which pretrain then warned about.
    assert "decontam" not in absolute_paths(Config(), tmp_path).model_dump(exclude_unset=True)


def test_submit_with_no_cluster_anywhere_is_one_line(tmp_path):
    # RAY_TMPDIR: where `local up` would have left its state, empty here.
    result = cli("submit", "pretrain", "--set", "data.path=x", env=clean_env(RAY_TMPDIR=str(tmp_path)))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: no Ray cluster to submit to: pass --address http://HEAD:8265, set RAY_ADDRESS, "
        "or start one on this machine with `mtnlg-ray local up`"]


def test_bad_config_fails_with_one_line_before_anything_is_submitted(local_ray, tmp_path):
    before = job_ids(cli("jobs", "list", "--address", local_ray.address).stdout)
    # Ray took such an id into its job table, failed, and listed the job as PENDING for good.
    bad_id = cli("submit", "pretrain", "--set", "data.path=data", "--job-id", "my run/1",
                 "--address", local_ray.address, cwd=tmp_path)
    assert bad_id.returncode == 2 and bad_id.stderr.strip().splitlines() == [
        "error: --job-id 'my run/1': expected letters, digits, '.', '_' and '-' only"]
    result = cli("submit", "pretrain", "--set", "data.path=data", "--set", "train.warmup=5",
                 "--address", local_ray.address, cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --set train.warmup=5: unknown key 'train.warmup'")
    assert job_ids(cli("jobs", "list", "--address", local_ray.address).stdout) == before
    # The dashboard without http:// was taken for a GCS address: 40 s, Ray's C++ log lines, then "GCS timed out".
    bare = local_ray.address.removeprefix("http://")
    no_scheme = cli("jobs", "list", "--address", bare, timeout=60)
    assert no_scheme.returncode == 2 and no_scheme.stderr.strip().splitlines() == [
        f"error: {bare} answers as a Ray dashboard, but HOST:PORT is read as a GCS address; give the dashboard as "
        f"http://{bare}"]
    # The GCS address (HOST:6379, RAY_ADDRESS's usual value) still reaches the job server: the check of
    # it as a dashboard read its gRPC answer as a broken HTTP reply, and that was a traceback.
    gcs = cli("jobs", "list", "--address", local_ray.state["gcs_address"], timeout=120)
    assert gcs.returncode == 0 and "Traceback" not in gcs.stderr, gcs.stderr


@pytest.mark.usefixtures("side_jobs")  # they run while this does
def test_prepare_pretrain_serve_through_submit(local_ray, tmp_path):
    write_corpus(tmp_path / "corpus.txt")
    address = ["--address", local_ray.address]
    # Relative paths, run from tmp_path: they must reach the job as this directory's.
    prepare = cli("submit", "prepare", "corpus.txt", "--output", "data", *TINY_PREPARE, *address, cwd=tmp_path)
    assert prepare.returncode == 0, prepare.stdout + prepare.stderr
    assert "succeeded" in prepare.stderr.splitlines()[-1]
    manifest = json.loads((tmp_path / "data" / "manifest.json").read_text())
    assert manifest["documents"] == 60 and manifest["pack"]["train_sequences"] > 0
    (prepare_id,) = set(job_ids(prepare.stderr))
    log = cli("jobs", "logs", prepare_id, *address).stdout
    assert f"data prepare {tmp_path / 'corpus.txt'} --output {tmp_path / 'data'}" in log and "tokenize + pack" in log
    # A job id the cluster has used: Ray's reason is the last line of a traceback it sends back,
    # and the error used to end at its first, "Traceback (most recent call last):".
    again = cli("submit", "prepare", "corpus.txt", "--output", "data2", "--job-id", prepare_id, *address, cwd=tmp_path)
    assert again.returncode == 2 and again.stderr.count("\n") == 1, again.stderr
    assert again.stderr.startswith(f"error: submitting the prepare job to {local_ray.address} failed: ")
    assert f"Job with submission_id {prepare_id} already exists" in again.stderr

    pretrain = cli("submit", "pretrain", "--set", "data.path=data", "--set", "run.storage_path=runs",
                   "--set", "run.name=tiny", "--set", "model.seq_len=32", "--set", "train.max_steps=3",
                   "--set", "train.global_batch_size=4", "--set", "train.micro_batch_size=2",
                   "--set", "train.eval_every=3", "--set", "train.eval_batches=1", "--set", "checkpoint.every_steps=3",
                   *address, cwd=tmp_path)
    assert pretrain.returncode == 0, pretrain.stdout + pretrain.stderr
    final = tmp_path / "runs" / "tiny" / "final"
    assert (final / "model.safetensors").is_file()
    steps = [json.loads(line) for line in (tmp_path / "runs" / "tiny" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps if "loss" in r] == [1, 2, 3]
    assert "step      3" in pretrain.stdout  # the job's log, followed to its end

    port = free_port()
    serve = cli("submit", "serve", "-c", "runs/tiny/final", "--port", port, "--no-wait", *address, cwd=tmp_path)
    assert serve.returncode == 0, serve.stdout + serve.stderr
    job_id, url = serve.stdout.split()
    # The printed follow-up names this cluster: without --address it went to the default one.
    assert f"(`mtnlg-ray jobs stop {job_id} --address {local_ray.address}` stops it)" in serve.stderr
    try:
        assert url == f"http://127.0.0.1:{port}/v1"
        reply = requests.post(f"{url}/completions", timeout=60,
                              json={"prompt": "the list", "max_tokens": 4, "temperature": 0})
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert body["model"] == "final" and body["usage"]["completion_tokens"] == 4
        assert cli("jobs", "status", job_id, *address).stdout.strip() == "RUNNING"
        # Its log says how to reach it, not "Ctrl-C to stop.": Ctrl-C on a followed log stops following.
        logs = cli("jobs", "logs", job_id, *address)
        assert "serving" in logs.stdout + logs.stderr and "Ctrl-C" not in logs.stdout + logs.stderr
        # A working_dir even without a config: else the driver starts wherever the raylet runs, and a
        # mtnlg_ray found there (an image's source tree) would shadow the shipped package.
        from mtnlg_ray.dashboard import connect

        info = connect(local_ray.address).get_job_info(job_id)
        assert info.runtime_env.get("working_dir", "").startswith("gcs://")
        # A second model on the same cluster used to replace this one silently (one app name, one
        # route, one HTTP port), its printed URL answering nothing: now its job fails in one line.
        second = cli("submit", "serve", "-c", "runs/tiny/final", "--port", free_port(), "--model-name", "second",
                     "--no-wait", *address, cwd=tmp_path)
        assert second.returncode == 2, second.stdout + second.stderr
        assert "Ray Serve on this cluster already serves mtnlg at '/'; stop it first" in second.stderr
        assert requests.get(f"{url}/models", timeout=30).json()["data"][0]["id"] == "final"
    finally:
        stop = cli("jobs", "stop", job_id, *address)
    assert stop.stdout.strip() == f"job {job_id}: STOPPED"
    # `jobs stop` sends SIGTERM, which ray.init's own handler used to take: the app kept serving.
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if requests.get(f"{url}/models", timeout=5).status_code != 200:  # Serve's proxy may stay up
                break
        except requests.ConnectionError:
            break
        time.sleep(1)
    else:
        raise AssertionError(f"{url} still answers a minute after `jobs stop`")
    (pretrain_id,) = set(job_ids(pretrain.stderr))
    rows = {cells[1].strip(): [c.strip() for c in cells[2:4]]
            for cells in (line.split("│") for line in cli("jobs", "list", *address).stdout.splitlines())
            if len(cells) > 4 and cells[1].strip().startswith("raysubmit_")}
    assert rows[prepare_id] == ["prepare", "SUCCEEDED"]
    assert rows[pretrain_id] == ["pretrain", "SUCCEEDED"]
    assert rows[job_id] == ["serve", "STOPPED"]


def test_plain_ray_job_submit_runs_a_jobs_entrypoint(side_jobs):
    stdout, stderr = side_jobs.plain.communicate(timeout=300)
    assert side_jobs.plain.returncode == 0, stdout + stderr
    assert "succeeded" in stdout + stderr
    assert json.loads((side_jobs.plain_output / "manifest.json").read_text())["documents"] == 30


def test_failing_job_exits_non_zero_with_the_tail_of_its_log(side_jobs):
    _, stderr = side_jobs.failing.communicate(timeout=300)
    assert side_jobs.failing.returncode == 2  # the stage's own exit code: a user error
    assert "--- last lines of the log of job raysubmit_" in stderr
    assert f"error: {side_jobs.failing_cwd / 'missing' / 'manifest.json'}: missing" in stderr
    assert stderr.strip().splitlines()[-1].endswith("FAILED with exit code 2 (its log ends above)")


def test_local_down_stops_every_process_of_its_cluster_and_nothing_else(local_ray):
    from mtnlg_ray.local_cluster import session_processes

    session = local_ray.state["session_id"]
    assert session_processes(session)
    # Its workers run at the driver's priority: the raylet that starts them got RAY_worker_niceness=0
    # (Ray's default, 15, would have them yield to every daemon of the cluster).
    raylets = [pid for pid in session_processes(session)
               if Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].endswith(b"/raylet")]
    assert len(raylets) == 1
    assert b"RAY_worker_niceness=0" in Path(f"/proc/{raylets[0]}/environ").read_bytes().split(b"\0")
    status = cli("local", "status", "--temp-dir", local_ray.temp_dir)
    assert status.returncode == 0 and local_ray.address in status.stdout
    # A process `ray stop` would take for Ray's (it matches on names such as dashboard.py), outside the cluster.
    lookalike = local_ray.temp_dir / "other" / "ray" / "dashboard" / "dashboard.py"
    lookalike.parent.mkdir(parents=True)
    lookalike.write_text("import time\ntime.sleep(60)\n")
    other = subprocess.Popen([sys.executable, str(lookalike)])
    try:
        down = cli("local", "down", "--temp-dir", local_ray.temp_dir)
        assert down.stdout.strip() == f"stopped the local cluster at {local_ray.address}"
        assert session_processes(session) == []
        assert other.poll() is None
    finally:
        other.kill()
    assert cli("local", "status", "--temp-dir", local_ray.temp_dir).returncode == 1
    assert not (local_ray.temp_dir / "ray_current_cluster").exists()
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{local_ray.address}/api/version", timeout=5)


def test_ctrl_c_during_local_up_leaves_no_ray_process_behind():
    """`ray start` runs in a session of its own, which the terminal's Ctrl-C never reaches: an interrupted
    `local up` used to leave 9 Ray processes running with no record for `local down` to find."""
    import signal
    import time

    temp = Path(tempfile.mkdtemp(prefix="mtnlg-lc-")) / "ray"  # short: Ray's socket paths have a length limit
    port = free_port()

    def ours() -> list[str]:
        # -ww: whole command lines (ps cuts them to $COLUMNS otherwise, before the temp dir)
        listing = subprocess.run(["ps", "-ww", "-eo", "pid,args"], capture_output=True, text=True).stdout
        return [line for line in listing.splitlines() if str(temp) in line and "pytest" not in line]

    proc = subprocess.Popen([EXE, "local", "up", "--temp-dir", str(temp), "--port", str(port),
                             "--dashboard-port", str(free_port()), "--num-cpus", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=clean_env())
    try:
        deadline = time.time() + 60
        while len(ours()) < 3 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert len(ours()) >= 3, proc.stdout.read() if proc.poll() is not None else "Ray never started"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) != 0
        deadline = time.time() + 20
        while ours() and time.time() < deadline:
            time.sleep(0.5)
        assert ours() == []
    finally:
        for line in ours():
            os.kill(int(line.split()[0]), signal.SIGKILL)
        shutil.rmtree(temp.parent, ignore_errors=True)


def test_a_local_cluster_record_is_ours_only_if_we_own_it(tmp_path):
    """/tmp/ray is writable by everyone: another user's record must not send our jobs to their cluster,
    and a record without a session directory matches no process."""
    from mtnlg_ray.local_cluster import STATE_FILE, LocalCluster, is_running, read_state

    record = {"dashboard_url": "http://127.0.0.1:8265", "gcs_address": "127.0.0.1:6379", "session_id": os.getsid(0),
              "session_dir": "", "temp_dir": str(tmp_path), "started_at": 0.0}
    (tmp_path / STATE_FILE).write_text(json.dumps(record))
    mine = read_state(tmp_path)
    assert mine == LocalCluster(**record)
    assert not is_running(mine)  # our own session is alive, but an empty session_dir proves nothing
    if os.getuid() == 0:  # only root can hand the file to another user here
        os.chown(tmp_path / STATE_FILE, 65534, 65534)
        assert read_state(tmp_path) is None


def test_a_serve_job_refuses_an_empty_api_key_as_serve_does(tmp_path, monkeypatch):
    # Its digest used to ship (the empty string's SHA-256), and an empty bearer token was let in.
    from mtnlg_ray.apikey import api_key_digest
    from mtnlg_ray.serve.app import parse_args

    with pytest.raises(ConfigError, match="^--api-key: expected a non-empty key"):
        build_job("serve", ["-c", "ckpt", "--api-key", " "], cwd=tmp_path)
    with pytest.raises(ConfigError, match="api_key_sha256: expected the digest of a non-empty key"):
        parse_args({"checkpoint": "ckpt", "api_key_sha256": api_key_digest("")})
    spec = build_job("serve", ["-c", "ckpt", "--api-key", "k3y"], cwd=tmp_path)
    assert spec.env_vars["MTNLG_API_KEY_SHA256"] == api_key_digest("k3y")

    # A variable set to nothing is no key for Click: the job would have served with none, unasked.
    for variable, what in (("MTNLG_API_KEY", "the key"), ("MTNLG_API_KEY_SHA256", "the key's SHA-256")):
        with monkeypatch.context() as env:
            env.setenv(variable, "")
            with pytest.raises(ConfigError, match=f"^{variable} is set but empty; set it to {what} "):
                build_job("serve", ["-c", "ckpt"], cwd=tmp_path)
            assert "--api-key" not in build_job("serve", ["-c", "ckpt", "--api-key", "k3y"], cwd=tmp_path).entrypoint
    # A digest in this machine's environment ships as a key from MTNLG_API_KEY does: the job served with none.
    with monkeypatch.context() as env:
        env.setenv("MTNLG_API_KEY_SHA256", api_key_digest("k3y"))
        assert build_job("serve", ["-c", "ckpt"], cwd=tmp_path).env_vars["MTNLG_API_KEY_SHA256"] == api_key_digest("k3y")
    # --env would ship the key itself, shown by `ray job list` and the dashboard.
    with pytest.raises(ConfigError, match=r"^--env MTNLG_API_KEY: a job's environment shows in `ray job list`"):
        build_job("serve", ["-c", "ckpt"], cwd=tmp_path, env=["MTNLG_API_KEY=k3y"])
    assert build_job("serve", ["-c", "ckpt"], cwd=tmp_path, env=["TOKENIZERS_PARALLELISM=false"]).env_vars == {
        "TOKENIZERS_PARALLELISM": "false"}
    # What `serve` refuses before anything starts, `submit serve` refuses before the job does.
    with pytest.raises(ConfigError, match="^--port 0: expected a port number from 1 to 65535"):
        build_job("serve", ["-c", "ckpt", "--port", "0"], cwd=tmp_path)
    with pytest.raises(ConfigError, match="^--replicas and --autoscale: give one of them, not both"):
        build_job("serve", ["-c", "ckpt", "--replicas", "1", "--autoscale", "1,4"], cwd=tmp_path)
    with pytest.raises(ConfigError, match="autoscale"):  # the options a deployment takes, checked as serve does
        build_job("serve", ["-c", "ckpt", "--autoscale", "4,2"], cwd=tmp_path)
    with monkeypatch.context() as env:  # a key and this machine's digest of another: serve refuses them too
        env.setenv("MTNLG_API_KEY_SHA256", api_key_digest("other"))
        with pytest.raises(ConfigError, match="api_key and api_key_sha256 disagree"):
            build_job("serve", ["-c", "ckpt", "--api-key", "k3y"], cwd=tmp_path)


def test_local_up_moves_off_a_default_port_another_ray_holds():
    # A second cluster on one machine: its dashboard agent could not bind Ray's default 52365 and
    # served no jobs ("No available agent to submit job"), while `local up` said it was up.
    from mtnlg_ray.local_cluster import DEFAULT_PORTS, _free_default_ports

    holders = []
    try:
        for port in DEFAULT_PORTS.values():
            holder = socket.socket()
            try:
                holder.bind(("0.0.0.0", port))
            except OSError:
                pass  # held already, by whatever holds it: the same case
            holders.append(holder)
        chosen = _free_default_ports([])
        assert chosen[0::2] == list(DEFAULT_PORTS)
        assert all(int(port) not in DEFAULT_PORTS.values() for port in chosen[1::2])
        given = _free_default_ports(["--dashboard-agent-listen-port=6000", "--ray-client-server-port", "6001"])
        assert given == []  # what the user sets is left to them
    finally:
        for holder in holders:
            holder.close()


def test_local_up_refuses_a_taken_or_impossible_port_before_starting_anything(tmp_path):
    """With the dashboard port held, `ray start` came up without a dashboard of its own, the other
    cluster's job server answered at the URL, and `local up` reported success: jobs went there.
    Port 99999 was accepted and Ray listened on 99999 - 65536."""
    temp = Path(tempfile.mkdtemp(prefix="mtnlg-lp-")) / "ray"
    try:
        with socket.socket() as held:
            held.bind(("127.0.0.1", 0))
            held.listen()
            taken = held.getsockname()[1]
            for option, other in (("--dashboard-port", "--port"), ("--port", "--dashboard-port")):
                up = cli("local", "up", "--temp-dir", str(temp), option, taken, other, free_port(), env=clean_env())
                assert up.returncode == 2 and up.stderr.strip().splitlines() == [
                    f"error: {option} {taken}: the port is taken (by another Ray?); {option} picks another"]
        up = cli("local", "up", "--temp-dir", str(temp), "--port", 99999, env=clean_env())
        assert up.returncode == 2 and up.stderr.strip().splitlines() == [
            "error: --port 99999: expected a port number from 1 to 65535"]
        assert not temp.exists() or not any(temp.iterdir())  # nothing was started
    finally:
        shutil.rmtree(temp.parent, ignore_errors=True)
