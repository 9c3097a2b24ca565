"""`mtnlg-ray quickstart`: the whole pipeline on the built-in corpus, on a local Ray, in one command.

Each step is the stage function its own command runs: a quality classifier (curated docs against a
word salad of the same words), `data prepare` with that classifier pseudo-labelling every document
on the actor pool, pretraining on 2 Ray Train workers, fine-tuning a classifier on a task built from
the corpus (language-reference page or library docstring?), and serving the pretrained model on Ray
Serve long enough to answer one request. `smoke` shrinks every step for CI.
"""

from __future__ import annotations

import json
import random
import shutil
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from mtnlg_ray.config import load_config, set_text
from mtnlg_ray.errors import InputError
from mtnlg_ray.publish import check_can_make_folder, publish_file


@dataclass(frozen=True)
class Sizes:
    documents: int | None  # a seeded sample of the built-in corpus; None: all of it
    vocab: int
    seq_len: int
    pretrain_steps: int
    task_examples: int
    finetune_epochs: int
    quality_docs: int
    folder: str  # where under the workdir a size writes everything: a run resumes its own, never the other's


# 500 steps (2M tokens, ~6 epochs of the ~350k-token curated corpus) take about 5 minutes on 2
# cores and keep the whole run under 10. At 400 steps the loss was 5.05 (val 5.24); the 85 steps of
# one epoch that earlier quickstarts ran ended at 6.09, and the model answered with newlines only.
FULL = Sizes(documents=None, vocab=4096, seq_len=128, pretrain_steps=500, task_examples=600, finetune_epochs=3,
             quality_docs=600, folder="")
SMOKE = Sizes(documents=150, vocab=512, seq_len=64, pretrain_steps=8, task_examples=96, finetune_epochs=1,
              quality_docs=120, folder="smoke")


def _paragraphs(texts, min_words: int = 12, max_words: int = 80) -> list[str]:
    out = []
    for text in texts:
        for block in text.split("\n\n"):
            words = block.split()
            if min_words <= len(words) <= max_words:
                out.append(" ".join(words))
    return out


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    return path


def quality_training_sets(docs: list[str], out: Path, count: int, seed: int = 0) -> tuple[Path, Path]:
    """Curated text (documents of the corpus) and raw-crawl stand-ins (the same words, shuffled)."""
    rng = random.Random(seed)
    sample = rng.sample(docs, min(count, len(docs)))
    words = [w for d in sample for w in d.split()]
    rng.shuffle(words)
    salad, start = [], 0
    for doc in sample:
        n = len(doc.split())
        salad.append(" ".join(words[start : start + n]))
        start += n
    positive = _write_jsonl(out / "positive.jsonl", [{"text": d} for d in sample])
    negative = _write_jsonl(out / "negative.jsonl", [{"text": d} for d in salad if d])
    return positive, negative


def reference_or_library_task(out: Path, count: int, seed: int = 0) -> tuple[Path, Path]:
    """A two-class task from the built-in corpus: is a paragraph from the language reference
    (`pydoc_data` topics) or from a standard-library docstring? Balanced; train and dev disjoint."""
    from pydoc_data.topics import topics

    from mtnlg_ray.data.builtin import python_docs_texts

    reference_texts = {t.strip() for t in topics.values()}
    reference = _paragraphs(sorted(reference_texts))
    library = _paragraphs(t for t in python_docs_texts() if t.strip() not in reference_texts)
    rng = random.Random(seed)
    per_class = count // 2
    rows = [{"text": p, "label": "reference"} for p in rng.sample(reference, min(per_class, len(reference)))]
    rows += [{"text": p, "label": "library"} for p in rng.sample(library, min(per_class, len(library)))]
    rng.shuffle(rows)
    cut = len(rows) * 4 // 5
    return _write_jsonl(out / "train.jsonl", rows[:cut]), _write_jsonl(out / "dev.jsonl", rows[cut:])


# A model this small, greedy, tends to loop on its most common token ("\n" in hard-wrapped docs);
# a seeded sample reads like the corpus and is the same on every run.
SAMPLING = {"temperature": 0.7, "top_p": 0.9, "seed": 0}
PROMPT = "The default value of"


def ask(url: str, prompt: str, max_tokens: int = 24, timeout: float = 120) -> str:
    body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, **SAMPLING}).encode()
    request = urllib.request.Request(f"{url}/v1/completions", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())["choices"][0]["text"]


def quickstart(workdir: str | Path, smoke: bool = False, port: int = 8000,
               on_step: Callable[[str, str], None] | None = None,
               on_record: Callable[[dict], None] | None = None,
               on_stage: Callable | None = None) -> dict:
    """Run every stage under `workdir`; returns where each artifact is, with the headline numbers.

    `on_step` hears of each step, `on_stage` of each corpus-pipeline stage, `on_record` of each
    training record.
    """
    from mtnlg_ray.data.builtin import python_docs_texts
    from mtnlg_ray.data.pipeline import prepare_dataset
    from mtnlg_ray.data.quality import train_quality_classifier
    from mtnlg_ray.finetune.trainer import finetune
    from mtnlg_ray.train.trainer import pretrain

    from mtnlg_ray.runtime import ensure_ray
    from mtnlg_ray.serve.app import check_can_serve

    work = Path(workdir).expanduser().resolve()
    if work.exists() and not work.is_dir():
        raise InputError(f"{workdir}: --workdir exists and is not a folder")
    check_can_make_folder(work)  # before Ray starts
    ensure_ray()
    check_can_serve("127.0.0.1", port)  # before minutes of work, not at the last step
    sizes = SMOKE if smoke else FULL
    # `--smoke` and a full run in one workdir keep apart: the full pretrain used to resume the smoke
    # model's checkpoint and stop on its shape, and a smoke run after a full one replaced the data,
    # quality model and task files the full run's printed commands name.
    work = work / sizes.folder if sizes.folder else work
    runs = work / "runs"
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    result: dict = {"workdir": str(work), "smoke": smoke}

    def step(name: str, detail: str) -> None:
        if on_step is not None:
            on_step(name, f"{detail}  [{time.perf_counter() - started:.0f}s]")

    step("quality", "training the quality classifier: corpus documents vs word salad")
    positive, negative = quality_training_sets(list(python_docs_texts()), work / "quality_data", sizes.quality_docs)
    quality = train_quality_classifier([str(positive)], [str(negative)], work / "quality")
    result["quality"] = {"path": str(work / "quality"), **{k: quality[k] for k in quality if "accuracy" in k}}

    corpus = "builtin:python-docs"
    if sizes.documents is not None:
        sample = random.Random(0).sample(list(python_docs_texts()), sizes.documents)
        corpus = str(_write_jsonl(work / "corpus_sample.jsonl", [{"text": t} for t in sample]))
    step("prepare", f"{'a sample of ' if sizes.documents else ''}builtin:python-docs → clean → dedup → "
                    "quality pseudo-labels (actor pool) → tokenize + pack")
    prepare_cfg = load_config(overrides=[
        "label.labeler=quality", set_text("label.model", work / "quality"), "label.threshold=0.5",
        f"tokenizer.vocab_size={sizes.vocab}", f"pack.seq_len={sizes.seq_len}", "pack.val_fraction=0.02",
    ], stage="prepare")
    manifest = prepare_dataset([corpus], work / "data", prepare_cfg, on_stage=on_stage)
    result["data"] = {"path": str(work / "data"), "documents": manifest.get("documents"),
                      "rejected": sum(manifest.get("rejected", {}).values())}

    step("pretrain", f"{sizes.pretrain_steps} steps of the tiny GPT on 2 Ray Train workers (FSDP)")
    pretrain_cfg = load_config(overrides=[
        set_text("data.path", work / "data"), set_text("run.storage_path", runs), "run.name=pretrain",
        f"model.seq_len={sizes.seq_len}", f"train.max_steps={sizes.pretrain_steps}", "parallel.workers=2",
        "train.epochs=1000",  # max_steps ends the run, not the end of the (small) corpus
        "train.micro_batch_size=8", "train.global_batch_size=32", f"train.warmup_tokens={min(50_000, sizes.pretrain_steps * 32 * sizes.seq_len // 10)}",
        f"train.decay_tokens={sizes.pretrain_steps * 32 * sizes.seq_len}", "train.eval_every=100",
        f"checkpoint.every_steps={max(sizes.pretrain_steps, 1)}",
    ], stage="pretrain")
    trained = pretrain(pretrain_cfg, on_record=on_record, say_if_ended=False)
    if trained["had_ended"]:
        step("pretrain", f"the model an earlier quickstart trained in {runs / 'pretrain'} is reused (delete that "
                         "folder to train it again)")
    elif (runs / "finetune").exists():  # a classifier of the weights trained before: fine-tune the new ones
        shutil.rmtree(runs / "finetune")
        step("finetune", f"the classifier in {runs / 'finetune'} was fine-tuned from the model trained before; it "
                         "is deleted and fine-tuned afresh")
    result["pretrain"] = {"path": trained["final"], "loss": trained["metrics"]["loss"],
                          "val_loss": trained["metrics"].get("val_loss")}

    step("finetune", "a reference-vs-library classifier from the pretrained model")
    train_file, dev_file = reference_or_library_task(work / "task", sizes.task_examples)
    finetune_cfg = load_config(overrides=[
        set_text("init.checkpoint", trained["run_dir"]), set_text("data.train", train_file),
        set_text("data.dev", dev_file),
        f"train.epochs={sizes.finetune_epochs}", "train.lr=1e-3", set_text("run.storage_path", runs),
        "run.name=finetune",
    ], stage="finetune")
    tuned = finetune(finetune_cfg, on_record=on_record)
    result["finetune"] = {"path": tuned["final"], "dev_accuracy": (tuned["dev"] or {}).get("accuracy")}

    step("serve", "the pretrained model on Ray Serve, one completion request")
    from ray import serve

    from mtnlg_ray.serve import serve_model
    from mtnlg_ray.serve.app import parse_args

    url = serve_model(parse_args({"checkpoint": trained["final"], "model_name": "quickstart"}), port=port)
    try:
        result["serve"] = {"url": url, "prompt": PROMPT, **SAMPLING, "completion": ask(url, PROMPT)}
    finally:
        serve.delete("mtnlg")
    result["seconds"] = round(time.perf_counter() - started, 1)
    publish_file(work / "quickstart.json", json.dumps(result, indent=2) + "\n")
    step("done", f"everything is under {work}")
    return result
