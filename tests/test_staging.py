"""The dataset folder's staged replacement (data/staging.py) on real folders: a run that does not
complete, by an error, Ctrl-C or a kill in the middle of its moves, leaves the earlier dataset."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from mtnlg_ray.data.staging import FAILED_RUN, OLD, STAGING, publish, staged_output
from mtnlg_ray.errors import InputError


def write_dataset(folder, tag):
    for name in ("docs", "tokens", "tokenizer", "rejected"):
        (folder / name).mkdir(parents=True)
        (folder / name / "part-0").write_text(f"{tag} {name}")
    (folder / "manifest.json").write_text(json.dumps({"format": "mtnlg-ray/dataset/v1", "tag": tag}))


def files(folder):
    return {str(p.relative_to(folder)): p.read_text() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def test_a_completed_run_replaces_the_dataset_and_its_failed_run(tmp_path):
    output = tmp_path / "ds"
    write_dataset(output, "old")
    (output / FAILED_RUN).mkdir()
    (output / FAILED_RUN / "manifest.json").write_text('{"error": "x"}')
    (output / "notes.txt").write_text("mine")
    with staged_output(output) as staging:
        write_dataset(staging, "new")
        publish(staging, output)
    expected = {f"{name}/part-0": f"new {name}" for name in ("docs", "rejected", "tokenizer", "tokens")}
    assert files(output) == {**expected, "manifest.json": json.dumps({"format": "mtnlg-ray/dataset/v1", "tag": "new"}),
                             "notes.txt": "mine"}


@pytest.mark.parametrize("stop", [KeyboardInterrupt, RuntimeError])
def test_a_run_stopped_before_it_publishes_leaves_the_dataset(tmp_path, stop):
    output = tmp_path / "ds"
    write_dataset(output, "old")
    before = files(output)
    with pytest.raises(stop):
        with staged_output(output) as staging:
            write_dataset(staging, "new")
            raise stop()
    assert files(output) == before and not (output / STAGING).exists()


@pytest.mark.parametrize("moved_in", [False, True])
def test_a_publish_killed_mid_way_is_undone_by_the_next_run(tmp_path, moved_in):
    """The states a SIGKILL between publish's renames leaves: two of the old folders in .old, the new
    manifest still staged; or every old folder in .old and the new docs moved in. The next run must
    give back the earlier dataset."""
    output = tmp_path / "ds"
    write_dataset(output, "old")
    (output / "tokenizer").rename(output / "tokenizer-gone")  # an old dataset without a tokenizer
    before = files(output)
    write_dataset(output / STAGING, "new")
    (output / OLD).mkdir()
    for name in ("docs", "tokens", "rejected") if moved_in else ("docs", "tokens"):
        os.replace(output / name, output / OLD / name)
    if moved_in:
        (output / OLD / ".moving-in").touch()
        for name in ("docs", "tokenizer"):
            os.replace(output / STAGING / name, output / name)
    with pytest.raises(KeyboardInterrupt):
        with staged_output(output):
            assert files(output) == before  # put back before the new run starts
            raise KeyboardInterrupt
    assert files(output) == before and sorted(p.name for p in output.iterdir()) == [
        ".lock", "docs", "manifest.json", "rejected", "tokenizer-gone", "tokens"]


def test_a_publish_killed_after_its_commit_keeps_the_new_dataset(tmp_path):
    output = tmp_path / "ds"
    write_dataset(output, "new")
    (output / OLD / "docs").mkdir(parents=True)  # the commit happened; .old was not yet deleted
    (output / OLD / "docs" / "part-0").write_text("old docs")
    before = {k: v for k, v in files(output).items() if not k.startswith(OLD)}
    with staged_output(output):
        pass
    assert files(output) == before


@pytest.mark.parametrize("kill_after", ["moving out", "moving in", "the commit"])
def test_a_killed_publish_whose_staging_folder_was_deleted_by_hand_still_gives_the_dataset_back(tmp_path, kill_after):
    """A kill between publish's renames, then `rm -rf OUTPUT/.partial` by a user tidying up: the next
    run took the publish for committed (no staged manifest) and deleted .old with the earlier dataset.
    A kill after the commit still keeps the new one."""
    output = tmp_path / "ds"
    write_dataset(output, "new")
    after = files(output)
    shutil.rmtree(output)
    write_dataset(output, "old")
    before = files(output)
    staging = output / STAGING
    write_dataset(staging, "new")
    last = {"moving out": output / OLD / "tokens", "moving in": output / "docs", "the commit": output / "manifest.json"}
    # A real SIGKILL right after one of publish's renames, in a process of its own.
    script = f"""
import os, signal
from pathlib import Path
from mtnlg_ray.data.staging import publish
rename = os.replace
def replace(src, dst):
    rename(src, dst)
    if Path(dst) == Path({str(last[kill_after])!r}):
        os.kill(os.getpid(), signal.SIGKILL)
os.replace = replace
publish(Path({str(staging)!r}), Path({str(output)!r}))
"""
    assert subprocess.run([sys.executable, "-c", script]).returncode == -signal.SIGKILL
    assert (output / OLD / ".moving-in").exists() == (kill_after != "moving out") and files(output) != before
    shutil.rmtree(staging)
    expected = after if kill_after == "the commit" else before
    with staged_output(output):
        assert files(output) == expected
    assert files(output) == expected


def test_a_second_run_into_the_same_folder_is_refused_while_the_first_runs(tmp_path):
    output = tmp_path / "ds"
    with staged_output(output) as staging:
        (staging / "docs").mkdir()
        with pytest.raises(InputError, match=r"ds: another run is writing a dataset there"):
            with staged_output(output):
                pass
        assert (staging / "docs").is_dir()  # the second run did not clear the first one's staging
    with staged_output(output):  # free again
        pass


def test_an_occupied_or_unwritable_folder_is_refused_before_anything_moves(tmp_path):
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match="holds no manifest.json"):
        with staged_output(occupied):
            pass
    assert sorted(p.name for p in occupied.iterdir()) == ["keep.txt"]
    # Another tool's manifest.json (a web project's, beside its docs/): publish moved that docs/ aside
    # and deleted it, with exit 0 and no word.
    web = tmp_path / "web"
    (web / "docs").mkdir(parents=True)
    (web / "docs" / "index.html").write_text("<p>mine</p>")
    (web / "manifest.json").write_text(json.dumps({"name": "my-web-app"}))
    with pytest.raises(InputError, match=r"web: its manifest.json is not a dataset's that mtnlg-ray wrote"):
        with staged_output(web):
            pass
    assert files(web) == {"docs/index.html": "<p>mine</p>", "manifest.json": '{"name": "my-web-app"}'}
    # A folder that cannot be made for another reason than permissions (Linux's /proc here, a read-only
    # filesystem alike) was a FileNotFoundError traceback, even for root.
    with pytest.raises(InputError, match="^/proc/mtnlg-ray-test: cannot write the dataset there \\(No such file"):
        with staged_output(Path("/proc/mtnlg-ray-test")):
            pass
    if os.geteuid() == 0:
        return  # root writes anywhere
    output = tmp_path / "ds"
    write_dataset(output, "old")
    (output / "tokens").chmod(0o500)
    try:
        with pytest.raises(InputError, match=r"tokens: not writable"):
            with staged_output(output):
                pass
    finally:
        (output / "tokens").chmod(0o700)


def test_a_failed_run_beside_a_dataset_replaces_only_the_last_failed_run(tmp_path):
    output = tmp_path / "ds"
    write_dataset(output, "old")
    before = files(output)
    for tag in ("first", "second"):
        with pytest.raises(InputError):
            with staged_output(output) as staging:
                (staging / "rejected").mkdir()
                (staging / "manifest.json").write_text(json.dumps({"error": tag}))
                publish(staging, output, output / FAILED_RUN)
                raise InputError(tag)
    assert files(output) == {**before, f"{FAILED_RUN}/manifest.json": '{"error": "second"}'}


def test_a_first_run_killed_while_moving_in_does_not_lock_the_folder_out(tmp_path):
    """No dataset before: a kill between the moves left the new folders and no manifest, and the next
    run refused the folder as 'not empty and holds no manifest.json' before it could undo them."""
    output = tmp_path / "ds"
    write_dataset(output / STAGING, "new")
    (output / OLD).mkdir()
    (output / OLD / ".moving-in").touch()
    for name in ("docs", "tokens"):
        os.replace(output / STAGING / name, output / name)
    with staged_output(output) as staging:
        write_dataset(staging, "again")
        publish(staging, output)
    assert json.loads(files(output)["manifest.json"])["tag"] == "again"
    assert sorted(p.name for p in output.iterdir()) == [
        ".lock", "docs", "manifest.json", "rejected", "tokenizer", "tokens"]


def test_an_undo_stopped_half_way_is_finished_by_the_next_run(tmp_path):
    """A second Ctrl-C while publish undid itself: docs is back, the rest still in .old. The staged
    manifest stays (it used to be removed with the staging folder, and the next run then took the
    publish for committed and deleted .old with the earlier dataset in it)."""
    output = tmp_path / "ds"
    write_dataset(output, "old")
    before = files(output)
    (output / STAGING).mkdir()
    (output / STAGING / "manifest.json").write_text(json.dumps({"format": "mtnlg-ray/dataset/v1", "tag": "new"}))
    (output / OLD).mkdir()
    for name in ("tokens", "tokenizer", "rejected"):
        os.replace(output / name, output / OLD / name)
    with staged_output(output):
        assert files(output) == before
