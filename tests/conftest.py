"""Shared fixtures: one small tokenizer trained on the built-in corpus and one tiny checkpoint per session."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# Ray Train's controller looks at its workers every 2 s by default, and a run's start, checkpoints and end each
# wait for such a look: 2-6 s of every run's wall time, which a test makes dozens of. Set before any Ray
# starts, so the local Ray, a `ray start` cluster and every CLI subprocess inherit it.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")

# tinyshakespeare.txt and sst2/ (train.tsv, dev.tsv): not in the repository (nothing taken from elsewhere
# is committed); beside the clone as CI has them, or where MTNLG_TEST_DATA points.
SHARED_DATA = Path(os.environ.get("MTNLG_TEST_DATA") or Path(__file__).resolve().parents[1].parent / "shared" / "data")


def shared_data(name: str, module_level: bool = False) -> Path:
    """A file or folder of the test data; the test is skipped, saying where it looked, when it is absent,
    and fails where MTNLG_REQUIRE_TEST_DATA=1 (as `.ci/run` sets it: a CI without the data would skip every
    multi-worker layout test and pass)."""
    path = SHARED_DATA / name
    if not path.exists():
        if os.environ.get("MTNLG_REQUIRE_TEST_DATA") == "1":
            pytest.fail(f"{path}: test data not found, and MTNLG_REQUIRE_TEST_DATA=1 (set MTNLG_TEST_DATA to the "
                        "folder holding tinyshakespeare.txt and sst2/)", pytrace=False)
        pytest.skip(f"{path}: test data not found (set MTNLG_TEST_DATA to the folder holding tinyshakespeare.txt "
                    "and sst2/)", allow_module_level=module_level)
    return path


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    from mtnlg_ray.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(["builtin:python-docs"], 512, out, show_progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tokenizer_dir) -> Path:
    """A `tiny` model whose LayerNorms and biases are random too, so mapping mistakes show up."""
    from mtnlg_ray.checkpoint import save_checkpoint
    from mtnlg_ray.model import GPT, PRESETS, pad_vocab
    from mtnlg_ray.tokenizer import load_tokenizer

    vocab = load_tokenizer(tokenizer_dir).get_vocab_size()
    config = dataclasses.replace(PRESETS["tiny"], vocab_size=pad_vocab(vocab))
    torch.manual_seed(1234)
    model = GPT(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln" in name or name.endswith("bias"):
                p.normal_(0.0 if name.endswith("bias") else 1.0, 0.05)
    out = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_checkpoint(model, out, tokenizer_json=tokenizer_dir / "tokenizer.json")
    return out


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `mtnlg-ray` as a user would: a separate process, its real exit code and output."""
    exe = shutil.which("mtnlg-ray") or str(Path(sys.executable).parent / "mtnlg-ray")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)  # a developer's cluster in the environment is not the one under test
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session, 2 CPUs as on CI; stages never take them all."""
    import ray

    if not ray.is_initialized():
        # address="local": always a fresh Ray of our own, never one another process left running
        # (a `ray start` or a test cluster's address file would otherwise be joined).
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    yield ray
    ray.shutdown()


def unused_port() -> int:
    """A free port below the kernel's ephemeral range, for a server a test starts later. A port the kernel
    hands out (bind to 0) is one Ray's own connections may take meanwhile: the quickstart's Serve step
    once found its port "in use" 50 s after the test chose it."""
    import random
    import socket

    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20000, max(20001, min(low, 32768)))  # above Ray's worker ports (10002-19999)
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    raise RuntimeError("no free port between 20000 and the ephemeral range")
