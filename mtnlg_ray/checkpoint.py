"""The consolidated checkpoint: `model.safetensors`, `config.json`, `tokenizer.json` in one directory.

It is what generate, serve, evaluate, fine-tune and export read. Loading never unpickles, checks
every tensor's name and shape against the config, and turns a missing, truncated or mismatched
file into one `CheckpointError` line. Writes go to a temporary directory that is renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from mtnlg_ray.errors import CheckpointError, ConfigError
from mtnlg_ray.model.classifier import POOLINGS, GPTClassifier
from mtnlg_ray.model.gpt import GPT, GPTConfig
from mtnlg_ray.publish import publish_directory

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TOKENIZER = "tokenizer.json"
FORMAT = "mtnlg-ray/consolidated/v1"


def model_state(model: GPT) -> dict[str, torch.Tensor]:
    """Contiguous CPU copies of the weights; the tied output projection is the embedding, stored once."""
    return {name: t.detach().to("cpu").contiguous() for name, t in model.state_dict().items()}


def save_checkpoint(
    model: GPT,
    output: str | Path,
    tokenizer_json: str | Path | None = None,
    extra: dict | None = None,
    extra_tensors: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write `model` (and the tokenizer file, when given) as a consolidated checkpoint at `output`.

    `extra` lands in config.json beside the model shape and `extra_tensors` in model.safetensors
    beside the weights (e.g. a task head and its labels).
    """
    return save_state_dict(model_state(model), model.config, output, tokenizer_json, extra, extra_tensors)


def save_state_dict(
    state: dict[str, torch.Tensor],
    config: GPTConfig,
    output: str | Path,
    tokenizer_json: str | Path | None = None,
    extra: dict | None = None,
    extra_tensors: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Like `save_checkpoint` for weights already gathered into one state dict (e.g. from DCP shards)."""
    output = Path(output)
    check_tensor_shapes(state, expected_shapes(config), output / WEIGHTS)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in {**state, **(extra_tensors or {})}.items()}
    body = {"format": FORMAT, "model": config.to_dict(), **(extra or {})}
    _write_atomically(output, tensors, body, tokenizer_json)
    return output


INIT_MARK = "initialised_by"  # a key of the config.json `init` writes: the one checkpoint it may replace


def _write_atomically(output: Path, state, config: dict, tokenizer_json) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    if output.exists() and not output.is_dir():
        raise CheckpointError(f"{output}: exists and is not a directory")
    if output.is_dir() and any(output.iterdir()) and not _is_checkpoint(output):
        # Replacing a checkpoint is fine; replacing some other folder would delete the user's files.
        raise CheckpointError(f"{output}: exists and is not a checkpoint; choose an empty or new directory")

    def write(staging: Path) -> None:
        save_file(state, str(staging / WEIGHTS), metadata={"format": FORMAT})
        (staging / CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        if tokenizer_json is not None:
            shutil.copyfile(tokenizer_json, staging / TOKENIZER)
        elif (output / TOKENIZER).is_file():
            shutil.copyfile(output / TOKENIZER, staging / TOKENIZER)

    publish_directory(output, write)


def _is_checkpoint(path: Path) -> bool:
    return read_config_json(path).get("format") == FORMAT


def expected_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = GPT(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def check_tensor_shapes(state: dict, expected: dict, where: Path, error: type[Exception] = CheckpointError,
                        model: str = "this model config", expects: str = "config expects") -> None:
    """Name the first missing, unexpected or misshapen tensor of `state` against `expected` (name → shape)."""
    missing = sorted(set(expected) - set(state))
    if missing:
        raise error(f"{where}: missing tensor '{missing[0]}' ({len(missing)} missing in all)")
    extra = sorted(set(state) - set(expected))
    if extra:
        raise error(f"{where}: unexpected tensor '{extra[0]}' for {model}")
    for name, shape in expected.items():
        if tuple(state[name].shape) != shape:
            raise error(f"{where}: tensor '{name}' has shape {list(state[name].shape)}, {expects} {list(shape)}")


def check_consolidated(path: Path) -> None:
    """One line when `path` is no consolidated checkpoint folder: missing, a file, or a folder that
    is something else a run writes (the run directory, one of its sharded training checkpoints)."""
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint not found")
    if not path.is_dir():
        raise CheckpointError(f"{path}: expected a checkpoint directory holding {WEIGHTS} and {CONFIG}")
    if (path / CONFIG).exists():
        return
    if (path / "final" / CONFIG).is_file():
        raise CheckpointError(f"{path}: a run directory; give its consolidated checkpoint, {path / 'final'}")
    if (path / "trainer_state.json").is_file() and (path / ".metadata").is_file():
        final = path.parent / "final"
        raise CheckpointError(f"{path}: a sharded training checkpoint (it resumes a run); give the run's "
                              f"consolidated checkpoint, {final}" + ("" if (final / CONFIG).is_file() else
                              ", which the run writes when it ends (re-run it to finish)"))
    if not (path / WEIGHTS).exists():  # neither file: something else (it was "tokenizer.json: missing")
        rounds = any((p / "final" / CONFIG).is_file() for p in path.glob("round*"))
        kind = ("a prepared dataset" if (path / "manifest.json").is_file() else
                "an n-gram classifier (self-train's teacher, not a GPT)" if (path / "ngram.json").is_file() else
                f"a self-train run directory; its rounds' classifiers are in {path}/roundN/final" if rounds else
                "no checkpoint")
        raise CheckpointError(f"{path}: {kind}; expected a checkpoint directory holding {WEIGHTS} and {CONFIG}")


def read_checkpoint_config(path: str | Path) -> dict:
    """The parsed config.json of a checkpoint directory."""
    path = Path(path)
    check_consolidated(path)
    config_file = path / CONFIG
    body = read_json_object(config_file, f"is {path} a consolidated checkpoint?")
    if not isinstance(body.get("model"), dict):
        raise CheckpointError(f"{config_file}: expected an object with a 'model' section")
    return body


def read_json_object(path: Path, what: str, error: type[Exception] = CheckpointError) -> dict:
    """A JSON file holding an object; one line naming the file when it is missing (`what` says what was
    expected there), not JSON, or not an object."""
    if not path.is_file():
        raise error(f"{path}: missing ({what})")
    try:
        body = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(body, dict):
        raise error(f"{path}: expected a JSON object")
    return body


def load_checkpoint(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> tuple[GPT, dict]:
    """Load a consolidated checkpoint into a `GPT` in eval mode; returns (model, config.json body)."""
    path = Path(path)
    body = read_checkpoint_config(path)
    config = _model_config(path, body)
    weights = _weights_file(path)
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{weights}: unreadable or truncated safetensors file ({exc})") from None
    expected = expected_shapes(config)
    # A classifier's head is the one thing beside the backbone (`load_classifier` reads it). Any other
    # tensor means config.json no longer describes the weights: a config edited to 3 layers over 4
    # layers' weights loaded the first 3 and dropped the fourth without a word.
    model_keys = {k: v for k, v in state.items() if not k.startswith(HEAD)}
    check_tensor_shapes(model_keys, expected, weights)
    check_tensor_dtypes({k: str(v.dtype).removeprefix("torch.") for k, v in model_keys.items()}, weights)
    check_finite(model_keys, weights)
    with torch.device("meta"):
        model = GPT(config)
    model.load_state_dict(model_keys, assign=True)
    model = model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
    model.eval()
    return model, body


def check_finite(tensors: dict[str, torch.Tensor], where: Path) -> None:
    """Weights that hold NaN or an infinity (a diverged run's) loaded without a word: evaluate printed
    nan and generate an empty line. One line naming the first such tensor instead."""
    for name in sorted(tensors):
        if not torch.isfinite(tensors[name]).all():
            raise nonfinite_error(where, name)


def nonfinite_error(where: Path, name: str | None) -> CheckpointError:
    """The one line for weights holding NaN or an infinity; `name` is the first such tensor, when known."""
    named = f"tensor '{name}' holds" if name else "a tensor holds"
    return CheckpointError(f"{where}: {named} NaN or infinite values (saved by a run that diverged?); "
                           "use an earlier checkpoint")


def _model_config(path: Path, body: dict) -> GPTConfig:
    try:
        return GPTConfig.from_dict(body["model"], source=str(path / CONFIG))
    except (TypeError, ConfigError) as exc:
        where = f"{path / CONFIG}: "  # an unknown or missing key's message names the file already
        raise CheckpointError(str(exc) if str(exc).startswith(where) else where + str(exc)) from None


def _weights_file(path: Path) -> Path:
    weights = path / WEIGHTS
    if weights.is_dir():
        raise CheckpointError(f"{weights}: a folder, expected the safetensors file of the weights")
    if not weights.is_file():
        raise CheckpointError(f"{weights}: missing")
    return weights


def stored_shapes(path: str | Path) -> tuple[Path, dict[str, tuple[int, ...]]]:
    """The checkpoint's weights file and each tensor's shape in it, from the safetensors header alone
    (no tensor is read); one line when the file is missing or unreadable."""
    weights = _weights_file(Path(path))
    try:
        with safe_open(str(weights), framework="pt") as handle:
            return weights, {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{weights}: unreadable or truncated safetensors file ({exc})") from None


# safetensors' dtype codes of the floating-point dtypes a model's weights may be stored in
FLOAT_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def stored_dtypes(weights: Path) -> dict[str, str]:
    """Each tensor's dtype (torch's name, or safetensors' code for one that is no float) from the header."""
    try:
        with safe_open(str(weights), framework="pt") as handle:
            codes = {key: handle.get_slice(key).get_dtype() for key in handle.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{weights}: unreadable or truncated safetensors file ({exc})") from None
    others = {"I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}
    return {key: FLOAT_DTYPES.get(code) or others.get(code, code) for key, code in codes.items()}


def check_tensor_dtypes(dtypes: dict[str, str], where: Path) -> None:
    """The model's tensors are floats of one dtype: an integer tensor, or one odd dtype among them, loaded
    without a word and failed later in a matmul's traceback (generate, serve, a training worker)."""
    if not dtypes:
        return
    common = max(sorted(set(dtypes.values())), key=list(dtypes.values()).count)
    for name in sorted(dtypes):
        if dtypes[name] not in FLOAT_DTYPES.values():
            raise CheckpointError(f"{where}: tensor '{name}' has dtype {dtypes[name]}, expected a floating-point one")
        if dtypes[name] != common:
            raise CheckpointError(f"{where}: tensor '{name}' has dtype {dtypes[name]}, the model's other tensors "
                                  f"{common}; store every weight in one dtype")


def check_checkpoint(path: str | Path, classifier: bool = False) -> dict:
    """What loading the checkpoint would refuse, found from config.json and the safetensors header
    alone (no tensor is read): the driver calls it before Ray workers or actors load the weights,
    which would otherwise fail there, behind Ray's traceback and retries. Returns config.json's body.

    Checks the config, that the weights file is there and readable, and every backbone tensor's name
    and shape, with none left over; with `classifier`, also the task section and the head against its
    labels (as `load_classifier` does; a language model's reader ignores both, and so does this check then).
    """
    path = Path(path)
    body = read_checkpoint_config(path)
    config = _model_config(path, body)
    weights, shapes = stored_shapes(path)
    expected = expected_shapes(config)
    if classifier:
        n = len(classification_task(body, path / CONFIG)["labels"])
        expected = {**expected, f"{HEAD}weight": (n, config.d_model), f"{HEAD}bias": (n,)}
    # A head is ignored where no classifier is read, as loading ignores it; any other tensor is refused.
    stored = {key: torch.empty(shape, device="meta") for key, shape in shapes.items()
              if classifier or not key.startswith(HEAD)}
    check_tensor_shapes(stored, expected, weights)
    backbone = expected_shapes(config)  # a classifier's head is cast to the backbone's dtype on loading
    check_tensor_dtypes({k: v for k, v in stored_dtypes(weights).items() if k in backbone}, weights)
    return body


def tokenizer_path(path: str | Path) -> Path:
    """The checkpoint's tokenizer.json, or one clear line when it has none."""
    file = Path(path) / TOKENIZER
    check_consolidated(Path(path))  # not "its tokenizer is missing", which reads as if it were a checkpoint
    if not file.is_file():
        raise CheckpointError(f"{file}: missing (the checkpoint needs its tokenizer to turn text into tokens)")
    return file


def init_checkpoint(
    preset: str,
    tokenizer: str | Path,
    output: str | Path,
    seed: int = 0,
    seq_len: int | None = None,
) -> Path:
    """A randomly initialised model of `preset`, its embedding sized to the tokenizer, saved at `output`."""
    from mtnlg_ray.config import ModelSection
    from mtnlg_ray.model.presets import build_on_meta, get_preset
    from mtnlg_ray.tokenizer import load_tokenizer

    get_preset(preset)  # one clear line for an unknown name
    if seq_len is not None and seq_len < 1:
        raise ConfigError(f"seq_len: expected a positive integer, got {seq_len}")
    output = Path(output)
    if _is_checkpoint(output) and not read_config_json(output).get(INIT_MARK):
        # `init -o runs/pretrain/final` replaced trained weights with random ones without a word.
        raise CheckpointError(f"{output}: holds a checkpoint that init did not write (trained weights?), which "
                              "init never replaces; choose another --output, or delete it first")
    tok_file = Path(tokenizer)
    if tok_file.is_dir():  # a tokenizer's folder, or a prepared dataset's (its tokenizer/ inside)
        nested = tok_file / "tokenizer" / TOKENIZER
        tok_file = nested if not (tok_file / TOKENIZER).exists() and nested.is_file() else tok_file / TOKENIZER
    tok = load_tokenizer(tok_file)
    config = ModelSection(preset=preset, seq_len=seq_len).resolve(tokenizer_vocab=tok.get_vocab_size())
    need = build_on_meta(config).num_parameters() * 4
    have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > have // 2:
        raise CheckpointError(
            f"--preset {preset}: fp32 weights need {need / 2**30:.1f} GiB, more than half of this machine's "
            f"{have / 2**30:.1f} GiB (size its cluster layout with `mtnlg-ray plan --preset {preset}`)"
        )
    torch.manual_seed(seed)
    model = GPT(config)
    model.reset_parameters(seed=seed)
    return save_checkpoint(model, output, tokenizer_json=tok_file, extra={INIT_MARK: "mtnlg-ray init"})


def read_config_json(path: Path) -> dict:
    """A folder's config.json as a mapping; empty when it is missing or no JSON object (the marks
    `init`, `export hf` and `import hf` leave are read from it)."""
    try:
        body = json.loads((path / CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return body if isinstance(body, dict) else {}


# --- classification checkpoints ------------------------------------------------------------------
# A consolidated checkpoint with two additions: config.json holds `"task": {"kind": "classification",
# "labels": [...], "pooling": "last" | "mean"}` and model.safetensors holds `head.weight` (n_labels x
# d_model) and `head.bias` (n_labels). The backbone keeps its GPT tensor names, so `load_checkpoint`
# still reads the checkpoint as a plain language model.

HEAD = "head."


def _check_labels(labels: Sequence[str], where: str) -> list[str]:
    labels = list(labels)
    if not labels or not all(isinstance(x, str) and x for x in labels):
        raise CheckpointError(f"{where}: task.labels must be a non-empty list of strings, got {labels!r}")
    if len(set(labels)) != len(labels):
        duplicate = next(x for x in labels if labels.count(x) > 1)
        raise CheckpointError(f"{where}: task.labels lists {duplicate!r} twice")
    return labels


def task_kind(body: dict) -> str | None:
    """The task a checkpoint's config.json says its model was fine-tuned for (None: a language model)."""
    task = body.get("task")
    return task.get("kind") if isinstance(task, dict) else None


def classification_task(body: dict, where: str | Path) -> dict:
    """The validated `task` section of a checkpoint's config.json; one clear line if it is no classifier."""
    kind = task_kind(body)
    if kind != "classification":
        found = f"task kind {kind!r}" if kind else "no task section (a language model?)"
        raise CheckpointError(f"{where}: not a classification checkpoint: config.json has {found}")
    task = body["task"]
    labels = _check_labels(task.get("labels") or [], str(where))
    pooling = task.get("pooling", "last")
    if pooling not in POOLINGS:
        raise CheckpointError(f"{where}: task.pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
    return {"kind": "classification", "labels": labels, "pooling": pooling}


def save_classifier(
    model: GPTClassifier,
    labels: Sequence[str],
    output: str | Path,
    tokenizer_json: str | Path | None = None,
    extra: dict | None = None,
) -> Path:
    """Write `model` as a classification checkpoint at `output` (atomically, like `save_checkpoint`)."""
    labels = _check_labels(labels, str(output))
    if len(labels) != model.n_labels:
        raise CheckpointError(f"{output}: {len(labels)} labels for a head of {model.n_labels} outputs")
    head = {f"{HEAD}{name}": t.detach() for name, t in model.head.state_dict().items()}
    task = {"kind": "classification", "labels": labels, "pooling": model.pooling}
    return save_checkpoint(model.backbone, output, tokenizer_json, extra={**(extra or {}), "task": task},
                           extra_tensors=head)


def load_classifier(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> tuple[GPTClassifier, list[str]]:
    """Load a classification checkpoint in eval mode; returns (model, labels in head order)."""
    path = Path(path)
    task = classification_task(read_checkpoint_config(path), path / CONFIG)
    backbone, _ = load_checkpoint(path, device=device, dtype=dtype)
    head = _read_head(path / WEIGHTS)
    n, d = len(task["labels"]), backbone.config.d_model
    expected = {"weight": (n, d), "bias": (n,)}
    stray = sorted(set(head) - set(expected))
    if stray:
        raise CheckpointError(f"{path / WEIGHTS}: unexpected tensor '{HEAD}{stray[0]}' for a classification head")
    for name, shape in expected.items():
        if name not in head:
            raise CheckpointError(f"{path / WEIGHTS}: missing tensor '{HEAD}{name}' of the classification head")
        if tuple(head[name].shape) != shape:
            raise CheckpointError(
                f"{path / WEIGHTS}: tensor '{HEAD}{name}' has shape {list(head[name].shape)}, "
                f"expected {list(shape)} for {n} labels"
            )
    check_finite({HEAD + name: tensor for name, tensor in head.items()}, path / WEIGHTS)
    model = GPTClassifier(backbone, n, task["pooling"])
    model.head.load_state_dict(head)  # copies onto the backbone's device and dtype
    return model.eval(), task["labels"]


def _read_head(weights: Path) -> dict[str, torch.Tensor]:
    # Only the head's tensors: the backbone was just read by load_checkpoint.
    try:
        with safe_open(str(weights), framework="pt") as f:
            return {k[len(HEAD) :]: f.get_tensor(k) for k in f.keys() if k.startswith(HEAD)}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{weights}: unreadable or truncated safetensors file ({exc})") from None
