"""Publishing a folder of files (a checkpoint, an export, a quality model) or one file (a manifest, a
tokenizer, a report) all at once.

Everything is written in full under a hidden sibling name, synced, and renamed into place, so a reader
sees the old version or the new one, never a mix; it gets the permissions anything the user makes gets.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from mtnlg_ray.errors import InputError


def publish_directory(output: Path, write: Callable[[Path], None]) -> Path:
    """Fill a temporary sibling of `output` with `write(staging)`, sync it, then rename it to `output`.

    An existing `output` is replaced (the caller decides whether it may be). Modes are what `mkdir`
    and `open` give under the user's umask (0755 and 0644 under the usual 022), not `mkdtemp`'s
    private 0700, so other users and other pods on a shared volume can read what was published.

    A symlinked `output` replaces the folder it points to. A folder that cannot be renamed (a mount
    point such as a Docker volume or a Kubernetes PVC, or the working directory) is emptied and filled
    in place instead, so a reader may then see a mix for a moment.
    """
    output = Path(os.path.realpath(output))
    in_place = output.is_dir() and _cannot_rename(output)
    parent = output if in_place else output.parent
    parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=parent))
    try:
        umask = current_umask()
        write(staging)
        # Some writers make private files (safetensors writes 0600): every file and folder gets what
        # a plain open() or mkdir() would give it.
        for path in [staging, *staging.rglob("*")]:
            if path.is_file():
                with open(path, "rb") as fh:
                    os.fsync(fh.fileno())
            path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
        if in_place:
            _fill_in_place(staging, output)
        elif output.exists():
            # Two renames, so a reader sees the old folder or the new one, never a mix.
            retired = output.with_name(f".{output.name}.old-{os.getpid()}")
            os.replace(output, retired)
            os.replace(staging, output)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, output)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return output


def _cannot_rename(folder: Path) -> bool:
    """A mount point, or the working directory (renaming it away would leave this process, and the
    user's shell, in a deleted folder)."""
    try:
        here = Path(os.path.realpath(os.getcwd()))
    except OSError:  # the working directory itself was deleted
        here = None
    return os.path.ismount(folder) or here == folder


def _fill_in_place(staging: Path, output: Path) -> None:
    """Replace everything in `output` (but `staging`, which lies inside it) with `staging`'s entries."""
    for entry in output.iterdir():
        if entry == staging:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    for entry in staging.iterdir():
        os.replace(entry, output / entry.name)


def publish_file(path: Path, text: str | bytes) -> Path:
    """Write `text` (UTF-8, or bytes as they are) to a hidden sibling of `path`, sync it, and rename it
    to `path` (replacing it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("wb") as fh:
            fh.write(text.encode("utf-8") if isinstance(text, str) else text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def check_can_make_folder(output: Path) -> None:
    """Refuse, before any work is done, an `output` (folder or file) whose folder cannot be made
    because a path above it is a file: `mkdir` would fail with a traceback, and only once the output
    is written."""
    for above in Path(output).absolute().parents:
        if above.exists():
            if not above.is_dir():
                raise InputError(f"{output}: {above} is a file, not a folder")
            return


def copy_directory(source: Path, output: Path) -> Path:
    """Publish a copy of the folder `source` as `output` (e.g. a run's best checkpoint as its final one)."""
    return publish_directory(output, lambda staging: shutil.copytree(source, staging, dirs_exist_ok=True))


def current_umask() -> int:
    """This process's umask, read without changing it (Linux), else by setting it back at once."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
