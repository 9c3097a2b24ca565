"""The `mtnlg-ray` command line: a thin Typer skin over one function per stage.

Each command parses its options, calls the stage's entry function and prints the result.
A user error (`MtnlgError`) becomes one line on stderr and exit code 2; imports are lazy so
`--help` stays fast.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, List, Optional

import typer

from mtnlg_ray.errors import MtnlgError


class _App(typer.Typer):
    """Typer that reports user errors as one line and exit code 2 instead of a traceback."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().__call__(*args, **kwargs)
        except MtnlgError as exc:
            typer.echo(f"error: {exc}", err=True)
            sys.exit(2)


app = _App(
    name="mtnlg-ray",
    help=(
        "The Megatron-Turing NLG recipe on Ray: curate a corpus, pretrain and fine-tune a GPT, serve it.\n\n"
        "Start with `mtnlg-ray tokenizer train builtin:python-docs --vocab-size 4096 --output tok`, then "
        "`mtnlg-ray init --preset tiny --tokenizer tok --output ckpt` and "
        "`mtnlg-ray generate --checkpoint ckpt --prompt 'def '`."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
tokenizer_app = typer.Typer(help="Train the byte-level BPE tokenizer.", no_args_is_help=True)
export_app = typer.Typer(help="Write a checkpoint in another project's format.", no_args_is_help=True)
import_app = typer.Typer(help="Read a checkpoint from another project's format.", no_args_is_help=True)
data_app = typer.Typer(help="Build a training corpus on Ray Data: read, clean, dedup, label, decontaminate, pack.",
                       no_args_is_help=True)
config_app = typer.Typer(help="Inspect stage configs: shipped defaults, files and --set overrides.", no_args_is_help=True)
app.add_typer(tokenizer_app, name="tokenizer")
app.add_typer(export_app, name="export")
app.add_typer(import_app, name="import")
app.add_typer(config_app, name="config")
app.add_typer(data_app, name="data")

INPUT_HELP = "Files, folders or globs of .txt / .jsonl(.gz) / .parquet, URIs (s3://, gs://, file://), or builtin:python-docs."
SET_HELP = "Override one config key, e.g. --set dedup.threshold=0.85 (repeatable)."


def _stage_printer():
    from rich.console import Console

    console = Console(stderr=True)

    def show(report) -> None:
        extra = f"  [dim]{report.note}[/dim]" if report.note else ""
        rejected = f", {report.rejected:,} rejected" if report.rejected else ""
        console.print(
            f"[green]✓[/green] {report.name:<22} {report.docs_in:>8,} → {report.docs_out:<8,} docs"
            f"{rejected}  ({report.seconds:.1f} s){extra}"
        )

    return console, show


def _print_manifest_summary(console, manifest: dict, output: Path) -> None:
    from rich.table import Table

    table = Table(title=f"dataset {output}")
    table.add_column("stage")
    table.add_column("in", justify="right")
    table.add_column("out", justify="right")
    table.add_column("rejected", justify="right")
    table.add_column("seconds", justify="right")
    for stage in manifest["stages"]:
        table.add_row(stage["name"], f"{stage['in']:,}", f"{stage['out']:,}", f"{stage['rejected']:,}",
                      f"{stage['seconds']:.1f}")
    console.print(table)
    if manifest.get("rejected"):
        reasons = ", ".join(f"{reason} {n:,}" for reason, n in manifest["rejected"].items())
        console.print(f"rejected by reason: {reasons}  (rows in {output / 'rejected'})")
    pack = manifest.get("pack")
    if pack:
        console.print(
            f"{manifest['documents']:,} documents → {pack['train_sequences']:,} train + {pack['val_sequences']:,} "
            f"val sequences of {pack['seq_len'] + 1} tokens in {output / 'tokens'}"
        )


@data_app.command("prepare")
def data_prepare(
    inputs: List[str] = typer.Argument(..., metavar="INPUT...", help=INPUT_HELP),
    output: Path = typer.Option(..., "--output", "-o", help="Dataset directory to write (manifest.json, docs/, rejected/, tokens/, tokenizer/)."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML config (default: the shipped prepare.yaml)."),
    overrides: List[str] = typer.Option([], "--set", help=SET_HELP),
) -> None:
    """Run the whole corpus pipeline on Ray (the connected cluster, or a local one it starts).

    Bad records never stop the run: each lands in rejected/ with its stage and reason.
    """
    from mtnlg_ray.config import load_config
    from mtnlg_ray.data.pipeline import prepare_dataset

    cfg = load_config(config, overrides, stage="prepare")
    console, show = _stage_printer()
    with console.status("running the corpus pipeline on Ray…"):
        manifest = prepare_dataset(inputs, output, cfg, on_stage=show)
    _print_manifest_summary(console, manifest, output)


@data_app.command("label")
def data_label(
    input: List[str] = typer.Argument(..., metavar="INPUT...", help=INPUT_HELP),
    output: Path = typer.Option(..., "--output", "-o", help="Directory for docs/ (with label columns), rejected/, manifest.json."),
    labeler: str = typer.Option(..., "--labeler", help="quality | perplexity | classifier"),
    model: Path = typer.Option(..., "--model", help="Quality model dir, LM checkpoint, or classifier checkpoint."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML config (default: the shipped prepare.yaml)."),
    overrides: List[str] = typer.Option([], "--set", help=SET_HELP),
) -> None:
    """Run only the pseudo-labelling stage (an actor pool, the model loaded once per actor)."""
    from mtnlg_ray.config import load_config
    from mtnlg_ray.data.pipeline import label_corpus

    cfg = load_config(config, [*overrides, f"label.labeler={labeler}", f"label.model={model}"], stage="prepare")
    console, show = _stage_printer()
    with console.status(f"labelling with {labeler}…"):
        manifest = label_corpus(input, output, cfg)
    _print_manifest_summary(console, manifest, output)


@data_app.command("train-quality-classifier")
def data_train_quality_classifier(
    positive: List[str] = typer.Option(..., "--positive", help="INPUT of curated text (repeatable)."),
    negative: List[str] = typer.Option(..., "--negative", help="INPUT of raw / unwanted text (repeatable)."),
    output: Path = typer.Option(..., "--output", "-o", help="Directory for the model (safetensors + JSON, no pickle)."),
    epochs: int = typer.Option(5, "--epochs", help="Passes over the training documents."),
    seed: int = typer.Option(0, "--seed", help="Seed of the train / holdout split and the initialisation."),
) -> None:
    """Train the GPT-3 / MT-NLG style quality classifier: hashed word n-grams + logistic regression."""
    from mtnlg_ray.data.quality import train_quality_classifier

    metrics = train_quality_classifier(positive, negative, output, epochs=epochs, seed=seed)
    typer.echo(json.dumps(metrics, indent=2))


@config_app.command("show")
def config_show(
    stage: str = typer.Option("pretrain", "--stage", help="Whose shipped defaults to start from."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML file to read instead of the defaults."),
    overrides: List[str] = typer.Option([], "--set", help="Override one key, e.g. --set train.max_steps=20."),
) -> None:
    """Print the fully resolved config (file + --set overrides, validated) as YAML."""
    import yaml

    from mtnlg_ray.config import load_config

    resolved = load_config(config, overrides, stage=stage)
    if stage == "pretrain":
        # The layout a cluster would run, checked as the trainer will before any worker starts.
        from mtnlg_ray.train.trainer import check_run_layout

        check_run_layout(resolved, resolved.model.resolve(), "lm")
    typer.echo(yaml.safe_dump(resolved.model_dump(mode="json"), sort_keys=False), nl=False)


@tokenizer_app.command("train")
def tokenizer_train(
    inputs: List[str] = typer.Argument(
        ...,
        metavar="INPUT...",
        help="Files, folders or globs of .txt / .jsonl(.gz) / .parquet, or builtin:python-docs.",
    ),
    vocab_size: int = typer.Option(8192, "--vocab-size", help="Number of tokens, <|endoftext|> included."),
    output: Path = typer.Option(..., "--output", "-o", help="Directory to write tokenizer.json into."),
) -> None:
    """Train a GPT-2-style byte-level BPE tokenizer; any UTF-8 text round-trips exactly."""
    from mtnlg_ray.tokenizer import load_tokenizer, train_tokenizer

    path = train_tokenizer(inputs, vocab_size, output)
    typer.echo(f"wrote {path} ({load_tokenizer(path).get_vocab_size()} tokens)")


@app.command("init")
def init(
    preset: str = typer.Option(..., "--preset", help="Model shape: tiny, small, gpt3-125m ... mtnlg-530b."),
    tokenizer: Path = typer.Option(..., "--tokenizer", help="Directory (or file) holding tokenizer.json."),
    output: Path = typer.Option(..., "--output", "-o", help="Checkpoint directory to write."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random initialisation."),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", help="Context length (default: the preset's)."),
) -> None:
    """Write a randomly initialised checkpoint (init std sqrt(1/(3h)), as in MT-NLG)."""
    from mtnlg_ray.checkpoint import init_checkpoint, load_checkpoint

    path = init_checkpoint(preset, tokenizer, output, seed=seed, seq_len=seq_len)
    model, _ = load_checkpoint(path)
    c = model.config
    typer.echo(
        f"wrote {path}: {preset}, {model.num_parameters():,} parameters, "
        f"{c.n_layer} layers, d_model {c.d_model}, {c.n_head} heads, context {c.seq_len}, vocab {c.vocab_size}"
    )


@app.command("generate")
def generate(
    checkpoint: Path = typer.Option(..., "--checkpoint", "-c", help="Consolidated checkpoint directory."),
    prompt: str = typer.Option(..., "--prompt", "-p", help="Text to continue."),
    max_tokens: int = typer.Option(64, "--max-tokens", help="Most new tokens; stops earlier at <|endoftext|>."),
    temperature: float = typer.Option(1.0, "--temperature", help="0 for greedy decoding."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling: keep the smallest set of this mass."),
    top_k: int = typer.Option(0, "--top-k", help="Keep the k likeliest tokens (0: all)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Same seed, same text."),
) -> None:
    """Continue a prompt with the model, streaming the new text to stdout."""
    from mtnlg_ray.inference import TextGenerator
    from mtnlg_ray.model.generate import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
    generator = TextGenerator(checkpoint)
    for piece in generator.stream(prompt, params):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


@app.command("serve")
def serve(
    checkpoint: Path = typer.Option(..., "--checkpoint", "-c", help="Consolidated checkpoint directory."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind; 0.0.0.0 accepts other machines."),
    port: int = typer.Option(8000, "--port", help="HTTP port."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="MTNLG_API_KEY",
                                          help="Require 'Authorization: Bearer KEY' on /v1 (or set MTNLG_API_KEY)."),
    replicas: int = typer.Option(1, "--replicas", help="Fixed number of replicas, each holding the model once."),
    autoscale: Optional[str] = typer.Option(None, "--autoscale", metavar="MIN,MAX",
                                            help="Scale replicas between MIN and MAX on load instead of --replicas."),
    model_name: Optional[str] = typer.Option(None, "--model-name", help="Model id clients send (default: folder name)."),
    max_batch: int = typer.Option(16, "--max-batch", help="Sequences decoded together per replica."),
    max_waiting: int = typer.Option(64, "--max-waiting", help="Queued requests per replica; more get 503 + Retry-After."),
    kv_cache_tokens: Optional[int] = typer.Option(
        None, "--kv-cache-tokens",
        help="Token slots in each replica's paged KV cache (default: max-batch x the context). A request joins "
             "when blocks for its prompt + max_tokens are free, else it waits."),
    block_size: int = typer.Option(16, "--block-size", help="Tokens per KV cache block."),
    prefill_chunk: int = typer.Option(
        256, "--prefill-chunk", help="Prompt tokens read per step; a longer prompt is read in chunks between "
                                     "decode steps, so running streams keep their pace."),
    prefix_cache: bool = typer.Option(
        True, "--prefix-cache/--no-prefix-cache",
        help="Reuse the KV blocks of an earlier prompt's identical beginning (system prompts, few-shot examples)."),
    num_cpus: float = typer.Option(1.0, "--num-cpus", help="CPUs per replica (also its torch threads)."),
    num_gpus: float = typer.Option(0.0, "--num-gpus", help="GPUs per replica (1 puts the model on cuda in bf16)."),
) -> None:
    """Serve the checkpoint on Ray Serve with an OpenAI-compatible API; Ctrl-C stops it.

    Endpoints: POST /v1/completions and /v1/chat/completions (add "stream": true for server-sent events),
    GET /v1/models, GET /health. Concurrent requests decode together in one continuous batch per replica,
    over a paged KV cache with prefix caching; /health reports the cache's blocks and prefix hit rate.

    Runs on the connected Ray cluster (RAY_ADDRESS or `ray start`), else on a local one.
    For a long-lived deployment: `serve deploy mtnlg_ray/configs/serve.yaml`.

    Example: `mtnlg-ray serve -c work/ckpt`, then
    `curl localhost:8000/v1/completions -d '{"prompt": "def ", "max_tokens": 32, "temperature": 0}'`
    or any OpenAI client with base_url http://localhost:8000/v1.
    """
    import signal
    import time

    from ray import serve as ray_serve

    from mtnlg_ray.serve import serve_model
    from mtnlg_ray.serve.app import parse_args

    if autoscale and replicas != 1:
        raise MtnlgError("--replicas and --autoscale: give one of them, not both")
    args = parse_args({
        "checkpoint": str(checkpoint), "model_name": model_name, "api_key": api_key, "max_batch": max_batch,
        "max_waiting": max_waiting, "num_replicas": replicas, "autoscale": autoscale, "num_cpus": num_cpus,
        "num_gpus": num_gpus, "kv_cache_tokens": kv_cache_tokens, "block_size": block_size,
        "prefill_chunk": prefill_chunk, "prefix_cache": prefix_cache,
    })
    url = serve_model(args, host=host, port=port)
    auth = f" -H 'Authorization: Bearer {api_key}'" if api_key else ""
    typer.echo(f"serving {args.name} at {url}/v1  (health: {url}/health)")
    typer.echo(
        f"try:  curl {url}/v1/completions -H 'Content-Type: application/json'{auth} "
        f"-d '{{\"model\": \"{args.name}\", \"prompt\": \"def \", \"max_tokens\": 32, \"temperature\": 0}}'"
    )
    typer.echo("Ctrl-C to stop.", err=True)

    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)  # `kill` and container stops shut down as cleanly as Ctrl-C
    signal.signal(signal.SIGINT, stop)
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        ray_serve.delete("mtnlg")
        typer.echo("stopped.", err=True)


@export_app.command("hf")
def export_hf(
    checkpoint: Path = typer.Option(..., "--checkpoint", "-c", help="Consolidated checkpoint directory."),
    output: Path = typer.Option(..., "--output", "-o", help="Directory for the Hugging Face model."),
) -> None:
    """Write a directory that transformers' GPT2LMHeadModel and AutoTokenizer load, with equal logits."""
    from mtnlg_ray.export import export_hf as run

    typer.echo(f"wrote {run(checkpoint, output)}")


@import_app.command("hf")
def import_hf(
    input: Path = typer.Option(..., "--input", "-i", help="Local Hugging Face GPT-2 directory (with tokenizer.json)."),
    output: Path = typer.Option(..., "--output", "-o", help="Checkpoint directory to write."),
) -> None:
    """Turn a local Hugging Face GPT-2 directory into a consolidated checkpoint."""
    from mtnlg_ray.export import import_hf as run

    typer.echo(f"wrote {run(input, output)}")


@app.command("plan")
def plan(
    preset: str = typer.Option(..., "--preset", help="Model shape, e.g. mtnlg-530b."),
    tp: int = typer.Option(1, "--tp", help="Tensor-parallel size (GPUs inside a node)."),
    pp: int = typer.Option(1, "--pp", help="Pipeline-parallel size (stages)."),
    dp: int = typer.Option(1, "--dp", help="Data-parallel size (model replicas)."),
    global_batch: Optional[int] = typer.Option(None, "--global-batch", help="Sequences per iteration."),
    micro_batch: int = typer.Option(1, "--micro-batch", help="Sequences per GPU per forward."),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", help="Sequence length (default: the preset's)."),
    vocab_size: Optional[int] = typer.Option(
        None, "--vocab-size", help="Padded vocabulary, as your tokenizer gives it (default: the preset's)."),
    iter_time: Optional[float] = typer.Option(None, "--iter-time", help="Measured seconds per iteration."),
    gpu: str = typer.Option("a100-80gb", "--gpu", help="a100-80gb, h100-80gb or h200-141gb."),
    schedule: str = typer.Option("1f1b", "--schedule", help="Pipeline schedule: gpipe, 1f1b, interleaved-1f1b, "
                                 "interleaved-zero-bubble."),
    virtual: int = typer.Option(1, "--virtual", help="Pipeline stages a rank (interleaved schedules: 2 or more)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
) -> None:
    """Parameters, per-GPU memory, FLOPs per iteration and, given --iter-time, TFLOP/s per GPU.

    Only layouts `mtnlg-ray pretrain` can run are planned (the same checks, one line and exit 2
    otherwise), and the plan ends with the pretrain command for its layout.
    """
    import dataclasses

    from mtnlg_ray.model.plan import plan_layout, render_plan
    from mtnlg_ray.model.presets import get_preset
    from mtnlg_ray.train.parallel import check_layout

    shape = get_preset(preset)
    shape = dataclasses.replace(shape, seq_len=seq_len or shape.seq_len, vocab_size=vocab_size or shape.vocab_size)
    check_layout(shape, tp * pp * dp, tp, pp, pp_schedule=schedule, pp_virtual=virtual)
    result = plan_layout(
        preset, tp, pp, dp,
        global_batch=global_batch, micro_batch=micro_batch, seq_len=seq_len, iter_time=iter_time, gpu=gpu,
        vocab_size=vocab_size, schedule=schedule, virtual=virtual,
    )
    sets = [f"model.preset={preset}", f"parallel.workers={tp * pp * dp}", f"parallel.tp={tp}", f"parallel.pp={pp}"]
    if pp > 1:
        sets += [f"parallel.pp_schedule={schedule}"] + ([f"parallel.pp_virtual={virtual}"] if virtual > 1 else [])
    sets += [f"train.global_batch_size={result['global_batch']}", f"train.micro_batch_size={micro_batch}",
             "parallel.use_gpu=true", "train.precision=bf16"]
    result["command"] = "mtnlg-ray pretrain " + " ".join(f"--set {item}" for item in sets)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    from rich.console import Console

    console = Console()
    console.print(render_plan(result))
    console.print(result["command"], soft_wrap=True)


@app.command("pretrain")
def pretrain(
    config: Optional[Path] = typer.Option(None, "--config", help="YAML config (default: the shipped pretrain.yaml)."),
    overrides: List[str] = typer.Option([], "--set", help="Override one config key, e.g. --set train.max_steps=20 (repeatable)."),
) -> None:
    """Pretrain on Ray Train (FSDP2 + tensor parallel, elastic, fault tolerant) with the MT-NLG schedule.

    Needs data.path: a dataset from `mtnlg-ray data prepare`. Running the same command again with
    the same run.name resumes from the newest checkpoint. Ends with a consolidated checkpoint in
    <run.storage_path>/<run.name>/final.
    """
    from rich.console import Console

    from mtnlg_ray.config import load_config
    from mtnlg_ray.train.trainer import pretrain as run

    cfg = load_config(config, overrides, stage="pretrain")
    console = Console(stderr=True)

    def show(record: dict) -> None:
        if record.get("event") == "start":
            resumed = record.get("resumed_from")
            extra = f", resumed at step {resumed['step']} (written at world size {resumed['world_size']})" if resumed else ""
            console.print(f"[bold]world size {record['world_size']}[/bold] (dp {record['dp']} × tp {record['tp']}){extra}")
        elif record.get("event") == "checkpoint":
            console.print(f"[dim]checkpoint at step {record['step']}[/dim]")
        elif "loss" in record:
            val = f"  val {record['val_loss']:.4f}" if record.get("val_loss") is not None else ""
            console.print(
                f"step {record['step']:>6}  loss {record['loss']:.4f}{val}  lr {record['lr']:.2e}  "
                f"batch {record['global_batch']}  {record['tokens_per_s']:,.0f} tok/s  "
                f"MFU {100 * record['mfu']:.1f}%  |g| {record['grad_norm']:.2f}"
            )

    result = run(cfg, on_record=show)
    console.print(f"final weights: {result['final']}  (metrics in {result['run_dir']}/metrics.jsonl)")
    typer.echo(result["final"])


# Cluster operation: stages as Ray Jobs, the jobs on a cluster, and a one-machine cluster to submit to.
local_app = typer.Typer(help="A one-machine Ray cluster to submit jobs to: `ray start --head` on 127.0.0.1.",
                        no_args_is_help=True)
jobs_app = typer.Typer(help="Ray Jobs on a cluster: list, status, logs, stop.", no_args_is_help=True)
app.add_typer(local_app, name="local")
app.add_typer(jobs_app, name="jobs")

ADDRESS_HELP = ("The cluster's dashboard, e.g. http://HEAD:8265 (default: $RAY_ADDRESS, else the cluster "
                "`mtnlg-ray local up` started here).")


def _report_job_end(result) -> None:
    """Exit with the job's result: nothing more when it succeeded, else the end of its log and its exit code."""
    if result.exit_code == 0:
        if result.status == "SUCCEEDED":
            typer.echo(f"job {result.job_id} succeeded", err=True)
        return
    if result.log_tail:
        typer.echo(f"--- last lines of the log of job {result.job_id} ---", err=True)
        typer.echo(result.log_tail, err=True)
    why = "its log ends above" if result.log_tail else (result.message or "no log")
    typer.echo(f"error: job {result.job_id} {result.status} with exit code {result.exit_code} ({why})", err=True)
    raise typer.Exit(result.exit_code)


@app.command("submit", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def submit(
    ctx: typer.Context,
    stage: str = typer.Argument(..., metavar="STAGE", help="prepare | label | pretrain | finetune | self-train | serve"),
    address: Optional[str] = typer.Option(None, "--address", envvar="RAY_ADDRESS", help=ADDRESS_HELP),
    no_wait: bool = typer.Option(False, "--no-wait", help="Print the job id and return (serve: once it answers)."),
    env: List[str] = typer.Option([], "--env", help="KEY=VALUE for the job's environment (repeatable)."),
    job_id: Optional[str] = typer.Option(None, "--job-id", help="Submission id to use instead of a generated one."),
) -> None:
    """Run a stage as a Ray Job: STAGE, then the same arguments as the stage's own command.

    Example: `mtnlg-ray submit prepare builtin:python-docs --output work/data --set pack.seq_len=64`.
    The arguments and the config are checked here first, so a bad key fails before anything is sent.
    Relative paths become absolute (right when the cluster is this machine; on a remote cluster give
    paths every node sees). The job runs this machine's mtnlg_ray package with the resolved config.
    Follows the log and exits with the job's result; `--no-wait` prints the job id instead (for
    serve, once the endpoint answers, with its URL). Ctrl-C stops following, not the job.
    """
    from mtnlg_ray.jobs import submit as run

    submitted: list[str] = []

    def on_submitted(job: str, where: str) -> None:
        submitted.append(job)
        typer.echo(f"submitted job {job} to {where}", err=True)
        if no_wait:
            typer.echo(job)

    try:
        result = run(stage, list(ctx.args), address, no_wait=no_wait, env=env, job_id=job_id,
                     on_submitted=on_submitted)
    except KeyboardInterrupt:
        job = submitted[0] if submitted else "JOB_ID"
        typer.echo(f"stopped following; job {job} keeps running (`mtnlg-ray jobs stop {job}` stops it)", err=True)
        raise typer.Exit(130)
    if result.url:
        typer.echo(f"{result.url}/v1")
        typer.echo(f"serving at {result.url}/v1; job {result.job_id} keeps running "
                   f"(`mtnlg-ray jobs stop {result.job_id}` stops it)", err=True)
        typer.echo(f"try:  curl {result.url}/v1/completions -H 'Content-Type: application/json' "
                   "-d '{\"prompt\": \"def \", \"max_tokens\": 32, \"temperature\": 0}'", err=True)
    elif no_wait and result.exit_code == 0:
        typer.echo(f"job {result.job_id} is {result.status}: `mtnlg-ray jobs logs {result.job_id} --follow` follows "
                   f"it, `mtnlg-ray jobs stop {result.job_id}` stops it", err=True)
    _report_job_end(result)


@jobs_app.command("list")
def jobs_list(address: Optional[str] = typer.Option(None, "--address", envvar="RAY_ADDRESS", help=ADDRESS_HELP)) -> None:
    """Every job on the cluster, oldest first: id, stage, status, start time, entrypoint."""
    import datetime

    from rich.console import Console
    from rich.table import Table

    from mtnlg_ray.jobs import list_jobs

    table = Table()
    for column in ("job", "stage", "status", "started", "entrypoint"):
        table.add_column(column)
    for job in list_jobs(address):
        started = (datetime.datetime.fromtimestamp(job.start_time / 1000).strftime("%Y-%m-%d %H:%M:%S")
                   if job.start_time else "")
        table.add_row(job.submission_id or job.job_id or "", (job.metadata or {}).get("mtnlg_stage", ""),
                      str(job.status), started, job.entrypoint or "")
    Console(width=200).print(table)


@jobs_app.command("status")
def jobs_status(
    job_id: str = typer.Argument(..., help="A job id from `mtnlg-ray submit` or `mtnlg-ray jobs list`."),
    address: Optional[str] = typer.Option(None, "--address", envvar="RAY_ADDRESS", help=ADDRESS_HELP),
) -> None:
    """Print the job's status (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED); a failed job's log tail on stderr."""
    from mtnlg_ray.jobs import job_status

    result = job_status(address, job_id)
    typer.echo(result.status)
    if result.log_tail:
        why = "stopped" if result.status == "STOPPED" else f"exit code {result.exit_code}"
        typer.echo(f"{why}; last lines of its log:\n{result.log_tail}", err=True)


@jobs_app.command("logs")
def jobs_logs(
    job_id: str = typer.Argument(..., help="A job id from `mtnlg-ray submit` or `mtnlg-ray jobs list`."),
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing until the job ends; exit with its result."),
    address: Optional[str] = typer.Option(None, "--address", envvar="RAY_ADDRESS", help=ADDRESS_HELP),
) -> None:
    """Print the job's log (stdout and stderr of its driver)."""
    from mtnlg_ray.jobs import job_logs

    try:
        result = job_logs(address, job_id, follow_log=follow)
    except KeyboardInterrupt:
        raise typer.Exit(130)
    if result is not None:
        _report_job_end(result)


@jobs_app.command("stop")
def jobs_stop(
    job_id: str = typer.Argument(..., help="A job id from `mtnlg-ray submit` or `mtnlg-ray jobs list`."),
    address: Optional[str] = typer.Option(None, "--address", envvar="RAY_ADDRESS", help=ADDRESS_HELP),
) -> None:
    """Stop a job (SIGTERM to its driver, SIGKILL after a grace period) and print its final status."""
    from mtnlg_ray.jobs import stop_job

    typer.echo(f"job {job_id}: {stop_job(address, job_id)}")


@local_app.command("up", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def local_up(
    ctx: typer.Context,
    num_cpus: Optional[int] = typer.Option(None, "--num-cpus", help="CPUs Ray may schedule (default: all)."),
    num_gpus: Optional[int] = typer.Option(None, "--num-gpus", help="GPUs Ray may schedule (default: all)."),
    port: int = typer.Option(6379, "--port", help="Port of the cluster's GCS."),
    dashboard_port: int = typer.Option(8265, "--dashboard-port", help="Port of the dashboard and its job server."),
    temp_dir: Optional[Path] = typer.Option(None, "--temp-dir", help="Ray's session files (default: Ray's, /tmp/ray)."),
) -> None:
    """Start a Ray head on 127.0.0.1 for `submit` (its default cluster); arguments after `--` go to `ray start`.

    Commands on this machine (`mtnlg-ray pretrain`, `ray status`) join it too.
    """
    from mtnlg_ray.local_cluster import authentication_mode, start_local_cluster

    cluster = start_local_cluster(num_cpus=num_cpus, num_gpus=num_gpus, port=port, dashboard_port=dashboard_port,
                                  temp_dir=temp_dir, ray_args=list(ctx.args))
    where = f" --temp-dir {temp_dir}" if temp_dir else ""
    address = f" --address {cluster.dashboard_url}" if temp_dir else ""
    typer.echo(f"Ray is up: dashboard and job server {cluster.dashboard_url}, GCS {cluster.gcs_address}")
    typer.echo(f"submit:  mtnlg-ray submit prepare builtin:python-docs --output work/data{address}")
    typer.echo(f"stop:    mtnlg-ray local down{where}")
    if authentication_mode(cluster.dashboard_url) == "token":
        typer.echo("token authentication is on (Ray's default once ~/.ray/auth_token exists): mtnlg-ray sends "
                   "the token; for Ray's own CLI, export RAY_AUTH_MODE=token")


@local_app.command("down")
def local_down(
    temp_dir: Optional[Path] = typer.Option(None, "--temp-dir", help="The --temp-dir given to `local up`."),
) -> None:
    """Stop the cluster `local up` started (its processes only; other Ray instances keep running)."""
    from mtnlg_ray.local_cluster import stop_local_cluster

    cluster = stop_local_cluster(temp_dir)
    typer.echo(f"stopped the local cluster at {cluster.dashboard_url}" if cluster else "no local cluster is up")


@local_app.command("status")
def local_status(
    temp_dir: Optional[Path] = typer.Option(None, "--temp-dir", help="The --temp-dir given to `local up`."),
) -> None:
    """Whether the cluster of `local up` runs, and where; exit code 1 when it does not."""
    from mtnlg_ray.local_cluster import is_running, read_state, session_processes

    cluster = read_state(temp_dir)
    if cluster is None or not is_running(cluster):
        typer.echo("no local cluster is up (`mtnlg-ray local up` starts one)")
        raise typer.Exit(1)
    typer.echo(f"up: dashboard and job server {cluster.dashboard_url}, GCS {cluster.gcs_address}, "
               f"{len(session_processes(cluster.session_id))} processes, session {cluster.session_dir}")


@app.command("plot")
def plot(
    run_dir: Path = typer.Argument(..., help="A run directory (<run.storage_path>/<run.name>) holding metrics.jsonl."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="PNG to write (default: RUN_DIR/loss.png)."),
) -> None:
    """Plot training and validation loss of a run to loss.png."""
    from mtnlg_ray.train.plot import plot_losses

    typer.echo(f"wrote {plot_losses(run_dir, output)}")


def _dev_line(dev: dict | None, metric: str) -> str:
    if not dev:
        return ""
    if "accuracy" in dev:
        return f"dev acc {dev['accuracy']:.4f}  macro-F1 {dev['macro_f1']:.4f}"
    return f"dev loss {dev['loss']:.4f}  exact {dev['exact_match']:.4f}"


def _finetune_printer():
    from rich.console import Console

    console = Console(stderr=True)

    def show(record: dict) -> None:
        if record.get("event") == "start":
            resumed = record.get("resumed_from")
            extra = f", resumed at step {resumed['step']}" if resumed else ""
            console.print(f"[bold]world size {record['world_size']}[/bold] (dp {record['dp']} × tp {record['tp']}), "
                          f"{record.get('examples', 0):,} examples, "
                          f"{record.get('trainable_parameters', 0):,} trainable parameters{extra}")
        elif "dev" in record:
            best = "  [green]best[/green]" if record.get("best") else ""
            console.print(f"epoch {record['epoch']:.2f}  step {record['step']}  loss {record['loss']:.4f}  "
                          f"{_dev_line(record['dev'], '')}{best}")
        elif "loss" in record and record["step"] % 10 == 0:
            console.print(f"[dim]step {record['step']:>6}  loss {record['loss']:.4f}  lr {record['lr']:.2e}  "
                          f"{record['tokens_per_s']:,.0f} tok/s[/dim]")
        elif record.get("event") == "done" and record.get("stopped_early"):
            console.print(f"stopped early at step {record['step']} (train.patience)")

    return console, show


@app.command("finetune")
def finetune(
    config: Optional[Path] = typer.Option(None, "--config", help="YAML config (default: the shipped finetune.yaml)."),
    overrides: List[str] = typer.Option([], "--set", help="Override one config key, e.g. --set data.train=train.tsv (repeatable)."),
) -> None:
    """Fine-tune a checkpoint on Ray Train: classification (a head) or SFT (prompt → completion).

    Needs data.train (TSV / CSV / JSONL / Parquet) and init.checkpoint (a consolidated checkpoint or
    a pretraining run directory; or tokenizer.path for random weights). task.mode picks full
    fine-tuning, LoRA (merged into the saved weights) or a frozen backbone. With data.dev, the dev
    set is scored after every epoch and the best epoch becomes <run.storage_path>/<run.name>/final.

    Example: mtnlg-ray finetune --set init.checkpoint=runs/pretrain --set data.train=train.tsv
    --set data.dev=dev.tsv --set data.text_field=sentence
    """
    from mtnlg_ray.config import load_config
    from mtnlg_ray.finetune.trainer import finetune as run

    cfg = load_config(config, overrides, stage="finetune")
    console, show = _finetune_printer()
    result = run(cfg, on_record=show)
    if result["dev"]:
        console.print(f"best {result['metric']}: {result['dev'][result['metric']]:.4f}  ({_dev_line(result['dev'], '')})")
    console.print(f"final weights: {result['final']}  (metrics in {result['run_dir']}/metrics.jsonl)")
    typer.echo(result["final"])


@app.command("self-train")
def self_train(
    config: Optional[Path] = typer.Option(None, "--config", help="YAML config (default: the shipped selftrain.yaml)."),
    overrides: List[str] = typer.Option([], "--set", help="Override one config key, e.g. --set selftrain.rounds=1 (repeatable)."),
) -> None:
    """Self-training with pseudo-labels: teacher → label the pool on the actor pool → student, for N rounds.

    Round 0 fine-tunes a teacher on data.train. Each round the teacher labels selftrain.unlabelled
    through the corpus pipeline's classifier labeller (a Ray Data actor pool); predictions with
    confidence >= selftrain.threshold (default 0.5; selftrain.per_class_top_k for class balance,
    selftrain.soft_labels for the teacher's confidence as the target) join the labelled set, and a
    student is fine-tuned on both from init.checkpoint. Writes self_train_report.json and
    self_train.png in <run.storage_path>/<run.name>.
    """
    from rich.console import Console
    from rich.table import Table

    from mtnlg_ray.config import load_config
    from mtnlg_ray.finetune.selftrain import self_train as run

    cfg = load_config(config, overrides, stage="selftrain")
    console, show = _finetune_printer()

    def on_event(event: dict) -> None:
        if event["event"] == "round":
            kept = f", pseudo-labels kept {event['kept']}" if event.get("kept") else ""
            console.print(f"[bold]round {event['round']}[/bold]: {event['role']} on {event['train']:,} examples{kept}")
        elif event["event"] == "label":
            console.print(f"[bold]round {event['round']}[/bold]: labelling {event['pool']:,} pool texts with the teacher")

    report = run(cfg, on_event=on_event, on_record=show)
    table = Table(title=f"self-training: {report['labelled']:,} labelled, {report['pool']:,} in the pool, "
                        f"threshold {report['threshold']}")
    for column in ("round", "train examples", "kept per class", "pseudo-label acc", "dev acc", "dev macro F1", "seconds"):
        table.add_column(column, justify="right")
    for r in report["rounds"]:
        def num(x):
            return "-" if x is None else f"{x:.4f}"
        table.add_row(str(r["round"]), f"{r['train_examples']:,}",
                      ", ".join(f"{k}: {v:,}" for k, v in r["kept_per_class"].items()) or "-",
                      num(r["pseudo_label_accuracy"]), num(r["dev_accuracy"]), num(r["dev_macro_f1"]), f"{r['seconds']:.0f}")
    Console().print(table)
    console.print(f"report: {Path(report['final']).parents[1] / 'self_train_report.json'}  plot: {report['plot']}")
    typer.echo(report["final"])


@app.command("evaluate")
def evaluate(
    checkpoint: Path = typer.Option(..., "--checkpoint", "-c", help="Consolidated checkpoint directory."),
    data: List[str] = typer.Option(..., "--data", "-d",
                                   help="lm: INPUT text (file, folder, glob, builtin:python-docs) or a dataset dir "
                                        "from `data prepare`; classification: a labelled TSV / CSV / JSONL / Parquet."),
    task: str = typer.Option("lm", "--task", help="lm (perplexity, bits per byte) or classification."),
    text_field: Optional[str] = typer.Option(None, "--text-field", help="Column or JSON field holding the text (default: text)."),
    label_field: str = typer.Option("label", "--label-field", help="Column holding the gold label (classification)."),
    split: str = typer.Option("val", "--split", help="Which packed split of a dataset dir to score (lm)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
) -> None:
    """Score a checkpoint: perplexity and bits per byte (lm), or accuracy and P/R/F1 (classification)."""
    from mtnlg_ray.finetune.evaluate import evaluate as run

    result = run(checkpoint, data, task, text_field=text_field, label_field=label_field, split=split)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if result["task"] == "lm":
        console.print(f"{result['tokens']:,} tokens, {result['bytes']:,} bytes: loss {result['loss']:.4f} nats/token, "
                      f"perplexity {result['perplexity']:.2f}, {result['bits_per_byte']:.4f} bits per byte")
        return
    table = Table(title=f"{result['n']:,} examples: accuracy {result['accuracy']:.4f}, macro F1 {result['macro_f1']:.4f}")
    for column in ("label", "precision", "recall", "F1", "support"):
        table.add_column(column, justify="left" if column == "label" else "right")
    for label, row in result["per_class"].items():
        table.add_row(label, f"{row['precision']:.4f}", f"{row['recall']:.4f}", f"{row['f1']:.4f}", str(row["support"]))
    table.add_row("macro", f"{result['macro_precision']:.4f}", f"{result['macro_recall']:.4f}",
                  f"{result['macro_f1']:.4f}", str(result["n"]))
    console.print(table)


@app.command("quickstart")
def quickstart(
    workdir: Path = typer.Option(Path("quickstart"), "--workdir", help="Where every artifact goes."),
    smoke: bool = typer.Option(False, "--smoke", help="Tiny sizes for CI: every stage runs, in about a third of the time."),
    port: int = typer.Option(8000, "--port", help="HTTP port the server answers its one request on."),
) -> None:
    """The whole pipeline on the built-in corpus on a local Ray (about 7 minutes on 2 cores).

    Trains a quality classifier, prepares builtin:python-docs with it as the pseudo-labeller on
    the actor pool, pretrains the tiny GPT on 2 Ray Train workers, fine-tunes a classifier on a
    task built from the corpus, serves the pretrained model and answers one request, then prints
    where each artifact is and how to query a server.
    """
    from rich.console import Console

    from mtnlg_ray.quickstart import quickstart as run

    console = Console(stderr=True)

    def on_step(name: str, detail: str) -> None:
        console.rule(f"[bold]{name}[/bold]")
        console.print(detail)

    def on_record(record: dict) -> None:
        if "dev" in record:
            console.print(f"  epoch {record['epoch']:.2f}  {_dev_line(record['dev'], '')}")
        elif "loss" in record and (record["step"] % 25 == 0 or "val_loss" in record):
            val = f"  val {record['val_loss']:.3f}" if record.get("val_loss") is not None else ""
            console.print(f"  step {record['step']:>4}  loss {record['loss']:.3f}{val}  {record['tokens_per_s']:,.0f} tok/s")

    _, show_stage = _stage_printer()
    result = run(workdir, smoke=smoke, port=port, on_step=on_step, on_record=on_record, on_stage=show_stage)
    # Plain lines, not a table: paths stay whole for copying, whatever the terminal width.
    quality = result["quality"]
    val = result["pretrain"]["val_loss"]
    acc = result["finetune"]["dev_accuracy"]
    typer.echo(f"quickstart finished in {result['seconds']:.0f}s; artifacts:")
    typer.echo(f"  quality classifier     {quality['path']}  (holdout accuracy {quality.get('holdout_accuracy', float('nan')):.3f})")
    typer.echo(f"  curated dataset        {result['data']['path']}  ({result['data']['documents']:,} documents kept, "
               f"{result['data']['rejected']:,} rejected; see its manifest.json and rejected/)")
    typer.echo(f"  pretrained GPT         {result['pretrain']['path']}  (loss {result['pretrain']['loss']:.3f}"
               + (f", val {val:.3f})" if val is not None else ")"))
    typer.echo(f"  fine-tuned classifier  {result['finetune']['path']}"
               + (f"  (dev accuracy {acc:.3f})" if acc is not None else ""))
    serve = result["serve"]
    typer.echo(f"served answer to {serve['prompt']!r}: {serve['completion']!r}")
    typer.echo(f"serve it again:  mtnlg-ray serve --checkpoint {result['pretrain']['path']}")
    body = json.dumps({"prompt": serve["prompt"], "max_tokens": 24,
                       **{k: serve[k] for k in ("temperature", "top_p", "seed")}})
    typer.echo(f"then query it:   curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' -d '{body}'")
    typer.echo(f"classify text:   mtnlg-ray evaluate -c {result['finetune']['path']} -d {result['workdir']}/task/dev.jsonl "
               "--task classification")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
