"""Parallel training equals single-process training: FSDP, DDP and tensor parallel on 2 real processes.

One spawn of two gloo ranks runs every distributed variant; the pytest process runs the
single-process reference, which clips with torch's own `clip_grads_with_norm_`.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import time
from contextlib import nullcontext

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

from safetensors.torch import save_file

from mtnlg_ray.errors import ConfigError
from mtnlg_ray.model.gpt import GPT, lm_loss
from mtnlg_ray.model.presets import PRESETS
from mtnlg_ray.train.checkpoint import load_consolidated_slices
from mtnlg_ray.train.parallel import (
    build_mesh,
    check_layout,
    clip_grad_norm,
    full_state_dict,
    initialise_shards,
    local_param_bytes,
    loss_parallel_context,
    mean_over_dp,
    no_grad_sync,
    param_groups,
    parallelize,
    plain,
)

CONFIG = PRESETS["tiny"]  # fp32, dropout 0
VOCAB_4K = dataclasses.replace(CONFIG, vocab_size=4096)  # where the embedding is a third of the model
STEPS, GLOBAL_BATCH, MICRO, SEQ = 20, 8, 2, 33
LR, WEIGHT_DECAY, GRAD_CLIP = 3e-3, 0.1, 1.0
# Adam's eps, far above float rounding in the gradients (~1e-9) yet below most true gradients
# (~1e-3 after clipping): an element whose gradient is zero up to rounding (a key bias: softmax
# ignores a shift shared by every key) then moves by rounding/eps x lr, not by a whole lr step in a
# random direction as it does at eps 1e-8, so the final weights of any layout can be held to 1e-5.
ADAM_EPS = 1e-4

# name → (tp, fsdp, steps, parallelize keyword arguments)
VARIANTS = {
    "fsdp": (1, True, STEPS, {}),
    "ddp": (1, False, STEPS, {}),
    "tp": (2, True, STEPS, {}),  # sequence parallel, vocabulary-parallel embedding, loss parallel
    "tp_no_sp": (2, True, STEPS, {"sequence_parallel": False}),
    "fsdp_ac": (1, True, STEPS, {"activation_checkpointing": True}),
    "tp_bf16": (2, True, 5, {"mixed_precision": torch.bfloat16}),
}


def token_batches() -> torch.Tensor:
    """The same (STEPS, GLOBAL_BATCH, SEQ) tokens in every process, from an eighth of the vocabulary
    so the loss has something to learn within 20 steps."""
    gen = torch.Generator().manual_seed(7)
    return torch.randint(0, CONFIG.vocab_size // 8, (STEPS, GLOBAL_BATCH, SEQ), generator=gen)


def fresh_model() -> GPT:
    torch.manual_seed(0)
    return GPT(CONFIG)


def make_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(param_groups(model, WEIGHT_DECAY), lr=LR, betas=(0.9, 0.95), eps=ADAM_EPS)


def train_reference() -> tuple[list[float], list[float], dict[str, torch.Tensor]]:
    """One process, the whole global batch, clipped by torch: what every variant must match.

    The norm is taken in float64 (torch's fp32 norm of the embedding gradient is off by ~3e-5
    relative on CPU), then `clip_grads_with_norm_` scales as `clip_grad_norm_` would.
    """
    model = fresh_model()
    optimizer = make_optimizer(model)
    accum = GLOBAL_BATCH // MICRO
    losses, norms = [], []
    for batch in token_batches():
        total = 0.0
        for micro in batch.split(MICRO):
            loss = lm_loss(model(micro[:, :-1]), micro[:, 1:])
            (loss / accum).backward()
            total += loss.item()
        norm = torch.stack([p.grad.double().norm() for p in model.parameters()]).norm().float()
        torch.nn.utils.clip_grads_with_norm_(model.parameters(), GRAD_CLIP, norm)
        norms.append(float(norm))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(total / accum)
    return losses, norms, model.state_dict()


def train_parallel(model: torch.nn.Module, mesh, steps: int) -> tuple[list[float], list[float]]:
    """Each dp rank runs its slice of the global batch in micro-batches, syncing grads on the last one."""
    dp, dp_rank = mesh["dp"].size(), mesh["dp"].get_local_rank()
    accum = GLOBAL_BATCH // (MICRO * dp)
    optimizer = make_optimizer(model)
    losses, norms = [], []
    for batch in token_batches()[:steps]:
        total = torch.zeros(())
        for i, micro in enumerate(batch.chunk(dp)[dp_rank].split(MICRO)):
            with no_grad_sync(model) if i < accum - 1 else nullcontext(), loss_parallel_context(mesh):
                loss = plain(lm_loss(model(micro[:, :-1]), micro[:, 1:]))
                (loss / accum).backward()
            total += loss.detach()
        norms.append(clip_grad_norm(model, GRAD_CLIP))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(mean_over_dp(total / accum, mesh))
    return losses, norms


def distributed_worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        meshes = {tp: build_mesh(2, tp, "cpu") for tp in (1, 2)}
        results: dict = {"errors": {}}
        for name, (tp, fsdp, steps, options) in VARIANTS.items():
            start = time.perf_counter()
            model = parallelize(fresh_model(), meshes[tp], fsdp=fsdp, **options)
            losses, norms = train_parallel(model, meshes[tp], steps)
            names = {id(p): unwrapped(n) for n, p in model.named_parameters()}
            results[name] = {
                "losses": losses,
                "norms": norms,
                "state": full_state_dict(model),
                "decayed": {names[id(p)] for p in param_groups(model, WEIGHT_DECAY)[0]["params"]},
                "seconds": time.perf_counter() - start,
            }

        # What each tp rank holds while training: its half of the vocabulary's logits inside the
        # loss context (whole logits outside it), its half of the positions between the blocks.
        model = parallelize(fresh_model(), meshes[2], fsdp=True)
        seen: dict = {}
        model.blocks[1].ln1.register_forward_hook(lambda m, i, o: seen.update(ln1=tuple(o.to_local().shape)))
        tokens = token_batches()[0, :MICRO]
        with loss_parallel_context(meshes[2]):
            logits = model(tokens[:, :-1])
            seen["sharded"] = (type(logits).__name__, tuple(logits.to_local().shape))
            loss = plain(lm_loss(logits, tokens[:, 1:]))
            loss.backward()
        seen["whole"] = (type(model(tokens[:, :-1])).__name__, tuple(model(tokens[:, :-1]).shape))
        seen["embedding"] = tuple(model.tok_emb.weight.to_local().shape)
        results["shapes"] = seen

        # Built on the meta device, parallelized, then only each rank's shards made and initialised:
        # gathered, the weights must be one process's `reset_parameters(seed)` exactly.
        results["meta_init"] = {}
        for tp in (1, 2):
            with torch.device("meta"):
                model = GPT(VOCAB_4K)
            kinds = model.parameter_kinds()
            model = parallelize(model, meshes[tp], fsdp=True)
            model.to_empty(device="cpu")
            initialise_shards(model, kinds, VOCAB_4K.init_std, seed=11)
            results["meta_init"][tp] = {
                "state": full_state_dict(model),
                "local_bytes": local_param_bytes(model),
            }

        # Started from a consolidated checkpoint: each rank reads its slices of model.safetensors
        # into the shards it holds; gathered, they are the file's tensors.
        results["sliced"] = {}
        for tp in (1, 2):
            with torch.device("meta"):
                model = GPT(VOCAB_4K)
            model = parallelize(model, meshes[tp], fsdp=True)
            model.to_empty(device="cpu")
            filled = load_consolidated_slices(model, os.path.join(out_dir, "init"), set(GPT(VOCAB_4K).state_dict()))
            results["sliced"][tp] = {"state": full_state_dict(model), "filled": filled}

        # Mistakes are refused with a ConfigError on every rank alike, before any collective runs.
        one_head = dataclasses.replace(CONFIG, n_head=1)
        attempts = {
            "ddp_with_tp": lambda: parallelize(fresh_model(), meshes[2], fsdp=False),
            "heads_not_divisible": lambda: parallelize(GPT(one_head), meshes[2], fsdp=True),
            "bf16_without_fsdp": lambda: parallelize(
                fresh_model(), meshes[1], fsdp=False, mixed_precision=torch.bfloat16
            ),
            "world_mismatch": lambda: build_mesh(4, 2, "cpu"),
        }
        for name, attempt in attempts.items():
            try:
                attempt()
                results["errors"][name] = None
            except ConfigError as exc:
                results["errors"][name] = str(exc)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def unwrapped(name: str) -> str:
    """A parameter's name without DDP's, compile's and the checkpoint wrapper's prefixes."""
    wrappers = {"module", "_orig_mod", "_checkpoint_wrapped_module"}
    return ".".join(part for part in name.split(".") if part not in wrappers)


def start_weights() -> dict[str, torch.Tensor]:
    """What the consolidated checkpoint the workers start from holds."""
    model = GPT(VOCAB_4K)
    model.reset_parameters(seed=5)
    return model.state_dict()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def reference():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each worker does; on a loaded 2-core box more threads only contend
    try:
        return train_reference()
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def distributed(tmp_path_factory):
    out = tmp_path_factory.mktemp("parallel")
    (out / "init").mkdir()
    save_file(start_weights(), str(out / "init" / "model.safetensors"))
    mp.spawn(distributed_worker, args=(free_port(), str(out)), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def max_diff(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) for x, y in zip(a, b))


def weight_diffs(state: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> dict[str, float]:
    """Max |Δ| per tensor."""
    return {key: (value - ref[key]).abs().max().item() for key, value in state.items()}


@pytest.mark.parametrize("variant", ["fsdp", "ddp", "tp", "tp_no_sp", "fsdp_ac"])
def test_parallel_training_matches_single_process(variant, reference, distributed):
    ref_losses, ref_norms, ref_state = reference
    rank0, rank1 = (d[variant] for d in distributed)
    # Every rank reports the same global loss and grad norm.
    assert rank0["losses"] == rank1["losses"]
    assert rank0["norms"] == rank1["norms"]
    assert len(rank0["losses"]) == STEPS
    assert max_diff(rank0["losses"], ref_losses) <= 1e-4, (variant, max_diff(rank0["losses"], ref_losses))
    assert max_diff(rank0["norms"], ref_norms) <= 1e-5 * max(ref_norms)
    assert max(ref_norms) > GRAD_CLIP  # clipping was active, so a wrong global norm would show
    assert ref_losses[-1] < ref_losses[0] - 0.5  # the weights moved
    state = rank0["state"]
    assert list(state) == list(ref_state)  # exactly GPT().state_dict() names, no wrapper prefixes
    for key, value in state.items():
        assert type(value) is torch.Tensor and value.dtype == torch.float32, key
    # Rounding moves these weights by ~2e-7 (ADAM_EPS keeps Adam from amplifying it); a layout bug
    # that leaves losses within 1e-4 still moves some weight by a good part of lr (3e-3).
    diffs = weight_diffs(state, ref_state)
    assert max(diffs.values()) <= 1e-5, diffs
    assert rank1["state"] == {}  # the full copy is gathered on rank 0 only


@pytest.mark.parametrize("tp", [1, 2])
def test_meta_device_init_gives_one_processs_weights_on_every_layout(distributed, tp):
    one = GPT(VOCAB_4K)
    one.reset_parameters(seed=11)
    expected = one.state_dict()
    gathered = distributed[0]["meta_init"][tp]["state"]
    assert list(gathered) == list(expected)
    for key, value in expected.items():
        assert torch.equal(gathered[key], value), key  # bit for bit
    # each rank made only its shards: FSDP over 2 ranks (tp=1), or at tp=2 the blocks and the
    # vocabulary split in two, with only biases of row-parallel layers, LayerNorms and positions whole
    full_bytes = 4 * sum(v.numel() for v in expected.values())
    for rank in distributed:
        local = rank["meta_init"][tp]["local_bytes"]
        assert local <= 0.55 * full_bytes, (tp, local / full_bytes)


def test_tensor_parallel_splits_vocabulary_and_sequence(distributed):
    V, T, d = CONFIG.vocab_size, SEQ - 1, CONFIG.d_model
    for rank in distributed:
        shapes = rank["shapes"]
        assert shapes["sharded"] == ("DTensor", (MICRO, T, V // 2))  # no rank made whole-vocabulary logits
        assert shapes["whole"] == ("Tensor", (MICRO, T, V))  # generation and scoring see whole logits
        assert shapes["ln1"] == (MICRO, T // 2, d)  # LayerNorm on half the positions
        # FSDP (dp=1 here, so whole) over the tp shard: half the vocabulary's rows
        assert shapes["embedding"] == (V // 2, d)


@pytest.mark.parametrize("tp", [1, 2])
def test_a_consolidated_checkpoint_loads_slice_by_slice_into_any_layout(distributed, tp):
    expected = start_weights()
    run = distributed[0]["sliced"][tp]
    assert run["filled"] == set(expected)
    assert list(run["state"]) == list(expected)
    for key, value in expected.items():
        assert torch.equal(run["state"][key], value), key


def test_initial_values_depend_on_seed_and_name_only():
    a, b = GPT(CONFIG), GPT(dataclasses.replace(CONFIG, n_layer=2))
    a.reset_parameters(seed=3)
    b.reset_parameters(seed=3)
    for key, value in b.state_dict().items():
        assert torch.equal(value, a.state_dict()[key]), key  # a shorter model shares its blocks' values
    c = GPT(CONFIG)
    c.reset_parameters(seed=4)
    assert not torch.equal(c.tok_emb.weight, a.tok_emb.weight)
    assert not torch.equal(a.blocks[0].attn.qkv.weight, a.blocks[1].attn.qkv.weight)
    assert a.blocks[0].ln1.weight.eq(1).all() and a.blocks[0].attn.qkv.bias.eq(0).all()
    assert abs(float(a.tok_emb.weight.std()) - CONFIG.init_std) < 0.05 * CONFIG.init_std


def test_bf16_params_follow_fp32_training(reference, distributed):
    ref_losses = reference[0]
    run = distributed[0]["tp_bf16"]
    assert max_diff(run["losses"], ref_losses) <= 0.05
    # bf16 really ran: fp32 rounding between layouts moves losses by 1e-6 at most
    assert max_diff(run["losses"], ref_losses) > 1e-4, max_diff(run["losses"], ref_losses)
    # Sharded master weights stay fp32; only the all-gathered compute copies are bf16.
    assert all(v.dtype == torch.float32 for v in run["state"].values())


def test_distributed_mistakes_are_config_errors(distributed):
    for errors in (d["errors"] for d in distributed):
        assert "tp=1" in errors["ddp_with_tp"]
        assert "model.n_head (1)" in errors["heads_not_divisible"]
        assert "fsdp=true" in errors["bf16_without_fsdp"]
        assert "2 ranks" in errors["world_mismatch"]


def test_check_layout_accepts_valid_layouts():
    check_layout(CONFIG, 1, tp=1, pp=1)
    check_layout(CONFIG, (1, 8), tp=1, pp=1)
    check_layout(CONFIG, (2, 2), tp=2, pp=1)
    check_layout(CONFIG, 4, tp=4, pp=1, fsdp=True)
    check_layout(CONFIG, 2, tp=1, pp=1, fsdp=True, precision="bf16")
    check_layout(CONFIG, 8, tp=2, pp=2)
    check_layout(CONFIG, 2, tp=1, pp=2, pp_schedule="interleaved-1f1b", pp_virtual=2)


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"pp_schedule": "zigzag"}, "parallel.pp_schedule: expected one of gpipe, 1f1b, interleaved-1f1b"),
        ({"pp_schedule": "interleaved-1f1b"}, "set parallel.pp_virtual >= 2"),
        ({"pp_virtual": 2}, "parallel.pp_virtual=2 needs an interleaved schedule (interleaved-1f1b or "
                            "interleaved-zero-bubble)"),
        ({"pp_layers": [3, 2]}, "parallel.pp_layers: expected 2 positive layer counts (one a stage) adding up to "
                                "model.n_layer=4, got [3, 2]"),
    ],
)
def test_pipeline_settings_are_checked_before_anything_starts(options, expected):
    with pytest.raises(ConfigError) as info:
        check_layout(CONFIG, 2, tp=1, pp=2, **options)
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_stage_splits_without_a_pipeline_and_too_many_virtual_stages_are_named_as_set():
    """At pp 1 a stage split did nothing without a word; too many virtual stages blamed parallel.pp
    for a count (pp x pp_virtual) the user never typed."""
    for options, expected in (({"pp_layers": [2, 2]}, "parallel.pp_layers splits the model into pipeline stages, "
                                                      "but parallel.pp=1 (no pipeline)"),
                              ({"pp_virtual": 2, "pp_schedule": "interleaved-1f1b"}, "parallel.pp_virtual=2 splits")):
        with pytest.raises(ConfigError, match=re.escape(expected)):
            check_layout(CONFIG, 2, tp=1, pp=1, **options)
    with pytest.raises(ConfigError, match=re.escape("parallel.pp x parallel.pp_virtual = 2 x 4 = 8 pipeline stages "
                                                    "for 4 layers leaves stages empty")):
        check_layout(CONFIG, 2, tp=1, pp=2, pp_schedule="interleaved-1f1b", pp_virtual=4)


def test_zero_bubble_is_refused_where_fsdp_would_give_it_wrong_gradients():
    check_layout(CONFIG, 2, tp=1, pp=2, pp_schedule="interleaved-zero-bubble", pp_virtual=2)  # dp 1, fp32
    for workers, precision in ((4, "fp32"), (2, "bf16")):
        with pytest.raises(ConfigError, match="interleaved-zero-bubble runs only without FSDP"):
            check_layout(CONFIG, workers, tp=1, pp=2, precision=precision, pp_schedule="interleaved-zero-bubble",
                         pp_virtual=2)


@pytest.mark.parametrize(
    ("workers", "tp", "pp", "fsdp", "precision", "expected"),
    [
        ((1, 3), 2, 1, True, "fp32", "parallel.workers: [1, 3] with parallel.tp=2 lets a run start 1 worker, not a multiple"),
        # Ray may start any count in the range: 3 of [2, 4] would leave dp = 1.5
        ((2, 4), 2, 1, True, "fp32", "lets a run start 3 workers, not a multiple of tp (dp would not be whole); give a fixed"),
        (3, 2, 1, True, "fp32", "parallel.workers: 3 with parallel.tp=2"),
        (8, 8, 1, True, "fp32", "parallel.tp=8 must divide model.n_head (4)"),
        (3, 1, 2, True, "fp32", "parallel.workers: 3 with parallel.tp=1 x parallel.pp=2 lets a run start 3 workers, not a "
                                "multiple of tp x pp"),
        (8, 1, 8, True, "fp32", "parallel.pp: 8 pipeline stages for 4 layers leaves stages empty"),
        (2, 1, 2, False, "fp32", "parallel.fsdp=false (DDP) works only with parallel.pp=1"),
        (2, 2, 1, False, "fp32", "parallel.fsdp=false (DDP) works only with parallel.tp=1"),
        (2, 1, 1, False, "bf16", "train.precision=bf16 needs parallel.fsdp=true"),
    ],
)
def test_check_layout_refuses_bad_layouts(workers, tp, pp, fsdp, precision, expected):
    with pytest.raises(ConfigError) as info:
        check_layout(CONFIG, workers, tp=tp, pp=pp, fsdp=fsdp, precision=precision)
    assert expected in str(info.value)
    assert "\n" not in str(info.value)


def test_sequence_parallel_needs_a_context_that_splits_evenly():
    odd = dataclasses.replace(CONFIG, seq_len=33)
    with pytest.raises(ConfigError, match=r"parallel.tp=2 must divide model.seq_len \(33\)"):
        check_layout(odd, 2, tp=2, pp=1)
    check_layout(odd, 2, tp=2, pp=1, sequence_parallel=False)  # without it, any length
    with pytest.raises(ConfigError, match=r"must divide model.vocab_size \(2050\)"):
        check_layout(dataclasses.replace(CONFIG, vocab_size=2050), 4, tp=4, pp=1)


@pytest.mark.parametrize(("world", "tp"), [(4, 3), (2, 0), (3, 2)])
def test_build_mesh_refuses_uneven_tp(world, tp):
    with pytest.raises(ConfigError, match=f"parallel.tp={tp} must divide the number of workers"):
        build_mesh(world, tp, "cpu")


MATRICES = {"tok_emb.weight", "pos_emb.weight"} | {
    f"blocks.{i}.{m}.weight" for i in range(CONFIG.n_layer) for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
}


def test_param_groups_decay_only_matrices():
    model = fresh_model()
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    decayed = {names[id(p)] for p in decay["params"]}
    assert decayed == MATRICES
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_param_groups_read_sharded_params_alike(distributed):
    for run in distributed[0].values():
        if "decayed" in run:
            assert run["decayed"] == MATRICES


def test_clip_grad_norm_matches_torch_on_a_plain_model():
    a, b = fresh_model(), fresh_model()
    tokens = token_batches()[0]
    for model in (a, b):
        (lm_loss(model(tokens[:, :-1]), tokens[:, 1:]) * 100).backward()
    exact = torch.stack([p.grad.double().norm() for p in a.parameters()]).norm().item()
    torch_norm = float(torch.nn.utils.clip_grad_norm_(a.parameters(), 0.5))
    assert torch_norm > 0.5 and torch_norm == pytest.approx(exact, rel=1e-4)  # torch sums in fp32
    assert clip_grad_norm(b, 0.5) == pytest.approx(exact, rel=1e-9)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-4, atol=1e-8)  # the two norms differ in fp32 rounding


def test_full_state_dict_drops_wrapper_prefixes():
    model = fresh_model()
    expected = model.state_dict()
    for i, block in enumerate(model.blocks):
        model.blocks[i] = torch.compile(checkpoint_wrapper(block))  # compiles lazily: nothing runs here
    assert "blocks.0._orig_mod.ln1.weight" in model.state_dict()  # the checkpoint wrapper hides its own prefix
    state = full_state_dict(model)
    assert list(state) == list(expected)
    assert all(torch.equal(state[k], expected[k]) for k in expected)


def test_mean_over_dp_without_a_mesh_is_the_value():
    assert mean_over_dp(torch.tensor(2.5), None) == 2.5


def test_pipeline_stages_chained_are_the_whole_model():
    """The model cut by `pipeline_part` into stages (names kept), run one after another, is the model."""
    import copy

    from mtnlg_ray.model.gpt import pipeline_part
    from mtnlg_ray.train.pipeline import stage_layers, stages_of_rank

    model = fresh_model().eval()
    layers = stage_layers(CONFIG.n_layer, 3)
    assert [list(r) for r in layers] == [[0, 1], [2], [3]]  # the first stages take the remainder
    assert stage_layers(CONFIG.n_layer, 2, [1, 3]) == [range(0, 1), range(1, 4)]
    assert stages_of_rank(1, pp=2, virtual=2) == [1, 3]
    stages = [pipeline_part(copy.deepcopy(model), r, i == 0, i == 2) for i, r in enumerate(layers)]
    names = [set(stage.state_dict()) for stage in stages]
    assert names[0] == {"tok_emb.weight", "pos_emb.weight"} | {n for n in model.state_dict() if n.startswith(("blocks.0.", "blocks.1."))}
    assert names[2] == {"tok_emb.weight", "ln_f.weight", "ln_f.bias"} | {n for n in model.state_dict() if n.startswith("blocks.3.")}
    assert set().union(*names) == set(model.state_dict())
    tokens = token_batches()[0, :2, :-1]
    x = tokens
    for stage in stages:
        x = stage(x)
    assert torch.equal(x, model(tokens))


def dropout_worker(rank: int, port: int, out_dir: str) -> None:
    """tp2 with dropout 0.5: each rank's masks, and gradients with and without recomputing the blocks."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        mesh = build_mesh(2, 2, "cpu")
        tokens = token_batches()[0, :MICRO]
        results: dict = {}
        for sequence_parallel in (True, False):
            torch.manual_seed(5)
            config = dataclasses.replace(CONFIG, dropout=0.5)
            model = parallelize(GPT(config), mesh, fsdp=True, sequence_parallel=sequence_parallel)
            model.train()
            seen = {}
            model.blocks[0].drop.register_forward_hook(lambda m, i, o: seen.setdefault("residual", o.detach() == 0))
            torch.manual_seed(7)
            model(tokens[:, :-1])
            results[sequence_parallel] = seen["residual"]
        grads = {}
        for recompute in (False, True):
            config = dataclasses.replace(CONFIG, dropout=0.5, activation_checkpointing=recompute)
            torch.manual_seed(5)
            model = parallelize(GPT(config), mesh, fsdp=True)
            model.train()
            torch.manual_seed(7)
            with loss_parallel_context(mesh):
                plain(lm_loss(model(tokens[:, :-1]), tokens[:, 1:])).backward()
            grads[recompute] = {n: plain(p.grad).clone() for n, p in model.named_parameters()}
        results["recompute_diff"] = max(float((grads[True][n] - grads[False][n]).abs().max()) for n in grads[False])
        results["grad_size"] = max(float(g.abs().max()) for g in grads[False].values())
        torch.save(results, os.path.join(out_dir, f"dropout{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_tensor_parallel_ranks_drop_their_own_shards_and_recompute_the_same_masks(tmp_path):
    """Every tp rank used to draw its dropout masks from one seed, so the sequence shards and head
    groups of a layer repeated one pattern. Now each rank drops its own positions with a mask of its
    own (under sequence parallelism), the whole residual stream of tp without it alike on every rank,
    and activation checkpointing recomputes each mask exactly: the same gradients."""
    mp.spawn(dropout_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"dropout{r}.pt", weights_only=True) for r in (0, 1)]
    sharded = [r[True] for r in ranks]
    assert sharded[0].shape == sharded[1].shape and not torch.equal(sharded[0], sharded[1])
    assert 0.4 < float(sharded[0].float().mean()) < 0.6  # dropout 0.5 really drops
    assert torch.equal(ranks[0][False], ranks[1][False])  # a replicated residual: one mask
    for r in ranks:
        assert r["grad_size"] > 1e-3 and r["recompute_diff"] <= 1e-6 * r["grad_size"]


def schedule_memory_worker(rank: int, port: int, out_dir: str) -> None:
    """pp2: the schedules a runner keeps through a batch ramp and an evaluation, and what they hold."""
    from mtnlg_ray.model.gpt import pipeline_part
    from mtnlg_ray.train.parallel import ParallelDims
    from mtnlg_ray.train.pipeline import PipelineRunner, stage_layers

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        mesh = ParallelDims(world=2, pp=2).build_mesh("cpu")
        torch.manual_seed(0)
        part = pipeline_part(GPT(CONFIG), stage_layers(CONFIG.n_layer, 2)[rank], rank == 0, rank == 1)
        runner = PipelineRunner([part], [rank], 2, mesh, torch.device("cpu"), "1f1b",
                                lambda logits, targets: lm_loss(logits, targets))
        tokens = token_batches()[0]
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        kept = []
        for n in (2, 4, 8):  # a ramp-up's micro-batch counts, one after another
            runner.train_step(inputs, targets, n)
            kept.append(len(runner._schedules))
        runner.evaluate(inputs, targets, 4)
        held = sum(len(stage.fwd_cache) for _, stages in runner._schedules.values() for stage in stages)
        torch.save({"kept": kept, "held_after_eval": held}, os.path.join(out_dir, f"schedules{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_a_pipeline_keeps_one_schedule_and_no_evaluation_outputs(tmp_path):
    """Each schedule's stages hold a receive buffer a micro-batch: one kept for every count a batch
    ramp-up passes through added up to tens of GiB at GPT-3 sizes. And an evaluation's stages kept every
    micro-batch's outputs (the last stage's logits) until it ran again, through the training between."""
    mp.spawn(schedule_memory_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        result = torch.load(tmp_path / f"schedules{rank}.pt", weights_only=True)
        assert result == {"kept": [1, 1, 1], "held_after_eval": 0}
