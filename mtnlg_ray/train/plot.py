"""`mtnlg-ray plot RUN_DIR`: training and validation loss curves from metrics.jsonl as a PNG."""

from __future__ import annotations

import json
from pathlib import Path

from mtnlg_ray.errors import InputError
from mtnlg_ray.publish import check_can_make_folder, publish_file


def read_metrics(run_dir: Path) -> list[dict]:
    """Per-step records; when a restart repeated steps, the last record of each step wins."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise InputError(f"{path}: missing (is {run_dir} a run directory of `mtnlg-ray pretrain`?)")
    by_step: dict[int, dict] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        try:
            record = json.loads(line)
        except ValueError:
            raise InputError(f"{path}:{number}: not a JSON line") from None
        if "loss" in record:
            by_step[record["step"]] = record
    return [by_step[s] for s in sorted(by_step)]


def plot_losses(run_dir: str | Path, output: str | Path | None = None) -> Path:
    """Draw the loss curves to `output` (default RUN_DIR/loss.png), in the format its suffix names
    (PNG when it has none), published whole; returns `output`."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.backend_bases import FigureCanvasBase

    run_dir = Path(run_dir)
    output = Path(output) if output else run_dir / "loss.png"
    # An explicit format: without one matplotlib appends ".png" to a name with no suffix, so the
    # file written was not the one reported.
    kind = output.suffix[1:].lower() or "png"
    if kind not in FigureCanvasBase.get_supported_filetypes():
        raise InputError(f"{output}: cannot draw a .{kind} file; use .png, .svg or .pdf")
    if output.is_dir():
        raise InputError(f"{output}: is a folder; --output names the image file to write")
    check_can_make_folder(output)  # the folders above it
    records = read_metrics(run_dir)
    if not records:
        raise InputError(f"{run_dir / 'metrics.jsonl'}: no training steps recorded yet")
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["tokens"] for r in records], [r["loss"] for r in records], label="train", linewidth=1)
    val = [r for r in records if r.get("val_loss") is not None]
    if val:
        ax.plot([r["tokens"] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
    ax.set_xlabel("tokens")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title(run_dir.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, format=kind, dpi=120)
    plt.close(fig)
    return publish_file(output, image.getvalue())
