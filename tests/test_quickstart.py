"""`mtnlg-ray quickstart --smoke`: every stage of the pipeline, as a user runs it, in one command."""

from __future__ import annotations

import json
import socket

import pyarrow.parquet as pq

from conftest import run_cli


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_quickstart_smoke_runs_every_stage_and_says_where_everything_is(tmp_path):
    work = tmp_path / "qs"
    result = run_cli("quickstart", "--smoke", "--workdir", str(work), "--port", str(free_port()), timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((work / "quickstart.json").read_text())

    # prepare ran the quality classifier as the pseudo-labeller: every kept document carries a score
    manifest = json.loads((work / "data" / "manifest.json").read_text())
    assert any(stage["name"].startswith("label") for stage in manifest["stages"])
    docs = pq.read_table(work / "data" / "docs")
    assert "quality" in docs.column_names and docs.num_rows == summary["data"]["documents"] > 0
    assert min(docs.column("quality").to_pylist()) >= 0.5  # label.threshold=0.5 dropped the rest

    # pretraining ran on 2 workers and wrote a consolidated checkpoint
    start = json.loads((work / "runs" / "pretrain" / "metrics.jsonl").read_text().splitlines()[0])
    assert start["world_size"] == 2
    assert (work / "runs" / "pretrain" / "final" / "model.safetensors").is_file()

    # the fine-tuned classifier knows its two labels and scored its dev set
    config = json.loads((work / "runs" / "finetune" / "final" / "config.json").read_text())
    assert sorted(config["task"]["labels"]) == ["library", "reference"]
    assert 0.0 <= summary["finetune"]["dev_accuracy"] <= 1.0

    # the server answered, and the printout says where everything is and how to query it
    assert isinstance(summary["serve"]["completion"], str)
    for path in (summary["pretrain"]["path"], summary["finetune"]["path"], summary["data"]["path"]):
        assert path in result.stdout
    assert "mtnlg-ray serve --checkpoint" in result.stdout and "curl http://127.0.0.1:8000" in result.stdout
