"""`mtnlg-ray self-train`: the pseudo-label loop. A teacher labels an unlabelled pool, a student learns from both.

Round 0 fine-tunes a teacher on the labelled set. Each later round runs the teacher over the pool
with the corpus pipeline's `classifier` labeller on the Ray Data actor pool; predictions with
confidence >= `selftrain.threshold` (optionally only the `per_class_top_k` most confident per class,
optionally as soft labels) join the labelled set, and a student is fine-tuned on both from the same
start checkpoint as the teacher, with input noise (`student_token_dropout`) so that it learns more
than a copy of the teacher. The student becomes the next round's teacher (with
`ngram_every_round`, mixed with round 0's n-gram classifier: `roundN/teacher`). Everything each
round did goes to `self_train_report.json` and `self_train.png` in the run directory.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Callable

from mtnlg_ray.config import Config
from mtnlg_ray.errors import ConfigError, InputError
from mtnlg_ray.publish import publish_file


def _run_config(cfg: Config, name: str, train: str) -> Config:
    return cfg.model_copy(update={
        "run": cfg.run.model_copy(update={"name": name}),
        "data": cfg.data.model_copy(update={"train": train}),
    })


def _write_pool(cfg: Config, unlabelled: Path, out: Path, labels: list[str]) -> tuple[int, list[str | None] | None]:
    """The pool as JSONL for the labelling pipeline; returns its size and, when some rows have one, each
    row's gold label (None for a row without it, as in a pool that adds unlabelled text to a labelled set).

    Gold labels never reach training: they only score the pseudo-labels in the report. One outside
    `labels` is refused, as in data.train and data.dev: it used to count as a wrong pseudo-label.
    """
    from mtnlg_ray.finetune.data import label_text, read_table

    gold: list[str | None] = []
    with out.open("w", encoding="utf-8") as fh:
        for where, row in read_table(unlabelled, [cfg.data.text_field], optional=[cfg.data.label_field]):
            text = row[cfg.data.text_field]
            if not isinstance(text, str):
                raise InputError(f"{where}: field {cfg.data.text_field!r} must be text")
            fh.write(json.dumps({"text": text}) + "\n")
            label = row.get(cfg.data.label_field)
            label = None if label is None or not str(label).strip() else label_text(label)
            if label is not None and label not in labels:  # "1.0": pandas' float column of a pool with gaps, as text
                with contextlib.suppress(ValueError):
                    number = label_text(float(label))
                    label = number if number in labels else label
            if label is not None and label not in labels:
                raise InputError(f"{where}: label {label!r} is not one of the task's labels {labels} (selftrain."
                                 f"unlabelled: a pool's labels only score its pseudo-labels; fix them or drop the "
                                 f"{cfg.data.label_field!r} field)")
            gold.append(label)
    if not gold:
        raise InputError(f"{unlabelled}: the unlabelled pool is empty")
    return len(gold), gold if any(label is not None for label in gold) else None


def pseudo_label_accuracy(pseudo: list[dict], gold: list[str | None] | None) -> tuple[float | None, int]:
    """How many of the kept pseudo-labels agree with the pool's gold labels, over the kept rows that have
    one; (accuracy or None, how many kept rows were scored)."""
    if gold is None:
        return None, 0
    scored = [r for r in pseudo if gold[r["pool_index"]] is not None]
    if not scored:
        return None, 0
    return sum(gold[r["pool_index"]] == r["label"] for r in scored) / len(scored), len(scored)


def _pseudo_labels(docs_dir: Path) -> list[dict]:
    """Rows of the labelled pool: text, pool_index, label (null when under the threshold), confidence.

    The pool file holds one record per line, so a document's location (`pool.jsonl:N`) gives its index.
    """
    import pyarrow.parquet as pq

    rows = []
    for file in sorted(docs_dir.glob("*.parquet")):
        for row in pq.read_table(file, columns=["text", "location", "label", "confidence"]).to_pylist():
            row["pool_index"] = int(row.pop("location").rsplit(":", 1)[1]) - 1
            rows.append(row)
    return rows


def warn_if_nothing_kept(number: int, pseudo: list[dict], pool: int, threshold: float) -> None:
    """One line on stderr when no pool row passed the threshold: the student then trains on the
    labelled rows alone, which the report showed only as zeros in its table."""
    if not pseudo:
        print(f"warning: round {number}: the teacher is at least {threshold:g} sure of none of the {pool:,} pool "
              "rows, so the student learns from the labelled rows alone; lower selftrain.threshold",
              file=sys.stderr, flush=True)


def select_pseudo_labels(rows: list[dict], labels: list[str], threshold: float,
                         per_class_top_k: int | None) -> list[dict]:
    """Confident predictions, or the `per_class_top_k` most confident of each class among them."""
    confident = [r for r in rows if r.get("label") is not None and r["confidence"] >= threshold]
    if per_class_top_k is None:
        return sorted(confident, key=lambda r: r["pool_index"])
    kept = []
    for label in labels:
        mine = sorted((r for r in confident if r["label"] == label), key=lambda r: -r["confidence"])
        kept.extend(mine[:per_class_top_k])
    return sorted(kept, key=lambda r: r["pool_index"])


def soft_target(label: str, confidence: float, labels: list[str]) -> list[float]:
    """The teacher's confidence on its label, the rest spread evenly over the other labels."""
    rest = (1.0 - confidence) / max(len(labels) - 1, 1)
    return [confidence if x == label else rest for x in labels]


def _write_training_set(cfg: Config, labelled_rows, pseudo: list[dict], labels: list[str], out: Path) -> None:
    text_key, label_key = cfg.data.text_field, cfg.data.label_field
    with out.open("w", encoding="utf-8") as fh:
        for row in labelled_rows:  # soft labels of the labelled file stay with their rows
            record = {text_key: row.text, label_key: row.label}
            if row.probs is not None:
                record["probs"] = row.probs
            fh.write(json.dumps(record) + "\n")
        for row in pseudo:
            record = {text_key: row["text"], label_key: row["label"]}
            if cfg.selftrain.soft_labels:
                record["probs"] = soft_target(row["label"], row["confidence"], labels)
            fh.write(json.dumps(record) + "\n")


def self_train(cfg: Config, on_event: Callable[[dict], None] | None = None,
               on_record: Callable[[dict], None] | None = None) -> dict:
    """Run round 0 (teacher) and `selftrain.rounds` student rounds; returns the report."""
    from mtnlg_ray.data.label import write_classifier_mix
    from mtnlg_ray.data.pipeline import label_corpus
    from mtnlg_ray.finetune.data import read_classification
    from mtnlg_ray.finetune.trainer import finetune, prepare_finetune
    from mtnlg_ray.train.trainer import check_run_layout

    def emit(**event) -> None:
        if on_event is not None:
            on_event(event)

    if cfg.task.kind != "classification":
        raise ConfigError(f"task.kind: self-training labels a pool with a classifier; got {cfg.task.kind}")
    if not cfg.selftrain.unlabelled:
        raise ConfigError("selftrain.unlabelled: set it to the unlabelled pool (TSV / CSV / JSONL / Parquet)")
    if cfg.selftrain.ngram_every_round and not cfg.selftrain.ngram_teacher:
        raise ConfigError("selftrain.ngram_every_round keeps the n-gram classifier in every round's teacher: "
                          "set selftrain.ngram_teacher=true too")
    checked, model_config, _, _ = prepare_finetune(cfg)  # every file and the start checkpoint, before any training
    # the students' layout too: a parallel.pp=2 was refused at round 1's student, after the teacher had
    # labelled the whole pool
    check_run_layout(checked, model_config, checked.task.kind)
    cfg = checked.model_copy(update={"train": cfg.train})  # each round sizes its own default schedule
    unlabelled = Path(cfg.selftrain.unlabelled)  # absolute now, as every path field of `checked`
    labels = list(checked.task.labels)
    if cfg.selftrain.teacher:
        _check_teacher(cfg, labels)
    metric = cfg.task.dev_metric
    root = Path(cfg.run.storage_path) / cfg.run.name
    _check_resumed_rounds(root, checked)
    root.mkdir(parents=True, exist_ok=True)
    pool_size, gold = _write_pool(cfg, unlabelled, root / "pool.jsonl", labels)
    labelled = read_classification(checked.data.train, cfg.data.text_field, cfg.data.label_field)
    report = {"labels": labels, "metric": metric, "threshold": cfg.selftrain.threshold,
              "per_class_top_k": cfg.selftrain.per_class_top_k, "soft_labels": cfg.selftrain.soft_labels,
              "student_token_dropout": cfg.selftrain.student_token_dropout,
              "labelled": len(labelled.rows), "pool": pool_size, "rounds": []}

    started = time.perf_counter()
    emit(event="round", round=0, role="teacher", train=len(labelled.rows))
    ngram_dir = root / "round0" / "ngram"  # the n-gram teacher, when there is one
    if cfg.selftrain.teacher and cfg.selftrain.ngram_teacher:
        result = _mixed_teacher(cfg, labelled, labels, ngram_dir, root / "round0" / "mix")
    elif cfg.selftrain.teacher:
        result = _given_teacher(cfg, labels)
    elif cfg.selftrain.ngram_teacher:
        result = _ngram_teacher(cfg, labelled, labels, ngram_dir)
    else:
        result = finetune(_run_config(checked, f"{cfg.run.name}/round0", checked.data.train), on_record=on_record)
    report["rounds"].append(_round_entry(0, result, len(labelled.rows), 0, {}, None, started))
    emit(event="done", **report["rounds"][-1])
    final = teacher = result["final"]

    for number in range(1, cfg.selftrain.rounds + 1):
        started = time.perf_counter()
        out = root / f"round{number}"
        label_cfg = cfg.model_copy(update={
            # nodes the students' parallel.autoscaling awaits come for the labelling actors too
            "label": cfg.label.model_copy(update={"labeler": "classifier", "model": teacher,
                                                  "threshold": cfg.selftrain.threshold,
                                                  "autoscaling": cfg.label.autoscaling or cfg.parallel.autoscaling}),
            "data": cfg.data.model_copy(update={"text_field": "text"}),  # pool.jsonl's field
        })
        emit(event="label", round=number, teacher=teacher, pool=pool_size)
        label_corpus([str(root / "pool.jsonl")], out / "pseudo", label_cfg)
        rows = _pseudo_labels(out / "pseudo" / "docs")
        pseudo = select_pseudo_labels(rows, labels, cfg.selftrain.threshold, cfg.selftrain.per_class_top_k)
        kept = Counter(r["label"] for r in pseudo)
        warn_if_nothing_kept(number, pseudo, len(rows), cfg.selftrain.threshold)
        accuracy, scored = pseudo_label_accuracy(pseudo, gold)
        out.mkdir(parents=True, exist_ok=True)
        _write_training_set(cfg, labelled.rows, pseudo, labels, out / "train.jsonl")
        emit(event="round", round=number, role="student", train=len(labelled.rows) + len(pseudo),
             kept={x: kept.get(x, 0) for x in labels}, pseudo_accuracy=accuracy)
        if _forget_stale_student(out, out / "train.jsonl"):
            emit(event="restart", round=number)
        result = finetune(_student_config(cfg, number, out / "train.jsonl"), on_record=on_record)
        report["rounds"].append(_round_entry(number, result, len(labelled.rows) + len(pseudo), len(rows),
                                             {x: kept.get(x, 0) for x in labels}, accuracy, started, scored))
        emit(event="done", **report["rounds"][-1])
        final = teacher = result["final"]
        if cfg.selftrain.ngram_every_round and number < cfg.selftrain.rounds:
            teacher = str(write_classifier_mix([ngram_dir, final], labels, root / f"round{number + 1}" / "teacher"))
            dev = _dev_metrics(cfg, teacher)
            dev_accuracy = dev and dev.get("accuracy")
            report["rounds"][-1].update(next_teacher=teacher, next_teacher_dev_accuracy=dev_accuracy)
            emit(event="teacher", round=number + 1, teacher=teacher, dev_accuracy=dev_accuracy)

    report["final"] = final
    publish_file(root / "self_train_report.json", json.dumps(report, indent=2) + "\n")
    report["plot"] = str(plot_self_training(report, root / "self_train.png"))
    return report


def _check_resumed_rounds(root: Path, checked: Config) -> None:
    """A re-run with another task setting (pooling, mode, labels, LoRA) is refused before anything runs: each
    round's fine-tune refused it only when it came to train, after the pool had been labelled."""
    from mtnlg_ray.train.checkpoint import check_resume_task, latest_checkpoint, task_setup

    setup = task_setup(checked, "classification")  # every round's: the students change only their noise
    given = checked.selftrain.teacher or checked.selftrain.ngram_teacher  # then round 0 trains no GPT
    for number in range(1 if given else 0, checked.selftrain.rounds + 1):
        newest = latest_checkpoint(root / f"round{number}")
        if newest is not None:
            check_resume_task(newest, setup, run_root=root)


def _forget_stale_student(out: Path, train: Path) -> bool:
    """A re-run whose pseudo-labels changed (another threshold, teacher or pool) wrote a new
    train.jsonl: the student checkpoints of the earlier run trained on the old one, so they go and the
    student trains afresh (fine-tuning would refuse to resume them). Whether any went."""
    from mtnlg_ray.train.checkpoint import file_digest, latest_checkpoint, recorded_train_data
    from mtnlg_ray.train.trainer import RAY_SNAPSHOT

    newest = latest_checkpoint(out)
    if newest is None:
        return False
    recorded = recorded_train_data(newest)
    if recorded is None or recorded == file_digest(train):
        return False
    for stale in [*out.glob("checkpoint_*"), out / "best", out / "final"]:  # the student trains again
        shutil.rmtree(stale, ignore_errors=True)
    (out / RAY_SNAPSHOT).unlink(missing_ok=True)  # Ray Train's record of them
    return True


def _student_config(cfg: Config, number: int, train: Path) -> Config:
    """Round `number`'s student: from the start checkpoint, on labelled + pseudo-labelled data, with its noise."""
    student = _run_config(cfg, f"{cfg.run.name}/round{number}", str(train))
    update = {"token_dropout": cfg.selftrain.student_token_dropout}
    train_update = {} if cfg.selftrain.student_epochs is None else {"epochs": cfg.selftrain.student_epochs}
    return student.model_copy(update={"task": cfg.task.model_copy(update=update),
                                      "train": cfg.train.model_copy(update=train_update)})


def _check_teacher(cfg: Config, labels: list[str]) -> None:
    """`selftrain.teacher` must be a classifier of exactly the task's labels, in the same order."""
    from mtnlg_ray.data.label import ClassifierLabeler

    teacher = Path(cfg.selftrain.teacher)
    # Any classifier the labeller reads: a fine-tuned GPT, an n-gram classifier or a mixture folder (an
    # earlier run's round0/ngram or roundN/teacher); reading config.json alone refused the last two.
    found = ClassifierLabeler.check(teacher)
    if found != labels:
        raise ConfigError(f"selftrain.teacher: {teacher} classifies {found}, the task has {labels}")


def _given_teacher(cfg: Config, labels: list[str]) -> dict:
    """`selftrain.teacher` as round 0, scored on the dev set."""
    return {"final": str(cfg.selftrain.teacher), "dev": _dev_metrics(cfg, cfg.selftrain.teacher)}


def _ngram_teacher(cfg: Config, labelled, labels: list[str], out: Path) -> dict:
    """Round 0 as a bag-of-n-grams classifier fit on the labelled set, scored on the dev set as
    `mtnlg-ray evaluate --task classification` scores it (the metrics are also kept in ngram.json)."""
    from mtnlg_ray.finetune.data import read_classification
    from mtnlg_ray.finetune.evaluate import classifier_metrics
    from mtnlg_ray.finetune.ngram import fit_ngram_classifier

    model = fit_ngram_classifier(labelled.texts, labelled.labels, labels, seed=cfg.train.seed)
    dev = None
    if cfg.data.dev:
        rows = read_classification(cfg.data.dev, cfg.data.text_field, cfg.data.label_field)
        dev = model.metrics["dev"] = classifier_metrics(model, rows, out)
    model.save(out)
    return {"final": str(out), "dev": dev}


def _mixed_teacher(cfg: Config, labelled, labels: list[str], ngram_dir: Path, out: Path) -> dict:
    """Both `selftrain.teacher` and `selftrain.ngram_teacher`: round 0 fits the n-gram classifier and
    labels with the mean of its and the given teacher's probabilities (`out`, scored on dev)."""
    from mtnlg_ray.data.label import write_classifier_mix

    ngram = _ngram_teacher(cfg, labelled, labels, ngram_dir)
    mix = str(write_classifier_mix([ngram["final"], cfg.selftrain.teacher], labels, out))
    return {"final": mix, "dev": _dev_metrics(cfg, mix)}


def _dev_metrics(cfg: Config, classifier: str | Path) -> dict | None:
    """`classifier` scored on data.dev as `mtnlg-ray evaluate --task classification` scores it (None without dev)."""
    from mtnlg_ray.finetune.evaluate import evaluate_classification

    if not cfg.data.dev:
        return None
    return evaluate_classification(Path(classifier), Path(cfg.data.dev), cfg.data.text_field, cfg.data.label_field)


def _round_entry(number: int, result: dict, train_size: int, labelled_pool: int, kept: dict,
                 pseudo_accuracy: float | None, started: float, scored: int | None = None) -> dict:
    dev = result.get("dev") or {}
    return {
        "round": number, "role": "teacher" if number == 0 else "student", "train_examples": train_size,
        "pool_labelled": labelled_pool, "kept_per_class": kept, "pseudo_label_accuracy": pseudo_accuracy,
        "pseudo_labels_scored": scored,  # the kept rows whose pool row has a gold label
        "dev_accuracy": dev.get("accuracy"), "dev_macro_f1": dev.get("macro_f1"),
        "checkpoint": result["final"], "seconds": round(time.perf_counter() - started, 1),
    }


def plot_self_training(report: dict, output: Path) -> Path:
    """Dev metrics by round, and how many pseudo-labels of each class each round kept."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r["round"] for r in report["rounds"]]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for key, name in (("dev_accuracy", "accuracy"), ("dev_macro_f1", "macro F1")):
        values = [r[key] for r in report["rounds"]]
        if any(v is not None for v in values):
            left.plot(rounds, values, marker="o", label=f"dev {name}")
    left.set_xlabel("round (0 = teacher on labelled data only)")
    left.set_xticks(rounds)
    left.legend()
    left.set_title("dev metrics")
    width = 0.8 / max(len(report["labels"]), 1)
    for i, label in enumerate(report["labels"]):
        right.bar([r + i * width for r in rounds], [r["kept_per_class"].get(label, 0) for r in report["rounds"]],
                  width=width, label=label)
    right.set_xlabel("round")
    right.set_xticks(rounds)
    right.set_title(f"pseudo-labels kept (confidence >= {report['threshold']})")
    right.legend()
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=100)
    plt.close(fig)
    return output
