"""`mtnlg-ray pretrain`: the driver side of a Ray Train `TorchTrainer` run.

Checks the config and the dataset up front, starts (or joins) Ray, builds the elastic scaling and
failure settings, resumes from the newest checkpoint in the run directory when the same run is
started again, follows `metrics.jsonl` while the workers train, and returns where the
consolidated checkpoint of the final weights is.
"""

from __future__ import annotations

import json
import shutil
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from mtnlg_ray.config import Config, absolute_paths
from mtnlg_ray.errors import CheckpointError, ConfigError, InputError, Interrupted, MtnlgError, first_few, warn_once
from mtnlg_ray.train.checkpoint import (STATE_FILE, check_resume_data, check_resume_shape, check_resume_task,
                                       file_digest, is_complete, latest_checkpoint, task_setup)
from mtnlg_ray.train.schedule import run_tokens


def _dataset_vocab(dataset: Path) -> int:
    manifest = dataset / "manifest.json"
    if not manifest.is_file():
        raise InputError(f"{manifest}: missing (data.path must be a dataset from `mtnlg-ray data prepare`)")
    try:
        body = json.loads(manifest.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:  # it said "no tokenizer.vocab_size" of a file cut short
        raise InputError(f"{manifest}: not valid JSON ({err}); prepare the dataset again") from None
    try:
        return int(body["tokenizer"]["vocab_size"])
    except (ValueError, KeyError, TypeError) as err:
        raise InputError(f"{manifest}: no tokenizer.vocab_size ({err})") from None


def resolve_paths(cfg: Config) -> Config:
    """Absolute paths: Ray workers do not run in the driver's working directory."""
    if cfg.data.path is None:
        raise ConfigError("data.path: set it to a dataset directory from `mtnlg-ray data prepare`")
    return absolute_paths(cfg)


def follow(path: Path, stop: threading.Event, on_record: Callable[[dict], None], start_at: int = 0) -> None:
    """Call `on_record` for each new line of a JSON-lines file until `stop` is set (then drain it)."""
    position = start_at
    while True:
        finished = stop.is_set()
        if path.is_file():
            with path.open("r", encoding="utf-8") as fh:
                fh.seek(position)
                while line := fh.readline():
                    if not line.endswith("\n"):
                        break  # a line still being written
                    position = fh.tell()
                    try:
                        on_record(json.loads(line))
                    except ValueError:
                        continue
        if finished:
            return
        stop.wait(0.5)


def check_capacity(parallel) -> str | None:
    """Refuse, in one line, a worker count the connected cluster can never hold.

    Ray Train would wait for it forever without a word. On an autoscaling cluster (`parallel.autoscaling`,
    or one the Ray cluster launcher started) nodes may still come: then this returns what is awaited,
    to be repeated while the run waits; otherwise None.
    """
    from mtnlg_ray.runtime import launched_with_autoscaler, workers_that_fit

    wanted = parallel.workers[0] if isinstance(parallel.workers, tuple) else parallel.workers
    gpus = 1.0 if parallel.use_gpu else 0.0
    fit, have_cpus, have_gpus = workers_that_fit(parallel.cpus_per_worker, gpus)
    if fit >= wanted:
        return None
    shape = f"{parallel.cpus_per_worker:g} CPU" + (" + 1 GPU" if gpus else "")
    have = f"{have_cpus:g} CPUs" + (f" and {have_gpus:g} GPUs" if gpus else "")
    need = (f"parallel.workers={_workers_text(parallel.workers)} needs {wanted} worker{'s' if wanted != 1 else ''} "
            f"of {shape}{' each' if wanted != 1 else ''}")
    if parallel.autoscaling or launched_with_autoscaler():
        return f"waiting for the autoscaler: {need}; the cluster now has {have} ({fit} such workers fit)"
    if gpus and not have_gpus:  # fewer workers cannot help
        hint = "; set parallel.use_gpu=false to train on its CPUs"
    elif not gpus and have_cpus > 0:
        hint = f"; lower parallel.workers or set parallel.cpus_per_worker={have_cpus / wanted:g}"
    else:
        hint = "; lower parallel.workers"
    raise ConfigError(f"{need}, but the Ray cluster has {have} ({fit} such workers fit){hint}, "
                      "or set parallel.autoscaling=true if nodes will be added")


def _workers_text(workers) -> str:
    return f"[{workers[0]}, {workers[1]}]" if isinstance(workers, tuple) else str(workers)


def _say_while_waiting(message: str, records: list, stop: threading.Event, every: float = 30.0) -> None:

    while not records and not stop.is_set():
        print(message, file=sys.stderr, flush=True)
        stop.wait(every)


def _check_same_tokenizer(checkpoint: Path, dataset: Path) -> None:
    """Continued pretraining needs the checkpoint's own tokenizer: under another one its token ids
    name other words, and training would go on as if nothing were wrong."""
    from mtnlg_ray.checkpoint import tokenizer_path
    from mtnlg_ray.tokenizer import tokenizer_hash

    own, tokens = tokenizer_path(checkpoint), dataset / "tokenizer" / "tokenizer.json"
    if tokenizer_hash(own) != tokenizer_hash(tokens):
        raise ConfigError(f"init.checkpoint: {checkpoint}'s tokenizer differs from the one {dataset} was tokenized "
                          f"with; prepare the data again with --set tokenizer.path={own}")


def pretrain(cfg: Config, on_record: Callable[[dict], None] | None = None, say_if_ended: bool = True) -> dict:
    """Train on Ray Train; returns {"run_dir", "final", "steps", "metrics"} of the finished run. A run that
    had ended already trains nothing, and says so on stderr unless `say_if_ended` is false."""
    from mtnlg_ray.train.data import TokenShards
    from mtnlg_ray.train.loop import model_config_for

    cfg = resolve_paths(cfg)
    dataset = Path(cfg.data.path)
    vocab = _dataset_vocab(dataset)
    shards = TokenShards(dataset, "train")
    model_config, _ = model_config_for(cfg, vocab)
    if cfg.init.checkpoint:
        _check_same_tokenizer(Path(cfg.init.checkpoint), dataset)
    if model_config.vocab_size < vocab:
        raise ConfigError(f"the model's vocabulary ({model_config.vocab_size}) is smaller than the dataset "
                          f"tokenizer's ({vocab})")
    if model_config.seq_len < shards.seq_len:
        raise ConfigError(f"model.seq_len ({model_config.seq_len}) is shorter than the dataset's packed "
                          f"sequences ({shards.seq_len}); re-pack with --set pack.seq_len={model_config.seq_len}")
    TokenShards(dataset, "val")  # read by the workers' evaluation: a broken shard is one line here, too
    if not len(shards):
        raise InputError(f"{dataset}: no training sequences (packed at pack.seq_len={shards.seq_len}); prepare more "
                         "text, or a smaller pack.seq_len with `data prepare --set pack.seq_len=N`")
    check_run_layout(cfg, model_config, "lm")  # the layout's own mistakes first
    cfg = schedule_over_the_run(cfg, shards.seq_len, len(shards))
    warn_if_max_steps_ends_first(cfg, shards.seq_len)
    tp = cfg.parallel.tp
    if tp > 1 and cfg.parallel.sequence_parallel and shards.seq_len % tp:
        raise ConfigError(f"parallel.sequence_parallel: the packed sequences of {dataset} have {shards.seq_len} "
                          f"tokens, not a multiple of parallel.tp={tp}; re-pack or set parallel.sequence_parallel=false")
    result = run_training("pretrain", "lm", cfg, model_config, vocab, dataset / "tokenizer" / "tokenizer.json",
                          on_record)
    if say_if_ended and result["had_ended"]:
        # It said "resumed at step 34", wrote final/ again and exited 0, as if a run had happened.
        print(f"note: the run in {result['run_dir']} had ended at step {result['steps']} already "
              "(train.max_steps, max_tokens or epochs): nothing was trained this time, and final/ holds that "
              "step's weights; raise the limit to train on", file=sys.stderr)
    return result


def planned_dp(cfg: Config) -> int:
    """Data-parallel ranks at the run's (largest) worker count: what the schedule is planned for."""
    par = cfg.parallel
    workers = par.workers if isinstance(par.workers, int) else par.workers[1]
    return max(1, workers // (par.tp * par.pp))


def resumed_schedule(cfg: Config) -> dict:
    """The warm-up and decay tokens the run's newest checkpoint trained with ({} for a new run): a re-run
    of the same run.name keeps them, so its LR does not jump when the defaults, computed from the worker
    count, come out otherwise (set train.decay_tokens / train.warmup_tokens to change them)."""
    from mtnlg_ray.train.checkpoint import recorded_schedule

    return recorded_schedule(Path(cfg.run.storage_path) / cfg.run.name)


def schedule_over_the_run(cfg: Config, seq_len: int, sequences: int | None = None, data_known: bool = True) -> Config:
    """Pretraining's warm-up and decay, each unless set: the cosine reaches its floor on the run's last
    step, and the warm-up is the preset's (`PRETRAIN_WARMUP`: GPT-3's 375M tokens, MT-NLG's 1B) but at
    most a tenth of a bounded run's tokens (of a set decay's, where one is set).

    A run bounded by `train.max_steps`, `train.max_tokens` or `train.epochs` over its `sequences`
    then decays over exactly the tokens it trains on, whatever its length, batches counted as the
    workers take them (whole micro-batches at every data-parallel rank; an elastic run is planned
    at its largest worker count); an unbounded run keeps MT-NLG's 340B-token decay and the preset's
    whole warm-up. A resumed run keeps the schedule it started with (`resumed_schedule`), with a warning
    where it is now longer than that decay (`data_known`: unless `seq_len` is only the model's context).
    """
    from mtnlg_ray.model.presets import PRETRAIN_WARMUP, WARMUP_SHARE

    unset = {key for key in ("warmup_tokens", "decay_tokens") if key not in cfg.train.model_fields_set}
    if not unset:
        return cfg
    recorded = resumed_schedule(cfg)
    total = run_tokens(cfg.train, seq_len, planned_dp(cfg), sequences)
    update = {}
    if "decay_tokens" in unset and (recorded.get("decay_tokens") or total):
        update["decay_tokens"] = recorded.get("decay_tokens") or total
        if data_known and recorded.get("decay_tokens") and total and total > recorded["decay_tokens"]:
            # A longer re-run trained its added steps at the floor LR without a word.
            print(f"warning: the run resumes with the decay its checkpoint recorded ({recorded['decay_tokens']:,} "
                  f"tokens), shorter than this run's {total:,}: the steps past it train at the floor LR; set "
                  f"train.decay_tokens={total} to decay over the longer run", file=sys.stderr, flush=True)
    if "warmup_tokens" in unset:
        warmup = PRETRAIN_WARMUP[cfg.model.preset]  # names every preset model.preset accepts
        # A tenth of what the LR decays over: the run's tokens, or a decay set shorter than the run.
        span = cfg.train.decay_tokens if "decay_tokens" not in unset else total
        if span:
            warmup = min(warmup, span // WARMUP_SHARE)
        update["warmup_tokens"] = recorded.get("warmup_tokens", warmup)
    return cfg.model_copy(update={"train": cfg.train.model_copy(update=update)})


def fit_raising_user_errors(trainer, run_dir: Path):
    """`trainer.fit()`, except that a user's mistake (`MtnlgError`) raised on a worker comes back as
    itself, so the CLI prints its one line, not Ray's traceback of every rank. The driver checks what
    it can before workers start; this covers what only a worker sees. A Ctrl-C is `Interrupted`."""
    import ray.train

    try:
        return trainer.fit()
    except SystemExit as stop:
        # Ray Train's SIGINT handler aborts the run and calls sys.exit(0); what arrives here from inside
        # fit() is SystemExit(1) (measured), and the process ended with code 1 and not a word. Another
        # code (Ray's SIGTERM handler exits with 15: `jobs stop`, a pre-emption) stays itself.
        if stop.code not in (0, 1, None):
            raise
        newest = latest_checkpoint(run_dir)
        raise Interrupted(f"the run in {run_dir} stopped; " + (
            f"the same command resumes it from {newest.name}" if newest else "it had saved no checkpoint")) from None
    except ray.train.WorkerGroupError as failed:
        user_error = next((e for e in failed.worker_failures.values() if isinstance(e, MtnlgError)), None)
        if user_error is None:
            raise
        raise user_error from None


def _note_passed_over(run_dir: Path, resume: Path | None) -> None:
    """Name on stderr the checkpoints newer than the one a re-run resumes from: cut short while being
    written, they are passed over, and the steps since `resume` are trained again without a word."""
    if resume is None:
        return
    newer = sorted(p.name for p in run_dir.glob("checkpoint_*") if p.is_dir() and p.name > resume.name)
    if newer:
        print(f"note: {run_dir}: passing over {', '.join(newer)} (incomplete: cut short while being written); "
              f"resuming from {resume.name}", file=sys.stderr, flush=True)


RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's record of a run directory's checkpoints


def _check_run_dir(run_dir: Path, resume: Path | None) -> None:
    """Refuse, in one line, a re-run that would start afresh in a run directory holding what an earlier
    run trained: a fresh start deletes its final/, best/ and metrics.jsonl. That happened without a
    word when every checkpoint was incomplete (passed over), or was moved away as a refusal advised.
    Ray Train's record of checkpoints that are gone is dropped: it refused to start with a traceback."""
    folders = sorted(p.name for p in run_dir.glob("checkpoint_*") if p.is_dir())
    if resume is None and folders:
        raise CheckpointError(f"{run_dir}: no checkpoint there is complete ({first_few(folders)}), so the run cannot resume, "
                              "and starting it afresh would delete what it trained; move them out of the run "
                              "directory, or choose another run.name")
    if resume is None and any((run_dir / name).exists() for name in ("final", "best")):
        raise CheckpointError(f"{run_dir}: holds a trained run (final/ or best/) but no checkpoint to resume from, "
                              "and starting it afresh would delete it; choose another run.name, or move "
                              "final/ and best/ away to train this one again")
    snapshot = run_dir / RAY_SNAPSHOT
    try:
        recorded = [r["checkpoint_dir_name"] for r in json.loads(snapshot.read_text())["checkpoint_results"]]
    except FileNotFoundError:
        return
    except (OSError, ValueError, KeyError, TypeError):
        recorded = None
    if recorded is None or any(name not in folders for name in recorded):
        snapshot.unlink()


def _prune_unrecorded(run_dir: Path, keep: int) -> None:
    """After a run: delete the checkpoints older than the newest `keep`, those Ray Train does not know of
    too (a run stopped by Ctrl-C left its last one out of Ray's record). Ray prunes only what it
    recorded, so checkpoint.keep=2 held three checkpoints, then four, one more each time; and with the
    unrecorded one counted among its two, Ray kept an older one it had recorded: three again."""
    snapshot = run_dir / RAY_SNAPSHOT
    try:
        recorded = {r["checkpoint_dir_name"] for r in json.loads(snapshot.read_text())["checkpoint_results"]}
    except (OSError, ValueError, KeyError, TypeError):
        return  # no record to go by: leave everything
    folders = sorted(p.name for p in run_dir.glob("checkpoint_*") if p.is_dir())

    def step(name: str) -> int | None:
        try:
            return int(json.loads((run_dir / name / STATE_FILE).read_text())["step"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    # Only complete ones count: a newer one cut short resumes nothing. They are ordered by step, as
    # `latest_checkpoint` picks: a folder's name is its worker's clock, which may have gone back.
    steps = {name: step(name) for name in folders if is_complete(run_dir / name)}
    complete = sorted((number, name) for name, number in steps.items() if number is not None)
    if keep < 1 or len(complete) < keep:
        return
    kept = complete[-keep:]
    stale = [name for _, name in complete[:-keep]]
    cut_short = {name for name in folders if name not in {n for _, n in complete}}
    stale += [name for name in cut_short if name < min(n for _, n in kept)]  # older by their time
    for name in stale:
        shutil.rmtree(run_dir / name, ignore_errors=True)
    if recorded & set(stale):
        snapshot.unlink(missing_ok=True)  # Ray's record of what is gone: the next run's Ray starts a new one


def check_run_layout(cfg: Config, model_config, task: str) -> None:
    """Everything about the parallel layout a worker would refuse, refused on the driver in one line:
    the dimensions against the model and worker counts, the pipeline schedule against every batch
    size of the run, and the tasks pipeline parallelism cannot run."""
    from mtnlg_ray.train.parallel import check_layout

    par = cfg.parallel
    check_layout(model_config, par.workers, par.tp, par.pp, fsdp=par.fsdp, precision=cfg.train.precision,
                 sequence_parallel=par.sequence_parallel, pp_schedule=par.pp_schedule, pp_virtual=par.pp_virtual,
                 pp_layers=par.pp_layers)
    if par.pp > 1 and par.pp_schedule == "interleaved-zero-bubble" and cfg.train.compile:
        raise ConfigError("parallel.pp_schedule=interleaved-zero-bubble: torch's zero-bubble schedules refuse "
                          "compiled stages; set train.compile=false or use interleaved-1f1b")
    if task != "lm" and par.pp > 1:
        raise ConfigError(f"parallel.pp={par.pp}: fine-tuning (task.kind={task}) does not run under pipeline "
                          "parallelism yet (its task head and dev evaluation run on whole models); set "
                          "parallel.pp=1 and split the model with parallel.tp and FSDP")
    check_batch_fits(cfg)
    check_pipeline_batches(cfg)


def check_batch_fits(cfg: Config) -> None:
    """Every data-parallel rank takes whole micro-batches, so a step's batch is a multiple of
    micro_batch_size x dp, rounded down (3 ranks of 8 take 24 of 32). Where even one micro-batch a rank
    is more than the batch, it used to be rounded up instead (5 ranks trained 40 of 32): refused here,
    at the largest worker count the run may get, for the full batch and the ramp-up's first."""
    train = cfg.train
    dp = planned_dp(cfg)
    unit = train.micro_batch_size * dp
    smallest = train.global_batch_size
    if train.batch_rampup is not None:
        smallest = min(smallest, train.batch_rampup.start)
    if unit > smallest:
        what = ("train.global_batch_size" if smallest == train.global_batch_size
                else "train.batch_rampup.start")
        raise ConfigError(f"{what} ({smallest}) is smaller than one micro-batch on each data-parallel rank "
                          f"(train.micro_batch_size {train.micro_batch_size} x dp {dp} = {unit}); lower "
                          "train.micro_batch_size or the worker count")


def check_pipeline_batches(cfg: Config) -> None:
    """With an interleaved pipeline schedule, every global batch the run uses (the ramp-up's steps and
    the full batch) must give whole rounds of micro-batches; checked before any worker starts."""
    from mtnlg_ray.train.pipeline import check_micro_batches

    par, train = cfg.parallel, cfg.train
    if par.pp == 1:
        return
    dp = planned_dp(cfg)
    batches = {train.global_batch_size}
    if train.batch_rampup is not None:
        batches |= set(range(train.batch_rampup.start, train.global_batch_size, train.batch_rampup.increment))
    for batch in sorted(batches):
        check_micro_batches(par.pp_schedule, batch // (train.micro_batch_size * dp), par.pp)


def warn_about_the_schedule(cfg: Config) -> None:
    """One warning line on stderr where the LR schedule cannot be what was meant: a warm-up as long as
    the decay (which ends on the run's last step unless set) never reaches `train.lr`. Typically a
    `train.warmup_tokens` set for a longer run (an unset one is at most a tenth of the run)."""

    warmup, decay = cfg.train.warmup_tokens, cfg.train.decay_tokens
    if warmup >= decay:
        print(f"warning: train.warmup_tokens ({warmup:,}) is not below train.decay_tokens ({decay:,}; the run's "
              f"tokens unless set): the LR never reaches train.lr ({cfg.train.lr:g}); set train.warmup_tokens",
              file=sys.stderr, flush=True)


def warn_about_the_batch(cfg: Config) -> None:
    """One warning line where the global batch is not whole micro-batches on every data-parallel rank: it
    is rounded down (3 ranks of 4 take 24 of 32) as documented, but a run printed `batch 24` for a
    configured 32 without a word, where `mtnlg-ray plan` warns of the same."""
    train, dp = cfg.train, planned_dp(cfg)
    unit = train.micro_batch_size * dp
    elastic = " at the run's largest worker count" if isinstance(cfg.parallel.workers, tuple) else ""
    if train.global_batch_size % unit:
        warn_once(f"warning: train.global_batch_size ({train.global_batch_size}) is not a multiple of "
                  f"train.micro_batch_size x dp ({train.micro_batch_size} x {dp} = {unit}): each step{elastic} "
                  f"takes {train.global_batch_size // unit * unit}, whole micro-batches on every rank")


def warn_if_max_steps_ends_first(cfg: Config, seq_len: int) -> None:
    """One warning line when `train.max_steps` ends a pretraining run before the `train.max_tokens` also set:
    the shipped pretrain.yaml's 200 steps stopped a `--set train.max_tokens=26000000000` run after 0.8 %
    of its tokens, mid warm-up, without a word."""
    train = cfg.train
    if train.max_steps is None or train.max_tokens is None or train.epochs is not None:
        return  # (with epochs set, they may end the run first: that is the user's own bound)
    by_steps = run_tokens(train, seq_len, planned_dp(cfg))  # both limits: as long as the shorter one
    if by_steps < train.max_tokens:
        print(f"warning: train.max_steps ({train.max_steps:,}) ends the run after {by_steps:,} tokens, before "
              f"train.max_tokens ({train.max_tokens:,}); set train.max_steps=null to train to max_tokens",
              file=sys.stderr, flush=True)


def run_training(
    stage: str,
    task: str,
    cfg: Config,
    model_config,
    vocab: int,
    tokenizer_file: Path,
    on_record: Callable[[dict], None] | None = None,
) -> dict:
    """Run `train_loop_per_worker` for `stage`, training `task` (a name in `mtnlg_ray.train.tasks`), on a
    `TorchTrainer` and follow its metrics.

    The same run name resumes from the newest checkpoint in its run directory; a fresh run starts
    a fresh `metrics.jsonl`. Returns {"run_dir", "final", "steps", "metrics", "resumed_from", "had_ended", ...}.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    from mtnlg_ray.runtime import ensure_ray
    from mtnlg_ray.train.loop import train_loop_per_worker
    check_run_layout(cfg, model_config, task)
    warn_about_the_schedule(cfg)
    warn_about_the_batch(cfg)
    ensure_ray()
    waiting = check_capacity(cfg.parallel)  # before anything is written
    run_dir = Path(cfg.run.storage_path) / cfg.run.name
    run_dir.mkdir(parents=True, exist_ok=True)
    resume = latest_checkpoint(run_dir)
    _check_run_dir(run_dir, resume)
    _note_passed_over(run_dir, resume)
    if task == "lm":  # the token index names every shard and its sequence counts
        data_field, data_path = "data.path", cfg.data.path
        train_data = file_digest(Path(cfg.data.path) / "tokens" / "index.json")
    else:
        data_field, data_path = "data.train", cfg.data.train
        train_data = file_digest(cfg.data.train) if cfg.data.train else None
    setup = task_setup(cfg, task)  # what the workers record, and what a resumed run must have recorded
    if resume is not None:  # the workers resume from this same checkpoint
        labels = cfg.task.labels if task == "classification" else None
        check_resume_shape(resume, model_config, len(labels) if labels else None)
        check_resume_data(resume, train_data, data_path, data_field)
        check_resume_task(resume, setup)
    metrics_file = run_dir / "metrics.jsonl"
    if resume is None:
        if metrics_file.exists():
            metrics_file.unlink()  # a fresh run: old curves would mix with the new one
        for stale in ("best", "final"):
            shutil.rmtree(run_dir / stale, ignore_errors=True)
    start_at = metrics_file.stat().st_size if metrics_file.exists() else 0

    workers = cfg.parallel.workers
    trainer = TorchTrainer(
        train_loop_per_worker,
        # Train V2 refuses `resume_from_checkpoint`: every worker resumes from the newest checkpoint
        # in `run_dir` itself (the one found as `resume` here, on a re-run of the same run).
        train_loop_config={"config": cfg.model_dump(mode="json"), "stage": stage, "task": task, "run_dir": str(run_dir),
                           "vocab_size": vocab, "tokenizer": str(tokenizer_file), "train_data": train_data,
                           "task_setup": setup},
        scaling_config=ray.train.ScalingConfig(
            num_workers=tuple(workers) if isinstance(workers, tuple) else workers,
            use_gpu=cfg.parallel.use_gpu,
            resources_per_worker={"CPU": cfg.parallel.cpus_per_worker},
        ),
        run_config=ray.train.RunConfig(
            name=cfg.run.name,
            storage_path=cfg.run.storage_path,
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.checkpoint.keep),
        ),
    )
    records: list[dict] = []

    def collect(record: dict) -> None:
        records.append(record)
        if on_record is not None:
            on_record(record)

    stop = threading.Event()
    watcher = threading.Thread(target=follow, args=(metrics_file, stop, collect, start_at), daemon=True)
    watcher.start()
    if waiting:
        # An autoscaling cluster short of room: say what is awaited until the workers start.
        threading.Thread(target=_say_while_waiting, args=(waiting, records, stop), daemon=True).start()
    try:
        fit_raising_user_errors(trainer, run_dir)
    finally:
        stop.set()
        watcher.join(timeout=10)
    _prune_unrecorded(run_dir, cfg.checkpoint.keep)
    steps = [r for r in records if "loss" in r]
    had_ended = not steps and resume is not None
    if had_ended:
        # A re-run of a finished run trains nothing: its result is the run's own last step, not None
        # (quickstart read the loss off it, and a second quickstart in one folder failed there).
        from mtnlg_ray.train.plot import read_metrics

        steps = read_metrics(run_dir)[-1:]
    done = next((r for r in reversed(records) if r.get("event") == "done"), {})
    return {
        "run_dir": str(run_dir),
        "final": str(run_dir / "final"),
        "steps": steps[-1]["step"] if steps else None,
        "metrics": steps[-1] if steps else None,
        "resumed_from": str(resume) if resume else None,
        "had_ended": had_ended,  # resumed where it had ended: nothing trained this time
        "records": records,
        "stopped_early": done.get("stopped_early", False),
        "best_metric": done.get("best_metric"),
    }
