"""The `mtnlg-ray` Typer application and its command groups; the command modules register on them.

A user error (`MtnlgError`) becomes one line on stderr and exit code 2; a run stopped by Ctrl-C
(`Interrupted`) one line and exit code 130.
"""

from __future__ import annotations

import inspect
import os
import sys
from typing import Any

import typer
from typer.core import TyperGroup

from mtnlg_ray.errors import Interrupted, MtnlgError


# Click's exception classes, as the Typer installed uses them (recent ones carry their own click).
_CLICK_EXCEPTION, _USAGE_ERROR = (next(c for c in typer.BadParameter.__mro__ if c.__name__ == name)
                                  for name in ("ClickException", "UsageError"))


class _App(typer.Typer):
    """Typer that reports user errors as one line and exit code 2 instead of a traceback, and a
    command line it cannot parse (a bad option value, a missing argument) as one line too, where
    Typer drew a box of several."""

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        _refuse_undecodable_arguments(kwargs.get("args", sys.argv[1:]))
        try:
            result = super().__call__(*args, standalone_mode=False, **kwargs)
        except _USAGE_ERROR as exc:
            if type(exc).__name__ == "NoArgsIsHelpError":  # a group with no command: its help (Rich's
                if exc.format_message().strip():  # was printed as the exception was made; plain is its message)
                    exc.show()
                sys.exit(exc.exit_code)
            where = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx is not None else ""
            typer.echo(f"error: {exc.format_message()}{where}", err=True)
            sys.exit(exc.exit_code)
        except _CLICK_EXCEPTION as exc:
            typer.echo(f"error: {exc.format_message()}", err=True)
            sys.exit(exc.exit_code)
        except typer.Abort:
            typer.echo("Aborted.", err=True)
            sys.exit(1)
        except Interrupted as exc:
            typer.echo(f"interrupted: {exc}", err=True)
            sys.exit(130)
        except MtnlgError as exc:
            typer.echo(f"error: {exc}", err=True)
            sys.exit(2)
        # As in Typer's standalone mode: exit, with the code of a typer.Exit (--help's 0, Ctrl-C's 130).
        sys.exit(result if isinstance(result, int) and not isinstance(result, bool) else 0)


def _refuse_undecodable_arguments(argv: Any) -> None:
    """An argument that is not UTF-8 (a file name a shell glob expanded, an --output) reaches Python as
    lone surrogates, and Ray's driver start failed on them with a UnicodeEncodeError traceback."""
    argv = [str(arg) for arg in argv or ()]
    for i, arg in enumerate(argv):
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError:
            shown = os.fsencode(arg).decode("utf-8", "backslashreplace")
            option = f"{argv[i - 1]} " if i and argv[i - 1].startswith("-") and "=" not in argv[i - 1] else ""
            typer.echo(f"error: {option}{shown}: not valid UTF-8 (the commands pass their arguments to Ray and "
                       "the tokenizer, which take UTF-8 alone); give the text in UTF-8, or rename such a file or folder",
                       err=True)
            sys.exit(2)


def unwrap_help(group: typer.Typer) -> None:
    """Make each paragraph of every command's help one line. Typer prints a docstring's line breaks as
    they are, so text wrapped at 100 columns came out ragged in an 80-column terminal; the terminal
    now wraps it."""
    for info in group.registered_commands:
        text = info.help or inspect.getdoc(info.callback) or ""
        info.help = "\n\n".join(" ".join(paragraph.split("\n")) for paragraph in text.split("\n\n"))
    for sub in group.registered_groups:
        unwrap_help(sub.typer_instance)


# `--help` lists the commands in the order a user meets them, not the order the modules register them.
_COMMAND_ORDER = ("quickstart", "data", "tokenizer", "init", "plan", "pretrain", "plot", "finetune", "self-train",
                  "evaluate", "generate", "serve", "export", "import", "submit", "local", "jobs", "config")


class _PipelineOrder(TyperGroup):
    def list_commands(self, ctx) -> list[str]:
        rank = {name: i for i, name in enumerate(_COMMAND_ORDER)}
        return sorted(super().list_commands(ctx), key=lambda name: rank.get(name, len(rank)))


app = _App(
    cls=_PipelineOrder,
    name="mtnlg-ray",
    help=(
        "The Megatron-Turing NLG recipe on Ray: curate a corpus, pretrain and fine-tune a GPT, serve it.\n\n"
        "Start with `mtnlg-ray quickstart --workdir work`: every stage on the built-in corpus, on a local Ray. "
        "Then each stage on its own: `data prepare`, `pretrain`, `finetune`, `self-train`, `serve`; "
        "`submit STAGE` runs one as a Ray Job on a cluster."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)


def _print_version(asked: bool) -> None:
    if asked:
        from mtnlg_ray import __version__

        typer.echo(f"mtnlg-ray {__version__}")
        raise typer.Exit()


@app.callback()
def _options(version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                          help="Print mtnlg-ray's version and exit.")) -> None:
    pass


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
SET_HELP = ("Override one config key, e.g. --set dedup.threshold=0.85 (repeatable); every key and its value: "
            "`mtnlg-ray config show --stage prepare`.")
LABEL_SET_HELP = ("Override one config key, e.g. --set label.threshold=0.7 or --set label.actors=[1,2] (repeatable); "
                  "every key: `mtnlg-ray config show --stage label`.")
local_app = typer.Typer(help="A one-machine Ray cluster to submit jobs to: `ray start --head` on 127.0.0.1.",
                        no_args_is_help=True)
jobs_app = typer.Typer(help="Ray Jobs on a cluster: list, status, logs, stop.", no_args_is_help=True)
app.add_typer(local_app, name="local")
app.add_typer(jobs_app, name="jobs")

ADDRESS_HELP = ("The cluster's dashboard, e.g. http://HEAD:8265 (default: $RAY_ADDRESS, else the cluster "
                "`mtnlg-ray local up` started here).")



def main() -> None:
    app()

