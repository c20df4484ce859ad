"""Interruption and determinism: a run killed mid-decoding and resumed ends with exactly the rows and
pictures of an uninterrupted run; identical runs give identical files; batch size does not change pictures."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dsl_cli.outputs import TEMP_SUFFIX

DSL = str(Path(sys.executable).parent / "dsl")
# 2 images x (4 heads + MLP) = 10 pictures, decoded one at a time so that a kill lands between pictures
CONFIG = ["debug=tiny", "lens=steering", "component=all"]
N_PICTURES = 10


def dsl(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([DSL, *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def completed_run(folder: Path, *overrides: str) -> Path:
    result = dsl("run", *CONFIG, f"hydra.run.dir={folder}", *overrides, cwd=folder.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    return folder


def pictures(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.glob("images/*/steering/*.png"))}


def rows(folder: Path) -> list[dict]:
    with open(folder / "similarity.csv", newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted run, decoding one picture at a time."""
    return completed_run(tmp_path_factory.mktemp("reference") / "run", "decode.batch_size=1")


def test_killed_then_resumed_equals_uninterrupted(reference: Path, tmp_path: Path) -> None:
    folder = tmp_path / "run"
    process = subprocess.Popen([DSL, "run", *CONFIG, "decode.batch_size=1", f"hydra.run.dir={folder}"],
                               cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while len(pictures(folder)) < 3 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    done_before = len(pictures(folder))
    assert 0 < done_before < N_PICTURES, f"the kill did not land mid-decoding ({done_before} pictures)"

    finished = [r for r in rows(folder) if r["file"] and (folder / r["file"]).exists()]
    left = folder / "images" / "astronaut" / "steering" / f".L01H04.png.0123abcd{TEMP_SUFFIX}"
    left.write_bytes(b"half a picture")  # what a kill leaves when it lands while a picture is written
    users = [folder / "images" / ".notes.tmp", folder / "thesis" / ".ch1.docx.tmp"]
    for path in users:  # a user's own temporaries, below the run folder
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"mine")
    result = dsl("run", f"resume={folder}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    # finished pictures were kept, not decoded again
    assert json.loads((folder / "manifest.json").read_text())["decoded"] == N_PICTURES - len(finished)
    assert rows(folder) == rows(reference)  # same rows, each once, same values
    assert pictures(folder) == pictures(reference)  # same pictures, byte for byte
    assert not list(folder.rglob(f"*{TEMP_SUFFIX}"))
    assert all(path.read_bytes() == b"mine" for path in users)


def test_identical_runs_give_identical_files(reference: Path, tmp_path: Path) -> None:
    again = completed_run(tmp_path / "again", "decode.batch_size=1")
    assert (again / "similarity.csv").read_bytes() == (reference / "similarity.csv").read_bytes()
    assert pictures(again) == pictures(reference)
    for grid in sorted(reference.glob("grids/*.png")):
        assert (again / "grids" / grid.name).read_bytes() == grid.read_bytes()


def test_batch_size_does_not_change_pictures(reference: Path, tmp_path: Path) -> None:
    batched = completed_run(tmp_path / "batched", "decode.batch_size=4")
    one, four = pictures(reference), pictures(batched)
    assert one.keys() == four.keys() and len(one) == N_PICTURES
    for name in one:
        a = np.asarray(Image.open(batched / name), dtype=np.float64) / 255
        b = np.asarray(Image.open(reference / name), dtype=np.float64) / 255
        # 8-bit pictures: a float difference below 1e-3 can at most flip one rounding step
        assert np.abs(a - b).max() <= 1 / 255 + 1e-9 and np.abs(a - b).mean() < 1e-3, name


def test_ctrl_c_says_how_to_resume(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    process = subprocess.Popen([DSL, "run", *CONFIG, "decode.batch_size=1", f"hydra.run.dir={folder}"],
                               cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while len(pictures(folder)) < 2 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err[-2000:]
    assert f"dsl run resume={folder}" in err and "Traceback" not in err
    assert json.loads((folder / "manifest.json").read_text())["status"] == "interrupted"
    assert not list(folder.rglob(f"*{TEMP_SUFFIX}"))


def test_an_interrupted_write_leaves_the_old_file_and_no_temporary(tmp_path: Path, monkeypatch) -> None:
    from dsl_cli import outputs

    target = tmp_path / "similarity.csv"
    target.write_text("old\n")

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(outputs.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        outputs.atomic_write_bytes(target, b"new\n")
    assert target.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["similarity.csv"]
