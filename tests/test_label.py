"""Pseudo-labelling: quality classifier, perplexity and classifier labellers, the actor pool, the filters."""

from __future__ import annotations

import json
import gc
import os
import random
import re
import shutil
import signal
import struct
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import torch
from conftest import shared_data

from mtnlg_ray.checkpoint import load_checkpoint
from mtnlg_ray.config import LabelSection
from mtnlg_ray.data.label import (
    LABELERS,
    REJECTED_SCHEMA,
    ClassifierLabeler,
    PerplexityLabeler,
    QualityLabeler,
    filter_labelled,
    label_documents,
    pareto_draws,
    perplexity_windows,
)
from mtnlg_ray.data.quality import QualityModel, train_quality_classifier
from mtnlg_ray.data.read import iter_texts
from mtnlg_ray.errors import CheckpointError, ConfigError, InputError
from mtnlg_ray.model import lm_loss
from mtnlg_ray.checkpoint import load_classifier, save_classifier
from mtnlg_ray.model.classifier import GPTClassifier, classification_input
from mtnlg_ray.tokenizer import eos_id, load_tokenizer

SHAKESPEARE = shared_data("tinyshakespeare.txt", module_level=True).read_text(encoding="utf-8")
PARAGRAPHS = [p for p in SHAKESPEARE.split("\n\n") if 150 <= len(p) <= 600]
LABELS = ["negative", "neutral", "positive"]


def documents(n: int, start: int = 0) -> list[dict]:
    """Rows as the data pipeline passes them on: string id, text, source, location."""
    return [
        {"id": f"doc-{i}", "text": PARAGRAPHS[i % len(PARAGRAPHS)], "source": "shake", "location": f"tiny.txt:{i}"}
        for i in range(start, start + n)
    ]


def junk(rng: random.Random, words: list[str]) -> str:
    """Raw-crawl negatives: symbol noise, word salad from the positives' own vocabulary, or site boilerplate."""
    kind = rng.randrange(3)
    if kind == 0:
        symbols = "!@#$%^&*()_+={}[]|:;<>,.?/~0123456789abcXYZ "
        return "".join(rng.choice(symbols) for _ in range(rng.randint(200, 800)))
    if kind == 1:
        return " ".join(rng.choice(words) for _ in range(rng.randint(40, 150)))
    menu = ["Home", "About us", "Contact", "Privacy Policy", "Terms", "Login", "Sign up", "Cart", "FAQ", "Careers"]
    parts = [
        " | ".join(rng.sample(menu, 6)),
        f"Copyright {rng.randint(1999, 2025)}. All rights reserved.",
        f"Click here to get {rng.randint(10, 90)}% off! Buy now!!!",
    ]
    rng.shuffle(parts)
    return "\n".join(parts * rng.randint(1, 4))


def write_jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return str(path)


def by_id(rows) -> dict:
    return {r["id"]: r for r in rows}


# ---------------------------------------------------------------- quality classifier


@pytest.fixture(scope="module")
def quality_model(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("quality")
    rng = random.Random(0)
    words = re.findall(r"[a-z]+", SHAKESPEARE.lower())
    positive = write_jsonl(tmp / "curated.jsonl", PARAGRAPHS[:300])
    negative = write_jsonl(tmp / "crawl.jsonl", [junk(rng, words) for _ in range(500)])
    metrics = train_quality_classifier(["builtin:python-docs", positive], [negative], tmp / "model", epochs=3)
    return tmp / "model", metrics, words


def test_quality_classifier_separates_curated_text_from_junk(quality_model):
    path, metrics, words = quality_model
    assert metrics["negative"] == 500 and metrics["positive"] > 300
    assert metrics["holdout"] >= 50
    assert metrics["holdout_accuracy"] > 0.9 and metrics["train_accuracy"] > 0.9
    model = QualityModel.load(path)
    rng = random.Random(7)  # documents it never saw
    prose = model.score(PARAGRAPHS[1000:1100])
    noise = model.score([junk(rng, words) for _ in range(100)])
    assert prose.dtype == np.float64 and 0 <= noise.min() and prose.max() <= 1
    assert np.median(prose) > 0.8 and np.median(noise) < 0.2
    assert np.mean(prose > 0.5) > 0.9 and np.mean(noise < 0.5) > 0.9


def test_quality_model_files_hold_no_pickle_and_reload_to_the_training_scores(quality_model, tmp_path):
    path, metrics, _ = quality_model
    assert sorted(p.name for p in path.iterdir()) == ["quality.json", "weights.safetensors"]
    meta = json.loads((path / "quality.json").read_text())
    assert meta["format"] == "mtnlg-ray/quality/v1" and meta["ngram_order"] == 2 and meta["buckets"] == 2**18
    assert meta["metrics"] == metrics and meta["threshold"] == 0.5
    raw = (path / "weights.safetensors").read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + header_len])  # safetensors: a JSON header, then raw little-endian numbers
    assert {k: v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"weight": "F32", "bias": "F32"}
    assert len(raw) == 8 + header_len + 4 * (2**18 + 1)

    # The saved model gives the scores measured at training time (accuracy and log loss over every
    # document are the split's two parts put together), and a copy scores identically.
    texts, truth = [], []
    for spec, label in (("builtin:python-docs", 1), ("curated.jsonl", 1), ("crawl.jsonl", 0)):
        batch = list(iter_texts([spec if spec.startswith("builtin:") else str(path.parent / spec)]))
        texts += batch
        truth += [label] * len(batch)
    model = QualityModel.load(path)
    scores = model.score(texts)
    truth = np.array(truth, bool)

    def overall(metric: str) -> float:
        parts = metrics[f"train_{metric}"] * metrics["train"] + metrics[f"holdout_{metric}"] * metrics["holdout"]
        return parts / len(texts)

    assert np.mean((scores >= 0.5) == truth) == pytest.approx(overall("accuracy"), abs=1e-12)
    log_loss = -np.mean(np.log(np.clip(np.where(truth, scores, 1 - scores), 1e-12, 1)))
    assert log_loss == pytest.approx(overall("log_loss"), rel=1e-9)
    assert 0 < log_loss < 0.3
    model.save(tmp_path / "copy")
    assert np.array_equal(QualityModel.load(tmp_path / "copy").score(texts[:50]), scores[:50])
    table = pa.Table.from_pylist(documents(20))
    labelled = QualityLabeler(path)(table)
    assert labelled.column_names == ["id", "text", "source", "location", "quality"]
    assert labelled.column("quality").type == pa.float64()
    assert labelled.column("quality").to_pylist() == model.score(table.column("text").to_pylist()).tolist()


def test_the_quality_labeller_imports_no_torch():
    # A quality-labelling actor imports only the labeller's module chain; torch would add ~2 s to
    # every actor's start-up (the pool pickles the class by reference to this module).
    assert LABELERS["quality"].__module__ == "mtnlg_ray.data.quality"
    code = "import sys, mtnlg_ray.data.quality; print([m for m in ('torch', 'transformers') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert (out.returncode, out.stdout.strip()) == (0, "[]"), out.stderr[-2000:]


def test_quality_training_needs_text_on_both_sides(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    positive = write_jsonl(tmp_path / "good.jsonl", PARAGRAPHS[:20])
    with pytest.raises(InputError, match=r"--negative .*empty\.txt: no text found"):
        train_quality_classifier([positive], [str(tmp_path / "empty.txt")], tmp_path / "model")
    assert not (tmp_path / "model").exists()
    with pytest.raises(CheckpointError, match="quality.json: missing"):
        QualityModel.load(tmp_path)


def test_quality_training_refuses_one_file_on_both_sides_and_too_few_documents(tmp_path):
    """The same file as --positive and --negative trained and reported a holdout accuracy; a .txt of one
    example a line was one document, and 1 negative against 485 positives scored 1.0."""
    positive = write_jsonl(tmp_path / "good.jsonl", PARAGRAPHS[:20])
    with pytest.raises(InputError, match=f"^{positive}: given as both --positive and --negative text$"):
        train_quality_classifier([positive], [str(tmp_path)], tmp_path / "model")
    lines = tmp_path / "bad" / "lines.txt"
    lines.parent.mkdir()
    lines.write_text("\n".join(f"buy cheap pills {i} now" for i in range(30)) + "\n")
    with pytest.raises(InputError, match=r"--negative .*lines\.txt: 1 document, too few to learn from \(at least 10\); "
                                         r"a \.txt file is one document unless --txt-mode line"):
        train_quality_classifier([positive], [str(lines)], tmp_path / "model")
    metrics = train_quality_classifier([positive], [str(lines)], tmp_path / "model", epochs=1, txt_mode="line")
    assert (metrics["positive"], metrics["negative"]) == (20, 30)


def test_quality_training_refuses_an_output_below_a_file_before_training(tmp_path, monkeypatch):
    import mtnlg_ray.data.quality as quality

    positive = write_jsonl(tmp_path / "good.jsonl", PARAGRAPHS[:5])
    monkeypatch.setattr(quality, "fit_logistic", lambda *a, **k: pytest.fail("trained first"))
    # Was a FileExistsError traceback from mkdir, once the training was done.
    with pytest.raises(InputError, match=r"good\.jsonl is a file, not a folder"):
        train_quality_classifier([positive], [positive], tmp_path / "good.jsonl" / "model")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(InputError, match="not a quality model"):
        train_quality_classifier([positive], [positive], tmp_path / "mine")


# ---------------------------------------------------------------- perplexity labeller


def test_windows_predict_every_token_once():
    for n, context, stride in [(1, 4, 4), (2, 4, 4), (5, 4, 4), (9, 4, 4), (10, 4, 2), (30, 8, 3), (12, 4, 1)]:
        scored = []
        for start, end, first in perplexity_windows(n, context, stride):
            assert 0 < end - start <= context
            scored += [t for t in range(start + 1, end + 1) if t >= first]
        assert scored == list(range(1, n)), (n, context, stride)


def direct_ppl(model, ids: list[int], context: int) -> float:
    """exp(mean next-token loss) by hand, one window at a time, no batching or padding."""
    total, count = 0.0, 0
    for start in range(0, len(ids) - 1, context):
        window = ids[start : start + context + 1]
        logits = model(torch.tensor([window[:-1]]))
        total += lm_loss(logits, torch.tensor([window[1:]])).item() * (len(window) - 1)
        count += len(window) - 1
    return float(np.exp(total / count))


def test_perplexity_labeler_equals_the_models_own_loss(tiny_checkpoint):
    model, _ = load_checkpoint(tiny_checkpoint)
    tok = load_tokenizer(tiny_checkpoint)
    long_text = " ".join(PARAGRAPHS[:6])
    texts = [PARAGRAPHS[0], "a", long_text, PARAGRAPHS[1][:40], ""]
    labeler = PerplexityLabeler(tiny_checkpoint)
    table = labeler(pa.table({"id": [str(i) for i in range(len(texts))], "text": texts}))
    ppl = table.column("ppl").to_pylist()
    assert table.column("ppl").type == pa.float64()
    assert len(tok.encode(long_text).ids) > 3 * model.config.seq_len  # scored in several windows
    assert len(tok.encode("a").ids) == 1  # one token: predicted from the EOS in front of it
    with torch.inference_mode():
        for text, got in zip(texts[:4], ppl[:4]):
            expected = direct_ppl(model, [eos_id(tok), *tok.encode(text).ids], model.config.seq_len)
            assert got == pytest.approx(expected, rel=1e-5)
    assert ppl[4] is None  # nothing to predict in an empty document
    # Batching and padding change nothing: each document alone gives the same number.
    alone = [labeler.perplexities([t])[0] for t in texts[:4]]
    assert alone == pytest.approx(ppl[:4], rel=1e-5)
    # Overlapping windows give later tokens more context, so the long document's ppl moves; short ones don't.
    overlapped = PerplexityLabeler(tiny_checkpoint, stride=32).perplexities(texts[:4])
    assert overlapped[1] == pytest.approx(ppl[1], rel=1e-5) and overlapped[3] == pytest.approx(ppl[3], rel=1e-5)
    assert overlapped[2] != pytest.approx(ppl[2], rel=1e-4)


# ---------------------------------------------------------------- classifier labeller


@pytest.fixture(scope="module")
def classifier_checkpoint(tiny_checkpoint, tmp_path_factory):
    backbone, _ = load_checkpoint(tiny_checkpoint)
    torch.manual_seed(5)
    model = GPTClassifier(backbone, len(LABELS), pooling="mean")
    with torch.no_grad():
        model.head.weight.normal_(0.0, 0.3)  # spread the predictions so confidences vary
        model.head.bias.normal_(0.0, 0.3)
    out = tmp_path_factory.mktemp("classifier") / "sentiment"
    save_classifier(model, LABELS, out, tokenizer_json=tiny_checkpoint / "tokenizer.json")
    return out, model


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_classifier_pools_real_positions_only(tiny_checkpoint, pooling):
    backbone, _ = load_checkpoint(tiny_checkpoint)
    model = GPTClassifier(backbone, 2, pooling).eval()
    rows = [[5, 9, 13, 2], [7, 3], [11]]
    padded = torch.zeros(3, 4, dtype=torch.long)
    for i, r in enumerate(rows):
        padded[i, : len(r)] = torch.tensor(r)
        padded[i, len(r) :] = 99  # garbage in the padding must not matter
    with torch.inference_mode():
        batched = model(padded, torch.tensor([len(r) for r in rows]))
        for i, r in enumerate(rows):
            alone = model(torch.tensor([r]), torch.tensor([len(r)]))
            torch.testing.assert_close(batched[i], alone[0], rtol=1e-5, atol=1e-6)
        h = backbone.hidden_states(torch.tensor([rows[0]]))[0]
        pooled = h[-1] if pooling == "last" else h.mean(dim=0)
        torch.testing.assert_close(batched[0], model.head(pooled), rtol=1e-5, atol=1e-6)


def test_classifier_checkpoint_round_trip_and_labeler_equals_direct_forward(classifier_checkpoint):
    path, original = classifier_checkpoint
    config = json.loads((path / "config.json").read_text())
    assert config["task"] == {"kind": "classification", "labels": LABELS, "pooling": "mean"}
    model, labels = load_classifier(path)
    assert labels == LABELS and model.pooling == "mean" and not model.training
    for name, tensor in original.state_dict().items():
        assert torch.equal(tensor, model.state_dict()[name]), name
    load_checkpoint(path)  # the backbone still reads as a plain language model
    with pytest.raises(CheckpointError, match="a classifier's checkpoint; the perplexity labeller scores text"):
        PerplexityLabeler.check(path)  # as a teacher LM it was taken without a word

    tok = load_tokenizer(path)
    texts = PARAGRAPHS[:30] + ["", " ".join(PARAGRAPHS[:8])]  # empty, and longer than the context
    table = ClassifierLabeler(path)(pa.Table.from_pylist([{"id": str(i), "text": t} for i, t in enumerate(texts)]))
    assert table.column_names == ["id", "text", "label", "confidence"]
    assert table.column("confidence").type == pa.float64() and table.column("label").type == pa.string()
    with torch.inference_mode():
        predicted = zip(table.column("label").to_pylist(), table.column("confidence").to_pylist())
        for text, (label, conf) in zip(texts, predicted):
            ids = classification_input(tok.encode(text).ids, eos_id(tok), model.backbone.config.seq_len)
            probs = torch.softmax(model(torch.tensor([ids]), torch.tensor([len(ids)])), dim=-1)[0]
            assert label == LABELS[int(probs.argmax())]
            assert conf == pytest.approx(float(probs.max()), rel=1e-5)
    assert len(set(table.column("label").to_pylist())) > 1


def test_a_wrong_model_is_one_line_before_any_actor_starts(ray_session, tiny_checkpoint, classifier_checkpoint,
                                                              tmp_path):
    with pytest.raises(CheckpointError, match="not a classification checkpoint") as err:
        load_classifier(tiny_checkpoint)
    assert "\n" not in str(err.value)
    ds = ray.data.from_items(documents(2))
    with pytest.raises(CheckpointError, match="not a classification checkpoint"):
        label_documents(ds, LabelSection(labeler="classifier", model=str(tiny_checkpoint)))
    with pytest.raises(CheckpointError, match="quality.json: missing"):
        label_documents(ds, LabelSection(labeler="quality", model=str(tiny_checkpoint)))
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        label_documents(ds, LabelSection(labeler="perplexity", model=str(tmp_path / "nowhere")))
    with pytest.raises(ConfigError, match="label.model"):
        label_documents(ds, LabelSection(labeler="perplexity"))
    # A pool the cluster cannot hold (Ray Data would wait for it without end, and without a word).
    with pytest.raises(ConfigError, match=r"label.actors: at least 1 labelling actors of 1 CPU and 1 GPU each, "
                                          r"but the Ray cluster has 2 CPUs and 0 GPUs \(0 such actors fit\)"):
        label_documents(ds, LabelSection(labeler="perplexity", model=str(tiny_checkpoint), num_gpus=1))
    with pytest.raises(ConfigError, match=r"at least 3 labelling actors of 1 CPU each.*lower label.actors, or set "
                                          r"label.autoscaling=true if nodes will be added$"):
        label_documents(ds, LabelSection(labeler="perplexity", model=str(tiny_checkpoint), actors=(3, 3)))
    # KubeRay's autoscaler runs beside the head, where this cannot see it: the user says nodes will come
    # (a RayCluster whose GPU group starts at 0 pods refused every labelling stage).
    waiting = label_documents(ds, LabelSection(labeler="perplexity", model=str(tiny_checkpoint), num_gpus=1,
                                               autoscaling=True))
    assert isinstance(waiting, ray.data.Dataset)  # planned, not run: its GPU actor would wait for a node
    # Weights the config no longer describes, or no weights: found from the header before the pool
    # starts (an actor loading them used to die in its constructor, behind Ray's traceback).
    reshaped = tmp_path / "reshaped"
    shutil.copytree(tiny_checkpoint, reshaped)
    body = json.loads((reshaped / "config.json").read_text())
    body["model"]["n_layer"] = 5
    (reshaped / "config.json").write_text(json.dumps(body))
    with pytest.raises(CheckpointError, match=r"reshaped/model.safetensors: missing tensor 'blocks.4.\S+'"):
        label_documents(ds, LabelSection(labeler="perplexity", model=str(reshaped)))
    (reshaped / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="reshaped/model.safetensors: missing$"):
        label_documents(ds, LabelSection(labeler="perplexity", model=str(reshaped)))
    more_labels = tmp_path / "more_labels"
    shutil.copytree(classifier_checkpoint[0], more_labels)
    body = json.loads((more_labels / "config.json").read_text())
    body["task"]["labels"] = [*body["task"]["labels"], "another"]  # the head still has one output fewer
    (more_labels / "config.json").write_text(json.dumps(body))
    n = len(LABELS)
    with pytest.raises(CheckpointError, match=re.escape(f"tensor 'head.weight' has shape [{n}, 128], config expects "
                                                        f"[{n + 1}, 128]")):
        label_documents(ds, LabelSection(labeler="classifier", model=str(more_labels)))
    with pytest.raises(ConfigError, match="label.labeler"):
        filter_labelled(ds, LabelSection())


# ---------------------------------------------------------------- the actor pool


def test_label_documents_through_the_actor_pool_equals_in_process(ray_session, tiny_checkpoint):
    docs = documents(40)
    cfg = LabelSection(labeler="perplexity", model=str(tiny_checkpoint), actors=(1, 2), batch_size=8)
    rows = label_documents(ray.data.from_items(docs, override_num_blocks=4), cfg).take_all()
    expected = PerplexityLabeler(tiny_checkpoint)(pa.Table.from_pylist(docs)).to_pylist()
    assert sorted(r["id"] for r in rows) == sorted(d["id"] for d in docs)  # every document exactly once
    got = by_id(rows)
    for want in expected:
        row = got[want["id"]]
        assert list(row) == ["id", "text", "source", "location", "ppl"]
        assert all(row[k] == want[k] for k in ("id", "text", "source", "location"))
        assert row["ppl"] == pytest.approx(want["ppl"], rel=1e-5)


def _labelling_actors() -> set[int]:
    """Pids of this test process's descendants running a perplexity labeller (Ray workers are spawned below us)."""
    parents, titles = {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                titles[int(entry)] = f.read().decode(errors="replace")
        except (OSError, IndexError, ValueError):
            continue
    me, found = os.getpid(), set()
    for pid, title in titles.items():
        if "MapWorker" not in title or "PerplexityLabeler" not in title:
            continue
        ancestor = parents.get(pid)
        while ancestor not in (None, 0, 1, me):
            ancestor = parents.get(ancestor)
        if ancestor == me:
            found.add(pid)
    return found


def test_a_killed_labelling_actor_costs_no_documents(ray_session, tiny_checkpoint):
    docs = documents(240, start=1000)
    cfg = LabelSection(labeler="perplexity", model=str(tiny_checkpoint), actors=(1, 1), batch_size=4)
    ds = label_documents(ray.data.from_items(docs, override_num_blocks=24), cfg)
    # Pools of earlier tests can outlive their datasets for a while: only this run's actor counts.
    gc.collect()
    earlier = _labelling_actors()
    seen, killed, after_kill, restarted = [], None, 0, set()
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        seen += batch.column("id").to_pylist()
        assert batch.column("ppl").null_count == 0
        if killed is None:
            # This run's actor is among the new ones; a pool another test left behind can start
            # late and show up too. Killing every new one kills ours for sure.
            killed = _labelling_actors() - earlier
            assert killed, "no labelling actor found"
            for pid in killed:
                os.kill(pid, signal.SIGKILL)
        else:
            after_kill += batch.num_rows
            restarted |= _labelling_actors() - earlier - killed
    assert killed
    for pid in killed:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    # A new actor took over (batches buffered before the kill alone would not show one), most of the
    # corpus came after the kill, and nothing was labelled twice or lost.
    assert restarted, "no labelling actor replaced the killed one"
    assert after_kill > len(docs) // 2
    assert sorted(seen) == sorted(d["id"] for d in docs)


# ---------------------------------------------------------------- filters


def scored_items(n: int, column: str, values) -> list[dict]:
    return [{**d, column: v} for d, v in zip(documents(n), values)]


def test_quality_labelled_through_the_pool_then_thresholded(ray_session, quality_model):
    path, _, words = quality_model
    rng = random.Random(11)
    crawl = [{"id": f"junk-{i}", "text": junk(rng, words), "source": "crawl", "location": f"c:{i}"} for i in range(20)]
    docs = documents(20, start=500) + crawl
    cfg = LabelSection(labeler="quality", model=str(path), threshold=0.5, batch_size=8)
    labelled = label_documents(ray.data.from_items(docs, override_num_blocks=3), cfg).materialize()
    expected = by_id(QualityLabeler(path)(pa.Table.from_pylist(docs)).to_pylist())
    assert by_id(labelled.take_all()) == expected  # same columns, same numbers as in-process
    kept, rejected = filter_labelled(labelled, cfg)
    kept_rows, rejected_rows = kept.take_all(), rejected.take_all()
    assert sorted(r["id"] for r in kept_rows) == sorted(i for i, r in expected.items() if r["quality"] >= 0.5)
    assert all(list(r) == ["id", "text", "source", "location", "quality"] for r in kept_rows)
    assert sorted(r["id"] for r in rejected_rows) == sorted(i for i, r in expected.items() if r["quality"] < 0.5)
    assert 15 <= len(rejected_rows) <= 25  # the junk, give or take
    assert rejected.schema().base_schema == REJECTED_SCHEMA
    # rejected/ names the stage as manifest.json does
    assert {(r["stage"], r["reason"]) for r in rejected_rows} == {("label (quality)", "low_quality")}
    row = rejected_rows[0]
    assert row["location"] == next(d["location"] for d in docs if d["id"] == row["id"])
    assert row["detail"] == f"quality {expected[row['id']]['quality']:.4f} < threshold 0.5"
    kept, rejected = filter_labelled(labelled, LabelSection(labeler="quality", filter="none"))
    assert kept.count() == 40 and rejected.count() == 0


def test_data_label_that_keeps_nothing_writes_its_rejects_and_names_the_stage(ray_session, quality_model, tmp_path):
    from mtnlg_ray.config import load_config
    from mtnlg_ray.data.pipeline import label_corpus

    path, _, _ = quality_model
    corpus = tmp_path / "crawl.jsonl"
    write_jsonl(corpus, PARAGRAPHS[:5])
    with corpus.open("a", encoding="utf-8") as fh:
        fh.write("{broken\n")
    output = tmp_path / "labelled"
    # A quality of 1.0 is out of reach of a sigmoid: the labeller rejects every document.
    config = load_config(overrides=["label.labeler=quality", f"label.model={path}", "label.threshold=1.0"],
                         stage="prepare")
    reports = []  # `data label` printed no stage line (its CLI passed no printer on)
    with pytest.raises(InputError) as err:
        label_corpus([str(corpus)], output, config, on_stage=reports.append)
    assert [(r.name, r.docs_out, r.rejected) for r in reports] == [("read", 5, 1), ("label (quality)", 0, 5)]
    assert str(err.value) == (
        f"no document survived label (quality): 6 rejected (low_quality 5, bad_json 1); see {output / 'rejected'}"
    )
    rejected = pq.read_table(output / "rejected").to_pylist()
    assert sorted(r["reason"] for r in rejected) == ["bad_json"] + ["low_quality"] * 5
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["documents"] == 0 and manifest["rejected"] == {"bad_json": 1, "low_quality": 5}


def test_a_pool_the_cluster_cannot_hold_is_refused_before_the_read(ray_session, quality_model, tmp_path):
    """The pool check ran where the label stage starts: after the read and, in `data prepare`, every
    curation stage (hours on a real corpus) for a refusal the settings alone decide."""
    from mtnlg_ray.config import load_config
    from mtnlg_ray.data.pipeline import label_corpus, prepare_dataset

    path, _, _ = quality_model
    corpus = tmp_path / "crawl.jsonl"
    write_jsonl(corpus, PARAGRAPHS[:5])
    config = load_config(overrides=["label.labeler=quality", f"label.model={path}", "label.actors=[5,5]"],
                         stage="prepare")
    for run in (label_corpus, prepare_dataset):
        reports = []
        with pytest.raises(ConfigError, match=r"label.actors: at least 5 labelling actors of 1 CPU each"):
            run([str(corpus)], tmp_path / run.__name__, config, on_stage=reports.append)
        assert reports == []  # not even the read stage ran


def test_an_unset_batch_size_is_the_labellers_own(ray_session, quality_model):
    # 4,500 documents in blocks of 500: the quality labeller's 4,096-document batches bundle nine
    # blocks into one task, where a fixed small default would label them block by block.
    path, _, _ = quality_model
    docs = [{"id": f"d{i}", "text": f"word {i}", "source": "s", "location": f"l:{i}"} for i in range(4500)]
    cfg = LabelSection(labeler="quality", model=str(path))
    assert cfg.batch_size is None and QualityLabeler.batch_size == 4096
    labelled = label_documents(ray.data.from_items(docs, override_num_blocks=9), cfg)
    sizes = [batch.num_rows for batch in labelled.iter_batches(batch_size=None, batch_format="pyarrow")]
    assert sum(sizes) == 4500 and max(sizes) >= 4096, sizes


def test_pareto_keep_rate_follows_gpt3_rule():
    ids = [f"doc-{i}" for i in range(4000)]
    draws = pareto_draws(ids, alpha=9.0, seed=0)
    assert np.array_equal(draws, pareto_draws(ids, alpha=9.0, seed=0))
    assert not np.array_equal(draws, pareto_draws(ids, alpha=9.0, seed=1))
    assert np.array_equal(draws[100:200], pareto_draws(ids[100:200], alpha=9.0, seed=0))
    for q in (0.0, 0.8, 0.95):
        # P(pareto(alpha) > x) = (1 + x)^-alpha, here with x = 1 - quality.
        assert np.mean(draws > 1 - q) == pytest.approx((2 - q) ** -9.0, abs=0.03)


def test_pareto_filter_does_not_depend_on_batching(ray_session):
    quality = np.random.default_rng(3).uniform(0.7, 1.0, 200)
    items = scored_items(200, "quality", quality)
    cfg = LabelSection(labeler="quality", filter="pareto", seed=11)
    kept_a, rejected_a = filter_labelled(ray.data.from_items(items, override_num_blocks=7), cfg)
    kept_b, _ = filter_labelled(ray.data.from_items(items[::-1], override_num_blocks=2), cfg)
    ids_a = sorted(r["id"] for r in kept_a.take_all())
    assert ids_a == sorted(r["id"] for r in kept_b.take_all())
    draws = pareto_draws([d["id"] for d in items], 9.0, 11)
    assert ids_a == sorted(d["id"] for d, x, q in zip(items, draws, quality) if x > 1 - q)
    assert 0 < len(ids_a) < 200 and rejected_a.count() == 200 - len(ids_a)


def test_perplexity_percentile_filter(ray_session):
    ppl = list(np.random.default_rng(4).lognormal(3.0, 1.0, 50)) + [None]  # the last document had no tokens
    ds = ray.data.from_items(scored_items(51, "ppl", ppl), override_num_blocks=4)
    kept, rejected = filter_labelled(ds, LabelSection(labeler="perplexity", ppl_max_percentile=80))
    cutoff = np.percentile([p for p in ppl if p is not None], 80)
    assert sorted(r["id"] for r in kept.take_all()) == sorted(f"doc-{i}" for i in range(50) if ppl[i] <= cutoff)
    reasons = {r["id"]: r["reason"] for r in rejected.take_all()}
    assert reasons == {**{f"doc-{i}": "high_perplexity" for i in range(50) if ppl[i] > cutoff}, "doc-50": "empty"}
    assert len(reasons) == 11


def test_unconfident_predictions_become_null_labels(ray_session, classifier_checkpoint):
    path, _ = classifier_checkpoint
    docs = documents(40, start=200)
    expected = by_id(ClassifierLabeler(path)(pa.Table.from_pylist(docs)).to_pylist())
    threshold = float(np.median([r["confidence"] for r in expected.values()]))
    # label.threads=2: the actor's forward passes take two threads and label exactly as one does.
    cfg = LabelSection(labeler="classifier", model=str(path), threshold=threshold, actors=(1, 1), batch_size=16,
                       threads=2)
    kept, rejected = filter_labelled(label_documents(ray.data.from_items(docs), cfg), cfg)
    rows = by_id(kept.take_all())
    assert sorted(rows) == sorted(expected) and rejected.count() == 0
    nulls = 0
    for doc_id, want in expected.items():
        assert rows[doc_id]["confidence"] == pytest.approx(want["confidence"], rel=1e-5)
        if want["confidence"] < threshold:
            assert rows[doc_id]["label"] is None
            nulls += 1
        else:
            assert rows[doc_id]["label"] == want["label"]
    assert 10 <= nulls <= 30


def test_label_threads_set_the_labellers_torch_threads(classifier_checkpoint):
    path, _ = classifier_checkpoint
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            ClassifierLabeler(path, threads=threads)
            assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)


def test_a_model_path_is_text_whatever_yaml_would_make_of_it(tmp_path):
    """--model goes into the config as a string: "qm #2" is no YAML comment and "2024" no number."""
    from conftest import run_cli

    (tmp_path / "in.txt").write_text("Some text to label.\n", encoding="utf-8")
    for name in ("qm #2", "2024"):
        result = run_cli("data", "label", str(tmp_path / "in.txt"), "--output", str(tmp_path / "out"),
                         "--labeler", "quality", "--model", str(tmp_path / name))
        assert result.returncode == 2
        assert result.stderr.strip().splitlines() == [
            f"error: {tmp_path / name / 'quality.json'}: missing, {tmp_path / name} is not a quality model "
            "(`mtnlg-ray data train-quality-classifier` writes one)"]


def test_a_missing_label_model_or_tokenizer_fails_before_the_previous_dataset_is_cleared(tmp_path):
    """`data prepare` used to check them only when their stage began: after it had emptied the output
    folder of its previous dataset and run every curation stage before them."""
    from mtnlg_ray.config import load_config
    from mtnlg_ray.data.pipeline import prepare_dataset

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("A paragraph of plain words for the check.\n")
    output = tmp_path / "data"
    output.mkdir()
    (output / "manifest.json").write_text('{"documents": 7}')
    for override, where in (("label.model=" + str(tmp_path / "no_such_model"), "no_such_model"),
                            ("tokenizer.path=" + str(tmp_path / "no_such_tokenizer"), "no_such_tokenizer")):
        labeller = ["label.labeler=quality"] if override.startswith("label") else []
        cfg = load_config(overrides=[*labeller, override], stage="prepare")
        with pytest.raises((CheckpointError, InputError), match=where):
            prepare_dataset([str(corpus)], output, cfg)
        assert (output / "manifest.json").read_text() == '{"documents": 7}'  # the previous dataset is there


def test_a_text_with_no_tokens_to_score_is_rejected_as_empty_whatever_the_percentile():
    """The detail line of an `empty` rejection used to format the unset percentile and raise TypeError."""
    batch = pa.table({"id": ["a", "b"], "source": ["s", "s"], "location": ["s:1", "s:2"], "text": ["", "x"],
                      "ppl": [None, 3.0]})
    from mtnlg_ray.data.label import _rejected_rows

    rejected = _rejected_rows(batch, LabelSection(labeler="perplexity", model="m"), None)
    assert rejected.column("reason").to_pylist() == ["empty"]
    assert rejected.column("detail").to_pylist() == ["no tokens to score"]


def test_the_quality_classifier_trains_on_documents_as_prepare_reads_them(tmp_path):
    """A .txt over read.max_chars (1M characters) is several documents to `data prepare`, which the
    classifier then scores; it used to train on it as one (its features' log counts depend on length)."""
    paragraph = " ".join(f"the {w} list holds items" for w in range(60))
    (tmp_path / "book.txt").write_text("\n\n".join([paragraph] * 4000))  # ~1.3M characters
    junk = write_jsonl(tmp_path / "junk.jsonl", [f"buy cheap pills {i} click here now" for i in range(400)])
    metrics = train_quality_classifier([str(tmp_path / "book.txt")], [junk], tmp_path / "qm", epochs=1)
    prepared = list(iter_texts([str(tmp_path / "book.txt")], max_chars=1_000_000, piece_chars=100_000))
    assert metrics["positive"] == len(prepared) > 1


def test_a_checkpoint_the_labelling_actors_would_refuse_is_one_line_on_the_driver(tiny_checkpoint, tmp_path):
    """`check` (run before the actor pool starts) used to look only for tokenizer.json: a broken one, one
    with more tokens than the model's embeddings, or a mixture whose member has other labels got past it
    and killed every actor, a Ray traceback and exit code 1 instead of one line and 2."""
    from mtnlg_ray.data.label import write_classifier_mix
    from mtnlg_ray.finetune.ngram import fit_ngram_classifier

    broken = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint, broken)
    (broken / "tokenizer.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not a valid tokenizer.json"):
        PerplexityLabeler.check(broken)

    bigger = tmp_path / "bigger"
    shutil.copytree(tiny_checkpoint, bigger)
    tok = load_tokenizer(bigger)
    vocab = load_checkpoint(tiny_checkpoint)[0].config.vocab_size
    tok.add_tokens([f"<extra{i}>" for i in range(vocab + 1 - tok.get_vocab_size())])
    tok.save(str(bigger / "tokenizer.json"))
    with pytest.raises(CheckpointError, match=f"tokenizer has {vocab + 1} tokens but the model only {vocab}"):
        PerplexityLabeler.check(bigger)
    with pytest.raises(CheckpointError, match="tokenizer has"):
        PerplexityLabeler(bigger)  # the actor refuses it with the same line

    texts = ["good great fine", "bad awful poor", "great good", "awful bad"]
    fit_ngram_classifier(texts, ["pos", "neg", "pos", "neg"], ["neg", "pos"], epochs=1).save(tmp_path / "a")
    fit_ngram_classifier(texts, ["yes", "no", "yes", "no"], ["no", "yes"], epochs=1).save(tmp_path / "b")
    assert ClassifierLabeler.check(write_classifier_mix([tmp_path / "a"], ["neg", "pos"], tmp_path / "ok")) == [
        "neg", "pos"]
    mix = write_classifier_mix([tmp_path / "a", tmp_path / "b"], ["neg", "pos"], tmp_path / "mix")
    with pytest.raises(CheckpointError, match=r"member .*b classifies \['no', 'yes'\], the mixture \['neg', 'pos'\]"):
        ClassifierLabeler.check(mix)
