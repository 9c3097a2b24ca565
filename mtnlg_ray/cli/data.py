"""Corpus commands: `data prepare`, `data label`, `data train-quality-classifier`, `tokenizer train`
and `config show`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer

from mtnlg_ray.cli.app import INPUT_HELP, LABEL_SET_HELP, SET_HELP, config_app, data_app, tokenizer_app
from mtnlg_ray.cli.render import print_manifest_summary, stage_printer
from mtnlg_ray.errors import MtnlgError


@data_app.command("prepare")
def data_prepare(
    inputs: List[str] = typer.Argument(..., metavar="INPUT...", help=INPUT_HELP),
    output: Path = typer.Option(..., "--output", "-o", help="Dataset directory to write (manifest.json, docs/, rejected/, tokens/, tokenizer/)."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML config (default: the shipped prepare.yaml)."),
    overrides: List[str] = typer.Option([], "--set", metavar="KEY=VALUE", help=SET_HELP),
) -> None:
    """Run the whole corpus pipeline on Ray (the connected cluster, or a local one it starts).

    Bad records never stop the run: each lands in rejected/ with its stage and reason. A dataset
    already in --output is replaced only when the run completes; a run left with no document beside
    it writes its rejects to OUTPUT/failed-run.

    Example: mtnlg-ray data prepare builtin:python-docs corpus/ --output work/data --set pack.seq_len=128
    """
    from mtnlg_ray.config import load_config
    from mtnlg_ray.data.pipeline import prepare_dataset

    cfg = load_config(config, overrides, stage="prepare")
    console, show = stage_printer()
    with console.status("running the corpus pipeline on Ray…"):
        manifest = prepare_dataset(inputs, output, cfg, on_stage=show)
    print_manifest_summary(console, manifest, output)


@data_app.command("label")
def data_label(
    input: List[str] = typer.Argument(..., metavar="INPUT...", help=INPUT_HELP),
    output: Path = typer.Option(..., "--output", "-o", help="Directory for docs/ (with label columns), rejected/, manifest.json."),
    labeler: str = typer.Option(..., "--labeler", help="quality | perplexity | classifier"),
    model: Path = typer.Option(..., "--model", help="Quality model dir, LM checkpoint, or classifier checkpoint."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML config (default: the shipped prepare.yaml)."),
    overrides: List[str] = typer.Option([], "--set", metavar="KEY=VALUE", help=LABEL_SET_HELP),
) -> None:
    """Run only the pseudo-labelling stage (an actor pool, the model loaded once per actor).

    Example: mtnlg-ray data label corpus/ --output labelled --labeler classifier --model runs/finetune/final
    """
    from mtnlg_ray.config import label_overrides, load_config
    from mtnlg_ray.data.pipeline import label_corpus

    cfg = load_config(config, [*overrides, *label_overrides(labeler, model)], stage="label")
    console, show = stage_printer()
    with console.status(f"labelling with {labeler}…"):
        manifest = label_corpus(input, output, cfg, on_stage=show)
    print_manifest_summary(console, manifest, output)


@data_app.command("train-quality-classifier")
def data_train_quality_classifier(
    positive: List[str] = typer.Option(..., "--positive", metavar="INPUT", help="INPUT of curated text (repeatable)."),
    negative: List[str] = typer.Option(..., "--negative", metavar="INPUT", help="INPUT of raw / unwanted text (repeatable)."),
    output: Path = typer.Option(..., "--output", "-o", help="Directory for the model (safetensors + JSON, no pickle)."),
    epochs: int = typer.Option(5, "--epochs", help="Passes over the training documents."),
    seed: int = typer.Option(0, "--seed", help="Seed of the train / holdout split and the initialisation."),
    txt_mode: str = typer.Option("file", "--txt-mode",
                                 help="How a .txt input is read, as read.txt_mode in `data prepare`: file (one "
                                      "document), paragraph or line (one example a line)."),
) -> None:
    """Train the GPT-3 / MT-NLG style quality classifier: hashed word n-grams + logistic regression.

    Each side needs at least 10 documents; a tenth of each is held out to measure accuracy.

    Example: mtnlg-ray data train-quality-classifier --positive builtin:python-docs --negative crawl/ --output work/quality
    """
    from mtnlg_ray.data.quality import train_quality_classifier

    metrics = train_quality_classifier(positive, negative, output, epochs=epochs, seed=seed, txt_mode=txt_mode)
    typer.echo(json.dumps(metrics, indent=2))


@config_app.command("show")
def config_show(
    stage: str = typer.Option("pretrain", "--stage",
                              help="Whose shipped defaults to start from: prepare (or label), pretrain, finetune, "
                                   "self-train. (Serve's arguments: `mtnlg-ray serve --help`.)"),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML file to read instead of the defaults."),
    overrides: List[str] = typer.Option([], "--set", metavar="KEY=VALUE", help="Override one key, e.g. --set train.max_steps=20."),
) -> None:
    """Print the resolved config (file + --set overrides, validated) as YAML; what a run derives when
    unset (pretraining's LR, warm-up and decay; fine-tuning's warm-up and decay, given data.train) is
    printed as a comment with its value, and a run.name that holds a checkpoint keeps the schedule
    it recorded.

    Example: mtnlg-ray config show --stage finetune --set train.lr=1e-4
    """
    import yaml

    from mtnlg_ray.config import CONFIG_STAGES, STAGE_SECTIONS, UNUSED_KEYS, load_config

    # A stage's command name or its shipped config's name ("selftrain").
    stages = {**CONFIG_STAGES, **{name: name for name in CONFIG_STAGES.values()}}
    if stage not in stages:
        raise MtnlgError(f"--stage: expected one of {', '.join(CONFIG_STAGES)}; got {stage!r}")
    stage = stages[stage]
    resolved = load_config(config, overrides, stage=stage)
    derived = _derived_keys(resolved, stage)  # before the schedule below marks them set
    if stage == "pretrain":
        # The layout a cluster would run, checked as the trainer will before any worker starts.
        from mtnlg_ray.train.trainer import (check_run_layout, schedule_over_the_run, warn_about_the_batch,
                                             warn_about_the_schedule, warn_if_max_steps_ends_first)

        model = resolved.model.resolve()
        check_run_layout(resolved, model, "lm")
        # An unset warm-up and decay follow a bounded run's tokens, as pretrain's will: the sequences
        # are data.path's packed length, read as pretrain reads it, when the corpus is there
        # (pretrain reports a broken one), else the model's context.
        seq_len, sequences = _packed(resolved.data.path)
        resolved = schedule_over_the_run(resolved, seq_len or model.seq_len, sequences, data_known=seq_len is not None)
        # The README's check of a --config file: its warm-up past the decay is said here, not first in the run.
        warn_about_the_schedule(resolved)
        warn_if_max_steps_ends_first(resolved, seq_len or model.seq_len)
        warn_about_the_batch(resolved)
    elif stage == "finetune" and resolved.data.train:
        # Warm-up and decay as finetune derives them from data.train's tokens, after the checks it
        # makes before a worker starts (the files, their labels, the start checkpoint and tokenizer).
        from mtnlg_ray.finetune.trainer import prepare_finetune
        from mtnlg_ray.train.trainer import check_run_layout

        resolved, model, _, _ = prepare_finetune(resolved)
        check_run_layout(resolved, model, resolved.task.kind)
    elif stage == "finetune":
        unset = [key for key in ("warmup_tokens", "decay_tokens") if key not in resolved.train.model_fields_set]
        if unset:
            keys = " and ".join(f"train.{key}" for key in unset)
            it = "it" if len(unset) == 1 else "them"
            typer.echo(f"note: unless set, finetune derives {keys} from data.train's tokens (set data.train "
                       f"to see {it})", err=True)
    # Fine-tuning's come from data.train's tokens: without it (and for self-training, whose rounds
    # each derive their own) there is no value yet to show, only the field default.
    known = stage == "pretrain" or (stage == "finetune" and bool(resolved.data.train))
    # The sections the stage reads; a file saved from this leaves the others to the schema, as a run does.
    # Keys it never uses are left out too (a file saved from this is then read back without a warning).
    shown = {name: value for name, value in resolved.model_dump(mode="json").items() if name in STAGE_SECTIONS[stage]}
    for key in UNUSED_KEYS.get(stage, {}):
        section, _, name = key.partition(".")
        shown[section].pop(name, None)
    typer.echo(_commented(yaml.safe_dump(shown, sort_keys=False), "train", derived, known), nl=False)


def _derived_keys(resolved, stage: str) -> dict[str, str]:
    """The train keys the run derives because they are unset, each with where its value comes from."""
    if stage not in ("pretrain", "finetune", "selftrain"):
        return {}
    unset = {key for key in ("lr", "warmup_tokens", "decay_tokens") if key not in resolved.train.model_fields_set}
    if stage == "pretrain":
        where = {"lr": "model.preset's peak LR", "warmup_tokens": "model.preset's warm-up, at most a tenth of the run",
                 "decay_tokens": "the run's tokens; MT-NLG's 340B for an unbounded run"}
    else:
        where = {"warmup_tokens": "5 % of the run's tokens", "decay_tokens": "the run's tokens"}
    if stage != "selftrain":  # a run.name with a checkpoint resumes, keeping the schedule it recorded
        from mtnlg_ray.train.trainer import resumed_schedule

        run_dir = Path(resolved.run.storage_path) / resolved.run.name
        for key in resumed_schedule(resolved).keys() & where.keys():
            where[key] = f"recorded by the run in {run_dir}, which this config resumes"
    return {key: f"derived: {where[key]}" for key in where if key in unset}


def _commented(text: str, section: str, keys: dict[str, str], values: bool) -> str:
    """`config show`'s YAML with `section`'s derived keys printed as comments, with their value where it
    is known: a file saved from it (`config show > my.yaml`, as the README starts one) keeps them
    derived. Written out, the field defaults fixed a fine-tune's warm-up at 1B tokens, and a longer
    run's decay at the printed run's length."""
    lines, inside = [], False
    for line in text.splitlines(keepends=True):
        key, _, value = line.strip().partition(":")
        if not line.startswith(" "):
            inside = line.rstrip() == f"{section}:"
        elif inside and not line.startswith("   ") and key in keys:
            line = f"  # {key}:{value + '  ' if values else ' '}({keys[key]})\n"
        lines.append(line)
    return "".join(lines)


def _packed(path) -> tuple[int | None, int | None]:
    """(sequence length, training sequences) of a packed corpus, or Nones when there is none to read;
    a `path` given but unreadable is said on stderr (a mistyped data.path printed another run's decay)."""
    from mtnlg_ray.errors import InputError, first_line
    from mtnlg_ray.train.data import TokenShards

    if not path:
        return None, None
    try:
        shards = TokenShards(path, "train")
    except (InputError, OSError, ValueError, KeyError, TypeError) as error:
        print(f"warning: data.path cannot be read here ({first_line(error)}); the derived values below assume "
              "sequences of model.seq_len and no epoch limit", file=sys.stderr, flush=True)
        return None, None
    return shards.seq_len, len(shards)


@tokenizer_app.command("train")
def tokenizer_train(
    inputs: List[str] = typer.Argument(
        ...,
        metavar="INPUT...",
        help="Files, folders or globs of .txt / .jsonl(.gz) / .parquet, or builtin:python-docs.",
    ),
    vocab_size: int = typer.Option(8192, "--vocab-size", help="Number of tokens, <|endoftext|> included (258 to 1,048,576)."),
    output: Path = typer.Option(..., "--output", "-o", help="Directory to write tokenizer.json into."),
) -> None:
    """Train a GPT-2-style byte-level BPE tokenizer; any UTF-8 text round-trips exactly.

    Example: mtnlg-ray tokenizer train builtin:python-docs --vocab-size 4096 --output tok
    """
    from mtnlg_ray.tokenizer import load_tokenizer, train_tokenizer

    # The tokenizers library draws its progress on stdout: piped, it left blank lines before the result.
    path = train_tokenizer(inputs, vocab_size, output, show_progress=sys.stdout.isatty())
    typer.echo(f"wrote {path} ({load_tokenizer(path).get_vocab_size()} tokens)")


