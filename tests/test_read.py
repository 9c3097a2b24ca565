"""Reading .txt files: one document per file, per paragraph or per line, and long files cut into pieces."""

from __future__ import annotations

import random

import pytest

from mtnlg_ray.data.read import iter_records


def paragraphs_file(tmp_path, count: int, seed: int = 0):
    """`count` paragraphs of 3-6 distinct lines each, blank lines between; returns (path, text)."""
    rng = random.Random(seed)
    blocks = ["\n".join(f"paragraph {p} line {i} " + "word " * rng.randint(2, 12) for i in range(rng.randint(3, 6)))
              for p in range(count)]
    text = "\n\n".join(blocks) + "\n"
    path = tmp_path / "book.txt"
    path.write_text(text, encoding="utf-8")
    return path, text


def test_a_file_under_the_cap_is_one_document(tmp_path):
    path, text = paragraphs_file(tmp_path, 5)
    records = list(iter_records(str(path), max_chars=len(text)))
    assert [(r.location, r.text, r.reason) for r in records] == [(str(path), text, "")]


def test_a_long_file_is_cut_at_paragraphs_into_pieces_under_the_cap(tmp_path):
    path, text = paragraphs_file(tmp_path, 120)
    lines = text.split("\n")
    cap = 1000
    records = list(iter_records(str(path), max_chars=len(text) - 1, piece_chars=cap))
    assert len(records) >= len(text) // cap and all(not r.reason for r in records)
    for record in records:
        assert len(record.text) <= cap
        first_line = int(record.location.rsplit(":", 1)[1])
        # located at its first line, and made of whole paragraphs: it starts a paragraph, ends one
        assert lines[first_line - 1] == record.text.split("\n")[0]
        assert first_line == 1 or lines[first_line - 2] == ""
        end = first_line - 1 + record.text.count("\n") + 1
        assert lines[end] == ""
    # nothing lost, nothing added: the pieces are the file's paragraphs in order
    assert "\n\n".join(r.text for r in records) == text.rstrip("\n")


def test_a_paragraph_over_the_cut_is_cut_between_lines_and_a_line_over_the_cap_is_oversized(tmp_path):
    long_paragraph = "\n".join(f"line {i} " + "x" * 40 for i in range(30))  # ~1,400 characters, no blank line
    huge_line = "y" * 5000
    text = f"intro paragraph\n\n{long_paragraph}\n\n{huge_line}\n\nlast paragraph\n"
    path = tmp_path / "long.txt"
    path.write_text(text, encoding="utf-8")
    records = list(iter_records(str(path), max_chars=3000, piece_chars=500))
    kept = [r for r in records if not r.reason]
    oversized = [r for r in records if r.reason]
    assert [(r.location, r.reason) for r in oversized] == [(f"{path}:34", "oversized")]
    assert oversized[0].detail == "5000 characters > 3000"
    assert all(len(r.text) <= 500 for r in kept)
    assert kept[0].text.startswith("intro paragraph") and kept[0].location == f"{path}:1"
    assert kept[1].location == f"{path}:3"  # the long paragraph starts on line 3
    assert len(kept) >= 5 and "\n".join(r.text for r in kept[1:-1]) == long_paragraph  # cut between its lines
    assert kept[-1].text.endswith("last paragraph") and kept[-1].location == f"{path}:36"


def test_line_mode_gives_one_document_per_non_empty_line(tmp_path):
    path = tmp_path / "lines.txt"
    path.write_bytes(b"first line\r\n\nsecond line\n   \nthird line")
    records = list(iter_records(str(path), txt_mode="line", max_chars=100))
    assert [(r.location, r.text) for r in records] == [
        (f"{path}:1", "first line"), (f"{path}:3", "second line"), (f"{path}:5", "third line"),
    ]


def test_paragraph_mode_and_blank_files(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("one\ntwo\n\n\nthree\n", encoding="utf-8")
    records = list(iter_records(str(path), txt_mode="paragraph"))
    assert [(r.location, r.text) for r in records] == [(f"{path}:1", "one\ntwo"), (f"{path}:5", "three")]
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n", encoding="utf-8")
    for mode in ("file", "paragraph", "line"):
        assert [(r.location, r.reason) for r in iter_records(str(blank), txt_mode=mode)] == [(str(blank), "empty")]


@pytest.mark.parametrize("mode", ["paragraph", "line", "file"])
def test_a_large_txt_read_in_blocks_gives_the_records_of_the_whole_file(tmp_path, mode):
    """Blocks end at paragraph (line) boundaries and carry their first line number: read block by
    block, the file's records are those of one whole read (file mode: the same paragraphs, in pieces)."""
    from mtnlg_ray.data.read import iter_records, txt_blocks

    rng = random.Random(3)
    paragraphs = []
    for p in range(300):
        lines = [" ".join(rng.choice(["ox", "élan", "river", "stone", "über"]) for _ in range(rng.randint(1, 12)))
                 for _ in range(rng.randint(1, 6))]
        paragraphs.append("\n".join(lines))
    paragraphs.append("\n".join(["one very long paragraph"] * 200))  # longer than a block: cut at lines
    text = "\n\n".join(paragraphs) + "\n"
    path = tmp_path / "big.txt"
    path.write_bytes(text.replace("\n\n", "\r\n\n", 7).encode("utf-8"))  # a few Windows blank lines too
    blocks = txt_blocks(str(path), 2048, mode, chunk_bytes=1000)
    assert len(blocks) > 10
    assert blocks[0][0] == 0 and blocks[-1][1] == path.stat().st_size
    assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))  # contiguous
    data = path.read_bytes()
    for start, end, first in blocks:
        assert start == 0 or data[start - 1 : start] == b"\n"  # never inside a line
        assert data[:start].count(b"\n") + 1 == first

    def read(byte_range=None):
        return [(r.location, r.text) for r in iter_records(str(path), txt_mode=mode, max_chars=10**6,
                                                             piece_chars=1500, byte_range=byte_range)]

    blocked = [record for block in blocks for record in read(tuple(block))]
    if mode == "file":
        whole = "\n".join(t for _, t in read())  # one document: the file is under max_chars
        lines = [line.removesuffix("\r") for line in whole.split("\n") if line.strip()]
        assert [line for _, t in blocked for line in t.split("\n") if line.strip()] == lines
        assert all(len(t) <= 1500 for _, t in blocked)
    else:
        assert blocked == read()


@pytest.mark.parametrize("mode", ["line", "paragraph"])
def test_a_bad_byte_rejects_its_line_or_paragraph_not_the_file(tmp_path, mode):
    # One latin-1 byte used to reject the whole file as one record: every other document was lost.
    path = tmp_path / "mixed.txt"
    path.write_bytes(b"first good one\n\ncaf\xe9 in latin-1\n\nthird good one\n")
    records = [(r.location, r.text, r.reason) for r in iter_records(str(path), txt_mode=mode)]
    assert records == [(f"{path}:1", "first good one", ""),
                       (f"{path}:3", None, "bad_utf8"),
                       (f"{path}:5", "third good one", "")]
    bad = next(r for r in iter_records(str(path), txt_mode=mode) if r.reason)
    assert bad.detail == f"invalid UTF-8 in this {mode} (byte 0xe9)"


def test_jsonl_records_that_cannot_be_read_are_rejected_not_fatal(tmp_path):
    import json

    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps({"text": "fine", "url": "https://a.org/"}) + "\n"
                    + '{"text": "deep", "x": ' + "[" * 100000 + "\n"  # RecursionError in json
                    + '{"text": "odd url", "url": "https://x.org/\\ud83d"}\n'
                    + '{"text": null}\n{"body": "x"}\n{"text": " \\n\\t "}\n', encoding="utf-8")
    records = [(r.location.rsplit(":", 1)[1], r.reason, r.detail) for r in iter_records(str(path), url_field="url")]
    assert records == [("1", "", ""), ("2", "bad_json", "nested too deeply to parse"),
                       ("3", "bad_utf8", "field 'url' holds a lone surrogate"),
                       ("4", "missing_field", "field 'text' is null"),  # was "no field 'text'"
                       ("5", "missing_field", "no field 'text'"),
                       ("6", "empty", "only white space")]  # was a document, into docs/ and tokens/


def test_a_gzip_cut_short_keeps_its_records_and_says_so(tmp_path):
    """The rejected row read "not a readable gzip file", as if the whole file was lost, while the
    records before the break went on."""
    import gzip
    import json

    whole = gzip.compress("".join(json.dumps({"text": f"doc {i} " * 50}) + "\n" for i in range(200)).encode())
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(whole[: len(whole) // 2])
    records = list(iter_records(str(path)))
    kept = [r for r in records if not r.reason]
    assert kept and records[-1].reason == "unreadable_file" and records[-1].location == str(path)
    assert records[-1].detail.endswith(f"; the {len(kept):,} documents read before the break are kept")
    # Rejected records before the break are not counted among the kept
    rows = "".join("not json\n" if i % 2 else json.dumps({"text": f"doc {i} " * 50}) + "\n" for i in range(200))
    whole = gzip.compress(rows.encode())
    path.write_bytes(whole[: len(whole) // 2])
    records = list(iter_records(str(path)))
    kept = [r for r in records if not r.reason]
    assert any(r.reason == "bad_json" for r in records) and 0 < len(kept) < len(records) - 1
    assert records[-1].detail.endswith(f"; the {len(kept):,} documents read before the break are kept")


def test_a_file_name_that_is_not_utf8_is_one_line(tmp_path):
    import os

    from mtnlg_ray.data.read import resolve_inputs
    from mtnlg_ray.errors import InputError

    (tmp_path / "good.jsonl").write_text('{"text": "x"}\n')
    with open(os.path.join(os.fsencode(tmp_path), b"caf\xe9.jsonl"), "w") as fh:
        fh.write('{"text": "y"}\n')
    with pytest.raises(InputError, match=r"caf\\xe9.jsonl: the file name is not valid UTF-8; rename it"):
        resolve_inputs([str(tmp_path)])


@pytest.mark.parametrize("kind", ["dictionary", "string_view", "binary"])
def test_parquet_text_columns_of_every_string_type_are_read(tmp_path, kind):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = ["alpha beta", "gamma delta", "alpha beta"]
    column = pa.array(texts)
    column = {"dictionary": column.dictionary_encode(), "string_view": column.cast(pa.string_view()),
              "binary": pa.array([t.encode() for t in texts[:2]] + [b"caf\xe9"], pa.binary())}[kind]
    pq.write_table(pa.table({"text": column}), tmp_path / "t.parquet")
    records = [(r.text, r.reason) for r in iter_records(str(tmp_path / "t.parquet"))]
    expected = [(t, "") for t in texts] if kind != "binary" else [(t, "") for t in texts[:2]] + [(None, "bad_utf8")]
    assert records == expected


def test_a_parquet_file_is_decoded_a_bounded_batch_at_a_time(tmp_path, monkeypatch):
    # docs/ files hold tens of thousands of rows in one row group; the tokenizer trains on them in the
    # driver, which decoded a whole file's texts at once (pyarrow's default batch is 65,536 rows).
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mtnlg_ray.data import read

    texts = [f"document number {i}" for i in range(3000)]
    pq.write_table(pa.table({"text": texts}), tmp_path / "docs.parquet", row_group_size=3000)
    decoded = []
    strings = read._strings

    def counting(column):
        decoded.append(len(column))
        return strings(column)

    monkeypatch.setattr(read, "_strings", counting)
    assert [r.text for r in iter_records(str(tmp_path / "docs.parquet"))] == texts
    assert sum(decoded) == 3000 and max(decoded) <= 1024


def test_a_folder_leaves_out_the_runs_output_and_prepared_datasets_and_says_what_it_passed_over(tmp_path,
                                                                                                  monkeypatch):
    """`prepare corpus/ --output corpus/prepared` read its own last output back in (docs/ and rejected/
    parquet files) on the next run, and a folder's files of other types were skipped without a word."""
    from mtnlg_ray.data.read import resolve_inputs, resolve_sources
    from mtnlg_ray.errors import InputError

    monkeypatch.chdir(tmp_path)
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    (corpus / "a.txt").write_text("one\n")
    (corpus / "sub" / "b.jsonl").write_text('{"text": "two"}\n')
    (corpus / "notes.json").write_text("{}")
    (corpus / "gone.txt").symlink_to(tmp_path / "nowhere.txt")
    for dataset in ("prepared", "sub/older"):  # what two earlier runs wrote
        (corpus / dataset / "docs").mkdir(parents=True)
        (corpus / dataset / "manifest.json").write_text('{"format": "mtnlg-ray/dataset/v1"}')
        (corpus / dataset / "docs" / "part-0.parquet").write_bytes(b"PAR1")
    (corpus / "prepared" / "rejected").mkdir()
    (corpus / "prepared" / "rejected" / "part-0.parquet").write_bytes(b"PAR1")
    (corpus / "unrelated" / "docs").mkdir(parents=True)  # a web project's manifest.json beside docs/ is no dataset
    (corpus / "unrelated" / "manifest.json").write_text('{"name": "site"}')
    (corpus / "unrelated" / "c.txt").write_text("three\n")

    passed: list[str] = []
    [(spec, files)] = resolve_sources(["corpus"], output="corpus/prepared", passed_over=passed)
    assert files == ["corpus/a.txt", "corpus/sub/b.jsonl", "corpus/unrelated/c.txt"]
    assert passed == ["corpus/prepared (this run's output)", "corpus/sub/older (a prepared dataset)",
                      "corpus/gone.txt (a broken link)", "corpus/notes.json (another file type)", "corpus/unrelated/manifest.json (another file type)"]
    # An output written another way (`..`), here a first run's that is no dataset yet, is the same folder.
    (corpus / "fresh").mkdir()
    (corpus / "fresh" / "x.jsonl").write_text('{"text": "left by a failed first run"}\n')
    passed.clear()
    assert resolve_sources(["corpus"], output="corpus/sub/../fresh", passed_over=passed)[0][1] == files
    assert "corpus/fresh (this run's output)" in passed
    # So is one named through a symlink, from outside the folder read or inside it.
    (tmp_path / "alias").symlink_to(corpus / "fresh")
    (corpus / "inner-alias").symlink_to(corpus / "fresh")
    for alias in ("alias", "corpus/inner-alias"):
        passed.clear()
        assert resolve_sources(["corpus"], output=alias, passed_over=passed)[0][1] == files, alias
        assert "corpus/fresh (this run's output)" in passed
    # A glob leaves them out the same way; left with nothing, it says what it passed over.
    with pytest.raises(InputError, match=r"^corpus/\*\*/\*.parquet: glob matches no .*files beside what it passes "
                                         r"over: corpus/prepared \(a prepared dataset\), corpus/sub/older"):
        resolve_sources(["corpus/**/*.parquet"], output="elsewhere")
    # A glob that names a dataset's inside reads it: only `**` reaching into one leaves it out.
    assert resolve_sources(["corpus/*/docs/*.parquet"], output="elsewhere")[0][1] == [
        "corpus/prepared/docs/part-0.parquet"]
    # A dataset named as the input itself stands for its docs/ (rejected/ holds no text to read).
    assert resolve_sources(["corpus/prepared"], output="corpus/prepared")[0][1] == ["corpus/prepared/docs/part-0.parquet"]
    assert resolve_sources(["corpus/unrelated"], output="corpus")[0][1] == ["corpus/unrelated/c.txt"]
    # Other commands (tokenizer train, evaluate) leave nothing out below a folder, as before.
    assert "corpus/sub/older/docs/part-0.parquet" in resolve_inputs(["corpus"])


def test_first_few_names_two_then_counts_the_rest():
    """The read note, the manifest-less walk and the run-directory refusal list what they pass over this way."""
    from mtnlg_ray.errors import first_few

    assert first_few([]) == ""
    assert first_few(["a"]) == "a"
    assert first_few(["a", "b"]) == "a, b"
    assert first_few(["a", "b", "c", "d"]) == "a, b and 2 more"
    assert first_few(["a", "b", "c"], shown=1) == "a and 2 more"


def test_an_empty_jsonl_or_parquet_file_is_a_rejected_record_as_an_empty_txt_is(tmp_path):
    """An empty .txt was rejected as `empty`; an empty .jsonl or a zero-row .parquet left no trace."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "e.jsonl").write_text("\n\n")
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), tmp_path / "e.parquet")
    (tmp_path / "e.txt").write_text("")
    for name, detail in (("e.jsonl", "no record (an empty file)"), ("e.parquet", "no row (an empty file)"),
                         ("e.txt", "empty file")):
        path = str(tmp_path / name)
        assert [(r.location, r.reason, r.detail) for r in iter_records(path)] == [(path, "empty", detail)]
