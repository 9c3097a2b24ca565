"""The SST-2 experiment's report (`examples/sst2/report.py`): what run.sh's results.md says is what the checkpoints score."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from test_finetune import write_word_task

REPORT = Path(__file__).resolve().parents[1] / "examples" / "sst2" / "report.py"


def test_report_scores_every_checkpoint_beside_tfidf_and_times_each_step(tiny_checkpoint, tmp_path):
    from mtnlg_ray.checkpoint import load_checkpoint, save_classifier
    from mtnlg_ray.finetune.evaluate import evaluate_classification
    from mtnlg_ray.model.classifier import GPTClassifier

    out = tmp_path / "run"
    out.mkdir()
    write_word_task(out / "labelled.tsv", 60, seed=0)
    write_word_task(out / "dev.tsv", 40, seed=1)
    (out / "timings.tsv").write_text("step\tseconds\npretrain (8 steps)\t90\nfine-tune random seed 0\t30\n")
    backbone, _ = load_checkpoint(tiny_checkpoint)
    names = ["random-seed0", "pretrained-seed0", "pretrained-seed1", "notes-seed0"]  # notes: not a kind, skipped
    for seed, name in enumerate(names):
        torch.manual_seed(seed)
        save_classifier(GPTClassifier(backbone, 2, "mean"), ["neg", "pos"], out / "checkpoints" / name,
                        Path(tiny_checkpoint) / "tokenizer.json")

    done = subprocess.run([sys.executable, str(REPORT), str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    summary = json.loads((out / "results.json").read_text())
    assert summary["labelled"] == 60 and summary["dev"] == 40
    assert summary["tfidf_lr"]["accuracy"] == 1.0  # the word task is separable by its words
    scored = {name: evaluate_classification(out / "checkpoints" / name, out / "dev.tsv", text_field="sentence")
              for name in names[:3]}
    kinds = summary["kinds"]
    assert set(kinds) == {"random", "pretrained"}
    pretrained = [scored["pretrained-seed0"]["accuracy"], scored["pretrained-seed1"]["accuracy"]]
    assert kinds["pretrained"]["accuracy_mean"] == statistics.fmean(pretrained)
    assert kinds["pretrained"]["accuracy_sd"] == statistics.stdev(pretrained)
    assert kinds["random"]["per_seed"]["0"]["accuracy"] == scored["random-seed0"]["accuracy"]
    gaps = summary["gaps"]
    assert gaps["pretrained - random init"] == statistics.fmean(pretrained) - scored["random-seed0"]["accuracy"]
    assert gaps["pretrained - TF-IDF + LR"] == statistics.fmean(pretrained) - 1.0
    assert "self-trained - pretrained" not in gaps  # no self-trained checkpoints, no claim about them

    results = (out / "results.md").read_text()
    assert "| fine-tuned from the pretrained model | 2 |" in results
    assert "| **total** | **2.0 min** |" in results
