"""`mtnlg-ray quickstart --smoke`: every stage of the pipeline, as a user runs it, in one command."""

from __future__ import annotations

import json
import re

import pyarrow.parquet as pq
import pytest

from conftest import run_cli, unused_port
from mtnlg_ray.quickstart import FULL, PROMPT, SMOKE


def test_quickstart_smoke_runs_every_stage_and_says_where_everything_is(tmp_path):
    result = run_cli("quickstart", "--smoke", "--workdir", str(tmp_path / "qs"), "--port", str(unused_port()),
                     timeout=900)
    work = tmp_path / "qs" / SMOKE.folder  # everything of a smoke run, apart from a full run's
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((work / "quickstart.json").read_text())

    # prepare ran the quality classifier as the pseudo-labeller: every kept document carries a score
    manifest = json.loads((work / "data" / "manifest.json").read_text())
    assert any(stage["name"].startswith("label") for stage in manifest["stages"])
    docs = pq.read_table(work / "data" / "docs")
    assert "quality" in docs.column_names and docs.num_rows == summary["data"]["documents"] > 0
    assert min(docs.column("quality").to_pylist()) >= 0.5  # label.threshold=0.5 dropped the rest

    # pretraining ran on 2 workers, every step it was given, and wrote a consolidated checkpoint
    events = [json.loads(line) for line in (work / "runs" / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    assert events[0]["world_size"] == 2
    assert events[-1]["event"] == "done" and events[-1]["step"] == SMOKE.pretrain_steps
    assert (work / "runs" / "pretrain" / "final" / "model.safetensors").is_file()
    # no peak configured: the worker timed its matmul peak at start-up and again a few steps in, kept
    # the higher reading, and every step's MFU after that is against it
    from mtnlg_ray.train.loop import PEAK_REMEASURE_STEP

    starts = [i for i, e in enumerate(events) if e.get("event") == "start"]
    first_run = events[: starts[1]] if len(starts) > 1 else events  # a restarted worker times its peak anew
    [peak] = [e for e in first_run if e.get("event") == "peak"]
    assert peak["step"] == PEAK_REMEASURE_STEP
    assert peak["peak_tflops_per_worker"] >= events[0]["peak_tflops_per_worker"] > 0
    later = [e for e in first_run if "mfu" in e and e["step"] > PEAK_REMEASURE_STEP]
    assert later and all(
        e["mfu"] == pytest.approx(events[0]["flops_per_token"] * e["tokens_per_s"]
                                  / (peak["peak_tflops_per_worker"] * 1e12 * e["world_size"]), rel=0.01)
        for e in later)

    # the fine-tuned classifier knows its two labels and scored its dev set
    config = json.loads((work / "runs" / "finetune" / "final" / "config.json").read_text())
    assert sorted(config["task"]["labels"]) == ["library", "reference"]
    # and its final/ is the checkpoint that scored it: `evaluate` on the dev file gives the same accuracy
    # (to one example: training scores in other batches, and a tiny classifier has near-ties)
    from mtnlg_ray.finetune.evaluate import evaluate_classification

    dev = work / "task" / "dev.jsonl"
    scored = evaluate_classification(work / "runs" / "finetune" / "final", dev)
    rows = len(dev.read_text().splitlines())
    assert scored["accuracy"] == pytest.approx(summary["finetune"]["dev_accuracy"], abs=1 / rows + 1e-9)

    # the server answered with words (a sampled answer: greedy, a model this small repeats "\n"),
    # and the printout says where everything is and how to query it
    completion = summary["serve"]["completion"]
    assert len(re.findall(r"[A-Za-z]{2,}", completion)) >= 2, completion
    assert f"served answer to {PROMPT!r}: {completion!r}" in result.stdout
    for path in (summary["pretrain"]["path"], summary["finetune"]["path"], summary["data"]["path"]):
        assert path in result.stdout
    assert "mtnlg-ray serve --checkpoint" in result.stdout and "curl http://127.0.0.1:8000" in result.stdout
    assert '"temperature": 0.7, "top_p": 0.9, "seed": 0' in result.stdout  # the curl asks as the quickstart did

    # piped output: the corpus pipeline's own stage lines, none of Ray Data's per-operator INFO lines
    assert "✓ read" in result.stderr and "✓ tokenize + pack" in result.stderr
    # nor a warning about its own settings: the smoke run's warm-up was longer than its whole decay
    assert "warning:" not in result.stderr, [line for line in result.stderr.splitlines() if "warning:" in line]
    # nor Ray Serve's INFO lines: "New http_options ... will not be applied" read as if the port were ignored
    assert "http_options" not in result.stdout + result.stderr
    noise = [line for line in result.stderr.splitlines() if "logging_progress" in line or "streaming_executor" in line]
    assert not noise, noise[:3]


def test_a_workdir_that_is_a_file_is_one_line_before_ray_starts(tmp_path, monkeypatch):
    import mtnlg_ray.runtime
    from mtnlg_ray.errors import InputError
    from mtnlg_ray.quickstart import quickstart

    monkeypatch.setattr(mtnlg_ray.runtime, "ensure_ray", lambda *a, **k: pytest.fail("Ray started first"))
    (tmp_path / "notes.txt").write_text("not a folder")
    # Was a FileExistsError traceback from mkdir, after Ray had started.
    with pytest.raises(InputError, match="exists and is not a folder"):
        quickstart(tmp_path / "notes.txt", smoke=True)
    with pytest.raises(InputError, match="notes.txt is a file, not a folder"):
        quickstart(tmp_path / "notes.txt" / "qs", smoke=True)


def test_the_smoke_and_the_full_quickstart_keep_their_runs_apart():
    """`--smoke` first, then the full run in the same workdir: the full pretrain used to resume the smoke
    model's checkpoint (another vocabulary and context) and stop on its shape after minutes of work."""
    assert SMOKE.folder and not FULL.folder and (SMOKE.vocab, SMOKE.seq_len) != (FULL.vocab, FULL.seq_len)


@pytest.mark.slow
def test_a_quickstart_that_trains_its_model_again_fine_tunes_the_new_one(tmp_path):
    """The rerun hint says to delete runs/pretrain to train the model again; the fine-tune of the old
    model then resumed as finished and was reported as the new model's classifier."""
    import shutil

    from mtnlg_ray.train.checkpoint import STATE_FILE, latest_checkpoint, weights_digest

    args = ("quickstart", "--smoke", "--workdir", str(tmp_path / "qs"))
    assert run_cli(*args, "--port", str(unused_port()), timeout=900).returncode == 0
    work = tmp_path / "qs" / SMOKE.folder
    shutil.rmtree(work / "runs" / "pretrain")
    (work / "runs" / "finetune" / "old-run.txt").write_text("the classifier of the first model")
    again = run_cli(*args, "--port", str(unused_port()), timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert not (work / "runs" / "finetune" / "old-run.txt").exists()  # a fresh fine-tune, not the old one resumed
    assert "fine-tuned afresh" in again.stderr
    state = json.loads((latest_checkpoint(work / "runs" / "finetune") / STATE_FILE).read_text())
    assert state["task_setup"]["init.weights"] == weights_digest(work / "runs" / "pretrain" / "final" / "model.safetensors")
