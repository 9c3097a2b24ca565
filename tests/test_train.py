"""Pretraining on a real local Ray Train: model-parallel equivalence, exact resume after SIGKILL, elastic restart."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_cli, shared_data
from mtnlg_ray.config import load_config
from mtnlg_ray.errors import ConfigError, InputError


@pytest.fixture(scope="module")
def shakespeare(ray_session, tmp_path_factory) -> Path:
    """tinyshakespeare through the real corpus pipeline: paragraphs as documents, 64-token sequences."""
    from mtnlg_ray.data.pipeline import prepare_dataset

    output = tmp_path_factory.mktemp("shakespeare")
    config = load_config(
        overrides=["read.txt_mode=paragraph", "clean.enabled=false", "dedup.exact=false", "dedup.fuzzy=false",
                   "tokenizer.vocab_size=512", "pack.seq_len=64", "pack.val_fraction=0.05"],
        stage="prepare",
    )
    prepare_dataset([str(shared_data("tinyshakespeare.txt"))], output, config)
    return output


def train_config(dataset: Path, runs: Path, name: str, *extra: str, decay_tokens: int | None = 20000):
    """A `tiny` pretraining config for the tests; decay_tokens=None leaves the decay to the run's default."""
    decay = [f"train.decay_tokens={decay_tokens}"] if decay_tokens is not None else []
    return load_config(
        overrides=[
            f"data.path={dataset}", f"run.storage_path={runs}", f"run.name={name}",
            "model.preset=tiny", "model.seq_len=64", "train.max_steps=20", "train.global_batch_size=8",
            "train.micro_batch_size=2", "train.lr=3e-3", "train.warmup_tokens=2048", *decay,
            "train.eval_every=10", "train.eval_batches=2", "checkpoint.every_steps=10", "train.peak_tflops=1.0",
            *extra,
        ],
        stage="pretrain",
    )


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "final" / "model.safetensors"))


def assert_holds_what_plan_predicts(start: dict, single: dict) -> None:
    """The start event measures what the largest rank holds after setup: FSDP shards every parameter over
    the dp ranks, tensor parallel the blocks and the vocabulary over tp (positions, LayerNorms and the
    row-parallel biases stay whole on each rank); `mtnlg-ray plan` predicts it (its fp32 state is 16 bytes
    a parameter, a quarter of them weights)."""
    from mtnlg_ray.model.plan import plan_layout

    whole = single["local_param_bytes"]
    assert whole == 4 * single["trainable_parameters"]  # fp32
    ranks = start["dp"] * start["tp"]
    assert whole / ranks <= start["local_param_bytes"] <= 1.1 * whole / ranks, (start["dp"], start["tp"])
    if start["tp"] > 1:  # what tensor parallelism leaves whole is on every rank: more than a 1/ranks share
        assert start["local_param_bytes"] > whole / ranks
    planned = plan_layout("tiny", tp=start["tp"], pp=1, dp=start["dp"], seq_len=64, vocab_size=512)
    predicted = planned["memory_gb_per_gpu"]["fsdp_fp32_state"] * 1e9 / 4
    assert abs(predicted / start["local_param_bytes"] - 1) <= 0.02, (start["dp"], start["tp"])
    assert start["peak_rss_bytes"] > 100 * 2**20  # a Python process with torch: > 100 MiB


def _kill_after_checkpoint(metrics: Path, at_step: int, killed: dict) -> None:
    """Watch metrics.jsonl; a few steps after the checkpoint at `at_step`, SIGKILL the training worker.

    The few steps are work the failure throws away and the resume redoes; they take well under a
    second, often before Ray Train's controller has registered the checkpoint, which the restarted
    worker must find in the run directory all the same.
    """
    deadline = time.time() + 300
    while time.time() < deadline:
        records = [json.loads(l) for l in metrics.read_text().splitlines()] if metrics.is_file() else []
        starts = [r for r in records if r.get("event") == "start"]
        saved = [r["step"] for r in records if r.get("event") == "checkpoint" and r["step"] >= at_step]
        latest = max((r["step"] for r in records if "loss" in r), default=0)
        if starts and saved and latest >= saved[0] + 3:
            os.kill(starts[0]["pid"], signal.SIGKILL)
            killed["pid"], killed["after_step"] = starts[0]["pid"], saved[0]
            return
        time.sleep(0.05)


def _clean_and_killed_runs(shakespeare: Path, tmp_path: Path, *settings: str) -> tuple[Path, Path, dict]:
    """30 steps with a checkpoint every 10, run once undisturbed ("clean") and once with the first
    worker SIGKILLed a few steps after the step-10 checkpoint ("killed"); their run directories and
    what was killed. Fails unless the kill really landed mid-run."""
    from mtnlg_ray.train.trainer import pretrain

    settings = (*settings, "train.max_steps=30", "run.max_failures=2", "checkpoint.every_steps=10")
    clean = pretrain(train_config(shakespeare, tmp_path, "clean", *settings))
    killed: dict = {}
    watcher = threading.Thread(target=_kill_after_checkpoint, args=(tmp_path / "killed" / "metrics.jsonl", 10, killed))
    watcher.start()
    interrupted = pretrain(train_config(shakespeare, tmp_path, "killed", *settings))
    watcher.join()
    assert killed and killed["after_step"] < 30, "the worker was never killed mid-run"
    return Path(clean["run_dir"]), Path(interrupted["run_dir"]), killed


def test_sigkilled_worker_resumes_to_the_same_final_weights(shakespeare, tmp_path):
    clean, interrupted, killed = _clean_and_killed_runs(shakespeare, tmp_path, "parallel.workers=1")
    starts = read_start_events(interrupted)
    assert len(starts) == 2 and starts[1]["resumed_from"]["step"] == killed["after_step"]
    assert starts[1]["pid"] != killed["pid"]
    a, b = final_weights(clean), final_weights(interrupted)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6


@pytest.mark.slow  # 1-2 minutes; the pp2 layouts and resume are in the default run, this adds the failure
def test_a_sigkilled_pipeline_worker_resumes_to_the_same_final_weights(shakespeare, tmp_path):
    """pp2 (1F1B): rank 0 killed a few steps after the checkpoint at step 10; Ray Train restarts both
    stages from it and the run ends with the weights of one that was never interrupted."""
    clean, interrupted, _ = _clean_and_killed_runs(shakespeare, tmp_path, "parallel.workers=2", "parallel.pp=2")
    starts = read_start_events(interrupted)
    assert [(s["pp"], s["resumed_from"]) for s in starts] == [(2, None), (2, {"step": 10, "world_size": 2})]
    a, b = final_weights(clean), final_weights(interrupted)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6


@pytest.mark.slow  # 2-3 minutes: kept out of the default run so CI stays under 30 minutes on 2 cores
def test_rerunning_the_same_run_resumes_from_its_newest_checkpoint_at_another_world_size(shakespeare, tmp_path):
    from mtnlg_ray.train.trainer import pretrain

    first = pretrain(train_config(shakespeare, tmp_path, "grow", "parallel.workers=2"))
    assert first["steps"] == 20
    second = pretrain(train_config(shakespeare, tmp_path, "grow", "parallel.workers=1", "train.max_steps=30"))
    assert second["resumed_from"] is not None and second["steps"] == 30
    starts = [json.loads(l) for l in (Path(second["run_dir"]) / "metrics.jsonl").read_text().splitlines()
              if '"event": "start"' in l]
    assert starts[-1]["world_size"] == 1 and starts[-1]["resumed_from"] == {"step": 20, "world_size": 2}


EVERY_4 = ["checkpoint.every_steps=4", "train.eval_every=100"]


@pytest.fixture(scope="module")
def eight_steps_on_one_worker(shakespeare, tmp_path_factory) -> Path:
    from mtnlg_ray.train.trainer import pretrain

    runs = tmp_path_factory.mktemp("one-worker")
    return Path(pretrain(train_config(shakespeare, runs, "single", "parallel.workers=1", "train.max_steps=8",
                                      *EVERY_4))["run_dir"])


def test_a_rerun_that_cannot_resume_is_refused_rather_than_wiping_the_trained_run(
        shakespeare, eight_steps_on_one_worker, tmp_path):
    """A re-run with no complete checkpoint started afresh and deleted final/ and metrics.jsonl: without
    a word when every checkpoint was cut short, and with Ray's traceback (its record named checkpoints
    that were gone) when they had been moved away, as a refusal advises. A newest checkpoint moved
    away made Ray refuse to start even with an older one there to resume from."""
    import shutil

    from mtnlg_ray.errors import CheckpointError
    from mtnlg_ray.train.trainer import pretrain

    def copy(name: str) -> Path:
        run = tmp_path / name
        shutil.copytree(eight_steps_on_one_worker, run)
        return run

    def checkpoints(run: Path) -> list[Path]:
        return sorted((p for p in run.glob("checkpoint_*") if p.is_dir()), key=lambda p: json.loads(
            (p / "trainer_state.json").read_text())["step"])

    def rerun(name: str):
        return pretrain(train_config(shakespeare, tmp_path, name, "parallel.workers=1", "train.max_steps=8",
                                     *EVERY_4))

    cut = copy("cut")
    kept = (cut / "final" / "model.safetensors").read_bytes()
    for checkpoint in checkpoints(cut):
        (checkpoint / ".metadata").write_bytes((checkpoint / ".metadata").read_bytes()[:100])
    with pytest.raises(CheckpointError, match=f"^{cut}: no checkpoint there is complete \\(checkpoint_"):
        rerun("cut")
    moved = copy("moved")
    for checkpoint in checkpoints(moved):
        shutil.move(checkpoint, tmp_path / checkpoint.name)
    with pytest.raises(CheckpointError, match=f"^{moved}: holds a trained run \\(final/ or best/\\)"):
        rerun("moved")
    for run in (cut, moved):
        assert (run / "final" / "model.safetensors").read_bytes() == kept and (run / "metrics.jsonl").exists()

    older = copy("older")
    shutil.rmtree(checkpoints(older)[-1])  # step 8's; step 4's is there
    result = rerun("older")
    assert result["resumed_from"] is not None and "checkpoint_" in result["resumed_from"]
    assert result["steps"] == 8 and (older / "final" / "model.safetensors").is_file()


def test_a_rerun_names_the_cut_short_checkpoints_it_passes_over(eight_steps_on_one_worker, tmp_path, capsys):
    """The newest checkpoint cut short was passed over for an older one without a word, and the steps
    between them trained again."""
    import shutil

    from mtnlg_ray.train.checkpoint import latest_checkpoint
    from mtnlg_ray.train.trainer import _note_passed_over

    run = Path(shutil.copytree(eight_steps_on_one_worker, tmp_path / "run"))
    step4, step8 = sorted(p for p in run.glob("checkpoint_*") if p.is_dir())
    _note_passed_over(run, latest_checkpoint(run))
    assert capsys.readouterr().err == ""
    (step8 / ".metadata").write_bytes((step8 / ".metadata").read_bytes()[:100])
    assert latest_checkpoint(run) == step4
    _note_passed_over(run, step4)
    assert capsys.readouterr().err == (f"note: {run}: passing over {step8.name} (incomplete: cut short while being "
                                       f"written); resuming from {step4.name}\n")


def test_checkpoints_ray_did_not_record_are_pruned_as_checkpoint_keep_says(shakespeare, eight_steps_on_one_worker,
                                                                            tmp_path):
    """A run stopped by Ctrl-C left its last checkpoint out of Ray Train's record, and Ray prunes only what
    it recorded: with checkpoint.keep=2 a run directory held three checkpoints after one resume, four
    after the next."""
    import shutil

    from mtnlg_ray.train.trainer import pretrain

    run = Path(shutil.copytree(eight_steps_on_one_worker, tmp_path / "single"))
    step4, step8 = sorted(p for p in run.glob("checkpoint_*") if p.is_dir())
    left = run / "checkpoint_2000-01-01_00-00-00.000000"  # older than both, in no record
    shutil.copytree(step4, left)
    pretrain(train_config(shakespeare, tmp_path, "single", "parallel.workers=1", "train.max_steps=12", *EVERY_4))
    kept = sorted(p.name for p in run.glob("checkpoint_*") if p.is_dir())
    assert len(kept) == 2 and left.name not in kept and step8.name in kept, kept
    # Only complete checkpoints count toward keep: a newest one cut short does not push out the newest
    # complete one (unrecorded, as a Ctrl-C leaves it), which a re-run resumes from.
    from mtnlg_ray.train.trainer import _prune_unrecorded

    last_complete, cut = run / "checkpoint_9998-01-01_00-00-00.000000", run / "checkpoint_9999-01-01_00-00-00.000000"
    shutil.copytree(run / kept[-1], last_complete)
    shutil.copytree(run / kept[-1], cut)
    (cut / ".metadata").write_bytes((cut / ".metadata").read_bytes()[:100])
    _prune_unrecorded(run, keep=1)
    assert sorted(p.name for p in run.glob("checkpoint_*") if p.is_dir()) == [last_complete.name, cut.name]
    # The checkpoints Ray recorded go too when older than the newest `keep`: after a Ctrl-C, Ray counted
    # the unrecorded one among its two and kept an older one it recorded, three checkpoints for keep=2.
    # Its record of them goes with them; the next run's Ray starts a new one.
    snapshot = run / "checkpoint_manager_snapshot.json"
    assert not snapshot.exists()  # (a run directory whose record is gone starts Ray's anew: `older` above)
    # Kept by step, as a resume picks: a folder's name is its worker's clock, which may go back. The
    # newest step in a folder whose name reads oldest is kept; the others go.
    import json

    from mtnlg_ray.train.checkpoint import STATE_FILE

    shutil.rmtree(cut)
    skewed = run / "checkpoint_1999-01-01_00-00-00.000000"
    shutil.copytree(last_complete, skewed)
    state = json.loads((skewed / STATE_FILE).read_text())
    (skewed / STATE_FILE).write_text(json.dumps({**state, "step": state["step"] + 4}))
    snapshot.write_text(json.dumps({"checkpoint_results": []}))  # a record that names neither
    _prune_unrecorded(run, keep=1)
    assert [p.name for p in run.glob("checkpoint_*") if p.is_dir()] == [skewed.name]


def test_a_rerun_with_another_model_shape_is_refused_not_resumed_from_part_of_the_old_one(
        shakespeare, eight_steps_on_one_worker):
    """DCP reads only the tensors the new model asks for: a re-run of the same run with 2 layers instead
    of 4 used to continue from the old model's first two blocks. Now it is one line, and nothing of
    the run is touched. (A run choice, such as model.dropout, may still change on resume.)"""
    from mtnlg_ray.train.trainer import pretrain

    run_dir = eight_steps_on_one_worker
    before = (run_dir / "metrics.jsonl").read_bytes()
    with pytest.raises(ConfigError) as err:
        pretrain(train_config(shakespeare, run_dir.parent, "single", "parallel.workers=1", "train.max_steps=12",
                              *EVERY_4, "model.n_layer=2"))
    assert f"{run_dir}: the run resumes from checkpoint_" in str(err.value)
    assert "a model with n_layer 4, but this run's model has n_layer 2" in str(err.value)
    assert (run_dir / "metrics.jsonl").read_bytes() == before


def test_a_rerun_on_a_dataset_prepared_again_is_refused_not_resumed_into_another_order(
        shakespeare, eight_steps_on_one_worker, tmp_path):
    """The checkpoint's cursor counts sequences of the dataset it trained on: the same text prepared
    again with another split seed holds other sequences in other places, so resuming would neither
    finish the epoch nor repeat nothing. The token index's digest is recorded and compared."""
    import shutil

    from mtnlg_ray.train.trainer import pretrain

    again = tmp_path / "again"
    shutil.copytree(shakespeare, again)
    index = json.loads((again / "tokens" / "index.json").read_text())
    index["val_indices"] = [i + 1 for i in index["val_indices"]]  # as another pack.seed would hold out
    (again / "tokens" / "index.json").write_text(json.dumps(index))
    run_dir = eight_steps_on_one_worker
    before = (run_dir / "metrics.jsonl").read_bytes()
    with pytest.raises(ConfigError, match=f"^{run_dir}: the run resumes from checkpoint_.*, trained on another "
                                          f"data.path than {again} holds now"):
        pretrain(train_config(again, run_dir.parent, "single", "parallel.workers=1", "train.max_steps=12", *EVERY_4))
    assert (run_dir / "metrics.jsonl").read_bytes() == before


@pytest.mark.parametrize(
    ("first", "then", "layouts"),
    [
        # tp2, then FSDP over dp2: dp2 x tp2-then-one below reshards both dimensions at once, so this one is in
        # the -m slow run (40 s of CI budget)
        pytest.param(["parallel.workers=2", "parallel.tp=2"], ["parallel.workers=2"], [(1, 2), (2, 1)],
                     marks=pytest.mark.slow),
        # FSDP over dp2, then tp2: tp2-then-dp2 reversed, so only in the -m slow run (50 s of CI budget)
        pytest.param(["parallel.workers=2"], ["parallel.workers=2", "parallel.tp=2"], [(2, 1), (1, 2)],
                     marks=pytest.mark.slow),
        # a 2D layout, FSDP over dp2 x tp2 on 4 gloo workers sharing 2 cores, then a single worker
        (["parallel.workers=4", "parallel.tp=2", "parallel.cpus_per_worker=0.5"], ["parallel.workers=1"],
         [(2, 2), (1, 1)]),
    ],
    ids=["tp2-then-dp2", "dp2-then-tp2", "dp2xtp2-then-one"],
)
def test_a_run_checkpointed_at_one_layout_continues_at_another_as_one_worker_would(
    shakespeare, eight_steps_on_one_worker, tmp_path, first, then, layouts
):
    """Resharding proven by values: 4 steps at one layout, a checkpoint, the same run.name again at
    another layout to step 8: the losses, grad norms and final weights of one worker's 8 steps."""
    from mtnlg_ray.train.trainer import pretrain

    pretrain(train_config(shakespeare, tmp_path, "moved", *first, "train.max_steps=4", *EVERY_4))
    moved = Path(pretrain(train_config(shakespeare, tmp_path, "moved", *then, "train.max_steps=8",
                                       *EVERY_4))["run_dir"])
    starts = read_start_events(moved)
    world = layouts[0][0] * layouts[0][1]
    assert [(s["dp"], s["tp"], s["resumed_from"]) for s in starts] == [
        (*layouts[0], None), (*layouts[1], {"step": 4, "world_size": world})]
    assert_trains_like(moved, eight_steps_on_one_worker, steps=8)
    single = read_start_events(eight_steps_on_one_worker)[0]
    for start in [single, *starts]:
        assert_holds_what_plan_predicts(start, single)


PIPELINES = {  # GPipe is the first half of the pp2 -> pp1 resume test below; 1F1B is the default
    "pp2-interleaved": ["parallel.workers=2", "parallel.pp=2", "parallel.pp_schedule=interleaved-1f1b",
                        "parallel.pp_virtual=2"],
    "pp2-zero-bubble": ["parallel.workers=2", "parallel.pp=2", "parallel.pp_schedule=interleaved-zero-bubble",
                        "parallel.pp_virtual=2"],
    "pp2xdp2": ["parallel.workers=4", "parallel.pp=2", "parallel.cpus_per_worker=0.5"],
    "pp2xtp2": ["parallel.workers=4", "parallel.pp=2", "parallel.tp=2", "parallel.cpus_per_worker=0.5"],
    "pp2xtp2xdp2": ["parallel.workers=8", "parallel.pp=2", "parallel.tp=2", "parallel.cpus_per_worker=0.25"],
    # the schedule detaches stage outputs in place, which the tp loss (a view) refused on step 1
    "pp2xtp2-zero-bubble": ["parallel.workers=4", "parallel.pp=2", "parallel.tp=2", "parallel.cpus_per_worker=0.5",
                            "parallel.pp_schedule=interleaved-zero-bubble", "parallel.pp_virtual=2"],
}


# pp2xdp2 and pp2xtp2 are the two halves of pp2xtp2xdp2, which the default run keeps; -m slow adds them
# (about 70 s of the 30-minute CI budget) and zero bubble, which runs without FSDP only (dp 1, fp32).
SLOW_PIPELINES = {"pp2xdp2", "pp2xtp2", "pp2-zero-bubble", "pp2xtp2-zero-bubble"}


@pytest.mark.parametrize("layout", [pytest.param(name, marks=pytest.mark.slow) if name in SLOW_PIPELINES else name
                                    for name in PIPELINES])
def test_a_pipelined_run_trains_as_one_worker_does(shakespeare, eight_steps_on_one_worker, tmp_path, layout):
    """Pipeline parallelism alone (interleaved 1F1B, 2 stages a rank) and in 3D with FSDP and tensor
    parallelism (1F1B): one worker's 8 steps, losses, grad norms and final weights."""
    from mtnlg_ray.train.trainer import pretrain

    run = Path(pretrain(train_config(shakespeare, tmp_path, layout, *PIPELINES[layout], "train.max_steps=8",
                                     *EVERY_4))["run_dir"])
    start = read_start_events(run)[0]
    assert start["pp"] == 2 and start["world_size"] == int(PIPELINES[layout][0].split("=")[1])
    settings = dict(s.split("=") for s in PIPELINES[layout])
    assert (start["pp_schedule"], start["pp_virtual"]) == (settings.get("parallel.pp_schedule", "1f1b"),
                                                           int(settings.get("parallel.pp_virtual", 1)))
    assert start["trainable_parameters"] == read_start_events(eight_steps_on_one_worker)[0]["trainable_parameters"]
    # torch's schedule that ran each step, not the config echoed (every step has pp micro-batches or more)
    from mtnlg_ray.train.pipeline import SCHEDULES
    from mtnlg_ray.train.plot import read_metrics

    ran = {r["pp_schedule_ran"] for r in read_metrics(run)}
    assert ran == {SCHEDULES[start["pp_schedule"]][0].__name__}, ran
    assert_trains_like(run, eight_steps_on_one_worker, steps=8)


def test_ddp_trains_as_one_worker_does(shakespeare, eight_steps_on_one_worker, tmp_path, capsys):
    """parallel.fsdp=false on 2 workers: DDP wraps the model once its weights are real (wrapping the
    meta-device model used to fail on every worker), each rank holds all of it, and the 8 steps are
    one worker's."""
    from mtnlg_ray.train.trainer import pretrain

    run = Path(pretrain(train_config(shakespeare, tmp_path, "ddp", "parallel.workers=2", "parallel.fsdp=false",
                                     "train.max_steps=8", *EVERY_4))["run_dir"])
    start, single = read_start_events(run)[0], read_start_events(eight_steps_on_one_worker)[0]
    assert start["dp"] == 2 and start["local_param_bytes"] == single["local_param_bytes"]  # replicated
    assert_trains_like(run, eight_steps_on_one_worker, steps=8)
    # The same run again: finished, it trains nothing and says so with its own last step (it returned
    # None, and a second quickstart in one folder failed reading the loss off it).
    capsys.readouterr()
    again = pretrain(train_config(shakespeare, tmp_path, "ddp", "parallel.workers=2", "parallel.fsdp=false",
                                  "train.max_steps=8", *EVERY_4))
    last = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r][-1]
    assert again["resumed_from"] is not None and again["steps"] == 8 and again["metrics"] == last
    assert f"note: the run in {run} had ended at step 8 already" in capsys.readouterr().err  # not as if it ran


def test_a_run_stopped_under_pp2_continues_at_pp1_as_one_worker_would(shakespeare, eight_steps_on_one_worker, tmp_path):
    """4 steps at pp2 (GPipe), a checkpoint, the same run.name again on one worker to step 8: one
    worker's 8 uninterrupted steps."""
    from mtnlg_ray.train.plot import read_metrics
    from mtnlg_ray.train.trainer import pretrain

    pretrain(train_config(shakespeare, tmp_path, "moved", "parallel.workers=2", "parallel.pp=2",
                          "parallel.pp_schedule=gpipe", "train.max_steps=4", *EVERY_4))
    moved = Path(pretrain(train_config(shakespeare, tmp_path, "moved", "parallel.workers=1", "train.max_steps=8",
                                       *EVERY_4))["run_dir"])
    assert [(s["pp"], s["resumed_from"]) for s in read_start_events(moved)] == [
        (2, None), (1, {"step": 4, "world_size": 2})]
    assert {r["pp_schedule_ran"] for r in read_metrics(moved) if r["step"] <= 4} == {"ScheduleGPipe"}
    assert_trains_like(moved, eight_steps_on_one_worker, steps=8)


def test_a_resumed_run_with_dropout_is_exactly_the_uninterrupted_run(shakespeare, eight_steps_on_one_worker, tmp_path):
    """Dropout 0.1: the random masks after a resume continue the saved generator, so stopping at step 4
    and rerunning the same run.name to step 8 changes nothing, to the bit on one worker."""
    from mtnlg_ray.train.plot import read_metrics
    from mtnlg_ray.train.trainer import pretrain

    # No configured peak: the worker times its matmul peak at each start and again 3 steps in, and
    # those timings must not draw from the generator the dropout masks come from.
    settings = ["parallel.workers=1", "model.dropout=0.1", "checkpoint.every_steps=4", "train.eval_every=100",
                "train.peak_tflops=null"]
    whole = Path(pretrain(train_config(shakespeare, tmp_path, "whole", *settings, "train.max_steps=8"))["run_dir"])
    pretrain(train_config(shakespeare, tmp_path, "halves", *settings, "train.max_steps=4"))
    halves = Path(pretrain(train_config(shakespeare, tmp_path, "halves", *settings, "train.max_steps=8"))["run_dir"])
    assert [s["resumed_from"] for s in read_start_events(halves)] == [None, {"step": 4, "world_size": 1}]
    recorded = [json.loads(f.read_text()) for f in halves.glob("checkpoint_*/trainer_state.json")]
    assert recorded and all((r["warmup_tokens"], r["decay_tokens"]) == (2048, 20000) for r in recorded)
    assert [r["loss"] for r in read_metrics(halves)] == [r["loss"] for r in read_metrics(whole)]
    a, b = final_weights(whole), final_weights(halves)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # dropout really ran: the same run without it (the fixture; its peak_tflops and eval_every change no
    # loss) has another loss from step 1 on
    assert read_metrics(eight_steps_on_one_worker)[0]["loss"] != read_metrics(whole)[0]["loss"]


def test_batch_rampup_follows_its_schedule_and_any_layout_trains_on_the_same_batches(shakespeare, tmp_path):
    """Ramp 4 → 8 sequences after 1,024 tokens (4 steps of 4 x 64 tokens): the global batch per step is
    the schedule's, and one worker and two (FSDP) see the same batches, hence the same losses. With
    train.decay_tokens unset, the cosine decays over the 3,072 tokens the ramped run takes (8 full
    batches would be 4,096)."""
    import math

    from mtnlg_ray.train.plot import read_metrics
    from mtnlg_ray.train.trainer import pretrain

    settings = ["train.max_steps=8", "train.global_batch_size=8", "train.micro_batch_size=2",
                "train.batch_rampup={'start': 4, 'increment': 4, 'tokens': 1024}", "train.eval_every=100",
                "train.warmup_tokens=512"]
    runs = {workers: read_metrics(Path(pretrain(train_config(
        shakespeare, tmp_path, f"ramp{workers}", f"parallel.workers={workers}", *settings,
        decay_tokens=None))["run_dir"]))
        for workers in (1, 2)}
    before = [0, 256, 512, 768, 1024, 1536, 2048, 2560]  # tokens when each step's LR is set
    expected = [3e-3 * t / 512 if t < 512 else 3e-4 + 2.7e-3 * 0.5 * (1 + math.cos(math.pi * (t - 512) / 2560))
                for t in before]
    for records in runs.values():
        assert [r["global_batch"] for r in records] == [4, 4, 4, 4, 8, 8, 8, 8]
        assert [r["tokens"] for r in records] == [256, 512, 768, 1024, 1536, 2048, 2560, 3072]
        assert [r["lr"] for r in records] == pytest.approx(expected, rel=1e-6)
    for one, two in zip(runs[1], runs[2]):
        assert abs(one["loss"] - two["loss"]) <= 2e-5 and abs(one["grad_norm"] - two["grad_norm"]) <= 1e-5 * one["grad_norm"]
    a, b = final_weights(tmp_path / "ramp1"), final_weights(tmp_path / "ramp2")  # and the same weights
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-3
    # A longer re-run of ramp1 resumes it and keeps the schedule it recorded: `config show` gives those
    # values and says where they come from (it called them the new run's own, "derived: the run's tokens").
    sets = [f"data.path={shakespeare}", f"run.storage_path={tmp_path}", "run.name=ramp1", "model.preset=tiny",
            "model.seq_len=64", "train.global_batch_size=8", "train.micro_batch_size=2", "train.max_steps=400"]
    shown = run_cli("config", "show", "--stage", "pretrain", *[arg for key in sets for arg in ("--set", key)])
    assert shown.returncode == 0, shown.stderr[-2000:]
    for key, value in (("warmup_tokens", 512), ("decay_tokens", 3072)):  # the ramped run's 3,072 tokens
        assert (f"  # {key}: {value}  (derived: recorded by the run in {tmp_path / 'ramp1'}, which this config "
                "resumes)") in shown.stdout.splitlines()
    # Its 392 added steps would train at the floor LR: said, with the setting that decays over them.
    assert shown.stderr.startswith("warning: the run resumes with the decay its checkpoint recorded (3,072 tokens), "
                                   "shorter than this run's ") and "set train.decay_tokens=" in shown.stderr


@pytest.mark.slow  # 47 s of the CI budget; torch.compile is an option no default uses
def test_a_compiled_run_takes_the_same_steps_as_eager(shakespeare, eight_steps_on_one_worker, tmp_path):
    """`train.compile=true` (each block through torch.compile / inductor) on one worker: the first
    three steps' losses and grad norms are eager's, to float rounding of fused kernels."""
    from mtnlg_ray.train.plot import read_metrics
    from mtnlg_ray.train.trainer import pretrain

    compiled = Path(pretrain(train_config(shakespeare, tmp_path, "compiled", "parallel.workers=1", "train.compile=true",
                                          "train.max_steps=3", *EVERY_4))["run_dir"])
    eager = {r["step"]: r for r in read_metrics(eight_steps_on_one_worker)}
    records = read_metrics(compiled)
    assert [r["step"] for r in records] == [1, 2, 3]
    for record in records:
        ref = eager[record["step"]]
        assert abs(record["loss"] - ref["loss"]) <= 1e-4
        assert abs(record["grad_norm"] - ref["grad_norm"]) <= 1e-3 * ref["grad_norm"]
    assert records[-1]["loss"] < records[0]["loss"]


def assert_trains_like(run_dir: Path, reference_dir: Path, steps: int, loss_bound: float = 2e-5,
                       norm_bound: float = 1e-5) -> None:
    """Every step's loss within 2e-5 and grad norm within 1e-5 relative, final weights within 1e-3
    (Adam turns rounding noise in near-zero gradients into lr-sized steps). A layout's summation order
    moves 8 steps' losses by 5e-7 at most and norms by 1e-8 relative; one block's LayerNorm gradient
    lost each step moves them by 6e-5 and 1e-4."""
    from mtnlg_ray.train.plot import read_metrics

    reference = {r["step"]: r for r in read_metrics(reference_dir)}
    other = {r["step"]: r for r in read_metrics(run_dir)}  # a step redone after a failure: its last record
    assert sorted(other) == sorted(reference) == list(range(1, steps + 1))
    for step, ref in reference.items():
        assert abs(other[step]["loss"] - ref["loss"]) <= loss_bound, (step, other[step]["loss"], ref["loss"])
        assert abs(other[step]["grad_norm"] - ref["grad_norm"]) <= norm_bound * ref["grad_norm"], step
    a, b = final_weights(reference_dir), final_weights(run_dir)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-3


def read_start_events(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if '"event": "start"' in line]


@pytest.mark.slow  # 2-3 minutes: kept out of the default run so CI stays under 30 minutes on 2 cores
def test_elastic_run_continues_on_fewer_workers_after_one_is_killed(shakespeare, tmp_path):
    """A node (and the worker on it) dies mid-run: training restarts on one worker from the checkpoint made at two."""
    import subprocess
    import sys

    from mtnlg_ray.train.trainer import pretrain

    script = Path(__file__).parent / "elastic_run.py"
    proc = subprocess.run([sys.executable, str(script), str(shakespeare), str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["node_removed_after_step"] is not None, "the node was never removed"
    records = [json.loads(l) for l in (tmp_path / "elastic" / "metrics.jsonl").read_text().splitlines()]
    starts = [r for r in records if r.get("event") == "start"]
    assert [s["world_size"] for s in starts][0] == 2 and starts[-1]["world_size"] == 1
    assert starts[-1]["resumed_from"]["world_size"] == 2
    assert starts[-1]["resumed_from"]["step"] <= result["node_removed_after_step"]
    assert records[-1]["event"] == "done" and result["steps"] == 30
    # every step from the resumed one on ran at the new world size
    after = [r for r in records if "loss" in r and r["step"] > starts[-1]["resumed_from"]["step"]]
    assert after and all(r["world_size"] == 1 for r in after[-5:])
    # Values, not only bookkeeping: two FSDP workers and one take the same global batches, so the run
    # that lost a node trains as one uninterrupted worker does, redone steps included.
    reference = Path(pretrain(train_config(shakespeare, tmp_path, "reference", "parallel.workers=1",
                                           "train.max_steps=30", "train.eval_every=20"))["run_dir"])
    # 30 steps and a restart: the bounds this test had before the 8-step ones were tightened
    assert_trains_like(tmp_path / "elastic", reference, steps=30, loss_bound=1e-4, norm_bound=1e-3)


def test_a_resumed_run_keeps_the_decay_it_started_with_at_another_worker_count(tmp_path):
    """The default decay follows the data-parallel size: a run started on 1 worker and re-run on 3 used to
    decay over 307,200 tokens instead of 409,600, and its LR dropped at the resume. The checkpoint
    records the schedule, and a re-run of the same run.name keeps it unless train.decay_tokens is set."""
    import torch.distributed.checkpoint as dcp

    from mtnlg_ray.train.checkpoint import STATE_FILE, TrainerState
    from mtnlg_ray.train.trainer import schedule_over_the_run

    def config(*extra):
        return load_config(overrides=[f"run.storage_path={tmp_path}", "run.name=r", "train.max_steps=100",
                                      "train.micro_batch_size=8", "train.global_batch_size=32", *extra],
                           stage="pretrain")

    started = schedule_over_the_run(config("parallel.workers=1"), 128)
    assert schedule_over_the_run(config("parallel.workers=3"), 128).train.decay_tokens != started.train.decay_tokens
    checkpoint = tmp_path / "r" / "checkpoint_50"
    checkpoint.mkdir(parents=True)
    dcp.save({"model": {"w": torch.zeros(2)}}, checkpoint_id=str(checkpoint))
    (checkpoint / "rng-rank0.json").write_text("{}")
    state = TrainerState(step=50, warmup_tokens=started.train.warmup_tokens, decay_tokens=started.train.decay_tokens)
    (checkpoint / STATE_FILE).write_text(json.dumps(state.__dict__))
    assert schedule_over_the_run(config("parallel.workers=3"), 128).train.decay_tokens == started.train.decay_tokens
    chosen = schedule_over_the_run(config("parallel.workers=3", "train.decay_tokens=12345"), 128)
    assert chosen.train.decay_tokens == 12345


def test_unset_decay_tokens_schedule_over_the_run_and_a_set_one_is_kept():
    """`mtnlg-ray pretrain --set train.max_steps=300` decays over those 300 steps, not a fixed token count."""
    from mtnlg_ray.train.schedule import learning_rate, run_tokens
    from mtnlg_ray.train.trainer import schedule_over_the_run

    cfg = load_config(overrides=["model.preset=small", "train.max_steps=300"], stage="pretrain")
    cfg = schedule_over_the_run(cfg, 128)
    assert cfg.train.decay_tokens == 300 * 32 * 128
    floor = cfg.train.lr * cfg.train.min_lr_ratio
    assert learning_rate(299 * 32 * 128, cfg.train) < 1.001 * floor  # the last step's LR
    assert learning_rate(244 * 32 * 128, cfg.train) > 1.5 * floor  # where the old fixed 1M-token decay hit it
    kept = load_config(overrides=["train.max_steps=300", "train.decay_tokens=1000000"], stage="pretrain")
    assert schedule_over_the_run(kept, 128).train.decay_tokens == 1_000_000
    by_tokens = load_config(overrides=["train.max_tokens=50000"], stage="pretrain").train  # and max_steps 200
    assert run_tokens(by_tokens, 128) == 13 * 32 * 128  # the step that crosses 50,000 tokens is the last
    assert run_tokens(by_tokens.model_copy(update={"max_steps": None}), 128) == 50_000
    assert run_tokens(by_tokens.model_copy(update={"max_steps": None, "max_tokens": None}), 128) is None
    # Batches as the workers take them: whole micro-batches (8) at each data-parallel rank, so 3 ranks
    # take 24 of the 32 and 8 ranks 64; the decay follows, and still ends on the last step.
    for workers, batch in ((3, 24), (8, 64)):
        spread = load_config(overrides=["train.max_steps=200", f"parallel.workers={workers}"], stage="pretrain")
        assert schedule_over_the_run(spread, 128).train.decay_tokens == 200 * batch * 128
    # A run that only its epochs end (max_steps unset) decays over them: one pass over 1,000
    # sequences is 32 steps of 32, not MT-NLG's 340B tokens at the peak LR.
    one_pass = load_config(overrides=["train.max_steps=null"], stage="pretrain")
    assert schedule_over_the_run(one_pass, 128, sequences=1000).train.decay_tokens == 32 * 32 * 128


def test_an_unset_warm_up_is_the_presets_and_at_most_a_tenth_of_the_run():
    """The shipped file's 100,000 warm-up tokens used to reach every preset: gpt3-1.3b's 32 x 2048-token
    batches warmed up for under two steps, where GPT-3 warmed up over 375M tokens."""
    from mtnlg_ray.train.schedule import learning_rate
    from mtnlg_ray.train.trainer import schedule_over_the_run

    def warmup(*overrides, seq_len=2048, sequences=None):
        cfg = load_config(overrides=list(overrides), stage="pretrain")
        return schedule_over_the_run(cfg, seq_len, sequences).train.warmup_tokens

    # A long run gets the preset's own; a 300-step laptop run a tenth of its tokens, so it leaves the warm-up.
    assert warmup("model.preset=gpt3-1.3b", "train.max_steps=60000") == 375_000_000  # 3.9B tokens
    short = load_config(overrides=["model.preset=gpt3-1.3b", "train.max_steps=300"], stage="pretrain")
    short = schedule_over_the_run(short, 2048).train
    assert short.warmup_tokens == 300 * 32 * 2048 // 10
    assert learning_rate(30 * 32 * 2048, short) == pytest.approx(2e-4)  # the peak at step 30, then the cosine
    assert learning_rate(15 * 32 * 2048, short) == pytest.approx(1e-4)
    assert warmup("model.preset=mtnlg-530b", "train.max_steps=null") == 1_000_000_000  # unbounded: MT-NLG's 1B
    assert warmup("model.preset=small", "train.max_steps=300", seq_len=256) == 100_000  # under a tenth of 2.5M
    assert warmup("train.max_steps=200", seq_len=128) == 200 * 32 * 128 // 10  # tiny's shipped run: 20 steps
    assert warmup("model.preset=gpt3-1.3b", "train.max_steps=300", "train.warmup_tokens=5000") == 5000  # set: kept
    # A set decay shorter than the run caps it too: a tenth of its 1M tokens (the run has 328M), so the
    # LR still reaches its peak; and of a set decay where nothing bounds the run.
    assert warmup("model.preset=gpt3-125m", "train.max_steps=5000", "train.decay_tokens=1000000") == 100_000
    assert warmup("model.preset=gpt3-125m", "train.max_steps=null", "train.decay_tokens=20000000") == 2_000_000
    assert warmup("train.max_steps=null", seq_len=128, sequences=1000) == 32 * 32 * 128 // 10  # one pass: 32 steps


def test_held_out_loss_weighs_a_short_last_micro_batch_by_its_sequences(shakespeare):
    import dataclasses

    from mtnlg_ray.model import GPT, PRESETS, lm_loss
    from mtnlg_ray.train.tasks import LMTask

    cfg = load_config(overrides=[f"data.path={shakespeare}", "train.eval_batches=100000"], stage="pretrain")
    torch.manual_seed(0)
    model = GPT(dataclasses.replace(PRESETS["tiny"], vocab_size=512, seq_len=64)).eval()
    task = LMTask(cfg, None, model.config)
    with torch.no_grad():
        rows = task.val.rows(np.arange(len(task.val)))
        per_row = torch.stack([lm_loss(model(r[None, :-1]), r[None, 1:]) for r in rows]).double()
    # Two micro-batches over every held-out sequence, the second a short one: the split where the mean
    # of the two batches' means is furthest from the mean over sequences.
    n = len(per_row)
    batch_means = {m: float(per_row[:m].mean() + per_row[m:].mean()) / 2 for m in range(n // 2 + 1, n)}
    micro = max(batch_means, key=lambda m: abs(batch_means[m] - float(per_row.mean())))
    assert len(task.eval_indices(micro)) == n and abs(batch_means[micro] - float(per_row.mean())) > 1e-3
    with torch.no_grad():
        got = task.evaluate(model, torch.device("cpu"), micro)["loss"]
    assert got == pytest.approx(float(per_row.mean()), rel=1e-5)  # the mean over sequences, not over batches


@pytest.mark.slow
def test_tiny_model_learns_shakespeare_below_unigram_entropy(shakespeare, tmp_path):
    from mtnlg_ray.data.pack import read_sequences
    from mtnlg_ray.train.plot import read_metrics
    from mtnlg_ray.train.trainer import pretrain

    result = pretrain(train_config(shakespeare, tmp_path, "learn", "train.max_steps=150", "train.global_batch_size=16",
                                   "train.micro_batch_size=8", "train.warmup_tokens=5000",
                                   "train.eval_every=50", "train.eval_batches=4", "checkpoint.every_steps=150",
                                   decay_tokens=None))
    tokens = read_sequences(shakespeare / "tokens", "train")[:, 1:].reshape(-1)
    counts = np.bincount(tokens)
    p = counts[counts > 0] / counts.sum()
    unigram_entropy = float(-(p * np.log(p)).sum())
    val_loss = result["metrics"]["val_loss"]
    print(f"validation loss {val_loss:.3f} nats vs unigram entropy {unigram_entropy:.3f} nats")
    assert val_loss < unigram_entropy - 0.3
    # train.decay_tokens unset: the cosine spans the 150 steps, so the last step runs at the floor, 3e-4
    steps = read_metrics(Path(result["run_dir"]))
    assert steps[-1]["step"] == 150 and steps[-1]["lr"] < 3e-4 * 1.01 and steps[len(steps) // 2]["lr"] > 3 * 3e-4
    plot = run_cli("plot", result["run_dir"])
    assert plot.returncode == 0 and (Path(result["run_dir"]) / "loss.png").stat().st_size > 1000


@pytest.mark.slow  # about a minute: a real `mtnlg-ray pretrain` process, stopped once it has saved a checkpoint
def test_ctrl_c_stops_pretraining_with_one_line_naming_the_checkpoint_it_resumes_from(shakespeare, tmp_path):
    """Ray Train's SIGINT handler aborts the run and exits from inside fit(): the command used to end
    with code 1 and not a word about the run or how to go on."""
    import shutil
    import subprocess
    import sys

    exe = shutil.which("mtnlg-ray") or str(Path(sys.executable).parent / "mtnlg-ray")
    sets = [f"data.path={shakespeare}", f"run.storage_path={tmp_path}", "run.name=stopped", "model.preset=tiny",
            "model.seq_len=64", "train.max_steps=100000", "train.global_batch_size=8", "train.micro_batch_size=2",
            "checkpoint.every_steps=5", "train.eval_every=1000"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    run = subprocess.Popen([exe, "pretrain", *[a for s in sets for a in ("--set", s)]], env=env, text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    run_dir = tmp_path / "stopped"
    deadline = time.monotonic() + 300
    while not list(run_dir.glob("checkpoint_*")) and run.poll() is None and time.monotonic() < deadline:
        time.sleep(1)
    run.send_signal(signal.SIGINT)
    out, err = run.communicate(timeout=300)
    assert run.returncode == 130, (out[-2000:], err[-2000:])
    lines = [line for line in err.splitlines() if line.startswith("interrupted:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    assert lines[0].startswith(f"interrupted: the run in {run_dir} stopped; the same command resumes it from "
                               "checkpoint_")
    assert (run_dir / lines[0].rsplit(" ", 1)[1]).is_dir()


def test_bad_layouts_fail_before_any_worker_starts(shakespeare, tmp_path):
    from mtnlg_ray.train.trainer import pretrain

    with pytest.raises(ConfigError, match=r"parallel.workers: \[1, 3\] with parallel.tp=2"):
        pretrain(train_config(shakespeare, tmp_path, "bad", "parallel.workers=[1, 3]", "parallel.tp=2"))
    with pytest.raises(ConfigError, match="parallel.tp=3 must divide model.n_head"):
        pretrain(train_config(shakespeare, tmp_path, "bad", "parallel.workers=3", "parallel.tp=3"))
    with pytest.raises(ConfigError, match="data.path"):
        pretrain(load_config(overrides=["data.path=null"], stage="pretrain"))
    assert not (tmp_path / "bad" / "metrics.jsonl").exists()


def test_a_worker_count_the_cluster_cannot_hold_fails_at_once(shakespeare, tmp_path):
    """The test session's Ray has 2 CPUs: 4 workers of 1 CPU would wait forever; 4 of 0.5 fit."""
    from mtnlg_ray.config import ParallelSection
    from mtnlg_ray.train.trainer import check_capacity, pretrain

    with pytest.raises(ConfigError) as err:
        pretrain(train_config(shakespeare, tmp_path, "big", "parallel.workers=4"))
    assert str(err.value) == (
        "parallel.workers=4 needs 4 workers of 1 CPU each, but the Ray cluster has 2 CPUs (2 such workers fit); "
        "lower parallel.workers or set parallel.cpus_per_worker=0.5, or set parallel.autoscaling=true if nodes "
        "will be added"
    )
    assert not (tmp_path / "big").exists()  # refused before anything was written
    with pytest.raises(ConfigError, match=r"parallel.workers=\[3, 4\] needs 3 workers"):
        check_capacity(ParallelSection(workers=(3, 4)))  # Ray Train starts only once the minimum fits
    assert check_capacity(ParallelSection(workers=(1, 4))) is None
    assert check_capacity(ParallelSection(workers=4, cpus_per_worker=0.5)) is None
    with pytest.raises(ConfigError, match="needs 1 worker of 1 CPU \\+ 1 GPU, but the Ray cluster has 2 CPUs and 0 GPUs "
                                          "\\(0 such workers fit\\); set parallel.use_gpu=false to train on its CPUs"):
        check_capacity(ParallelSection(workers=1, use_gpu=True))  # "lower parallel.workers" cannot help
    waiting = check_capacity(ParallelSection(workers=4, autoscaling=True))
    assert waiting == ("waiting for the autoscaler: parallel.workers=4 needs 4 workers of 1 CPU each; "
                       "the cluster now has 2 CPUs (2 such workers fit)")


def test_cli_pretrain_asking_for_more_workers_than_cpus_exits_2_at_once(shakespeare, tmp_path):
    workers = (os.cpu_count() or 2) + 2  # more whole-CPU workers than the local Ray the command starts has CPUs
    result = run_cli("pretrain", "--set", f"data.path={shakespeare}", "--set", f"run.storage_path={tmp_path}",
                     "--set", f"parallel.workers={workers}", timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"parallel.workers={workers} needs {workers} workers of 1 CPU each" in errors[0]
    assert "Traceback" not in result.stderr


def test_a_dataset_without_training_sequences_is_refused_before_a_worker_starts(ray_session, tmp_path):
    """Text shorter than one packed sequence prepares an empty dataset; pretraining it says so in one
    line (it used to fail inside the worker, a Ray traceback after every retry)."""
    from mtnlg_ray.data.pipeline import prepare_dataset
    from mtnlg_ray.errors import InputError
    from mtnlg_ray.train.trainer import pretrain

    from rich.console import Console

    from mtnlg_ray.cli.render import print_manifest_summary

    (tmp_path / "short.txt").write_text("To be, or not to be.\n\nThat is the question.\n")
    dataset = tmp_path / "short"
    manifest = prepare_dataset([str(tmp_path / "short.txt")], dataset, load_config(
        overrides=["clean.enabled=false", "dedup.fuzzy=false", "tokenizer.vocab_size=300", "pack.seq_len=64"],
        stage="prepare"))
    console = Console(record=True, width=200)
    print_manifest_summary(console, manifest, dataset)  # what `data prepare` prints at its end
    printed = console.export_text()
    assert "warning: no training sequences, so pretrain will refuse this dataset" in printed
    assert "warning: no validation sequences, so pretraining will report no validation loss" in printed
    manifest["config"]["pack"]["val_fraction"] = 0.0  # none asked for: nothing to warn of
    print_manifest_summary(quiet := Console(record=True, width=200), manifest, dataset)
    assert "no validation sequences" not in quiet.export_text()
    # the tokenizer's note gives the vocabulary it got, not the 300 asked for (the text has fewer pieces)
    got = manifest["tokenizer"]["vocab_size"]
    assert got < 300 and [s["note"] for s in manifest["stages"] if s["name"] == "tokenizer"] == [f"trained, vocab {got}"]
    with pytest.raises(InputError) as err:
        pretrain(train_config(dataset, tmp_path / "runs", "empty"))
    assert str(err.value) == (f"{dataset}: no training sequences (packed at pack.seq_len=64); prepare more text, "
                              "or a smaller pack.seq_len with `data prepare --set pack.seq_len=N`")
    assert not (tmp_path / "runs").exists()  # refused before anything was written


def test_a_broken_token_folder_is_one_line_naming_the_file(shakespeare, tmp_path):
    """A shard missing, cut short or of another width, or an index without its shard list: one
    InputError line each (they used to be numpy's or json's traceback)."""
    import shutil

    from mtnlg_ray.errors import InputError
    from mtnlg_ray.train.data import TokenShards

    from mtnlg_ray.train.trainer import pretrain

    dataset = tmp_path / "copy"
    shutil.copytree(shakespeare, dataset)
    tokens = dataset / "tokens"
    index = json.loads((tokens / "index.json").read_text())
    first = tokens / index["shards"]["train"][0]
    whole = first.read_bytes()

    val = tokens / index["shards"]["val"][0]  # only the workers' evaluation reads it: refused before they start
    val.write_bytes(val.read_bytes()[:100])
    with pytest.raises(InputError, match=f"^{val}: not a readable token shard"):
        pretrain(train_config(dataset, tmp_path / "runs", "broken-val"))
    assert not (tmp_path / "runs").exists()

    def refused(message: str) -> None:
        with pytest.raises(InputError) as err:
            TokenShards(dataset, "train")
        assert str(err.value).startswith(message) and "\n" not in str(err.value), str(err.value)

    assert len(TokenShards(dataset, "train")) > 0
    first.unlink()
    refused(f"{first}: missing (tokens/index.json lists it)")
    first.write_bytes(whole[:100])
    refused(f"{first}: not a readable token shard")
    np.save(first, np.zeros((4, 10), dtype=np.uint16))
    refused(f"{first}: shape [4, 10], expected [sequences, 65]")
    (tokens / "index.json").write_text(json.dumps({"seq_len": 64}))
    refused(f"{tokens / 'index.json'}: not a token index of `data prepare` (KeyError")


def test_a_user_error_raised_on_a_worker_comes_back_as_itself(ray_session, tmp_path):
    """What only a worker sees reaches the CLI as the user's one-line error, not as Ray's
    WorkerGroupError; a bug (any other exception) keeps Ray's error and its traceback."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from mtnlg_ray.errors import CheckpointError
    from mtnlg_ray.train.trainer import fit_raising_user_errors

    def _fails_with(config: dict) -> None:  # local, so Ray ships it by value (workers cannot import tests/)
        from mtnlg_ray.errors import CheckpointError

        raise (CheckpointError if config["user"] else RuntimeError)("shard.safetensors: tensor 'x' has shape [2]")

    def trainer(user: bool) -> TorchTrainer:
        return TorchTrainer(_fails_with, train_loop_config={"user": user},
                            scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": 0.5}),
                            run_config=ray.train.RunConfig(name=f"fails-{user}", storage_path=str(tmp_path),
                                                           failure_config=ray.train.FailureConfig(max_failures=0)))

    with pytest.raises(CheckpointError) as err:
        fit_raising_user_errors(trainer(user=True), tmp_path / "fails-True")
    assert str(err.value) == "shard.safetensors: tensor 'x' has shape [2]"
    with pytest.raises(ray.train.WorkerGroupError, match="RuntimeError: shard.safetensors"):
        fit_raising_user_errors(trainer(user=False), tmp_path / "fails-False")


def test_activation_checkpointing_from_init_checkpoint_recomputes_every_block(tiny_checkpoint):
    """`model.activation_checkpointing=true` on a run that starts from a checkpoint: the model the
    loop builds runs each block's forward twice a step (once more in backward), with the same gradients."""
    from mtnlg_ray.model.gpt import GPT, lm_loss
    from mtnlg_ray.train.loop import model_config_for

    calls, grads = {}, {}
    for recompute in (False, True):
        cfg = load_config(overrides=[f"init.checkpoint={tiny_checkpoint}",
                                     f"model.activation_checkpointing={str(recompute).lower()}"], stage="finetune")
        config, _ = model_config_for(cfg, tokenizer_vocab=512)
        torch.manual_seed(0)
        model = GPT(config).train()
        count = [0]
        model.blocks[0].register_forward_pre_hook(lambda *_: count.__setitem__(0, count[0] + 1))
        tokens = torch.randint(0, config.vocab_size, (2, 17))
        lm_loss(model(tokens[:, :-1]), tokens[:, 1:]).backward()
        calls[recompute], grads[recompute] = count[0], model.blocks[0].mlp.fc1.weight.grad
    assert calls == {False: 1, True: 2}
    assert torch.allclose(grads[True], grads[False], atol=1e-6)


def test_a_run_from_init_checkpoint_keeps_its_shape_and_takes_this_runs_training_choices(tiny_checkpoint):
    from mtnlg_ray.checkpoint import read_checkpoint_config
    from mtnlg_ray.train.loop import model_config_for

    cfg = load_config(overrides=[f"init.checkpoint={tiny_checkpoint}", "model.activation_checkpointing=true",
                                 "model.dropout=0.1", "model.preset=small"], stage="finetune")
    config, _ = model_config_for(cfg, tokenizer_vocab=512)
    saved = read_checkpoint_config(tiny_checkpoint)["model"]
    assert (config.n_layer, config.d_model, config.vocab_size) == (saved["n_layer"], saved["d_model"], saved["vocab_size"])
    assert config.activation_checkpointing is True and config.dropout == 0.1


def test_length_grouped_order_is_each_epochs_permutation_and_pads_far_less():
    """train.group_by_length: every epoch is still a seeded permutation of the examples, but a
    batch of 32 holds texts of similar length, so padding to the longest costs far less."""
    from mtnlg_ray.train.data import GlobalOrder

    rng = np.random.default_rng(0)
    lengths = rng.integers(2, 60, size=3000)
    plain, grouped = GlobalOrder(3000, seed=5), GlobalOrder(3000, seed=5, lengths=lengths, group=32)
    for epoch in range(2):
        taken = grouped.take(epoch * 3000, 3000)
        assert sorted(taken.tolist()) == list(range(3000))
    assert not np.array_equal(grouped.take(0, 3000), grouped.take(3000, 3000))  # a new order each epoch
    assert np.array_equal(grouped.take(0, 3000), GlobalOrder(3000, 5, lengths, 32).take(0, 3000))  # seeded

    def padded(order: GlobalOrder) -> int:
        batches = order.take(0, 2976).reshape(-1, 32)
        return int((lengths[batches].max(axis=1) * 32).sum())

    real = int(lengths[grouped.take(0, 2976)].sum())
    assert padded(grouped) < 1.25 * real < 0.7 * padded(plain)  # 1.12x the real tokens against 1.85x
    # Still shuffled: the batches do not run from short to long through the epoch.
    means = lengths[grouped.take(0, 2976).reshape(-1, 32)].mean(axis=1)
    assert abs(np.corrcoef(np.arange(len(means)), means)[0, 1]) < 0.3
    # 3,000 is not a multiple of 32: the batch that starts at 2,976 runs into epoch 1, and epoch 1's
    # groups still line up with the batches after it.
    later = grouped.take(3008, 2976).reshape(-1, 32)
    assert (lengths[later].max(axis=1) * 32).sum() < 1.25 * lengths[later].sum()
    # A set smaller than two windows (here 2 x 8 groups of 32) keeps its plain shuffle.
    small = lengths[:500]
    assert np.array_equal(GlobalOrder(500, 5, small, 32).take(0, 500), GlobalOrder(500, 5).take(0, 500))


def test_continued_pretraining_refuses_data_of_another_tokenizer(shakespeare, tiny_checkpoint, tmp_path):
    # tiny_checkpoint's tokenizer was trained on the built-in corpus, shakespeare's on tinyshakespeare:
    # the same ids name other words, and training used to go on without a word.
    import shutil

    from mtnlg_ray.train.trainer import _check_same_tokenizer, pretrain

    with pytest.raises(ConfigError, match="init.checkpoint: .*'s tokenizer differs from the one .* was tokenized "
                                          "with; prepare the data again with --set tokenizer.path="):
        pretrain(train_config(shakespeare, tmp_path / "runs", "other-tok", f"init.checkpoint={tiny_checkpoint}"))
    assert not (tmp_path / "runs").exists()
    same = tmp_path / "same"
    (same / "tokenizer").mkdir(parents=True)
    shutil.copyfile(tiny_checkpoint / "tokenizer.json", same / "tokenizer" / "tokenizer.json")
    _check_same_tokenizer(tiny_checkpoint, same)  # the checkpoint's own tokenizer passes


def test_evaluation_reads_held_out_sequences_from_the_whole_corpus(tmp_path):
    # Two sources packed one after the other: the first eval_batches micro-batches of the held-out
    # split used to be all from the first source.
    from mtnlg_ray.config import PackSection
    from mtnlg_ray.data.pack import SequenceWriter
    from mtnlg_ray.train.tasks import LMTask

    writer = SequenceWriter(tmp_path / "tokens", PackSection(seq_len=127, val_fraction=0.01), 0, 300)
    writer.add_documents([np.full(511, 1, np.uint32)] * 2000)  # source A: 8,000 sequences
    writer.add_documents([np.full(511, 2, np.uint32)] * 2000)  # source B
    writer.close()
    task = LMTask(load_config(overrides=[f"data.path={tmp_path}"]), None, None)
    chosen = task.eval_indices(8)
    assert len(chosen) == 64 == len(set(chosen.tolist()))
    rows = task.val.rows(chosen).numpy()
    from_b = int((rows[:, 0] == 2).sum())
    assert 24 <= from_b <= 40, from_b  # about half from each source


def test_token_shards_keep_a_bounded_number_of_files_open(tmp_path):
    from mtnlg_ray.config import PackSection
    from mtnlg_ray.data.pack import SequenceWriter
    from mtnlg_ray.train.data import OPEN_SHARDS, TokenShards

    writer = SequenceWriter(tmp_path / "tokens", PackSection(seq_len=7, val_fraction=0.0, shard_sequences=1), 0, 300)
    writer.add_documents([np.arange(1, 8, dtype=np.uint32) + i for i in range(300)])  # one sequence a shard
    writer.close()
    before = len(os.listdir("/proc/self/fd"))
    shards = TokenShards(tmp_path, "train")
    rows = shards.rows(np.arange(300)).numpy()
    assert len(os.listdir("/proc/self/fd")) - before <= OPEN_SHARDS < 300
    assert rows[:, 0].tolist() == list(range(1, 301)) and rows[:, -1].tolist() == [0] * 300


def test_each_pipeline_rank_draws_its_own_dropout_masks():
    # Every pipeline rank used to seed dropout with train.seed alone: stage 1's layers applied the
    # very masks stage 0's had drawn on the same micro-batch (9 of 32 residual masks repeated at pp2).
    from mtnlg_ray.train.loop import dropout_seed

    def masks(pp_rank: int) -> torch.Tensor:
        torch.manual_seed(dropout_seed(3, pp_rank))
        drop = torch.nn.Dropout(0.5)
        return torch.stack([drop(torch.ones(64)) == 0 for _ in range(4)])

    torch.manual_seed(3)
    one_process = torch.stack([torch.nn.Dropout(0.5)(torch.ones(64)) == 0 for _ in range(4)])
    assert torch.equal(masks(0), one_process)  # no pipeline, or its first rank: the seed itself
    assert not torch.equal(masks(0), masks(1)) and not torch.equal(masks(1), masks(2))


def test_a_batch_smaller_than_one_micro_batch_a_rank_is_refused_not_rounded_up():
    # 5 ranks of micro-batch 8 used to train 40 sequences a step for a global batch of 32, and an
    # elastic run changed its batch upward when it grew; rounding down (3 ranks take 24) stays.
    from mtnlg_ray.train.schedule import global_batch
    from mtnlg_ray.train.trainer import check_batch_fits

    for workers in ("5", "[2, 5]"):
        with pytest.raises(ConfigError, match=r"^train.global_batch_size \(32\) is smaller than one micro-batch on "
                                              r"each data-parallel rank \(train.micro_batch_size 8 x dp 5 = 40\)"):
            check_batch_fits(load_config(overrides=[f"parallel.workers={workers}"]))
    with pytest.raises(ConfigError, match=r"^train.batch_rampup.start \(8\)"):
        check_batch_fits(load_config(overrides=["parallel.workers=2",
                                                "train.batch_rampup={start: 8, increment: 8, tokens: 1000}"]))
    fits = load_config(overrides=["parallel.workers=3"])
    check_batch_fits(fits)
    assert global_batch(0, fits.train, 3) == 24


def test_plot_writes_the_file_it_names_in_the_format_its_suffix_names(tmp_path):
    from mtnlg_ray.errors import InputError
    from mtnlg_ray.train.plot import plot_losses

    run = tmp_path / "run"
    run.mkdir()
    records = [{"event": "start"}] + [{"step": s, "loss": 5.0 - s / 10, "tokens": 100 * s} for s in (1, 2, 3)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    # No suffix: matplotlib used to append ".png", so "wrote curve" named a file that was not there.
    assert plot_losses(run, tmp_path / "curve") == tmp_path / "curve"
    assert (tmp_path / "curve").read_bytes().startswith(b"\x89PNG")
    assert not (tmp_path / "curve.png").exists()
    assert plot_losses(run, tmp_path / "curve.svg").read_text(encoding="utf-8").lstrip().startswith("<?xml")
    # A folder, a format matplotlib cannot draw, a folder above that is a file: one line, not a traceback.
    for output, message in ((run, "is a folder"), (tmp_path / "loss.txt", "cannot draw a .txt file"),
                            (run / "metrics.jsonl" / "loss.png", "metrics.jsonl is a file, not a folder")):
        with pytest.raises(InputError, match=message):
            plot_losses(run, output)
    assert not (tmp_path / "run.png").exists()
    assert sorted(p.name for p in run.iterdir()) == ["metrics.jsonl"]


def test_a_dataset_manifest_cut_short_is_said_to_be_no_json(tmp_path):
    """A manifest.json of `{` was reported as "no tokenizer.vocab_size", as if a key were missing."""
    from mtnlg_ray.train.trainer import _dataset_vocab

    (tmp_path / "manifest.json").write_text("{")
    with pytest.raises(InputError, match=r"manifest.json: not valid JSON \(.*\); prepare the dataset again$"):
        _dataset_vocab(tmp_path)
    (tmp_path / "manifest.json").write_text('{"tokenizer": {}}')
    with pytest.raises(InputError, match=r"manifest.json: no tokenizer.vocab_size \('vocab_size'\)$"):
        _dataset_vocab(tmp_path)
    (tmp_path / "manifest.json").write_text('{"tokenizer": {"vocab_size": 512}}')
    assert _dataset_vocab(tmp_path) == 512


def test_a_missing_init_checkpoint_names_its_key(tmp_path):
    from mtnlg_ray.config import load_config
    from mtnlg_ray.errors import CheckpointError
    from mtnlg_ray.train.loop import model_config_for

    cfg = load_config(overrides=[f"init.checkpoint={tmp_path / 'nope'}"], stage="pretrain")
    with pytest.raises(CheckpointError, match=rf"^init.checkpoint: {tmp_path / 'nope'}: checkpoint not found$"):
        model_config_for(cfg, 512)
