"""HF GPT-2 interop: an export loads in transformers with our logits, generations and token ids;
import reads HF directories (ours or transformers' own) back without loss."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

from mtnlg_ray.checkpoint import load_checkpoint, save_checkpoint
from mtnlg_ray.errors import CheckpointError, InputError
from mtnlg_ray.export import export_hf, import_hf
from mtnlg_ray.model import GPT, PRESETS, pad_vocab
from mtnlg_ray.tokenizer import load_tokenizer

TEXTS = [
    "def greet(name):\n    return f'Hello, {name}!'",
    " leading space, then  two spaces and a tab\there",
    "Unicode: naïve café — 日本語 🙂",
    "Spaces before punctuation , like this . It 's kept .",
]


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir) -> Tokenizer:
    return load_tokenizer(tokenizer_dir)


@pytest.fixture(scope="module")
def checkpoint(tokenizer_dir, tokenizer, tmp_path_factory) -> Path:
    """A `tiny` model with a non-default eps and dropout, so a field the export drops shows up."""
    vocab_size = pad_vocab(tokenizer.get_vocab_size())
    config = dataclasses.replace(PRESETS["tiny"], vocab_size=vocab_size, layer_norm_eps=1e-4, dropout=0.1)
    torch.manual_seed(0)
    model = GPT(config)
    randomize_parameters(model, seed=0)
    out = tmp_path_factory.mktemp("checkpoint") / "tiny"
    return save_checkpoint(model, out, tokenizer_json=tokenizer_dir / "tokenizer.json")


@pytest.fixture(scope="module")
def ours(checkpoint):
    return load_checkpoint(checkpoint)[0]


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory) -> Path:
    return export_hf(checkpoint, tmp_path_factory.mktemp("export") / "hf")


@pytest.fixture(scope="module")
def hf_model(exported) -> GPT2LMHeadModel:
    return GPT2LMHeadModel.from_pretrained(exported).eval()


def max_logit_gap(hf: GPT2LMHeadModel, model, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return (hf(ids).logits - model(ids)).abs().max().item()


def randomize_parameters(model: torch.nn.Module, seed: int) -> None:
    """Every tensor random, LayerNorms and biases too, so a swapped or mis-transposed tensor changes
    the logits; weights large enough that greedy decoding wanders instead of repeating one token."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("bias"):
                p.copy_(0.02 * noise)
            elif name.split(".")[-2].startswith("ln"):
                p.copy_(1.0 + 0.2 * noise)
            else:
                p.copy_(0.2 * noise)


@pytest.mark.parametrize("lengths", [(1,), (7,), (33, 33, 33), (128,)])
def test_exported_model_gives_our_logits(hf_model, ours, lengths):
    gen = torch.Generator().manual_seed(sum(lengths))
    ids = torch.randint(0, ours.config.vocab_size, (len(lengths), lengths[0]), generator=gen)
    assert max_logit_gap(hf_model, ours, ids) <= 1e-4


def test_exported_config_describes_our_model(exported, ours, tokenizer):
    config = json.loads((exported / "config.json").read_text())
    eot = tokenizer.token_to_id("<|endoftext|>")
    assert eot is not None
    c = ours.config
    assert (config["n_embd"], config["n_layer"], config["n_head"]) == (c.d_model, c.n_layer, c.n_head)
    assert (config["n_positions"], config["vocab_size"]) == (c.seq_len, c.vocab_size)
    assert config["bos_token_id"] == config["eos_token_id"] == eot
    assert config["layer_norm_epsilon"] == c.layer_norm_eps
    assert config["resid_pdrop"] == config["embd_pdrop"] == config["attn_pdrop"] == c.dropout
    assert config["tie_word_embeddings"] is True and config["model_type"] == "gpt2"
    # Tied: the output embedding is stored once, as GPT-2's own checkpoints do.
    assert "lm_head.weight" not in load_file(str(exported / "model.safetensors"))


def test_greedy_generation_matches_a_plain_argmax_loop(hf_model, ours, tokenizer):
    eot = tokenizer.token_to_id("<|endoftext|>")
    for text in TEXTS[:3]:
        prompt = tokenizer.encode(text).ids
        ids = list(prompt)
        with torch.no_grad():
            for _ in range(20):
                ids.append(int(ours(torch.tensor([ids]))[0, -1].argmax()))
                if ids[-1] == eot:
                    break
        hf_ids = hf_model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            do_sample=False,
            max_new_tokens=20,
            pad_token_id=eot,
        )
        assert hf_ids[0].tolist() == ids
        assert len(set(ids[len(prompt) :])) > 5  # a model stuck on one token would prove little


def test_auto_tokenizer_encodes_and_decodes_like_ours(exported, tokenizer, ours):
    hf_tok = AutoTokenizer.from_pretrained(exported)
    eot = tokenizer.token_to_id("<|endoftext|>")
    assert hf_tok.eos_token_id == hf_tok.bos_token_id == eot
    assert hf_tok.model_max_length == ours.config.seq_len
    for text in TEXTS:
        ids = tokenizer.encode(text).ids
        assert hf_tok(text)["input_ids"] == ids
        assert hf_tok.decode(ids) == tokenizer.decode(ids) == text
    # load_tokenizer reads a literal "<|endoftext|>" as bytes; transformers, like GPT-2 and a plain
    # Tokenizer.from_file, reads it as the EOS id. Either way EOS decodes to the literal text.
    text = "first document<|endoftext|>second document"
    plain = Tokenizer.from_file(str(exported / "tokenizer.json"))
    ids = hf_tok(text)["input_ids"]
    assert ids == plain.encode(text).ids and ids.count(eot) == 1
    assert hf_tok.decode(ids) == tokenizer.decode(ids, skip_special_tokens=False) == text


def test_import_then_export_is_lossless(checkpoint, exported, tmp_path):
    reimported = import_hf(exported, tmp_path / "ckpt")
    original = load_file(str(checkpoint / "model.safetensors"))
    back = load_file(str(reimported / "model.safetensors"))
    assert back.keys() == original.keys()
    for name, tensor in original.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name
    config = lambda d: json.loads((d / "config.json").read_text())["model"]  # noqa: E731
    assert config(reimported) == config(checkpoint)
    assert (reimported / "tokenizer.json").read_bytes() == (checkpoint / "tokenizer.json").read_bytes()

    again = export_hf(reimported, tmp_path / "hf")
    names = sorted(p.name for p in exported.iterdir())
    assert names == sorted(p.name for p in again.iterdir())
    for name in names:
        assert (again / name).read_bytes() == (exported / name).read_bytes(), name


def test_export_replaces_a_previous_export_in_place(checkpoint, tmp_path):
    out = export_hf(checkpoint, tmp_path / "hf")
    (out / "stale.txt").write_text("from an older export")
    export_hf(checkpoint, out)
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]  # no staging or retired directory left behind


def test_published_folders_are_readable_by_everyone_under_the_usual_umask(checkpoint, tmp_path):
    """An export, an import and a checkpoint are folders other users and pods on a shared volume can read
    (mkdtemp's private 0700 must not survive the rename); a stricter umask is honoured too."""
    import os
    import stat

    from mtnlg_ray.publish import copy_directory, publish_file

    def modes(folder: Path) -> set[int]:
        return {stat.S_IMODE(folder.stat().st_mode)} | {stat.S_IMODE(f.stat().st_mode) for f in folder.iterdir()}

    previous = os.umask(0o022)
    try:
        hf = export_hf(checkpoint, tmp_path / "hf")
        back = import_hf(hf, tmp_path / "back")
        assert stat.S_IMODE(hf.stat().st_mode) == 0o755 and stat.S_IMODE(back.stat().st_mode) == 0o755
        assert all(mode & 0o044 == 0o044 for mode in modes(hf) | modes(back))  # group and others read every file
        # A run's final = its best checkpoint, and single files (manifests, reports), publish the same way.
        final = copy_directory(checkpoint, tmp_path / "run" / "final")
        assert stat.S_IMODE(final.stat().st_mode) == 0o755 and all(m & 0o044 == 0o044 for m in modes(final))
        assert sorted(p.name for p in final.iterdir()) == sorted(p.name for p in checkpoint.iterdir())
        report = publish_file(tmp_path / "run" / "report.json", "{}\n")
        assert report.read_text() == "{}\n" and stat.S_IMODE(report.stat().st_mode) == 0o644
        assert [p.name for p in report.parent.iterdir() if p.name.startswith(".")] == []  # no staging left
        os.umask(0o077)
        private = export_hf(checkpoint, tmp_path / "private")
        assert stat.S_IMODE(private.stat().st_mode) == 0o700
    finally:
        os.umask(previous)


def test_export_and_import_refuse_to_replace_an_unrelated_folder(checkpoint, exported, tmp_path):
    keep = tmp_path / "notes"
    keep.mkdir()
    (keep / "todo.txt").write_text("not a model")
    with pytest.raises(InputError, match="refusing to replace") as exc:
        export_hf(checkpoint, keep)
    assert str(keep) in str(exc.value)
    with pytest.raises(InputError, match="refusing to replace"):
        import_hf(exported, keep)
    with pytest.raises(InputError, match="refusing to replace"):
        import_hf(exported, checkpoint.parent)  # a folder that holds checkpoints is not one
    with pytest.raises(InputError, match="input itself"):
        import_hf(exported, exported)
    assert [p.name for p in keep.iterdir()] == ["todo.txt"]


def test_export_replaces_only_its_own_earlier_output(checkpoint, tmp_path):
    # A Hugging Face model folder the export did not write (one a checkpoint was imported from, a
    # download) has a config.json with a model_type too; replacing it would delete the user's files.
    theirs = tmp_path / "their-gpt2"
    theirs.mkdir()
    (theirs / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 12}))
    (theirs / "README.md").write_text("model card")
    with pytest.raises(InputError, match="not an earlier mtnlg-ray export"):
        export_hf(checkpoint, theirs)
    assert sorted(p.name for p in theirs.iterdir()) == ["README.md", "config.json"]
    mine = export_hf(checkpoint, tmp_path / "mine")
    assert json.loads((mine / "config.json").read_text())["exported_by"] == "mtnlg-ray"
    export_hf(checkpoint, mine)  # its own earlier output is replaced


def test_import_replaces_only_its_own_earlier_output_not_a_trained_checkpoint(checkpoint, exported, tmp_path):
    """Any consolidated checkpoint used to pass as import's earlier output: `import hf --output
    runs/pretrain/final` replaced the trained model without a word."""
    trained = tmp_path / "final"
    shutil.copytree(checkpoint, trained)
    before = (trained / "model.safetensors").read_bytes()
    with pytest.raises(InputError, match=r"not an earlier `mtnlg-ray import hf` output \(an import by an older "
                       r"mtnlg-ray carries no imported_by mark: delete it first\); refusing to replace it"):
        import_hf(exported, trained)
    assert (trained / "model.safetensors").read_bytes() == before
    mine = import_hf(exported, tmp_path / "imported")
    assert json.loads((mine / "config.json").read_text())["imported_by"] == "mtnlg-ray import hf"
    import_hf(exported, mine)  # its own earlier output is replaced
    load_checkpoint(mine)


def test_export_and_import_refuse_an_output_holding_or_inside_their_input(checkpoint, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(checkpoint, ckpt)
    with pytest.raises(InputError, match="lies inside the input"):
        export_hf(ckpt, ckpt / "hf")
    hf = export_hf(ckpt, tmp_path / "hf")
    with pytest.raises(InputError, match="lies inside the input"):
        import_hf(hf, hf / "back")
    with pytest.raises(InputError, match="holds the input"):
        import_hf(hf, tmp_path)  # replacing tmp_path would delete hf, the input itself
    assert (hf / "model.safetensors").is_file() and (ckpt / "model.safetensors").is_file()


def test_export_into_the_working_directory_fills_it_in_place(checkpoint, ours, tmp_path, monkeypatch):
    # `-o .` used to fail with a traceback (Path('.') has no name to rename), and renaming the
    # working directory away would leave the shell in a deleted folder.
    here = tmp_path / "out"
    here.mkdir()
    monkeypatch.chdir(here)
    export_hf(checkpoint, Path("."))
    export_hf(checkpoint, Path("."))  # and again, over its own output
    assert Path.cwd().resolve() == here.resolve() and here.is_dir()
    assert sorted(p.name for p in here.iterdir()) == sorted(p.name for p in export_hf(checkpoint, tmp_path / "b").iterdir())
    back = load_checkpoint(import_hf(here, tmp_path / "back"))[0]
    assert all(torch.equal(back.state_dict()[k], v) for k, v in ours.state_dict().items())


def test_export_into_a_mount_point_fills_it_in_place(checkpoint, tmp_path):
    # A Docker volume or a Kubernetes PVC is a mount point: renaming it fails with EBUSY, which used
    # to end the export in a traceback. A user namespace mounts a tmpfs here as such a volume.
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"]).returncode:
        pytest.skip("unshare -rm (a user namespace) is not allowed here")
    volume = tmp_path / "volume"
    volume.mkdir()
    script = (f"mount -t tmpfs none {volume} && {sys.executable} -m mtnlg_ray export hf -c {checkpoint} -o {volume}"
              f" && {sys.executable} -m mtnlg_ray export hf -c {checkpoint} -o {volume} && ls -A {volume}")
    result = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-600:]
    listed = result.stdout.split("\n")[-7:-1]
    assert sorted(listed) == sorted(p.name for p in export_hf(checkpoint, tmp_path / "plain").iterdir())


def test_export_over_a_symlink_replaces_the_folder_it_points_to(checkpoint, tmp_path):
    first = export_hf(checkpoint, tmp_path / "v1")
    (tmp_path / "latest").symlink_to("v1")
    (first / "generation_config.json").unlink()  # so the re-export shows in v1
    export_hf(checkpoint, tmp_path / "latest")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "v1"]
    assert (tmp_path / "latest").is_symlink() and (first / "generation_config.json").is_file()


def test_a_checkpoint_config_with_a_float_size_is_one_line(checkpoint, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(checkpoint, bad)
    body = json.loads((bad / "config.json").read_text())
    body["model"]["n_layer"] = float(body["model"]["n_layer"])
    (bad / "config.json").write_text(json.dumps(body))
    with pytest.raises(CheckpointError, match=r"config.json: model.n_layer: expected a positive integer, got \d+\.0"):
        load_checkpoint(bad)


@pytest.fixture(scope="module")
def transformers_gpt2(tokenizer) -> GPT2LMHeadModel:
    """A GPT-2 built by transformers itself: unpadded vocab, its own eps and activation spelling."""
    config = GPT2Config(
        vocab_size=tokenizer.get_vocab_size() + 3,
        n_positions=64,
        n_embd=64,
        n_layer=2,
        n_head=4,
        activation_function="gelu_pytorch_tanh",
        layer_norm_epsilon=1e-6,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=tokenizer.token_to_id("<|endoftext|>"),
        eos_token_id=tokenizer.token_to_id("<|endoftext|>"),
    )
    torch.manual_seed(7)
    model = GPT2LMHeadModel(config).eval()
    randomize_parameters(model, seed=7)
    return model


def save_hf_dir(model: GPT2LMHeadModel, tokenizer_dir: Path, out: Path) -> Path:
    model.save_pretrained(out)
    shutil.copyfile(tokenizer_dir / "tokenizer.json", out / "tokenizer.json")
    return out


def save_pickled_hf_dir(model: GPT2LMHeadModel, tokenizer_dir: Path, out: Path, lm_head=None) -> Path:
    """An older layout: pytorch_model.bin, names without `transformer.`, the causal-mask buffers saved too."""
    out.mkdir()
    model.config.save_pretrained(out)
    shutil.copyfile(tokenizer_dir / "tokenizer.json", out / "tokenizer.json")
    state = {k.removeprefix("transformer."): v for k, v in model.state_dict().items()}
    n = model.config.n_positions
    for i in range(model.config.n_layer):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n, n, dtype=torch.bool)).view(1, 1, n, n)
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    state["lm_head.weight"] = state["wte.weight"].clone() if lm_head is None else lm_head
    torch.save(state, out / "pytorch_model.bin")
    return out


def test_import_of_a_transformers_saved_model_gives_its_logits(transformers_gpt2, tokenizer_dir, tmp_path):
    ckpt = import_hf(save_hf_dir(transformers_gpt2, tokenizer_dir, tmp_path / "hf"), tmp_path / "ckpt")
    model, _ = load_checkpoint(ckpt)
    assert model.config.vocab_size == transformers_gpt2.config.vocab_size
    assert model.config.seq_len == 64 and model.config.layer_norm_eps == 1e-6
    ids = torch.randint(0, model.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(3))
    assert max_logit_gap(transformers_gpt2, model, ids) <= 1e-4


def test_import_of_a_pickled_unprefixed_model_with_buffers(transformers_gpt2, tokenizer_dir, tmp_path):
    ckpt = import_hf(save_pickled_hf_dir(transformers_gpt2, tokenizer_dir, tmp_path / "hf"), tmp_path / "ckpt")
    model, _ = load_checkpoint(ckpt)
    ids = torch.randint(0, model.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(4))
    assert max_logit_gap(transformers_gpt2, model, ids) <= 1e-4


def test_import_rejects_an_untied_output_embedding(transformers_gpt2, tokenizer_dir, tmp_path):
    wte = transformers_gpt2.transformer.wte.weight.detach()
    hf_dir = save_pickled_hf_dir(transformers_gpt2, tokenizer_dir, tmp_path / "hf", lm_head=wte + 1.0)
    with pytest.raises(InputError, match="lm_head.weight") as exc:
        import_hf(hf_dir, tmp_path / "ckpt")
    assert str(hf_dir / "pytorch_model.bin") in str(exc.value)
    assert not (tmp_path / "ckpt").exists()


class _Planted:
    """A pickled object whose loading would run a shell command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("how", ["torch.save", "pickle"])
def test_import_refuses_a_bin_that_would_run_code_in_one_line_without_torchs_advice_to_allow_it(
        transformers_gpt2, tokenizer_dir, tmp_path, how):
    """The refusal passed on torch's "Re-running torch.load with weights_only set to False will likely
    succeed", after a two-line UserWarning about the pickle protocol."""
    import pickle
    import warnings

    hf_dir = save_pickled_hf_dir(transformers_gpt2, tokenizer_dir, tmp_path / "hf")
    marker = tmp_path / "ran"
    state = {"wte.weight": torch.zeros(2, 2), "planted": _Planted(marker)}
    if how == "torch.save":
        torch.save(state, hf_dir / "pytorch_model.bin")
    else:  # a plain pickle's tensors are themselves globals torch refuses: the planted object alone
        (hf_dir / "pytorch_model.bin").write_bytes(pickle.dumps({"planted": state["planted"]}, protocol=2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a warning on the way is a failure
        with pytest.raises(InputError, match=f"^{hf_dir / 'pytorch_model.bin'}: refused to load: it holds more "
                                             "than tensors \\(") as exc:
            import_hf(hf_dir, tmp_path / "ckpt")
    assert "weights_only" not in str(exc.value) and "\n" not in str(exc.value)
    assert "(the global posix.system)" in str(exc.value), str(exc.value)
    assert not marker.exists() and not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize("content", [b"\x80\x02" + bytes(range(7, 200)), b"not a pickle at all"])
def test_import_of_a_corrupt_bin_says_it_is_no_state_dict_not_that_it_would_run_code(
        transformers_gpt2, tokenizer_dir, tmp_path, content):
    hf_dir = save_pickled_hf_dir(transformers_gpt2, tokenizer_dir, tmp_path / "hf")
    (hf_dir / "pytorch_model.bin").write_bytes(content)
    with pytest.raises(InputError, match=f"^{hf_dir / 'pytorch_model.bin'}: not a plain tensor state dict") as exc:
        import_hf(hf_dir, tmp_path / "ckpt")  # random bytes were a KeyError traceback
    assert "weights_only" not in str(exc.value)


def test_export_of_a_missing_checkpoint_names_it(tmp_path):
    missing = tmp_path / "no-such-checkpoint"
    with pytest.raises(CheckpointError, match="not found") as exc:
        export_hf(missing, tmp_path / "hf")
    assert str(missing) in str(exc.value) and "\n" not in str(exc.value)


def test_import_of_a_missing_directory_names_it(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(InputError, match="not found") as exc:
        import_hf(missing, tmp_path / "ckpt")
    assert str(missing) in str(exc.value)


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [("model_type", "llama", "model_type"), ("activation_function", "relu", "activation_function")],
)
def test_import_rejects_what_our_model_cannot_compute(exported, tmp_path, key, value, match):
    hf_dir = Path(shutil.copytree(exported, tmp_path / "hf"))
    config = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**config, key: value}))
    with pytest.raises(InputError, match=match) as exc:
        import_hf(hf_dir, tmp_path / "ckpt")
    assert str(hf_dir / "config.json") in str(exc.value) and "\n" not in str(exc.value)


def test_import_needs_a_tokenizer_json(exported, tmp_path):
    hf_dir = Path(shutil.copytree(exported, tmp_path / "hf"))
    (hf_dir / "tokenizer.json").unlink()
    with pytest.raises(InputError, match="tokenizer.json") as exc:
        import_hf(hf_dir, tmp_path / "ckpt")
    assert str(hf_dir / "tokenizer.json") in str(exc.value)


def test_import_of_our_own_checkpoint_says_it_needs_no_import(checkpoint, tmp_path):
    # it said "model_type is None; only 'gpt2' can be imported"
    with pytest.raises(InputError, match=f"^{checkpoint / 'config.json'}: an mtnlg-ray checkpoint already; give "
                                         f"{checkpoint} to the commands as it is"):
        import_hf(checkpoint, tmp_path / "ckpt")
