"""The corpus pipeline end to end on a real local Ray, with planted duplicates, contamination and bad records."""

from __future__ import annotations

import gzip
import json
import random

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import run_cli, shared_data
from mtnlg_ray.config import load_config
from mtnlg_ray.data.clean import normalize_text
from mtnlg_ray.data.pack import read_sequences
from mtnlg_ray.errors import InputError

WORDS = (
    "river stone garden window morning paper letter music silver forest harbor candle winter summer "
    "village mountain bridge orchard meadow lantern journey captain doctor teacher painter farmer "
    "sailor market station library kitchen chapter garden evening shadow thunder whisper crystal "
    "ancient gentle quiet bright narrow golden hollow steady frozen distant curious patient humble "
    "walks carries builds finds keeps opens watches remembers follows gathers answers borrows "
    "across beneath beyond during toward within without between around through after before"
).split()


def make_doc(rng: random.Random, sentences: int = 12) -> str:
    out = []
    for _ in range(sentences):
        words = [rng.choice(WORDS) for _ in range(rng.randint(8, 14))]
        out.append(" ".join(words).capitalize() + ".")
    return " ".join(out)


EVAL_PASSAGE = (
    "the committee of astronomers announced that the comet designated seventeen would pass "
    "close to the northern observatory on the evening of the solstice and every telescope "
    "in the province was pointed at the horizon waiting for the faint blue tail to appear"
)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    rng = random.Random(7)
    root = tmp_path_factory.mktemp("planted")
    corpus = root / "corpus"
    corpus.mkdir()
    good = [make_doc(rng) for _ in range(12)]
    lines = [json.dumps({"text": t}) for t in good[:8]]
    # an exact duplicate (case and spacing differ) and a near duplicate (three words changed)
    lines.append(json.dumps({"text": "  " + good[0].upper().replace(" ", "   ") + "  "}))
    near = good[1].split(" ")
    for i in (5, 40, 90):
        near[i] = "zebra"
    lines.append(json.dumps({"text": " ".join(near)}))
    # bad records: broken JSON, missing field, empty text, not an object, too large
    lines += ['{"text": "unterminated', json.dumps({"body": "no text field"}), json.dumps({"text": ""}),
              json.dumps([1, 2, 3]), json.dumps({"text": "word " * 2000})]
    # a document too short for the quality heuristics
    lines.append(json.dumps({"text": "Too short."}))
    (corpus / "a.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with gzip.open(corpus / "b.jsonl.gz", "wt", encoding="utf-8") as fh:
        fh.write("\n".join(json.dumps({"text": t}) for t in good[8:10]) + "\n")
    (corpus / "c.txt").write_text(good[10], encoding="utf-8")
    (corpus / "d.txt").write_bytes(b"caf\xe9 is not utf-8 \xff\xfe")
    # contamination: an evaluation passage planted inside a long document, and one document
    # that is nothing but the passage (no piece of 200 characters survives the cut)
    contaminated = good[11] + " " + EVAL_PASSAGE + " " + make_doc(rng)
    (corpus / "e.txt").write_text(contaminated, encoding="utf-8")
    (corpus / "f.txt").write_text("Preface. " + EVAL_PASSAGE + " Afterword.", encoding="utf-8")
    evals = root / "evals"
    evals.mkdir()
    (evals / "test.jsonl").write_text(json.dumps({"text": EVAL_PASSAGE}) + "\n", encoding="utf-8")
    return {"root": root, "corpus": corpus, "evals": evals, "good": good, "contaminated": contaminated}


def prepare_planted(planted, output, *extra):
    from mtnlg_ray.data.pipeline import prepare_dataset

    config = load_config(
        overrides=[
            "read.max_chars=5000",
            "tokenizer.vocab_size=400",
            "pack.seq_len=32",
            "pack.val_fraction=0",
            f"decontam.eval_files=[{planted['evals']}]",
            *extra,
        ],
        stage="prepare",
    )
    return prepare_dataset([str(planted["corpus"])], output, config)


@pytest.fixture(scope="module")
def prepared(ray_session, planted, tmp_path_factory):
    output = tmp_path_factory.mktemp("dataset")
    manifest = prepare_planted(planted, output)
    return output, manifest


def test_every_good_document_is_kept_exactly_once(prepared, planted):
    output, manifest = prepared
    docs = pq.read_table(output / "docs").to_pylist()
    texts = [d["text"] for d in docs]
    for text in planted["good"][:11]:
        assert texts.count(text) == 1
    # good[0] and its upper-cased copy are one duplicate cluster: the first, good[0], survives
    assert texts.count(planted["good"][0]) == 1
    assert len(texts) == 12  # 11 clean documents + the decontaminated one
    assert len({d["id"] for d in docs}) == len(docs)
    assert manifest["documents"] == 12


def test_contamination_is_cut_and_the_rest_kept(prepared, planted):
    output, _ = prepared
    texts = [d["text"] for d in pq.read_table(output / "docs").to_pylist()]
    assert not any("comet designated seventeen" in t for t in texts)
    cut = [t for t in texts if t.startswith(planted["good"][11][:150])]
    assert len(cut) == 1 and len(cut[0]) < len(planted["contaminated"])


def test_each_bad_record_is_rejected_with_its_reason(prepared):
    output, manifest = prepared
    rejected = pq.read_table(output / "rejected").to_pylist()
    reasons = sorted(r["reason"] for r in rejected)
    assert reasons == sorted([
        "bad_json", "missing_field", "empty", "not_object", "oversized", "bad_utf8",
        "too_few_words", "exact_duplicate", "near_duplicate", "contaminated",
    ])
    by_reason = {r["reason"]: r for r in rejected}
    assert by_reason["bad_json"]["location"].endswith("a.jsonl:11")
    assert by_reason["bad_utf8"]["location"].endswith("d.txt")
    assert by_reason["exact_duplicate"]["stage"] == "dedup"
    assert by_reason["exact_duplicate"]["location"].endswith("a.jsonl:9")  # the later copy goes
    assert by_reason["near_duplicate"]["location"].endswith("a.jsonl:10")
    assert by_reason["contaminated"]["location"].endswith("f.txt")
    assert set(rejected[0]) == {"id", "source", "location", "stage", "reason", "detail"}
    assert sum(manifest["rejected"].values()) == len(rejected)
    stages = {s["name"]: s for s in manifest["stages"]}
    assert stages["read"]["rejected"] == 6 and stages["dedup"]["rejected"] == 2
    assert stages["decontaminate"]["rejected"] == 1
    # e.txt kept with the passage cut out: counted, though the stage's in and out do not show it
    assert manifest["decontaminated_docs"] == 1
    assert stages["decontaminate"]["note"].endswith("; 1 kept with text cut out")


def test_packed_tokens_decode_to_the_kept_documents_in_order(prepared):
    from mtnlg_ray.tokenizer import eos_id, load_tokenizer

    output, manifest = prepared
    tok = load_tokenizer(output / "tokenizer")
    docs = [d["text"] for d in pq.read_table(output / "docs").to_pylist()]
    stream = []
    for text in docs:
        stream += tok.encode(text).ids + [eos_id(tok)]
    sequences = read_sequences(output / "tokens", "train")
    assert sequences.shape[1] == 33 and sequences.dtype == np.uint16
    flat = sequences.reshape(-1).tolist()
    assert flat == stream[: len(flat)]
    assert len(stream) - len(flat) == manifest["pack"]["dropped_tail_tokens"] < 33
    decoded = tok.decode(flat, skip_special_tokens=False)
    assert decoded.startswith("<|endoftext|>".join(docs[:3]))
    assert manifest["tokenizer"]["hash"] and manifest["seq_len"] == 32
    # The settings a rerun needs: each stage's, the field read and the tokenizer asked for.
    assert list(manifest["config"]) == ["data", "tokenizer", "pack", "read", "lang", "pii", "filter", "clean",
                                        "label", "dedup", "decontam"]
    assert manifest["config"]["data"] == {"text_field": "text"} and manifest["config"]["tokenizer"]["vocab_size"] == 400


def test_validation_split_and_blend_weights(ray_session, planted, tmp_path):
    source = str(planted["corpus"])
    manifest = prepare_planted(planted, tmp_path / "blend", "pack.val_fraction=0.2", "dedup.fuzzy=false",
                               f"read.weights={{'{source}': 2.0}}")
    pack = manifest["pack"]
    assert pack["val_sequences"] > 0 and pack["train_sequences"] > 0
    assert all(i % 5 == pack["val_indices"][0] % 5 for i in pack["val_indices"])
    assert pack["val_repeat_tokens_dropped"] > 0  # the second copies left out what validation holds
    # weight 2: every kept document is packed twice
    assert manifest["documents"] > 0 and pack["documents"] == 2 * manifest["documents"]


def test_missing_input_and_unwritable_output_fail_up_front(ray_session, planted, tmp_path):
    from mtnlg_ray.data.pipeline import prepare_dataset

    config = load_config(stage="prepare")
    with pytest.raises(InputError, match="no such file or folder"):
        prepare_dataset([str(tmp_path / "absent")], tmp_path / "out", config)
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match="holds no manifest.json"):
        prepare_dataset([str(planted["corpus"])], occupied, config)
    assert (occupied / "keep.txt").read_text() == "mine"
    with pytest.raises(InputError, match=r"keep.txt is a file, not a folder$"):  # was NotADirectoryError's traceback
        prepare_dataset([str(planted["corpus"])], occupied / "keep.txt" / "data", config)
    # evaluation records whose text is under another field would make decontamination a silent no-op
    evals = tmp_path / "qa.jsonl"
    evals.write_text(json.dumps({"question": "Which river runs through the old town of the capital city?"}) + "\n")
    other_field = load_config(overrides=[f"decontam.eval_files=[{evals}]"], stage="prepare")
    with pytest.raises(InputError, match=r"no evaluation text to match \(missing_field 1\).*decontam.text_field"):
        prepare_dataset([str(planted["corpus"])], tmp_path / "never", other_field)
    assert not (tmp_path / "never").exists()


def test_cli_prepare_exits_0_and_bad_config_exits_2(planted, tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    rng = random.Random(3)
    (small / "x.jsonl").write_text(
        "\n".join(json.dumps({"text": make_doc(rng)}) for _ in range(4)) + "\n{broken\n", encoding="utf-8"
    )
    result = run_cli("data", "prepare", str(small), "--output", str(tmp_path / "ds"),
                     "--set", "tokenizer.vocab_size=300", "--set", "pack.seq_len=16")
    assert result.returncode == 0, result.stderr
    assert "bad_json 1" in result.stderr + result.stdout
    manifest = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    assert manifest["rejected"]["bad_json"] == 1
    assert manifest["documents"] + sum(manifest["rejected"].values()) == 5  # every record kept or rejected
    bad = run_cli("data", "prepare", str(small), "--output", str(tmp_path / "ds2"), "--set", "dedup.bandz=3")
    assert bad.returncode == 2 and "unknown key 'dedup.bandz'" in bad.stderr


def test_a_rerun_replaces_a_dataset_only_when_it_completes(ray_session, tmp_path):
    """A re-run into a dataset's folder used to clear it when it started, so a run that then
    rejected every record left nothing of the dataset it was meant to replace."""
    from mtnlg_ray.data.pipeline import prepare_dataset

    config = load_config(overrides=["tokenizer.vocab_size=300", "pack.seq_len=16", "pack.val_fraction=0"],
                         stage="prepare")
    rng = random.Random(11)
    first, second, bad = tmp_path / "first.jsonl", tmp_path / "second.jsonl", tmp_path / "bad.jsonl"
    first.write_text("\n".join(json.dumps({"text": make_doc(rng)}) for _ in range(6)) + "\n", encoding="utf-8")
    second.write_text("\n".join(json.dumps({"text": make_doc(rng, 4)}) for _ in range(2)) + "\n", encoding="utf-8")
    bad.write_text('{"text": "unterminated\n[1, 2]\n', encoding="utf-8")
    output = tmp_path / "ds"
    assert prepare_dataset([str(first)], output, config)["documents"] == 6
    kept = {p.relative_to(output): p.read_bytes() for p in output.rglob("*") if p.is_file()}
    (output / ".partial" / "docs").mkdir(parents=True)  # what a run killed mid-way leaves
    (output / ".partial" / "docs" / "part.parquet").write_bytes(b"cut short")

    with pytest.raises(InputError) as err:
        prepare_dataset([str(bad)], output, config)
    failed = output / "failed-run"
    assert str(err.value) == (f"no document survived read: 2 rejected (bad_json 1, not_object 1); "
                              f"see {failed / 'rejected'} (the dataset already in {output} is kept)")
    now = {p.relative_to(output): p.read_bytes() for p in output.rglob("*")
           if p.is_file() and failed not in p.parents}
    assert now == kept  # every file of the dataset, byte for byte, and nothing of the killed run
    assert sorted(r["reason"] for r in pq.read_table(failed / "rejected").to_pylist()) == ["bad_json", "not_object"]
    assert json.loads((failed / "manifest.json").read_text())["error"] == str(err.value)

    manifest = prepare_dataset([str(second)], output, config)
    assert manifest["documents"] == 2 and manifest["inputs"] == [str(second)]
    assert json.loads((output / "manifest.json").read_text()) == manifest
    assert sorted(p.name for p in output.iterdir()) == [".lock", "docs", "manifest.json", "rejected", "tokenizer",
                                                       "tokens"]
    texts = pq.read_table(output / "docs").column("text").to_pylist()
    assert len(texts) == 2  # the first run's docs are gone, not read beside the second's
    packed = read_sequences(output / "tokens", "train")
    assert packed.shape[0] == manifest["pack"]["train_sequences"]


# ---------------------------------------------------------------- what a new user hits first


def test_cli_a_corpus_of_only_bad_records_exits_2_with_one_line_and_keeps_every_reject(tmp_path):
    corpus = tmp_path / "bad.jsonl"
    corpus.write_text('{"text": "unterminated\n[1, 2]\n{"body": "no text"}\n{"text": ""}\n', encoding="utf-8")
    output = tmp_path / "ds"
    result = run_cli("data", "prepare", str(corpus), "--output", str(output))
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: no document survived read: 4 rejected (bad_json 1, empty 1, missing_field 1, not_object 1); "
        f"see {output / 'rejected'}"
    ]
    assert "Traceback" not in result.stderr
    # Nothing but the stage lines and the error: Ray's "Token authentication is enabled" notice came first.
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 2 and lines[0].startswith("✓ read") and lines[1] == errors[0], result.stderr
    rejected = pq.read_table(output / "rejected").to_pylist()
    assert sorted((r["location"].rsplit(":", 1)[1], r["reason"]) for r in rejected) == [
        ("1", "bad_json"), ("2", "not_object"), ("3", "missing_field"), ("4", "empty"),
    ]
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["documents"] == 0 and manifest["error"] == errors[0].removeprefix("error: ")
    assert manifest["rejected"] == {"bad_json": 1, "empty": 1, "missing_field": 1, "not_object": 1}
    assert [s["name"] for s in manifest["stages"]] == ["read"]


def test_a_later_stage_that_removes_the_last_document_names_itself(ray_session, tmp_path):
    from mtnlg_ray.data.pipeline import prepare_dataset

    corpus = tmp_path / "short.jsonl"
    corpus.write_text('{"text": "Too short."}\n{"text": "Also far too short."}\n{broken\n', encoding="utf-8")
    output = tmp_path / "ds"
    with pytest.raises(InputError) as err:
        prepare_dataset([str(corpus)], output, load_config(stage="prepare"))
    assert str(err.value) == (
        f"no document survived clean: 3 rejected (too_few_words 2, bad_json 1); see {output / 'rejected'}"
    )
    assert sorted(r["stage"] for r in pq.read_table(output / "rejected").to_pylist()) == ["clean", "clean", "read"]
    manifest = json.loads((output / "manifest.json").read_text())
    assert [(s["name"], s["out"]) for s in manifest["stages"]] == [("read", 2), ("clean", 0)]
    assert (output / "docs").is_dir() and not (output / "tokens").exists()


def test_line_mode_keeps_one_document_per_line(ray_session, tmp_path):
    from mtnlg_ray.data.pipeline import prepare_dataset

    rng = random.Random(5)
    lines = [f"{i} " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for i in range(300)]
    corpus = tmp_path / "lines.txt"
    corpus.write_text("\n".join(lines) + "\n\n", encoding="utf-8")
    # Blocks of 1 KiB: the file is read by several tasks, and the documents, their order and their
    # line numbers are those of one whole read.
    config = load_config(overrides=["read.txt_mode=line", "clean.enabled=false", "dedup.fuzzy=false",
                                    "tokenizer.vocab_size=300", "pack.seq_len=16", "read.block_bytes=1024"],
                         stage="prepare")
    manifest = prepare_dataset([str(corpus)], tmp_path / "ds", config)
    assert manifest["documents"] == 300 and manifest["rejected"] == {}
    # Nothing rejected: rejected/ still reads as a table with its columns (it held no file at all).
    nothing = pq.read_table(tmp_path / "ds" / "rejected")
    assert nothing.num_rows == 0 and nothing.column_names == ["id", "source", "location", "stage", "reason", "detail"]
    read = manifest["stages"][0]
    assert read["in"] == 1 and "read tasks: large .txt files in blocks" in read["note"]
    docs = pq.read_table(tmp_path / "ds" / "docs").to_pylist()
    assert [d["text"] for d in docs] == lines
    assert [d["location"] for d in docs] == [f"{corpus}:{i}" for i in range(1, 301)]


def test_cli_prepares_tinyshakespeare_with_defaults_and_prints_only_its_own_lines(tmp_path):
    """The classic 1.1 MB single-file corpus: over read.max_chars, so it is cut into pieces at paragraphs."""
    source = shared_data("tinyshakespeare.txt")
    text = source.read_text(encoding="utf-8")
    assert len(text) > 1_000_000  # over the default read.max_chars
    output = tmp_path / "ds"
    result = run_cli("data", "prepare", str(source), "--output", str(output))
    assert result.returncode == 0, result.stderr
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["split_files"] == 1 and manifest["rejected"] == {}
    docs = pq.read_table(output / "docs").to_pylist()
    assert len(docs) == manifest["documents"] >= 11
    assert all(len(d["text"]) <= 100_000 for d in docs)
    first_lines = [int(d["location"].rsplit(":", 1)[1]) for d in docs]
    assert first_lines[0] == 1 and first_lines == sorted(first_lines)
    # every paragraph is kept, in order, as cleaning normalises it
    paragraphs = [normalize_text(p) for p in text.split("\n\n") if p.strip()]
    assert [p for d in docs for p in d["text"].split("\n\n")] == paragraphs
    assert manifest["pack"]["train_sequences"] > 2000
    # Piped output: our stage lines, none of Ray Data's per-operator INFO lines.
    output_text = result.stdout + result.stderr
    assert "✓ read" in output_text and "✓ tokenize + pack" in output_text
    assert not [line for line in output_text.splitlines() if "logging_progress" in line or "streaming_executor" in line]
