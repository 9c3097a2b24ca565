"""Unit tests of the per-document stages: cleaning heuristics, decontamination rules, packing."""

import collections

import numpy as np
import pyarrow as pa
import pytest

from mtnlg_ray.config import CleanSection, DecontamSection, PackSection
from mtnlg_ray.data.clean import clean_batch, normalize_text, quality_problem
from mtnlg_ray.data.decontam import decontaminate, eval_ngrams
from mtnlg_ray.data.pack import SequenceWriter, read_sequences

PROSE = (
    "The harbor was quiet in the early morning, and the fishing boats rocked gently against the pier "
    "while a few gulls circled overhead looking for scraps left behind by the night crew."
)


def test_tokenize_batch_encodes_a_block_in_bounded_chunks(monkeypatch):
    # Ray Data passes whole blocks (up to 200,000 documents after dedup); encoding them in one
    # encode_batch call held every document's Encoding and id list in one worker at once.
    from types import SimpleNamespace

    from mtnlg_ray.data import pack

    calls = []

    class Recording:
        def encode_batch(self, texts):
            calls.append(len(texts))
            return [SimpleNamespace(ids=[len(t), 7]) for t in texts]

    monkeypatch.setattr(pack, "_tokenizer", lambda path: Recording())
    texts = [f"doc {i}" * (i % 5 + 1) for i in range(2000)]
    out = pack.tokenize_batch(pa.table({"text": texts}), "unused")
    assert out.column("tokens").to_pylist() == [[len(t), 7] for t in texts]
    assert out.column("text").to_pylist() == texts
    assert sum(calls) == 2000 and max(calls) <= 512
    assert pack.tokenize_batch(pa.table({"text": pa.array([], pa.string())}), "unused").num_rows == 0


def test_normalize_text():
    raw = "Cafe\u0301\x00 \t  bar\u200b  \r\n\r\n\r\n\r\nnext   line  "
    assert normalize_text(raw) == "Café bar\n\nnext line"


@pytest.mark.parametrize(
    "text, reason",
    [
        ("Too short here.", "too_few_words"),
        ("a b c d e f g h i j k l", "mean_word_length"),
        ("# one # two # three # four # five # six", "symbol_ratio"),
        ("\n".join(["This line has quite a few words and then trails off..."] * 3 + ["A closing line."]),
         "ellipsis_lines"),
        ("\n".join(["Buy now and save big today"] * 4 + ["Other words in a line"]), "duplicate_lines"),
        (" ".join(["click here"] * 30), "repeated_ngram"),
    ],
)
def test_each_heuristic_has_its_reason(text, reason):
    problem = quality_problem(normalize_text(text), CleanSection())
    assert problem is not None and problem[0] == reason, problem


def test_prose_passes_and_batches_mark_reasons():
    assert quality_problem(PROSE, CleanSection()) is None
    batch = pa.table({"id": ["a", "b"], "text": [PROSE + "  ", "\x00\x01"]})
    out = clean_batch(batch, CleanSection())
    assert out.column("text").to_pylist()[0] == PROSE
    assert out.column("reason").to_pylist() == ["", "empty_after_cleaning"]


def test_decontamination_follows_the_gpt3_rules():
    passage = " ".join(f"w{i}" for i in range(20))
    grams = eval_ngrams([passage], 13)
    cfg = DecontamSection()
    before, after = PROSE * 3, PROSE * 4
    text, pieces = decontaminate(before + " " + passage + " " + after, grams, cfg)
    assert "w5 w6" not in text and pieces == 2
    assert text.startswith(before[:100]) and text.endswith(after[-100:])
    # 200 characters are cut on each side of the match (one of them the separating space)
    assert len(before) + len(after) - 2 * 199 - 4 <= len(text) - 2 <= len(before) + len(after) - 2 * 199
    clean, pieces = decontaminate(PROSE, grams, cfg)
    assert clean == PROSE and pieces == 1
    short, _ = decontaminate("tiny " + passage + " tiny", grams, cfg)
    assert short is None
    many = (" " + passage + " ").join([PROSE * 3] * 12)
    dropped, pieces = decontaminate(many, grams, DecontamSection(window=0))
    assert dropped is None and pieces == 12
    # more than 10 pieces drop a document; 10 keep it
    ten, pieces = decontaminate((" " + passage + " ").join([PROSE * 3] * 10), grams, DecontamSection(window=0))
    assert ten is not None and pieces == 10
    eleven, pieces = decontaminate((" " + passage + " ").join([PROSE * 3] * 11), grams, DecontamSection(window=0))
    assert eleven is None and pieces == 11
    # 13 words in common are contamination, 12 are not (the default n-gram is 13, as GPT-3's)
    assert DecontamSection().ngram == 13
    twelve = PROSE * 3 + " " + " ".join(f"w{i}" for i in range(12)) + " " + PROSE * 3
    assert decontaminate(twelve, grams, cfg) == (twelve, 1)
    thirteen = PROSE * 3 + " " + " ".join(f"w{i}" for i in range(13)) + " " + PROSE * 3
    assert decontaminate(thirteen, grams, cfg)[1] == 2


def test_a_short_evaluation_item_matches_whole_from_eight_words():
    question = "What is the largest city on the northern coast?"  # 9 words: no 13-gram
    grams = eval_ngrams([question, "Paris"], 13, min_words=8)
    text, pieces = decontaminate(PROSE * 3 + " " + question.upper() + " " + PROSE * 3, grams, DecontamSection())
    assert "NORTHERN COAST" not in text and pieces == 2
    # a one-word item is too common to mean contamination: the word stays wherever it is
    paris = PROSE * 3 + " Paris " + PROSE * 3
    assert decontaminate(paris, grams, DecontamSection()) == (paris, 1)


def test_packing_is_exact_and_drops_only_the_tail(tmp_path):
    cfg = PackSection(seq_len=7, val_fraction=0.0, shard_sequences=3)
    writer = SequenceWriter(tmp_path, cfg, eos_id=0, vocab_size=300)
    docs = [np.arange(1, 1 + n, dtype=np.uint32) for n in (5, 11, 2, 17, 9)]
    writer.add_documents(docs[:2])
    writer.add_documents(docs[2:])
    result = writer.close()
    stream = np.concatenate([np.append(d, 0) for d in docs])
    seqs = read_sequences(tmp_path, "train")
    assert seqs.shape == (len(stream) // 8, 8) and seqs.dtype == np.uint16
    assert np.array_equal(seqs.reshape(-1), stream[: seqs.size])
    assert result.dropped_tail_tokens == len(stream) % 8
    assert len(result.shards["train"]) == 2


def test_validation_split_is_seeded_and_never_empty(tmp_path):
    docs = [np.arange(1, 40, dtype=np.uint32)] * 10
    splits = []
    for seed, name in ((0, "a"), (0, "b"), (1, "c")):
        writer = SequenceWriter(tmp_path / name, PackSection(seq_len=7, val_fraction=0.25, seed=seed), 0, 300)
        writer.add_documents(docs)
        splits.append(writer.close().val_indices)
    assert splits[0] == splits[1] and splits[0] != splits[2]
    for split in splits:  # every 4th sequence from a seeded offset, none left out (a wider stride passed)
        assert split == list(range(split[0], split[0] + 4 * len(split), 4)) and split[0] < 4
        assert split[-1] + 4 >= 10 * 40 // 8  # up to the last sequence the 10 documents fill
    tiny = SequenceWriter(tmp_path / "tiny", PackSection(seq_len=7, val_fraction=0.01), 0, 300)
    tiny.add_documents([np.arange(1, 17, dtype=np.uint32)])
    result = tiny.close()
    assert result.val_sequences == 1 and result.train_sequences == 1


def test_blended_repeats_leave_out_what_validation_holds(tmp_path):
    """read.weights 2: every document comes again after the originals. Each token id below belongs to
    one place in one document, so a validation token found in train is text training saw."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 30, size=40)
    docs = [np.arange(1000 * (i + 1), 1000 * (i + 1) + n, dtype=np.uint32) for i, n in enumerate(lengths)]
    origins = np.arange(len(docs))
    writer = SequenceWriter(tmp_path, PackSection(seq_len=15, val_fraction=0.2, seed=3), eos_id=0, vocab_size=70000)
    writer.add_documents(docs[:25], origins[:25], np.zeros(25, bool))
    writer.add_documents(docs[25:], origins[25:], np.zeros(15, bool))
    writer.add_documents(docs, origins, np.ones(len(docs), bool))
    result = writer.close()
    train = collections.Counter(read_sequences(tmp_path, "train").reshape(-1).tolist())
    val = collections.Counter(read_sequences(tmp_path, "val").reshape(-1).tolist())
    del train[0], val[0]  # EOS
    assert val and not val.keys() & train.keys()
    # Nothing else was left out: a validation token was written once, every other token twice (but for
    # the incomplete last sequence), and what the repeats left out is exactly the validation tokens.
    assert set(val.values()) == {1}
    tail = result.dropped_tail_tokens
    assert sum(1 for n in train.values() if n != 2) <= tail and set(train.values()) <= {1, 2}
    assert result.val_repeat_tokens_dropped == len(val)


def test_validation_is_kept_when_the_last_train_rows_were_just_written_out(tmp_path):
    # Exactly one shard's worth of train rows: they are on disk when close() looks for a row to hold out.
    writer = SequenceWriter(tmp_path, PackSection(seq_len=7, val_fraction=0.01, shard_sequences=2), 0, 300)
    writer.add_documents([np.arange(1, 16, dtype=np.uint32)])  # 16 ids with EOS: two sequences of 8
    result = writer.close()
    assert (result.train_sequences, result.val_sequences) == (1, 1)
    assert result.tokens == 2 * 8
    rows = np.concatenate([read_sequences(tmp_path, "train"), read_sequences(tmp_path, "val")])
    assert rows.reshape(-1).tolist() == [*range(1, 16), 0]  # nothing lost or repeated
    assert sorted(p.name for p in tmp_path.glob("*.npy")) == ["train-00000.npy", "val-00000.npy"]


def test_held_out_rows_do_not_keep_their_batch_alive(tmp_path):
    writer = SequenceWriter(tmp_path, PackSection(seq_len=255, val_fraction=0.01), 0, 300)
    for _ in range(20):
        writer.add_documents([np.full(1000, 7, np.uint32)] * 100)  # 100,100 ids a batch, ~4 held out
    held = writer.split_rows["val"]
    assert len(held) >= 20
    pinned = sum({id(r.base): r.base.nbytes for r in held if r.base is not None}.values())
    assert pinned == 0  # each row its own copy, not a view into the batch's 200 KB stream


def test_the_packer_never_tokenizes_with_a_replaced_tokenizer(tmp_path):
    # `data prepare` again into the same output writes a new tokenizer at the same path, and Ray
    # reuses worker processes: the cached tokenizer must be the file's current one.
    import os

    from mtnlg_ray.data.pack import tokenize_batch
    from mtnlg_ray.tokenizer import train_tokenizer

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(PROSE * 40)
    first = train_tokenizer([str(corpus)], 300, tmp_path / "a", show_progress=False)
    second = train_tokenizer([str(corpus)], 600, tmp_path / "b", show_progress=False)
    path = tmp_path / "out" / "tokenizer.json"
    path.parent.mkdir()
    batch = pa.table({"text": [PROSE]})
    path.write_bytes(first.read_bytes())
    old = tokenize_batch(batch, str(path)).column("tokens").to_pylist()[0]
    os.replace(second, path)
    new = tokenize_batch(batch, str(path)).column("tokens").to_pylist()[0]
    from mtnlg_ray.tokenizer import load_tokenizer

    assert new == load_tokenizer(path).encode(PROSE).ids and new != old
