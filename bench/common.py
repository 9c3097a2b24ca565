"""Set-up the bench/*.py scripts share: this checkout on sys.path, a random-init checkpoint, a small packed
dataset, a run's metrics records, the command line and the JSON result. A script imports it before any
`mtnlg_ray` module (`python bench/X.py` finds it beside the script); what each one measures stays in it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The scripts run from a checkout whether or not the package is installed, and time this checkout's code.
sys.path.insert(0, str(ROOT))

SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"

# The mtnlg_ray imports below sit in the functions: this module loads before the path is set, and a
# script that needs no torch (bench/dedup.py) does not pay for importing it.


def build_checkpoint(preset: str, vocab: int, workdir: Path, seed: int, seq_len: int | None = None) -> Path:
    """A random-init `preset` at workdir/ckpt, with a `vocab`-token BPE trained on the built-in Python docs."""
    from mtnlg_ray.checkpoint import init_checkpoint
    from mtnlg_ray.tokenizer import train_tokenizer

    tok_file = train_tokenizer(["builtin:python-docs"], vocab, workdir / "tokenizer", show_progress=False)
    return init_checkpoint(preset, tok_file, workdir / "ckpt", seed=seed, seq_len=seq_len)


def prepare_packed(source: str, output: Path, seq_len: int, vocab: int) -> Path:
    """`data prepare` of `source` (paragraphs) into `output` with clean and dedup off: a tokenizer and
    packed sequences, 2 % held out for validation."""
    from mtnlg_ray.config import load_config
    from mtnlg_ray.data.pipeline import prepare_dataset

    config = load_config(
        overrides=["read.txt_mode=paragraph", "clean.enabled=false", "dedup.exact=false", "dedup.fuzzy=false",
                   f"tokenizer.vocab_size={vocab}", f"pack.seq_len={seq_len}", "pack.val_fraction=0.02"],
        stage="prepare",
    )
    prepare_dataset([source], output, config)
    return output


def metrics_records(run_dir: str | Path) -> list[dict]:
    """Every record of a training run's metrics.jsonl, in order."""
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def start_local_ray(num_cpus: int | None = None, **kwargs) -> None:
    """A Ray of this script's own, never one already running here (`address="local"`), with its workers
    at the driver's priority as `mtnlg-ray` starts them (`ensure_ray`): Ray's default nice 15 cost a
    labelling actor 8-10 % of its rate, and the scripts time the CLI's code paths. Stages called
    afterwards (`prepare_dataset`, `pretrain`, `label_documents`) find it running and use it."""
    import ray

    from mtnlg_ray.runtime import worker_niceness_default

    with worker_niceness_default():
        ray.init(address="local", num_cpus=num_cpus, log_to_driver=False, configure_logging=False, **kwargs)


def quiet_ray_data() -> None:
    """No progress bars or start-of-execution lines from Ray Data between the printed results."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False


def command_line() -> str:
    """How this script was called, to print under its table."""
    return f"python bench/{Path(sys.argv[0]).name} " + " ".join(sys.argv[1:])


def write_result(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")
