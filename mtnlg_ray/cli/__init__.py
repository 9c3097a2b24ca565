"""The `mtnlg-ray` command line: a thin Typer skin over one function per stage.

Each command parses its options, calls the stage's entry function and prints the result. Commands
live by group (data, train, serve, cluster; shared rendering in `render`), all on the one `app`;
imports inside commands are lazy so `--help` stays fast.
"""

# Each module registers its commands on `app`; `--help` lists them in this order.
from mtnlg_ray.cli import train  # noqa: F401, I001
from mtnlg_ray.cli import serve  # noqa: F401
from mtnlg_ray.cli import data  # noqa: F401
from mtnlg_ray.cli import cluster  # noqa: F401
from mtnlg_ray.cli.app import app, main, unwrap_help

unwrap_help(app)

__all__ = ["app", "main"]
