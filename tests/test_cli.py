"""The CLI as a user runs it: real processes, real exit codes, one line per user error."""

import json
import shutil

import pytest
import typer.main
from typer.testing import CliRunner

from conftest import run_cli
from mtnlg_ray.cli import app


def all_command_paths():
    root = typer.main.get_command(app)
    paths = []

    def walk(cmd, prefix):
        paths.append(prefix)
        for name, sub in getattr(cmd, "commands", {}).items():
            walk(sub, [*prefix, name])

    walk(root, [])
    return paths


@pytest.mark.parametrize("path", all_command_paths(), ids=lambda p: " ".join(p) or "mtnlg-ray")
def test_every_command_has_help_that_explains_it(path):
    result = CliRunner().invoke(app, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output
    # A description beyond the usage line: the docstring or the group's help.
    body = [line for line in result.output.splitlines() if line.strip() and "Usage:" not in line]
    assert len(body) > 3
    # Typer prints a line break inside a paragraph as it is, so a docstring wrapped at 100 columns was
    # ragged in an 80-column terminal: each paragraph must be one line, for the terminal to wrap.
    command = typer.main.get_command(app)
    for name in path:
        command = command.commands[name]
    assert [p for p in (command.help or "").split("\n\n") if "\n" in p] == []
    # In an 80-column terminal nothing is cut off: `serve`'s --prefix-cache/--no-prefix-cache pair widened
    # the option column until MTNLG_API_KEY_SHA256 showed as "MTNLG_API_KEY_SHA25…".
    narrow = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "80"})
    assert "…" not in narrow.output, narrow.output
    # --set's type read as "takes a list", not "KEY=VALUE, repeatable"
    assert not [line for line in narrow.output.splitlines() if "list[str]" in line and " --" in line]


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_tokenizer_init_generate_round_trip(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("def add(a, b):\n    return a + b\n" * 50)
    (corpus / "b.txt").write_text("The quick brown fox jumps over the lazy dog. " * 50)
    trained = run_cli("tokenizer", "train", str(corpus), "--vocab-size", "300", "--output", str(tmp_path / "tok"))
    assert trained.returncode == 0, trained.stderr
    assert (tmp_path / "tok" / "tokenizer.json").is_file()
    # piped, stdout is the result line alone: the tokenizers library's progress left blank lines first
    assert trained.stdout.startswith(f"wrote {tmp_path / 'tok' / 'tokenizer.json'}"), repr(trained.stdout[:80])

    made = run_cli("init", "--preset", "tiny", "--tokenizer", str(tmp_path / "tok"), "--output",
                   str(tmp_path / "ckpt"), "--seed", "7")
    assert made.returncode == 0, made.stderr
    assert "tiny" in made.stdout and "vocab 320" in made.stdout

    args = ["generate", "--checkpoint", str(tmp_path / "ckpt"), "--prompt", "def add", "--max-tokens", "12"]
    greedy = run_cli(*args, "--temperature", "0")
    assert greedy.returncode == 0, greedy.stderr

    from mtnlg_ray.inference import TextGenerator
    from mtnlg_ray.model.generate import SamplingParams

    expected, _ = TextGenerator(tmp_path / "ckpt").complete(["def add"], SamplingParams(max_tokens=12, temperature=0))[0]
    assert greedy.stdout == expected + "\n"

    # Sampled: the CLI's text is the seeded draw at its default temperature (1.0) with its top-p, and
    # another seed draws other text.
    sampled = run_cli(*args, "--seed", "5", "--top-p", "0.9")
    assert sampled.returncode == 0, sampled.stderr
    generator = TextGenerator(tmp_path / "ckpt")
    drawn = {seed: generator.complete(["def add"], SamplingParams(max_tokens=12, top_p=0.9, seed=seed))[0][0]
             for seed in (5, 6)}
    assert sampled.stdout == drawn[5] + "\n" and drawn[5] != drawn[6] != expected
    other = run_cli(*args, "--seed", "6", "--top-p", "0.9")
    assert other.stdout == drawn[6] + "\n"
    assert "note:" not in greedy.stderr + other.stderr

    # More new tokens than the context leaves: the text stops there, and stderr says so (it stopped
    # short without a word, where the server answers 400).
    context = generator.context
    prompt_ids = len(generator.encode("def add"))
    long = run_cli("generate", "--checkpoint", str(tmp_path / "ckpt"), "--prompt", "def add", "--max-tokens",
                   str(context + 10), "--temperature", "0")
    assert long.returncode == 0, long.stderr
    room = context - prompt_ids  # the server's limit too (it made one more, which no server request could ask)
    assert (f"note: the model's context is {context} tokens and the prompt takes {prompt_ids}, so it makes at "
            f"most {room} new tokens, not {context + 10}") in long.stderr.splitlines()
    full, made = generator.complete(["def add"], SamplingParams(max_tokens=room, temperature=0))[0]
    assert long.stdout == full + "\n" and len(made.tokens) <= room


def test_missing_checkpoint_is_one_line(tmp_path):
    result = run_cli("generate", "--checkpoint", str(tmp_path / "nope"), "--prompt", "x")
    assert_one_line_error(result, "nope", "checkpoint not found")


def test_corrupt_safetensors_is_one_line(tmp_path, tiny_checkpoint):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    result = run_cli("generate", "--checkpoint", str(broken), "--prompt", "x")
    assert_one_line_error(result, "model.safetensors", "truncated")


def test_prompt_too_long_is_one_line(tiny_checkpoint):
    result = run_cli("generate", "--checkpoint", str(tiny_checkpoint), "--prompt", "word " * 400)
    assert_one_line_error(result, "--prompt: 1201 tokens leave no room", "context of 128 tokens")


def test_empty_prompt_is_named_as_the_option_typed(tiny_checkpoint):
    result = run_cli("generate", "--checkpoint", str(tiny_checkpoint), "--prompt", "")
    assert_one_line_error(result, "--prompt: expected some text")


@pytest.mark.parametrize("option, value, expected", [
    ("--top-p", "1.5", "--top-p: expected a value in [0, 1], got 1.5"),  # said (0, 1], but 0 is taken: greedy
    ("--max-tokens", "0", "--max-tokens: expected a positive integer, got 0"),  # said max_tokens, no option
    ("--temperature", "-1", "--temperature: expected a finite value >= 0, got -1.0"),
    ("--top-k", "-2", "--top-k: expected a value >= 0, got -2"),
])
def test_a_bad_sampling_option_of_generate_is_named_as_typed(tiny_checkpoint, option, value, expected):
    from mtnlg_ray.errors import InputError

    result = CliRunner().invoke(app, ["generate", "--checkpoint", str(tiny_checkpoint), "--prompt", "x", option, value])
    assert isinstance(result.exception, InputError) and f"error: {result.exception}" == f"error: {expected}", \
        result.output


def test_prompt_with_bytes_that_are_not_utf8_is_one_line(tiny_checkpoint):
    # subprocess passes the surrogate-escaped "\udcff" as the raw byte 0xFF, as a shell's $'\xff' does.
    result = run_cli("generate", "--checkpoint", str(tiny_checkpoint), "--prompt", "ab\udcffc", "--max-tokens", "2")
    assert_one_line_error(result, "--prompt ab\\xffc: not valid UTF-8")


def test_a_misspelt_labeler_is_blamed_on_the_option_typed(tmp_path):
    # It used to name `--set label.labeler="qualty"`, a --set the user never typed.
    result = run_cli("data", "label", str(tmp_path), "--output", str(tmp_path / "out"), "--labeler", "qualty",
                     "--model", str(tmp_path))
    assert_one_line_error(result, "--labeler: expected quality, perplexity or classifier, got 'qualty'")
    assert "--set" not in result.stderr


def test_a_command_line_typer_cannot_parse_is_one_line_and_a_bare_group_prints_its_help():
    """Typer drew a box of four lines or more around such an error."""
    assert_one_line_error(run_cli("plan", "--tp", "abc"), "error: Invalid value for '--tp'",
                          "(see `mtnlg-ray plan --help`)")
    assert_one_line_error(run_cli("plan", "--tpp", "2"), "error: No such option: --tpp")
    assert_one_line_error(run_cli("generate", "-p", "x"), "error: Missing option '--checkpoint'")
    assert_one_line_error(run_cli("nosuchcommand"), "error: No such command 'nosuchcommand'")
    bare = run_cli("data")
    assert bare.returncode == 2 and "Usage: mtnlg-ray data" in bare.stdout + bare.stderr
    assert "prepare" in bare.stdout + bare.stderr and "error:" not in bare.stderr


def test_unknown_config_key_is_one_line():
    result = run_cli("config", "show", "--set", "train.warmup=5")
    assert_one_line_error(result, "unknown key 'train.warmup'")


def shown_train(stdout: str) -> dict:
    """`config show`'s train section, with the derived keys it prints as comments that give their value."""
    import re

    import yaml

    train = yaml.safe_load(stdout)["train"]
    derived = dict(re.findall(r"^  # (\w+): (\S+)  \(derived: ", stdout, flags=re.MULTILINE))
    assert not derived.keys() & train.keys()
    return {**train, **{key: yaml.safe_load(value) for key, value in derived.items()}}


def test_config_show_prints_the_decay_pretrain_will_use(tmp_path):
    """Unset, `train.decay_tokens` is the run's own tokens: `config show` prints that, not MT-NLG's 340B."""

    def decay(*overrides: str) -> int:
        sets = [arg for key in overrides for arg in ("--set", key)]
        result = run_cli("config", "show", "--stage", "pretrain", "--set", "model.preset=small", *sets)
        assert result.returncode == 0, result.stderr[-2000:]
        return shown_train(result.stdout)["decay_tokens"]

    assert decay("train.max_steps=300", f"data.path={tmp_path}") == 300 * 32 * 256  # small's context: 256
    (tmp_path / "tokens").mkdir()  # a corpus packed at 128 tokens (its index; the shards are not read)
    (tmp_path / "tokens" / "index.json").write_text(json.dumps({"seq_len": 128, "shards": {"train": []}}))
    assert decay("train.max_steps=300", f"data.path={tmp_path}") == 300 * 32 * 128
    assert decay("train.max_steps=300", "train.decay_tokens=1000000") == 1_000_000
    assert decay("train.max_steps=null") == 340_000_000_000  # an unbounded run keeps MT-NLG's decay


def test_config_show_warns_of_a_config_file_whose_warm_up_the_decay_never_gets_past(tmp_path):
    """The README's check of a --config file before a run: one whose warm-up outlasts its 200-step decay
    is warned about, as the run warns; one that leaves train.warmup_tokens out prints the warm-up the run
    gets (the preset's, at most a tenth of the run: it used to get MT-NLG's 1B tokens and never warm up)."""
    path = tmp_path / "short.yaml"
    path.write_text("train:\n  max_steps: 200\n  warmup_tokens: 1000000\n")
    result = run_cli("config", "show", "--stage", "pretrain", "--config", str(path))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "warning: train.warmup_tokens (1,000,000) is not below train.decay_tokens (819,200" in result.stderr
    path.write_text("train:\n  max_steps: 200\n")
    left_out = run_cli("config", "show", "--stage", "pretrain", "--config", str(path))
    assert left_out.returncode == 0 and "warning" not in left_out.stderr, left_out.stderr[-2000:]
    assert shown_train(left_out.stdout)["warmup_tokens"] == 81_920


def test_a_config_saved_from_config_show_keeps_what_the_run_derives(tmp_path):
    """The README starts a config file with `config show > my.yaml`. Its derived keys (pretraining's
    preset LR, warm-up and decay) are printed as comments with their value, so the saved file leaves
    them unset and a longer run or another preset derives its own. Written out, a file saved from a
    200-step run decayed a 5,000-step run to its floor by step 200."""
    shown = run_cli("config", "show", "--stage", "pretrain")
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert {key: shown_train(shown.stdout)[key] for key in ("lr", "warmup_tokens", "decay_tokens")} == {
        "lr": 3e-3, "warmup_tokens": 81_920, "decay_tokens": 819_200}
    saved = tmp_path / "my.yaml"
    saved.write_text(shown.stdout)
    longer = run_cli("config", "show", "--stage", "pretrain", "--config", str(saved), "--set", "train.max_steps=5000",
                     "--set", "model.preset=gpt3-125m")
    assert longer.returncode == 0, longer.stderr[-2000:]
    train = shown_train(longer.stdout)
    assert (train["lr"], train["decay_tokens"]) == (6e-4, 5000 * 32 * 2048)
    assert train["warmup_tokens"] == 5000 * 32 * 2048 // 10  # under GPT-3's 375M: a tenth of this run
    assert longer.stderr == ""
    # A mistyped data.path printed a decay from the model's context, as if it were the data's, without a word.
    typo = run_cli("config", "show", "--stage", "pretrain", "--set", f"data.path={tmp_path / 'data6'}")
    assert typo.returncode == 0 and typo.stderr.startswith(
        f"warning: data.path cannot be read here ({tmp_path / 'data6' / 'tokens' / 'index.json'}: missing") \
        and typo.stderr.count("\n") == 1
    # A max_steps that ends the run long before a max_tokens also set (the shipped 200 steps under 26B tokens).
    capped = run_cli("config", "show", "--stage", "pretrain", "--set", "train.max_tokens=26000000000")
    assert capped.returncode == 0 and capped.stderr.startswith("warning: train.max_steps (200) ends the run after ")


def test_config_show_prints_the_schedule_finetune_derives_from_its_data(tiny_checkpoint, tmp_path):
    """Unset, fine-tuning warms up over 5% of its run's tokens and decays over all of them: 10 epochs of
    each text's tokens plus its closing EOS. `config show --stage finetune` prints those numbers."""
    import yaml
    from tokenizers import Tokenizer

    texts = ["a fine film", "dull , slow and long", "the best of the year", "not worth the ticket"] * 5
    train = tmp_path / "train.tsv"
    train.write_text("label\tsentence\n" + "".join(f"{i % 2}\t{t}\n" for i, t in enumerate(texts)))
    tokenizer = Tokenizer.from_file(str(tiny_checkpoint / "tokenizer.json"))
    epoch_tokens = sum(len(tokenizer.encode(t, add_special_tokens=False).ids) + 1 for t in texts)

    shown = run_cli("config", "show", "--stage", "finetune", "--set", f"init.checkpoint={tiny_checkpoint}",
                    "--set", f"data.train={train}", "--set", "data.text_field=sentence")
    assert shown.returncode == 0, shown.stderr[-2000:]
    config = yaml.safe_load(shown.stdout)
    assert shown_train(shown.stdout)["decay_tokens"] == 10 * epoch_tokens
    assert shown_train(shown.stdout)["warmup_tokens"] == int(0.05 * 10 * epoch_tokens)
    assert config["task"]["labels"] == ["0", "1"]  # found in data.train, as the run finds them

    bare = run_cli("config", "show", "--stage", "finetune")  # no data: no value yet, said to be so
    assert bare.returncode == 0 and "finetune derives train.warmup_tokens and train.decay_tokens from" in bare.stderr
    assert "  # decay_tokens: (derived: the run's tokens)\n" in bare.stdout
    assert "decay_tokens" not in yaml.safe_load(bare.stdout)["train"]
    assert_one_line_error(run_cli("config", "show", "--stage", "finetune", "--set", f"init.checkpoint={tiny_checkpoint}",
                                  "--set", f"data.train={train}"), "train.tsv:1: no column 'text'")
    assert_one_line_error(run_cli("config", "show", "--stage", "finetune", "--set", f"init.checkpoint={tiny_checkpoint}",
                                  "--set", f"data.train={train}", "--set", "data.text_field=sentence",
                                  "--set", "parallel.workers=2", "--set", "parallel.pp=2"),
                          "parallel.pp=2: fine-tuning (task.kind=classification)")


def test_bad_preset_and_bad_plan_are_one_line(tmp_path, tokenizer_dir):
    result = run_cli("init", "--preset", "gpt5", "--tokenizer", str(tokenizer_dir), "--output", str(tmp_path / "c"))
    assert_one_line_error(result, "unknown preset 'gpt5'")
    assert_one_line_error(run_cli("plan", "--preset", "tiny", "--tp", "0"), "tp")
    result = run_cli("init", "--preset", "tiny", "--tokenizer", str(tmp_path / "none"), "--output", str(tmp_path / "c"))
    assert_one_line_error(result, "none")


def test_plan_json_reproduces_the_paper():
    import json

    result = run_cli("plan", "--preset", "mtnlg-530b", "--tp", "8", "--pp", "35", "--dp", "8",
                     "--global-batch", "1920", "--seq-len", "2048", "--iter-time", "60.1", "--json")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert abs(plan["params"] / 529.6e9 - 1) < 0.005
    assert abs(plan["tflops_per_gpu"] / 125.7 - 1) < 0.01
    assert plan["memory_gb_per_gpu"]["total"] > 0 and plan["flops_per_iteration"] > 1e19


def test_config_show_takes_the_command_names_of_its_stages():
    import yaml

    shown = run_cli("config", "show", "--stage", "self-train")
    assert shown.returncode == 0, shown.stderr
    assert "selftrain:" in shown.stdout and "rounds:" in shown.stdout
    # data label starts from prepare's defaults and shows the part of them it reads
    label, prepare = (yaml.safe_load(run_cli("config", "show", "--stage", s).stdout) for s in ("label", "prepare"))
    assert list(label) == ["data", "tokenizer", "read", "label"] and all(label[k] == prepare[k] for k in label)
    assert run_cli("config", "show", "--stage", "selftrain").stdout == shown.stdout
    unknown = run_cli("config", "show", "--stage", "serve")
    assert_one_line_error(unknown, "--stage: expected one of prepare, label, pretrain, finetune, self-train")


@pytest.mark.parametrize("stage", ["prepare", "label", "pretrain", "finetune", "selftrain"])
def test_config_show_prints_the_sections_its_stage_reads_and_a_file_saved_from_it_loads_back(stage, tmp_path):
    """`config show --stage prepare` printed train, parallel, task and every other stage's sections too,
    none of which `data prepare` reads."""
    import yaml

    from mtnlg_ray.config import STAGE_SECTIONS, UNUSED_KEYS, load_config

    shown = CliRunner().invoke(app, ["config", "show", "--stage", stage])  # in-process: CI's minutes
    assert shown.exit_code == 0, shown.output
    assert list(yaml.safe_load(shown.stdout)) == [s for s in yaml.safe_load(shown.stdout) if s in STAGE_SECTIONS[stage]]
    assert set(yaml.safe_load(shown.stdout)) == set(STAGE_SECTIONS[stage])
    for key in UNUSED_KEYS.get(stage, {}):  # keys it reads but never uses are left out as well
        section, _, name = key.partition(".")
        assert name not in yaml.safe_load(shown.stdout)[section], key
    saved = tmp_path / "my.yaml"
    saved.write_text(shown.stdout)
    again = CliRunner().invoke(app, ["config", "show", "--stage", stage, "--config", str(saved)])
    assert again.exit_code == 0 and "warning" not in again.stderr, again.stderr
    assert load_config(saved, stage=stage).model_dump() == load_config(stage=stage).model_dump()


def test_a_key_of_a_section_the_stage_never_reads_is_warned_about(tmp_path, capsys):
    """`pretrain --set dedup.fuzzy=false`, or a shared config file's prepare sections, did nothing without
    a word; pretrain.yaml itself shipped a tokenizer.path that pretraining never reads."""
    from mtnlg_ray.config import STAGE_SECTIONS, _read_yaml, load_config, shipped_config

    load_config(overrides=["dedup.fuzzy=false", "train.max_steps=20"], stage="pretrain")
    assert capsys.readouterr().err.splitlines() == [
        "warning: --set dedup.fuzzy=false: pretrain does not read dedup.* (data prepare does); it has no effect here"]
    load_config(overrides=["dedup.fuzzy=false", "tokenizer.vocab_size=512"], stage="prepare")
    assert capsys.readouterr().err == ""
    shared = tmp_path / "all.yaml"
    shared.write_text("tokenizer:\n  path: tok.json\ntrain:\n  max_steps: 20\nselftrain:\n  rounds: 3\n")
    load_config(shared, stage="finetune")
    assert capsys.readouterr().err.splitlines() == [
        f"warning: {shared}: finetune does not read its section 'selftrain' (self-train does); it has no effect here"]
    load_config(shared, stage="selftrain")
    assert capsys.readouterr().err == ""
    # Self-training labels each round with its teacher at selftrain.threshold, whatever label.* says.
    load_config(overrides=["label.threshold=0.99", "label.actors=2"], stage="selftrain")
    assert capsys.readouterr().err.splitlines() == [
        "warning: --set label.threshold=0.99: self-train sets label.threshold itself (to selftrain.threshold); "
        "it has no effect here"]
    # Pretraining keeps no best checkpoint: patience did nothing; fine-tuning scores the whole dev set.
    load_config(overrides=["train.patience=3"], stage="pretrain")
    assert "pretrain does not use train.patience (fine-tuning's early stopping on dev)" in capsys.readouterr().err
    shared.write_text("train:\n  eval_batches: 2\n  eval_every: 100\n  patience: 3\n")
    load_config(shared, stage="finetune")
    assert capsys.readouterr().err.splitlines() == [
        f"warning: {shared}: finetune does not use train.eval_batches (pretraining's held-out sample; fine-tuning "
        "scores the whole dev set at the end of each epoch); it has no effect here"]
    # A file's defaults are no warning: one saved by `config show` of another stage, or a submitted job's.
    shared.write_text("train:\n  patience: null\n  group_by_length: true\ndecontam:\n  eval_files: []\n")
    load_config(shared, stage="pretrain")
    assert capsys.readouterr().err == ""
    for stage, sections in STAGE_SECTIONS.items():
        if stage != "label":  # it starts from prepare's file
            assert set(_read_yaml(shipped_config(stage))) <= set(sections), stage


def test_every_submitted_stage_but_serve_has_a_shipped_config():
    from mtnlg_ray.cli.jobspec import STAGES
    from mtnlg_ray.config import CONFIG_STAGES, shipped_config

    assert set(CONFIG_STAGES) == set(STAGES) - {"serve"}
    assert all(shipped_config(name).is_file() for name in CONFIG_STAGES.values())


def _help_examples(group, words=()):
    """(command words, example) for each `mtnlg-ray ...` command in a help's `Example:` / `Examples:`
    paragraph: the backquoted ones, or else the paragraph's text split at semicolons."""
    import re

    if hasattr(group, "commands"):  # a group (typer vendors its own click: no isinstance check)
        for name, command in group.commands.items():
            yield from _help_examples(command, (*words, name))
        return
    for paragraph in (group.help or "").split("\n\n"):
        text = " ".join(paragraph.split())
        found = re.search(r"\bExamples?: (.*)", text)
        if found is None:
            continue
        quoted = re.findall(r"`(mtnlg-ray [^`]*)`", found.group(1))
        for example in quoted or found.group(1).split(";"):
            yield words, example.strip()


def test_the_examples_in_every_commands_help_name_options_and_config_keys_that_exist():
    """Each example in a command's --help parses with that command, and every `--set` key in it is a key
    of the stage's config: an example that was renamed away fails here, not on a user."""
    import shlex

    from mtnlg_ray.config import CONFIG_STAGES, load_config

    root = typer.main.get_command(app)
    examples = list(_help_examples(root))
    commanded = {" ".join(words) for words, _ in examples}
    assert {"pretrain", "finetune", "self-train", "data prepare", "data label", "evaluate", "generate", "plan",
            "init", "tokenizer train", "config show", "serve"} <= commanded
    for words, example in examples:
        argv = shlex.split(example)
        assert argv[: len(words) + 1] == ["mtnlg-ray", *words], example
        command = root
        for word in words:
            command = command.commands[word]
        context = command.make_context(" ".join(words), argv[len(words) + 1:], resilient_parsing=False)
        sets = [s for s in context.params.get("overrides") or []]
        stage = {"data prepare": "prepare", "data label": "label", "config show": context.params.get("stage")}.get(
            " ".join(words), " ".join(words))
        if sets:
            load_config(overrides=sets, stage=CONFIG_STAGES[stage])


def test_progress_lines_stay_whole_off_a_terminal(capsys, monkeypatch):
    """A Ray Job's log is no terminal: rich wrapped each pretraining step at 80 columns, before its grad norm."""
    from mtnlg_ray.cli.render import pretrain_printer

    monkeypatch.delenv("COLUMNS", raising=False)
    _, show = pretrain_printer()
    show({"step": 4200, "loss": 3.7012, "val_loss": 3.7456, "lr": 3.0e-4, "global_batch": 32, "tokens_per_s": 1503.0,
          "mfu": 0.716, "grad_norm": 0.37})
    err = capsys.readouterr().err
    assert err.splitlines() == [
        "step   4200  loss 3.7012  val 3.7456  lr 3.00e-04  batch 32  1,503 tok/s  MFU 71.6%  |g| 0.37"]


def test_a_dashboard_address_in_ray_address_is_one_line_for_a_stage_run_here(tmp_path):
    """The README tells users RAY_ADDRESS may hold the dashboard (for `submit`); a stage run on this
    machine with it set failed in ray.init with a traceback."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("A paragraph of plain words for the check.\n")
    exe = shutil.which("mtnlg-ray") or str(Path(sys.executable).parent / "mtnlg-ray")
    result = subprocess.run([exe, "data", "prepare", str(corpus), "--output", str(tmp_path / "ds")],
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "RAY_ADDRESS": "http://127.0.0.1:8265"})
    assert_one_line_error(result, "RAY_ADDRESS=http://127.0.0.1:8265 is a dashboard address",
                          "unset RAY_ADDRESS")


def test_an_argument_that_is_not_utf8_is_one_line_before_anything_starts(tmp_path):
    """A shell glob's non-UTF-8 file name (or such an --output) reached ray.init as lone surrogates: a
    UnicodeEncodeError traceback, exit 1, and an output folder left holding a stale .lock."""
    from conftest import run_cli

    (tmp_path / "in.txt").write_text("Some words to read.\n", encoding="utf-8")
    output = str(tmp_path) + "/out\udce9"  # the byte 0xe9 as Python hands it over
    result = run_cli("data", "prepare", str(tmp_path / "in.txt"), "--output", output)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"error: --output {tmp_path}/out\\xe9: not valid UTF-8 (the commands pass their arguments to Ray and "
        "the tokenizer, which take UTF-8 alone); give the text in UTF-8, or rename such a file or folder"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt"]


def test_a_ray_address_where_nothing_listens_is_one_line_not_a_wait():
    """RAY_ADDRESS=HOST:PORT with no Ray behind it made a stage wait in ray.init for minutes without a
    word; a TCP connect now refuses it at once. The forms ray.init resolves itself pass untouched."""
    import socket

    from mtnlg_ray.errors import ConfigError
    from mtnlg_ray.runtime import _check_gcs_answers

    with socket.socket() as probe:  # a port that was free a moment ago, closed again: nothing listens
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(ConfigError, match=rf"RAY_ADDRESS=127.0.0.1:{port}: no Ray answered there in 1 s .*unset "
                                          "RAY_ADDRESS"):
        _check_gcs_answers(f"127.0.0.1:{port}", wait_s=1)
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        _check_gcs_answers(f"127.0.0.1:{listening.getsockname()[1]}", wait_s=1)
        _check_gcs_answers(f"localhost:{listening.getsockname()[1]}", wait_s=1)  # as ray.init resolves it
    for address in ("", "auto", "local", "ray://127.0.0.1:1"):
        _check_gcs_answers(address, wait_s=1)


def test_version_and_the_commands_in_the_order_a_user_meets_them():
    """No --version existed, and --help listed `init` and `plan` first and `data` near the end."""
    import typer.main
    from typer.testing import CliRunner

    import mtnlg_ray
    from mtnlg_ray.cli import app
    from mtnlg_ray.cli.app import _COMMAND_ORDER

    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout == f"mtnlg-ray {mtnlg_ray.__version__}\n"
    listed = typer.main.get_command(app).list_commands(None)
    assert listed == list(_COMMAND_ORDER)  # a new command is placed in the order, not left at the end
    assert listed[:2] == ["quickstart", "data"]
