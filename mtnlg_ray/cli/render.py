"""How the CLI shows progress and results: per-stage lines, the data manifest's summary, fine-tuning
epochs, and the layout planner's table (rich)."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from mtnlg_ray.model.plan import GB


def progress_console():
    """The console progress lines go to: stderr, each line whole. Off a terminal (a Ray Job's log, a
    pipe) rich wraps at 80 columns, which split a pretraining step's line before its grad norm."""
    from rich.console import Console

    return Console(stderr=True, soft_wrap=True)


def stage_printer():
    console = progress_console()

    def show(report) -> None:
        extra = f"  [dim]{report.note}[/dim]" if report.note else ""
        rejected = f", {report.rejected:,} rejected" if report.rejected else ""
        console.print(
            f"[green]✓[/green] {report.name:<22} {report.docs_in:>8,} → {report.docs_out:<8,} docs"
            f"{rejected}  ({report.seconds:.1f} s){extra}"
        )

    return console, show


def print_manifest_summary(console, manifest: dict, output: Path) -> None:
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
        if not pack["train_sequences"]:
            console.print("[yellow]warning: no training sequences, so pretrain will refuse this dataset: prepare "
                          "more text, or pack shorter sequences with --set pack.seq_len=N[/yellow]")
        if not pack["val_sequences"] and manifest.get("config", {}).get("pack", {}).get("val_fraction", 0) > 0:
            console.print("[yellow]warning: no validation sequences, so pretraining will report no validation "
                          "loss: prepare more text, or raise pack.val_fraction (a blend's repeated copies never "
                          "hold validation text)[/yellow]")



def dev_line(dev: dict | None, metric: str) -> str:
    if not dev:
        return ""
    if "accuracy" in dev:
        return f"dev acc {dev['accuracy']:.4f}  macro-F1 {dev['macro_f1']:.4f}"
    return f"dev loss {dev['loss']:.4f}  exact {dev['exact_match']:.4f}"


def pretrain_printer():
    console = progress_console()

    def show(record: dict) -> None:
        if record.get("event") == "start":
            resumed = record.get("resumed_from")
            extra = f", resumed at step {resumed['step']} (written at world size {resumed['world_size']})" if resumed else ""
            pp = f" × pp {record['pp']}" if record.get("pp", 1) > 1 else ""
            console.print(f"[bold]world size {record['world_size']}[/bold] (dp {record['dp']} × tp {record['tp']}{pp}){extra}")
        elif record.get("event") == "checkpoint":
            console.print(f"[dim]checkpoint at step {record['step']}[/dim]")
        elif "loss" in record:
            val = f"  val {record['val_loss']:.4f}" if record.get("val_loss") is not None else ""
            console.print(
                f"step {record['step']:>6}  loss {record['loss']:.4f}{val}  lr {record['lr']:.2e}  "
                f"batch {record['global_batch']}  {record['tokens_per_s']:,.0f} tok/s  "
                f"MFU {100 * record['mfu']:.1f}%  |g| {record['grad_norm']:.2f}"
            )

    return console, show


def finetune_printer():
    console = progress_console()

    def show(record: dict) -> None:
        if record.get("event") == "start":
            resumed = record.get("resumed_from")
            extra = f", resumed at step {resumed['step']}" if resumed else ""
            console.print(f"[bold]world size {record['world_size']}[/bold] (dp {record['dp']} × tp {record['tp']}), "
                          f"{record.get('examples', 0):,} examples, "
                          f"{record.get('trainable_parameters', 0):,} trainable parameters{extra}")
        elif "dev" in record:
            best = "  [green]best[/green]" if record.get("best") else ""
            console.print(f"epoch {record['epoch']:.2f}  step {record['step']}  loss {record['loss']:.4f}  "
                          f"{dev_line(record['dev'], '')}{best}")
        elif "loss" in record and record["step"] % 10 == 0:
            console.print(f"[dim]step {record['step']:>6}  loss {record['loss']:.4f}  lr {record['lr']:.2e}  "
                          f"{record['tokens_per_s']:,.0f} tok/s[/dim]")
        elif record.get("event") == "done" and record.get("stopped_early"):
            console.print(f"stopped early at step {record['step']} (train.patience)")

    return console, show



def _si(value: float, unit: str) -> str:
    for factor, prefix in ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.2f} {prefix}{unit}"
    return f"{value:.2f} {unit}"


def _bytes(gb: float) -> str:
    return _si(gb * GB, "B")


def _count(value: int) -> str:
    for factor, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if value >= factor:
            return f"{value / factor:.2f} {suffix} ({value:,})"
    return f"{value:,}"


def render_plan(result: dict) -> Table:
    """A two-column table of `plan_layout`'s result, numbers with units, warnings last."""
    r = result
    table = Table(
        title=f"{r['preset']} on {r['gpus']} × {r['gpu']} (tp {r['tp']} · pp {r['pp']} · dp {r['dp']})",
        caption="* counted in the total",
    )
    table.add_column("quantity")
    table.add_column("value", justify="right")
    m = r["memory_gb_per_gpu"]
    mark_opt = ("", " *") if r["distributed_optimizer"] else (" *", "")
    mark_act = ("", " *") if r["recompute"] else (" *", "")
    rows = [
        ("parameters", _count(r["params"])),
        ("parameters per GPU (most on one stage)", _count(r["params_per_gpu"])),
        ("layers per stage", str(r["layers_per_stage"])),
        (
            "batch per iteration",
            f"{r['global_batch']} × {r['seq_len']} tokens "
            f"({r['micro_batches']} micro-batches of {r['micro_batch']} per replica)",
        ),
        ("pipeline bubble" + (f" ({r['pipeline_schedule']}"
                              + (f", {r['pipeline_virtual']} stages a rank)" if r["pipeline_virtual"] > 1 else ")")
                              if r["pipeline_schedule"] else ""), f"{r['pipeline_bubble']:.1%}"),
        ("FLOPs per iteration (with recompute)", _si(r["flops_per_iteration"], "FLOP")),
        ("model FLOPs per iteration", _si(r["model_flops_per_iteration"], "FLOP")),
    ]
    if r["iter_time"] is not None:
        rows += [
            ("iteration time", f"{r['iter_time']:.2f} s"),
            ("throughput per GPU", f"{r['tflops_per_gpu']:.1f} TFLOP/s (HFU {r['hfu']:.1%})"),
            ("MFU", f"{r['mfu']:.1%}"),
            ("tokens per second", f"{r['tokens_per_second']:,.0f}"),
        ]
    rows += [
        ("memory: bf16 weights *", _bytes(m["weights"])),
        ("memory: bf16 gradients *", _bytes(m["grads"])),
        ("memory: fp32 master + Adam" + mark_opt[0], _bytes(m["optimizer"])),
        (f"memory: same, split over dp {r['dp']}" + mark_opt[1], _bytes(m["optimizer_distributed"])),
        ("memory: activations" + mark_act[0], _bytes(m["activations"])),
        ("memory: activations, full recompute" + mark_act[1], _bytes(m["activations_recompute"])),
        (
            f"memory: total per GPU (stage {r['busiest_stage']})",
            f"{_bytes(m['total'])} of {m['capacity']:.0f} GB",
        ),
        ("fits", "yes" if r["fits"] else "[bold red]no[/]"),
        (f"mtnlg-ray's trainer: fp32 weights + grads + Adam, FSDP over dp {r['dp']}", _bytes(m["fsdp_fp32_state"])),
    ]
    for name, value in rows:
        table.add_row(name, value)
    for warning in r["warnings"]:
        table.add_row("[yellow]warning[/]", f"[yellow]{warning}[/]")
    return table


