"""The cluster files: launcher YAML against Ray's own schema, KubeRay manifests against what KubeRay requires,
and all of them against the Dockerfile, the jobs/ entrypoints and the Serve application they run."""

from __future__ import annotations

import copy
import json
import re
import runpy
import shlex
import sys
import tomllib
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

from conftest import run_cli
from mtnlg_ray.cli.jobspec import STAGES
from mtnlg_ray.cli.jobspec import build_job as build_job_under

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
LAUNCHER_FILES = ["aws.yaml", "gcp.yaml"]
KUBERAY_FILES = {"raycluster.yaml": "RayCluster", "rayjob-pretrain.yaml": "RayJob", "rayservice.yaml": "RayService"}
# <registry>/mtnlg-ray:<version>-<variant>, what the Dockerfile's header says to tag and push.
IMAGE = re.compile(r"^[\w.-]+(?::\d+)?/(?:[\w.-]+/)*mtnlg-ray:(?P<version>[\w.]+)-(?P<variant>cpu|gpu)$")


def build_job(stage: str, args: list[str], **kwargs):
    """The job `mtnlg-ray submit STAGE ARGS` would send, parsed by the real `mtnlg-ray` command tree."""
    import typer

    from mtnlg_ray.cli import app

    return build_job_under(typer.main.get_command(app), stage, args, **kwargs)


def load(path: Path):
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def dockerfile() -> dict:
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    return {
        "text": text,
        "args": dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.M)),
        "from": re.search(r"^FROM (\S+)$", text, re.M).group(1),
        "workdir": re.search(r"^WORKDIR (\S+)$", text, re.M).group(1),
        "version": re.search(r'org\.opencontainers\.image\.version="([^"]+)"', text).group(1),
        "copies": re.findall(r"^COPY (?:--\S+ )*(.+) (\S+)$", text, re.M),
    }


def project_version() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["version"]


def ray_cluster_spec(manifest: dict) -> dict:
    spec = manifest["spec"]
    return {"RayCluster": spec, "RayJob": spec.get("rayClusterSpec"),
            "RayService": spec.get("rayClusterConfig")}[manifest["kind"]]


def pod_groups(cluster_spec: dict) -> list[dict]:
    return [cluster_spec["headGroupSpec"], *cluster_spec.get("workerGroupSpecs", [])]


def check_image(image: str, gpu: bool) -> None:
    match = IMAGE.match(image)
    assert match, f"{image}: not <registry>/mtnlg-ray:<version>-<variant>"
    assert match["version"] == project_version() == dockerfile()["version"]
    if gpu:
        assert match["variant"] == "gpu", f"{image} runs on a GPU node"


def test_dockerfile_builds_on_the_ray_we_run_and_ships_the_jobs_entrypoints():
    from packaging.requirements import Requirement

    docker = dockerfile()
    assert docker["args"]["RAY_VERSION"] == ray.__version__
    assert docker["from"] == "rayproject/ray:${RAY_VERSION}-${PYTHON}-${VARIANT}"
    assert docker["args"]["PYTHON"] == f"py{sys.version_info.major}{sys.version_info.minor}"
    pins = [Requirement(d) for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]]
    ray_pin = next(r for r in pins if r.name == "ray")
    assert ray_pin.specifier.contains(docker["args"]["RAY_VERSION"])
    copied = {dest.rstrip("/").removeprefix("./"): src for src, dest in docker["copies"]}
    assert copied.get("jobs") == "jobs" and copied.get("mtnlg_ray") == "mtnlg_ray"
    assert 'if [ "$VARIANT" = "cpu" ]' in docker["text"]  # gpu builds take the CUDA wheels


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_launcher_config_is_valid_for_rays_own_schema(name):
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = load(CLUSTER / name)
    jsonschema.validate(config, schema)
    # The schema has teeth: a misspelt key is refused.
    broken = copy.deepcopy(config)
    broken["max_worker"] = broken.pop("max_workers")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)
    # What the launcher checks beyond the schema.
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    workers = [t for name_, t in types.items() if name_ != config["head_node_type"]]
    assert workers and all(t["min_workers"] <= t["max_workers"] <= config["max_workers"] for t in workers)
    assert sum(t["min_workers"] for t in workers) <= config["max_workers"]
    assert any("ray start --head" in c and "--autoscaling-config=~/ray_bootstrap_config.yaml" in c
               for c in config["head_start_ray_commands"])
    assert any("--address=$RAY_HEAD_IP:6379" in c for c in config["worker_start_ray_commands"])


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_launcher_config_runs_the_project_image_with_the_bucket_mounted_where_runs_are_stored(name):
    config = load(CLUSTER / name)
    check_image(config["docker"]["image"], gpu=True)
    volumes = [o.split()[1] for o in config["docker"]["run_options"] if o.startswith("--volume")]
    host, container = volumes[0].split(":")[:2]
    mount = " ".join(config["initialization_commands"])
    assert re.search(rf"(s3fs|gcsfuse) .*{re.escape(host)}\b", mount), "the bucket is mounted on the host path"
    # The commands in the file's header store data and checkpoints on that mount.
    header = (CLUSTER / name).read_text(encoding="utf-8")
    assert f"run.storage_path={container}/" in header and f"data.path={container}/" in header
    if config["provider"]["type"] == "gcp":  # GCP nodes declare their resources for the autoscaler
        gpu_types = [t for t in config["available_node_types"].values() if t["resources"].get("GPU")]
        # GCE's `scheduling` is an object: GPU instances must stop for host maintenance (no live migration).
        # Ray's own examples give a list of one-key objects (ray-project/ray#46248), which GCE does not read.
        assert gpu_types and all(t["node_config"]["scheduling"] == {"onHostMaintenance": "TERMINATE"}
                                 for t in gpu_types)


@pytest.mark.parametrize("name", list(KUBERAY_FILES))
def test_kuberay_manifest_has_the_fields_kuberay_requires(name):
    manifest = load(CLUSTER / "kuberay" / name)
    assert manifest["apiVersion"] == "ray.io/v1"
    assert manifest["kind"] == KUBERAY_FILES[name]
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", manifest["metadata"]["name"])
    cluster = ray_cluster_spec(manifest)
    assert cluster["rayVersion"] == dockerfile()["args"]["RAY_VERSION"]
    head = cluster["headGroupSpec"]
    # rayStartParams is a map of strings in KubeRay's CRD: a bare number or bool is refused.
    assert isinstance(head["rayStartParams"], dict)
    assert head["rayStartParams"].get("dashboard-host") == "0.0.0.0"
    assert cluster["workerGroupSpecs"]
    for group in cluster["workerGroupSpecs"]:
        assert group["groupName"] and isinstance(group["rayStartParams"], dict)
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    for group in pod_groups(cluster):
        assert all(isinstance(v, str) for v in group["rayStartParams"].values())
        pod = group["template"]["spec"]
        volumes = {v["name"] for v in pod.get("volumes", [])}
        for container in [*pod["containers"], *pod.get("initContainers", [])]:
            assert container["name"]
            gpus = int(container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))
            check_image(container["image"], gpu=gpus > 0)
            assert {m["name"] for m in container.get("volumeMounts", [])} <= volumes
        claims = [v["persistentVolumeClaim"]["claimName"] for v in pod.get("volumes", []) if "persistentVolumeClaim" in v]
        assert claims == [load(CLUSTER / "kuberay" / "storage.yaml")["metadata"]["name"]]
    # A new Filestore / EFS share is root's, and the image runs as ray (uid 1000) in group users (100), the
    # owner its Dockerfile gives the files it copies: the head hands the share to them before Ray starts.
    assert "COPY --chown=ray:users" in dockerfile()["text"]
    (owner,) = head["template"]["spec"]["initContainers"]
    assert owner["securityContext"]["runAsUser"] == 0
    assert {m["mountPath"] for m in owner["volumeMounts"]} == {"/mnt/mtnlg"}
    assert "chown 1000:100 /mnt/mtnlg" in " ".join(owner["command"])
    # valid shell that never fails the pod (an EFS access point refuses chown even to root): run on a folder
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        argv = [arg.replace("/mnt/mtnlg", folder) for arg in owner["command"]]
        assert subprocess.run(argv, capture_output=True).returncode == 0


def test_rayjob_runs_a_jobs_entrypoint_from_the_image_with_a_valid_config_and_layout():
    from mtnlg_ray.train.parallel import check_layout

    manifest = load(CLUSTER / "kuberay" / "rayjob-pretrain.yaml")
    argv = shlex.split(manifest["spec"]["entrypoint"])
    assert argv[0] == "python"
    workdir = dockerfile()["workdir"]
    script = Path(argv[1])
    assert script.is_relative_to(workdir)
    assert (ROOT / script.relative_to(workdir)).is_file()
    assert script.name == "pretrain.py"
    spec = build_job("pretrain", argv[2:])  # the stage's own parser and config validation
    config = yaml.safe_load(spec.config_yaml)
    assert config["run"]["storage_path"].startswith("/mnt/mtnlg/") and config["parallel"]["use_gpu"]
    from mtnlg_ray.config import Config

    cfg = Config.model_validate(config)
    check_layout(cfg.model.resolve(), cfg.parallel.workers, cfg.parallel.tp, cfg.parallel.pp,
                 fsdp=cfg.parallel.fsdp, precision=cfg.train.precision)
    gpus = sum(group["replicas"] * int(group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
               for group in manifest["spec"]["rayClusterSpec"]["workerGroupSpecs"])
    assert gpus == cfg.parallel.workers  # one training worker per GPU the job's cluster has
    assert manifest["spec"]["shutdownAfterJobFinishes"] is True
    # As the job loads it (the shipped pretrain.yaml under the --set's): it trains to its max_tokens. The
    # shipped 200 steps ended it after 0.8 % of them, half-way through the warm-up.
    from mtnlg_ray.config import load_config

    sets = [argv[i + 1] for i in range(2, len(argv) - 1) if argv[i] == "--set"]
    loaded = load_config(overrides=sets, stage="pretrain")
    assert loaded.train.max_steps is None and loaded.train.max_tokens == loaded.train.decay_tokens == 26_000_000_000


def test_rayservice_serves_the_packages_app_with_args_it_accepts():
    import importlib

    from ray.serve.schema import ServeDeploySchema

    from mtnlg_ray.serve.app import parse_args

    manifest = load(CLUSTER / "kuberay" / "rayservice.yaml")
    serve_config = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(serve_config)
    shipped = load(ROOT / "mtnlg_ray" / "configs" / "serve.yaml")
    ServeDeploySchema.model_validate(shipped)
    (app,) = serve_config["applications"]
    assert app["import_path"] == "mtnlg_ray.serve:build_app" == shipped["applications"][0]["import_path"]
    module, _, attribute = app["import_path"].partition(":")
    assert callable(getattr(importlib.import_module(module), attribute))
    args = parse_args(app["args"])
    assert args.checkpoint.startswith("/mnt/mtnlg/") and args.num_gpus >= 1
    assert serve_config["http_options"]["port"] == 8000
    ports = [p["containerPort"] for c in manifest["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"]
             for p in c.get("ports", [])]
    assert 8000 in ports


@pytest.mark.parametrize("stage", list(STAGES))
def test_each_jobs_entrypoint_is_its_stages_own_command(stage, capsys, monkeypatch):
    import typer

    from mtnlg_ray.cli import app

    script = ROOT / "jobs" / f"{stage.replace('-', '_')}.py"
    assert script.is_file()
    assert STAGES[stage][0] in typer.main.get_command(app).commands, f"the CLI has no `{STAGES[stage][0]}` command"
    monkeypatch.setattr(sys, "argv", [str(script), "--help"])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(script), run_name="__main__")
    assert done.value.code == 0
    usage = " ".join(capsys.readouterr().out.split())
    assert f"Usage: jobs/{script.name} {' '.join(STAGES[stage])} [OPTIONS]" in usage


def test_readme_points_at_cluster_files_that_exist():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    mentioned = set(re.findall(r"\bcluster/[\w/.-]+\.yaml\b", readme))
    shipped = {str(p.relative_to(ROOT)) for p in CLUSTER.rglob("*.yaml")}
    assert mentioned, "the README's cluster section names the files"
    assert mentioned <= shipped
    assert {"cluster/aws.yaml", "cluster/gcp.yaml", "cluster/kuberay/rayjob-pretrain.yaml",
            "cluster/kuberay/rayservice.yaml"} <= mentioned


def readme_commands(prefix: str) -> list[list[str]]:
    """Shell commands in the README's code blocks that start with `prefix`, continuation lines joined."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```bash\n(.*?)```", readme, re.S)
    lines = "\n".join(blocks).replace("\\\n", " ").splitlines()
    return [shlex.split(line.split(" #")[0]) for line in lines if line.startswith(prefix)]


def test_readme_submit_commands_parse_and_validate(tmp_path):
    commands = readme_commands("mtnlg-ray submit ")
    assert len(commands) >= 5
    stages = set()
    for command in commands:
        args = command[3:]
        if "--address" in args:
            at = args.index("--address")
            del args[at:at + 2]
        args = [a for a in args if a != "--no-wait"]
        spec = build_job(command[2], args, cwd=tmp_path)  # raises on a missing option or a bad key
        stages.add(spec.stage)
    assert {"prepare", "pretrain", "serve"} <= stages
    for command in readme_commands("ray job submit "):
        script = command[command.index("--") + 2]
        assert (ROOT / script).is_file(), script


def test_a_served_job_gets_only_its_api_keys_digest_never_the_key(tmp_path, monkeypatch):
    """`ray job list` and the dashboard show a job's entrypoint and its runtime_env, whose environment
    variables Ray's runtime-env agent also logs: a key from --api-key or MTNLG_API_KEY travels as its
    SHA-256 in MTNLG_API_KEY_SHA256, which the job's `mtnlg-ray serve` reads (without it the job served
    unauthenticated), and the server holds only that digest."""
    from mtnlg_ray.apikey import api_key_digest
    from mtnlg_ray.serve.app import ServeArgs

    ckpt = str(tmp_path / "ckpt")
    monkeypatch.delenv("MTNLG_API_KEY", raising=False)
    given = build_job("serve", ["-c", ckpt, "--api-key", "s3cret", "--host", "0.0.0.0"])
    assert "s3cret" not in given.entrypoint and "--api-key" not in given.entrypoint
    assert given.env_vars == {"MTNLG_API_KEY_SHA256": api_key_digest("s3cret")} and "--host 0.0.0.0" in given.entrypoint
    assert "s3cret" not in repr(given)
    monkeypatch.setenv("MTNLG_API_KEY", "from-env")
    inherited = build_job("serve", ["-c", ckpt])
    assert inherited.env_vars == {"MTNLG_API_KEY_SHA256": api_key_digest("from-env")}
    assert "from-env" not in repr(inherited)
    monkeypatch.delenv("MTNLG_API_KEY")
    assert build_job("serve", ["-c", ckpt]).env_vars == {}
    # The server's arguments: the key turns into its digest at once; the digest alone works the same.
    args = ServeArgs(checkpoint=ckpt, api_key="s3cret")
    assert args.api_key is None and args.api_key_sha256 == api_key_digest("s3cret") and "s3cret" not in repr(args)
    assert ServeArgs(checkpoint=ckpt, api_key_sha256=api_key_digest("s3cret")) == args


def test_submit_finds_the_served_url_whatever_the_model_is_called():
    from mtnlg_ray.jobs import SERVING_LINE

    line = "serving my ckpt at http://10.0.0.5:8000/v1  (health: http://10.0.0.5:8000/health)"
    assert SERVING_LINE.search(line).group(1) == "http://10.0.0.5:8000"


@pytest.mark.parametrize("recipe", sorted((CLUSTER / "recipes").glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_recipes_are_layouts_the_trainer_runs(recipe):
    """`mtnlg-ray config show` validates each recipe as the trainer would (layout, schedule, batches)
    and the layout is the size its comment says."""
    from mtnlg_ray.config import load_config
    from mtnlg_ray.model.plan import plan_layout
    from mtnlg_ray.train.trainer import check_run_layout

    cfg = load_config(recipe, [], stage="pretrain")
    check_run_layout(cfg, cfg.model.resolve(), "lm")
    par = cfg.parallel
    plan = plan_layout(cfg.model.preset, par.tp, par.pp, par.workers // (par.tp * par.pp),
                       global_batch=cfg.train.global_batch_size, micro_batch=cfg.train.micro_batch_size,
                       gpu="a100-80gb")
    assert plan["gpus"] == par.workers and f"{par.workers:,}" in recipe.read_text()
    assert plan["memory_gb_per_gpu"]["fits"], plan["warnings"]


def test_config_show_refuses_a_layout_the_trainer_cannot_run():
    result = run_cli("config", "show", "--stage", "pretrain", "--set", "parallel.pp=8", "--set", "parallel.workers=8")
    assert result.returncode == 2
    assert result.stderr.strip() == "error: parallel.pp: 8 pipeline stages for 4 layers leaves stages empty"


def test_the_docker_build_context_leaves_out_history_and_runs_but_not_what_the_image_copies():
    """`docker build .` sent .git, work/ and runs/ (gigabytes) as its context: no .dockerignore."""
    import re

    ignored = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    assert {".git", "work", "runs"} <= set(ignored)
    copied = [word for line in (ROOT / "Dockerfile").read_text().splitlines() if line.startswith("COPY")
              for word in line.split()[1:-1] if not word.startswith("--")]
    assert {"pyproject.toml", "README.md", "mtnlg_ray", "jobs"} <= set(copied)
    for path in copied:
        assert not any(re.fullmatch(pattern.replace("**/", "(.*/)?").replace("*", "[^/]*"), path) for pattern in ignored)


def test_ci_fails_where_the_test_data_is_missing_instead_of_skipping_the_layout_tests(tmp_path, monkeypatch):
    """The multi-worker layout tests read tinyshakespeare.txt: a CI without it skipped them all and passed."""
    import conftest

    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "export MTNLG_REQUIRE_TEST_DATA=1" in ci and ci.index("MTNLG_REQUIRE_TEST_DATA") < ci.index("pytest")
    monkeypatch.setattr(conftest, "SHARED_DATA", tmp_path / "nowhere")
    monkeypatch.delenv("MTNLG_REQUIRE_TEST_DATA", raising=False)
    with pytest.raises(pytest.skip.Exception, match="test data not found"):
        conftest.shared_data("tinyshakespeare.txt")
    monkeypatch.setenv("MTNLG_REQUIRE_TEST_DATA", "1")
    with pytest.raises(pytest.fail.Exception, match="test data not found, and MTNLG_REQUIRE_TEST_DATA=1"):
        conftest.shared_data("tinyshakespeare.txt")
