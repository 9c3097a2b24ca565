"""Model commands: `init`, `plan`, `pretrain`, `finetune`, `self-train`, `evaluate`, `plot`, `export hf`,
`import hf` and `quickstart` (the whole pipeline on the built-in corpus)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import List, Optional

import typer

from mtnlg_ray.cli.app import app, export_app, import_app
from mtnlg_ray.cli.render import dev_line, finetune_printer, pretrain_printer, progress_console, stage_printer


@app.command("init")
def init(
    preset: str = typer.Option(..., "--preset", help="Model shape: tiny, small, gpt3-125m ... mtnlg-530b."),
    tokenizer: Path = typer.Option(..., "--tokenizer", help="Directory (or file) holding tokenizer.json, or a "
                                   "prepared dataset."),
    output: Path = typer.Option(..., "--output", "-o", help="Checkpoint directory to write."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random initialisation."),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", help="Context length (default: the preset's)."),
) -> None:
    """Write a randomly initialised checkpoint (init std sqrt(1/(3h)), as in MT-NLG).

    Example: mtnlg-ray init --preset tiny --tokenizer tok --output ckpt
    """
    from mtnlg_ray.checkpoint import init_checkpoint, load_checkpoint

    path = init_checkpoint(preset, tokenizer, output, seed=seed, seq_len=seq_len)
    model, _ = load_checkpoint(path)
    c = model.config
    typer.echo(
        f"wrote {path}: {preset}, {model.num_parameters():,} parameters, "
        f"{c.n_layer} layers, d_model {c.d_model}, {c.n_head} heads, context {c.seq_len}, vocab {c.vocab_size}"
    )


@export_app.command("hf")
def export_hf(
    checkpoint: Path = typer.Option(..., "--checkpoint", "-c", help="Consolidated checkpoint directory."),
    output: Path = typer.Option(..., "--output", "-o", help="Directory for the Hugging Face model."),
) -> None:
    """Write a directory that transformers' GPT2LMHeadModel and AutoTokenizer load, with equal logits.

    A fine-tuned classifier exports its fine-tuned body as a language model; its classification head
    has no place in GPT2LMHeadModel and stays behind (classify with `mtnlg-ray evaluate` or the
    checkpoint itself)."""
    from mtnlg_ray.checkpoint import read_checkpoint_config
    from mtnlg_ray.export import export_hf as run

    written = run(checkpoint, output)
    typer.echo(f"wrote {written}")
    task = read_checkpoint_config(checkpoint).get("task") or {}
    if task.get("kind") == "classification":
        typer.echo(f"note: {checkpoint} is a classifier ({', '.join(map(str, task.get('labels', [])))}); its "
                   "classification head is not in the export, only the fine-tuned language model", err=True)


@import_app.command("hf")
def import_hf(
    input: Path = typer.Option(..., "--input", "-i", help="Local Hugging Face GPT-2 directory (with tokenizer.json)."),
    output: Path = typer.Option(..., "--output", "-o", help="Checkpoint directory to write."),
) -> None:
    """Turn a local Hugging Face GPT-2 directory into a consolidated checkpoint."""
    from mtnlg_ray.export import import_hf as run

    typer.echo(f"wrote {run(input, output)}")


# Config keys in the layout checks' messages, and the plan option each one is.
_PLAN_OPTIONS = {"parallel.pp_virtual": "--virtual", "parallel.pp_schedule": "--schedule", "parallel.pp": "--pp",
                 "parallel.tp": "--tp", "model.vocab_size": "--vocab-size", "train.global_batch_size": "--global-batch",
                 "train.micro_batch_size": "--micro-batch", "global_batch": "--global-batch",
                 "micro_batch": "--micro-batch", "iter_time": "--iter-time", "gpu": "--gpu", "pp": "--pp", "tp": "--tp",
                 "dp": "--dp"}


def _as_plan_options(message: str, seq_len_given: bool) -> str:
    """`parallel.tp=8 must divide ...` as `--tp 8 must divide ...`: the words a plan's user typed
    (model.seq_len as --seq-len only where they typed it: else it is the preset's)."""
    options = _PLAN_OPTIONS | ({"model.seq_len": "--seq-len"} if seq_len_given else {})
    keys = "|".join(re.escape(key) for key in options)  # longest first: pp_virtual before pp
    return re.sub(rf"(?<![\w.-])({keys})(?:(=)|(?![\w.]))",
                  lambda m: options[m[1]] + (" " if m[2] else ""), message)


@app.command("plan")
def plan(
    preset: str = typer.Option(..., "--preset", help="Model shape, e.g. mtnlg-530b."),
    tp: int = typer.Option(1, "--tp", help="Tensor-parallel size (GPUs inside a node)."),
    pp: int = typer.Option(1, "--pp", help="Pipeline-parallel size (stages)."),
    dp: int = typer.Option(1, "--dp", help="Data-parallel size (model replicas)."),
    global_batch: Optional[int] = typer.Option(None, "--global-batch", help="Sequences per iteration (default: micro-batch × dp × pp)."),
    micro_batch: int = typer.Option(1, "--micro-batch", help="Sequences per GPU per forward."),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", help="Sequence length (default: the preset's)."),
    vocab_size: Optional[int] = typer.Option(
        None, "--vocab-size", help="Your tokenizer's vocabulary, padded to a multiple of 64 as pretrain pads it "
        "(default: the preset's)."),
    iter_time: Optional[float] = typer.Option(None, "--iter-time", help="Measured seconds per iteration."),
    gpu: str = typer.Option("a100-80gb", "--gpu", help="a100-80gb, h100-80gb or h200-141gb."),
    schedule: str = typer.Option("1f1b", "--schedule", help="Pipeline schedule: gpipe, 1f1b, interleaved-1f1b "
                                 "(plans bf16 with FSDP, which interleaved-zero-bubble does not run with)."),
    virtual: int = typer.Option(1, "--virtual", help="Pipeline stages a rank (interleaved schedules: 2 or more)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
) -> None:
    """Parameters, per-GPU memory, FLOPs per iteration and, given --iter-time, TFLOP/s per GPU.

    Only layouts `mtnlg-ray pretrain` can run are planned (the same checks, one line and exit 2
    otherwise), and the plan ends with the pretrain command for its layout.

    Example: mtnlg-ray plan --preset mtnlg-530b --tp 8 --pp 35 --dp 8 --global-batch 1920 --seq-len 2048
    """
    import dataclasses

    from mtnlg_ray.cli.render import render_plan
    from mtnlg_ray.model.plan import plan_layout
    from mtnlg_ray.model.gpt import pad_vocab
    from mtnlg_ray.errors import ConfigError
    from mtnlg_ray.model.presets import get_preset
    from mtnlg_ray.train.parallel import check_layout
    from mtnlg_ray.train.pipeline import SCHEDULES

    # Each option named as typed (they were refused as `dp`, `parallel.tp` or `model.seq_len`).
    for option, value in (("--tp", tp), ("--pp", pp), ("--dp", dp), ("--micro-batch", micro_batch),
                          ("--virtual", virtual), ("--global-batch", global_batch), ("--seq-len", seq_len),
                          ("--vocab-size", vocab_size)):
        if value is not None and value < 1:
            raise ConfigError(f"{option}: expected a positive integer, got {value}")
    if pp == 1 and virtual > 1:
        raise ConfigError(f"--virtual {virtual}: stages a rank of a pipeline, but --pp is 1 (no pipeline)")
    planned = [name for name in SCHEDULES if name != "interleaved-zero-bubble"]  # it runs only without FSDP
    if schedule not in planned:  # at --pp 1 nothing else looks at it
        raise ConfigError(f"--schedule: expected one of {', '.join(planned)} (a plan is bf16 with FSDP, which "
                          f"interleaved-zero-bubble does not run with), got {schedule!r}")
    if virtual > 1 and not schedule.startswith("interleaved"):
        raise ConfigError(f"--virtual {virtual}: several stages a rank need --schedule interleaved-1f1b")
    if vocab_size is not None:
        vocab_size = pad_vocab(vocab_size)  # as pretrain pads a tokenizer's vocabulary
    shape = get_preset(preset)
    shape = dataclasses.replace(shape, seq_len=seq_len or shape.seq_len, vocab_size=vocab_size or shape.vocab_size)
    try:
        check_layout(shape, tp * pp * dp, tp, pp, pp_schedule=schedule, pp_virtual=virtual)
        result = plan_layout(
            preset, tp, pp, dp,
            global_batch=global_batch, micro_batch=micro_batch, seq_len=seq_len, iter_time=iter_time, gpu=gpu,
            vocab_size=vocab_size, schedule=schedule, virtual=virtual,
        )
    except ConfigError as error:  # the shared checks name config keys; here the user typed options
        raise ConfigError(_as_plan_options(str(error), seq_len is not None)) from None
    if result["hfu"] is not None and result["hfu"] > 1:
        typer.echo(f"warning: --iter-time {iter_time} s puts each GPU at {result['hfu']:.0%} of its peak: "
                   "expected the measured seconds of one whole iteration", err=True)
    sets = [f"model.preset={preset}", f"parallel.workers={tp * pp * dp}", f"parallel.tp={tp}", f"parallel.pp={pp}"]
    if pp > 1:
        sets += [f"parallel.pp_schedule={schedule}"] + ([f"parallel.pp_virtual={virtual}"] if virtual > 1 else [])
    sets += [f"train.global_batch_size={result['global_batch']}", f"train.micro_batch_size={micro_batch}",
             "parallel.use_gpu=true", "train.precision=bf16",
             "model.activation_checkpointing=true"]  # the memory above assumes full recompute
    if seq_len and seq_len != get_preset(preset).seq_len:
        sets.append(f"model.seq_len={seq_len}")  # else the command would train at the preset's length
    # The printed command, checked as pretrain checks it: its precision, batches (the ramp-up's too)
    # and schedule together.
    from mtnlg_ray.config import load_config
    from mtnlg_ray.train.trainer import check_run_layout

    try:
        check_run_layout(load_config(overrides=sets, stage="pretrain"), shape, "lm")
    except ConfigError as error:
        raise ConfigError(_as_plan_options(str(error), seq_len is not None)) from None
    result["command"] = "mtnlg-ray pretrain " + " ".join(f"--set {item}" for item in sets)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    from rich.console import Console

    console = Console()
    console.print(render_plan(result))
    console.print(result["command"], soft_wrap=True)


@app.command("pretrain")
def pretrain(
    config: Optional[Path] = typer.Option(None, "--config", help="YAML config (default: the shipped pretrain.yaml)."),
    overrides: List[str] = typer.Option([], "--set", metavar="KEY=VALUE", help="Override one config key, e.g. --set train.max_steps=20 (repeatable)."),
) -> None:
    """Pretrain on Ray Train (FSDP2 + tensor parallel, elastic, fault tolerant) with the MT-NLG schedule.

    Needs data.path: a dataset from `mtnlg-ray data prepare`. Running the same command again with
    the same run.name resumes from the newest checkpoint. Ends with a consolidated checkpoint in
    <run.storage_path>/<run.name>/final.

    Example: mtnlg-ray pretrain --set data.path=work/data --set train.max_steps=200 --set parallel.workers=2
    """
    from mtnlg_ray.config import load_config
    from mtnlg_ray.train.trainer import pretrain as run

    cfg = load_config(config, overrides, stage="pretrain")
    console, show = pretrain_printer()

    result = run(cfg, on_record=show)
    console.print(f"final weights: {result['final']}  (metrics in {result['run_dir']}/metrics.jsonl)")
    typer.echo(result["final"])


@app.command("plot")
def plot(
    run_dir: Path = typer.Argument(..., help="A run directory (<run.storage_path>/<run.name>) holding metrics.jsonl."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Image to write, in the format its suffix names (.png, .svg, .pdf; none: PNG) (default: RUN_DIR/loss.png)."),
) -> None:
    """Plot training and validation loss of a run (to RUN_DIR/loss.png, or the file --output names)."""
    from mtnlg_ray.train.plot import plot_losses

    typer.echo(f"wrote {plot_losses(run_dir, output)}")


@app.command("finetune")
def finetune(
    config: Optional[Path] = typer.Option(None, "--config", help="YAML config (default: the shipped finetune.yaml)."),
    overrides: List[str] = typer.Option([], "--set", metavar="KEY=VALUE", help="Override one config key, e.g. --set data.train=train.tsv (repeatable)."),
) -> None:
    """Fine-tune a checkpoint on Ray Train: classification (a head) or SFT (prompt → completion).

    Needs data.train (TSV / CSV / JSONL / Parquet) and init.checkpoint (a consolidated checkpoint or
    a pretraining run directory; or tokenizer.path for random weights). task.mode picks full
    fine-tuning, LoRA (merged into the saved weights) or a frozen backbone. With data.dev, the dev
    set is scored after every epoch and the best epoch becomes <run.storage_path>/<run.name>/final.

    Example: mtnlg-ray finetune --set init.checkpoint=runs/pretrain --set data.train=train.tsv
    --set data.dev=dev.tsv --set data.text_field=sentence
    """
    from mtnlg_ray.config import load_config
    from mtnlg_ray.finetune.trainer import finetune as run

    cfg = load_config(config, overrides, stage="finetune")
    console, show = finetune_printer()
    result = run(cfg, on_record=show)
    if result["dev"]:
        console.print(f"best {result['metric']}: {result['dev'][result['metric']]:.4f}  ({dev_line(result['dev'], '')})")
    console.print(f"final weights: {result['final']}  (metrics in {result['run_dir']}/metrics.jsonl)")
    typer.echo(result["final"])


@app.command("self-train")
def self_train(
    config: Optional[Path] = typer.Option(None, "--config", help="YAML config (default: the shipped selftrain.yaml)."),
    overrides: List[str] = typer.Option([], "--set", metavar="KEY=VALUE", help="Override one config key, e.g. --set selftrain.rounds=1 (repeatable)."),
) -> None:
    """Self-training with pseudo-labels: teacher → label the pool on the actor pool → student, for N rounds.

    Round 0's teacher is a fine-tune on data.train, or selftrain.teacher (a classifier checkpoint),
    the n-gram classifier (selftrain.ngram_teacher) or the mean of the two. Each round the teacher labels selftrain.unlabelled
    through the corpus pipeline's classifier labeller (a Ray Data actor pool); predictions with
    confidence >= selftrain.threshold (default 0.5; selftrain.per_class_top_k for class balance,
    selftrain.soft_labels for the teacher's confidence as the target) join the labelled set, and a
    student is fine-tuned on both from init.checkpoint. Writes self_train_report.json and
    self_train.png in <run.storage_path>/<run.name>. Pool rows may carry a gold label (data.label_field)
    or not: training never reads it; the report scores the kept pseudo-labels of the rows that have one.

    Example: mtnlg-ray self-train --set init.checkpoint=runs/pretrain --set data.train=train.tsv
    --set data.dev=dev.tsv --set data.text_field=sentence --set selftrain.unlabelled=pool.tsv
    --set selftrain.ngram_teacher=true
    """
    from rich.console import Console
    from rich.table import Table

    from mtnlg_ray.config import load_config
    from mtnlg_ray.finetune.selftrain import self_train as run

    cfg = load_config(config, overrides, stage="selftrain")
    console, show = finetune_printer()

    def on_event(event: dict) -> None:
        if event["event"] == "round":
            kept = f", pseudo-labels kept {event['kept']}" if event.get("kept") else ""
            console.print(f"[bold]round {event['round']}[/bold]: {event['role']} on {event['train']:,} examples{kept}")
        elif event["event"] == "teacher":
            scored = (f" (their mean's dev accuracy {event['dev_accuracy']:.4f})"
                      if event.get("dev_accuracy") is not None else "")
            console.print(f"[bold]round {event['round']}[/bold]: teacher = the n-gram classifier + the last "
                          f"student{scored}")
        elif event["event"] == "restart":
            console.print(f"[bold]round {event['round']}[/bold]: the pseudo-labels changed since the last run "
                          "of this run.name: the student trains afresh")
        elif event["event"] == "label":
            console.print(f"[bold]round {event['round']}[/bold]: labelling {event['pool']:,} pool texts with the teacher")

    report = run(cfg, on_event=on_event, on_record=show)
    table = Table(title=f"self-training: {report['labelled']:,} labelled, {report['pool']:,} in the pool, "
                        f"threshold {report['threshold']}" + (f", at most {report['per_class_top_k']:,} a class"
                                                              if report.get("per_class_top_k") else ""))
    for column in ("round", "train examples", "kept per class", "pseudo-label acc", "dev acc", "dev macro F1", "seconds"):
        table.add_column(column, justify="right")

    def num(x):
        return "-" if x is None else f"{x:.4f}"

    def pseudo_cell(r: dict) -> str:  # scored over the kept rows with a gold label; say so when not all have one
        scored, kept = r.get("pseudo_labels_scored"), sum(r["kept_per_class"].values())
        partial = r["pseudo_label_accuracy"] is not None and scored is not None and scored < kept
        return num(r["pseudo_label_accuracy"]) + (f" ({scored:,} scored)" if partial else "")

    for r in report["rounds"]:
        table.add_row(str(r["round"]), f"{r['train_examples']:,}",
                      ", ".join(f"{k}: {v:,}" for k, v in r["kept_per_class"].items()) or "-",
                      pseudo_cell(r), num(r["dev_accuracy"]), num(r["dev_macro_f1"]), f"{r['seconds']:.0f}")
    Console().print(table)
    console.print(f"report: {Path(report['final']).parents[1] / 'self_train_report.json'}  plot: {report['plot']}")
    typer.echo(report["final"])


@app.command("evaluate")
def evaluate(
    checkpoint: Path = typer.Option(..., "--checkpoint", "-c", help="Consolidated checkpoint directory (classification: also a self-train round0/ngram or round0/mix folder)."),
    data: List[str] = typer.Option(..., "--data", "-d", metavar="INPUT",
                                   help="lm: INPUT text (file, folder, glob, builtin:python-docs) or a dataset dir "
                                        "from `data prepare`; classification: a labelled TSV / CSV / JSONL / Parquet."),
    task: Optional[str] = typer.Option(
        None, "--task", help="lm (perplexity, bits per byte) or classification (default: classification for a "
                             "classifier checkpoint, else lm)."),
    text_field: Optional[str] = typer.Option(None, "--text-field", help="Column or JSON field holding the text (default: text)."),
    label_field: str = typer.Option("label", "--label-field", help="Column holding the gold label (classification)."),
    split: Optional[str] = typer.Option(None, "--split", help="Which packed split of a dataset dir to score (lm): val (default) or train."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
) -> None:
    """Score a checkpoint: perplexity and bits per byte (lm), or accuracy and P/R/F1 (classification).

    Examples: mtnlg-ray evaluate -c runs/pretrain/final -d builtin:python-docs;
    mtnlg-ray evaluate -c runs/finetune/final -d dev.tsv --text-field sentence
    """
    from mtnlg_ray.finetune.evaluate import evaluate as run

    result = run(checkpoint, data, task, text_field=text_field, label_field=label_field, split=split)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if result["task"] == "lm":
        console.print(f"{result['tokens']:,} tokens, {result['bytes']:,} bytes: loss {result['loss']:.4f} nats/token, "
                      f"perplexity {result['perplexity']:.2f}, {result['bits_per_byte']:.4f} bits per byte")
        return
    table = Table(title=f"{result['n']:,} examples: accuracy {result['accuracy']:.4f}, macro F1 {result['macro_f1']:.4f}")
    for column in ("label", "precision", "recall", "F1", "support"):
        table.add_column(column, justify="left" if column == "label" else "right")
    for label, row in result["per_class"].items():
        table.add_row(label, f"{row['precision']:.4f}", f"{row['recall']:.4f}", f"{row['f1']:.4f}", str(row["support"]))
    table.add_row("macro", f"{result['macro_precision']:.4f}", f"{result['macro_recall']:.4f}",
                  f"{result['macro_f1']:.4f}", str(result["n"]))
    console.print(table)


@app.command("quickstart")
def quickstart(
    workdir: Path = typer.Option(Path("quickstart"), "--workdir", help="Where every artifact goes."),
    smoke: bool = typer.Option(False, "--smoke", help="Tiny sizes for CI: every stage runs, in about a third of the time."),
    port: int = typer.Option(8000, "--port", help="HTTP port the server answers its one request on."),
) -> None:
    """The whole pipeline on the built-in corpus on a local Ray (about 7 minutes on 2 cores).

    Trains a quality classifier, prepares builtin:python-docs with it as the pseudo-labeller on
    the actor pool, pretrains the tiny GPT on 2 Ray Train workers, fine-tunes a classifier on a
    task built from the corpus, serves the pretrained model and answers one request, then prints
    where each artifact is and how to query a server.
    """
    from mtnlg_ray.quickstart import quickstart as run

    console = progress_console()

    def on_step(name: str, detail: str) -> None:
        console.rule(f"[bold]{name}[/bold]")
        console.print(detail)

    def on_record(record: dict) -> None:
        if "dev" in record:
            console.print(f"  epoch {record['epoch']:.2f}  {dev_line(record['dev'], '')}")
        elif "loss" in record and (record["step"] % 25 == 0 or "val_loss" in record):
            val = f"  val {record['val_loss']:.3f}" if record.get("val_loss") is not None else ""
            console.print(f"  step {record['step']:>4}  loss {record['loss']:.3f}{val}  {record['tokens_per_s']:,.0f} tok/s")

    _, show_stage = stage_printer()
    result = run(workdir, smoke=smoke, port=port, on_step=on_step, on_record=on_record, on_stage=show_stage)
    # Plain lines, not a table: paths stay whole for copying, whatever the terminal width.
    quality = result["quality"]
    val = result["pretrain"]["val_loss"]
    acc = result["finetune"]["dev_accuracy"]
    typer.echo(f"quickstart finished in {result['seconds']:.0f}s; artifacts:")
    typer.echo(f"  quality classifier     {quality['path']}  (holdout accuracy {quality.get('holdout_accuracy', float('nan')):.3f})")
    typer.echo(f"  curated dataset        {result['data']['path']}  ({result['data']['documents']:,} documents kept, "
               f"{result['data']['rejected']:,} rejected; see its manifest.json and rejected/)")
    typer.echo(f"  pretrained GPT         {result['pretrain']['path']}  (loss {result['pretrain']['loss']:.3f}"
               + (f", val {val:.3f})" if val is not None else ")"))
    typer.echo(f"  fine-tuned classifier  {result['finetune']['path']}"
               + (f"  (dev accuracy {acc:.3f})" if acc is not None else ""))
    serve = result["serve"]
    typer.echo(f"served answer to {serve['prompt']!r}: {serve['completion']!r}")
    typer.echo(f"serve it again:  mtnlg-ray serve --checkpoint {result['pretrain']['path']}")
    body = json.dumps({"prompt": serve["prompt"], "max_tokens": 24,
                       **{k: serve[k] for k in ("temperature", "top_p", "seed")}})
    typer.echo(f"then query it:   curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' -d '{body}'")
    typer.echo(f"score it on dev: mtnlg-ray evaluate -c {result['finetune']['path']} -d {result['workdir']}/task/dev.jsonl "
               "--task classification")


