"""Generation commands: `generate` (one prompt, in this process) and `serve` (the OpenAI-compatible
server on Ray Serve, until Ctrl-C)."""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path
from typing import Optional

import typer

from mtnlg_ray.apikey import KEY_VARIABLES, blank_variable
from mtnlg_ray.cli.app import app
from mtnlg_ray.errors import ConfigError, InputError


@app.command("generate")
def generate(
    checkpoint: Path = typer.Option(..., "--checkpoint", "-c", help="Consolidated checkpoint directory."),
    prompt: str = typer.Option(..., "--prompt", "-p", help="Text to continue."),
    max_tokens: int = typer.Option(64, "--max-tokens", help="Most new tokens; stops earlier at <|endoftext|> or "
                                   "where prompt + text fill the model's context (said on stderr)."),
    temperature: float = typer.Option(1.0, "--temperature", help="0 for greedy decoding."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling: keep the smallest set of this mass "
                                "(0: the likeliest token alone, as the server reads top_p 0)."),
    top_k: int = typer.Option(0, "--top-k", help="Keep the k likeliest tokens (0: all)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Same seed, same text."),
) -> None:
    """Continue a prompt with the model, streaming the new text to stdout.

    Example: mtnlg-ray generate -c runs/pretrain/final -p 'def ' --max-tokens 40
    """
    from mtnlg_ray.inference import TextGenerator
    from mtnlg_ray.model.generate import SamplingParams
    from mtnlg_ray.serve.protocol import openai_top_p

    if not 0.0 <= top_p <= 1.0:  # also refuses NaN; 0 is the likeliest token alone
        raise InputError(f"--top-p: expected a value in [0, 1], got {top_p}")
    try:
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=openai_top_p(top_p),
                                top_k=top_k, seed=seed)
    except InputError as err:  # its field, `max_tokens: ...`, named as the option typed
        field, _, rest = str(err).partition(":")
        raise InputError(f"--{field.replace('_', '-')}:{rest}") from None
    generator = TextGenerator(checkpoint)
    try:
        prompt_tokens = len(generator.encode(prompt))
    except InputError as err:  # `prompt: ...`, named as the option typed
        raise InputError(f"--prompt{str(err).removeprefix('prompt')}") from None
    # The server's rule, OpenAI's: prompt + max_tokens within the context (the model could make one more,
    # whose token is never read back, and did here, so a text of that length could not be asked of a server).
    room = generator.context - prompt_tokens
    if max_tokens > room:  # the server answers such a request with 400; here the text stops short, with a note
        typer.echo(f"note: the model's context is {generator.context} tokens and the prompt takes "
                   f"{prompt_tokens}, so it makes at most {room} new tokens, not {max_tokens}", err=True)
        params = dataclasses.replace(params, max_tokens=room)
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
    api_key_sha256: Optional[str] = typer.Option(
        None, "--api-key-sha256", envvar="MTNLG_API_KEY_SHA256",
        help="The key's SHA-256 (hex) instead of the key, e.g. from `printf %s KEY | sha256sum` (or set "
             "MTNLG_API_KEY_SHA256); a submitted serve job gets its key this way."),
    replicas: Optional[int] = typer.Option(
        None, "--replicas", help="Fixed number of replicas, each holding the model once (default 1)."),
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
    no_prefix_cache: bool = typer.Option(  # one name: the pair widened the option column, cutting off help text
        False, "--no-prefix-cache",
        help="Do not reuse the KV blocks of an earlier prompt's identical beginning (system prompts, few-shot "
             "examples); reuse is on by default."),
    num_cpus: float = typer.Option(1.0, "--num-cpus", help="CPUs per replica (also its torch threads)."),
    num_gpus: float = typer.Option(0.0, "--num-gpus", help="GPUs per replica (above 0 puts the model on cuda in bf16; 0.5 shares a GPU by two)."),
) -> None:
    """Serve the checkpoint on Ray Serve with an OpenAI-compatible API; Ctrl-C stops it.

    Endpoints: POST /v1/completions and /v1/chat/completions (add "stream": true for server-sent events),
    GET /v1/models and /v1/models/NAME, GET /health. Concurrent requests decode together in one continuous batch per replica,
    over a paged KV cache with prefix caching; /health reports the cache's blocks and prefix hit rate.

    Runs on the connected Ray cluster (RAY_ADDRESS or `ray start`), else on a local one.
    For a long-lived deployment: `serve deploy mtnlg_ray/configs/serve.yaml`.

    Example: `mtnlg-ray serve -c runs/pretrain/final`, then
    `curl localhost:8000/v1/completions -d '{"prompt": "def ", "max_tokens": 32, "temperature": 0}'`
    or any OpenAI client with base_url http://localhost:8000/v1.
    """
    from mtnlg_ray.serve.app import serve_until_stopped

    args = serve_args(locals())

    def ready(url: str) -> None:
        for line in ready_lines(args.name, url, keyed=bool(args.api_key_sha256)):
            typer.echo(line)
        if "RAY_JOB_CONFIG_JSON_ENV_VAR" not in os.environ:  # a Ray Job's log: Ctrl-C there stops following
            typer.echo("Ctrl-C to stop.", err=True)

    serve_until_stopped(args, host=host, port=port, on_ready=ready)
    typer.echo("stopped.", err=True)


def serve_args(options: dict):
    """The deployment's `ServeArgs` from `serve`'s parsed options (by parameter name), after what `serve`
    refuses before anything starts: `submit serve` checks a job's options with it too (a bad --autoscale
    or a key and a digest that disagree started a job that failed)."""
    from mtnlg_ray.serve.app import parse_args

    replicas, port = options["replicas"], options["port"]
    if options["autoscale"] and replicas is not None:
        raise ConfigError("--replicas and --autoscale: give one of them, not both")
    if not 1 <= port <= 65535:  # port 0 would bind a port the printed URL cannot name
        raise ConfigError(f"--port {port}: expected a port number from 1 to 65535")
    if options["api_key"] is None and options["api_key_sha256"] is None:  # a key given: an empty variable is unused
        for variable in KEY_VARIABLES:
            if (blank := blank_variable(variable, None)) is not None:
                raise ConfigError(blank)
    return parse_args({
        "checkpoint": str(options["checkpoint"]), "model_name": options["model_name"], "api_key": options["api_key"],
        "api_key_sha256": options["api_key_sha256"], "max_batch": options["max_batch"],
        "max_waiting": options["max_waiting"], "num_replicas": 1 if replicas is None else replicas,
        "autoscale": options["autoscale"], "num_cpus": options["num_cpus"], "num_gpus": options["num_gpus"],
        "kv_cache_tokens": options["kv_cache_tokens"], "block_size": options["block_size"],
        "prefill_chunk": options["prefill_chunk"], "prefix_cache": not options["no_prefix_cache"],
    })


def ready_lines(name: str, url: str, keyed: bool) -> list[str]:
    """What `serve` prints once its replicas are up: the URL and a request to try. The key itself is
    never printed (the lines end up in job logs), so a keyed server's curl reads it from MTNLG_API_KEY,
    and says so: pasted where that variable is unset, it was refused with 401."""
    auth = ' -H "Authorization: Bearer $MTNLG_API_KEY"' if keyed else ""
    body = f'{{"model": "{name}", "prompt": "def ", "max_tokens": 32, "temperature": 0}}'
    return [f"serving {name} at {url}/v1  (health: {url}/health)",
            f"try:  curl {url}/v1/completions -H 'Content-Type: application/json'{auth} -d '{body}'"
            + ("  (export MTNLG_API_KEY=<the key> first)" if keyed else "")]

