"""The byte-level BPE tokenizer, the built-in corpus, and the INPUT reader that feeds training."""

from __future__ import annotations

import gzip
import hashlib
import json
import random
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mtnlg_ray.data.builtin import BUILTIN_PYTHON_DOCS, MIN_DOC_CHARS, python_docs_texts
from mtnlg_ray.data.read import iter_texts, resolve_inputs, resolve_sources
from mtnlg_ray.errors import CheckpointError, ConfigError, InputError
from mtnlg_ray.inference import IncrementalText
from mtnlg_ray.tokenizer import (
    EOS,
    eos_id,
    load_tokenizer,
    tokenizer_hash,
    train_tokenizer,
)


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    # `tokenizer_dir` (conftest) is trained once per session on builtin:python-docs, vocab 512.
    return load_tokenizer(tokenizer_dir)


def _random_text(rng: random.Random) -> str:
    pools = [
        (0x00, 0x7F),  # ASCII, NUL and control characters included
        (0x80, 0x7FF),  # Latin-1, Greek, Cyrillic, Hebrew, Arabic: two-byte UTF-8
        (0x300, 0x36F),  # combining marks
        (0x4E00, 0x9FFF),  # CJK
        (0xAC00, 0xD7A3),  # Hangul
        (0xE000, 0xFFFF),  # private use, specials, BOM
        (0x1F300, 0x1FAFF),  # emoji: four-byte UTF-8
        (0x10000, 0x10FFFF),  # every astral plane
    ]
    pieces = []
    for _ in range(rng.randint(0, 40)):
        roll = rng.random()
        if roll < 0.1:
            specials = ["\r\n", "\n\n", "  ", "\t", EOS, "\u200d", "🏳️‍🌈", "e\u0301"]
            pieces.append(rng.choice(specials))
        else:
            lo, hi = rng.choice(pools)
            pieces.append(chr(rng.randint(lo, hi)))
            if rng.random() < 0.3:
                pieces.append(" ")
    return "".join(pieces)


def test_round_trip_seeded_unicode(tok):
    rng = random.Random(20220128)
    texts = [_random_text(rng) for _ in range(2000)]
    for text in texts:
        assert tok.decode(tok.encode(text).ids) == text
    # Batched decoding goes through the same path.
    encodings = tok.encode_batch(texts)
    assert tok.decode_batch([e.ids for e in encodings]) == texts


@settings(max_examples=300, deadline=None)
@given(text=st.text())  # surrogates are excluded by default: they are not UTF-8
def test_round_trip_any_unicode(tok, text):
    ids = tok.encode(text).ids
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=False) == text


def test_round_trip_python_source_is_compact(tok):
    text = Path(__file__).read_text(encoding="utf-8")
    ids = tok.encode(text).ids
    assert tok.decode(ids) == text
    # Learnt merges, not bytes: even a 512-token vocabulary compresses code well.
    assert len(ids) < 0.75 * len(text.encode("utf-8"))


def test_eos_exists_and_decodes(tok):
    eos = eos_id(tok)
    assert eos == tok.token_to_id(EOS)
    assert tok.id_to_token(eos) == EOS
    assert tok.decode([eos], skip_special_tokens=False) == EOS
    assert tok.decode([eos]) == ""  # the library default skips special tokens
    hello = tok.encode("hello").ids
    assert tok.decode(hello + [eos] + hello, skip_special_tokens=False) == f"hello{EOS}hello"
    assert tok.get_vocab_size() == 512


def test_literal_eos_in_text_is_plain_text(tok):
    text = f"a document quoting {EOS} in the middle"
    ids = tok.encode(text).ids
    assert eos_id(tok) not in ids
    assert tok.decode(ids) == text


def test_builtin_python_docs_is_megabytes_of_prose():
    docs = list(python_docs_texts())
    size = sum(len(d.encode("utf-8")) for d in docs)
    assert size > 1_000_000
    assert len(set(docs)) == len(docs)
    assert all(len(d) > MIN_DOC_CHARS for d in docs)
    joined = "\n".join(docs)
    assert 'The "break" statement' in joined  # a pydoc topic
    assert "json.dumps\nSerialize ``obj``" in joined  # a stdlib function's docstring
    # Modules with import side effects are not imported (`this` prints the Zen of Python).
    assert not any(d.startswith(("this\n", "antigravity\n", "idlelib")) for d in docs)


def test_builtin_via_iter_texts(tmp_path):
    (tmp_path / "a.txt").write_text("first document", encoding="utf-8")
    texts = iter_texts([str(tmp_path / "a.txt"), BUILTIN_PYTHON_DOCS])
    assert next(texts) == "first document"
    assert 'The "break" statement' in "".join(t for _, t in zip(range(20), texts))


def test_folder_is_read_recursively_and_skips_hidden_and_other_types(tmp_path):
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    (tmp_path / ".hidden").mkdir()
    (tmp_path / "b.txt").write_text("bee\n", encoding="utf-8")
    (tmp_path / "sub" / "a.txt").write_text("ay", encoding="utf-8")
    (tmp_path / "sub" / "deeper" / "c.TXT").write_text("sea", encoding="utf-8")
    (tmp_path / "sub" / "notes.md").write_text("not read", encoding="utf-8")
    (tmp_path / ".hidden" / "x.txt").write_text("not read", encoding="utf-8")
    (tmp_path / "_SUCCESS.txt").write_text("not read", encoding="utf-8")
    assert list(iter_texts([str(tmp_path)])) == ["bee\n", "ay", "sea"]


def test_glob_and_repeated_inputs(tmp_path):
    for name in ["x1.txt", "x2.txt", "y.txt"]:
        (tmp_path / name).write_text(name, encoding="utf-8")
    pattern = str(tmp_path / "x*.txt")
    assert resolve_inputs([pattern, str(tmp_path / "x1.txt")]) == [
        str(tmp_path / "x1.txt"),
        str(tmp_path / "x2.txt"),
    ]
    assert list(iter_texts([str(tmp_path / "**" / "y.txt")])) == ["y.txt"]
    # Across INPUTs too (the pipeline keeps each INPUT's files apart, for read.weights): a file two of
    # them name is read once, for the first.
    x1 = str(tmp_path / "x1.txt")
    assert resolve_sources([pattern, x1]) == [(pattern, [x1, str(tmp_path / "x2.txt")]), (x1, [])]


def test_a_weight_on_an_input_whose_files_an_earlier_one_reads_is_refused(tmp_path):
    from mtnlg_ray.config import load_config
    from mtnlg_ray.data.pipeline import prepare_dataset

    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("some text", encoding="utf-8")
    inputs = [str(tmp_path / "d"), str(tmp_path / "d" / "a.txt")]
    config = load_config(overrides=[f"read.weights={{'{inputs[1]}': 2.0}}"], stage="prepare")
    with pytest.raises(InputError, match="is read for an earlier INPUT"):
        prepare_dataset(inputs, tmp_path / "out", config)
    assert not (tmp_path / "out").exists()  # refused before any work


def _jsonl_lines() -> list[str]:
    return [
        json.dumps({"text": "one", "id": 1}),
        "",  # blank: not a record
        "{not json",
        json.dumps({"body": "no text field"}),
        json.dumps({"text": 7}),
        json.dumps(["not", "an", "object"]),
        json.dumps({"text": ""}),
        '{"text": "lone surrogate \\ud83d"}',
        json.dumps({"text": "two ✓ 😀"}, ensure_ascii=False),
    ]


def test_jsonl_reads_field_and_counts_bad_records(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(_jsonl_lines()) + "\n", encoding="utf-8")
    skipped: Counter[str] = Counter()
    assert list(iter_texts([str(path)], skipped=skipped)) == ["one", "two ✓ 😀"]
    assert skipped == Counter(
        bad_json=1, missing_field=1, not_text=1, not_object=1, empty=1, bad_utf8=1
    )
    assert list(iter_texts([str(path)], text_field="body")) == ["no text field"]


def test_jsonl_gz(tmp_path):
    path = tmp_path / "d.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("\n".join(_jsonl_lines()))
    assert list(iter_texts([str(path)])) == ["one", "two ✓ 😀"]
    broken = tmp_path / "broken.jsonl.gz"
    broken.write_bytes(b"this is not gzip")
    with pytest.raises(InputError, match="broken.jsonl.gz"):
        list(iter_texts([str(broken)]))


def test_parquet_column(tmp_path):
    path = tmp_path / "d.parquet"
    table = pa.table({"id": [1, 2, 3, 4], "content": ["alpha", None, "", "gamma δ"]})
    pq.write_table(table, path, row_group_size=2)
    skipped: Counter[str] = Counter()
    texts = iter_texts([str(path)], text_field="content", skipped=skipped)
    assert list(texts) == ["alpha", "gamma δ"]
    assert skipped == Counter(missing_field=1, empty=1)
    with pytest.raises(InputError, match=r"d.parquet: no column 'text'"):
        list(iter_texts([str(path)]))
    with pytest.raises(InputError, match="expected string"):
        list(iter_texts([str(path)], text_field="id"))
    # A writer that stored bytes that are not UTF-8 as strings: those rows are rejected, the rest read.
    raw = pa.array([b"first", b"caf\xe9 au lait", None, b"last"], pa.binary()).view(pa.string())
    pq.write_table(pa.table({"text": raw}), tmp_path / "latin1.parquet")
    skipped = Counter()
    assert list(iter_texts([str(tmp_path / "latin1.parquet")], skipped=skipped)) == ["first", "last"]
    assert skipped == Counter(bad_utf8=1, missing_field=1)


@pytest.mark.parametrize(
    "make_input, message",
    [
        (lambda d: str(d / "*.jsonl"), "glob matches no"),
        (lambda d: str(d / "missing.txt"), "no such file or folder"),
        (lambda d: str(d / "empty_dir"), "folder holds no"),
        (lambda d: str(d / "notes.md"), "unsupported file type"),
        (lambda d: "s3://bucket/*.txt", "globs are read from local paths only"),
        (lambda d: (d / "missing_dir").as_uri(), "no such file or folder"),
    ],
)
def test_unusable_inputs_raise_one_line(tmp_path, make_input, message):
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "notes.md").write_text("hi", encoding="utf-8")
    spec = make_input(tmp_path)
    with pytest.raises(InputError, match=message) as info:
        iter_texts([spec])  # raised when called, before any reading
    assert spec in str(info.value)
    assert "\n" not in str(info.value)


def test_train_small_tokenizer_writes_one_file(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the cat sat on the mat. " * 50, encoding="utf-8")
    out = tmp_path / "tok"
    path = train_tokenizer([str(corpus)], 300, out, show_progress=False)
    assert path == out / "tokenizer.json"
    assert sorted(p.name for p in out.iterdir()) == ["tokenizer.json"]  # no temp file left
    tok = load_tokenizer(path)
    # The corpus runs out of pairs before 300 tokens; the 256 bytes and EOS are always there.
    assert 257 < tok.get_vocab_size() <= 300
    assert len(tok.encode("the cat sat").ids) < len("the cat sat")
    assert tokenizer_hash(out) == tokenizer_hash(path)
    assert tokenizer_hash(path) == hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def test_training_is_deterministic(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("abcabcab xyzxy " * 30 + "hello there " * 20, encoding="utf-8")
    first = train_tokenizer([str(corpus)], 280, tmp_path / "a", show_progress=False)
    second = train_tokenizer([str(corpus)], 280, tmp_path / "b", show_progress=False)
    assert tokenizer_hash(first) == tokenizer_hash(second)


def test_train_rejects_tiny_vocab_and_empty_input(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("text", encoding="utf-8")
    with pytest.raises(ConfigError, match="vocab_size: 257"):
        train_tokenizer([str(corpus)], 257, tmp_path / "out", show_progress=False)
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"other": "field"}\n', encoding="utf-8")
    with pytest.raises(InputError, match="no text found"):
        train_tokenizer([str(empty)], 300, tmp_path / "out", show_progress=False)
    assert not (tmp_path / "out" / "tokenizer.json").exists()


def test_train_refuses_a_huge_vocab_and_an_output_below_a_file_up_front(tmp_path):
    from mtnlg_ray.config import load_config

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the cat sat on the mat", encoding="utf-8")
    # The trainer reserves room for every token asked for: 10^9 aborted the process, 2^70 overflowed.
    for size in (2**70, 10**9):  # 2^70 first: on a build without the bound, 10^9 kills pytest
        with pytest.raises(ConfigError, match=f"vocab_size: {size} is too large"):
            train_tokenizer([str(corpus)], size, tmp_path / "out", show_progress=False)
    with pytest.raises(ConfigError, match="tokenizer.vocab_size"):
        load_config(overrides=["tokenizer.vocab_size=1000000000"], stage="prepare")
    # An --output below a file was a NotADirectoryError traceback, after the training.
    with pytest.raises(InputError, match=r"corpus\.txt is a file, not a folder"):
        train_tokenizer([str(corpus)], 300, corpus / "tok", show_progress=False)


def test_corrupt_or_missing_tokenizer_raises_checkpoint_error(tmp_path, tokenizer_dir):
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    good = (tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8")
    (corrupt / "tokenizer.json").write_text(good[: len(good) // 2], encoding="utf-8")
    with pytest.raises(CheckpointError, match="corrupt/tokenizer.json: not a valid") as info:
        load_tokenizer(corrupt)
    assert "\n" not in str(info.value)
    with pytest.raises(CheckpointError, match="nowhere/tokenizer.json"):
        load_tokenizer(tmp_path / "nowhere" / "tokenizer.json")
    with pytest.raises(CheckpointError, match="no such file"):
        tokenizer_hash(tmp_path)
    no_eos = json.loads(good)
    no_eos["added_tokens"] = []
    (corrupt / "tokenizer.json").write_text(json.dumps(no_eos), encoding="utf-8")
    with pytest.raises(CheckpointError, match="has no <\\|endoftext\\|> special token"):
        load_tokenizer(corrupt / "tokenizer.json")


def test_file_uri_reads_through_pyarrow_filesystem(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.txt").write_text("via a URI", encoding="utf-8")
    (tmp_path / "b.jsonl").write_text('{"text": "line one"}\n', encoding="utf-8")
    uri = tmp_path.as_uri()
    assert resolve_inputs([uri]) == [f"{uri}/b.jsonl", f"{uri}/sub/a.txt"]
    assert list(iter_texts([uri])) == ["line one", "via a URI"]


def test_incremental_text_equals_decoding_everything(tok):
    """Streaming decodes only the ids since the last settled point; the text must be the full decode's."""
    decode = lambda ids: tok.decode(list(ids), skip_special_tokens=True)  # noqa: E731 (as TextGenerator)
    rng = random.Random(7)
    vocab = tok.get_vocab_size()
    cases = [tok.encode(_random_text(rng)).ids for _ in range(150)]
    cases += [[rng.randrange(vocab) for _ in range(rng.randint(1, 120))] for _ in range(150)]  # broken UTF-8
    for ids in cases:
        text = IncrementalText(decode, settle_every=rng.randint(1, 8))
        fed = 0
        while fed < len(ids):
            step = rng.randint(0, 4)
            assert text.extend(ids[fed : fed + step]) == decode(ids[: fed + step])
            fed += step


def test_a_tokenizer_with_a_gap_in_its_ids_is_refused(tokenizer_dir, tmp_path):
    # Embeddings and token storage are sized by the token count: an id past it (EOS moved to 70000)
    # used to overflow uint16 shards, or wrap silently.
    body = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    old = body["added_tokens"][0]["id"]
    body["added_tokens"][0]["id"] = 70000
    body["model"]["vocab"] = {t: (70000 if i == old else i) for t, i in body["model"]["vocab"].items()}
    (tmp_path / "tokenizer.json").write_text(json.dumps(body))
    with pytest.raises(CheckpointError, match=r"token ids must run from 0 without gaps \(\d+ tokens, largest id 70000\)"):
        load_tokenizer(tmp_path)
