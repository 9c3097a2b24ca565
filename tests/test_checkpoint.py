import json
import os

import pytest
import torch
from safetensors.torch import load_file

from mtnlg_ray.checkpoint import load_checkpoint, save_checkpoint
from mtnlg_ray.errors import CheckpointError
from mtnlg_ray.model import GPT, PRESETS


@pytest.fixture()
def saved(tmp_path):
    torch.manual_seed(0)
    model = GPT(PRESETS["tiny"]).eval()
    path = save_checkpoint(model, tmp_path / "ckpt")
    return model, path


def test_round_trip_is_exact_and_stores_no_pickle(saved):
    model, path = saved
    loaded, meta = load_checkpoint(path)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    assert meta["model"]["n_layer"] == 4
    assert sorted(os.listdir(path)) == ["config.json", "model.safetensors"]
    assert set(load_file(str(path / "model.safetensors"))) == set(model.state_dict())


def test_overwrite_is_atomic_and_leaves_no_temporaries(saved, tmp_path):
    model, path = saved
    with torch.no_grad():
        model.ln_f.bias.fill_(0.5)
    save_checkpoint(model, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert torch.all(load_checkpoint(path)[0].ln_f.bias == 0.5)


def test_truncated_weights_are_one_clear_error(saved):
    _, path = saved
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="model.safetensors: unreadable or truncated"):
        load_checkpoint(path)


def test_garbage_weights_are_one_clear_error(saved):
    _, path = saved
    (path / "model.safetensors").write_bytes(b"\x00\x01not a safetensors file")
    with pytest.raises(CheckpointError, match="unreadable or truncated"):
        load_checkpoint(path)


def test_config_that_does_not_match_the_weights(saved):
    _, path = saved
    body = json.loads((path / "config.json").read_text())
    body["model"]["d_model"] = 256
    (path / "config.json").write_text(json.dumps(body))
    with pytest.raises(CheckpointError, match=r"tensor '.*' has shape \[.*\], config expects"):
        load_checkpoint(path)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.int64])
def test_a_tensor_of_another_dtype_is_one_clear_error(saved, dtype):
    """One bf16 LayerNorm among fp32 weights (or an integer tensor) used to load without a word and fail
    in generate's first matmul with a traceback; the header check, run before workers load, refused nothing."""
    from safetensors.torch import save_file

    from mtnlg_ray.checkpoint import check_checkpoint

    model, path = saved
    weights = path / "model.safetensors"
    state = load_file(str(weights))
    state["blocks.0.ln1.weight"] = state["blocks.0.ln1.weight"].to(dtype)
    save_file(state, str(weights))
    name = str(dtype).removeprefix("torch.")
    for read in (load_checkpoint, check_checkpoint):
        with pytest.raises(CheckpointError, match=f"^{weights}: tensor 'blocks.0.ln1.weight' has dtype {name}, "):
            read(path)
    save_file({k: v.to(torch.bfloat16) for k, v in state.items()}, str(weights))  # one dtype throughout is fine
    check_checkpoint(path)
    assert load_checkpoint(path)[0].ln_f.weight.dtype == torch.bfloat16


def test_missing_pieces(tmp_path, saved):
    _, path = saved
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "absent")
    (path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json: not valid JSON"):
        load_checkpoint(path)
    (path / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json: missing"):
        load_checkpoint(path)


def test_unknown_model_key_in_config(saved):
    _, path = saved
    body = json.loads((path / "config.json").read_text())
    body["model"]["n_experts"] = 8
    (path / "config.json").write_text(json.dumps(body))
    with pytest.raises(CheckpointError, match="unknown model key 'n_experts'") as err:
        load_checkpoint(path)
    assert str(err.value).startswith(f"{path / 'config.json'}: unknown")  # the path once, not twice


def test_refuses_to_replace_a_folder_that_is_not_a_checkpoint(tmp_path):
    precious = tmp_path / "notes"
    precious.mkdir()
    (precious / "thesis.txt").write_text("years of work")
    with pytest.raises(CheckpointError, match="exists and is not a checkpoint"):
        save_checkpoint(GPT(PRESETS["tiny"]), precious)
    assert (precious / "thesis.txt").read_text() == "years of work"


def _sharded_checkpoint(directory, step: int, world: int) -> None:
    """A training checkpoint as `save_sharded` lays it out: DCP shards, trainer state, one RNG file a rank."""
    import torch.distributed.checkpoint as dcp

    from mtnlg_ray.train.checkpoint import STATE_FILE

    dcp.save({"model": {"w": torch.full((4,), float(step))}}, checkpoint_id=str(directory))
    (directory / STATE_FILE).write_text(json.dumps({"step": step, "world_size": world}))
    for rank in range(world):
        (directory / f"rng-rank{rank}.json").write_text("{}")


def test_resume_passes_over_a_checkpoint_copied_only_in_part(tmp_path):
    """A failure while Ray copies a checkpoint into the run directory leaves some of its files: the
    newest complete checkpoint is the one to resume from."""
    from mtnlg_ray.train.checkpoint import latest_checkpoint

    for step in (10, 20):
        (tmp_path / f"checkpoint_{step}").mkdir()
        _sharded_checkpoint(tmp_path / f"checkpoint_{step}", step, world=2)
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint_20"
    shard = next((tmp_path / "checkpoint_20").glob("*.distcp"))
    shard.unlink()  # a shard never arrived
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint_10"
    (tmp_path / "checkpoint_10" / "rng-rank1.json").unlink()  # nor one rank's RNG state
    assert latest_checkpoint(tmp_path) is None


def test_resume_passes_over_a_checkpoint_whose_files_were_copied_only_in_part(tmp_path):
    """Ray copies each file into the run directory in place: a failure mid-copy leaves a shard, a
    rank's RNG state or the model shape there but cut short, which used to be taken as complete and
    failed every restart (a worker's traceback) instead of resuming from the checkpoint before it."""
    from mtnlg_ray.train.checkpoint import MODEL_FILE, latest_checkpoint

    def cut_short(path):
        path.write_bytes(path.read_bytes()[: path.stat().st_size - 1])

    for step in (10, 20):
        (tmp_path / f"checkpoint_{step}").mkdir()
        _sharded_checkpoint(tmp_path / f"checkpoint_{step}", step, world=2)
        (tmp_path / f"checkpoint_{step}" / MODEL_FILE).write_text(json.dumps({"n_layer": 4}))
    newest = tmp_path / "checkpoint_20"
    for cut in (next(newest.glob("*.distcp")), newest / "rng-rank1.json", newest / MODEL_FILE):
        intact = cut.read_bytes()
        assert latest_checkpoint(tmp_path) == newest
        cut_short(cut)
        assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint_10", cut.name
        cut.write_bytes(intact)


class _Planted:
    """Unpickled, it makes a folder: what a planted pickle in a run directory could do instead of that."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return os.mkdir, (self.marker,)


def _dotted_global(module: str, name: str, argument: str) -> bytes:
    """A protocol-4 pickle calling `module`'s `name` (which pickle resolves dot by dot) on `argument`."""
    import pickle

    def text(value: str) -> bytes:
        return pickle.dumps(value, protocol=4)[2:-1]  # the string's opcodes, no frame header or STOP

    return b"\x80\x04" + text(module) + text(name) + b"\x93" + pickle.dumps((argument,), protocol=4)[2:-1] + b"R."


def test_resume_runs_no_code_from_a_checkpoints_pickles(tmp_path):
    """DCP keeps its metadata and the optimizer's non-tensor values as pickles. A truncated `.metadata`
    is passed over (it used to crash every restart); a planted one is refused in one line, not run and
    not passed over (which would start the run afresh); a planted value is refused too."""
    import pickle

    import torch.distributed.checkpoint as dcp

    from mtnlg_ray.errors import CheckpointError
    from mtnlg_ray.train.checkpoint import SafeLoadPlanner, SafeReader, latest_checkpoint

    marker = tmp_path / "ran"
    for step in (10, 20):
        (tmp_path / f"checkpoint_{step}").mkdir()
        _sharded_checkpoint(tmp_path / f"checkpoint_{step}", step, world=1)
    metadata = tmp_path / "checkpoint_20" / ".metadata"
    metadata.write_bytes(metadata.read_bytes()[: metadata.stat().st_size // 2])
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint_10"
    (tmp_path / "checkpoint_30").mkdir()
    _sharded_checkpoint(tmp_path / "checkpoint_30", 30, world=1)
    # os.mkdir by its own name, and by a dotted name through the metadata module (which imports os)
    for planted in (pickle.dumps(_Planted(str(marker))),
                    _dotted_global("torch.distributed.checkpoint.metadata", "os.mkdir", str(marker))):
        (tmp_path / "checkpoint_30" / ".metadata").write_bytes(planted)
        with pytest.raises(CheckpointError, match=r"checkpoint_30/.metadata: refused to load \(.*mkdir is not part"):
            latest_checkpoint(tmp_path)
        assert not marker.exists()
    with pytest.raises(OSError):  # the dotted pickle does run under a plain unpickler: the test plants a real one
        pickle.loads(_dotted_global("torch.distributed.checkpoint.metadata", "os.mkdir", str(tmp_path)))

    planted = tmp_path / "planted_value"
    dcp.save({"w": torch.ones(2), "lr": _Planted(str(marker))}, checkpoint_id=str(planted))
    loaded = {"w": torch.zeros(2), "lr": 0.0}
    with pytest.raises(dcp.api.CheckpointException, match="Weights only load failed"):
        dcp.load(loaded, storage_reader=SafeReader(str(planted)), planner=SafeLoadPlanner())
    assert not marker.exists()
    dcp.save({"w": torch.ones(2), "lr": 3e-4, "betas": (0.9, 0.95)}, checkpoint_id=str(tmp_path / "plain"))
    loaded = {"w": torch.zeros(2), "lr": 0.0, "betas": (0.0, 0.0)}
    dcp.load(loaded, storage_reader=SafeReader(str(tmp_path / "plain")), planner=SafeLoadPlanner())
    assert loaded["lr"] == 3e-4 and loaded["betas"] == (0.9, 0.95) and torch.equal(loaded["w"], torch.ones(2))


def _corrupt(path, how: str) -> None:
    weights, config = path / "model.safetensors", path / "config.json"
    if how == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif how == "garbage":
        weights.write_bytes(b"\x00\x01not a safetensors file")
    elif how == "missing":
        weights.unlink()
    elif how == "fewer layers":  # config.json describes 3 of the 4 stored layers: the fourth is left over
        body = json.loads(config.read_text())
        body["model"]["n_layer"] -= 1
        config.write_text(json.dumps(body))
    else:  # a config.json that no longer describes the tensors
        body = json.loads(config.read_text())
        body["model"][how] = 2 * body["model"][how]
        config.write_text(json.dumps(body))


@pytest.mark.parametrize("how", ["truncated", "garbage", "missing", "d_model", "n_layer", "fewer layers"])
def test_the_header_check_refuses_what_loading_refuses(saved, how):
    """`check_checkpoint` (what drivers run before workers load weights) refuses each broken
    checkpoint that `load_checkpoint` refuses, with a line naming the same file. Tensors left over
    (a config edited to fewer layers) used to be ignored: the model loaded without its last layer."""
    from mtnlg_ray.checkpoint import check_checkpoint

    _, path = saved
    assert check_checkpoint(path)["model"]["n_layer"] == 4  # the intact one passes
    _corrupt(path, how)
    with pytest.raises(CheckpointError) as loading:
        load_checkpoint(path)
    with pytest.raises(CheckpointError) as checking:
        check_checkpoint(path)
    weights = f"{path / 'model.safetensors'}: "
    assert str(loading.value).startswith(weights) and str(checking.value).startswith(weights)
    assert "\n" not in str(checking.value)
    if how == "fewer layers":
        left_over = f"{weights}unexpected tensor 'blocks.3.attn.proj.bias' for this model config"
        assert str(checking.value) == str(loading.value) == left_over


def test_the_header_check_reads_a_classifier_as_loading_it_would(saved, tmp_path):
    """A classifier passes as a language model (its head ignored, as `load_checkpoint` ignores it) and
    as a classifier; a task section a classifier reader refuses fails only the classifier check."""
    from mtnlg_ray.checkpoint import check_checkpoint, load_classifier, save_classifier
    from mtnlg_ray.model.classifier import GPTClassifier

    model, _ = saved
    path = save_classifier(GPTClassifier(model, 3, "mean"), ["a", "b", "c"], tmp_path / "clf")
    check_checkpoint(path)
    assert check_checkpoint(path, classifier=True)["task"]["labels"] == ["a", "b", "c"]
    body = json.loads((path / "config.json").read_text())
    body["task"]["labels"] = ["a", "b"]  # the head still has three outputs
    (path / "config.json").write_text(json.dumps(body))
    load_checkpoint(path)
    check_checkpoint(path)
    with pytest.raises(CheckpointError, match=r"expected \[2, 128\] for 2 labels"):
        load_classifier(path)
    with pytest.raises(CheckpointError, match=r"tensor 'head.weight' has shape \[3, 128\], config expects \[2, 128\]"):
        check_checkpoint(path, classifier=True)
    # a stray tensor beside the head: one line from both classifier readers (loading raised torch's error)
    from safetensors.torch import load_file, save_file

    body["task"]["labels"] = ["a", "b", "c"]
    (path / "config.json").write_text(json.dumps(body))
    weights = str(path / "model.safetensors")
    save_file({**load_file(weights), "head.scale": torch.ones(3)}, weights)
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'head.scale' for a classification head"):
        load_classifier(path)
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'head.scale'"):
        check_checkpoint(path, classifier=True)
    check_checkpoint(path)  # a language-model reader skips the head's tensors, all of them


def test_a_resumed_run_trains_with_its_own_betas_eps_and_weight_decay(tmp_path):
    """The optimizer state in a checkpoint holds its param groups' settings too: a re-run with
    --set train.weight_decay=0.01 (or another beta2) resumed with the checkpoint's 0.1 and 0.95, without
    a word. The moments and step counts are the checkpoint's; the settings are this run's."""
    from mtnlg_ray.train.checkpoint import TrainerState, load_sharded, save_sharded
    from mtnlg_ray.train.parallel import param_groups

    torch.manual_seed(0)
    config = PRESETS["tiny"]
    model = GPT(config)
    optimizer = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-3, betas=(0.9, 0.95), eps=1e-8)
    model(torch.zeros(1, 8, dtype=torch.long)).float().sum().backward()
    optimizer.step()
    save_sharded(tmp_path / "ckpt", [model], [optimizer], TrainerState(step=1), config, 0)

    again = GPT(config)
    resumed = torch.optim.AdamW(param_groups(again, 0.01), lr=1e-3, betas=(0.8, 0.99), eps=1e-6)
    load_sharded(tmp_path / "ckpt", [again], [resumed], 0)
    assert [(g["weight_decay"], tuple(g["betas"]), g["eps"]) for g in resumed.param_groups] == [
        (0.01, (0.8, 0.99), 1e-6), (0.0, (0.8, 0.99), 1e-6)]
    moments = [resumed.state[p]["exp_avg"] for p in again.parameters()]
    assert all(torch.equal(m, optimizer.state[p]["exp_avg"]) for m, p in zip(moments, model.parameters()))


def test_a_checkpoint_path_that_does_not_exist_is_not_reported_as_a_missing_tokenizer(tmp_path):
    """`finetune --set init.checkpoint=/nonexistent` said its tokenizer.json was missing, as if the folder were there."""
    from mtnlg_ray.checkpoint import tokenizer_path

    with pytest.raises(CheckpointError, match=rf"^{tmp_path / 'absent'}: checkpoint not found$"):
        tokenizer_path(tmp_path / "absent")
    # A folder that is something else was "its tokenizer.json: missing" too: it says what it is
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=rf"^{tmp_path / 'empty'}: no checkpoint; expected a checkpoint "
                                              "directory holding model.safetensors and config.json$"):
        tokenizer_path(tmp_path / "empty")
    for name, marker, kind in (("data", "manifest.json", "a prepared dataset"),
                               ("ngram", "ngram.json", r"an n-gram classifier \(self-train's teacher, not a GPT\)"),
                               ("st", "round1/final/config.json", "a self-train run directory; its rounds' classifiers "
                                                                  "are in .*/st/roundN/final")):
        (tmp_path / name / marker).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name / marker).write_text("{}")
        with pytest.raises(CheckpointError, match=rf"^{tmp_path / name}: {kind}; expected a checkpoint directory"):
            tokenizer_path(tmp_path / name)


def test_generator_states_are_restored_only_at_the_layout_that_saved_them(tmp_path):
    """Rank r's saved stream was rank r's role: resumed at another layout (pp2 -> tp2), tp peers got two
    pipeline stages' streams and dropped different positions of a residual stream they hold alike."""
    from mtnlg_ray.train.checkpoint import TrainerState, load_sharded, save_sharded
    from mtnlg_ray.train.parallel import param_groups

    config = PRESETS["tiny"]
    model = GPT(config)
    optimizer = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-3)
    torch.manual_seed(123)
    save_sharded(tmp_path / "ckpt", [model], [optimizer], TrainerState(step=1, world_size=2, pp=2), config, 0)
    saved = torch.get_rng_state()
    for layout, restored in (((2, 1, 1, 2), True), ((2, 1, 2, 1), False), (None, True)):
        torch.manual_seed(7)  # what the loop seeds before resuming
        seeded = torch.get_rng_state()
        load_sharded(tmp_path / "ckpt", [model], [optimizer], 0, layout)
        assert torch.equal(torch.get_rng_state(), saved if restored else seeded), layout


def test_weights_holding_nan_are_one_line_for_every_reader(saved, tmp_path):
    """A diverged run's NaN weights loaded without a word: evaluate printed nan, generate an empty line,
    and a fine-tune from them trained on NaN. The training reader checks the slices it read."""
    from safetensors.torch import save_file

    from mtnlg_ray.train.checkpoint import load_consolidated_slices

    _, path = saved
    weights = path / "model.safetensors"
    state = load_file(str(weights))
    name = "blocks.1.mlp.fc1.weight"
    state[name][3, 5] = float("nan")
    state[name][4, 1] = float("inf")
    save_file(state, str(weights))
    expected = f"^{weights}: tensor '{name}' holds NaN or infinite values"
    with pytest.raises(CheckpointError, match=expected):
        load_checkpoint(path)
    fresh = GPT(PRESETS["tiny"])
    with pytest.raises(CheckpointError, match=expected):
        load_consolidated_slices(fresh, path, set(fresh.state_dict()))
    state[name][3, 5], state[name][4, 1] = 0.5, 0.25  # finite again: both readers take it, value for value
    save_file(state, str(weights))
    assert torch.equal(load_checkpoint(path)[0].state_dict()[name], state[name])
    load_consolidated_slices(fresh, path, set(fresh.state_dict()))
    assert torch.equal(fresh.state_dict()[name], state[name])


def test_weights_file_that_is_a_folder_says_so(saved):
    _, path = saved
    weights = path / "model.safetensors"
    weights.unlink()
    weights.mkdir()
    with pytest.raises(CheckpointError, match=f"^{weights}: a folder, expected the safetensors file"):
        load_checkpoint(path)


def test_a_run_directory_or_a_sharded_checkpoint_given_as_a_checkpoint_says_what_to_give(saved, tmp_path):
    """evaluate / generate / serve / a self-training teacher said "config.json: missing (is runs/x a
    consolidated checkpoint?)" for a run directory, and a fine-tune from a sharded training checkpoint
    said its tokenizer.json was missing."""
    import shutil

    from mtnlg_ray.checkpoint import read_checkpoint_config, tokenizer_path
    from mtnlg_ray.finetune.trainer import start_checkpoint

    _, path = saved
    run = tmp_path / "runs" / "pretrain"
    shutil.copytree(path, run / "final")
    sharded = run / "checkpoint_2026-12-07_07-46-55.387718"
    sharded.mkdir()
    (sharded / ".metadata").write_bytes(b"dcp")
    (sharded / "trainer_state.json").write_text('{"step": 4}')
    for read in (read_checkpoint_config, load_checkpoint, tokenizer_path):
        with pytest.raises(CheckpointError, match=f"^{run}: a run directory; give its consolidated checkpoint, "
                                                  f"{run / 'final'}$"):
            read(run)
        with pytest.raises(CheckpointError, match=f"^{sharded}: a sharded training checkpoint \\(it resumes a run\\); "
                                                  f"give the run's consolidated checkpoint, {run / 'final'}$"):
            read(sharded)
    shutil.move(run / "final", tmp_path / "aside")  # a run still going, or stopped: no final/ yet
    with pytest.raises(CheckpointError, match=f"{run / 'final'}, which the run writes when it ends"):
        read_checkpoint_config(sharded)
    shutil.move(tmp_path / "aside", run / "final")
    assert start_checkpoint(run) == run / "final"  # a fine-tune takes the run directory as it did
    with pytest.raises(CheckpointError, match="a sharded training checkpoint"):
        start_checkpoint(sharded)


def test_init_never_replaces_a_checkpoint_it_did_not_write(tiny_checkpoint, tokenizer_dir, tmp_path):
    """`init -o runs/pretrain/final` replaced the trained weights with random ones and exited 0."""
    import shutil

    from mtnlg_ray.checkpoint import init_checkpoint

    trained = tmp_path / "final"
    shutil.copytree(tiny_checkpoint, trained)
    before = (trained / "model.safetensors").read_bytes()
    with pytest.raises(CheckpointError, match=f"^{trained}: holds a checkpoint that init did not write"):
        init_checkpoint("tiny", tokenizer_dir, trained)
    assert (trained / "model.safetensors").read_bytes() == before
    # Its own earlier output it replaces (another seed here); a prepared dataset's folder names its tokenizer.
    dataset = tmp_path / "data"
    shutil.copytree(tokenizer_dir, dataset / "tokenizer")
    first = init_checkpoint("tiny", dataset, tmp_path / "random", seed=0)
    seed0 = (first / "model.safetensors").read_bytes()
    again = init_checkpoint("tiny", tokenizer_dir, tmp_path / "random", seed=1)
    assert first == again and (again / "model.safetensors").read_bytes() != seed0
    model, _ = load_checkpoint(again)
    assert model.config.vocab_size == load_checkpoint(tiny_checkpoint)[0].config.vocab_size
