"""Connecting to Ray: the cluster a user points at (RAY_ADDRESS or a running `ray start`), else a local one.

Stage functions call `ensure_ray()` once; they never start a second Ray inside a driver that
already has one (tests, notebooks, Ray Jobs).
"""

from __future__ import annotations


def ensure_ray(num_cpus: int | None = None) -> None:
    """Connect to the running Ray cluster, or start a local one when none is running."""
    import ray

    if ray.is_initialized():
        return
    # ray.init() with no address joins RAY_ADDRESS or a cluster started with `ray start` on this
    # machine, and otherwise starts a local Ray for this process.
    ray.init(num_cpus=num_cpus, configure_logging=False, log_to_driver=False)
