"""Configuration for every stage: pydantic models, shipped YAML defaults, and `--set a.b=c` overrides.

Config flows one way: a YAML file (or the stage's shipped default) plus overrides becomes a
validated `Config`, which the stage function receives. Unknown keys and bad values raise
`ConfigError` with one line that names the key and what was expected.
"""

from __future__ import annotations

import copy
import difflib
from importlib import resources
import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mtnlg_ray.errors import ConfigError
from mtnlg_ray.model.gpt import GPTConfig, pad_vocab
from mtnlg_ray.model.presets import PRESETS, PRETRAIN_LR, get_preset


LOCAL_PATH = "local-path"  # field metadata: the value is a local path (or a list of them) on the user's machine
# Declared here once; `absolute_paths` makes every such field absolute (submit, the trainers, self-training).
PathStr = Annotated[str, LOCAL_PATH]
OptionalPath = Annotated[str | None, LOCAL_PATH]
PathList = Annotated[list[str], LOCAL_PATH]


def absolute_path(value: str, cwd: str | Path | None = None) -> str:
    """A local path or glob made absolute against `cwd` (default: here); URIs and builtin: inputs are kept."""
    if not value or "://" in value or value.startswith("builtin:"):
        return value
    expanded = os.path.expanduser(value)
    if os.path.isabs(expanded):
        return os.path.normpath(expanded)
    return os.path.normpath(os.path.join(Path.cwd() if cwd is None else cwd, expanded))


def absolute_paths(config: BaseModel, cwd: str | Path | None = None) -> BaseModel:
    """A copy of `config` whose path fields (declared `PathStr` / `OptionalPath` / `PathList`) are absolute:
    Ray workers and jobs do not run in the directory the user gave them in."""
    updates = {}
    for name in type(config).model_fields:
        section = getattr(config, name)
        if not isinstance(section, BaseModel):
            continue
        changes: dict[str, Any] = {}
        for field, info in type(section).model_fields.items():
            if LOCAL_PATH not in info.metadata:
                continue
            value = getattr(section, field)
            if isinstance(value, str):
                changes[field] = absolute_path(value, cwd)
            elif isinstance(value, list):
                changes[field] = [absolute_path(v, cwd) if isinstance(v, str) else v for v in value]
        if isinstance(section, ReadSection) and section.weights:
            # Weights are keyed by INPUT as given, and the INPUTs are made absolute the same way.
            changes["weights"] = {absolute_path(k, cwd): w for k, w in section.weights.items()}
        # Only what changes: a section rewritten as it was (an empty decontam.eval_files) counted as set,
        # and a submitted job's config then held it.
        changes = {field: value for field, value in changes.items() if value != getattr(section, field)}
        if changes:
            updates[name] = section.model_copy(update=changes)
    return config.model_copy(update=updates)


class Section(BaseModel):
    # A number must be finite (`train.lr=.inf` trained on NaN, and the job reported success), and YAML's
    # true / false is not one (`train.max_steps=true` ran one step).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_a_number(cls, value: Any, info) -> Any:
        # Inside a list or mapping too: `parallel.workers=[true, 4]` asked for 1 to 4 workers.
        if _holds_bool(value):
            kinds = _leaf_types(cls.model_fields[info.field_name].annotation)
            if kinds & {int, float} and bool not in kinds:
                raise ValueError("expected a number, not true / false")
        return value


def _holds_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return True
    if isinstance(value, dict):
        return any(_holds_bool(k) or _holds_bool(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return any(_holds_bool(v) for v in value)
    return False


def _leaf_types(annotation: Any) -> set[Any]:
    """The plain types an annotation is built from: int | tuple[int, int] → {int, NoneType}."""
    args = get_args(annotation)
    if not args:
        return {annotation}
    return set().union(*(_leaf_types(arg) for arg in args if arg is not Ellipsis))


class ModelSection(Section):
    preset: str = "tiny"
    n_layer: int | None = Field(None, ge=1)
    n_head: int | None = Field(None, ge=1)
    d_model: int | None = Field(None, ge=1)
    seq_len: int | None = Field(None, ge=1)
    vocab_size: int | None = Field(None, ge=1)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    activation_checkpointing: bool = False

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, value: str) -> str:
        if value not in PRESETS:
            raise ValueError(f"expected one of {', '.join(PRESETS)}")
        return value

    def resolve(self, tokenizer_vocab: int | None = None) -> GPTConfig:
        """The preset with explicit keys laid over it; a tokenizer's vocabulary (padded) wins over both."""
        shape = get_preset(self.preset).to_dict()
        for key in ("n_layer", "n_head", "d_model", "seq_len", "vocab_size"):
            if getattr(self, key) is not None:
                shape[key] = getattr(self, key)
        if tokenizer_vocab is not None:
            shape["vocab_size"] = pad_vocab(tokenizer_vocab)
        shape["dropout"] = self.dropout
        shape["activation_checkpointing"] = self.activation_checkpointing
        return GPTConfig(**shape)


def _no_uri(value: str | None) -> str | None:
    """A path the trainers open as a file: a URI would become a local folder named `s3:`."""
    if value and "://" in value:
        raise ValueError("expected a local or mounted path (e.g. /mnt/bucket/...), not a URI")
    return value


class DataSection(Section):
    path: OptionalPath = None
    train: OptionalPath = None
    dev: OptionalPath = None
    text_field: str = "text"
    label_field: str = "label"

    _local = field_validator("path", "train", "dev")(_no_uri)


class TokenizerSection(Section):
    path: OptionalPath = None
    # At least 256 bytes, <|endoftext|> and one merge; at most what the trainer can reserve room for
    # (tokenizer.MIN_VOCAB_SIZE, MAX_VOCAB_SIZE).
    vocab_size: int = Field(8192, ge=258, le=2**20)


class PackSection(Section):
    seq_len: int = Field(128, ge=1)  # each packed sequence holds seq_len + 1 tokens (inputs and shifted targets)
    val_fraction: float = Field(0.01, ge=0.0, le=0.5)  # held out as every round(1 / val_fraction)-th sequence
    shard_sequences: int = Field(4096, ge=1)  # sequences per tokens/*.npy shard
    seed: int = Field(0, ge=0)  # numpy's generators take no negative seed


LABELERS = ("quality", "perplexity", "classifier")


def count_or_range(value: Any, handler) -> Any:
    """A wrap validator's body for a size that is N or [min, max] (parallel.workers, label.actors).
    `[1,2,3]` was "parallel.workers.int: Input should be a valid integer" (one error per union member,
    named after pydantic's) and `label.actors=[1]` "label.actors.1: Field required": none said what a
    range is. What pydantic takes (4.0, "4") still passes; the checks' own messages (true / false,
    min <= max) stay."""
    try:
        return handler(value)
    except ValidationError as error:
        if any(e["type"] == "value_error" for e in error.errors()):
            raise
        raise ValueError("expected a positive integer or [min, max]") from None


class LabelSection(Section):
    labeler: Literal[LABELERS] | None = None
    model: OptionalPath = None
    # quality: documents under `threshold` are dropped ("threshold") or kept with GPT-3's Pareto
    # sampling (keep when pareto(alpha) > 1 - quality); classifier: predictions under it are not labels.
    threshold: float = Field(0.5, ge=0.0, le=1.0)
    filter: Literal["none", "threshold", "pareto"] = "threshold"
    pareto_alpha: float = Field(9.0, gt=0.0)
    # perplexity: drop documents above this percentile of ppl (CCNet-style head/middle/tail cut).
    ppl_max_percentile: float | None = Field(None, gt=0.0, le=100.0)
    actors: tuple[int, int] = (1, 1)
    num_gpus: float = Field(0.0, ge=0.0)  # per labelling actor; the model runs on CUDA when it gets one
    # Nodes will come (KubeRay's autoscaler, a GPU group at 0 pods): a pool the cluster cannot hold yet
    # waits for them, where it is refused otherwise. A cluster-launcher cluster is found without it.
    autoscaling: bool = False
    # CPU threads of each perplexity / classifier actor's forward passes. None: one, as Ray gives a
    # 1-CPU actor. 2 on a 2-core machine where labelling is the only work labels twice as fast.
    threads: int | None = Field(None, ge=1)
    # Documents per labeller call, and so per actor task. None: the labeller's own `batch_size`
    # (quality 4096: ~0.2 ms a document, so small batches would be mostly Ray's per-task cost;
    # perplexity and classifier 64, which batch their forward passes by tokens inside).
    batch_size: int | None = Field(None, ge=1)
    seed: int = Field(0, ge=0)  # numpy's generators take no negative seed

    @model_validator(mode="after")
    def _filters_fit(self) -> "LabelSection":
        # A filter of another labeller did nothing without a word (ppl_max_percentile with quality, say).
        if self.ppl_max_percentile is not None and self.labeler != "perplexity":
            raise ValueError(f"label.ppl_max_percentile applies to label.labeler=perplexity, not {self.labeler}")
        if self.filter != "threshold" and self.labeler != "quality":
            raise ValueError(f"label.filter={self.filter} applies to label.labeler=quality, not {self.labeler}")
        return self

    @field_validator("actors", mode="wrap")
    @classmethod
    def _one_size(cls, value: Any, handler) -> Any:
        # `label.actors=2` is a pool of 2 (it was "Input should be a valid tuple")
        return count_or_range(value if not isinstance(value, int) or isinstance(value, bool) else (value, value),
                              handler)

    @field_validator("actors")
    @classmethod
    def _ordered(cls, value: tuple[int, int]) -> tuple[int, int]:
        if not 1 <= value[0] <= value[1]:
            raise ValueError("expected [min, max] with 1 <= min <= max")
        return value


class ReadSection(Section):
    # A .txt file is one document, one per paragraph, or one per non-empty line.
    txt_mode: Literal["file", "paragraph", "line"] = "file"
    max_chars: int = Field(1_000_000, ge=1)  # longer records are rejected ("oversized")
    # In file mode a .txt over max_chars is cut, at paragraphs (else lines), into documents of at
    # most this many characters: well under clean.max_words (100,000 words is ~550,000 characters).
    piece_chars: int = Field(100_000, ge=1)
    # A local .txt larger than this is read by several tasks, one block each (cut at paragraph, else
    # line, boundaries), so no task and not the driver ever holds the whole file.
    block_bytes: int = Field(64 * 2**20, ge=1024)
    # The JSONL field (Parquet column) holding each document's URL, for filter.url_blocklist.
    url_field: str | None = None
    weights: dict[str, float] = {}  # INPUT as given → blend weight (MT-NLG mixes sources by weight)

    @field_validator("weights")
    @classmethod
    def _non_negative(cls, value: dict[str, float]) -> dict[str, float]:
        bad = [k for k, w in value.items() if w < 0]
        if bad:
            raise ValueError(f"weight of '{bad[0]}' must be >= 0")
        return value


class CleanSection(Section):
    """Gopher / C4-style heuristics; each failed check is a rejection reason of its own."""

    enabled: bool = True
    min_words: int = Field(5, ge=0)
    max_words: int = Field(100_000, ge=1)
    min_mean_word_length: float = Field(2.0, ge=0.0)
    max_mean_word_length: float = Field(12.0, gt=0.0)
    max_symbol_ratio: float = Field(0.1, ge=0.0)  # '#' and '...' per word
    max_ellipsis_lines: float = Field(0.3, ge=0.0, le=1.0)  # fraction of lines ending in an ellipsis
    max_duplicate_lines: float = Field(0.3, ge=0.0, le=1.0)  # fraction of lines that repeat an earlier one
    # Character share of the most frequent word n-gram, for n = 2, 3, 4 (Gopher's values).
    max_top_ngram: dict[int, float] = {2: 0.20, 3: 0.18, 4: 0.16}
    # Character share of words inside repeated n-grams, for n = 5 ... 10 (Gopher's values).
    max_duplicate_ngram: dict[int, float] = {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}


class DecontamSection(Section):
    """Remove evaluation text from training data, as GPT-3 / MT-NLG did."""

    eval_files: PathList = []  # INPUTs holding the evaluation sets
    text_field: str = "text"  # the text of each .jsonl / .parquet evaluation record
    # How a .txt evaluation file is read: one item a line (as benchmarks list questions); paragraph or
    # file for prose wrapped over lines, whose 13-grams run across them.
    txt_mode: Literal["file", "paragraph", "line"] = "line"
    ngram: int = Field(13, ge=1)  # word n-grams that count as a match
    min_words: int = Field(8, ge=1)  # a shorter evaluation item matches whole from this many words
    window: int = Field(200, ge=0)  # characters cut on each side of a match
    min_fragment: int = Field(200, ge=0)  # pieces shorter than this are dropped
    max_splits: int = Field(10, ge=0)  # a document cut into more pieces than this is dropped


class LangSection(Section):
    """Language identification (langid.py, offline): keep only these ISO 639-1 codes; null keeps all."""

    keep: list[str] | None = None
    min_confidence: float = Field(0.5, ge=0.0, le=1.0)

    @field_validator("keep", mode="before")
    @classmethod
    def _lower_case(cls, value: Any) -> Any:
        # ISO 639-1 codes read the same in either case: `lang.keep=[EN]` was refused as unknown
        return [x.strip().lower() if isinstance(x, str) else x for x in value] if isinstance(value, list) else value


class PiiSection(Section):
    # Replace e-mail addresses, phone numbers, IP addresses and card numbers by <EMAIL>, <PHONE>, <IP>, <CARD>.
    redact: bool = False


class FilterSection(Section):
    # A file of domains, one a line ('#' comments); documents whose read.url_field is on one of them,
    # or on a subdomain of one, are rejected ("url_blocklist").
    url_blocklist: OptionalPath = None


class DedupSection(Section):
    # CCNet's boilerplate removal: a line found in at least line_min_docs documents is removed from
    # all of them; a document left under clean.min_words words is rejected ("short_after_line_dedup").
    lines: bool = False
    line_min_docs: int = Field(3, ge=2)
    exact: bool = True
    fuzzy: bool = True
    threshold: float = Field(0.8, gt=0.0, le=1.0)
    # A candidate pair counts unless its signature estimate of Jaccard is more than this below
    # `threshold`: 0.05 is two standard errors of a 260-value estimate at 0.8, so true pairs just
    # above the threshold are not lost to estimation noise (pairs a little below it may go too).
    verify_margin: float = Field(0.05, ge=0.0, lt=1.0)
    bands: int = Field(20, ge=1)
    rows: int = Field(13, ge=1)
    ngram: int = Field(5, ge=1)


class BatchRampup(Section):
    """Global batch grows from `start` by `increment` sequences, reaching the full size after `tokens`."""

    start: int = Field(32, ge=1)
    increment: int = Field(32, ge=1)
    tokens: int = Field(12_000_000_000, ge=0)


class TrainSection(Section):
    max_steps: int | None = Field(None, ge=1)
    max_tokens: int | None = Field(None, ge=1)
    micro_batch_size: int = Field(8, ge=1)
    global_batch_size: int = Field(32, ge=1)
    lr: float = Field(5e-5, gt=0.0)
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0)
    warmup_tokens: int = Field(1_000_000_000, ge=0)
    decay_tokens: int = Field(340_000_000_000, ge=1)
    batch_rampup: BatchRampup | None = None
    weight_decay: float = Field(0.1, ge=0.0)
    beta1: float = Field(0.9, ge=0.0, lt=1.0)
    beta2: float = Field(0.95, ge=0.0, lt=1.0)
    eps: float = Field(1e-8, gt=0.0)
    grad_clip: float = Field(1.0, ge=0.0)
    seed: int = Field(0, ge=0)  # numpy's generators take no negative seed
    precision: Literal["fp32", "bf16"] = "fp32"
    eval_every: int = Field(100, ge=1)
    eval_batches: int = Field(8, ge=1)  # micro-batches of the held-out split per evaluation
    # Passes over the training examples. Unset: no limit when max_steps or max_tokens ends the run
    # (`--set train.max_steps=300` runs 300 steps however small the corpus), else one pass.
    epochs: int | None = Field(None, ge=1)
    peak_tflops: float | None = Field(None, gt=0.0)  # per worker, for MFU; unset: timed in the run's precision
    compile: bool = False
    # Fine-tuning: stop after this many dev evaluations (one per epoch) without a better task.metric.
    patience: int | None = Field(None, ge=1)
    # Fine-tuning: batch texts of similar length together (less padding: an epoch of SST-2's 2-60
    # token phrases took 1.9x less step time at the same accuracy), each batch still drawn at random.
    group_by_length: bool = True

    def epoch_limit(self) -> int | None:
        """The passes over the data that end the run, or None when only max_steps / max_tokens do."""
        if self.epochs is not None:
            return self.epochs
        return None if self.max_steps is not None or self.max_tokens is not None else 1


class ParallelSection(Section):
    workers: int | tuple[int, int] = 1
    tp: int = Field(1, ge=1)
    pp: int = Field(1, ge=1)
    fsdp: bool = True
    # Megatron's sequence parallelism inside tensor parallelism (no effect at tp=1): LayerNorms and
    # dropout on T/tp positions a rank. Sequences must then split evenly (seq_len a multiple of tp).
    sequence_parallel: bool = True
    # Pipeline parallelism (pp > 1): the schedule (gpipe, 1f1b, interleaved-1f1b,
    # interleaved-zero-bubble), stages per rank for the interleaved ones, and optionally the layers
    # of each of the pp x pp_virtual stages (default: an even split).
    pp_schedule: Literal["gpipe", "1f1b", "interleaved-1f1b", "interleaved-zero-bubble"] = "1f1b"
    pp_virtual: int = Field(1, ge=1)
    pp_layers: list[int] | None = None
    use_gpu: bool = False
    # Fractions share cores: 0.5 lets 4 gloo workers train on 2 cores (tests, CPU demos).
    cpus_per_worker: float = Field(1.0, gt=0)
    # The cluster autoscales: wait for workers it cannot hold yet (saying so) instead of failing at
    # once. A cluster started by the Ray cluster launcher is taken to autoscale.
    autoscaling: bool = False

    @field_validator("workers", mode="wrap")
    @classmethod
    def _count_or_range(cls, value: Any, handler) -> Any:
        return count_or_range(value, handler)

    @field_validator("workers")
    @classmethod
    def _workers(cls, value: int | tuple[int, int]) -> int | tuple[int, int]:
        if isinstance(value, int):
            if value < 1:
                raise ValueError("expected a positive integer or [min, max]")
        elif not 1 <= value[0] <= value[1]:
            raise ValueError("expected [min, max] with 1 <= min <= max")
        return value


class CheckpointSection(Section):
    every_steps: int = Field(100, ge=1)
    keep: int = Field(2, ge=1)


class RunSection(Section):
    name: str = "run"
    storage_path: PathStr = "runs"
    max_failures: int = Field(2, ge=0)

    _local = field_validator("storage_path")(_no_uri)


class InitSection(Section):
    checkpoint: OptionalPath = None


class LoraSection(Section):
    rank: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0.0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    targets: list[str] = ["qkv", "proj"]

    @field_validator("targets")
    @classmethod
    def _known_targets(cls, targets: list[str]) -> list[str]:
        # Here, not only where a worker builds the adapters: there a bad name failed every retry of the run.
        from mtnlg_ray.model.lora import LORA_TARGETS

        if not targets or set(targets) - set(LORA_TARGETS):
            raise ValueError(f"expected a non-empty list of {', '.join(LORA_TARGETS)}")
        return targets


class TaskSection(Section):
    kind: Literal["classification", "sft"] = "classification"
    labels: list[str] | None = None  # classification; default: the labels found in data.train, sorted
    pooling: Literal["last", "mean"] = "mean"
    # full: every weight trains; lora: adapters on task.lora.targets, the rest frozen; frozen: only the head.
    mode: Literal["full", "lora", "frozen"] = "full"
    lora: LoraSection = LoraSection()
    # Classification input noise: the fraction of each training text's tokens dropped, drawn afresh
    # every step (dev and labelling read whole texts). Self-training's students take
    # selftrain.student_token_dropout instead.
    token_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    # The dev metric that picks the best checkpoint and drives early stopping: accuracy or macro_f1
    # (classification), loss or exact_match (sft). Default: accuracy, or loss for sft.
    metric: Literal["accuracy", "macro_f1", "loss", "exact_match"] | None = None
    prompt_field: str = "prompt"  # sft
    completion_field: str = "completion"  # sft

    @field_validator("labels", mode="before")
    @classmethod
    def _labels_as_text(cls, value):
        # Labels are names: `task.labels=[0,1]` means the labels "0" and "1" a TSV holds.
        if isinstance(value, list):
            return [str(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else x for x in value]
        return value

    @model_validator(mode="after")
    def _metric_fits(self) -> "TaskSection":
        allowed = {"classification": ("accuracy", "macro_f1"), "sft": ("loss", "exact_match")}[self.kind]
        if self.metric is not None and self.metric not in allowed:
            raise ValueError(f"task.metric for task.kind={self.kind} must be one of {', '.join(allowed)}")
        if self.kind == "sft" and self.mode == "frozen":
            raise ValueError("task.mode=frozen leaves nothing to train for task.kind=sft; use full or lora")
        if self.kind == "sft" and self.token_dropout > 0:
            raise ValueError("task.token_dropout drops a classification text's tokens; task.kind=sft reads "
                             "whole prompts and completions (leave it 0)")
        if self.labels is not None:
            blank = [x for x in self.labels if not x.strip()]
            if blank:
                raise ValueError(f"task.labels: {blank[0]!r} is no label name")
            twice = next((x for x in self.labels if self.labels.count(x) > 1), None)
            if twice is not None:
                raise ValueError(f"task.labels lists {twice!r} twice")
        return self

    @property
    def dev_metric(self) -> str:
        return self.metric or ("accuracy" if self.kind == "classification" else "loss")


class SelfTrainSection(Section):
    rounds: int = Field(2, ge=1)
    threshold: float = Field(0.5, ge=0.0, le=1.0)
    per_class_top_k: int | None = Field(None, ge=1)
    soft_labels: bool = False
    unlabelled: OptionalPath = None
    # Epochs of each student over labelled + pseudo-labelled data (default: train.epochs); a pool
    # much larger than the labelled set needs fewer passes than the teacher.
    student_epochs: int | None = Field(None, ge=1)
    # Noisy student: the fraction of each training text's tokens a student drops (task.token_dropout),
    # so it cannot just copy the teacher (SST-2, 1,000 labels: 0.692 dev accuracy against 0.678 without).
    student_token_dropout: float = Field(0.2, ge=0.0, lt=1.0)
    # A classification checkpoint to use as the round-0 teacher instead of fine-tuning one on data.train
    # (mixed with the n-gram classifier when `ngram_teacher` is also set).
    teacher: OptionalPath = None
    # Round 0 fits a bag-of-n-grams softmax regression on data.train (mtnlg_ray/finetune/ngram.py)
    # as the teacher instead of fine-tuning the GPT: with few labels its confident predictions are
    # more often right (SST-2, 1,000 labels: 90 % of the kept 12,000 against 82 %), and the GPT
    # student on them scores above TF-IDF + LR (0.720 against 0.708 over 3 seeds, BENCHMARKS.md).
    # With `teacher` set too, round 0 labels with the mean of both classifiers' probabilities
    # (SST-2, IMDb-pretrained fine-tune as `teacher`: 92.2 % of the kept 12,000 right against 90.0 %).
    ngram_teacher: bool = False
    # With `ngram_teacher`: the n-gram classifier stays in every later round's teacher too, which then
    # labels with the mean of its and the previous round's student's probabilities (a student alone
    # as teacher hands on the errors it learned; SST-2, 3 seeds: round-2 students 0.766 against round 1's 0.758).
    ngram_every_round: bool = False


class Config(Section):
    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    tokenizer: TokenizerSection = TokenizerSection()
    pack: PackSection = PackSection()
    read: ReadSection = ReadSection()
    lang: LangSection = LangSection()
    pii: PiiSection = PiiSection()
    filter: FilterSection = FilterSection()
    clean: CleanSection = CleanSection()
    label: LabelSection = LabelSection()
    dedup: DedupSection = DedupSection()
    decontam: DecontamSection = DecontamSection()
    train: TrainSection = TrainSection()
    parallel: ParallelSection = ParallelSection()
    checkpoint: CheckpointSection = CheckpointSection()
    run: RunSection = RunSection()
    init: InitSection = InitSection()
    task: TaskSection = TaskSection()
    selftrain: SelfTrainSection = SelfTrainSection()

    @model_validator(mode="after")
    def _batch_divides(self) -> "Config":
        if self.train.global_batch_size % self.train.micro_batch_size:
            raise ValueError(
                f"train.global_batch_size ({self.train.global_batch_size}) must be a multiple of "
                f"train.micro_batch_size ({self.train.micro_batch_size})"
            )
        return self


# The config stage of each stage name `submit STAGE` and `config show --stage` take: its shipped defaults
# (`shipped_config`; data label's are prepare.yaml) and the sections it reads (`STAGE_SECTIONS`).
CONFIG_STAGES = {"prepare": "prepare", "label": "label", "pretrain": "pretrain", "finetune": "finetune",
                 "self-train": "selftrain"}

# The sections each stage's code reads (data label reads a part of prepare's). `config show` prints
# these only, and a key set in another one is warned about: `pretrain --set dedup.fuzzy=false` and
# pretrain.yaml's own `tokenizer.path` did nothing without a word.
_FINETUNE_SECTIONS = ("model", "init", "data", "tokenizer", "task", "train", "parallel", "checkpoint", "run")
STAGE_SECTIONS = {
    "prepare": ("data", "read", "lang", "pii", "filter", "clean", "dedup", "label", "decontam", "tokenizer", "pack"),
    "label": ("data", "read", "label", "tokenizer"),  # its defaults are prepare.yaml's
    "pretrain": ("model", "init", "data", "train", "parallel", "checkpoint", "run"),
    "finetune": _FINETUNE_SECTIONS,
    "selftrain": (*_FINETUNE_SECTIONS, "selftrain", "label", "read"),  # each round labels the pool
}
_STAGE_COMMANDS = {"prepare": "data prepare", "label": "data label", "pretrain": "pretrain", "finetune": "finetune",
                   "selftrain": "self-train"}
# Keys of a section the stage reads that it leaves alone or sets itself, with why: self-training labels
# each round with its teacher, through the classifier labeller, at selftrain.threshold; pretraining
# keeps no best checkpoint and batches fixed-length sequences; fine-tuning scores the whole dev set.
_FINETUNE_UNUSED = {key: "does not use train.{} (pretraining's held-out sample; fine-tuning scores the whole dev "
                         "set at the end of each epoch)".format(key.split(".")[1])
                    for key in ("train.eval_every", "train.eval_batches")}
UNUSED_KEYS = {
    "selftrain": {"label.labeler": "sets label.labeler itself (to the classifier labeller)",
                  "label.model": "sets label.model itself (to each round's teacher)",
                  "label.threshold": "sets label.threshold itself (to selftrain.threshold)", **_FINETUNE_UNUSED},
    "pretrain": {"train.patience": "does not use train.patience (fine-tuning's early stopping on dev)",
                 "train.group_by_length": "does not use train.group_by_length (its sequences are all one length)"},
    "finetune": _FINETUNE_UNUSED,
}


def _warn_unread(stage: str, source: Path, file_data: Any, config: "Config",
                 overrides: list[str] | tuple[str, ...]) -> None:
    """One warning line on stderr for each --set of a section (or key) that `stage` never reads or uses,
    naming the commands that do, and for each such section or key the user's file gives a value other
    than the default (a file `config show` saved, or a job's, holds defaults: no warning)."""
    import sys

    if stage not in STAGE_SECTIONS:
        return
    reads = STAGE_SECTIONS[stage]
    unused = UNUSED_KEYS.get(stage, {})

    def readers(section: str) -> str:
        names = [_STAGE_COMMANDS[s] for s, sections in STAGE_SECTIONS.items() if section in sections]
        return f" ({' and '.join(names)} {'does' if len(names) == 1 else 'do'})" if names else ""

    command = _STAGE_COMMANDS[stage]
    sections = set(Config.model_fields)
    if isinstance(file_data, dict):  # a user's file (None: the shipped one)
        for section in [key for key in file_data if key in sections and key not in reads]:
            if getattr(config, section).model_dump() != Config.model_fields[section].default.model_dump():
                print(f"warning: {source}: {command} does not read its section '{section}'{readers(section)}; "
                      "it has no effect here", file=sys.stderr)
        for key in unused:
            section, _, name = key.partition(".")
            given = file_data.get(section)
            default = type(getattr(config, section)).model_fields[name].default
            if isinstance(given, dict) and name in given and getattr(getattr(config, section), name) != default:
                print(f"warning: {source}: {command} {unused[key]}; it has no effect here", file=sys.stderr)
    for override in overrides:
        key = override.partition("=")[0].strip()
        section = key.split(".")[0]
        if section in sections and section not in reads:
            print(f"warning: --set {override}: {command} does not read {section}.*{readers(section)}; it has "
                  "no effect here", file=sys.stderr)
        elif key in unused:
            print(f"warning: --set {override}: {command} {unused[key]}; it has no effect here", file=sys.stderr)


def set_text(key: str, value) -> str:
    """`key=value` as a `--set`, the value quoted so YAML reads it as text ("my work #1" is no comment)."""
    return f"{key}={json.dumps(str(value))}"


def label_overrides(labeler, model) -> list[str]:
    """`data label`'s --labeler and --model as the `--set`s it lays over its config. A --labeler the
    config would refuse is blamed on --labeler, not on a `--set` the user never typed."""
    if labeler not in LABELERS:
        raise ConfigError(f"--labeler: expected {', '.join(LABELERS[:-1])} or {LABELERS[-1]}, got {labeler!r}")
    return [set_text("label.labeler", labeler), set_text("label.model", model)]


def shipped_config(stage: str) -> Path:
    """The YAML file for `stage` that ships inside the package (`mtnlg_ray/configs/<stage>.yaml`;
    `data label` starts from prepare.yaml)."""
    name = "prepare" if stage == "label" else stage
    path = Path(str(resources.files("mtnlg_ray") / "configs" / f"{name}.yaml"))
    if not path.is_file():
        raise ConfigError(f"no shipped config for stage '{stage}'")
    return path


_YAML11_TAGS = {"tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"}


class _Loader(yaml.SafeLoader):
    """YAML as a reader of YAML 1.2 reads it. PyYAML follows YAML 1.1, where `no` is false (Norway's
    code in `lang.keep=[en,no]`), `010` is octal 8, `1:30` is 90 and `1e9` is a string; here those
    are the string, 10, the string and a number. A key twice in one mapping is an error, where YAML
    1.1 keeps the last silently (a second `train:` section dropped the first one's keys)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(f"{self.name}:{key_node.start_mark.line + 1}: key {key!r} appears twice "
                                  f"(first on line {seen[key] + 1})")
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in _YAML11_TAGS]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
for _tag, _pattern, _firsts in (
    ("tag:yaml.org,2002:bool", r"^(?:true|True|TRUE|false|False|FALSE)$", "tTfF"),
    ("tag:yaml.org,2002:int", r"^(?:[-+]?[0-9][0-9_]*|0x[0-9a-fA-F_]+)$", "-+0123456789"),
    ("tag:yaml.org,2002:float",
     r"^(?:[-+]?(?:\.[0-9]+|[0-9][0-9_]*(?:\.[0-9_]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$",
     "-+0123456789."),
):
    _Loader.add_implicit_resolver(_tag, re.compile(_pattern), list(_firsts))


def _decimal_int(loader: yaml.SafeLoader, node) -> int:
    value = loader.construct_scalar(node).replace("_", "")  # 1_000_000 as YAML 1.1 allowed it
    return int(value, 16) if value.lower().startswith("0x") else int(value)  # "010" is ten, not octal 8


_Loader.add_constructor("tag:yaml.org,2002:int", _decimal_int)


def _yaml(text: str, name: str = "<--set>") -> Any:
    loader = _Loader(text)
    loader.name = name
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _read_yaml(path: Path) -> dict[str, Any]:
    if path.is_dir():
        raise ConfigError(f"{path}: a folder, not a YAML config file")
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = _yaml(path.read_text(encoding="utf-8"), str(path))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise ConfigError(f"{where}: not valid YAML ({getattr(exc, 'problem', None) or exc})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level, got {type(data).__name__}")
    return data


def _seed_mapping_default(data: dict[str, Any], parts: list[str]) -> None:
    """Before `--set a.b.c=v` sets one key of a mapping-valued field a.b that `data` does not spell
    out, give a.b its default mappings: the override then changes that one key. (It used to replace
    the whole default: `--set clean.max_top_ngram.2=0.25` left no check for 3- and 4-grams.)"""
    model: type[BaseModel] | None = Config
    node = data
    for part in parts[:-1]:
        field = model.model_fields.get(part) if model is not None else None
        if field is None or not isinstance(node, dict):
            return
        section = _section_type(field)
        if section is None:
            default = field.get_default(call_default_factory=True)
            if node.get(part) is None and isinstance(default, dict):
                node[part] = {str(k): v for k, v in default.items()}  # as keys from --set arrive
            return
        if node.get(part) is None:
            node[part] = {}  # a section the file leaves out: its defaults come from the schema
        node, model = node[part], section


def apply_override(data: dict[str, Any], override: str) -> None:
    """Apply one `a.b=c` override in place; the value is parsed as YAML so `20`, `true`, `[1, 2]` get types."""
    key, sep, raw = override.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {override}: expected KEY=VALUE with a dotted key, e.g. train.max_steps=20")
    if not raw.strip():  # `--set train.max_steps=$STEPS` with STEPS unset was null: an unbounded run
        raise ConfigError(f"--set {override}: no value after '='; write {key}=null to clear the key")
    try:
        value = _yaml(raw)
    except (yaml.YAMLError, ConfigError):
        value = raw
    if " #" in raw and (value is None or (isinstance(value, str) and "#" not in value)):
        value = raw.strip()  # YAML read the rest as a comment: `run.name=exp #3` is "exp #3", not "exp"
    parts = key.split(".")
    _seed_mapping_default(data, parts)
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"--set {override}: '{part}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def _first_error(exc: ValidationError, source: str) -> ConfigError:
    err = exc.errors()[0]
    key = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        section = _section_of(err["loc"])
        if section is None:
            return ConfigError(f"{source}: unknown key '{key}'")
        # The near miss first (`train.warmup` for warmup_tokens, `train.max_step`), then every key.
        name = str(err["loc"][-1])
        near = difflib.get_close_matches(name, section.model_fields, n=1, cutoff=0.6)
        if not near and len(name) >= 3:  # `train.warm`: the one key it begins, if only one
            near = [field for field in section.model_fields if field.startswith(name)]
            near = near if len(near) == 1 else []
        meant = f"did you mean '{'.'.join([*map(str, err['loc'][:-1]), near[0]])}'? " if near else ""
        return ConfigError(f"{source}: unknown key '{key}' ({meant}expected one of {', '.join(section.model_fields)})")
    if err["type"] == "model_type" and _section_type(_field_at(err["loc"])) is not None:  # `--set train=5`
        example = f"{key}.KEY=VALUE" if source.startswith("--set") else f"{key}: {{KEY: VALUE}}"
        return ConfigError(f"{source}: {key} is a section, not a value: set its keys, e.g. {example}")
    message = err["msg"].removeprefix("Value error, ")
    if key and err["type"] == "value_error" and len(err["loc"]) == 1:
        return ConfigError(f"{source}: {message}")  # a check across a section's keys, which it names
    if key:
        return ConfigError(f"{source}: {key}: {message} (got {err.get('input')!r})")
    return ConfigError(f"{source}: {message}")


def _field_at(loc: tuple):
    """The model field at `loc` (None when a part of it is no section's field)."""
    model: type[BaseModel] | None = _section_of(loc)
    return None if model is None else model.model_fields.get(str(loc[-1]))


def _section_of(loc: tuple) -> type[BaseModel] | None:
    """The model class that holds the key at `loc` (for listing the keys it does accept)."""
    model: type[BaseModel] = Config
    for part in loc[:-1]:
        model = _section_type(model.model_fields.get(str(part)))
        if model is None:
            return None
    return model


def _section_type(field) -> type[BaseModel] | None:
    """The section class a field holds (itself, or one of a union's members), or None for a value."""
    annotation = getattr(field, "annotation", None)
    candidates = [annotation, *getattr(annotation, "__args__", ())]
    return next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), stage: str = "pretrain") -> Config:
    """YAML file (or the stage's shipped default when `path` is None) plus `--set` overrides → `Config`."""
    source = Path(path) if path is not None else shipped_config(stage)
    data = _read_yaml(source)
    file_data = copy.deepcopy(data) if path is not None else None  # what the user's file gives, before the overrides
    for override in overrides:
        apply_override(data, override)
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        loc = ".".join(str(p) for p in exc.errors()[0]["loc"])
        # Blame the override that set this key when there is one (for a check across keys, such as
        # train's batch sizes, one that set a key the message names), else the file.
        keys = [o.partition("=")[0].strip() for o in overrides]
        message = exc.errors()[0]["msg"]
        # The key, a part below it (a check inside a mapping it set), or a part above it: a misspelt
        # section (`tran.lr`) is reported at `tran`, and used to be blamed on the shipped file.
        at_or_below = [o for o, key in zip(overrides, keys) if loc and (loc == key or loc.startswith(key + "."))]
        above = [o for o, key in zip(overrides, keys) if loc and key.startswith(loc + ".")]
        # A check across a section's keys is at the section: of its overrides, the one whose key the
        # message names first (the key it is about; a key it names after that says what would fit).
        named = sorted((message.index(key), -i) for i, key in enumerate(keys) if key and key in message)
        named_overrides = [overrides[-negative] for _, negative in named]  # a key set twice: the --set that held
        first_error = exc.errors()[0]
        if path is not None and first_error["type"] == "value_error" and len(first_error["loc"]) == 1:
            # With the user's own file, a section's check blames an override only if it names its key:
            # the file's sft + frozen task was blamed on a `--set task.labels=...` beside it.
            above = [o for o in above if o in named_overrides]
        blamed = at_or_below + above
        first = [o for o in named_overrides if o in blamed][:1] or blamed[-1:] or named_overrides[:1]
        raise _first_error(exc, f"--set {first[0]}" if first else str(source)) from None
    lora = next((o for o in reversed(overrides) if o.partition("=")[0].strip().startswith("task.lora.")), None)
    if lora is not None and config.task.mode != "lora":
        # `--set task.lora.rank=16` alone ran a full fine-tune without a word (a file's task.lora block
        # beside mode full is left alone: an A/B of the two keeps it)
        raise ConfigError(f"--set {lora}: task.mode is {config.task.mode}, so no LoRA adapter trains; add "
                          "--set task.mode=lora")
    _warn_unread(stage, source, file_data, config, overrides)
    return with_preset_lr(config) if stage == "pretrain" else config


def with_preset_lr(config: Config) -> Config:
    """Pretraining with no `train.lr` given trains at its preset's LR (`PRETRAIN_LR`: GPT-3's per size).

    The LR stays unset (out of `model_fields_set`), as a derived value: a submitted job's config, which
    carries what was set, lets the cluster derive it again, and `config show` prints it as derived."""
    if "lr" in config.train.model_fields_set:  # PRETRAIN_LR names every preset model.preset accepts
        return config
    train = type(config.train).model_construct(_fields_set=set(config.train.model_fields_set),
                                               **{**dict(config.train), "lr": PRETRAIN_LR[config.model.preset]})
    return config.model_copy(update={"train": train})
