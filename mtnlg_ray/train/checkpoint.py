"""Sharded training checkpoints (DCP) and their bookkeeping.

Each checkpoint directory holds the DCP shards of model and optimizer (every rank writes its own,
so a checkpoint written at one world size loads at another), `trainer_state.json` (step, tokens,
data cursor), `rng-rank<N>.json` (each rank's RNG state) and `model.json` (the model shape).
"""

from __future__ import annotations

import io
import json
import pickle
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader, HuggingFaceStorageReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.tensor import DTensor
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from mtnlg_ray.checkpoint import nonfinite_error, stored_shapes
from mtnlg_ray.errors import CheckpointError, ConfigError
from mtnlg_ray.model.gpt import GPTConfig

STATE_FILE = "trainer_state.json"
MODEL_FILE = "model.json"


@dataclass
class TrainerState:
    step: int = 0
    tokens: int = 0  # tokens consumed, the clock of the LR schedule and the batch ramp-up
    cursor: int = 0  # sequences consumed: the position in the seeded global order
    world_size: int = 1
    dp: int = 1
    tp: int = 1
    pp: int = 1
    best_metric: float | None = None  # fine-tuning: the best dev score so far (task.metric)
    stale_evals: int = 0  # fine-tuning: dev evaluations since the best one (early stopping)
    # The LR schedule the run trains with: a re-run resumes with it, though a default computed again
    # at another worker count would differ (`recorded_schedule`).
    warmup_tokens: int | None = None
    decay_tokens: int | None = None
    # Fine-tuning: the SHA-256 of data.train, so a re-run on other data is refused, not resumed mid-way.
    train_data: str | None = None
    # Fine-tuning: the task settings that make the model it trains (`task_setup`), so a re-run with
    # another task.mode or pooling is refused, not resumed into a model the checkpoint is not.
    task_setup: dict | None = None


def recorded_schedule(run_dir: Path) -> dict:
    """{"warmup_tokens", "decay_tokens"} as the run's newest complete checkpoint recorded them; {} for
    a new run (or one whose checkpoints predate the record)."""
    newest = latest_checkpoint(run_dir)
    if newest is None:
        return {}
    state = json.loads((newest / STATE_FILE).read_text())
    return {key: state[key] for key in ("warmup_tokens", "decay_tokens") if state.get(key) is not None}


# (module, name) of everything DCP's metadata pickle is made of, by exact name.
_METADATA_CLASSES = frozenset({
    *(("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
        "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
    # storage_meta.checkpoint_id: Python 3.13 pickles a path from pathlib._local
    *((module, name) for module in ("pathlib", "pathlib._local")
      for name in ("PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath")),
})


class _MetadataUnpickler(pickle.Unpickler):
    """DCP's `.metadata` is a pickle: read it with only the classes DCP's own metadata is made of, so a
    planted file in a run directory cannot run code when a run resumes. Each allowed name is a class
    or constant by its exact name; a dotted name (which pickle resolves attribute by attribute, e.g.
    `os.system` through a module that imports os) is never one."""

    def find_class(self, module: str, name: str) -> Any:
        torch_constant = module == "torch" and "." not in name and isinstance(
            getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format))
        if (module, name) in _METADATA_CLASSES or torch_constant:
            return super().find_class(module, name)
        raise ForeignPickle(f"{module}.{name} is not part of a DCP checkpoint's metadata")


class ForeignPickle(pickle.UnpicklingError):
    """A checkpoint's metadata names something DCP's metadata is not made of: not a truncated file."""


class SafeReader(FileSystemReader):
    """DCP's file reader, its metadata read by `_MetadataUnpickler` instead of a plain `pickle.load`."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        with self.fs.create_stream(self._get_metadata_path(kwargs.get("rank")), "rb") as metadata_file:
            metadata = _MetadataUnpickler(metadata_file).load()
        if not isinstance(metadata, Metadata):
            raise pickle.UnpicklingError(f"expected DCP metadata, got {type(metadata).__name__}")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's load planner, its non-tensor values (the optimizer's lr, betas, ...) read with
    `torch.load(weights_only=True)`: DCP's own planner unpickles them with code execution allowed."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        loaded = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._traverse import set_element

            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded


# Optimizer state keyed by parameter name ("state.blocks.3.mlp.fc1.weight.exp_avg"), not by position
# in a param group: so the parts of a pipeline stage each save their own, and a checkpoint written
# at one layout (one part a rank, or several) loads at any other.
_FLAT = StateDictOptions(flatten_optimizer_state_dict=True)


def _bundle(parts: list, optimizers: list) -> tuple[dict, list[tuple[set, set]]]:
    """Every part's model and optimizer state in one dict for DCP, and which keys are whose."""
    model_state, optim_state, owners = {}, {}, []
    for part, optimizer in zip(parts, optimizers):
        part_model, part_optim = get_state_dict(part, optimizers=optimizer, options=_FLAT)
        model_state.update(part_model)
        optim_state.update(part_optim)
        owners.append((set(part_model), set(part_optim)))
    return {"model": model_state, "optim": optim_state}, owners


def save_sharded(directory: Path, parts: list, optimizers: list, state: TrainerState, config: GPTConfig,
                 rank: int) -> None:
    """Write this rank's shards of its model parts (one, or a pipeline rank's stages) and their
    optimizers (a collective: every rank calls it with its own directory)."""
    directory.mkdir(parents=True, exist_ok=True)
    bundle, _ = _bundle(parts, optimizers)
    dcp.save(bundle, checkpoint_id=str(directory))
    rng = {"torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state().tolist()  # this rank's device's generator (dropout on GPU)
    (directory / f"rng-rank{rank}.json").write_text(json.dumps(rng))
    if rank == 0:
        (directory / STATE_FILE).write_text(json.dumps(asdict(state), indent=2) + "\n")
        (directory / MODEL_FILE).write_text(json.dumps(config.to_dict(), indent=2) + "\n")


# What a run may change when it resumes: how it trains the model, not the model's shape.
RUN_CHOICES = ("dropout", "activation_checkpointing")


def file_digest(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, read in 1 MiB blocks."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_digest(path: str | Path, blocks: int = 16, block: int = 1 << 20, per_tensor: int = 4096) -> str:
    """The SHA-256 of a safetensors file's header, the first 4 KiB of every tensor and `blocks` evenly
    spaced 1 MiB blocks (all of a file up to 16 MiB): weights trained again differ there, a classifier
    whose head alone was trained again too, and a checkpoint of hundreds of GB is not read whole."""
    import hashlib
    import struct

    size = Path(path).stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as fh:
        if size <= blocks * block:
            digest.update(fh.read())
            return digest.hexdigest()
        (length,) = struct.unpack("<Q", fh.read(8))
        header = fh.read(length)
        digest.update(header)
        tensors = json.loads(header)
        for name in sorted(k for k in tensors if k != "__metadata__"):
            begin, stop = tensors[name]["data_offsets"]
            fh.seek(8 + length + begin)
            digest.update(fh.read(min(per_tensor, stop - begin)))
        for i in range(blocks):
            fh.seek(i * (size - block) // (blocks - 1))
            digest.update(fh.read(block))
    return digest.hexdigest()


def recorded_train_data(directory: Path) -> str | None:
    """The digest of the training data a checkpoint trained on (a fine-tuning file, a pretraining
    dataset's token index; None before it was recorded)."""
    return json.loads((directory / STATE_FILE).read_text()).get("train_data")


def check_resume_data(directory: Path, train_data: str | None, path: str | None, field: str = "data.train") -> None:
    """A run resumes only on the training data it started on (`train_data`, its digest): a
    self-training student re-run after its pseudo-labels changed used to go on from the old
    student's step, or stay finished, and the report paired its score with the new labels; a
    pretraining run on a dataset prepared again would go on from its cursor into another order."""
    if train_data is None:
        return
    recorded = recorded_train_data(directory)
    if recorded is not None and recorded != train_data:
        raise ConfigError(f"{directory.parent}: the run resumes from {directory.name}, trained on another "
                          f"{field} than {path} holds now; start a new run under another run.name "
                          "(or restore the data)")


def task_setup(cfg, task: str) -> dict | None:
    """What a fine-tuning checkpoint's model is beyond its shapes: the start checkpoint's weights (a
    digest: a resume after `init.checkpoint` was trained again went on from, or reported, the model
    fine-tuned from the old weights), the task's kind, mode and pooling,
    a classifier's labels in the order of its head's outputs, and LoRA's rank, alpha and targets (None
    for pretraining); and the dev metric its best score is in (a resumed run with another compared
    its new metric with the old one's best, and a macro F1 never beat an accuracy's 0.8)."""
    if task == "lm":
        return None
    setup = {"task.kind": cfg.task.kind, "task.mode": cfg.task.mode, "task.metric": cfg.task.dev_metric}
    if cfg.init.checkpoint:  # the consolidated start checkpoint (resolved from a run's folder by then)
        from mtnlg_ray.checkpoint import WEIGHTS

        setup["init.weights"] = weights_digest(Path(cfg.init.checkpoint) / WEIGHTS)
    if cfg.task.kind == "classification":
        setup["task.pooling"] = cfg.task.pooling
        if cfg.task.labels:  # filled in from data.train before a run (`_check_task`)
            setup["task.labels"] = list(cfg.task.labels)
    if cfg.task.mode == "lora":
        lora = cfg.task.lora
        setup |= {"task.lora.rank": lora.rank, "task.lora.alpha": lora.alpha,
                  "task.lora.targets": sorted(set(lora.targets))}
    return setup


def check_resume_task(directory: Path, setup: dict | None, run_root: Path | None = None) -> None:
    """A fine-tune resumes only with the task settings it started with: a re-run of a full fine-tune
    with task.mode=lora died on a worker (its checkpoint has no adapters), and one with task.mode=frozen
    or another pooling resumed as finished and reported the old run's score as its own.

    `run_root`: the folder to delete to start over (self-training's, whose rounds all start from the
    same weights; by default the run's own)."""
    recorded = json.loads((directory / STATE_FILE).read_text()).get("task_setup")
    if setup is None or recorded is None:
        return

    def shown(value) -> str:
        return f"[{', '.join(map(str, value))}]" if isinstance(value, list) else str(value)

    # The keys both hold, in order: kind and mode first, whose agreement makes pooling's and LoRA's present
    # in both or neither; a checkpoint from before labels were recorded has its head checked by size only.
    for key in (k for k in recorded if k in setup):
        if key == "init.weights" and recorded[key] != setup[key]:  # the start model was trained again
            raise ConfigError(f"{directory.parent}: the run resumes from {directory.name}, fine-tuned from other "
                              "weights than init.checkpoint holds now; start a new run under another run.name "
                              f"(or delete {run_root or directory.parent} to fine-tune the new weights under this one)")
        if recorded[key] != setup[key]:  # reordered labels: each class would read another's output
            was, now = shown(recorded[key]), shown(setup[key])
            raise ConfigError(f"{directory.parent}: the run resumes from {directory.name}, trained with {key} {was}, "
                              f"but this run's {key} is {now}; start a new run under another run.name")


def check_resume_shape(directory: Path, config: GPTConfig, n_labels: int | None = None) -> None:
    """A run resumes only into the model its checkpoint holds, checked on the driver: DCP reads just
    the tensors the new model asks for, so a re-run with fewer layers would continue from part of the
    old model, and a classifier of another label count would fail on a worker.

    `n_labels`: the classifier head's outputs when the run fine-tunes a classifier.
    """
    def refuse(what: str, now: str) -> None:
        raise ConfigError(f"{directory.parent}: the run resumes from {directory.name}, {what}, but this run's "
                          f"{now}; re-run with the same model and task, or start a new run under another run.name")

    if (directory / MODEL_FILE).is_file():
        stored, wanted = json.loads((directory / MODEL_FILE).read_text()), config.to_dict()
        for key, value in stored.items():
            if key not in RUN_CHOICES and key in wanted and wanted[key] != value:
                refuse(f"a model with {key} {value}", f"model has {key} {wanted[key]}")
    if n_labels is not None:
        head = SafeReader(str(directory)).read_metadata().state_dict_metadata.get("model.head.weight")
        if head is None:
            refuse("a checkpoint without a classification head", f"task is a classifier of {n_labels} labels")
        if head.size[0] != n_labels:
            refuse(f"a classifier of {head.size[0]} labels", f"task has {n_labels}")


def load_sharded(directory: Path, parts: list, optimizers: list, rank: int,
                 layout: tuple[int, int, int, int] | None = None) -> TrainerState:
    """Load shards into the (already parallelised) model parts and optimizers, resharding if the layout
    changed, and this rank's generator states where `layout` (world size, dp, tp, pp) is the saved one."""
    bundle, owners = _bundle(parts, optimizers)
    dcp.load(bundle, storage_reader=SafeReader(str(directory)), planner=SafeLoadPlanner())
    # The optimizer's state dict also holds its param groups' settings (betas, eps, weight decay) as
    # the checkpoint's run had them: loaded as they are, a re-run's train.beta2 or train.weight_decay
    # was silently ignored, though its train.lr and grad_clip apply. The moments come from the
    # checkpoint; the settings stay this run's.
    settings = [[{k: v for k, v in group.items() if k != "params"} for group in o.param_groups] for o in optimizers]
    for part, optimizer, (model_keys, optim_keys) in zip(parts, optimizers, owners):
        set_state_dict(part, optimizers=optimizer, options=_FLAT,
                       model_state_dict={k: bundle["model"][k] for k in model_keys},
                       optim_state_dict={k: bundle["optim"][k] for k in optim_keys})
    for optimizer, own in zip(optimizers, settings):
        for group, chosen in zip(optimizer.param_groups, own):
            group.update(chosen)
    state = TrainerState(**json.loads((directory / STATE_FILE).read_text()))
    # A rank's generator is restored only at the layout that saved it. At another, rank r's saved
    # stream was another role's (pp2 -> tp2: a pipeline stage's), so tensor-parallel peers, whose
    # streams must agree, drew different dropout masks over what they hold alike; the streams the
    # loop seeded before resuming (one a pipeline rank) stand instead.
    saved_layout = (state.world_size, state.dp, state.tp, state.pp)
    rng_file = directory / f"rng-rank{rank}.json"
    if rng_file.is_file() and (layout is None or tuple(layout) == saved_layout):
        rng = json.loads(rng_file.read_text())
        torch.set_rng_state(torch.tensor(rng["torch"], dtype=torch.uint8))
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(torch.tensor(rng["cuda"], dtype=torch.uint8))
    return state


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The complete checkpoint with the highest step under a run directory (see `is_complete`)."""
    found = []
    for state_file in run_dir.glob(f"checkpoint_*/{STATE_FILE}"):
        try:
            found.append((json.loads(state_file.read_text())["step"], state_file.parent))
        except (OSError, ValueError, KeyError):
            continue  # a checkpoint cut short while being written
    for _, directory in sorted(found, key=lambda item: item[0], reverse=True):
        if is_complete(directory):
            return directory
    return None


def is_complete(directory: Path) -> bool:
    """Every file the checkpoint's DCP metadata names is there in full, and every rank's RNG state
    (and the model shape) reads: a copy into the run directory cut short by a failure is passed over
    for the one before it. Ray copies each file in place, so one cut short mid-copy is there but short."""
    try:
        metadata = SafeReader(str(directory)).read_metadata()
        world = json.loads((directory / STATE_FILE).read_text())["world_size"]
        # Each shard file must reach the end of the last item the metadata places in it.
        sizes: dict[str, int] = {}
        for info in (metadata.storage_data or {}).values():
            sizes[info.relative_path] = max(sizes.get(info.relative_path, 0), info.offset + info.length)
        if any((directory / name).stat().st_size < size for name, size in sizes.items()):
            return False
        for rank in range(world):
            json.loads((directory / f"rng-rank{rank}.json").read_text())
        if (directory / MODEL_FILE).exists():  # absent from checkpoints written before it was
            json.loads((directory / MODEL_FILE).read_text())
    except ForeignPickle as refused:  # not a copy cut short: passing it over would start the run afresh
        raise CheckpointError(f"{directory / '.metadata'}: refused to load ({refused}); move the folder out "
                              "of the run directory if it is not this run's checkpoint") from None
    except (OSError, ValueError, KeyError, EOFError, RuntimeError, pickle.UnpicklingError, AttributeError,
            IndexError, TypeError):  # what a file cut short (or missing) raises
        return False
    return True


class CheckpointManager:
    """Save, resume and keep-N for one run's sharded checkpoints: the only place the loop touches them.

    `save` writes every rank's shards, the trainer state and each rank's RNG into a temporary
    directory and hands it to `report` (Ray Train's, which moves it into the run directory as
    `checkpoint_<time>` and keeps the newest `checkpoint.keep`). `resume` loads the newest checkpoint
    in the run directory into the model and optimizer, whatever layout wrote it, and returns its state.
    """

    def __init__(self, run_dir: Path, parts: list, optimizers: list, model_config: GPTConfig, rank: int,
                 layout: tuple[int, int, int, int] | None = None) -> None:
        """`layout`: this run's (world size, dp, tp, pp), for `load_sharded`'s RNG rule."""
        self.run_dir, self.parts, self.optimizers = run_dir, parts, optimizers
        self.model_config, self.rank, self.layout = model_config, rank, layout

    def resume(self) -> TrainerState | None:
        # The run directory, where Ray Train stores every reported checkpoint, serves a re-run of the
        # same run.name and a restart after a worker failure alike. Ray's own choice (`get_checkpoint`)
        # would be the newest its controller had registered, and one reported just before a failure
        # may not be yet (the controller polls).
        newest = latest_checkpoint(self.run_dir)
        if newest is None:
            return None
        return load_sharded(newest, self.parts, self.optimizers, self.rank, self.layout)

    def save(self, state: TrainerState, metrics: dict, report) -> None:
        """A collective: every rank calls it. `report(metrics, directory)` publishes the directory."""
        with tempfile.TemporaryDirectory(prefix="mtnlg-ckpt-") as tmp:
            save_sharded(Path(tmp), self.parts, self.optimizers, state, self.model_config, self.rank)
            report(metrics, Path(tmp))


def consolidated_name(name: str) -> str:
    """Where a task model's parameter lives in a consolidated checkpoint: the classifier's backbone
    is the checkpoint's GPT, and a LoRA-wrapped layer keeps its original weight under `base`."""
    name = name.removeprefix("backbone.")
    return name.replace(".base.", ".")


def _check_finite_slices(loaded: dict[str, torch.Tensor], weights: Path) -> None:
    """A collective: every rank raises the same one line when any rank read NaN or an infinity (a diverged
    run's weights), instead of training on them; one rank raising alone would leave the others waiting."""
    local = [key for key, tensor in sorted(loaded.items())
             if not torch.isfinite(tensor.to_local() if isinstance(tensor, DTensor) else tensor).all()]
    bad = torch.tensor([1 if local else 0], device=next(iter(loaded.values())).device)  # nccl takes GPU tensors
    if dist.is_initialized():
        dist.all_reduce(bad)
    if bad.item():
        raise nonfinite_error(weights, local[0] if local else None)


def load_consolidated_slices(model, checkpoint_dir: Path, names: set[str]) -> set[str]:
    """Fill the parameters `names` of a parallelized (materialised) model from a consolidated
    checkpoint's model.safetensors, each rank reading only the slices it holds; returns the names filled.

    A collective: every rank calls it. A parameter the file lacks is left for the caller to
    initialise; one the file has in another shape is one clear line.
    """
    weights, stored = stored_shapes(checkpoint_dir)
    state = get_model_state_dict(model)
    wanted: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        key = consolidated_name(name)
        if name not in names or key not in stored:
            continue
        if stored[key] != tuple(tensor.shape):
            raise CheckpointError(
                f"{weights}: tensor '{key}' has shape {list(stored[key])}, the model expects {list(tensor.shape)}"
            )
        wanted[key] = tensor
    if wanted:
        dcp.load(wanted, storage_reader=HuggingFaceStorageReader(str(weights.parent)))
        _check_finite_slices(wanted, weights)
    filled = {name: wanted[consolidated_name(name)] for name in state if consolidated_name(name) in wanted
              and name in names}
    set_model_state_dict(model, filled, options=StateDictOptions(strict=False))
    return set(filled)
