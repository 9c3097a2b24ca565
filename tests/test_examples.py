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


WORDNET_TEXT = Path(__file__).resolve().parents[1] / "examples" / "sst2" / "wordnet_text.py"


def test_wordnet_text_writes_one_document_per_synset_in_sst_spelling(tmp_path):
    # Two synsets written for this test in WordNet's data-file layout (offset, lexfile, part, word count
    # in hex, word/lex-id pairs, pointers | gloss), after the licence lines that start with a space.
    wordnet = tmp_path / "dict"
    wordnet.mkdir()
    (wordnet / "data.adj").write_text(
        "  1 This header line is not a synset.\n"
        '00000010 00 s 03 Grim(a) 0 bleak 0 grim 1 001 & 00000020 a 0000 | dark and cheerless; "a bleak outlook"; '
        '"the crew\'s grim faces"  \n'
        "00000020 00 a 01 sunny_side_up 0 000 | cheerful, as if in the sun  \n")
    (wordnet / "data.verb").write_text("00000030 29 v 01 grin 0 000 | smile broadly  \n")
    out = tmp_path / "wordnet.jsonl"
    done = subprocess.run([sys.executable, str(WORDNET_TEXT), "--wordnet", str(wordnet), "--out", str(out)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "data.adv: not found" in done.stderr  # adj,adv,verb by default; no adv here

    done = subprocess.run([sys.executable, str(WORDNET_TEXT), "--wordnet", str(wordnet), "--out", str(out),
                           "--parts", "adj,verb"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    docs = [json.loads(line)["text"] for line in out.read_text().splitlines()]
    assert docs == [
        "grim , bleak : dark and cheerless ; a bleak outlook ; the crew 's grim faces",
        "sunny side up : cheerful , as if in the sun",
        "grin : smile broadly",
    ]
    assert "3 synsets" in done.stdout
