"""A dataset folder that only a completed run replaces.

`data prepare` and `data label` write a run into OUTPUT/.partial and move it into place at the end
(`publish`). The earlier dataset's folders are renamed into OUTPUT/.old, the new ones are moved in,
and then the new manifest.json replaces the old one. That last replace is the commit. A run stopped
before the commit leaves the earlier dataset; the next run puts back what a stop in the middle of the
moves had moved, or finishes clearing .old after a commit (`recover`). A run left with no document
beside a dataset goes to OUTPUT/failed-run instead. One run at a time holds OUTPUT/.lock.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mtnlg_ray.errors import InputError
from mtnlg_ray.publish import check_can_make_folder

STAGING, OLD, LOCK = ".partial", ".old", ".lock"
MANIFEST = "manifest.json"
FAILED_RUN = "failed-run"
ENTRIES = ("docs", "rejected", "tokens", "tokenizer", FAILED_RUN)  # what a run replaces, beside its manifest
_OURS = {STAGING, OLD, LOCK}
_MOVING_IN = ".moving-in"  # in .old: the earlier dataset is all there, the new run is moving in
_INCOMING = ".incoming-manifest.json"  # in .old: the manifest that commits; OUTPUT's is it once committed
_MARKERS = {_MOVING_IN, _INCOMING}


@contextmanager
def staged_output(output: Path) -> Iterator[Path]:
    """Check `output` can take a dataset (new, empty, or one an earlier run wrote), lock it, and yield
    the empty staging folder to write the run into. Leaving by an exception removes the staging
    folder; the earlier dataset stays as it was unless `publish` committed."""
    try:
        _check_output(output)
        output.mkdir(parents=True, exist_ok=True)
        lock = open(output / LOCK, "a")  # held until the run ends
    except OSError as err:  # no permission, a read-only filesystem, /proc, a file in the path
        raise InputError(f"{output}: cannot write the dataset there ({err.strerror})") from None
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InputError(f"{output}: another run is writing a dataset there; wait for it to end, "
                             "or choose another folder") from None
        staging = output / STAGING
        try:
            recover(output)
            _remove(staging)  # what a killed run left
            staging.mkdir()
        except OSError as err:  # a read-only folder that an earlier run left its .lock in
            raise InputError(f"{output}: cannot write the dataset there ({err.strerror})") from None
        try:
            yield staging
        except BaseException:
            if not (output / OLD).exists():  # else a stopped undo: the staged manifest tells the next
                shutil.rmtree(staging, ignore_errors=True)  # run's `recover` to finish it
            raise
    finally:
        lock.close()  # releases the lock


def _check_output(output: Path) -> None:
    if not output.exists():
        check_can_make_folder(output)  # a file above it: mkdir's NotADirectoryError was a traceback
        return
    if not output.is_dir():
        raise InputError(f"{output}: exists and is not a directory")
    if any(entry.name not in _OURS for entry in output.iterdir()) and not (output / OLD).exists():
        # (.old: a first run's publish, stopped; `recover` undoes it)
        if not (output / MANIFEST).is_file():
            raise InputError(f"{output}: exists, is not empty and holds no manifest.json; choose a new directory")
        from mtnlg_ray.data.read import our_manifest

        ours = our_manifest(output / MANIFEST)
        if ours is None:
            raise InputError(f"{output / MANIFEST}: cannot be read, so whether {output} holds a dataset is "
                             "unknown; make it readable or choose a new directory")
        if not ours:  # a web project's manifest.json: its docs/ went to .old, deleted
            raise InputError(f"{output}: its manifest.json is not a dataset's that mtnlg-ray wrote (no 'format' "
                             "starting 'mtnlg-ray/'), so a run would replace its docs/; choose a new directory")
    for name in ENTRIES:  # a folder moves to .old only if it is writable itself
        entry = output / name
        if entry.is_dir() and not entry.is_symlink() and not os.access(entry, os.W_OK | os.X_OK):
            raise InputError(f"{entry}: not writable, so a new dataset cannot replace it")


def holds_dataset(output: Path) -> bool:
    """Whether `output` holds what an earlier run completed (a manifest with no `error`)."""
    try:
        manifest = json.loads((output / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return False
    except (ValueError, OSError):
        return True  # unreadable: keep it rather than guess
    return not (isinstance(manifest, dict) and "error" in manifest)


def failed_run_home(output: Path) -> Path:
    """Where a run left with no document puts its files: beside the dataset it keeps, or in `output`."""
    return output / FAILED_RUN if holds_dataset(output) else output


def publish(staging: Path, output: Path, home: Path | None = None) -> None:
    """Move the run in `staging` to `home`: `output` (the default), whose earlier dataset and failed
    run it replaces, or `output/failed-run`, replacing only an earlier failed run."""
    if home is not None and home != output:
        _remove(home)
        staging.rename(home)
        return
    old = output / OLD
    _remove(old)
    try:
        old.mkdir()
        shutil.copyfile(staging / MANIFEST, old / _INCOMING)
        for name in ENTRIES:
            if (output / name).exists() or (output / name).is_symlink():
                os.replace(output / name, old / name)
        (old / _MOVING_IN).touch()  # from here every ENTRIES name in `output` is the new run's
        for entry in staging.iterdir():
            if entry.name != MANIFEST:
                os.replace(entry, output / entry.name)
        os.replace(staging / MANIFEST, output / MANIFEST)  # the commit
    except BaseException as err:
        recover(output)
        if isinstance(err, OSError):
            raise InputError(f"{output}: could not move the finished run into place ({err}); "
                             "the earlier dataset is kept") from None
        raise
    shutil.rmtree(old, ignore_errors=True)
    staging.rmdir()


def recover(output: Path) -> None:
    """Undo a `publish` stopped before its commit (the staged manifest is still there): the new run's
    folders go, then the earlier dataset's come back; each step can itself be stopped and redone.
    After the commit, only .old is left to delete. Whether the commit happened is read from OUTPUT's
    manifest, not only from the staged one: a user who deleted OUTPUT/.partial by hand after a kill
    made the next run take the publish for committed and delete .old, the earlier dataset in it."""
    old = output / OLD
    if not old.exists():
        return
    if not _committed(output):
        if (old / _MOVING_IN).exists():
            for name in ENTRIES:
                _remove(output / name)
            (old / _MOVING_IN).unlink()
        for entry in old.iterdir():
            if entry.name not in _MARKERS:
                os.replace(entry, output / entry.name)
    shutil.rmtree(old, ignore_errors=True)


def _committed(output: Path) -> bool:
    if (output / STAGING / MANIFEST).is_file():
        return False  # the commit moves it
    try:
        incoming = (output / OLD / _INCOMING).read_bytes()
    except FileNotFoundError:
        return True  # left by a version without the copy: its staged manifest gone means committed
    try:
        return (output / MANIFEST).read_bytes() == incoming
    except FileNotFoundError:
        return False


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
