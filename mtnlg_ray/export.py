"""Hugging Face GPT-2 format in and out: the last stage of the pipeline (`mtnlg-ray export hf`).

`export_hf` turns a consolidated checkpoint into a directory that `GPT2LMHeadModel` and
`AutoTokenizer` load with the same logits and token ids; `import_hf` reads such a directory back.
Neither needs transformers: the files are written and read with safetensors, tokenizers and json.
"""

from __future__ import annotations

import json
import pickle
import re
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mtnlg_ray.checkpoint import (
    FORMAT,
    check_tensor_shapes,
    expected_shapes,
    load_checkpoint,
    model_state,
    read_config_json,
    read_json_object,
    save_state_dict,
    tokenizer_path,
)
from mtnlg_ray.errors import CheckpointError, ConfigError, InputError, first_line
from mtnlg_ray.model.gpt import GPTConfig
from mtnlg_ray.publish import publish_directory
from mtnlg_ray.tokenizer import EOS, eos_id, load_tokenizer

HF_CONFIG = "config.json"
HF_WEIGHTS = "model.safetensors"
HF_WEIGHTS_INDEX = "model.safetensors.index.json"
HF_PICKLED_WEIGHTS = "pytorch_model.bin"
TOKENIZER = "tokenizer.json"
EXPORT_MARK = "exported_by"  # a key of config.json our exports carry
IMPORT_MARK = "imported_by"  # and of the checkpoints `import hf` writes: what lets a later import replace one

# How each of our per-block tensors becomes GPT-2's. HF keeps GPT-2's TF-era Conv1D, whose weight is
# (in, out) where nn.Linear's is (out, in); its fused c_attn is [q all heads | k | v] where ours is
# head by head.
_COPY, _LINEAR, _QKV_WEIGHT, _QKV_BIAS = "copy", "linear", "qkv_weight", "qkv_bias"
_BLOCK_TENSORS = (
    ("ln1.weight", "ln_1.weight", _COPY),
    ("ln1.bias", "ln_1.bias", _COPY),
    ("attn.qkv.weight", "attn.c_attn.weight", _QKV_WEIGHT),
    ("attn.qkv.bias", "attn.c_attn.bias", _QKV_BIAS),
    ("attn.proj.weight", "attn.c_proj.weight", _LINEAR),
    ("attn.proj.bias", "attn.c_proj.bias", _COPY),
    ("ln2.weight", "ln_2.weight", _COPY),
    ("ln2.bias", "ln_2.bias", _COPY),
    ("mlp.fc1.weight", "mlp.c_fc.weight", _LINEAR),
    ("mlp.fc1.bias", "mlp.c_fc.bias", _COPY),
    ("mlp.fc2.weight", "mlp.c_proj.weight", _LINEAR),
    ("mlp.fc2.bias", "mlp.c_proj.bias", _COPY),
)
_MODEL_TENSORS = (
    ("tok_emb.weight", "wte.weight"),
    ("pos_emb.weight", "wpe.weight"),
    ("ln_f.weight", "ln_f.weight"),
    ("ln_f.bias", "ln_f.bias"),
)
# Buffers (the causal mask) that older transformers saved with the weights; they hold no parameters.
_HF_BUFFER = re.compile(r"h\.\d+\.(attn|crossattention)\.(bias|masked_bias)")
# What GPT2Config assumes for a key its config.json leaves out.
_GPT2_DEFAULTS = {
    "vocab_size": 50257,
    "n_positions": 1024,
    "n_embd": 768,
    "n_layer": 12,
    "n_head": 12,
    "n_inner": None,
    "activation_function": "gelu_new",
    "resid_pdrop": 0.1,
    "layer_norm_epsilon": 1e-5,
    "scale_attn_weights": True,
    "scale_attn_by_inverse_layer_idx": False,
    "add_cross_attention": False,
    "tie_word_embeddings": True,
}
# Both are the tanh approximation of GELU that our MLP uses.
_TANH_GELU = ("gelu_new", "gelu_pytorch_tanh")


def export_hf(checkpoint: str | Path, output: str | Path) -> Path:
    """Write the consolidated checkpoint at `checkpoint` as a Hugging Face GPT-2 directory at `output`."""
    checkpoint, output = Path(checkpoint), Path(output)
    model, _ = load_checkpoint(checkpoint)
    config = model.config
    tokenizer_file = tokenizer_path(checkpoint)
    end_of_text = _end_of_text_id(tokenizer_file, config.vocab_size, CheckpointError)
    state = {f"transformer.{name}": t for name, t in to_hf_state(model_state(model), config).items()}
    dtype = str(model.tok_emb.weight.dtype).removeprefix("torch.")
    _refuse_to_clobber(output, checkpoint, "mtnlg-ray export", lambda body: body.get(EXPORT_MARK) == "mtnlg-ray")

    def write(staging: Path) -> None:
        # transformers refuses a safetensors file whose metadata does not say "pt".
        tensors = {name: t.contiguous() for name, t in state.items()}
        save_file(tensors, str(staging / HF_WEIGHTS), metadata={"format": "pt"})
        _write_json(staging / HF_CONFIG, _gpt2_config(config, end_of_text, dtype))
        _write_json(staging / "generation_config.json", {"bos_token_id": end_of_text, "eos_token_id": end_of_text})
        shutil.copyfile(tokenizer_file, staging / TOKENIZER)
        specials = {"bos_token": EOS, "eos_token": EOS, "unk_token": EOS}
        # PreTrainedTokenizerFast runs tokenizer.json exactly as it is; GPT2Tokenizer would rebuild the
        # pipeline from the vocabulary and merges with its own pre-tokenizer and decoder.
        _write_json(
            staging / "tokenizer_config.json",
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                **specials,
                "model_max_length": config.seq_len,
                "clean_up_tokenization_spaces": False,
            },
        )
        _write_json(staging / "special_tokens_map.json", specials)

    publish_directory(output, write)
    return output


def import_hf(input: str | Path, output: str | Path) -> Path:
    """Read a local Hugging Face GPT-2 directory and save it as a consolidated checkpoint at `output`."""
    source, output = Path(input), Path(output)
    if not source.exists():
        raise InputError(f"{source}: not found")
    if not source.is_dir():
        raise InputError(f"{source}: expected a Hugging Face model directory ({HF_CONFIG}, {HF_WEIGHTS}, {TOKENIZER})")
    hf_config = _read_hf_config(source / HF_CONFIG)
    config = _gpt_config(hf_config, source / HF_CONFIG)
    tokenizer_file = source / TOKENIZER
    if not tokenizer_file.is_file():
        raise InputError(f"{tokenizer_file}: missing (mtnlg-ray checkpoints carry their tokenizer as tokenizer.json)")
    _end_of_text_id(tokenizer_file, config.vocab_size, InputError)
    # Only an earlier import: any consolidated checkpoint used to pass, so importing over runs/pretrain/final
    # (or a fine-tuned classifier) replaced the trained model without a word.
    _refuse_to_clobber(output, source, "`mtnlg-ray import hf` output (an import by an older mtnlg-ray carries "
                       "no imported_by mark: delete it first)",
                       lambda body: body.get("format") == FORMAT and body.get(IMPORT_MARK) == "mtnlg-ray import hf")
    weights, weights_file = _read_hf_weights(source)
    state = _hf_model_tensors(weights, weights_file, hf_config, source / HF_CONFIG)
    _check_hf_shapes(state, config, weights_file)
    return save_state_dict(from_hf_state(state, config), config, output, tokenizer_json=tokenizer_file,
                           extra={IMPORT_MARK: "mtnlg-ray import hf"})


def to_hf_state(state: dict[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    """Our tensors under GPT-2's names (without the `transformer.` prefix), laid out as HF's GPT-2 expects."""
    out = {theirs: state[ours] for ours, theirs in _MODEL_TENSORS}
    for i in range(config.n_layer):
        for ours, theirs, kind in _BLOCK_TENSORS:
            t = state[f"blocks.{i}.{ours}"]
            if kind in (_QKV_WEIGHT, _QKV_BIAS):
                # [head][q|k|v][head_dim] -> [q|k|v][head][head_dim]
                t = t.reshape(config.n_head, 3, config.head_dim, *t.shape[1:]).transpose(0, 1).reshape(t.shape)
            if kind in (_LINEAR, _QKV_WEIGHT):
                t = t.t()
            out[f"h.{i}.{theirs}"] = t
    return out


def from_hf_state(state: dict[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    """The inverse of `to_hf_state`: GPT-2 tensors (names without `transformer.`) under our names and layout."""
    out = {ours: state[theirs] for ours, theirs in _MODEL_TENSORS}
    for i in range(config.n_layer):
        for ours, theirs, kind in _BLOCK_TENSORS:
            t = state[f"h.{i}.{theirs}"]
            if kind in (_LINEAR, _QKV_WEIGHT):
                t = t.t()
            if kind in (_QKV_WEIGHT, _QKV_BIAS):
                # [q|k|v][head][head_dim] -> [head][q|k|v][head_dim]
                t = t.reshape(3, config.n_head, config.head_dim, *t.shape[1:]).transpose(0, 1).reshape(t.shape)
            out[f"blocks.{i}.{ours}"] = t
    return {name: t.contiguous() for name, t in out.items()}


def _gpt2_config(config: GPTConfig, end_of_text: int, dtype: str) -> dict:
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.seq_len,
        "n_embd": config.d_model,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": 4 * config.d_model,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": config.layer_norm_eps,
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "initializer_range": config.init_std,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "add_cross_attention": False,
        "tie_word_embeddings": True,
        "bos_token_id": end_of_text,
        "eos_token_id": end_of_text,
        "use_cache": True,
        "dtype": dtype,
        EXPORT_MARK: "mtnlg-ray",  # what lets a later export replace this folder, and no other
    }


def _end_of_text_id(tokenizer_file: Path, vocab_size: int, error: type) -> int:
    """The `<|endoftext|>` id of a tokenizer.json, after checking that every token id fits the embedding."""
    try:
        tokenizer = load_tokenizer(tokenizer_file)
    except CheckpointError as exc:
        raise error(str(exc)) from None
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    if size > vocab_size:
        raise error(f"{tokenizer_file}: {size} tokens do not fit the model's vocab_size of {vocab_size}")
    return eos_id(tokenizer)


def _read_hf_config(path: Path) -> dict:
    body = read_json_object(path, f"is {path.parent} a Hugging Face model directory?", error=InputError)
    if body.get("model_type") is None and isinstance(body.get("model"), dict):
        # config.json of our own consolidated checkpoint: nothing to import
        raise InputError(f"{path}: an mtnlg-ray checkpoint already; give {path.parent} to the commands as it is "
                         "(`import hf` reads a Hugging Face GPT-2 directory)")
    if body.get("model_type") != "gpt2":
        raise InputError(f"{path}: model_type is {body.get('model_type')!r}; only 'gpt2' can be imported")
    return {**_GPT2_DEFAULTS, **body}


def _gpt_config(hf: dict, path: Path) -> GPTConfig:
    """Our config for a GPT-2 config.json, refusing the GPT-2 variants our model does not compute."""
    if hf["activation_function"] not in _TANH_GELU:
        raise InputError(
            f"{path}: activation_function {hf['activation_function']!r} is not supported "
            f"(expected one of {', '.join(_TANH_GELU)})"
        )
    if hf["n_inner"] is not None and hf["n_inner"] != 4 * hf["n_embd"]:
        expected = 4 * hf["n_embd"]
        raise InputError(f"{path}: n_inner {hf['n_inner']} is not supported (expected 4 × n_embd = {expected})")
    if not hf["scale_attn_weights"] or hf["scale_attn_by_inverse_layer_idx"]:
        raise InputError(f"{path}: attention scaling other than 1/sqrt(head_dim) is not supported")
    if hf["add_cross_attention"]:
        raise InputError(f"{path}: add_cross_attention is not supported (decoder-only GPT-2 expected)")
    try:
        return GPTConfig(
            n_layer=hf["n_layer"],
            n_head=hf["n_head"],
            d_model=hf["n_embd"],
            seq_len=hf["n_positions"],
            vocab_size=hf["vocab_size"],
            # One dropout rate drives all three of GPT-2's; the residual one is the rate that matters most.
            dropout=float(hf["resid_pdrop"]),
            layer_norm_eps=float(hf["layer_norm_epsilon"]),
        )
    except ConfigError as exc:
        raise InputError(f"{path}: {exc}") from None
    except (TypeError, ValueError) as exc:
        raise InputError(f"{path}: bad model shape ({exc})") from None


def _read_hf_weights(source: Path) -> tuple[dict[str, torch.Tensor], Path]:
    """GPT-2 tensors from model.safetensors, a sharded safetensors index, or a pytorch_model.bin."""
    single, index, pickled = source / HF_WEIGHTS, source / HF_WEIGHTS_INDEX, source / HF_PICKLED_WEIGHTS
    if single.is_file():
        return _load_safetensors(single), single
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise InputError(f"{index}: not a safetensors index with a 'weight_map' ({exc})") from None
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(_load_safetensors(source / shard))
        return state, index
    if pickled.is_file():
        try:
            # weights_only: a .bin is a pickle, and loading one must not be able to run code. Its warning
            # about a pickle protocol other than torch's own is no news to the user.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                state = torch.load(pickled, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            if "GLOBAL" in str(exc):  # an object the loader would have had to import: code could run
                raise InputError(f"{pickled}: refused to load: it holds more than tensors ({_refused(exc)}), and "
                                 "a .bin is a pickle that could run code; convert it to model.safetensors where it "
                                 "was made") from None
            raise InputError(f"{pickled}: not a plain tensor state dict ({_refused(exc)})") from None
        except (RuntimeError, OSError, EOFError, ValueError, KeyError) as exc:  # KeyError: bytes that are no pickle
            raise InputError(f"{pickled}: not a plain tensor state dict ({first_line(exc)})") from None
        if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
            raise InputError(f"{pickled}: expected a dict of tensor names to tensors")
        return state, pickled
    raise InputError(f"{source}: no {HF_WEIGHTS}, {HF_WEIGHTS_INDEX} or {HF_PICKLED_WEIGHTS}")


def _refused(exc: BaseException) -> str:
    """What torch's weights-only loader refused, without its advice to load with weights_only=False
    (which would let the file run code): the global it would have imported, or its own reason."""
    text = str(exc)
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:
        return f"the global {found.group(1)}"
    found = re.search(r"WeightsUnpickler error:\s*([^\n]+)", text)
    return found.group(1).strip().rstrip(".") if found else "torch's weights-only loader refused it"


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise InputError(f"{path}: missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise InputError(f"{path}: unreadable or truncated safetensors file ({first_line(exc)})") from None


def _hf_model_tensors(weights: dict, weights_file: Path, hf: dict, config_file: Path) -> dict[str, torch.Tensor]:
    """The model's parameters under bare GPT-2 names: prefix stripped, mask buffers dropped, lm_head checked."""
    state: dict[str, torch.Tensor] = {}
    lm_head = None
    for name, tensor in weights.items():
        key = name.removeprefix("transformer.")
        if _HF_BUFFER.fullmatch(key):
            continue
        if key == "lm_head.weight":
            lm_head = tensor
            continue
        state[key] = tensor
    wte = state.get("wte.weight")
    if lm_head is not None and wte is not None and not (lm_head.shape == wte.shape and torch.equal(lm_head, wte)):
        raise InputError(
            f"{weights_file}: lm_head.weight differs from wte.weight "
            "(only tied input and output embeddings are supported)"
        )
    if lm_head is None and not hf["tie_word_embeddings"]:
        raise InputError(
            f"{config_file}: tie_word_embeddings is false but {weights_file.name} has no lm_head.weight"
        )
    return state


def _check_hf_shapes(state: dict[str, torch.Tensor], config: GPTConfig, weights_file: Path) -> None:
    """Name every missing, unexpected or misshapen tensor in GPT-2's terms, before any is converted."""
    meta = {name: torch.empty(shape, device="meta") for name, shape in expected_shapes(config).items()}
    expected = {name: tuple(t.shape) for name, t in to_hf_state(meta, config).items()}
    check_tensor_shapes(state, expected, weights_file, error=InputError, model="a GPT-2 of this config",
                        expects="config.json implies")


def _refuse_to_clobber(output: Path, source: Path, kind: str, ours: Callable[[dict], bool]) -> None:
    """Replacing an earlier output is fine; replacing the source, a folder holding it or inside it, or
    any other folder (a Hugging Face model this command did not write, say) is not.

    An earlier output is a directory whose config.json passes `ours`.
    """
    if output.exists() and not output.is_dir():
        raise InputError(f"{output}: exists and is not a directory")
    out, src = output.resolve(), source.resolve()
    if out == src:
        raise InputError(f"{output}: is the input itself; choose another output")
    if src.is_relative_to(out) or out.is_relative_to(src):
        where = "holds" if src.is_relative_to(out) else "lies inside"
        raise InputError(f"{output}: {where} the input {source}; choose an output beside it")
    if not output.is_dir() or not any(output.iterdir()):
        return
    if not ours(read_config_json(output)):  # HF_CONFIG is our config.json's name too
        raise InputError(f"{output}: exists, is not empty and is not an earlier {kind}; refusing to replace it")


def _write_json(path: Path, body: dict) -> None:
    path.write_text(json.dumps(body, indent=2) + "\n", encoding="utf-8")
