"""Which folder a run takes, and which it gives back: only a folder dsl made in this process is removed, a
folder inside a sweep's is never a fresh run's, a lock names one process (not a PID the kernel reused), and
two runs started in the same second each get a folder of their own."""

from __future__ import annotations

import csv
import errno
import json
import os
import socket
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest

from dsl_cli.errors import UserError
from dsl_cli.job import drop_bookkeeping
from dsl_cli.outputs import LockOwner, RunFolder, process_started, release_all
from helpers import dsl_in_process

QUICK = ["run", "debug=tiny", "images.limit=1", "decode.enabled=false"]  # a run that decodes nothing: seconds


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("dsl: error:")]


@pytest.fixture
def sleeper():
    """A live process that is not Python (`sleep`), ended after the test."""
    process = subprocess.Popen(["sleep", "60"])
    yield process
    process.kill()
    process.wait()


# ------------------------------------------------------------------ only a folder dsl made is removed


def test_a_run_refused_before_its_first_result_removes_its_own_folder_and_not_a_users(tmp_path: Path, monkeypatch,
                                                                                       capsys) -> None:
    users = tmp_path / "users"
    users.mkdir(mode=0o700)
    for folder in (users, tmp_path / "new"):
        code, err = dsl_in_process([*QUICK, "images.path=/nonexistent", f"hydra.run.dir={folder}"], tmp_path,
                                   monkeypatch, capsys)
        assert code == 2 and len(error_lines(err)) == 1 and "images.path=/nonexistent" in err, err
    assert users.is_dir() and not any(users.iterdir())  # the user's empty folder, as it was
    assert not (tmp_path / "new").exists()  # dsl's: gone with what dsl wrote there


def test_a_stopped_runs_bookkeeping_goes_and_its_folder_only_if_it_made_it(tmp_path: Path) -> None:
    """What a Ctrl-C in a run's first seconds removes (`job.task`): the folder was claimed, nothing written."""
    (tmp_path / "users").mkdir()
    for name in ("users", "new"):
        folder = RunFolder(tmp_path / name)
        try:
            folder.claim()
            assert folder.made_here == (name == "new")
            drop_bookkeeping(folder)
        finally:
            release_all()
    assert (tmp_path / "users").is_dir() and not any((tmp_path / "users").iterdir())
    assert not (tmp_path / "new").exists()


def test_a_claim_refused_on_a_full_disk_leaves_no_folder_it_made(tmp_path: Path, monkeypatch) -> None:
    def full(path, owner, reserve) -> bool:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(RunFolder, "_create", staticmethod(full))
    (tmp_path / "users").mkdir()
    for name in ("r2", "users"):
        with pytest.raises(UserError, match="No space left on device"):
            RunFolder(tmp_path / name).claim()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["users"]


# ------------------------------------------------------------------ a sweep's folder is its jobs'


@pytest.mark.parametrize("below", ["2", "0/deep"])
def test_a_fresh_run_inside_a_sweep_folder_is_refused(below: str, tmp_path: Path, monkeypatch, capsys) -> None:
    """`dsl merge` and `dsl run resume=SWEEP` find a sweep's jobs at any depth below it: a run put there
    would be taken for one, and both would fail on it for ever."""
    sweep = tmp_path / "sw"
    (sweep / "0").mkdir(parents=True)
    (sweep / "multirun.yaml").write_text("hydra: {}\n")  # what makes a folder a sweep's (`is_sweep_folder`)
    for args in ([*QUICK, f"hydra.run.dir={sweep / below}"], [*QUICK, "-m", f"hydra.sweep.dir={sweep / below}"]):
        code, err = dsl_in_process(args, tmp_path, monkeypatch, capsys)
        assert code == 2 and len(error_lines(err)) == 1, err
        assert f"inside the sweep folder {sweep}" in err and f"`dsl run resume={sweep}`" in err, err
    assert sorted(p.relative_to(sweep).as_posix() for p in sweep.rglob("*")) == ["0", "multirun.yaml"]


# ------------------------------------------------------------------ a lock names one process


def test_a_lock_of_a_pid_now_anothers_is_taken_over(tmp_path: Path, sleeper, caplog) -> None:
    """After a SIGKILL the kernel gives the PID to another process: one that started at another time, or (a lock
    of an earlier dsl, without a start time) one that is not Python."""
    host = socket.gethostname()
    started = process_started(sleeper.pid)
    assert started is not None  # Linux: /proc says
    lines = {f"{sleeper.pid} {host} 0badcafe {int(started) + 1}": True,  # the PID, another start: stale
             f"{sleeper.pid} {host} 0badcafe": True,  # an old lock, naming a process that is not Python: stale
             f"{sleeper.pid} {host} 0badcafe {started}": False}  # that very process: it holds the folder
    folder = RunFolder(tmp_path)
    for line, stale in lines.items():
        assert LockOwner.parse(line).is_stale() == stale, line
        folder.lock_path.write_text(line + "\n")
        if stale:
            try:
                assert folder.claim(resume=True) is True
            finally:
                release_all()
            assert f"took over the lock of process {sleeper.pid}" in caplog.text
        else:
            with pytest.raises(UserError, match=f"being written by dsl process {sleeper.pid}"):
                folder.claim(resume=True)


def test_an_old_lock_of_a_live_python_process_still_holds(tmp_path: Path) -> None:
    python = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / RunFolder.LOCK).write_text(f"{python.pid} {socket.gethostname()} feedface\n")
        with pytest.raises(UserError, match=f"being written by dsl process {python.pid}"):
            RunFolder(tmp_path).claim(resume=True)
    finally:
        python.kill()
        python.wait()


def test_a_lock_names_its_process_start(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path)
    try:
        folder.claim()
        line = folder.lock_path.read_bytes().split(b"\n")[0].decode()
        assert line.split() == [str(os.getpid()), socket.gethostname(), folder.owner.token,
                                process_started(os.getpid())]
        assert LockOwner.parse(line) == folder.owner
    finally:
        release_all()


# ------------------------------------------------------------------ two runs in the same second


class _Noon(datetime):
    """Hydra's `${now:...}` of every run: the same second."""

    @classmethod
    def now(cls, tz=None) -> datetime:
        return cls(2030, 1, 1, 12, 0, 0)


def test_a_run_named_after_the_time_takes_a_sibling_of_a_folder_in_use(tmp_path: Path, sleeper, monkeypatch,
                                                                        capsys) -> None:
    """Two `dsl run` started in the same second: the second's folder is TIME_1; a folder the user names is
    refused as before."""
    import hydra.core.utils

    monkeypatch.setattr(hydra.core.utils, "datetime", _Noon)
    taken = tmp_path / "outputs" / "debug" / "2030-01-01" / "12-00-00"
    taken.mkdir(parents=True)
    lock = f"{sleeper.pid} {socket.gethostname()} feedface {process_started(sleeper.pid)}\n"  # a live run's
    (taken / RunFolder.LOCK).write_text(lock)
    code, err = dsl_in_process(QUICK, tmp_path, monkeypatch, capsys)
    assert code == 0, err
    sibling = taken.with_name("12-00-00_1")
    assert json.loads((sibling / "manifest.json").read_text())["status"] == "complete"
    assert sorted(p.name for p in taken.iterdir()) == [RunFolder.LOCK]  # the other run's, untouched
    code, err = dsl_in_process([*QUICK, f"hydra.run.dir={taken}"], tmp_path, monkeypatch, capsys)
    assert code == 2 and len(error_lines(err)) == 1 and f"being written by dsl process {sleeper.pid}" in err, err


def test_a_sweep_named_after_the_time_takes_a_sibling_of_a_folder_in_use(tmp_path: Path, sleeper, monkeypatch,
                                                                          capsys) -> None:
    """Two `dsl run --multirun` started in the same second (a loop of sweeps sent to the background): the second
    sweep and all its jobs go to TIME_1 (each job's config is composed again from the recorded overrides), and
    merge there; the other sweep's folder is left as it was."""
    import hydra.core.utils

    monkeypatch.setattr(hydra.core.utils, "datetime", _Noon)
    taken = tmp_path / "outputs" / "debug" / "multirun" / "2030-01-01" / "12-00-00"
    taken.mkdir(parents=True)
    (taken / RunFolder.LOCK).write_text(f"{sleeper.pid} {socket.gethostname()} feedface "
                                        f"{process_started(sleeper.pid)}\n")
    code, err = dsl_in_process([*QUICK, "--multirun", "layer=0,2"], tmp_path, monkeypatch, capsys)
    assert code == 0, err
    sibling = taken.with_name("12-00-00_1")
    assert sorted(p.name for p in taken.iterdir()) == [RunFolder.LOCK]
    for job in ("0", "1"):
        assert json.loads((sibling / job / "manifest.json").read_text())["status"] == "complete"
    assert json.loads((sibling / "manifest.json").read_text())["status"] == "complete"
    with open(sibling / "similarity.csv", newline="") as rows:
        assert {row["component"][:3] for row in csv.DictReader(rows)} == {"L00", "L02"}  # both jobs' rows merged
