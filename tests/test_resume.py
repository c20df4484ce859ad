"""Interruption and determinism: a run killed (SIGKILL at any moment, SIGTERM, SIGHUP, Ctrl-C) or stopped by
a full disk, then resumed, ends with exactly the files of an uninterrupted run; two runs or two resumes in one
folder at once give one refusal and rows written once; identical runs give identical files; the batch size
changes pictures by at most one grey level."""

from __future__ import annotations

import csv
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dsl_cli.outputs import SIMILARITY, TEMP_SUFFIX, RunFolder, is_picture
from helpers import dsl_here, dsl_in_process
import zygote  # dsl processes forked after the model libraries' imports (tests/zygote.py)

DSL = str(Path(sys.executable).parent / "dsl")
# 2 images x (4 heads + MLP) = 10 pictures, decoded one at a time so that a kill lands between pictures
CONFIG = ["debug=tiny", "layer=1", "images.limit=2", "lens=steering", "component=all"]
N_PICTURES = 10


def dsl(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return zygote.run([DSL, *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def completed_run(folder: Path, *overrides: str) -> Path:
    """An uninterrupted run, in this process (the runs that are killed, and the two at once, have their own)."""
    assert dsl_here(["run", *CONFIG, f"hydra.run.dir={folder}", *overrides], folder.parent) == 0
    return folder


def resumed(folder: Path) -> None:
    """`dsl run resume=FOLDER` completes the run, in this process."""
    assert dsl_here(["run", f"resume={folder}"], folder.parent) == 0


def pictures_of(folder: Path) -> list[Path]:
    return sorted(folder.glob("images/*/steering/*.png"))


def pictures(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in pictures_of(folder)}


def rows(folder: Path) -> list[dict]:
    with open(folder / "similarity.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def start(folder: Path, *overrides: str) -> subprocess.Popen:
    """`dsl run` of the test config into `folder`, in the background (stderr kept, as text)."""
    return zygote.popen([DSL, "run", *CONFIG, f"hydra.run.dir={folder}", *overrides], cwd=folder.parent,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_for(condition, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.02)


def results(folder: Path) -> dict[str, bytes]:
    """Every file a run leaves, with its bytes, but for the ones that record when and how it ran (the page
    shows the manifest's times)."""
    skip = {"manifest.json", "dsl.log", ".hydra/hydra.yaml", "index.html"}
    return {name: data for name, data in
            ((str(p.relative_to(folder)), p.read_bytes()) for p in sorted(folder.rglob("*")) if p.is_file())
            if name not in skip}


def at_once(*commands: list[str], cwd: Path) -> list[tuple[int, str]]:
    """Start the commands together; (exit status, stderr) of each."""
    processes = [zygote.popen(command, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                 for command in commands]
    return [(p.wait(timeout=600), p.stderr.read()) for p in processes]


def one_refused(outcomes: list[tuple[int, str]]) -> None:
    """One command completed; the other was refused with one line, exit 2."""
    assert sorted(code for code, _ in outcomes) == [0, 2], [err[-2000:] for _, err in outcomes]
    (refused,) = [err for code, err in outcomes if code == 2]
    lines = [line for line in refused.splitlines() if line.startswith("dsl: error:")]
    assert len(lines) == 1 and ("is being written by dsl process" in lines[0] or "already holds a run" in lines[0]
                                or "is taking over the lock" in lines[0]), refused


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted run, decoding one picture at a time."""
    return completed_run(tmp_path_factory.mktemp("reference") / "run", "decode.batch_size=1")


@pytest.fixture(scope="module")
def reference_4(tmp_path_factory) -> Path:
    """An uninterrupted run, decoding four pictures at a time."""
    return completed_run(tmp_path_factory.mktemp("reference_4") / "run", "decode.batch_size=4")


def test_killed_then_two_resumes_at_once_equal_uninterrupted(reference: Path, tmp_path: Path) -> None:
    folder = tmp_path / "run"
    process = zygote.popen([DSL, "run", *CONFIG, "decode.batch_size=1", f"hydra.run.dir={folder}"],
                               cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while len(pictures(folder)) < 3 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    done_before = len(pictures(folder))
    assert 0 < done_before < N_PICTURES, f"the kill did not land mid-decoding ({done_before} pictures)"

    finished = [r for r in rows(folder) if r["file"] and (folder / r["file"]).exists()]
    assert (folder / RunFolder.LOCK).exists()  # the killed run's lock: the resume takes it over
    left = folder / "images" / "astronaut" / "steering" / f".L01H04.png.0123abcd{TEMP_SUFFIX}"
    left.write_bytes(b"half a picture")  # what a kill leaves when it lands while a picture is written
    users = [folder / "images" / ".notes.tmp", folder / "thesis" / ".ch1.docx.tmp"]
    for path in users:  # a user's own temporaries, below the run folder
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"mine")
    one_refused(at_once([DSL, "run", f"resume={folder}"], [DSL, "run", f"resume={folder}"], cwd=tmp_path))
    # finished pictures were kept, not decoded again
    assert json.loads((folder / "manifest.json").read_text())["decoded"] == N_PICTURES - len(finished)
    assert rows(folder) == rows(reference)  # same rows, each once, same values
    assert pictures(folder) == pictures(reference)  # same pictures, byte for byte
    assert not list(folder.rglob(f"*{TEMP_SUFFIX}"))
    assert all(path.read_bytes() == b"mine" for path in users)


def test_identical_runs_give_identical_files(reference: Path, tmp_path: Path) -> None:
    """The reference ran in this process, this run in a process of its own (a fresh hash seed, fresh state)."""
    result = dsl("run", *CONFIG, f"hydra.run.dir={tmp_path / 'again'}", "decode.batch_size=1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    again = tmp_path / "again"
    assert (again / "similarity.csv").read_bytes() == (reference / "similarity.csv").read_bytes()
    assert pictures(again) == pictures(reference)
    for grid in sorted(reference.glob("grids/*.png")):
        assert (again / "grids" / grid.name).read_bytes() == grid.read_bytes()


def test_batch_size_does_not_change_pictures(reference: Path, reference_4: Path) -> None:
    batched = reference_4
    one, four = pictures(reference), pictures(batched)
    assert one.keys() == four.keys() and len(one) == N_PICTURES
    for name in one:
        a = np.asarray(Image.open(batched / name), dtype=np.float64) / 255
        b = np.asarray(Image.open(reference / name), dtype=np.float64) / 255
        # 8-bit pictures: a float difference below 1e-3 can at most flip one rounding step
        assert np.abs(a - b).max() <= 1 / 255 + 1e-9 and np.abs(a - b).mean() < 1e-3, name


def test_ctrl_c_says_how_to_resume(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    process = zygote.popen([DSL, "run", *CONFIG, "decode.batch_size=1", f"hydra.run.dir={folder}"],
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


def test_two_runs_started_at_once_in_one_folder(reference: Path, tmp_path: Path) -> None:
    folder = tmp_path / "run"
    command = [DSL, "run", *CONFIG, "decode.batch_size=1", f"hydra.run.dir={folder}"]
    one_refused(at_once(command, command, cwd=tmp_path))
    assert rows(folder) == rows(reference)  # each row once
    assert results(folder) == results(reference)


def test_sigterm_during_decoding_is_an_interruption_that_resume_completes(reference: Path, tmp_path: Path) -> None:
    """What a batch scheduler sends, handled like Ctrl-C."""
    folder = tmp_path / "run"
    process = start(folder, "decode.batch_size=1")
    wait_for(lambda: len(pictures(folder)) >= 2, process)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143, err[-2000:]
    assert f"dsl run resume={folder}" in err and "Traceback" not in err
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["status"] == "interrupted" and "SIGTERM" in manifest["error"]
    assert 0 < len(pictures(folder)) < N_PICTURES
    assert not list(folder.rglob(f"*{TEMP_SUFFIX}")) and not (folder / RunFolder.LOCK).exists()
    resumed(folder)
    assert results(folder) == results(reference)
    # the interrupted attempt's record is kept in brief, and a resume of the complete run keeps both
    resumed(folder)
    attempts = json.loads((folder / "manifest.json").read_text())["earlier_attempts"]
    assert [(a["status"], "SIGTERM" in (a.get("error") or "")) for a in attempts] == [("interrupted", True),
                                                                                    ("complete", False)]
    assert attempts[0]["started"] <= attempts[1]["started"] and {"encoder", "lens"} <= set(attempts[0]["seconds"])
    assert attempts[1]["resumed_rows"] > 0


@pytest.mark.parametrize(("signum", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_stop_signals_raise_an_interruption_with_the_shells_status(signum: int, status: int) -> None:
    """A closed terminal (SIGHUP) too; the handlers are put back afterwards."""
    from dsl_cli.errors import Interrupted
    from dsl_cli.job import stop_signals_interrupt

    before = signal.getsignal(signum)
    with pytest.raises(Interrupted) as caught, stop_signals_interrupt():
        os.kill(os.getpid(), signum)
        time.sleep(5)  # the handler raises before this ends
    assert caught.value.exit_status == status and isinstance(caught.value, KeyboardInterrupt)
    assert signal.getsignal(signum) == before


def test_a_second_stop_while_the_first_is_handled_is_noted_not_raised() -> None:
    """A second signal (Ctrl-C twice, a scheduler's SIGTERM after a Ctrl-C) that lands while the first stop's
    clean-up runs is noted, not raised into it (was a traceback from a progress bar's clean-up); once the
    first is handled, or where it was swallowed, the next one raises anew."""
    from dsl_cli.errors import Interrupted, _stops, clear_stops, stop

    clear_stops()
    try:
        try:
            stop(signal.SIGINT)
        except Interrupted:
            stop(signal.SIGTERM)  # during the handling: noted only
        with pytest.raises(Interrupted) as again:
            stop(signal.SIGTERM)
        assert again.value.signum == signal.SIGTERM and _stops == [signal.SIGINT, signal.SIGTERM, signal.SIGTERM]
    finally:
        clear_stops()


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 4 MB tmpfs (mounting needs root; skipped elsewhere)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_disk_full_from_the_start_is_refused_leaving_no_file(small_disk: Path, monkeypatch, capsys) -> None:
    """Nothing half-written either (Hydra's own `.hydra/*.yaml` used to be left empty)."""
    with open(small_disk / "ballast", "wb", buffering=0) as ballast:
        try:
            while ballast.write(b"\1" * 65536):
                pass
        except OSError:  # the disk is full
            pass
    folder = small_disk / "run"
    code, err = dsl_in_process(["run", *CONFIG, f"hydra.run.dir={folder}"], small_disk, monkeypatch, capsys)
    assert code == 2 and "Traceback" not in err, err[-3000:]
    (line,) = [line for line in err.splitlines() if line.startswith("dsl: error:")]
    assert "No space left on device" in line
    assert not [p for p in folder.rglob("*") if p.is_file()]


def pages(path: Path) -> int:
    return -(-path.stat().st_size // 4096) * 4096


def test_a_full_disk_fails_cleanly_and_resume_completes_the_run(reference: Path, small_disk: Path, monkeypatch,
                                                                 capsys) -> None:
    folder = small_disk / "run"
    # room for the run's start and about half its pictures: the disk fills up while it decodes
    drawn = [p for p in reference.rglob("*") if p.is_file() and p.parent.name in ("steering", "grids", "heatmaps",
                                                                                  "looks") or p.name == "index.html"]
    start_files = [p for p in reference.rglob("*") if p.is_file() and p not in drawn]  # the figures come last
    room = RunFolder.RESERVE + sum(map(pages, start_files)) + sum(map(pages, pictures_of(reference))) // 2
    stats = os.statvfs(small_disk)
    (small_disk / "ballast").write_bytes(b"\1" * (stats.f_bavail * stats.f_frsize - room))
    code, err = dsl_in_process(["run", *CONFIG, "decode.batch_size=1", f"hydra.run.dir={folder}"], small_disk,
                               monkeypatch, capsys)
    assert code == 2 and "Traceback" not in err, err[-3000:]
    (line,) = [line for line in err.splitlines() if line.startswith("dsl: error:")]
    assert "No space left on device" in line and f"dsl run resume={folder}" in line
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["status"] == "failed" and "No space left on device" in manifest["error"]
    assert 0 < len(pictures(folder)) < N_PICTURES, "the disk did not fill up while decoding"
    # no half-written file: no temporary, every picture whole, every CSV row whole
    assert not list(folder.rglob(f"*{TEMP_SUFFIX}")) and not (folder / RunFolder.LOCK).exists()
    assert all(is_picture(p) for p in folder.rglob("*.png"))
    text = (folder / "similarity.csv").read_text()
    assert text.endswith("\n") and all(len(row) == len(SIMILARITY.columns) for row in csv.reader(text.splitlines()))
    (small_disk / "ballast").unlink()
    resumed(folder)
    assert results(folder) == results(reference)


def kill_and_resume(reference: Path, folder: Path, batch: int, moment: float) -> None:
    """Kill a run `moment` seconds after it has saved its config, resume it, compare with `reference`."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    process = start(folder, f"decode.batch_size={batch}")
    wait_for(lambda: (folder / ".hydra" / "config.yaml").exists(), process)
    time.sleep(moment)
    process.kill()
    process.communicate()
    assert dsl_here(["run", f"resume={folder}"], folder.parent) == 0, f"killed {moment:.2f} s in"
    assert results(folder) == results(reference), f"batch {batch}, killed {moment:.2f} s in"


def kill_moments(reference: Path, count: int, seed: int) -> list[float]:
    """`count` moments spread over the time a run takes after saving its config (its stages' seconds)."""
    seconds = sum(json.loads((reference / "manifest.json").read_text())["seconds"].values())
    draw = random.Random(seed)
    return [draw.uniform(0, seconds + 1.0) for _ in range(count)]


def test_a_kill_at_a_random_moment_then_resume_equals_uninterrupted(reference_4: Path, tmp_path: Path) -> None:
    """Batches of 4 (one picture at a time: `test_killed_then_two_resumes_at_once_equal_uninterrupted`)."""
    (moment,) = kill_moments(reference_4, 1, seed=4)
    kill_and_resume(reference_4, tmp_path / "run", 4, moment)


@pytest.mark.slow
def test_ten_kills_at_random_moments_then_resume_equal_uninterrupted(reference: Path, reference_4: Path,
                                                                     tmp_path: Path) -> None:
    for trial, moment in enumerate(kill_moments(reference, 10, seed=2024)):
        batch = (1, 4)[trial % 2]
        kill_and_resume(reference if batch == 1 else reference_4, tmp_path / f"trial{trial}" / "run", batch,
                        moment)


def test_resume_completes_extra_seeds_and_baselines(tmp_path: Path) -> None:
    """decode.seeds=2: a run whose extra seed's and baseline's pictures (and the last rows of their CSVs)
    are lost is completed by a resume to exactly the files of the uninterrupted run."""
    settings = ("decode.seeds=2", "decode.batch_size=1")
    whole = completed_run(tmp_path / "whole", *settings)
    shutil.copytree(whole, tmp_path / "cut")
    cut = tmp_path / "cut"
    (cut / "images" / "chelsea" / "steering" / "seed1" / "L01MLP.png").unlink()
    mean = cut / "images" / "_baselines" / "steering" / "seed1" / "mean.png"
    mean.write_bytes(mean.read_bytes()[:200])  # a picture of dsl's cut short: made again (another file is refused)
    for table in ("seeds.csv", "baselines.csv"):
        text = (cut / table).read_text()
        (cut / table).write_text(text[:-7])  # a torn last row, as a kill leaves it
    resumed(cut)
    assert json.loads((cut / "manifest.json").read_text())["extra_decoded"] == 2
    assert results(cut) == results(whole)


def test_extras_repaired_with_their_whole_batch_and_repeated_rows_kept_once(tmp_path: Path, monkeypatch,
                                                                            capsys) -> None:
    """decode.seeds=2 decoded 4 at a time: an extra seed's picture cut in half, another's row lost from
    seeds.csv, and a row repeated in seeds.csv and in baselines.csv (each counted twice: the repeated seed moved
    sim_decoded_mean) are repaired by a resume to the uninterrupted run's bytes, each picture decoded again
    with the batch it was first decoded in (alone, it differed by a grey level). `dsl plot` refuses a repeated
    baselines.csv row in one line, as it refuses seeds.csv's."""
    whole = completed_run(tmp_path / "whole", "decode.seeds=2", "decode.batch_size=4")
    cut = tmp_path / "cut"
    shutil.copytree(whole, cut)
    half = cut / "images" / "chelsea" / "steering" / "seed1" / "L01H01.png"
    half.write_bytes(half.read_bytes()[:len(half.read_bytes()) // 2])
    seeds = (cut / "seeds.csv").read_text().splitlines(keepends=True)
    (cut / "seeds.csv").write_text("".join(seeds[:3] + seeds[2:3] + seeds[4:]))  # row 2 twice, row 3 gone
    baselines = (cut / "baselines.csv").read_text().splitlines(keepends=True)
    (cut / "baselines.csv").write_text("".join(baselines + baselines[1:2]))
    resumed(cut)
    assert results(cut) == results(whole)
    # astronaut's third component (extras 0-3) and chelsea's second (4-7): two batches of four
    assert json.loads((cut / "manifest.json").read_text())["extra_decoded"] == 8
    edited = tmp_path / "edited"
    shutil.copytree(whole, edited)
    (edited / "baselines.csv").write_text("".join(baselines + baselines[1:2]))
    capsys.readouterr()  # the runs' progress bars
    code, err = dsl_in_process(["plot", str(edited)], tmp_path, monkeypatch, capsys)
    assert code == 2 and "baselines.csv: " in err and "has 3 rows, not 2; the file was cut short or edited" in err
    assert len(err.strip().splitlines()) == 1, err
