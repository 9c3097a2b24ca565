"""Where code runs: the Ray cluster a user points at (RAY_ADDRESS or a running `ray start`), else a local
one, and the torch device a model runs on when nobody says.

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
    address = os.environ.get("RAY_ADDRESS", "")
    if address.startswith(("http://", "https://")):  # ray.init's answer was a traceback
        from mtnlg_ray.errors import ConfigError

        raise ConfigError(f"RAY_ADDRESS={address} is a dashboard address, which `mtnlg-ray submit` and `jobs` "
                          "take; a stage run here joins a cluster by its GCS address (HOST:6379). Submit the "
                          "stage (`mtnlg-ray submit STAGE ...`), or unset RAY_ADDRESS to run it on a local Ray")
    _check_gcs_answers(address)
    # ray.init() with no address joins RAY_ADDRESS or a cluster started with `ray start` on this
    # machine (keeping that cluster's settings), and otherwise starts a local Ray for this process.
    quiet_token_auth_notice()
    with worker_niceness_default():
        ray.init(num_cpus=num_cpus, configure_logging=False, log_to_driver=False)


def _check_gcs_answers(address: str, wait_s: float = 15.0) -> None:
    """A RAY_ADDRESS of HOST:PORT where nothing listens made ray.init retry for minutes without a word;
    TCP connects for `wait_s` (a head still starting gets that long) say it in one line. They try the
    address as given and the one ray.init dials (it turns localhost into the node's IP): either
    answering passes. Other forms (auto, local, ray://) are left to ray.init."""
    import socket
    import time

    host, sep, port = address.strip().rpartition(":")
    if not sep or not port.isdigit() or "/" in host or not host:
        return
    dialled = [(host.strip("[]"), int(port))]
    try:  # private to Ray: where it is missing or fails, the address as given alone
        from ray._private.services import canonicalize_bootstrap_address

        other, _, other_port = canonicalize_bootstrap_address(address.strip()).rpartition(":")
        dialled.append((other.strip("[]"), int(other_port)))
    except Exception:
        pass
    deadline = time.monotonic() + wait_s
    while True:
        for where in dict.fromkeys(dialled):
            try:
                socket.create_connection(where, timeout=max(1.0, min(5.0, wait_s))).close()
                return
            except OSError as failed:
                err = failed
        if time.monotonic() >= deadline:
            from mtnlg_ray.errors import ConfigError

            raise ConfigError(f"RAY_ADDRESS={address}: no Ray answered there in {wait_s:g} s "
                              f"({err.strerror or err}); start the cluster (`ray start --head` on that "
                              "machine), fix the address, or unset RAY_ADDRESS to run on a local Ray")
        time.sleep(1.0)


def quiet_token_auth_notice() -> None:
    """Ray 2.60 turns token authentication on for a Ray that ray.init starts, and says so in a warning
    line on stderr: every stage's output began with it, and a refusal was two lines instead of one.
    That notice is dropped; its warning that authentication is off (a cluster started without it) stays."""
    import logging

    _drop_messages(logging.getLogger("ray._private.authentication.authentication_token_setup"),
                   "Token authentication is enabled for this Ray cluster")


class _DropMessages:
    """A logging filter passing every record but those whose message starts with `prefix`."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def filter(self, record) -> bool:
        return not record.getMessage().startswith(self.prefix)


def _drop_messages(target, prefix: str) -> None:
    """Add to a logger or handler, once however often a process calls this, a filter dropping `prefix`."""
    if not any(isinstance(f, _DropMessages) and f.prefix == prefix for f in target.filters):
        target.addFilter(_DropMessages(prefix))


def quiet_ray_data_console() -> None:
    """Ray Data's console handler passes warnings and errors only, not its per-operator INFO lines.

    Ray Data logs every dataset it runs (plan, progress, "execution finished") at INFO to the
    console and to the session's `ray-data.log`; the file keeps them all. Its warning that a progress
    bar's name was shortened (our stages chain more operators than a bar's name holds) is left to the
    file too: it told a user to change a Ray setting for nothing they could see was wrong.
    """
    import logging

    import ray.data  # noqa: F401  (importing it installs Ray Data's logging config)

    for handler in logging.getLogger("ray.data").handlers:
        if handler.get_name() == "console":
            handler.setLevel(max(handler.level, logging.WARNING))
            _drop_messages(handler, "Truncating long operator name")


def workers_that_fit(cpus_per_worker: float, gpus_per_worker: float) -> tuple[int, float, float]:
    """How many workers of this shape the live nodes of the connected cluster can hold at once.

    A worker runs on one node, so each node holds floor(its CPUs / cpus_per_worker) of them (and
    likewise for GPUs). Returns (workers, the cluster's CPUs, the cluster's GPUs).
    """
    import math

    import ray

    fit, cpus, gpus = 0, 0.0, 0.0
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        resources = node.get("Resources", {})
        node_cpus, node_gpus = float(resources.get("CPU", 0)), float(resources.get("GPU", 0))
        cpus, gpus = cpus + node_cpus, gpus + node_gpus
        per_node = [math.floor(node_cpus / cpus_per_worker + 1e-9)] if cpus_per_worker > 0 else []
        if gpus_per_worker > 0:
            per_node.append(math.floor(node_gpus / gpus_per_worker + 1e-9))
        fit += min(per_node) if per_node else 0
    return fit, cpus, gpus


def launched_with_autoscaler() -> bool:
    """Whether this is the head node of a cluster the Ray cluster launcher started (it leaves its
    bootstrap config there; Ray Tune reads the same file), whose autoscaler may add nodes."""
    from pathlib import Path

    return Path("~/ray_bootstrap_config.yaml").expanduser().exists()


def default_device(device: str | None = None):
    """`device` as a torch device; None or "auto" means CUDA when this process sees a GPU, else the CPU."""
    import torch

    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
