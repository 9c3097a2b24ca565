"""Fine-tuning, self-training and evaluation: metrics, LoRA, bad input, and real runs on Ray Train."""

from __future__ import annotations

import json
import re
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_cli
from mtnlg_ray.errors import InputError
from mtnlg_ray.finetune.metrics import classification_metrics, confusion_matrix
from test_cli import assert_one_line_error

GREEK = "alpha beta gamma delta epsilon zeta theta kappa lambda sigma".split()
PLACES = "river mountain forest ocean desert valley island canyon meadow glacier".split()


def write_task(path: Path, n: int, seed: int, sentence) -> None:
    """`n` rows of a pos/neg TSV (sentence, label): each label drawn at random, `sentence(rng, label)` its text."""
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as fh:
        fh.write("sentence\tlabel\n")
        for _ in range(n):
            label = rng.choice(["pos", "neg"])
            fh.write(sentence(rng, label) + f"\t{label}\n")


def write_word_task(path: Path, n: int, seed: int) -> None:
    """A task a tiny model learns in a few steps: Greek-letter sentences are "pos", place names "neg"."""
    def sentence(rng, label):
        words = GREEK if label == "pos" else PLACES
        return " ".join(rng.choice(words) for _ in range(rng.randint(3, 10)))

    write_task(path, n, seed, sentence)


# ---------------------------------------------------------------- metrics


def test_metrics_equal_a_hand_computed_confusion_matrix():
    labels = ["a", "b", "c"]
    gold = [0, 0, 0, 1, 1, 2, 2, 2, 2]
    pred = [0, 1, 0, 1, 1, 2, 0, 2, 1]
    # rows gold, columns predicted: a→(2,1,0) b→(0,2,0) c→(1,1,2)
    assert confusion_matrix(gold, pred, 3).tolist() == [[2, 1, 0], [0, 2, 0], [1, 1, 2]]
    m = classification_metrics(gold, pred, labels)
    assert m["accuracy"] == pytest.approx(6 / 9)
    precision = {"a": 2 / 3, "b": 2 / 4, "c": 2 / 2}
    recall = {"a": 2 / 3, "b": 2 / 2, "c": 2 / 4}
    for label in labels:
        p, r = precision[label], recall[label]
        assert m["per_class"][label]["precision"] == pytest.approx(p)
        assert m["per_class"][label]["recall"] == pytest.approx(r)
        assert m["per_class"][label]["f1"] == pytest.approx(2 * p * r / (p + r))
    assert m["macro_f1"] == pytest.approx(np.mean([m["per_class"][x]["f1"] for x in labels]))
    assert [m["per_class"][x]["support"] for x in labels] == [3, 2, 4]


def test_a_class_never_predicted_scores_zero_and_counts_in_the_macro_average():
    gold = [0, 0, 1, 1, 2]
    pred = [0, 0, 0, 0, 0]  # classes 1 and 2 never predicted
    m = classification_metrics(gold, pred, ["x", "y", "z"])
    assert m["accuracy"] == pytest.approx(2 / 5)
    assert m["per_class"]["x"]["precision"] == pytest.approx(2 / 5)
    assert m["per_class"]["x"]["recall"] == 1.0
    for label in ("y", "z"):
        assert m["per_class"][label] == {"precision": 0.0, "recall": 0.0, "f1": 0.0,
                                         "support": 1 if label == "z" else 2}
    f1_x = 2 * (2 / 5) * 1.0 / (2 / 5 + 1.0)
    assert m["macro_f1"] == pytest.approx(f1_x / 3)


def test_a_class_in_neither_the_gold_labels_nor_the_predictions_is_left_out_of_the_macro_average():
    """As scikit-learn averages: perfect predictions on a dev set without class z score macro F1 1.0."""
    m = classification_metrics([0, 1, 1, 0], [0, 1, 1, 0], ["x", "y", "z"])
    assert m["macro_f1"] == 1.0 and m["macro_precision"] == 1.0 and m["macro_recall"] == 1.0
    assert m["per_class"]["z"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    predicted_but_absent = classification_metrics([0, 1], [0, 2], ["x", "y", "z"])  # z predicted: it counts
    assert predicted_but_absent["macro_f1"] == pytest.approx(1 / 3)


# ---------------------------------------------------------------- LoRA


def test_lora_trains_exactly_the_formula_count_and_merges_to_the_same_logits(tiny_checkpoint):
    from mtnlg_ray.checkpoint import load_checkpoint
    from mtnlg_ray.model.classifier import GPTClassifier
    from mtnlg_ray.model.lora import LoRALinear, apply_lora, lora_parameter_count, merge_lora

    gpt, _ = load_checkpoint(tiny_checkpoint)
    c = gpt.config
    model = GPTClassifier(gpt, n_labels=3)
    targets = ["qkv", "proj", "fc2"]
    apply_lora(gpt, rank=4, alpha=8.0, dropout=0.0, targets=targets)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    head = 3 * c.d_model + 3
    expected = c.n_layer * 4 * ((c.d_model + 3 * c.d_model) + (c.d_model + c.d_model) + (4 * c.d_model + c.d_model))
    assert lora_parameter_count(c.n_layer, c.d_model, 4, targets) == expected
    assert trainable == expected + head
    assert sum(isinstance(m, LoRALinear) for m in model.modules()) == 3 * c.n_layer

    torch.manual_seed(0)
    with torch.no_grad():  # B starts at zero; give the adapters something to merge
        for module in model.modules():
            if isinstance(module, LoRALinear):
                module.lora_b.normal_(0.0, 0.05)
    idx = torch.randint(0, c.vocab_size, (3, 20))
    lengths = torch.tensor([20, 7, 1])
    model.eval()
    with torch.no_grad():
        adapted = model(idx, lengths)
        merge_lora(model)
        merged = model(idx, lengths)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert set(model.backbone.state_dict()) == set(load_checkpoint(tiny_checkpoint)[0].state_dict())
    assert (adapted - merged).abs().max().item() <= 1e-5
    base, _ = load_checkpoint(tiny_checkpoint)
    assert not torch.equal(base.blocks[0].attn.qkv.weight, model.backbone.blocks[0].attn.qkv.weight)


def test_unseeded_reset_starts_lora_as_seeded_reset_does():
    # An adapter whose down- and up-projections are both zero gets zero gradients forever: the
    # unseeded reset must draw A as nn.Linear does, like the seeded one, and leave B at zero.
    from mtnlg_ray.model.gpt import GPT, GPTConfig
    from mtnlg_ray.model.lora import LoRALinear, apply_lora

    torch.manual_seed(0)
    gpt = GPT(GPTConfig(n_layer=1, n_head=2, d_model=16, seq_len=8, vocab_size=32))
    apply_lora(gpt, rank=4, alpha=8.0, dropout=0.0, targets=["qkv"])
    gpt.reset_parameters()
    adapter = next(m for m in gpt.modules() if isinstance(m, LoRALinear))
    bound = 1.0 / 16 ** 0.5
    assert adapter.lora_a.abs().max().item() <= bound
    assert adapter.lora_a.abs().min().item() > 0.0 and adapter.lora_a.std().item() > bound / 4
    assert torch.count_nonzero(adapter.lora_b).item() == 0
    idx = torch.randint(0, 32, (2, 8))
    gpt(idx).float().pow(2).mean().backward()
    assert adapter.lora_b.grad.abs().sum().item() > 0.0


def test_lora_rejects_unknown_targets(tiny_checkpoint):
    from mtnlg_ray.checkpoint import load_checkpoint
    from mtnlg_ray.errors import ConfigError
    from mtnlg_ray.model.lora import apply_lora

    gpt, _ = load_checkpoint(tiny_checkpoint)
    with pytest.raises(ConfigError, match="task.lora.targets"):
        apply_lora(gpt, 4, 8.0, 0.0, ["qkv", "wq"])


# ---------------------------------------------------------------- bad input: exit 2, one line


@pytest.fixture
def word_files(tmp_path) -> Path:
    write_word_task(tmp_path / "train.tsv", 40, seed=0)
    write_word_task(tmp_path / "dev.tsv", 20, seed=1)
    return tmp_path


def finetune_cli(checkpoint: Path, train: Path, *extra: str):
    return run_cli("finetune", "--set", f"init.checkpoint={checkpoint}", "--set", f"data.train={train}",
                   "--set", "data.text_field=sentence", "--set", f"run.storage_path={train.parent / 'runs'}", *extra)


def test_bad_fine_tuning_input_is_one_line_and_exit_2(tiny_checkpoint, word_files):
    train = word_files / "train.tsv"
    no_label = word_files / "no_label.tsv"
    no_label.write_text("sentence\tscore\nfine words\t3\n")
    assert_one_line_error(finetune_cli(tiny_checkpoint, no_label), "no_label.tsv:1", "no column 'label'")

    empty = word_files / "empty.jsonl"
    empty.write_text("")
    assert_one_line_error(finetune_cli(tiny_checkpoint, empty), "empty.jsonl", "no examples")

    stray = word_files / "stray.tsv"
    stray.write_text(train.read_text() + "a stray sentence\tneutral\n")
    assert_one_line_error(finetune_cli(tiny_checkpoint, train, "--set", "task.labels=[pos, neg]",
                                       "--set", f"data.dev={stray}"),
                          "stray.tsv:42", "label 'neutral' is not one of the task's labels")

    broken = word_files / "broken.jsonl"
    broken.write_text('{"sentence": "ok", "label": "pos"}\n{"sentence": "cut\n')
    assert_one_line_error(finetune_cli(tiny_checkpoint, broken), "broken.jsonl:2", "not valid JSON")

    # pipeline parallelism runs pretraining only: fine-tuning under it is refused before anything starts
    assert_one_line_error(finetune_cli(tiny_checkpoint, train, "--set", "parallel.workers=2", "--set", "parallel.pp=2"),
                          "parallel.pp=2: fine-tuning (task.kind=classification)", "set parallel.pp=1")
    assert_one_line_error(finetune_cli(tiny_checkpoint, train, "--set", "parallel.workers=2", "--set", "parallel.tp=2",
                                       "--set", "task.mode=lora"), "task.mode=lora works with parallel.tp=1", "got parallel.tp=2")


def test_one_label_in_task_labels_blames_task_labels_not_the_training_file(tiny_checkpoint, word_files):
    """The training file has both labels: the message used to name it and say to list them in task.labels."""
    from mtnlg_ray.config import load_config
    from mtnlg_ray.errors import ConfigError
    from mtnlg_ray.finetune.trainer import prepare_finetune

    cfg = load_config(overrides=[f"init.checkpoint={tiny_checkpoint}", f"data.train={word_files / 'train.tsv'}",
                                 "data.text_field=sentence", "task.labels=[pos]"], stage="finetune")
    with pytest.raises(ConfigError, match=r"^task.labels: only one label \('pos'\); classification needs at least two$"):
        prepare_finetune(cfg)


def test_the_default_sft_schedule_decays_over_the_tokens_the_run_trains(tiny_checkpoint, tmp_path):
    """SFT's default decay was counted from prompt + completion encoded as one text, not as the task
    encodes a pair (an empty prompt stands as an EOS): on short completions without a prompt the run
    trained 5 % more tokens than it decayed over."""
    from mtnlg_ray.config import load_config
    from mtnlg_ray.finetune.tasks import SFTTask
    from mtnlg_ray.finetune.trainer import prepare_finetune

    train = tmp_path / "sft.jsonl"
    train.write_text("".join(json.dumps({"prompt": "", "completion": f"def f{i}(x): return x + {i}"}) + "\n"
                             for i in range(50)), encoding="utf-8")
    cfg = load_config(overrides=[f"init.checkpoint={tiny_checkpoint}", f"data.train={train}", "task.kind=sft",
                                 "train.epochs=2"], stage="finetune")
    cfg, model_config, _, tokenizer_file = prepare_finetune(cfg)
    task = SFTTask(cfg, tokenizer_file, model_config)
    assert cfg.train.decay_tokens == 2 * task.tokens(np.arange(len(task)))


def test_a_checkpoint_of_another_vocabulary_is_one_line(tiny_checkpoint, word_files, tmp_path):
    from mtnlg_ray.tokenizer import train_tokenizer

    other = tmp_path / "other_tok"
    (tmp_path / "words.txt").write_text(" ".join(GREEK + PLACES) * 20)
    train_tokenizer([str(tmp_path / "words.txt")], 300, other, show_progress=False)
    result = finetune_cli(tiny_checkpoint, word_files / "train.tsv", "--set", f"tokenizer.path={other}")
    assert_one_line_error(result, "its tokenizer differs from tokenizer.path", "another vocabulary")


def test_init_checkpoint_mistakes_are_one_line_before_a_worker_starts(tiny_checkpoint, word_files, tmp_path):
    """A checkpoint without its weights, or one whose config.json no longer matches its tensors, is
    refused on the driver from the safetensors header: one line, no run directory, no worker started
    (a worker loading it used to fail behind Ray's traceback and retries)."""
    no_weights = tmp_path / "no_weights"
    shutil.copytree(tiny_checkpoint, no_weights)
    (no_weights / "model.safetensors").unlink()
    assert_one_line_error(finetune_cli(no_weights, word_files / "train.tsv"), "no_weights/model.safetensors: missing")

    reshaped = tmp_path / "reshaped"
    shutil.copytree(tiny_checkpoint, reshaped)
    body = json.loads((reshaped / "config.json").read_text())
    body["model"]["d_model"] = 64  # the file still holds 128-wide tensors
    (reshaped / "config.json").write_text(json.dumps(body))
    assert_one_line_error(finetune_cli(reshaped, word_files / "train.tsv"),
                          "reshaped/model.safetensors: tensor 'tok_emb.weight' has shape [", "128], config expects [")
    assert not (word_files / "runs").exists()


def test_readers_name_the_file_and_line(tmp_path):
    from mtnlg_ray.finetune.data import read_classification, read_sft

    bad = tmp_path / "rows.jsonl"
    bad.write_text('{"text": "a", "label": "x"}\n\n{"text": "b"}\n')
    with pytest.raises(InputError, match=r"rows.jsonl:3: missing field 'label'"):
        read_classification(bad, "text", "label")
    bad.write_text('{"text": "a", "label": 0}\n{"text": "b", "label": true}\n')  # was a third class, "True"
    with pytest.raises(InputError, match=r"rows.jsonl:2: field 'label' is True, but .*rows.jsonl:1 holds a label that "
                                         r"is not true / false; give every label the same kind"):
        read_classification(bad, "text", "label")
    bad.write_text('{"text": "a", "label": false}\n{"text": "b", "label": true}\n')  # a true / false task reads
    assert [r.label for r in read_classification(bad, "text", "label").rows] == ["False", "True"]
    sft = tmp_path / "sft.jsonl"
    sft.write_text('{"prompt": "q", "completion": ""}\n')
    with pytest.raises(InputError, match="sft.jsonl:1: field 'completion' is empty"):
        read_sft(sft)
    empty = tmp_path / "empty.tsv"  # 0 bytes: said to be empty, not to lack a column in a header it has not
    empty.write_text("")
    with pytest.raises(InputError, match=r"empty.tsv: empty file \(expected a header line naming 'sentence', 'label'"):
        read_classification(empty, "sentence", "label")
    empty.write_text("\nsentence\tlabel\nhi\t1\n")  # rows under a blank first line: not an empty file
    with pytest.raises(InputError, match=r"empty.tsv:1: blank header line \(expected a header naming 'sentence'"):
        read_classification(empty, "sentence", "label")
    # JSON's own position counted within the line ("line 2 column 1" for line 11); an empty text trained
    # as an EOS alone; an empty .jsonl was said to hold "only a header"; a wrong label_field listed every text
    for content, message in (
            ('{"text": "a", "label": "x"}\n{"text": "b", "label": \n',
             r"rows.jsonl:2: not valid JSON \(Expecting value at the end of the line\)$"),
            ('{"text": "a", "label": x}\n', r"rows.jsonl:1: not valid JSON \(Expecting value at character 24\)$"),
            ('{"text": "a", "label": "x"}\n{"text": "abc\n{"text": "b", "label": "y"}\n',
             r"rows.jsonl:2: not valid JSON \(Unterminated string starting at character 10\)$"),
            ('{"text": "a", "label": "x"}\n{"text": "  ", "label": "y"}\n',
             r"rows.jsonl:2: field 'text' is empty \(a labelled example needs its text\)"),
            ("\n", r"rows.jsonl: no examples \(the file is empty\)$")):
        bad.write_text(content)
        with pytest.raises(InputError, match=message):
            read_classification(bad, "text", "label")
    from mtnlg_ray.finetune.data import check_labels

    bad.write_text("".join(f'{{"text": "t{i}", "label": "l{i}"}}\n' for i in range(40)))
    with pytest.raises(InputError, match=r"rows.jsonl:1: label 'l0' is not one of the task's labels \['m0', 'm1', "
                                         r"'m2', 'm3', 'm4', 'm5', 'm6', 'm7', 'm8', 'm9' and 30 more\] \(data.dev\)$"):
        check_labels(read_classification(bad, "text", "label"), [f"m{i}" for i in range(40)], "data.dev")


def test_a_damaged_gzip_is_one_line_and_a_byte_order_mark_is_no_part_of_the_header(tmp_path):
    """A .jsonl.gz whose deflate data is damaged raised zlib.error (a traceback, exit 1); a spreadsheet's
    "CSV UTF-8" (a leading byte-order mark) was refused for lacking the column its header names."""
    from mtnlg_ray.finetune.data import read_classification

    damaged = tmp_path / "damaged.jsonl.gz"
    damaged.write_bytes(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff" + b"\xff" * 32)  # a good header, no deflate block
    with pytest.raises(InputError, match=r"damaged.jsonl.gz: unreadable \(.*invalid block type"):
        read_classification(damaged, "text", "label")

    bom_csv = tmp_path / "excel.csv"
    bom_csv.write_bytes("\ufeffsentence,label\ngood film,pos\nbad film,neg\n".encode("utf-8"))
    rows = read_classification(bom_csv, "sentence", "label").rows
    assert [(r.text, r.label, r.where) for r in rows] == [("good film", "pos", f"{bom_csv}:2"),
                                                          ("bad film", "neg", f"{bom_csv}:3")]
    bom_jsonl = tmp_path / "rows.jsonl"
    bom_jsonl.write_bytes('\ufeff{"text": "a", "label": "x"}\n{"text": "b", "label": "y"}\n'.encode("utf-8"))
    assert read_classification(bom_jsonl, "text", "label").labels == ["x", "y"]


def test_a_row_with_more_fields_than_its_header_is_refused_not_read_as_a_new_label(tmp_path):
    """An unquoted comma in a CSV text (or a tab in a TSV one) used to move the rest of the text into the
    label column: a third class, trained without a word."""
    from mtnlg_ray.finetune.data import read_classification

    csv_file = tmp_path / "train.csv"
    csv_file.write_text('text,label\n"quoted, fine",pos\nslow, but worth it,pos\n', encoding="utf-8")
    with pytest.raises(InputError, match=r"train.csv:3: expected 2 ','-separated fields, got 3 \(an unquoted comma"):
        read_classification(csv_file, "text", "label")
    tsv = tmp_path / "train.tsv"
    tsv.write_text("sentence\tlabel\nfine\t1\nthe acting\there\t0\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"train.tsv:3: expected 2 '\\t'-separated fields, got 3 \(a tab inside"):
        read_classification(tsv, "sentence", "label")
    csv_file.write_text('text,label\n"quoted, fine",pos\n', encoding="utf-8")
    assert read_classification(csv_file, "text", "label").texts == ["quoted, fine"]
    tsv.write_text("sentence\tlabel\nfine\t1\nok\t0\t\n", encoding="utf-8")  # an exported trailing tab
    assert read_classification(tsv, "sentence", "label").labels == ["1", "0"]


def test_a_field_longer_than_the_csv_modules_default_cap_is_read(tmp_path):
    from mtnlg_ray.finetune.data import read_classification

    long = " ".join(["word"] * 40_000)  # 200k characters, over csv's 131,072
    tsv = tmp_path / "long.tsv"
    tsv.write_text(f"sentence\tlabel\n{long}\t1\nshort\t0\n", encoding="utf-8")
    assert [len(t) for t in read_classification(tsv, "sentence", "label").texts] == [len(long), 5]


@pytest.mark.parametrize("probs", ["[-1.2, 0.8]", "[NaN, 1.0]", "[0, 0]", "[Infinity, 1]", "[true, false]"])
def test_soft_labels_must_be_probabilities(tmp_path, probs):
    """Logits or NaN as `probs` used to train: targets of -1.2e12, or a NaN loss that made every weight NaN."""
    from mtnlg_ray.finetune.data import read_classification

    rows = tmp_path / "soft.jsonl"
    rows.write_text('{"text": "a", "label": "x", "probs": [0.9, 0.1]}\n'
                    f'{{"text": "b", "label": "y", "probs": {probs}}}\n', encoding="utf-8")
    with pytest.raises(InputError, match=r"soft.jsonl:2: field 'probs' must be a list of finite numbers >= 0"):
        read_classification(rows, "text", "label")


@pytest.mark.parametrize("override,blamed,message", [
    ("task.labels=[neg,pos,neg]", "task.labels", "task.labels lists 'neg' twice"),
    ("task.labels=[neg,'']", "task.labels", "'' is no label name"),
    ("train.seed=-1", "train.seed", "greater than or equal to 0"),
    # alone, it ran a full fine-tune without a word
    ("task.lora.rank=16", "task.lora.rank", "task.mode is full, so no LoRA adapter trains; add --set task.mode=lora"),
])
def test_task_and_seed_mistakes_fail_at_config_time_and_blame_the_set(override, blamed, message):
    """Duplicate labels used to train a head output that nothing reaches and fail only when best/ was
    saved; a negative seed crashed numpy's generator on every worker."""
    from mtnlg_ray.config import load_config
    from mtnlg_ray.errors import ConfigError

    with pytest.raises(ConfigError, match=f"^--set {re.escape(override)}: .*{re.escape(message)}"):
        load_config(overrides=[override], stage="finetune")
    with pytest.raises(ConfigError, match=r"^--set task.mode=frozen: task.mode=frozen leaves nothing to train"):
        load_config(overrides=["task.kind=sft", "task.mode=frozen"], stage="finetune")


def test_a_shape_key_beside_init_checkpoint_is_said_to_be_unused(tiny_checkpoint, word_files, capsys):
    # `--set model.n_layer=9` trained the checkpoint's layers without a word, while `config show` said 9.
    from mtnlg_ray.config import load_config
    from mtnlg_ray.finetune.trainer import prepare_finetune

    def prepare(*extra: str):
        cfg = load_config(overrides=[f"init.checkpoint={tiny_checkpoint}", f"data.train={word_files / 'train.tsv'}",
                                     "data.text_field=sentence", *extra], stage="finetune")
        return prepare_finetune(cfg)[1]

    shape = prepare("model.n_layer=9", "model.dropout=0.2")
    assert shape.dropout == 0.2 and shape.n_layer != 9
    assert capsys.readouterr().err.strip().splitlines() == [
        f"warning: model.n_layer=9 is not used: init.checkpoint fixes the model's shape (n_layer {shape.n_layer}); "
        "only model.dropout and model.activation_checkpointing apply"]
    prepare(f"model.n_layer={shape.n_layer}")  # what the checkpoint holds anyway: nothing to say
    assert capsys.readouterr().err == ""


def test_a_resumed_fine_tunes_task_setup_ignores_the_order_of_lora_targets():
    from mtnlg_ray.config import load_config
    from mtnlg_ray.train.checkpoint import task_setup

    def setup(targets: str) -> dict:
        return task_setup(load_config(overrides=["task.mode=lora", f"task.lora.targets={targets}"],
                                      stage="finetune"), "classification")

    assert setup("[proj,qkv]") == setup("[qkv,proj]") != setup("[qkv]")  # the adapters are a set
    assert task_setup(load_config(), "lm") is None  # pretraining records none


def test_a_fine_tune_resumed_with_another_dev_metric_is_refused(tmp_path):
    """Resumed with task.metric=macro_f1 after accuracy, a run compared each new macro F1 with the old
    best accuracy (0.8), so best/ never moved and the summary named the metric beside the other's score."""
    import json

    from mtnlg_ray.config import load_config
    from mtnlg_ray.errors import ConfigError
    from mtnlg_ray.train.checkpoint import STATE_FILE, check_resume_task, task_setup

    def setup(*extra: str) -> dict:
        return task_setup(load_config(overrides=list(extra), stage="finetune"), "classification")

    checkpoint = tmp_path / "run" / "checkpoint_1"
    checkpoint.mkdir(parents=True)
    (checkpoint / STATE_FILE).write_text(json.dumps({"step": 1, "task_setup": setup()}))
    check_resume_task(checkpoint, setup("task.metric=accuracy"))  # the default, named: the same metric
    with pytest.raises(ConfigError, match=r"trained with task.metric accuracy, but this run's task.metric is "
                                          r"macro_f1; start a new run under another run.name"):
        check_resume_task(checkpoint, setup("task.metric=macro_f1"))


def test_a_fine_tune_resumed_after_its_start_checkpoint_was_trained_again_is_refused(tmp_path):
    """A finished fine-tune re-run after `init.checkpoint` was trained again (the quickstart's own hint:
    delete runs/pretrain to train it again) resumed as finished and reported the old classifier as the
    new model's: the run records a digest of the start weights, and another is refused. The digest
    reads a large file in part, and still sees a classifier whose small head alone was trained again."""
    import json
    import shutil

    from safetensors.torch import save_file

    from mtnlg_ray.config import load_config
    from mtnlg_ray.errors import ConfigError
    from mtnlg_ray.train.checkpoint import STATE_FILE, check_resume_task, task_setup, weights_digest

    start = tmp_path / "classifier" / "final"
    start.mkdir(parents=True)
    body = torch.arange(3_000_000, dtype=torch.float32)  # 2 x 12 MB: past the size read whole
    # the head between the two, where none of the evenly spaced blocks reads
    save_file({"a.weight": body, "head.weight": torch.ones(2, 8), "z.weight": body + 1}, start / "model.safetensors")

    def setup(folder) -> dict:
        return task_setup(load_config(overrides=[f"init.checkpoint={folder}"], stage="finetune"), "classification")

    checkpoint = tmp_path / "run" / "checkpoint_3"
    checkpoint.mkdir(parents=True)
    (checkpoint / STATE_FILE).write_text(json.dumps({"step": 3, "task_setup": setup(start)}))
    moved = tmp_path / "elsewhere"
    shutil.copytree(start, moved)
    check_resume_task(checkpoint, setup(moved))  # the same weights in another folder resume
    save_file({"a.weight": body, "head.weight": torch.full((2, 8), 2.0), "z.weight": body + 1}, start / "model.safetensors")
    with pytest.raises(ConfigError, match=r"fine-tuned from other weights than init.checkpoint holds now; start a "
                                          r"new run under another run.name \(or delete .*run to fine-tune"):
        check_resume_task(checkpoint, setup(start))
    # self-training's rounds all start from these weights: its message names its whole run to delete
    with pytest.raises(ConfigError, match=rf"\(or delete {re.escape(str(tmp_path / 'selftrain'))} to fine-tune"):
        check_resume_task(checkpoint, setup(start), run_root=tmp_path / "selftrain")
    assert weights_digest(start / "model.safetensors") != weights_digest(moved / "model.safetensors")


def test_lora_targets_and_sft_token_dropout_are_refused_at_config_time():
    """An unknown LoRA target failed on the workers, once per retry of the run; token dropout under SFT
    was accepted and did nothing."""
    from mtnlg_ray.config import load_config
    from mtnlg_ray.errors import ConfigError

    for targets in ("[attn]", "[]", "[qkv,wq]"):
        with pytest.raises(ConfigError, match=re.escape(f"--set task.lora.targets={targets}: task.lora.targets: "
                                                        "expected a non-empty list of qkv, proj, fc1, fc2")):
            load_config(overrides=["task.mode=lora", f"task.lora.targets={targets}"], stage="finetune")
    assert load_config(overrides=["task.mode=lora", "task.lora.targets=[fc1,fc2]"],
                       stage="finetune").task.lora.targets == ["fc1", "fc2"]
    with pytest.raises(ConfigError, match="task.token_dropout drops a classification text's tokens"):
        load_config(overrides=["task.kind=sft", "task.token_dropout=0.2"], stage="finetune")


# ---------------------------------------------------------------- real runs


POSITIVE = "good great fine superb lovely".split()
NEGATIVE = "bad awful poor dull weak".split()
FILLER = ("the a of function value list class module file return object string number method name type data "
          "code call line").split()


def write_sentiment_task(path: Path, n: int, seed: int) -> None:
    """SST-2 in miniature: one polar word somewhere in 6-16 neutral ones decides the label."""
    def sentence(rng, label):
        words = [rng.choice(FILLER) for _ in range(rng.randint(6, 16))]
        words.insert(rng.randrange(len(words) + 1), rng.choice(POSITIVE if label == "pos" else NEGATIVE))
        return " ".join(words)

    write_task(path, n, seed, sentence)


def test_shipped_defaults_learn_a_sentiment_like_task(tiny_checkpoint, tmp_path):
    """Only the start, the files and the text column set: the shipped defaults must learn. The defaults
    before issue 18 (last-token pooling, 3 epochs, LR 5e-4, no dropout) score 0.56 here, near chance."""
    write_sentiment_task(tmp_path / "train.tsv", 200, seed=0)
    write_sentiment_task(tmp_path / "dev.tsv", 100, seed=1)
    result = run_cli("finetune", "--set", f"init.checkpoint={tiny_checkpoint}",
                     "--set", f"data.train={tmp_path / 'train.tsv'}", "--set", f"data.dev={tmp_path / 'dev.tsv'}",
                     "--set", "data.text_field=sentence", "--set", f"run.storage_path={tmp_path / 'runs'}", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "runs" / "finetune" / "finetune_summary.json").read_text())
    assert summary["dev"]["accuracy"] >= 0.75, summary["dev_history"]  # 0.84 when written; chance is 0.5
    config = json.loads((tmp_path / "runs" / "finetune" / "final" / "config.json").read_text())
    assert config["task"]["pooling"] == "mean"

    # The same run again with a third label: its checkpoints hold a 2-output head. One line on the
    # driver (it was a size-mismatch traceback from the worker, after every retry), the run untouched.
    before = (tmp_path / "runs" / "finetune" / "metrics.jsonl").read_bytes()
    again = run_cli("finetune", "--set", f"init.checkpoint={tiny_checkpoint}", "--set", f"data.train={tmp_path / 'train.tsv'}",
                    "--set", "data.text_field=sentence", "--set", f"run.storage_path={tmp_path / 'runs'}",
                    "--set", "task.labels=[neg, pos, mixed]")
    assert again.returncode == 2, again.stderr[-3000:]
    errors = [line for line in again.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in again.stderr, again.stderr[-3000:]
    assert "a classifier of 2 labels, but this run's task has 3" in errors[0]
    assert (tmp_path / "runs" / "finetune" / "metrics.jsonl").read_bytes() == before


@pytest.fixture(scope="module")
def self_trained(tmp_path_factory, tokenizer_dir):
    """`mtnlg-ray self-train` as a user runs it: a random-init teacher, one round of pseudo-labels, a student."""
    return run_self_training(tmp_path_factory.mktemp("selftrain"), tokenizer_dir, "st",
                             "selftrain.threshold=0.8", "train.epochs=4", "selftrain.student_epochs=1")


def run_self_training(work: Path, tokenizer_dir: Path, name: str, *settings: str):
    """One round of `mtnlg-ray self-train` on the word task at toy size, as `run.name=name`; `settings` add --set's."""
    write_word_task(work / "labelled.tsv", 96, seed=0)
    write_word_task(work / "dev.tsv", 64, seed=1)
    write_word_task(work / "pool.tsv", 160, seed=2)
    result = self_train_cli(work, tokenizer_dir, name, *settings)
    assert result.returncode == 0, result.stderr[-3000:]
    return work, result


def self_train_cli(work: Path, tokenizer_dir: Path, name: str, *settings: str):
    sets = [f"tokenizer.path={tokenizer_dir}", "model.preset=tiny", "model.n_layer=2", "model.seq_len=32",
            f"data.train={work / 'labelled.tsv'}", f"data.dev={work / 'dev.tsv'}", "data.text_field=sentence",
            f"selftrain.unlabelled={work / 'pool.tsv'}", "selftrain.rounds=1", "train.global_batch_size=16",
            "train.lr=3e-3", "train.peak_tflops=1.0", f"run.storage_path={work / 'runs'}", f"run.name={name}",
            *settings]
    return run_cli("self-train", *[arg for value in sets for arg in ("--set", value)], timeout=600)


def test_self_training_runs_teacher_labelling_and_student(self_trained):
    work, result = self_trained
    root = work / "runs" / "st"
    report = json.loads((root / "self_train_report.json").read_text())
    teacher, student = report["rounds"]
    assert report["labelled"] == 96 and report["pool"] == 160 and report["threshold"] == 0.8
    assert report["student_token_dropout"] == 0.2  # noisy students by default
    assert teacher["dev_accuracy"] >= 0.9  # a separable task: the loop really trains
    kept = sum(student["kept_per_class"].values())
    assert 0 < kept <= 160 and student["train_examples"] == 96 + kept
    assert student["pseudo_label_accuracy"] >= 0.9  # confident predictions match the pool's hidden labels
    assert student["pseudo_labels_scored"] == kept and teacher["pseudo_labels_scored"] is None  # every pool row has gold
    assert student["dev_accuracy"] >= 0.9
    lines = (root / "round1" / "train.jsonl").read_text().splitlines()
    assert len(lines) == 96 + kept
    assert (root / "self_train.png").stat().st_size > 1000
    assert report["final"] == str(root / "round1" / "final")
    assert "self-training: 96 labelled, 160 in the pool" in result.stdout
    assert result.stdout.strip().endswith(str(root / "round1" / "final"))


def test_evaluate_reproduces_the_dev_accuracy_of_the_saved_student(self_trained):
    work, _ = self_trained
    report = json.loads((work / "runs" / "st" / "self_train_report.json").read_text())
    final = report["final"]
    # No --task: a classifier checkpoint is scored as one (a TSV used to be read as lm text and refused)
    result = run_cli("evaluate", "--checkpoint", final, "--data", str(work / "dev.tsv"), "--text-field", "sentence",
                     "--json")
    assert result.returncode == 0, result.stderr
    scores = json.loads(result.stdout)
    assert scores["task"] == "classification" and scores["n"] == 64
    assert scores["accuracy"] == pytest.approx(report["rounds"][1]["dev_accuracy"])
    # The labels a classification checkpoint carries decide what a file may hold.
    bad = work / "bad_dev.tsv"
    bad.write_text("sentence\tlabel\nalpha beta\tmaybe\n")
    assert_one_line_error(
        run_cli("evaluate", "--checkpoint", final, "--data", str(bad), "--task", "classification",
                "--text-field", "sentence"),
        "bad_dev.tsv:2", "label 'maybe'")
    from mtnlg_ray.finetune.evaluate import evaluate

    with pytest.raises(InputError, match="^--split: picks a split of a prepared dataset"):  # it was ignored
        evaluate(final, [str(work / "dev.tsv")], text_field="sentence", split="train")
    # Exported to Hugging Face, the classifier's body is a language model; the CLI says the head stays behind.
    exported = run_cli("export", "hf", "--checkpoint", final, "--output", str(work / "hf_student"))
    assert exported.returncode == 0, exported.stderr
    assert "classification head is not in the export" in exported.stderr
    assert (work / "hf_student" / "model.safetensors").is_file()


def test_sft_with_an_empty_prompt_trains_the_completions_first_token(tiny_checkpoint, tmp_path):
    # The first token used to be an input only, never a target, while exact match scored its
    # prediction from an EOS: now the prompt is that EOS, and the token is trained from it.
    from mtnlg_ray.checkpoint import load_checkpoint
    from mtnlg_ray.config import load_config
    from mtnlg_ray.finetune.tasks import SFTTask

    (tmp_path / "sft.jsonl").write_text(json.dumps({"prompt": "", "completion": "yes indeed"}) + "\n")
    cfg = load_config(overrides=["task.kind=sft", f"data.train={tmp_path / 'sft.jsonl'}"], stage="finetune")
    model, _ = load_checkpoint(tiny_checkpoint)
    task = SFTTask(cfg, tiny_checkpoint / "tokenizer.json", model.config)
    from mtnlg_ray.tokenizer import load_tokenizer

    completion = load_tokenizer(tiny_checkpoint / "tokenizer.json").encode("yes indeed").ids
    ids, start = task.train[0]
    assert (ids, start) == ([task.eos, *completion, task.eos], 1)
    inputs, targets = task._batch(task.train, "cpu")
    assert targets[0].tolist() == [*completion, task.eos] and task._targets(0) == len(completion) + 1
    assert inputs[0].tolist() == [task.eos, *completion]


def test_sft_loss_is_the_mean_over_the_steps_completion_tokens_at_any_micro_batch_and_dp(tiny_checkpoint, tmp_path):
    """Completions of 1, 1, 30 and 30 words: micro-batch means averaged with equal weights gave 4.120 at
    micro-batch 2 against 4.364 at 4. Weighted by `loss_scales`, every split gives the token mean."""
    from mtnlg_ray.checkpoint import load_checkpoint
    from mtnlg_ray.config import load_config
    from mtnlg_ray.finetune.tasks import SFTTask
    from mtnlg_ray.model.gpt import lm_loss

    rows = [{"prompt": "q: ", "completion": "yes"}, {"prompt": "q: ", "completion": "no"},
            {"prompt": "tell: ", "completion": " ".join(["word"] * 30)},
            {"prompt": "tell: ", "completion": " ".join(["line"] * 30)}]
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(overrides=["task.kind=sft", f"data.train={tmp_path / 'sft.jsonl'}"], stage="finetune")
    model, _ = load_checkpoint(tiny_checkpoint)
    task = SFTTask(cfg, tiny_checkpoint / "tokenizer.json", model.config)
    step = np.arange(4)
    with torch.no_grad():
        whole = float(task.loss(model, step, "cpu"))
        inputs, targets = task._batch([task.train[i] for i in step], "cpu")
        assert whole == pytest.approx(float(lm_loss(model(inputs), targets)), rel=1e-6)
        for micro, dp in ((1, 1), (2, 1), (1, 2), (1, 4)):
            per_rank = len(step) // dp
            ranks = [step[r * per_rank:(r + 1) * per_rank] for r in range(dp)]
            # each rank's weighted micro-batch losses, then the mean over ranks (the gradient reduction)
            total = 0.0
            for rank in ranks:
                parts = np.split(rank, len(rank) // micro)
                total += sum(float(task.loss(model, part, "cpu")) * scale
                             for part, scale in zip(parts, task.loss_scales(parts, step, dp)))
            total /= dp
            assert total == pytest.approx(whole, rel=1e-5), (micro, dp)
        equal_weights = np.mean([float(task.loss(model, step[i:i + 2], "cpu")) for i in (0, 2)])
        assert abs(equal_weights - whole) > 0.05  # what the split used to change


def test_exact_match_decodes_real_tokens_only_not_the_embeddings_padding(tiny_checkpoint, tmp_path):
    """The embedding is padded past the tokenizer's vocabulary; greedy scoring used to take its argmax
    over the padding too. A model whose padded rows win every argmax shows it."""
    import dataclasses

    from mtnlg_ray.config import load_config
    from mtnlg_ray.finetune.tasks import SFTTask
    from mtnlg_ray.model.gpt import GPT
    from mtnlg_ray.model.presets import PRESETS

    (tmp_path / "sft.jsonl").write_text(json.dumps({"prompt": "q: ", "completion": "the list"}) + "\n")
    cfg = load_config(overrides=["task.kind=sft", f"data.train={tmp_path / 'sft.jsonl'}"], stage="finetune")
    task = SFTTask(cfg, tiny_checkpoint / "tokenizer.json", PRESETS["tiny"])
    model_config = dataclasses.replace(PRESETS["tiny"], vocab_size=task.vocab + 64)  # 64 rows of padding
    torch.manual_seed(0)
    model = GPT(model_config).eval()
    with torch.no_grad():
        model.ln_f.weight.zero_()  # every position's final state is the LayerNorm's bias, b
        model.ln_f.bias.normal_()
        b = model.ln_f.bias
        model.tok_emb.weight[task.vocab + 3] = 50 * b / b.dot(b)  # a padded id's logit: 50
        model.tok_emb.weight[7] = 20 * b / b.dot(b)  # the best real token's: 20
        model.tok_emb.weight[: task.vocab].mul_(torch.arange(task.vocab)[:, None] == 7)
        (answer,) = task.greedy_completions(model, task.train, "cpu")
    assert answer == [7] * len(answer) and len(answer) >= 2


def test_sft_with_lora_on_two_fsdp_workers_learns_and_saves_merged_weights(ray_session, tiny_checkpoint, tmp_path):
    """Loss on completions only, LoRA adapters under FSDP on 2 ranks, final weights merged into a plain GPT."""
    from mtnlg_ray.checkpoint import load_checkpoint
    from mtnlg_ray.config import load_config
    from mtnlg_ray.finetune.tasks import SFTTask
    from mtnlg_ray.finetune.trainer import finetune
    from mtnlg_ray.model.gpt import GPTConfig

    pairs = [(f"colour of {thing}:", f" {colour}") for thing, colour in
             [("sky", "blue"), ("grass", "green"), ("snow", "white"), ("coal", "black"), ("blood", "red"),
              ("sun", "yellow"), ("sea", "blue"), ("night", "black")]]
    with (tmp_path / "sft.jsonl").open("w") as fh:
        for _ in range(4):
            for prompt, completion in pairs:
                fh.write(json.dumps({"prompt": prompt, "completion": completion}) + "\n")
    with (tmp_path / "dev.jsonl").open("w") as fh:
        for prompt, completion in pairs:
            fh.write(json.dumps({"prompt": prompt, "completion": completion}) + "\n")
    cfg = load_config(overrides=[
        f"init.checkpoint={tiny_checkpoint}", f"data.train={tmp_path / 'sft.jsonl'}", f"data.dev={tmp_path / 'dev.jsonl'}",
        "task.kind=sft", "task.mode=lora", "task.lora.rank=8", "task.lora.targets=[qkv, proj, fc1, fc2]",
        "task.metric=loss", "model.dropout=0", "train.epochs=4", "train.lr=1e-2", "train.micro_batch_size=4",
        "train.global_batch_size=8",
        "train.peak_tflops=1.0", "parallel.workers=2", f"run.storage_path={tmp_path / 'runs'}", "run.name=sft",
    ], stage="finetune")
    result = finetune(cfg)
    history = [d["loss"] for d in result["dev_history"]]
    assert len(history) == 4 and min(history) < 0.75 * history[0]  # 4.57 → 2.90 when written
    assert result["dev"]["loss"] == pytest.approx(min(history))

    start = [json.loads(line) for line in (tmp_path / "runs" / "sft" / "metrics.jsonl").read_text().splitlines()][0]
    assert start["world_size"] == 2 and start["dp"] == 2
    base, _ = load_checkpoint(tiny_checkpoint)
    from mtnlg_ray.model.lora import lora_parameter_count

    c = base.config
    assert start["trainable_parameters"] == lora_parameter_count(c.n_layer, c.d_model, 8, ["qkv", "proj", "fc1", "fc2"])

    # The final checkpoint is a plain GPT (LoRA merged) that scores the dev set as the run did.
    final, _ = load_checkpoint(result["final"])
    task = SFTTask(load_config(overrides=[f"data.train={tmp_path / 'sft.jsonl'}", f"data.dev={tmp_path / 'dev.jsonl'}",
                                          "task.kind=sft"], stage="finetune"),
                   Path(result["final"]) / "tokenizer.json", GPTConfig(**final.config.to_dict()))
    scored = task.evaluate(final, "cpu", 8)
    assert scored["loss"] == pytest.approx(result["dev"]["loss"], abs=1e-4)
    assert not torch.equal(final.blocks[0].mlp.fc1.weight, base.blocks[0].mlp.fc1.weight)
    assert torch.equal(final.tok_emb.weight, base.tok_emb.weight)  # not a LoRA target: untouched


def test_a_self_train_rerun_with_another_task_setting_is_refused_before_labelling(self_trained, tokenizer_dir):
    """With a given teacher, a re-run with another pooling labelled the whole pool again, and only then
    did round 1's student refuse to resume."""
    work, _ = self_trained
    root = work / "runs" / "st"
    pseudo = root / "round1" / "pseudo" / "manifest.json"
    before = pseudo.stat().st_mtime_ns
    result = self_train_cli(work, tokenizer_dir, "st", "selftrain.threshold=0.8", "train.epochs=4",
                            "selftrain.student_epochs=1", f"selftrain.teacher={root / 'round0' / 'final'}",
                            "task.pooling=last")
    assert_one_line_error(result, "st/round1: the run resumes from checkpoint_", "trained with task.pooling mean",
                          "this run's task.pooling is last")
    assert pseudo.stat().st_mtime_ns == before  # the pool was not labelled again
    # The students' layout too: parallel.pp=2 was refused at round 1's student, after the labelling
    result = self_train_cli(work, tokenizer_dir, "st", "selftrain.threshold=0.8", "train.epochs=4",
                            "selftrain.student_epochs=1", f"selftrain.teacher={root / 'round0' / 'final'}",
                            "parallel.pp=2", "parallel.workers=2")
    assert_one_line_error(result, "parallel.pp=2: fine-tuning (task.kind=classification) does not run under "
                                  "pipeline parallelism")
    assert pseudo.stat().st_mtime_ns == before


def test_a_given_teacher_must_classify_the_tasks_labels(self_trained, tokenizer_dir):
    work, _ = self_trained
    other = work / "other_labels.tsv"
    other.write_text("sentence\tlabel\nalpha beta gamma\tx\nriver ocean\ty\n")
    result = run_cli(
        "self-train", "--set", f"tokenizer.path={tokenizer_dir}", "--set", f"data.train={other}",
        "--set", "data.text_field=sentence", "--set", f"selftrain.unlabelled={work / 'pool.tsv'}",
        "--set", f"selftrain.teacher={work / 'runs' / 'st' / 'round0' / 'final'}",
        "--set", f"run.storage_path={work / 'runs'}", "--set", "run.name=mismatch",
    )
    assert_one_line_error(result, "selftrain.teacher", "classifies ['neg', 'pos']", "['x', 'y']")


def test_classification_and_sft_train_under_tensor_and_sequence_parallelism(ray_session, tiny_checkpoint, word_files,
                                                                             tmp_path):
    """tp2 with sequence parallelism (the vocabulary split, batches padded to a multiple of tp, the
    classification head replicated): the classifier takes one worker's steps, and SFT learns."""
    from mtnlg_ray.config import load_config
    from mtnlg_ray.finetune.trainer import finetune
    from mtnlg_ray.train.plot import read_metrics

    def classify(name: str, *layout: str) -> list[dict]:
        cfg = load_config(overrides=[
            f"init.checkpoint={tiny_checkpoint}", f"data.train={word_files / 'train.tsv'}",
            f"data.dev={word_files / 'dev.tsv'}", "data.text_field=sentence", "task.labels=[pos, neg]",
            "model.dropout=0", "train.epochs=1", "train.micro_batch_size=4", "train.global_batch_size=8",
            "train.lr=1e-3",
            "train.peak_tflops=1.0", f"run.storage_path={tmp_path / 'runs'}", f"run.name={name}", *layout,
        ], stage="finetune")
        finetune(cfg)
        return read_metrics(tmp_path / "runs" / name)

    one, tp2 = classify("one", "parallel.workers=1"), classify("tp2", "parallel.workers=2", "parallel.tp=2")
    assert len(one) == len(tp2) == 5  # 40 examples, 8 a step
    for a, b in zip(one, tp2):
        assert abs(a["loss"] - b["loss"]) <= 1e-4 and abs(a["grad_norm"] - b["grad_norm"]) <= 1e-3 * a["grad_norm"]
    # The same predictions, but for an example whose two logits tie to the losses' 1e-4: at most one flips.
    dev_rows = len((word_files / "dev.tsv").read_text().splitlines()) - 1
    assert abs(tp2[-1]["dev"]["accuracy"] - one[-1]["dev"]["accuracy"]) <= 1 / dev_rows + 1e-9

    pairs = [(f"colour of {thing}:", f" {colour}") for thing, colour in
             [("sky", "blue"), ("grass", "green"), ("snow", "white"), ("coal", "black")]]
    for split, repeats in (("sft", 4), ("sft_dev", 1)):
        with (tmp_path / f"{split}.jsonl").open("w") as fh:
            for _ in range(repeats):
                for prompt, completion in pairs:
                    fh.write(json.dumps({"prompt": prompt, "completion": completion}) + "\n")
    cfg = load_config(overrides=[
        f"init.checkpoint={tiny_checkpoint}", f"data.train={tmp_path / 'sft.jsonl'}", f"data.dev={tmp_path / 'sft_dev.jsonl'}",
        "task.kind=sft", "task.metric=loss", "model.dropout=0", "train.epochs=3", "train.lr=3e-3",
        "train.micro_batch_size=4", "train.global_batch_size=8", "train.peak_tflops=1.0", "parallel.workers=2", "parallel.tp=2",
        f"run.storage_path={tmp_path / 'runs'}", "run.name=sft-tp2",
    ], stage="finetune")
    result = finetune(cfg)
    history = [d["loss"] for d in result["dev_history"]]
    assert len(history) == 3 and history[-1] < history[0]
    assert "exact_match" in result["dev"]  # greedy decoding through the split model ran


def test_token_dropout_drops_text_tokens_but_never_the_closing_eos_or_every_token():
    from mtnlg_ray.model.classifier import drop_tokens

    rng = np.random.default_rng(0)
    row = list(range(100, 140)) + [0]  # 40 text tokens, then EOS
    assert drop_tokens(row, 0.0, rng) == row
    noisy = [drop_tokens(row, 0.25, rng) for _ in range(200)]
    assert all(r[-1] == 0 and set(r[:-1]) <= set(row[:-1]) and r[:-1] == sorted(r[:-1]) for r in noisy)
    kept = np.mean([len(r) - 1 for r in noisy])
    assert 27 < kept < 33  # 30 of 40 expected
    assert all(len(drop_tokens([7, 0], 0.99, rng)) == 2 for _ in range(50))  # a one-token text keeps its token
    assert drop_tokens([0], 0.5, rng) == [0]  # an empty text is just EOS


def test_token_dropout_noise_comes_from_seed_step_and_example_alone(tiny_checkpoint, tmp_path):
    """Whatever the layout or micro-batch an example lands in, it loses the same tokens at a step."""
    from mtnlg_ray.checkpoint import read_checkpoint_config
    from mtnlg_ray.config import load_config
    from mtnlg_ray.finetune.tasks import ClassificationTask
    from mtnlg_ray.model.gpt import GPTConfig

    write_word_task(tmp_path / "train.tsv", 64, seed=0)
    model_config = GPTConfig.from_dict(read_checkpoint_config(tiny_checkpoint)["model"])

    def task(rate: float) -> ClassificationTask:
        cfg = load_config(overrides=[f"data.train={tmp_path / 'train.tsv'}", "data.text_field=sentence",
                                     "task.labels=[neg, pos]", f"task.token_dropout={rate}"], stage="finetune")
        return ClassificationTask(cfg, tiny_checkpoint / "tokenizer.json", model_config)

    noisy, plain = task(0.3), task(0.0)
    everyone = np.arange(64)
    plain.begin_step(5)
    assert plain.noisy_rows(everyone) == [plain.train_rows[i] for i in everyone]
    noisy.begin_step(5)
    together = noisy.noisy_rows(everyone)
    assert together == [noisy.noisy_rows(np.array([i]))[0] for i in everyone[::-1]][::-1]
    assert sum(map(len, together)) < sum(map(len, noisy.train_rows))
    noisy.begin_step(6)
    assert noisy.noisy_rows(everyone) != together  # a new step, new noise
    noisy.begin_step(5)
    assert noisy.noisy_rows(everyone) == together  # a resumed step, the same noise
    # MFU counts the tokens a step reads: the dropped ones are no FLOPs (a student's 20 % read high)
    from mtnlg_ray.model.flops import sequence_flops

    assert noisy.flops(everyone) == sequence_flops(model_config, [len(r) for r in together], lm_head=False)
    assert noisy.flops(everyone) < plain.flops(everyone) == sequence_flops(
        model_config, [len(r) for r in plain.train_rows], lm_head=False)


def test_a_student_config_carries_its_noise_and_epochs():
    from mtnlg_ray.config import load_config
    from mtnlg_ray.finetune.selftrain import _student_config

    cfg = load_config(overrides=["selftrain.student_epochs=3", "run.name=st", "train.epochs=10"], stage="selftrain")
    student = _student_config(cfg, 2, Path("/pool/round2/train.jsonl"))
    assert student.task.token_dropout == 0.2 and student.train.epochs == 3
    assert student.data.train == "/pool/round2/train.jsonl" and student.run.name == "st/round2"
    assert cfg.task.token_dropout == 0.0  # the teacher reads clean text


def test_a_pool_partly_without_gold_labels_scores_the_pseudo_labels_on_the_rows_that_have_one(tmp_path):
    """A pool that adds unlabelled text to a labelled set (the SST-2 phrases plus IMDb sentences): the
    report's pseudo-label accuracy counts only kept rows with a gold label, and says how many it scored."""
    from mtnlg_ray.config import load_config
    from mtnlg_ray.finetune.selftrain import _write_pool, pseudo_label_accuracy

    cfg = load_config(overrides=["data.text_field=sentence"], stage="selftrain")
    pool = tmp_path / "pool.jsonl"
    rows = [{"sentence": "a fine film", "label": "pos"}, {"sentence": "no label here"},
            {"sentence": "dull", "label": "neg"}, {"sentence": "empty label", "label": ""},
            {"sentence": "a zero label", "label": "0"}, {"sentence": "a number", "label": 0}]
    pool.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    labels = ["pos", "neg", "0", "1"]
    size, gold = _write_pool(cfg, pool, tmp_path / "out.jsonl", labels)
    assert size == 6 and gold == ["pos", None, "neg", None, "0", "0"]  # a label 0 is a label, not a missing one
    texts = [json.loads(line)["text"] for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert texts == [r["sentence"] for r in rows]  # every row is labelled by the teacher, gold or not
    kept = [{"pool_index": 0, "label": "pos"}, {"pool_index": 1, "label": "neg"}, {"pool_index": 2, "label": "pos"}]
    assert pseudo_label_accuracy(kept, gold) == (0.5, 2)  # row 1 has no gold: not scored
    assert pseudo_label_accuracy(kept[1:2], gold) == (None, 0)
    # pandas writes a label column with gaps as floats: 1.0 is the task's label "1", not "1.0"
    pool.write_text(json.dumps({"sentence": "a", "label": 1.0}) + "\n" + json.dumps({"sentence": "b"}) + "\n",
                    encoding="utf-8")
    assert _write_pool(cfg, pool, tmp_path / "out.jsonl", labels) == (2, ["1", None])
    pool.write_text(json.dumps({"sentence": "unlabelled only"}) + "\n", encoding="utf-8")
    assert _write_pool(cfg, pool, tmp_path / "out.jsonl", labels) == (1, None)
    # pandas writes a label column with gaps to CSV / TSV as "1.0" text: still the task's "1"
    tsv = tmp_path / "pool.tsv"
    tsv.write_text("sentence\tlabel\ngood\t1.0\nnew text\t\nbad\t0.0\n", encoding="utf-8")
    assert _write_pool(cfg, tsv, tmp_path / "out.jsonl", ["0", "1"]) == (3, ["1", None, "0"])
    # a label outside the task's is refused, as in data.train: it used to be scored as a wrong pseudo-label
    pool.write_text(json.dumps({"sentence": "a", "label": "pos"}) + "\n" + json.dumps({"sentence": "b", "label": "meh"})
                    + "\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"pool.jsonl:2: label 'meh' is not one of the task's labels \['pos', 'neg'\]"):
        _write_pool(cfg, pool, tmp_path / "out.jsonl", ["pos", "neg"])
    assert pseudo_label_accuracy(kept[:1], None) == (None, 0)


# ---------------------------------------------------------------- the bag-of-n-grams teacher


def test_ngram_classifier_learns_and_reloads_to_the_same_probabilities(tmp_path):
    from mtnlg_ray.errors import CheckpointError, ConfigError
    from mtnlg_ray.finetune.data import read_classification
    from mtnlg_ray.finetune.ngram import NgramClassifier, fit_ngram_classifier

    write_word_task(tmp_path / "train.tsv", 96, seed=0)
    write_word_task(tmp_path / "dev.tsv", 64, seed=1)
    train = read_classification(tmp_path / "train.tsv", "sentence", "label")
    dev = read_classification(tmp_path / "dev.tsv", "sentence", "label")
    model = fit_ngram_classifier(train.texts, train.labels, ["neg", "pos"], seed=0)
    predicted, confidence = model.predict(dev.texts)
    assert predicted == dev.labels  # separable by words: every dev sentence right
    assert (confidence > 0.5).all() and (confidence <= 1.0).all()
    # Another seed shuffles differently: the fit depends on it, but learns as well.
    other = fit_ngram_classifier(train.texts, train.labels, ["neg", "pos"], seed=1)
    assert not np.array_equal(other.weight, model.weight)
    assert other.predict(dev.texts)[0] == dev.labels

    model.save(tmp_path / "ngram")
    loaded = NgramClassifier.load(tmp_path / "ngram")
    assert loaded.labels == ["neg", "pos"]
    np.testing.assert_allclose(loaded.predict_proba(dev.texts), model.predict_proba(dev.texts), rtol=0, atol=1e-6)
    (tmp_path / "ngram" / "weights.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="weights.safetensors: unreadable"):
        NgramClassifier.load(tmp_path / "ngram")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not an n-gram classifier"):
        model.save(tmp_path / "notes")
    assert (tmp_path / "notes" / "keep.txt").read_text() == "mine"


def test_a_given_teacher_may_be_an_ngram_classifier_or_a_mixture(tmp_path):
    """`selftrain.teacher` is any classifier the labeller reads: an earlier run's round0/ngram or a
    roundN/teacher mixture was refused for lacking config.json, though labelling and evaluate read it."""
    from mtnlg_ray.config import load_config
    from mtnlg_ray.data.label import write_classifier_mix
    from mtnlg_ray.errors import ConfigError
    from mtnlg_ray.finetune.data import read_classification
    from mtnlg_ray.finetune.ngram import fit_ngram_classifier
    from mtnlg_ray.finetune.selftrain import _check_teacher

    write_word_task(tmp_path / "train.tsv", 40, seed=0)
    train = read_classification(tmp_path / "train.tsv", "sentence", "label")
    ngram = fit_ngram_classifier(train.texts, train.labels, ["neg", "pos"]).save(tmp_path / "ngram")
    mix = write_classifier_mix([ngram], ["neg", "pos"], tmp_path / "mix")
    for teacher in (ngram, mix):
        cfg = load_config(overrides=[f"selftrain.teacher={teacher}"], stage="selftrain")
        _check_teacher(cfg, ["neg", "pos"])
        with pytest.raises(ConfigError, match=r"classifies \['neg', 'pos'\], the task has \['0', '1'\]"):
            _check_teacher(cfg, ["0", "1"])  # another task's labels are still refused


@pytest.fixture(scope="module")
def ngram_self_trained(tmp_path_factory, tokenizer_dir):
    """`mtnlg-ray self-train` with `selftrain.ngram_teacher`: round 0 is the n-gram classifier, not a GPT."""
    return run_self_training(tmp_path_factory.mktemp("selftrain_ngram"), tokenizer_dir, "ngram",
                             "selftrain.ngram_teacher=true", "selftrain.per_class_top_k=60", "train.epochs=2")


def test_an_ngram_teacher_labels_the_pool_and_a_gpt_student_learns_from_it(ngram_self_trained):
    from mtnlg_ray.finetune.ngram import NgramClassifier

    work, result = ngram_self_trained
    root = work / "runs" / "ngram"
    report = json.loads((root / "self_train_report.json").read_text())
    teacher, student = report["rounds"]
    assert teacher["checkpoint"] == str(root / "round0" / "ngram")
    assert teacher["dev_accuracy"] == 1.0  # words decide the label: a bag of n-grams gets all of dev
    model = NgramClassifier.load(root / "round0" / "ngram")
    assert model.metrics["dev"]["accuracy"] == 1.0 and model.metrics["train"] == 96
    assert not (root / "round0" / "final").exists()  # no GPT teacher was fine-tuned
    # The labeller ran the n-gram model over the pool: 60 per class, all matching the hidden labels.
    assert student["kept_per_class"] == {"neg": 60, "pos": 60}
    assert student["pseudo_label_accuracy"] == 1.0
    assert student["train_examples"] == 96 + 120
    assert student["dev_accuracy"] >= 0.9
    assert report["final"] == str(root / "round1" / "final")


def test_evaluate_scores_an_ngram_teacher_as_self_training_did(ngram_self_trained):
    """`mtnlg-ray evaluate --task classification` reads the n-gram folder as it reads a fine-tuned GPT."""
    work, _ = ngram_self_trained
    teacher = work / "runs" / "ngram" / "round0" / "ngram"
    swapped = work / "dev_swapped.tsv"  # every gold label flipped: the same predictions now score 0
    lines = (work / "dev.tsv").read_text().splitlines()
    flip = {"neg": "pos", "pos": "neg"}
    rows = (line.rsplit("\t", 1) for line in lines[1:])  # sentence, label
    swapped.write_text("\n".join([lines[0], *(f"{text}\t{flip[label]}" for text, label in rows)]) + "\n")
    scores = {}
    for name, data, task in (("dev", work / "dev.tsv", ["--task", "classification"]), ("swapped", swapped, [])):
        result = run_cli("evaluate", "--checkpoint", str(teacher), "--data", str(data), *task,  # none: it is a classifier
                         "--text-field", "sentence", "--json")
        assert result.returncode == 0, result.stderr[-2000:]
        scores[name] = json.loads(result.stdout)
    assert scores["dev"]["labels"] == ["neg", "pos"] and scores["dev"]["n"] == 64
    report = json.loads((work / "runs" / "ngram" / "self_train_report.json").read_text())
    assert scores["dev"]["accuracy"] == report["rounds"][0]["dev_accuracy"] == 1.0
    assert scores["swapped"]["accuracy"] == 0.0


@pytest.mark.slow  # about 60 s of the CI budget: a second two-round self-training run
def test_a_given_teacher_beside_the_ngram_teacher_labels_by_their_mean_and_the_ngram_stays_every_round(
        ngram_self_trained, tokenizer_dir):
    """Both `selftrain.teacher` and `selftrain.ngram_teacher`: round 0 is a mixture folder whose
    probabilities are the mean of the n-gram classifier's and the given GPT's; self-training labels
    the pool with it, and `evaluate` reads it as it reads any classifier. With
    `selftrain.ngram_every_round`, round 2 labels the pool with the mean of the n-gram classifier's and
    the round-1 student's probabilities (`round2/teacher`), not with the student alone, and the run's
    final checkpoint is still the last student. (One run checks both: each costs a self-training run.)"""

    from mtnlg_ray.data.label import ClassifierLabeler, read_classifier_mix, write_classifier_mix
    from mtnlg_ray.errors import CheckpointError
    from mtnlg_ray.finetune.data import read_classification
    from mtnlg_ray.finetune.selftrain import _pseudo_labels

    base, _ = ngram_self_trained
    gpt = base / "runs" / "ngram" / "round1" / "final"  # the earlier run's GPT student, as a given teacher
    (base / "mixed").mkdir(exist_ok=True)
    work, result = run_self_training(base / "mixed", tokenizer_dir, "mixed", f"selftrain.teacher={gpt}",
                                     "selftrain.ngram_teacher=true", "selftrain.ngram_every_round=true",
                                     "selftrain.rounds=2", "selftrain.per_class_top_k=60", "train.epochs=1")
    root = work / "runs" / "mixed"
    report = json.loads((root / "self_train_report.json").read_text())
    teacher, first, second = report["rounds"]
    assert teacher["checkpoint"] == str(root / "round0" / "mix")
    assert first["kept_per_class"] == {"neg": 60, "pos": 60} and first["pseudo_label_accuracy"] == 1.0

    # Round 0: the mean of the n-gram classifier and the given GPT.
    dev = read_classification(work / "dev.tsv", "sentence", "label")
    mixed, ngram, given = (ClassifierLabeler(path, device="cpu")
                           for path in (root / "round0" / "mix", root / "round0" / "ngram", gpt))
    p_ngram, p_given = ngram.probabilities(dev.texts), given.probabilities(dev.texts)
    assert np.abs(p_ngram - p_given).max() > 1e-3  # two different classifiers, so the mean is not either
    np.testing.assert_allclose(mixed.probabilities(dev.texts), (p_ngram + p_given) / 2, rtol=0, atol=1e-12)
    labels, confidence = mixed.predict(dev.texts)
    np.testing.assert_allclose(confidence, ((p_ngram + p_given) / 2).max(axis=1), rtol=0, atol=1e-12)
    scored = run_cli("evaluate", "--checkpoint", str(root / "round0" / "mix"), "--data", str(work / "dev.tsv"),
                     "--task", "classification", "--text-field", "sentence", "--json")
    assert scored.returncode == 0, scored.stderr[-2000:]
    expected = sum(x == y for x, y in zip(labels, dev.labels)) / len(dev.labels)
    assert json.loads(scored.stdout)["accuracy"] == teacher["dev_accuracy"] == expected

    # Round 2: the n-gram classifier beside round 1's student (the given GPT is not kept).
    assert first["next_teacher"] == str(root / "round2" / "teacher") and "next_teacher" not in second
    members, mix_labels = read_classifier_mix(root / "round2" / "teacher")
    assert members == [(root / "round0" / "ngram").resolve(), (root / "round1" / "final").resolve()]
    assert mix_labels == report["labels"]
    assert report["final"] == str(root / "round2" / "final")
    assert "round 2: teacher = the n-gram classifier + the last student" in result.stderr  # progress
    # Round 2's pseudo-labels carry the mixture's confidences, which the student alone does not give.
    rows = _pseudo_labels(root / "round2" / "pseudo" / "docs")
    texts = [r["text"] for r in rows]
    second_teacher, student = (ClassifierLabeler(path, device="cpu")
                               for path in (root / "round2" / "teacher", root / "round1" / "final"))
    _, mixed_confidence = second_teacher.predict(texts)
    _, student_confidence = student.predict(texts)
    np.testing.assert_allclose([r["confidence"] for r in rows], mixed_confidence, rtol=0, atol=1e-5)
    assert np.abs(np.asarray(student_confidence) - np.asarray(mixed_confidence)).max() > 1e-2
    scored = run_cli("evaluate", "--checkpoint", str(root / "round2" / "teacher"), "--data", str(work / "dev.tsv"),
                     "--task", "classification", "--text-field", "sentence", "--json")
    assert scored.returncode == 0, scored.stderr[-2000:]
    assert json.loads(scored.stdout)["accuracy"] == first["next_teacher_dev_accuracy"]

    write_classifier_mix([root / "round0" / "ngram"], ["pos", "neg"], work / "reordered")
    with pytest.raises(CheckpointError, match="classifies"):
        ClassifierLabeler(work / "reordered", device="cpu")


def test_ngram_every_round_without_the_ngram_teacher_is_one_line_error(tmp_path):
    result = run_cli("self-train", "--set", f"data.train={tmp_path / 'missing.tsv'}",
                     "--set", f"selftrain.unlabelled={tmp_path / 'pool.tsv'}",
                     "--set", "selftrain.ngram_every_round=true")
    assert_one_line_error(result, "selftrain.ngram_every_round")


def test_a_resumed_fine_tune_keeps_the_warm_up_and_decay_its_checkpoint_recorded(tmp_path):
    import torch.distributed.checkpoint as dcp

    from mtnlg_ray.config import load_config
    from mtnlg_ray.finetune.trainer import _default_schedule
    from mtnlg_ray.train.checkpoint import STATE_FILE, TrainerState

    cfg = load_config(overrides=[f"run.storage_path={tmp_path}", "run.name=ft", "train.epochs=3"], stage="finetune")
    fresh = _default_schedule(cfg, epoch_tokens=10_000, examples_hint=500).train
    assert (fresh.warmup_tokens, fresh.decay_tokens) == (1500, 30_000)
    checkpoint = tmp_path / "ft" / "checkpoint_9"
    checkpoint.mkdir(parents=True)
    dcp.save({"model": {"w": torch.zeros(2)}}, checkpoint_id=str(checkpoint))
    (checkpoint / "rng-rank0.json").write_text("{}")
    (checkpoint / STATE_FILE).write_text(json.dumps(TrainerState(step=9, warmup_tokens=700, decay_tokens=14_000).__dict__))
    resumed = _default_schedule(cfg, epoch_tokens=10_000, examples_hint=500).train
    assert (resumed.warmup_tokens, resumed.decay_tokens) == (700, 14_000)
    chosen = load_config(overrides=[f"run.storage_path={tmp_path}", "run.name=ft", "train.decay_tokens=99"],
                         stage="finetune")
    assert _default_schedule(chosen, epoch_tokens=10_000, examples_hint=500).train.decay_tokens == 99


def test_a_rerun_on_other_training_data_is_refused_not_resumed(ray_session, tiny_checkpoint, word_files, tmp_path):
    """A self-training student re-run after its pseudo-labels changed (another threshold, another teacher)
    used to continue from the old student's checkpoint, or stay finished, on data it never saw."""
    from mtnlg_ray.config import load_config
    from mtnlg_ray.errors import ConfigError
    from mtnlg_ray.finetune.trainer import finetune

    train = tmp_path / "student.tsv"
    shutil.copy(word_files / "train.tsv", train)
    cfg = load_config(overrides=[
        f"init.checkpoint={tiny_checkpoint}", f"data.train={train}", "data.text_field=sentence", "train.epochs=1",
        "train.micro_batch_size=8", "train.global_batch_size=8", "train.peak_tflops=1.0",
        f"run.storage_path={tmp_path / 'runs'}", "run.name=student"], stage="finetune")
    first = finetune(cfg)
    assert finetune(cfg)["final"] == first["final"]  # the same data: it resumes, finished
    # Another task.mode or pooling under the same run.name: refused on the driver. LoRA died on a worker
    # (no adapters in the checkpoint); frozen and last pooling resumed finished, with the old run's score.
    # Reordered labels resumed the head with its classes swapped: only their count was checked.
    for setting, was in (("task.mode=lora", "task.mode full"), ("task.mode=frozen", "task.mode full"),
                         ("task.pooling=last", "task.pooling mean"),
                         ("task.labels=[pos, neg]", "task.labels [neg, pos]")):
        changed = load_config(overrides=[
            f"init.checkpoint={tiny_checkpoint}", f"data.train={train}", "data.text_field=sentence", "train.epochs=1",
            "train.micro_batch_size=8", "train.global_batch_size=8", f"run.storage_path={tmp_path / 'runs'}",
            "run.name=student", setting], stage="finetune")
        key, _, value = setting.partition("=")
        with pytest.raises(ConfigError, match=rf"runs/student: the run resumes from checkpoint_\S+, trained with "
                                              rf"{re.escape(was)}, but this run's {re.escape(key)} is {re.escape(value)}; "
                                              r"start a new run under another run.name"):
            finetune(changed)
    # The start checkpoint trained again (here: its weights moved a little) is refused, not resumed finished.
    from safetensors.torch import load_file, save_file

    retrained = tmp_path / "retrained"
    shutil.copytree(tiny_checkpoint, retrained)
    weights = load_file(retrained / "model.safetensors")
    save_file({name: tensor + 0.01 for name, tensor in weights.items()}, retrained / "model.safetensors")
    with pytest.raises(ConfigError, match=r"runs/student: the run resumes from checkpoint_\S+, fine-tuned from other "
                                          r"weights than init.checkpoint holds now"):
        finetune(cfg.model_copy(update={"init": cfg.init.model_copy(update={"checkpoint": str(retrained)})}))
    lines = train.read_text().splitlines()
    train.write_text("\n".join([lines[0], *reversed(lines[1:])]) + "\n")
    with pytest.raises(ConfigError, match=r"runs/student: the run resumes from checkpoint_.*, trained on another "
                                          r"data.train than .*student.tsv holds now"):
        finetune(cfg)
    # Self-training writes each student's training file itself: when it changed, it drops the old
    # student's checkpoints and the student trains afresh.
    from mtnlg_ray.finetune.selftrain import _forget_stale_student

    run_dir = Path(first["run_dir"])
    assert _forget_stale_student(run_dir, train) and not list(run_dir.glob("checkpoint_*"))
    again = finetune(cfg)
    starts = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["resumed_from"] for r in starts if r.get("event") == "start"] == [None]  # a fresh run
    assert not _forget_stale_student(run_dir, train) and again["final"] == first["final"]


def test_a_resumed_run_replaying_best_s_evaluation_starts_patience_again_there(
        ray_session, tiny_checkpoint, word_files, tmp_path):
    """best/ is saved at each better dev score, checkpoints only every checkpoint.every_steps: a run resumed
    from an older checkpoint meets best/'s evaluation again. Counted stale, patience could end the run on
    that very epoch. Here a failure after step 10 is simulated: the checkpoints of steps 10 and 15 are
    gone and best/ says it was saved at step 10; an LR too small to change a prediction keeps every
    score equal."""
    from mtnlg_ray.config import load_config
    from mtnlg_ray.finetune.trainer import finetune
    from mtnlg_ray.train.plot import read_metrics

    cfg = load_config(overrides=[
        f"init.checkpoint={tiny_checkpoint}", f"data.train={word_files / 'train.tsv'}",
        f"data.dev={word_files / 'dev.tsv'}", "data.text_field=sentence", "train.micro_batch_size=8",
        "train.global_batch_size=8", "train.peak_tflops=1.0", f"run.storage_path={tmp_path / 'runs'}",
        "run.name=replay", "train.epochs=4", "train.patience=2", "train.lr=1e-12", "checkpoint.every_steps=5",
        "checkpoint.keep=10"], stage="finetune")
    run_dir = Path(finetune(cfg)["run_dir"])
    first = [r for r in read_metrics(run_dir) if "dev" in r]  # one record a step
    assert [r["step"] for r in first] == [5, 10, 15]  # best at 5, stale at 10 and 15: patience 2 stops it
    states = {json.loads(f.read_text())["step"]: f.parent for f in run_dir.glob("checkpoint_*/trainer_state.json")}
    for step in (10, 15):
        shutil.rmtree(states[step])
    (run_dir / "checkpoint_manager_snapshot.json").unlink()  # Ray's record of them, which they outlived
    body = json.loads((run_dir / "best" / "config.json").read_text())
    body["trained"]["step"] = 10
    (run_dir / "best" / "config.json").write_text(json.dumps(body))
    finetune(cfg)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    starts = [i for i, r in enumerate(records) if r.get("event") == "start"]
    assert len(starts) == 2 and records[starts[1]]["resumed_from"]["step"] == 5
    resumed = [r for r in records[starts[1]:] if "dev" in r]
    assert [r["step"] for r in resumed] == [10, 15, 20]


def test_epochs_bound_a_run_that_max_tokens_also_bounds_and_an_early_stop_survives_a_restart(
        ray_session, tiny_checkpoint, word_files, tmp_path):
    from mtnlg_ray.config import load_config
    from mtnlg_ray.finetune.trainer import finetune
    from mtnlg_ray.train.loop import _recorded_best
    from mtnlg_ray.train.plot import read_metrics

    def run(name: str, *extra: str) -> list[dict]:
        cfg = load_config(overrides=[
            f"init.checkpoint={tiny_checkpoint}", f"data.train={word_files / 'train.tsv'}",
            f"data.dev={word_files / 'dev.tsv'}", "data.text_field=sentence", "train.micro_batch_size=8",
            "train.global_batch_size=8", "train.peak_tflops=1.0", f"run.storage_path={tmp_path / 'runs'}",
            f"run.name={name}", *extra], stage="finetune")
        finetune(cfg)
        return [r for r in read_metrics(tmp_path / "runs" / name) if "loss" in r]

    # Whichever bound comes first: one epoch (40 examples, 8 a step), however many tokens are allowed.
    bounded = run("bounded", "train.epochs=1", "train.max_tokens=1000000000")
    assert [r["step"] for r in bounded] == [1, 2, 3, 4, 5]
    # MFU counts each example's model FLOPs at its own length, with no vocabulary logits: the epoch's
    # FLOPs, read back from its steps' MFU at the configured 1 TFLOP/s peak, are the 40 sentences'
    # 6·N'·L + 12·l·h·L² (L: its tokens and EOS; N': the matmul parameters less the tied output layer).
    # Against the context's length and the LM head, a 12-token sentence read about 20x too much.
    from mtnlg_ray.checkpoint import read_checkpoint_config
    from mtnlg_ray.finetune.data import read_classification
    from mtnlg_ray.model.flops import matmul_parameters
    from mtnlg_ray.model.gpt import GPTConfig
    from mtnlg_ray.tokenizer import load_tokenizer

    mc = GPTConfig.from_dict(read_checkpoint_config(tiny_checkpoint)["model"])
    texts = read_classification(word_files / "train.tsv", "sentence", "label").texts
    lengths = [len(e.ids) + 1 for e in load_tokenizer(tiny_checkpoint).encode_batch(texts, add_special_tokens=False)]
    n = matmul_parameters(mc) - mc.vocab_size * mc.d_model
    expected = sum(6 * n * L + 12 * mc.n_layer * mc.d_model * L * L for L in lengths)
    measured = sum(r["mfu"] * r["step_time"] * 1e12 * r["world_size"] for r in bounded)
    assert measured == pytest.approx(expected, rel=1e-6)

    # An LR too small to change a prediction: epoch 2 is no better than epoch 1, and patience 1 stops there.
    frozen = ("train.epochs=10", "train.patience=1", "train.lr=1e-12", "checkpoint.every_steps=1000")
    first = run("stopped", *frozen)
    assert first[-1]["step"] == 10 and sum(1 for r in first if "dev" in r) == 2
    # Started again with the same run.name, it resumes stopped: no third epoch (metrics.jsonl holds both runs).
    assert max(r["step"] for r in run("stopped", *frozen)) == 10
    # best/ records the score it was saved with; a resumed run compares against that, not a stale checkpoint's
    best = _recorded_best(tmp_path / "runs" / "stopped" / "best", "accuracy")
    saved = next(r for r in first if r.get("best"))
    assert best == (saved["dev"]["accuracy"], saved["step"])


def test_evaluating_records_without_the_text_field_names_text_field(tiny_checkpoint, tmp_path):
    # An SFT dev file given to `evaluate`: it said only "no text to evaluate on".
    from mtnlg_ray.finetune.evaluate import evaluate

    pairs = tmp_path / "sft_dev.jsonl"
    pairs.write_text('{"prompt": "a", "completion": "b"}\n' * 3)
    with pytest.raises(InputError, match=re.escape(
            f"{pairs}: no text to evaluate on (3 missing_field skipped); --text-field names the field that holds "
            "the text, if not 'text'")):
        evaluate(tiny_checkpoint, [str(pairs)])


def test_an_unknown_split_is_blamed_on_split_not_on_the_dataset(tmp_path):
    # It said "tokens/index.json: not a token index of `data prepare` (KeyError: 'test'); prepare the dataset again".
    from mtnlg_ray.finetune.evaluate import evaluate

    with pytest.raises(InputError, match=r"^--split: expected train or val, got 'test'$"):
        evaluate(tmp_path / "ckpt", [str(tmp_path / "data")], "lm", split="test")


def test_a_round_that_keeps_no_pseudo_label_says_so(capsys):
    # selftrain.threshold=0.9 kept {'0': 0, '1': 0}, and students retrained on the labelled rows without a word
    from mtnlg_ray.finetune.selftrain import select_pseudo_labels, warn_if_nothing_kept

    rows = [{"pool_index": i, "label": "1", "confidence": 0.6 + i / 100} for i in range(5)]
    kept = select_pseudo_labels(rows, ["0", "1"], 0.9, 6000)
    warn_if_nothing_kept(1, kept, len(rows), 0.9)
    assert capsys.readouterr().err == ("warning: round 1: the teacher is at least 0.9 sure of none of the 5 pool rows, "
                                       "so the student learns from the labelled rows alone; lower selftrain.threshold\n")
    warn_if_nothing_kept(1, select_pseudo_labels(rows, ["0", "1"], 0.6, 6000), len(rows), 0.6)
    assert capsys.readouterr().err == ""
