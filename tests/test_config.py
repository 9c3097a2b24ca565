import pytest

from mtnlg_ray.config import Config, load_config, shipped_config
from mtnlg_ray.errors import ConfigError


def test_shipped_pretrain_config_is_the_mtnlg_recipe():
    config = load_config(stage="pretrain")
    assert (config.train.beta1, config.train.beta2, config.train.eps) == (0.9, 0.95, 1e-8)
    assert config.train.weight_decay == 0.1 and config.train.grad_clip == 1.0
    assert config.train.min_lr_ratio == 0.1
    assert shipped_config("pretrain").is_file()


def test_overrides_are_parsed_with_types():
    config = load_config(
        overrides=["train.max_steps=20", "train.lr=1e-3", "parallel.workers=[1, 2]", "parallel.fsdp=false",
                   "model.preset=small", "train.batch_rampup.start=8"]
    )
    assert config.train.max_steps == 20 and config.train.lr == pytest.approx(1e-3)
    assert config.parallel.workers == (1, 2) and config.parallel.fsdp is False
    assert config.model.preset == "small" and config.train.batch_rampup.start == 8


def test_file_values_and_overrides_stack(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  max_steps: 5\n  seed: 3\n")
    config = load_config(path, ["train.seed=4"])
    assert config.train.max_steps == 5 and config.train.seed == 4
    assert config.model.preset == Config().model.preset


@pytest.mark.parametrize(
    "override, message",
    [
        # the near miss named before the list of every key
        ("train.lrr=3", "--set train.lrr=3: unknown key 'train.lrr' (did you mean 'train.lr'? expected one of max_steps"),
        ("train.warmup=5", "unknown key 'train.warmup' (did you mean 'train.warmup_tokens'? expected one of"),
        ("train.max_step=5", "unknown key 'train.max_step' (did you mean 'train.max_steps'? expected one of"),
        ("train.xyz=5", "unknown key 'train.xyz' (expected one of max_steps"),
        ("nosuch.key=1", "--set nosuch.key=1: unknown key 'nosuch'"),
        ("tran.lr=1", "--set tran.lr=1: unknown key 'tran' (did you mean 'train'?"),  # was blamed on the shipped file
        # was "Input should be a valid dictionary or instance of TrainSection"
        ("train=5", "--set train=5: train is a section, not a value: set its keys, e.g. train.KEY=VALUE"),
        ("train.lr=abc", "--set train.lr=abc: train.lr: Input should be a valid number"),
        ("model.preset=huge", "model.preset: expected one of tiny, small"),
        ("parallel.workers=[3, 1]", "parallel.workers: expected [min, max]"),
        # a list of another length was "parallel.workers.int: Input should be a valid integer"
        ("parallel.workers=[1, 2, 3]", "--set parallel.workers=[1, 2, 3]: parallel.workers: expected a positive "
                                       "integer or [min, max] (got [1, 2, 3])"),
        ("parallel.workers=abc", "parallel.workers: expected a positive integer or [min, max] (got 'abc')"),
        # was "label.actors.1: Field required (got [1])"
        ("label.actors=[1]", "--set label.actors=[1]: label.actors: expected a positive integer or [min, max]"),
        ("train.beta2=1.5", "train.beta2"),
        ("train", "expected KEY=VALUE"),
        # refused here, not after a whole curation run reaches the tokenizer or the split
        ("tokenizer.vocab_size=257", "tokenizer.vocab_size: Input should be greater than or equal to 258"),
        ("pack.val_fraction=0.6", "pack.val_fraction: Input should be less than or equal to 0.5"),
        # a check across keys blames the --set that broke it, not the shipped file
        ("train.global_batch_size=33", "--set train.global_batch_size=33: train.global_batch_size (33) must be"),
        # an infinite LR trained on NaN and the job reported success; `true` was one step
        ("train.lr=.inf", "--set train.lr=.inf: train.lr: Input should be a finite number"),
        ("train.weight_decay=.nan", "train.weight_decay: Input should be a finite number"),
        ("train.max_steps=true", "--set train.max_steps=true: train.max_steps: expected a number, not true / false"),
        ("parallel.workers=false", "parallel.workers: expected a number, not true / false (got False)"),
        # inside a list or mapping too: [true, 4] asked for 1 to 4 workers
        ("parallel.workers=[true, 4]", "parallel.workers: expected a number, not true / false (got [True, 4])"),
        ("read.weights={a.txt: true}", "read.weights: expected a number, not true / false"),
        ("clean.max_top_ngram={2: false}", "clean.max_top_ngram: expected a number, not true / false"),
        # an empty value (a shell variable left unset) was null: `train.max_steps=` ran without end
        ("train.max_steps=", "--set train.max_steps=: no value after '='; write train.max_steps=null to clear"),
        # a filter of another labeller did nothing without a word
        ("label.filter=pareto", "--set label.filter=pareto: label.filter=pareto applies to label.labeler=quality, "
                                "not None"),
        # at pp=1 any text passed (the trainer reads the schedule only for pp > 1)
        ("parallel.pp_schedule=foo", "parallel.pp_schedule: Input should be 'gpipe', '1f1b', 'interleaved-1f1b' or"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(overrides=[override], stage="prepare")
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_bad_files_name_the_file_and_line(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="nope.yaml: config file not found"):
        load_config(missing)
    with pytest.raises(ConfigError, match=f"^{tmp_path}: a folder, not a YAML config file$"):  # was "not found"
        load_config(tmp_path)
    broken = tmp_path / "broken.yaml"
    broken.write_text("train:\n  max_steps: [1,\n")
    with pytest.raises(ConfigError, match=r"broken.yaml:\d+: not valid YAML"):
        load_config(broken)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("train:\n  warmup: 10\n")
    with pytest.raises(ConfigError, match=r"unknown.yaml: unknown key 'train.warmup'"):
        load_config(unknown)
    batch = tmp_path / "batch.yaml"
    batch.write_text("train:\n  global_batch_size: 30\n  micro_batch_size: 8\n")
    with pytest.raises(ConfigError, match="multiple of train.micro_batch_size"):
        load_config(batch)


def test_model_section_resolves_preset_with_tokenizer_vocab():
    config = load_config(overrides=["model.preset=small", "model.seq_len=64"])
    shape = config.model.resolve(tokenizer_vocab=1000)
    assert (shape.n_layer, shape.d_model, shape.seq_len, shape.vocab_size) == (6, 384, 64, 1024)


def test_max_steps_is_not_cut_short_by_an_unset_epoch_count():
    """`--set train.max_steps=300` on a corpus of 232 steps a pass runs 300 steps (issue 18: it stopped at 232)."""
    assert load_config(overrides=["train.max_steps=300"]).train.epoch_limit() is None
    assert load_config(overrides=["train.max_steps=null", "train.max_tokens=5000"]).train.epoch_limit() is None
    assert load_config(overrides=["train.max_steps=null"]).train.epoch_limit() == 1  # nothing else ends the run
    assert load_config(overrides=["train.max_steps=300", "train.epochs=2"]).train.epoch_limit() == 2
    assert load_config(stage="finetune").train.epoch_limit() == 10


def test_a_type_error_under_a_section_names_its_key_even_when_the_value_is_a_mapping(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  max_steps: {a: 1}\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: train.max_steps: Input should be a valid integer"):
        load_config(bad)


@pytest.mark.parametrize("key", ["data.path", "data.train", "run.storage_path"])
def test_a_uri_where_a_trainer_opens_files_is_refused(key):
    """`--set data.path=s3://...` used to be sent as a job and fail there; `run.storage_path=s3://...`
    made a local folder named `s3:`."""
    with pytest.raises(ConfigError, match=rf"^--set {key}=s3://bucket/x: {key}: expected a local or mounted path"):
        load_config(overrides=[f"{key}=s3://bucket/x"], stage="pretrain")


def test_values_read_as_yaml_1_2_reads_them(tmp_path):
    # PyYAML's YAML 1.1: `no` was false (Norway's code), 010 octal 8, 1:30 ninety, 1e9 a string, and
    # a `#` in a value began a comment.
    from mtnlg_ray.config import load_config

    cfg = load_config(overrides=["lang.keep=[en,no]", "train.seed=010", "train.warmup_tokens=1e9",
                                 "run.name=exp #3", "task.labels=[0,1]", "parallel.fsdp=false"], stage="prepare")
    assert cfg.lang.keep == ["en", "no"] and cfg.train.seed == 10 and cfg.train.warmup_tokens == 1_000_000_000
    assert cfg.run.name == "exp #3" and cfg.task.labels == ["0", "1"] and cfg.parallel.fsdp is False


def test_a_key_twice_in_a_config_file_is_one_line(tmp_path):
    from mtnlg_ray.config import load_config
    from mtnlg_ray.errors import ConfigError

    path = tmp_path / "twice.yaml"
    path.write_text("train:\n  max_steps: 200\n  warmup_tokens: 100000\nrun:\n  name: a\ntrain:\n  lr: 1.0e-3\n")
    with pytest.raises(ConfigError, match=rf"^{path}:6: key 'train' appears twice \(first on line 1\)$"):
        load_config(path)


def test_setting_one_key_of_a_mapping_keeps_its_other_defaults():
    # `--set clean.max_top_ngram.2=0.25` used to replace the whole mapping: no 3- and 4-gram checks left.
    from mtnlg_ray.config import CleanSection, load_config

    cfg = load_config(overrides=["clean.max_top_ngram.2=0.25"], stage="prepare")
    assert cfg.clean.max_top_ngram == {**CleanSection().max_top_ngram, 2: 0.25}


def test_a_section_given_a_value_in_a_file_is_shown_in_yaml(tmp_path):
    from mtnlg_ray.config import load_config
    from mtnlg_ray.errors import ConfigError

    path = tmp_path / "flat.yaml"
    path.write_text("train: 5\n")  # was "Input should be a valid dictionary or instance of TrainSection"
    with pytest.raises(ConfigError, match=rf"^{path}: train is a section, not a value: set its keys, e.g. "
                                          r"train: \{KEY: VALUE\}$"):
        load_config(path)
    # a prefix that begins two keys names neither: train.max is max_steps or max_tokens
    with pytest.raises(ConfigError, match=r"unknown key 'train.max' \(expected one of"):
        load_config(overrides=["train.max=5"])


def test_an_unknown_key_in_the_file_is_blamed_on_the_file_not_on_a_similar_override(tmp_path):
    from mtnlg_ray.config import load_config
    from mtnlg_ray.errors import ConfigError

    path = tmp_path / "typo.yaml"
    path.write_text("train:\n  lrate: 0.1\n")
    with pytest.raises(ConfigError, match=rf"^{path}: unknown key 'train.lrate'"):
        load_config(path, ["train.lr=3.0e-4"])


def test_a_check_in_the_users_file_is_blamed_on_the_file_not_on_an_unrelated_set_of_its_section(tmp_path):
    from mtnlg_ray.config import load_config
    from mtnlg_ray.errors import ConfigError

    path = tmp_path / "sft.yaml"
    path.write_text("task:\n  kind: sft\n  mode: frozen\n")
    message = "task.mode=frozen leaves nothing to train for task.kind=sft"
    with pytest.raises(ConfigError, match=rf"^{path}: {message}"):  # it blamed --set task.labels=[a,b]
        load_config(path, ["task.labels=[a,b]"], stage="finetune")
    with pytest.raises(ConfigError, match=rf"^--set task.mode=frozen: {message}"):  # a --set the check names
        load_config(path, ["task.mode=frozen"], stage="finetune")
    path.write_text("task:\n  kind: sft\n")
    with pytest.raises(ConfigError, match=r"^--set tsk.kind=sft: unknown key 'tsk'"):  # a misspelt section
        load_config(path, ["tsk.kind=sft"], stage="finetune")
    with pytest.raises(ConfigError, match=r"^--set train.lr.x=1: train.lr: Input should be a valid number"):
        load_config(path, ["train.lr.x=1"], stage="finetune")  # a key below a value


def test_pretraining_without_an_lr_takes_its_presets_and_a_given_lr_stays(tmp_path):
    # One LR for every size was tiny's 3e-3: `--set model.preset=gpt3-1.3b` trained at 15x GPT-3's 2e-4.
    assert load_config().train.lr == 3e-3  # tiny, the default preset
    assert load_config(overrides=["model.preset=gpt3-125m"]).train.lr == 6e-4
    assert load_config(overrides=["model.preset=gpt3-1.3b"]).train.lr == 2e-4
    assert load_config(overrides=["model.preset=mtnlg-530b"]).train.lr == 5e-5
    assert load_config(overrides=["model.preset=gpt3-1.3b", "train.lr=1e-3"]).train.lr == 1e-3
    path = tmp_path / "mine.yaml"  # --config replaces the shipped file; without a train.lr, the preset's
    path.write_text("model:\n  preset: gpt3-13b\n")
    assert load_config(path).train.lr == 1e-4
    path.write_text("model:\n  preset: gpt3-13b\ntrain:\n  lr: 3.0e-4\n")
    assert load_config(path).train.lr == 3e-4
    # the resolved value is what a run and `config show` see; it stays derived (unset), so a submitted job's
    # config, which carries what was set, derives it again on the cluster; fine-tuning keeps its own LR
    resolved = load_config(overrides=["model.preset=gpt3-350m"])
    assert resolved.model_dump(mode="json")["train"]["lr"] == 3e-4 and "lr" not in resolved.train.model_fields_set
    assert "lr" not in resolved.model_dump(mode="json", exclude_unset=True)["train"]
    assert load_config(overrides=["model.preset=gpt3-1.3b"], stage="finetune").train.lr == 3e-4


def test_a_warm_up_the_decay_never_gets_past_is_warned_about(tmp_path, capsys):
    # --config replaces the shipped file. A file that left train.warmup_tokens out used to get MT-NLG's
    # 1B tokens, and a 200-step run ended at an LR of about 4e-8; now it gets the preset's, at most a
    # tenth of the run. One that sets a warm-up longer than the run is warned about.
    from mtnlg_ray.train.trainer import schedule_over_the_run, warn_about_the_schedule

    path = tmp_path / "short.yaml"
    path.write_text("train:\n  max_steps: 200\n")
    left_out = schedule_over_the_run(load_config(path), 128)
    assert (left_out.train.warmup_tokens, left_out.train.decay_tokens) == (81_920, 819_200)
    warn_about_the_schedule(left_out)
    assert capsys.readouterr().err == ""
    path.write_text("train:\n  max_steps: 200\n  warmup_tokens: 1000000\n")
    warn_about_the_schedule(schedule_over_the_run(load_config(path), 128))
    assert capsys.readouterr().err.strip() == (
        "warning: train.warmup_tokens (1,000,000) is not below train.decay_tokens (819,200; the run's tokens "
        "unless set): the LR never reaches train.lr (0.003); set train.warmup_tokens")


def test_max_steps_ending_a_run_before_its_max_tokens_is_warned_about(capsys):
    """The shipped pretrain.yaml's 200 steps ended a `--set train.max_tokens=26000000000` run after 0.8 %
    of its tokens, without a word (the KubeRay RayJob did this)."""
    from mtnlg_ray.train.schedule import run_tokens
    from mtnlg_ray.train.trainer import warn_if_max_steps_ends_first

    capped = load_config(overrides=["train.max_tokens=26000000000"], stage="pretrain")
    warn_if_max_steps_ends_first(capped, 2048)
    tokens = run_tokens(capped.train, 2048)
    assert capsys.readouterr().err.strip() == (
        f"warning: train.max_steps (200) ends the run after {tokens:,} tokens, before train.max_tokens "
        "(26,000,000,000); set train.max_steps=null to train to max_tokens")
    for overrides in (["train.max_tokens=26000000000", "train.max_steps=null"], ["train.max_tokens=100000"], []):
        warn_if_max_steps_ends_first(load_config(overrides=overrides, stage="pretrain"), 2048)
    assert capsys.readouterr().err == ""


def test_a_global_batch_rounded_down_to_whole_micro_batches_is_warned_about(capsys):
    """3 ranks of micro-batch 4 take 24 of a global batch of 32: the run printed `batch 24` without a word."""
    from mtnlg_ray.train.trainer import warn_about_the_batch

    warn_about_the_batch(load_config(overrides=["parallel.workers=3", "train.micro_batch_size=4",
                                                "train.global_batch_size=32"], stage="pretrain"))
    assert capsys.readouterr().err == ("warning: train.global_batch_size (32) is not a multiple of train.micro_batch_size "
                                       "x dp (4 x 3 = 12): each step takes 24, whole micro-batches on every rank\n")
    warn_about_the_batch(load_config(overrides=["parallel.workers=4", "train.micro_batch_size=4",
                                                "train.global_batch_size=32"], stage="pretrain"))
    warn_about_the_batch(load_config(overrides=["parallel.workers=4", "parallel.tp=2", "train.micro_batch_size=8",
                                                "train.global_batch_size=32"], stage="pretrain"))  # dp 2: 16 | 32
    assert capsys.readouterr().err == ""


def test_the_schedules_the_config_accepts_are_the_ones_the_pipeline_runs():
    from typing import get_args

    from mtnlg_ray.config import ParallelSection
    from mtnlg_ray.train.pipeline import SCHEDULES

    assert set(get_args(ParallelSection.model_fields["pp_schedule"].annotation)) == set(SCHEDULES)


def test_a_single_actor_count_is_a_pool_of_that_size():
    # `label.actors=2` said "Input should be a valid tuple"
    assert load_config(overrides=["label.actors=2"], stage="prepare").label.actors == (2, 2)
    assert load_config(overrides=["label.actors=[1, 3]"], stage="prepare").label.actors == (1, 3)


def test_a_check_across_keys_blames_the_key_it_is_about_not_the_last_set_of_its_section():
    # `data label --labeler quality --set label.ppl_max_percentile=50` blamed the label.model=... that
    # `data label` adds after the user's --set
    with pytest.raises(ConfigError, match=r"^--set label.ppl_max_percentile=50: label.ppl_max_percentile applies to "
                                          r"label.labeler=perplexity, not quality"):
        load_config(overrides=["label.ppl_max_percentile=50", "label.labeler=quality", "label.model=m"], stage="prepare")


def test_language_codes_read_the_same_in_either_case():
    assert load_config(overrides=["lang.keep=[EN, Fr]"], stage="prepare").lang.keep == ["en", "fr"]


def test_a_key_set_twice_is_blamed_on_the_set_that_held():
    with pytest.raises(ConfigError, match=r"^--set label.filter=none: label.filter=none applies"):
        load_config(overrides=["label.filter=pareto", "label.filter=none", "label.labeler=perplexity"], stage="prepare")


def test_a_lora_key_without_lora_mode_is_refused_only_from_the_command_line(tmp_path):
    # A file that keeps its task.lora block while an A/B run sets task.mode=full trains as asked.
    import yaml

    from mtnlg_ray.config import shipped_config

    body = yaml.safe_load(shipped_config("finetune").read_text())
    body["task"]["lora"]["rank"] = 16
    (tmp_path / "ft.yaml").write_text(yaml.safe_dump(body))
    assert load_config(tmp_path / "ft.yaml", ["task.mode=full"], stage="finetune").task.lora.rank == 16
    with pytest.raises(ConfigError, match=r"^--set task.lora.rank=4: task.mode is frozen, so no LoRA adapter"):
        load_config(tmp_path / "ft.yaml", ["task.lora.rank=4", "task.mode=frozen"], stage="finetune")
