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
    num_cpus: float = typer.Option(1.0, "--num-cpus", help="CPUs per replica (also its torch threads)."),
    num_gpus: float = typer.Option(0.0, "--num-gpus", help="GPUs per replica (1 puts the model on cuda in bf16)."),
) -> None:
    """Serve the checkpoint on Ray Serve with an OpenAI-compatible API; Ctrl-C stops it.

    Endpoints: POST /v1/completions and /v1/chat/completions (add "stream": true for server-sent events),
    GET /v1/models, GET /health. Concurrent requests decode together in one continuous batch per replica.

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
        "num_gpus": num_gpus,
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
    iter_time: Optional[float] = typer.Option(None, "--iter-time", help="Measured seconds per iteration."),
    gpu: str = typer.Option("a100-80gb", "--gpu", help="a100-80gb, h100-80gb or h200-141gb."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
) -> None:
    """Parameters, per-GPU memory, FLOPs per iteration and, given --iter-time, TFLOP/s per GPU."""
    from mtnlg_ray.model.plan import plan_layout, render_plan

    result = plan_layout(
        preset, tp, pp, dp,
        global_batch=global_batch, micro_batch=micro_batch, seq_len=seq_len, iter_time=iter_time, gpu=gpu,
    )
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    from rich.console import Console

    Console().print(render_plan(result))


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


@app.command("plot")
def plot(
    run_dir: Path = typer.Argument(..., help="A run directory (<run.storage_path>/<run.name>) holding metrics.jsonl."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="PNG to write (default: RUN_DIR/loss.png)."),
) -> None:
    """Plot training and validation loss of a run to loss.png."""
    from mtnlg_ray.train.plot import plot_losses

    typer.echo(f"wrote {plot_losses(run_dir, output)}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
