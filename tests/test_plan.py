"""The training planner reproduces the MT-NLG paper's numbers and flags layouts that cannot work."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from mtnlg_ray.errors import ConfigError
from mtnlg_ray.model.flops import (GPUS, flops_per_token, matmul_parameters, megatron_flops_per_iteration,
                                   sequence_flops)
from mtnlg_ray.cli.render import render_plan
from mtnlg_ray.model.plan import plan_layout
from mtnlg_ray.model.presets import build_on_meta, get_preset


def paper_layout(dp: int, iter_time: float | None, **kwargs) -> dict:
    return plan_layout("mtnlg-530b", tp=8, pp=35, dp=dp, global_batch=1920, seq_len=2048, iter_time=iter_time, **kwargs)


def test_mtnlg_530b_has_529_6_billion_parameters():
    result = paper_layout(8, None)
    assert result["params"] == pytest.approx(529.6e9, rel=0.005)
    assert result["vocab_size"] == 50272


@pytest.mark.parametrize(
    ("dp", "iter_time", "tflops"),
    [(8, 60.1, 125.7), (10, 50.2, 120.4), (12, 44.4, 113.5)],
)
def test_paper_throughput_per_gpu(dp, iter_time, tflops):
    # Smith et al. 2022, table 1: 2240 / 2800 / 3360 A100s at batch 1920.
    result = paper_layout(dp, iter_time)
    assert result["gpus"] == 8 * 35 * dp
    assert result["tflops_per_gpu"] == pytest.approx(tflops, rel=0.01)
    assert result["hfu"] == pytest.approx(tflops / 312.0, rel=0.01)
    # MFU counts no recompute: three passes of four.
    assert result["mfu"] == pytest.approx(0.75 * result["hfu"], rel=0.01)
    assert result["warnings"] == []


def test_gpt3_175b_parameter_count():
    result = plan_layout("gpt3-175b", tp=8, pp=8, dp=1)
    assert result["params"] == pytest.approx(175e9, rel=0.01)


def test_parameter_count_is_the_models_with_the_tied_embedding_once():
    config = get_preset("gpt3-125m")
    l, h, v, s = config.n_layer, config.d_model, config.vocab_size, config.seq_len
    # Blocks, one token embedding that is also the output layer, positions, final LayerNorm.
    expected = l * (12 * h * h + 13 * h) + v * h + s * h + 2 * h
    assert plan_layout("gpt3-125m", 1, 1, 1)["params"] == expected
    model = build_on_meta(config)
    assert model.num_parameters() == expected
    assert matmul_parameters(config) == expected - s * h


def test_params_per_gpu_follow_the_tensor_and_pipeline_split():
    config = get_preset("tiny")
    h, v, s = config.d_model, config.vocab_size, config.seq_len
    sharded = 12 * h * h + 7 * h  # qkv and fc1 weights and biases, proj and fc2 weights
    replicated = 6 * h  # proj and fc2 biases, two LayerNorms
    # 4 layers on 2 stages; stage 0 also holds half the token embedding and the position embedding.
    expected = 2 * (sharded // 2 + replicated) + v * h // 2 + s * h
    assert plan_layout("tiny", tp=2, pp=2, dp=1)["params_per_gpu"] == expected
    assert plan_layout("tiny", tp=1, pp=1, dp=4)["params_per_gpu"] == plan_layout("tiny", 1, 1, 1)["params"]


def test_megatron_formula_without_recompute_drops_one_forward_pass():
    B, s, l, h, V = 1920, 2048, 105, 20480, 50272
    with_recompute = megatron_flops_per_iteration(B, s, l, h, V)
    without = megatron_flops_per_iteration(B, s, l, h, V, recompute=False)
    one_forward_of_the_layers = 24 * B * s * l * h * h + 4 * B * s * s * l * h
    assert with_recompute - without == pytest.approx(one_forward_of_the_layers, rel=1e-12)


def test_flops_per_token_matches_megatron_without_recompute():
    config = get_preset("mtnlg-530b")
    tokens = 1920 * config.seq_len
    megatron = megatron_flops_per_iteration(
        1920, config.seq_len, config.n_layer, config.d_model, config.vocab_size, recompute=False
    )
    # They differ only by the biases' and LayerNorms' 6 FLOPs per parameter per token.
    assert flops_per_token(config) * tokens == pytest.approx(megatron, rel=1e-3)


def test_sequence_flops_count_each_sequence_at_its_own_length_and_the_head_it_runs():
    config = get_preset("small")
    s, l, h, V = config.seq_len, config.n_layer, config.d_model, config.vocab_size
    # Sequences of the context's length: flops_per_token per token (pretraining's MFU stays as it was).
    assert sequence_flops(config, [s] * 3) == pytest.approx(3 * s * flops_per_token(config), rel=1e-12)
    # A short sequence attends over its own length, not the context's.
    assert sequence_flops(config, [10]) == pytest.approx(10 * (6 * matmul_parameters(config) + 12 * l * 10 * h))
    # A classifier makes no vocabulary logits: 6·V·h a token less.
    assert sequence_flops(config, [10]) - sequence_flops(config, [10], lm_head=False) == pytest.approx(10 * 6 * V * h)
    # LoRA's backbone takes no weight gradients (4 FLOPs a parameter), but the attention, which has no
    # weights, still runs its whole backward; a frozen backbone runs forward only (2 and a third of it).
    n, tokens, squares = matmul_parameters(config), 7 + 30, 7**2 + 30**2
    full = sequence_flops(config, [7, 30])
    assert full == pytest.approx(6 * n * tokens + 12 * l * h * squares)
    assert sequence_flops(config, [7, 30], mode="lora") == pytest.approx(4 * n * tokens + 12 * l * h * squares)
    assert sequence_flops(config, [7, 30], mode="frozen") == pytest.approx(full * 2 / 6)


def test_mfu_is_against_the_chosen_gpu_peak():
    a100 = paper_layout(8, 60.1)
    h100 = paper_layout(8, 60.1, gpu="h100-80gb")
    assert h100["tflops_per_gpu"] == a100["tflops_per_gpu"]
    assert h100["mfu"] == pytest.approx(a100["mfu"] * 312.0 / 989.0)
    assert GPUS["h200-141gb"].memory_gb == 141
    assert paper_layout(8, None)["tflops_per_gpu"] is None
    assert paper_layout(8, None)["mfu"] is None


def test_activation_memory_follows_korthikanti():
    config = get_preset("tiny")
    s, h, a, l = config.seq_len, config.d_model, config.n_head, config.n_layer
    full_layer = s * h * (34 + 5 * a * s / h)
    memory = plan_layout("tiny", 1, 1, 1, micro_batch=1)["memory_gb_per_gpu"]
    assert memory["activations"] == pytest.approx(l * full_layer / 1e9)
    # Full recompute keeps each layer's input, plus one layer's activations while it is recomputed.
    assert memory["activations_recompute"] == pytest.approx((l * 2 * s * h + full_layer) / 1e9)
    # Tensor + sequence parallel split the activations by tp.
    split = plan_layout("tiny", 2, 1, 1)["memory_gb_per_gpu"]
    assert split["activations"] == pytest.approx(memory["activations"] / 2)


def test_first_pipeline_stage_holds_pp_micro_batches():
    few = plan_layout("gpt3-13b", tp=1, pp=4, dp=1, global_batch=2)
    many = plan_layout("gpt3-13b", tp=1, pp=4, dp=1, global_batch=64)
    # 10 layers a stage; with 2 micro-batches only 2 are in flight, with 64 the first stage holds 4.
    assert few["busiest_stage"] == 0
    assert many["memory_gb_per_gpu"]["activations"] == pytest.approx(2 * few["memory_gb_per_gpu"]["activations"])
    assert any("cannot fill 4 pipeline stages" in w for w in few["warnings"])


def test_recompute_and_distributed_optimizer_save_memory():
    plain = paper_layout(8, None, recompute=False, distributed_optimizer=False)
    recompute = paper_layout(8, None, recompute=True, distributed_optimizer=False)
    both = paper_layout(8, None, recompute=True, distributed_optimizer=True)
    assert recompute["memory_gb_per_gpu"]["total"] < plain["memory_gb_per_gpu"]["total"]
    assert both["memory_gb_per_gpu"]["total"] < recompute["memory_gb_per_gpu"]["total"]
    memory = both["memory_gb_per_gpu"]
    assert memory["optimizer_distributed"] == pytest.approx(memory["optimizer"] / 8)
    assert memory["weights"] == pytest.approx(2 * both["params_per_gpu"] / 1e9)
    assert memory["optimizer"] == pytest.approx(6 * memory["weights"])
    # MT-NLG needed activation recompute: without it the first stage overflows an 80 GB A100.
    assert not plain["fits"]
    assert any(w.startswith("does not fit") for w in plain["warnings"])
    assert recompute["fits"] and recompute["memory_gb_per_gpu"]["fits"]


def test_530b_on_one_gpu_does_not_fit():
    result = plan_layout("mtnlg-530b", 1, 1, 1, gpu="h200-141gb")
    assert not result["fits"]
    assert result["memory_gb_per_gpu"]["capacity"] == 141


def test_warnings_for_layouts_that_do_not_divide():
    result = plan_layout("mtnlg-530b", tp=3, pp=4, dp=2, global_batch=1921)
    text = "\n".join(result["warnings"])
    assert "n_head 128 is not divisible by tp 3" in text
    assert "d_model 20480 is not divisible by tp 3" in text
    assert "n_layer 105 is not divisible by pp 4" in text
    assert "global batch 1921 is not divisible" in text
    assert result["global_batch"] == 1920
    assert result["layers_per_stage"] == 27


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tp": 0}, "tp: expected a positive integer"),
        ({"pp": -1}, "pp: expected a positive integer"),
        ({"dp": 0}, "dp: expected a positive integer"),
        ({"gpu": "v100"}, "gpu: unknown GPU 'v100'"),
        ({"preset": "gpt5"}, "unknown preset 'gpt5'"),
        ({"iter_time": 0.0}, "iter_time"),
        ({"pp": 5}, "pp: 5 pipeline stages for 4 layers"),
        ({"global_batch": 1, "dp": 2}, "global_batch: 1 is smaller"),
    ],
)
def test_bad_arguments_raise_one_line_config_errors(kwargs, message):
    args = {"preset": "tiny", "tp": 1, "pp": 1, "dp": 1, **kwargs}
    with pytest.raises(ConfigError) as info:
        plan_layout(**args)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_render_plan_shows_numbers_with_units():
    result = plan_layout("mtnlg-530b", tp=8, pp=35, dp=8, global_batch=1920, iter_time=60.1, recompute=False)
    out = io.StringIO()
    Console(file=out, width=200).print(render_plan(result))
    text = out.getvalue()
    assert "529.58 B" in text
    assert "125.7 TFLOP/s" in text
    assert "GB of 80 GB" in text
    assert "does not fit" in text


def test_plan_reports_the_schedules_bubble_and_the_command_for_its_layout():
    import json as _json

    from conftest import run_cli

    plain = plan_layout("gpt3-175b", tp=8, pp=16, dp=8, global_batch=1536)
    interleaved = plan_layout("gpt3-175b", tp=8, pp=16, dp=8, global_batch=1536, schedule="interleaved-1f1b", virtual=2)
    m, p = plain["micro_batches"], 16
    assert plain["pipeline_bubble"] == pytest.approx((p - 1) / (m + p - 1))
    # interleaving divides the bubble's time by v: (p - 1) / (v m + p - 1) of the iteration, not a v-th
    # of 1F1B's share (Narayanan et al. 2021)
    assert interleaved["pipeline_bubble"] == pytest.approx((p - 1) / (2 * m + p - 1))
    # the first rank warms up (v - 1) p + 2 (p - 1) + 1 = 47 chunks of 3 layers, not 1F1B's 16 x 6:
    # 1 + (p - 1) / (p v) times the activations (Korthikanti et al. 2022)
    ratio = (interleaved["memory_gb_per_gpu"]["activations"] / plain["memory_gb_per_gpu"]["activations"])
    assert ratio == pytest.approx(1 + (p - 1) / (p * 2))
    result = run_cli("plan", "--preset", "gpt3-175b", "--tp", "8", "--pp", "16", "--dp", "8", "--global-batch", "1536",
                     "--schedule", "interleaved-1f1b", "--virtual", "2", "--json")
    assert result.returncode == 0, result.stderr
    command = _json.loads(result.stdout)["command"]
    assert "--set parallel.workers=1024 --set parallel.tp=8 --set parallel.pp=16" in command
    assert "--set parallel.pp_schedule=interleaved-1f1b --set parallel.pp_virtual=2" in command
    # the run the memory was planned for: full recompute, and the sequence length asked for
    assert "--set model.activation_checkpointing=true" in command and "model.seq_len" not in command
    longer = _json.loads(run_cli("plan", "--preset", "gpt3-125m", "--seq-len", "4096", "--json").stdout)["command"]
    assert "--set model.seq_len=4096" in longer
    # a layout the trainer cannot run is not planned
    refused = run_cli("plan", "--preset", "gpt3-175b", "--tp", "8", "--pp", "16", "--schedule", "interleaved-1f1b")
    assert refused.returncode == 2
    assert refused.stderr.strip() == "error: --schedule interleaved-1f1b runs several stages a rank: set --virtual >= 2"
    # nor a batch the trainer's schedule would refuse: 9 micro-batches are no whole rounds of pp=4
    uneven = run_cli("plan", "--preset", "gpt3-125m", "--pp", "4", "--virtual", "2", "--schedule", "interleaved-1f1b",
                     "--global-batch", "9")
    assert uneven.returncode == 2
    assert uneven.stderr.strip().startswith("error: --schedule interleaved-1f1b: 9 micro-batches a step do not split into 2 rounds of --pp 4")


@pytest.mark.parametrize(("args", "expected"), [
    (["--dp", "0"], "error: --dp: expected a positive integer, got 0"),  # were `dp`, `parallel.tp`, `model.seq_len`
    (["--tp", "0"], "error: --tp: expected a positive integer, got 0"),
    (["--seq-len", "0"], "error: --seq-len: expected a positive integer, got 0"),
    (["--iter-time", "-1"], "error: --iter-time: expected seconds greater than 0, got -1.0"),
    (["--virtual", "2"], "error: --virtual 2: stages a rank of a pipeline, but --pp is 1 (no pipeline)"),
    # listed as accepted, then refused for "dp=1 in bf16"
    (["--pp", "2", "--virtual", "2", "--schedule", "interleaved-zero-bubble"],
     "error: --schedule: expected one of gpipe, 1f1b, interleaved-1f1b (a plan is bf16 with FSDP, which "
     "interleaved-zero-bubble does not run with), got 'interleaved-zero-bubble'"),
    (["--iter-time", "inf"], "error: --iter-time: expected seconds greater than 0, got inf"),  # was 0.0 TFLOP/s
    # the layout checks pretrain shares said parallel.tp=5, parallel.pp, global_batch, micro_batch × dp
    (["--tp", "5"], "error: --tp 5 must divide model.n_head (12) to split it evenly across ranks"),
    (["--gpu", "v100"], "error: --gpu: unknown GPU 'v100' (expected one of a100-80gb, h100-80gb, h200-141gb)"),
    (["--iter-time", "nan"], "error: --iter-time: expected seconds greater than 0, got nan"),
    (["--pp", "13"], "error: --pp: 13 pipeline stages for 12 layers leaves stages empty"),
    (["--micro-batch", "4", "--dp", "2", "--global-batch", "4"],
     "error: --global-batch: 4 is smaller than --micro-batch × --dp = 8"),
    # suggested interleaved-zero-bubble, which --schedule refuses
    (["--pp", "2", "--virtual", "2"], "error: --virtual 2: several stages a rank need --schedule interleaved-1f1b"),
])
def test_plan_names_a_bad_option_as_typed(args, expected):
    from typer.testing import CliRunner

    from mtnlg_ray.cli import app

    result = CliRunner().invoke(app, ["plan", "--preset", "gpt3-125m", *args])  # in-process: CI's minutes
    assert isinstance(result.exception, ConfigError) and f"error: {result.exception}" == expected, result.output


def test_plan_pads_a_tokenizers_vocabulary_as_pretrain_does():
    """`--vocab-size 50257` (what a tokenizer gives) at --tp 4 was refused for not dividing, though pretrain
    pads it to 50304 and trains; at --tp 1 it counted 47 embedding rows fewer than the trainer builds."""
    import json

    from typer.testing import CliRunner

    from mtnlg_ray.cli import app

    def planned(*args: str) -> dict:
        result = CliRunner().invoke(app, ["plan", "--preset", "gpt3-125m", "--json", *args])
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)

    padded = planned("--tp", "4", "--vocab-size", "50304")
    assert planned("--tp", "4", "--vocab-size", "50257") == padded
    assert planned("--vocab-size", "50257")["params"] == planned("--vocab-size", "50304")["params"]


def test_an_iteration_time_faster_than_the_gpus_can_run_is_warned_about():
    from typer.testing import CliRunner

    from mtnlg_ray.cli import app

    args = ["plan", "--preset", "gpt3-175b", "--tp", "8", "--pp", "16", "--dp", "4", "--json"]
    fast = CliRunner().invoke(app, [*args, "--iter-time", "1"])
    assert fast.exit_code == 0 and "warning: --iter-time 1.0 s puts each GPU at 118% of its peak" in fast.stderr
    measured = CliRunner().invoke(app, [*args, "--iter-time", "30"])
    assert measured.exit_code == 0 and "warning" not in measured.stderr


def test_gpipe_holds_every_micro_batchs_activations_and_1f1b_only_its_warm_up():
    one_f_one_b = plan_layout("mtnlg-530b", tp=8, pp=35, dp=8, global_batch=1920, seq_len=2048)
    gpipe = plan_layout("mtnlg-530b", tp=8, pp=35, dp=8, global_batch=1920, seq_len=2048, schedule="gpipe")
    micro = one_f_one_b["micro_batches"]  # 240 a replica; 1F1B's first stage holds pp = 35 of them
    ratio = gpipe["memory_gb_per_gpu"]["activations"] / one_f_one_b["memory_gb_per_gpu"]["activations"]
    assert micro == 240 and ratio == pytest.approx(micro / 35)
