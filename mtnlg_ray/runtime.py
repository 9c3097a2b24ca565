"""Connecting to Ray: the cluster a user points at (RAY_ADDRESS or a running `ray start`), else a local one.

Stage functions call `ensure_ray()` once; they never start a second Ray inside a driver that
already has one (tests, notebooks, Ray Jobs).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

NICENESS_VARIABLE = "RAY_worker_niceness"
# Ray starts its workers at nice 15 so that they yield to the driver and Ray's own daemons. On a
# Ray that mtnlg-ray starts for its commands the workers are the work (labelling actors, training
# workers) and the driver only waits on them, so they get the driver's priority: measured, a
# quality-labelling actor at nice 15 lost 8-10 % of its rate to the driver's scheduling loop and
# Ray's daemons. Setting RAY_worker_niceness yourself keeps your value.
WORKER_NICENESS = "0"


@contextmanager
def worker_niceness_default() -> Iterator[None]:
    """Within this block a Ray started from this process runs its workers at `WORKER_NICENESS`.

    Ray reads RAY_worker_niceness when its daemons start, and workers inherit it; the variable is
    set only for the block, so the caller's environment is left as it was.
    """
    if NICENESS_VARIABLE in os.environ:
        yield
        return
    os.environ[NICENESS_VARIABLE] = WORKER_NICENESS
    try:
        yield
    finally:
        os.environ.pop(NICENESS_VARIABLE, None)


def ensure_ray(num_cpus: int | None = None) -> None:
    """Connect to the running Ray cluster, or start a local one when none is running."""
    import ray

    if ray.is_initialized():
        return
    # ray.init() with no address joins RAY_ADDRESS or a cluster started with `ray start` on this
    # machine (keeping that cluster's settings), and otherwise starts a local Ray for this process.
    with worker_niceness_default():
        ray.init(num_cpus=num_cpus, configure_logging=False, log_to_driver=False)


def quiet_ray_data_console() -> None:
    """Ray Data's console handler passes warnings and errors only, not its per-operator INFO lines.

    Ray Data logs every dataset it runs (plan, progress, "execution finished") at INFO to the
    console and to the session's `ray-data.log`; the file keeps them all.
    """
    import logging

    import ray.data  # noqa: F401  (importing it installs Ray Data's logging config)

    for handler in logging.getLogger("ray.data").handlers:
        if handler.get_name() == "console":
            handler.setLevel(max(handler.level, logging.WARNING))
