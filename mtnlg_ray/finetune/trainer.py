"""`mtnlg-ray finetune`: check the task data and the start checkpoint on the driver, then train on Ray Train.

The workers run the pretraining loop (`train_loop_per_worker`) with a fine-tuning task, so fine-tuning
gets the same parallelism, checkpoints, resuming and metrics. The run's `final/` is its best
checkpoint on the dev set (the last one when there is no dev file), LoRA merged in.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from mtnlg_ray.config import Config, absolute_paths
from mtnlg_ray.errors import CheckpointError, ConfigError, InputError
from mtnlg_ray.publish import publish_file

WARMUP_FRACTION = 0.05  # of the run's tokens, when train.warmup_tokens is not set


def start_checkpoint(path: str | Path) -> Path:
    """A consolidated checkpoint, or a pretraining run directory (its `final/`)."""
    from mtnlg_ray.checkpoint import check_consolidated

    path = Path(path).expanduser().resolve()
    if (path / "final" / "config.json").is_file() and not (path / "config.json").is_file():
        return path / "final"
    check_consolidated(path)  # a sharded training checkpoint was "its tokenizer.json: missing"
    return path


def _tokenizer(cfg: Config) -> Path:
    """The tokenizer fine-tuning encodes text with: the start checkpoint's, which `tokenizer.path` must match."""
    from mtnlg_ray.checkpoint import tokenizer_path
    from mtnlg_ray.tokenizer import tokenizer_hash

    given = Path(cfg.tokenizer.path) if cfg.tokenizer.path else None  # absolute: see _resolve
    if given is not None and given.is_dir():
        given = given / "tokenizer.json"
    if cfg.init.checkpoint is None:
        if given is None:
            raise ConfigError("init.checkpoint: set a checkpoint to start from, or tokenizer.path to start from "
                              "random weights of model.preset")
        tokenizer_hash(given)  # one clear line when it is missing
        return given
    own = tokenizer_path(cfg.init.checkpoint)
    if given is not None and tokenizer_hash(given) != tokenizer_hash(own):
        raise CheckpointError(f"{cfg.init.checkpoint}: its tokenizer differs from tokenizer.path {given} "
                              "(a checkpoint of another vocabulary); fine-tune with the checkpoint's own tokenizer")
    return own


def _resolve(cfg: Config) -> Config:
    if cfg.data.train is None:
        raise ConfigError("data.train: set it to the labelled training file (TSV, CSV, JSONL or Parquet)")
    cfg = absolute_paths(cfg)
    init = str(start_checkpoint(cfg.init.checkpoint)) if cfg.init.checkpoint else None
    return cfg.model_copy(update={"init": cfg.init.model_copy(update={"checkpoint": init})})


def _check_task(cfg: Config, tokenizer_file: Path, seq_len: int) -> tuple[Config, int, int]:
    """Validate the data files and the label set; returns the config with task.labels filled, the
    tokens of one epoch and the number of training examples (for the default schedule)."""
    from mtnlg_ray.finetune.data import check_labels, label_set, read_classification, read_sft
    from mtnlg_ray.finetune.tasks import sft_input
    from mtnlg_ray.model.classifier import classification_input
    from mtnlg_ray.tokenizer import eos_id, load_tokenizer

    tokenizer = load_tokenizer(tokenizer_file)
    eos = eos_id(tokenizer)
    if cfg.task.kind == "sft":
        fields = (cfg.task.prompt_field, cfg.task.completion_field)
        pairs = read_sft(cfg.data.train, *fields)
        if cfg.data.dev:
            read_sft(cfg.data.dev, *fields)
        # As the task encodes each pair (an empty prompt is an EOS): an estimate from the joined text
        # ended the decay early (by 5 % on short completions without a prompt).
        tokens = sum(len(sft_input(tokenizer, p, eos, seq_len)[0]) for p in pairs)
        return cfg, tokens, len(pairs)
    train = read_classification(cfg.data.train, cfg.data.text_field, cfg.data.label_field)
    labels = list(cfg.task.labels) if cfg.task.labels else label_set(train)
    if len(labels) < 2 and cfg.task.labels:  # the set the user listed, not the file, is short
        raise ConfigError(f"task.labels: only one label ({labels[0]!r}); classification needs at least two")
    if len(labels) < 2:
        raise InputError(f"{cfg.data.train}: only one label ({labels[0]!r}); classification needs at least two "
                         "(or list them in task.labels)")
    check_labels(train, labels, "data.train")
    if cfg.data.dev:
        check_labels(read_classification(cfg.data.dev, cfg.data.text_field, cfg.data.label_field), labels, "data.dev")
    encoded = tokenizer.encode_batch(train.texts, add_special_tokens=False)
    tokens = sum(len(classification_input(e.ids, eos, seq_len)) for e in encoded)
    cfg = cfg.model_copy(update={"task": cfg.task.model_copy(update={"labels": labels})})
    return cfg, tokens, len(train.rows)


def _default_schedule(cfg: Config, epoch_tokens: int, examples_hint: int) -> Config:
    """Unless set, warm up over the first 5% of the run's tokens and decay over all of them (a resumed
    run: the warm-up and decay it started with)."""
    epochs = cfg.train.epoch_limit()
    run_tokens = epochs * epoch_tokens if epochs is not None else float("inf")  # then max_steps / max_tokens bound it
    if cfg.train.max_tokens is not None:
        run_tokens = min(run_tokens, cfg.train.max_tokens)
    if cfg.train.max_steps is not None and examples_hint:
        from mtnlg_ray.train.schedule import global_batch
        from mtnlg_ray.train.trainer import planned_dp

        per_sequence = epoch_tokens / examples_hint
        batch = global_batch(0, cfg.train, planned_dp(cfg))  # as the workers take it: whole micro-batches a rank
        run_tokens = min(run_tokens, int(cfg.train.max_steps * batch * per_sequence))
    from mtnlg_ray.train.trainer import resumed_schedule

    update = {}
    recorded = resumed_schedule(cfg)  # a resumed run keeps the schedule it started with
    if "decay_tokens" not in cfg.train.model_fields_set:
        update["decay_tokens"] = recorded.get("decay_tokens") or max(1, int(run_tokens))
    if "warmup_tokens" not in cfg.train.model_fields_set:
        update["warmup_tokens"] = recorded.get("warmup_tokens", int(WARMUP_FRACTION * run_tokens))
    return cfg.model_copy(update={"train": cfg.train.model_copy(update=update)}) if update else cfg


def _warn_about_shape_keys(cfg: Config, model_config) -> None:
    """`--set model.n_layer=9` beside init.checkpoint trained the checkpoint's 4 layers without a word,
    while `config show` printed 9: the checkpoint fixes the shape, and a shape key given otherwise is
    said to be unused."""
    from mtnlg_ray.errors import warn_once
    from mtnlg_ray.train.checkpoint import RUN_CHOICES

    if not cfg.init.checkpoint:
        return
    shape = model_config.to_dict()
    for key in sorted(cfg.model.model_fields_set):
        value = getattr(cfg.model, key)
        if key in shape and key not in RUN_CHOICES and value is not None and value != shape[key]:
            warn_once(f"warning: model.{key}={value} is not used: init.checkpoint fixes the model's shape "
                      f"({key} {shape[key]}); only model.dropout and model.activation_checkpointing apply")


def prepare_finetune(cfg: Config) -> tuple[Config, object, int, Path]:
    """Everything the driver checks before a worker starts: (config, model shape, vocabulary, tokenizer)."""
    from mtnlg_ray.tokenizer import load_tokenizer
    from mtnlg_ray.train.loop import model_config_for

    cfg = _resolve(cfg)
    tokenizer_file = _tokenizer(cfg)
    vocab = load_tokenizer(tokenizer_file).get_vocab_size()
    model_config, _ = model_config_for(cfg, vocab)
    _warn_about_shape_keys(cfg, model_config)
    if model_config.vocab_size < vocab:
        raise CheckpointError(f"{cfg.init.checkpoint}: {model_config.vocab_size} embeddings for a tokenizer of "
                              f"{vocab} tokens (a checkpoint of another vocabulary)")
    if cfg.task.mode == "lora" and cfg.parallel.tp > 1:
        raise ConfigError("task.mode=lora works with parallel.tp=1 (the adapters are not split across ranks); "
                          f"got parallel.tp={cfg.parallel.tp}")
    cfg, epoch_tokens, examples = _check_task(cfg, tokenizer_file, model_config.seq_len)
    return _default_schedule(cfg, epoch_tokens, examples), model_config, vocab, tokenizer_file


def finetune(cfg: Config, on_record: Callable[[dict], None] | None = None) -> dict:
    """Fine-tune on Ray Train; returns the run summary with the best dev metrics and the final checkpoint."""
    from mtnlg_ray.train.trainer import run_training

    cfg, model_config, vocab, tokenizer_file = prepare_finetune(cfg)
    result = run_training("finetune", cfg.task.kind, cfg, model_config, vocab, tokenizer_file, on_record)
    # The whole run's records: a re-run of a finished (or resumed) run saw only its last steps.
    records = [json.loads(line) for line in (Path(result["run_dir"]) / "metrics.jsonl").read_text().splitlines()
               if line.strip()]
    dev = [r["dev"] for r in records if "dev" in r]
    best = [r for r in records if r.get("best")]
    summary = {k: v for k, v in result.items() if k != "records"}
    summary.update(task=cfg.task.kind, metric=cfg.task.dev_metric, labels=cfg.task.labels,
                   dev=best[-1]["dev"] if best else (dev[-1] if dev else None), dev_history=dev)
    publish_file(Path(result["run_dir"]) / "finetune_summary.json", json.dumps(summary, indent=2) + "\n")
    return summary
