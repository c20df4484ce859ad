"""Trust, second round: a run, sweep, plot, merge or report touches only what it made, follows no planted
link, never hangs, reads back every file it wrote as data (damage is one line, exit 2), stops on a signal at
any moment with one line, checks every value of a sweep before writing anything, and repairs pictures to
the bytes of an uninterrupted run."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from dsl_cli import cli
from dsl_cli.errors import Interrupted, UserError
from dsl_cli.images import unique_names
from dsl_cli.outputs import NAME, SIMILARITY, CsvLog, RunFolder, read_csv, read_manifest, release_all
from helpers import dsl_in_process
import zygote  # dsl processes forked after the model libraries' imports (tests/zygote.py)

DSL = str(Path(sys.executable).parent / "dsl")
SCORES_ONLY = ["debug=tiny", "decode.enabled=false", "layer=1", "images.limit=1"]  # seconds, nothing decoded
DECODED = ["debug=tiny", "layer=1", "images.limit=2", "component=all", "decode.batch_size=4"]  # 10 pictures
DSL_MULTIRUN = """hydra:
  sweeper:
    _target_: hydra._internal.core_plugins.basic_sweeper.BasicSweeper
    params: null
  overrides:
    task: ['seed=0,1']
    hydra: []
  callbacks:
    sweep_results:
      _target_: dsl_cli.sweeps.SweepResults
"""


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file and link below `root` (a link as its target), with its bytes."""
    found = {}
    for p in sorted(root.rglob("*")):
        if p.is_symlink():
            found[str(p.relative_to(root))] = f"-> {os.readlink(p)}".encode()
        elif p.is_file():
            found[str(p.relative_to(root))] = p.read_bytes()
    return found


def one_line(err: str) -> str:
    """The `dsl: error:` line of a refusal: there is one, and no traceback."""
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("dsl: error:")]
    assert len(lines) == 1, err[-3000:]
    return lines[0]


def in_process(args: list[str], where: Path) -> tuple[int, str]:
    """`dsl ARGS` in this process from `where`, for a module fixture (no function-scoped monkeypatch)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(where)
        try:
            code = cli.main(args)
        except SystemExit as exit_:
            code = exit_.code
        finally:
            release_all()
    return code, ""


@pytest.fixture(scope="module")
def decoded_run(tmp_path_factory) -> Path:
    """A finished tiny run that decoded 10 pictures in batches of 4, 4 and 2."""
    root = tmp_path_factory.mktemp("decoded")
    code, _ = in_process(["run", *DECODED, f"hydra.run.dir={root / 'run'}"], root)
    assert code == 0
    return root / "run"


@pytest.fixture
def run_copy(decoded_run: Path, tmp_path: Path) -> Path:
    shutil.copytree(decoded_run, tmp_path / "run")
    return tmp_path / "run"


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """A finished, merged tiny sweep of two jobs (seed 0 and 1), scores only."""
    root = tmp_path_factory.mktemp("sweep")
    code, _ = in_process(["run", "-m", *SCORES_ONLY, "seed=0,1", f"hydra.sweep.dir={root / 'sweep'}"], root)
    assert code == 0
    return root / "sweep"


@pytest.fixture
def sweep_copy(sweep: Path, tmp_path: Path) -> Path:
    shutil.copytree(sweep, tmp_path / "sweep")
    return tmp_path / "sweep"


def dsl_sweep_folder(folder: Path, manifest: bool = True) -> Path:
    """A sweep folder as `dsl run -m` leaves it before any job ran: multirun.yaml, the claim's manifest."""
    folder.mkdir(parents=True)
    (folder / "multirun.yaml").write_text(DSL_MULTIRUN)
    if manifest:
        (folder / "manifest.json").write_text(json.dumps({"made_by": "dsl", "kind": "sweep", "status": "started"}))
    return folder


def picture(path: Path, data: bytes = b"\x89PNG mine") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


# ------------------------------------------------------------------ names from a CSV never become paths out


def test_plot_refuses_a_merged_csv_whose_image_climbs_out(tmp_path: Path, monkeypatch, capsys) -> None:
    sweep_dir = dsl_sweep_folder(tmp_path / "a" / "b" / "c" / "sweep")
    columns = ["job", "override.seed", *SIMILARITY.columns]
    CsvLog(sweep_dir / "similarity.csv", columns).rewrite([
        {"job": 0, "override.seed": "0", "image": "../../../x/pwned", "lens": "steering", "component": "L01H00",
         "kind": "head", "layer": 1, "head": 0, "seed": 0, "steps": 2, "guidance": 4.0, "sim_embed": 0.5, "rank": 1}])
    before = snapshot(tmp_path)
    code, err = dsl_in_process(["plot", str(sweep_dir)], tmp_path, monkeypatch, capsys)
    assert code == 2 and "image" in one_line(err)
    assert snapshot(tmp_path) == before
    assert not (tmp_path / "a" / "b" / "x").exists()


# ------------------------------------------------------------------ folders that are not dsl's


def test_a_sweep_into_a_folder_of_pictures_is_refused_and_they_stay(tmp_path: Path, monkeypatch, capsys) -> None:
    folder = tmp_path / "mine"
    picture(folder / "grids" / "holiday.png")
    picture(folder / "heatmaps" / "chart.png")
    before = snapshot(folder)
    code, err = dsl_in_process(["run", "-m", *SCORES_ONLY, "seed=0,1", f"hydra.sweep.dir={folder}"], tmp_path,
                               monkeypatch, capsys)
    assert code == 2 and "not a dsl folder" in one_line(err)
    assert snapshot(folder) == before


def test_merge_deletes_only_the_figures_its_manifest_lists(tmp_path: Path, monkeypatch, capsys) -> None:
    sweep_dir = dsl_sweep_folder(tmp_path / "sweep")
    picture(sweep_dir / "heatmaps" / "mine.png")
    picture(sweep_dir / "grids" / "mine.png")
    code, err = dsl_in_process(["merge", str(sweep_dir)], tmp_path, monkeypatch, capsys)
    assert code == 0, err
    assert (sweep_dir / "heatmaps" / "mine.png").is_file() and (sweep_dir / "grids" / "mine.png").is_file()


def test_merge_refuses_another_hydra_apps_multirun_folder(tmp_path: Path, monkeypatch, capsys) -> None:
    other = tmp_path / "other"
    other.mkdir()
    (other / "multirun.yaml").write_text("hydra:\n  job:\n    name: train\n  overrides:\n    task: ['lr=1,2']\n")
    (other / "manifest.json").write_text('{"model": "resnet"}')
    (other / "index.html").write_text("<p>my results</p>")
    picture(other / "heatmaps" / "loss.png")
    picture(other / "0" / "grids" / "batch.png")
    before = snapshot(other)
    code, err = dsl_in_process(["merge", str(other)], tmp_path, monkeypatch, capsys)
    assert code == 2 and "another program" in one_line(err)
    assert snapshot(other) == before


def test_report_leaves_a_subfolder_whose_manifest_is_not_dsls(tmp_path: Path, monkeypatch, capsys) -> None:
    other = tmp_path / "parent" / "other"
    other.mkdir(parents=True)
    (other / "manifest.json").write_text('{"name": "my dataset", "files": 3}')
    (other / "index.html").write_text("<p>my dataset</p>")
    before = snapshot(tmp_path / "parent")
    code, err = dsl_in_process(["report", str(tmp_path / "parent")], tmp_path, monkeypatch, capsys)
    assert code == 2, err
    one_line(err)
    assert snapshot(tmp_path / "parent") == before


def test_a_run_into_a_folder_with_a_users_files_is_refused(tmp_path: Path, monkeypatch, capsys) -> None:
    folder = tmp_path / "mine"
    for name in ("index.html", "patches.csv", "grids/astronaut_steering_L01.png"):
        picture(folder / name, b"the user's " + name.encode())
    before = snapshot(folder)
    code, err = dsl_in_process(["run", *SCORES_ONLY, f"hydra.run.dir={folder}"], tmp_path, monkeypatch, capsys)
    assert code == 2 and "not a dsl folder" in one_line(err)
    assert snapshot(folder) == before


@pytest.mark.parametrize("planted", ["a link of the user's", "another program's manifest"])
def test_a_folder_that_is_plainly_not_dsls_is_refused_as_such_before_any_link_is_named(
        planted: str, tmp_path: Path, monkeypatch, capsys) -> None:
    """`hydra.run.dir=/etc` was told to remove /etc/os-release (a link); a user's folder with a link of theirs
    got the same advice, and one with another program's manifest.json "already holds a run: resume it". Each is
    "not a dsl folder" and nothing in it is named for removal, or changed."""
    folder = tmp_path / "mine"
    picture(folder / "notes.txt", b"mine")
    if planted == "a link of the user's":
        (folder / "zlink").symlink_to(folder / "notes.txt")
    else:
        (folder / "manifest.json").write_text('{"a": 1}')
    before = snapshot(folder)
    code, err = dsl_in_process(["run", *SCORES_ONLY, f"hydra.run.dir={folder}"], tmp_path, monkeypatch, capsys)
    line = one_line(err)
    assert code == 2 and "not a dsl folder" in line and "remove" not in line and "resume" not in line, line
    assert snapshot(folder) == before


# ------------------------------------------------------------------ planted links


def test_a_dsl_log_linked_outside_is_refused_and_nothing_is_appended(tmp_path: Path, monkeypatch, capsys) -> None:
    outside = tmp_path / "diary.txt"
    outside.write_text("dear diary\n")
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "dsl.log").symlink_to(outside)
    code, err = dsl_in_process(["run", *SCORES_ONLY, f"hydra.run.dir={folder}"], tmp_path, monkeypatch, capsys)
    assert code == 2 and "symbolic link" in one_line(err)
    assert outside.read_text() == "dear diary\n"


def test_plot_refuses_a_grids_folder_linked_outside(run_copy: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.rmtree(run_copy / "grids")
    (run_copy / "grids").symlink_to(outside)
    code, err = dsl_in_process(["plot", str(run_copy)], tmp_path, monkeypatch, capsys)
    assert code == 2 and "symbolic link" in one_line(err)
    assert list(outside.iterdir()) == []


def test_merge_refuses_a_grids_folder_linked_outside(tmp_path: Path, monkeypatch, capsys) -> None:
    outside = tmp_path / "elsewhere"
    picture(outside / "precious.png")
    sweep_dir = dsl_sweep_folder(tmp_path / "sweep")
    (sweep_dir / "grids").symlink_to(outside)
    code, err = dsl_in_process(["merge", str(sweep_dir)], tmp_path, monkeypatch, capsys)
    assert code == 2 and "symbolic link" in one_line(err)
    assert (outside / "precious.png").read_bytes() == b"\x89PNG mine"


@pytest.mark.parametrize("command", ["report", "run"])
def test_a_dangling_lock_link_is_refused_not_spun_on(command: str, run_copy: Path, tmp_path: Path) -> None:
    (run_copy / ".dsl.lock").symlink_to(tmp_path / "nowhere")
    args = ["report", str(run_copy)] if command == "report" else ["run", f"resume={run_copy}"]
    result = zygote.run([DSL, *args], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and ".dsl.lock" in one_line(result.stderr)


# ------------------------------------------------------------------ damaged files: one line, exit 2


@pytest.mark.parametrize("content", ["{not json", "[1, 2]"])
def test_a_damaged_manifest_stops_resume_with_one_line(content: str, run_copy: Path, tmp_path: Path, monkeypatch,
                                                       capsys) -> None:
    (run_copy / "manifest.json").write_text(content)
    code, err = dsl_in_process(["run", f"resume={run_copy}"], tmp_path, monkeypatch, capsys)
    assert code == 2 and "manifest.json" in one_line(err)


@pytest.mark.parametrize("given", ["nowhere", "a_file"])
def test_resume_of_a_folder_that_is_not_there_says_so(given: str, tmp_path: Path, monkeypatch, capsys) -> None:
    (tmp_path / "a_file").write_text("mine")
    code, err = dsl_in_process(["run", f"resume={given}"], tmp_path, monkeypatch, capsys)
    expected = "no such folder" if given == "nowhere" else "not a folder"
    assert code == 2 and f"resume={given}: {expected}" in one_line(err)
    assert (tmp_path / "a_file").read_text() == "mine"


def test_the_advice_for_a_damaged_manifest_works(run_copy: Path, sweep_copy: Path, tmp_path: Path, monkeypatch,
                                                capsys) -> None:
    """It said "delete it and dsl writes it anew" for every folder; a run folder without its manifest is no
    longer known to be dsl's, so that was a dead end. A sweep's is deleted and merged anew; a run's is not
    to be deleted."""
    for folder in (run_copy, sweep_copy):
        (folder / "manifest.json").write_text("{not json")
    code, err = dsl_in_process(["report", str(run_copy)], tmp_path, monkeypatch, capsys)
    assert code == 2 and "delete" not in one_line(err) and "restore it" in one_line(err)
    code, err = dsl_in_process(["report", str(sweep_copy)], tmp_path, monkeypatch, capsys)
    # the jobs' pages are written; the sweep is named below the error line, with the advice
    assert code == 2 and f"delete it and `dsl merge {sweep_copy}` writes it anew" in err
    (sweep_copy / "manifest.json").unlink()
    code, err = dsl_in_process(["merge", str(sweep_copy)], tmp_path, monkeypatch, capsys)
    assert code == 0 and json.loads((sweep_copy / "manifest.json").read_text())["status"] == "complete", err


def test_a_fresh_run_into_a_folder_with_a_damaged_manifest_is_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "manifest.json").write_text("{not json")
    code, err = dsl_in_process(["run", *SCORES_ONLY, f"hydra.run.dir={folder}"], tmp_path, monkeypatch, capsys)
    assert code == 2 and "manifest.json" in one_line(err)
    assert (folder / "manifest.json").read_text() == "{not json"


@pytest.mark.parametrize("manifest", [[1, 2], {"made_by": "dsl", "config": "x"},
                                      {"made_by": "dsl", "seconds": {"encoder": "fast"}},
                                      {"made_by": "dsl", "versions": {"dsl": "1"}, "images": [{"a": 1}]}])
def test_report_of_a_manifest_of_the_wrong_shape_is_one_line(manifest, run_copy: Path, tmp_path: Path, monkeypatch,
                                                             capsys) -> None:
    (run_copy / "manifest.json").write_text(json.dumps(manifest))
    code, err = dsl_in_process(["report", str(run_copy)], tmp_path, monkeypatch, capsys)
    assert code == 2 and "manifest.json" in one_line(err)


DAMAGE = {  # a sweep's file -> what it is made
    "multirun.yaml": "hydra: [unclosed",
    "0/.hydra/hydra.yaml": "hydra:\n  job:\n    num: first\n",
    "0/.hydra/overrides.yaml": "{a: 1}\n",
    "1/.hydra/overrides.yaml": "- layer=[\n",  # an override edited into one Hydra cannot read: merged as `[`
    "0/manifest.json": "{not json",
    "1/similarity.csv": "image,lens\n../x,steering\n",
}


@pytest.mark.parametrize("name", list(DAMAGE))
def test_merge_of_a_damaged_sweep_file_is_one_line_naming_it(name: str, sweep_copy: Path, tmp_path: Path,
                                                             monkeypatch, capsys) -> None:
    (sweep_copy / name).write_text(DAMAGE[name])
    code, err = dsl_in_process(["merge", str(sweep_copy)], tmp_path, monkeypatch, capsys)
    assert code == 2 and Path(name).name in one_line(err)


def test_merge_of_a_job_whose_overrides_were_edited_is_one_line_and_keeps_the_merge(sweep_copy: Path, tmp_path: Path,
                                                                                   monkeypatch, capsys) -> None:
    """A job's `.hydra/overrides.yaml` edited to another setting than multirun.yaml gives it (`- seed=99`): its
    rows were merged labelled `override.seed=99` beside a seed column of 1, its other overrides empty."""
    (sweep_copy / "1" / ".hydra" / "overrides.yaml").write_text("- seed=99\n")
    merged = {name: (sweep_copy / name).read_bytes() for name in ("similarity.csv", "manifest.json")}
    code, err = dsl_in_process(["merge", str(sweep_copy)], tmp_path, monkeypatch, capsys)
    assert code == 2 and "1/.hydra/overrides.yaml" in one_line(err) and "seed=99" in one_line(err), err
    assert {name: (sweep_copy / name).read_bytes() for name in merged} == merged


@pytest.mark.parametrize("copy", ["run_copy", "sweep_copy"])
def test_resume_through_a_symbolic_link_is_refused_naming_the_folder(copy: str, request, tmp_path: Path, monkeypatch,
                                                                     capsys) -> None:
    """`hydra.run.dir=LINK` is refused, and `dsl report LINK`; `resume=LINK` followed the link and wrote there."""
    folder = request.getfixturevalue(copy)
    link = tmp_path / "link"
    link.symlink_to(folder)
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    code, err = dsl_in_process(["run", f"resume={link}"], tmp_path, monkeypatch, capsys)
    assert code == 2 and f"resume={folder.resolve()}" in one_line(err) and "symbolic link" in one_line(err)
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("name", ["multirun.yaml", "0/.hydra/overrides.yaml"])
def test_resume_of_a_damaged_sweep_is_one_line_naming_the_file(name: str, sweep_copy: Path, tmp_path: Path,
                                                               monkeypatch, capsys) -> None:
    (sweep_copy / name).write_text(DAMAGE[name])
    code, err = dsl_in_process(["run", f"resume={sweep_copy}"], tmp_path, monkeypatch, capsys)
    assert code == 2 and Path(name).name in one_line(err)


def test_a_continued_run_whose_saved_config_was_edited_is_refused(run_copy: Path, tmp_path: Path, monkeypatch,
                                                                   capsys) -> None:
    """An interrupted run resumed after its `.hydra/config.yaml` was edited would write its remaining rows
    with the new setting beside the earlier ones, and call the mixed table complete: refused in one line
    naming the setting, nothing written; put back, the resume completes the run as it started."""
    import yaml

    before = (run_copy / "similarity.csv").read_bytes()
    manifest = json.loads((run_copy / "manifest.json").read_text())
    (run_copy / "manifest.json").write_text(json.dumps({**manifest, "status": "interrupted"}))
    lines = before.decode().splitlines(keepends=True)
    (run_copy / "similarity.csv").write_text("".join(lines[:5]))  # 4 of its 10 rows were written
    saved = run_copy / ".hydra" / "config.yaml"
    original = saved.read_text()
    config = yaml.safe_load(original)
    config["lens"]["alpha"] = config["lens"]["alpha"] + 1.5
    saved.write_text(yaml.safe_dump(config))
    code, err = dsl_in_process(["run", f"resume={run_copy}"], tmp_path, monkeypatch, capsys)
    line = one_line(err)
    assert code == 2 and "lens.alpha is" in line and "but the run started with" in line, line
    assert (run_copy / "similarity.csv").read_text() == "".join(lines[:5])
    # a key edited into the file that its manifest never recorded (not a plugin's setting, which a resume from
    # plain dsl drops where the manifest holds it too): refused as ever
    config = yaml.safe_load(original)
    config["lens"]["alph"] = 3.5
    saved.write_text(yaml.safe_dump(config))
    code, err = dsl_in_process(["run", f"resume={run_copy}"], tmp_path, monkeypatch, capsys)
    assert code == 2 and "not a config this run can be resumed from (Key 'alph' not in" in one_line(err), err
    saved.write_text(original)
    code, err = dsl_in_process(["run", f"resume={run_copy}"], tmp_path, monkeypatch, capsys)
    assert code == 0, err[-3000:]
    assert (run_copy / "similarity.csv").read_bytes() == before


def _cut_short(csv_path: Path) -> None:
    csv_path.write_text("".join(csv_path.read_text().splitlines(keepends=True)[:3]))


def _repeat_a_row(csv_path: Path) -> None:
    lines = csv_path.read_text().splitlines(keepends=True)
    csv_path.write_text("".join([*lines, lines[2]]))


ROW_DAMAGE = {"cut short": _cut_short, "a row repeated": _repeat_a_row, "deleted": Path.unlink}


@pytest.mark.parametrize("damage", list(ROW_DAMAGE))
def test_a_complete_runs_rows_cut_short_repeated_or_deleted_are_refused_then_resume_writes_them(
        damage: str, run_copy: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    """A complete run's similarity.csv that no longer holds the rows its manifest counted (cut short, a row
    twice, gone) is not drawn or shown as whole: one line naming the file and the resume that writes it
    again; that resume gives back the uninterrupted run's file."""
    before = (run_copy / "similarity.csv").read_bytes()
    ROW_DAMAGE[damage](run_copy / "similarity.csv")
    damaged = snapshot(run_copy)
    for command in ("plot", "report"):
        code, err = dsl_in_process([command, str(run_copy)], tmp_path, monkeypatch, capsys)
        line = one_line(err)
        assert code == 2 and "similarity.csv" in line and f"dsl run resume={run_copy}" in line, (command, line)
        assert snapshot(run_copy) == damaged
    if damage == "deleted":  # resumed as a file cut short is (every picture decoded again: 3 s)
        return
    code, err = dsl_in_process(["run", f"resume={run_copy}"], tmp_path, monkeypatch, capsys)
    assert code == 0, err[-3000:]
    assert (run_copy / "similarity.csv").read_bytes() == before


@pytest.mark.parametrize("command", ["report", "plot"])
def test_a_damaged_run_among_several_is_named_and_the_others_are_done(
        command: str, decoded_run: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    """`dsl report` / `dsl plot` of a folder of runs, one of them damaged: the others' pages and figures are
    written, the damaged one is left as it is and named with why, and the status is 2."""
    root = tmp_path / "runs"
    for name in ("a_good", "b_damaged", "c_good"):
        shutil.copytree(decoded_run, root / name)
        (root / name / "index.html").unlink()
    _cut_short(root / "b_damaged" / "similarity.csv")
    damaged = snapshot(root / "b_damaged")
    monkeypatch.chdir(tmp_path)
    code = cli.main([command, str(root)])
    out, err = capsys.readouterr()
    line = one_line(err)
    assert code == 2 and "1 of 3 folders left as they were" in line, line
    assert f"{root / 'b_damaged'}/similarity.csv: 2 rows" in err, err
    assert snapshot(root / "b_damaged") == damaged
    for good in ("a_good", "c_good"):
        assert (root / good / "index.html").is_file(), good
        assert (f"wrote {root / good}/index.html" if command == "report" else f" figures in {root / good}\n") \
            in out + "\n", out
    assert (root / "index.html").is_file() == (command == "report")


def test_plot_of_a_run_stopped_before_its_first_row_says_there_is_nothing_to_draw(run_copy: Path, tmp_path: Path,
                                                                                monkeypatch, capsys) -> None:
    (run_copy / "similarity.csv").unlink()
    manifest = json.loads((run_copy / "manifest.json").read_text())
    (run_copy / "manifest.json").write_text(json.dumps({**manifest, "status": "interrupted"}))
    monkeypatch.chdir(tmp_path)
    assert cli.main(["plot", str(run_copy)]) == 0
    assert capsys.readouterr().out.strip() == f"no figures to draw in {run_copy}: no run there has rows yet"


@pytest.mark.parametrize("damage", list(ROW_DAMAGE))
def test_a_sweep_jobs_rows_cut_short_are_refused_by_merge_then_resume_writes_them(
        damage: str, sweep_copy: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    """The same for a complete job of a sweep: `dsl merge` names the job's file and the sweep's resume, which
    runs that job again (a complete job is otherwise skipped) and merges every row once."""
    job_csv, merged = sweep_copy / "1" / "similarity.csv", (sweep_copy / "similarity.csv").read_bytes()
    before = job_csv.read_bytes()
    ROW_DAMAGE[damage](job_csv)
    code, err = dsl_in_process(["merge", str(sweep_copy)], tmp_path, monkeypatch, capsys)
    line = one_line(err)
    assert code == 2 and "1/similarity.csv" in line and f"dsl run resume={sweep_copy}" in line, line
    code, err = dsl_in_process(["run", f"resume={sweep_copy}"], tmp_path, monkeypatch, capsys)
    assert code == 0, err[-3000:]
    assert job_csv.read_bytes() == before and (sweep_copy / "similarity.csv").read_bytes() == merged


def test_a_merge_removes_its_earlier_figures_but_never_a_users_file_an_edited_manifest_lists(
        sweep_copy: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    """An earlier merge's figures are removed by the next merge, as the manifest lists them; a file of the
    user's that an edited manifest lists among them is not dsl's PNG (no Software text of dsl's) and stays."""
    from PIL import Image

    from dsl_cli.outputs import save_png

    mine = sweep_copy / "heatmaps" / "zz_user.png"
    Image.new("RGB", (4, 3), "red").save(mine)
    old = sweep_copy / "heatmaps" / "old_tag=1.png"  # one an earlier merge drew, for a setting no longer swept
    save_png(old, Image.new("RGB", (4, 3), "blue"))
    manifest = json.loads((sweep_copy / "manifest.json").read_text())
    manifest["figures"] += ["heatmaps/zz_user.png", "heatmaps/old_tag=1.png"]
    (sweep_copy / "manifest.json").write_text(json.dumps(manifest))
    before = mine.read_bytes()
    code, err = dsl_in_process(["merge", str(sweep_copy)], tmp_path, monkeypatch, capsys)
    assert code == 0, err[-3000:]
    assert mine.read_bytes() == before and not old.exists()


def test_multirun_with_cfg_job_is_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    code, err = dsl_in_process(["run", "-m", *SCORES_ONLY, "seed=0,1", "--cfg", "job"], tmp_path, monkeypatch, capsys)
    assert code == 2 and "--cfg" in one_line(err)


# ------------------------------------------------------------------ every value of a sweep, at once


def test_a_bad_201st_value_is_refused_at_once_and_nothing_is_written(tmp_path: Path, monkeypatch, capsys) -> None:
    values = ",".join(map(str, range(200))) + ",abc"
    start = time.monotonic()
    code, err = dsl_in_process(["run", "-m", *SCORES_ONLY, f"seed={values}", "hydra.sweep.dir=sweep"], tmp_path,
                               monkeypatch, capsys)
    assert code == 2 and "seed=abc" in one_line(err)
    assert time.monotonic() - start < 10
    assert not (tmp_path / "sweep").exists()


@pytest.mark.parametrize(("overrides", "fragment"), [
    (["-m", "layer=range(0,0)"], "layer=range(0,0): sweeps no value"),  # launched nothing, exit 0, "complete"
    (["-m", "layer=0,1", "seed=3,4,3"], "seed=3 is swept twice"),  # the same job twice, its rows merged twice
    # the same value written two ways: the same job twice too (counted as text, they passed)
    (["-m", "lens.alpha=1,1.0"], "lens.alpha=1.0 is lens.alpha=1 again, written another way"),
    (["-m", "seed=1,01,1_0"], "seed=01 is seed=1 again"),
    (["-m", "lens.alpha=2,2.0000000000000001"], "is lens.alpha=2 again"),
    (["-m", "images.limit=1,'1'"], "images.limit='1' is images.limit=1 again"),  # was QuotedString(...) refused
    (["+lens.alfa=2"], "lens.alfa is not a setting of dsl"),  # ran, with the misspelt key recorded and unread
    (["+foo=1"], "foo is not a setting of dsl"),
])
def test_a_sweep_of_no_value_a_value_twice_or_an_added_unknown_key_is_refused_before_anything_is_written(
        overrides: list[str], fragment: str, tmp_path: Path, monkeypatch, capsys) -> None:
    code, err = dsl_in_process(["run", *SCORES_ONLY, *overrides, "hydra.sweep.dir=sweep", "hydra.run.dir=run"],
                               tmp_path, monkeypatch, capsys)
    assert code == 2 and fragment in one_line(err)
    assert not (tmp_path / "sweep").exists() and not (tmp_path / "run").exists()


def test_plus_on_a_known_setting_is_still_taken(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    code = cli.main(["run", *SCORES_ONLY, "++lens.alpha=3.5", "--cfg", "job"])
    out, err = capsys.readouterr()
    assert code == 0 and "alpha: 3.5" in out, err


# ------------------------------------------------------------------ signals from the first instruction on


def start_run(folder: Path) -> subprocess.Popen:
    return subprocess.Popen([DSL, "run", *SCORES_ONLY, f"hydra.run.dir={folder}"], cwd=folder.parent,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


@pytest.mark.own_process
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_in_the_first_second_is_one_line(signum: int, tmp_path: Path) -> None:
    process = start_run(tmp_path / "run")
    time.sleep(0.4)
    process.send_signal(signum)
    err = process.communicate(timeout=60)[1]
    assert process.returncode == 128 + signum, err
    assert "Traceback" not in err and len([line for line in err.splitlines() if line.strip()]) <= 2, err


def test_a_stop_that_comes_back_as_a_config_error_is_a_stop(tmp_path: Path, monkeypatch, capsys) -> None:
    """Ctrl-C while Hydra composes the config (the run's first second) came back as a composition error, and
    dsl said `defaults: no such setting (misspelt? ...)`, exit 2 (seen on a fresh clone): the stop wins."""
    from dsl_cli import config

    def interrupted_compose(overrides: list[str]) -> None:  # as Hydra's loader turns the interrupt into an error
        try:
            signal.raise_signal(signal.SIGINT)
        except BaseException:  # noqa: BLE001 - the library's, not dsl's
            pass
        raise UserError("defaults: no such setting (misspelt? `dsl run --cfg job` prints every setting)")

    monkeypatch.setattr(config, "check_overrides", interrupted_compose)
    code, err = dsl_in_process(["run", *SCORES_ONLY, "hydra.run.dir=run"], tmp_path, monkeypatch, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 130 and len(lines) == 1 and "interrupted (SIGINT)" in lines[0], err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("resume", [False, True])
def test_a_run_stopped_before_its_first_result_leaves_no_folder_but_a_resume_keeps_its_own(
        resume: bool, run_copy: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    """Stopped while its encoder loads: a fresh run has nothing to resume (its dated folder would only pile
    up, and `resume=` of it was refused), so its folder goes and the line says to run the command again; a
    resumed run's folder is the user's finished work and stays as it was."""
    def stopped(*args, **kwargs):
        raise Interrupted(signal.SIGINT)

    monkeypatch.setattr("dsl_cli.run.load_encoder", stopped)
    if resume:
        manifest = json.loads((run_copy / "manifest.json").read_text())
        (run_copy / "manifest.json").write_text(json.dumps({**manifest, "status": "interrupted"}))
        before = snapshot(run_copy)
    args = ["run", f"resume={run_copy}"] if resume else ["run", *SCORES_ONLY, "hydra.run.dir=fresh"]
    code, err = dsl_in_process(args, tmp_path, monkeypatch, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 130 and len(lines) == 1 and "interrupted (SIGINT)" in lines[0], err
    if resume:
        assert f"`dsl run resume={run_copy}` completes the run" in lines[0]
        assert {k: v for k, v in snapshot(run_copy).items() if k not in ("manifest.json", "dsl.log")} == {
            k: v for k, v in before.items() if k not in ("manifest.json", "dsl.log")}
    else:
        assert "nothing was written yet" in lines[0] and "run the same command again" in lines[0]
        assert not (tmp_path / "fresh").exists()


def test_a_stop_a_library_swallows_during_the_imports_still_stops_the_run(tmp_path: Path, monkeypatch, capsys) -> None:
    """Ctrl-C while a run imports its libraries (its first seconds) can land in a library's bare `except:`
    around an optional import; the run stops anyway, with the one line, instead of running to the end
    (seen: a SIGINT 0.4 s after the start on a loaded machine, exit 0 and a complete run)."""
    signals = [signal.SIGINT]  # one, in the first command

    def swallowing() -> None:  # as `try: import optional_thing` / `except: pass` would
        try:
            for signum in signals:
                signal.raise_signal(signum)
            time.sleep(0.05)
        except BaseException:  # noqa: BLE001 - the library's, not dsl's
            pass

    monkeypatch.setattr("dsl_cli.logs.route_library_logs", swallowing)
    code, err = dsl_in_process(["run", *SCORES_ONLY, "hydra.run.dir=run"], tmp_path, monkeypatch, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 130 and "Traceback" not in err and len(lines) == 1 and "interrupted (SIGINT)" in lines[0], err
    assert "run the same command again" in lines[0] and not (tmp_path / "run").exists(), err  # no folder to resume
    signals.clear()
    code, err = dsl_in_process(["run", *SCORES_ONLY, "hydra.run.dir=again"], tmp_path, monkeypatch, capsys)
    assert code == 0, err  # handled: the next command in this process is not stopped by it


@pytest.mark.own_process
def test_sigterm_just_after_the_claim_leaves_a_folder_to_reuse(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    process = start_run(folder)
    deadline = time.monotonic() + 60
    while not (folder / ".dsl.lock").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    process.send_signal(signal.SIGTERM)
    err = process.communicate(timeout=60)[1]
    assert process.returncode == 143, err
    assert "Traceback" not in err, err
    assert not (folder / ".dsl.lock").exists()  # no stale lock
    if RunFolder(folder).config_yaml.exists():  # stopped inside the job: resume= continues it
        assert RunFolder(folder).holds_run()
    else:  # stopped before: a fresh run takes the folder
        assert RunFolder(folder).claim() is True
        RunFolder(folder).release()


def test_a_sweep_stopped_in_a_job_names_the_sweeps_resume_and_is_marked_interrupted(tmp_path: Path, monkeypatch,
                                                                                    capsys) -> None:
    """A stop in a job of a local sweep (here raised where the job starts its run, in this process): the one
    line names the resume of the sweep, which runs the jobs left and merges (the job's own resume would leave
    the later jobs unrun), and the sweep's manifest says `interrupted` (it said `started`)."""
    from dsl_cli import run

    def stopped(cfg, run_dir) -> None:
        raise Interrupted(signal.SIGINT)

    monkeypatch.setattr(run, "check_settings_kept", stopped)
    sweep = tmp_path / "sweep"
    code, err = dsl_in_process(["run", "-m", *SCORES_ONLY, "seed=0,1", f"hydra.sweep.dir={sweep}"], tmp_path,
                               monkeypatch, capsys)
    lines = [line for line in err.splitlines() if line.startswith("dsl:")]
    assert code == 130 and "Traceback" not in err, err[-3000:]
    assert len(lines) == 1 and f"`dsl run resume={sweep}` completes the sweep" in lines[0], lines
    assert read_manifest(sweep)["status"] == "interrupted"


def plot_mid_drawing(decoded_run: Path, tmp_path: Path) -> subprocess.Popen:
    """`dsl plot` of a copy of the run without its figures, in a session of its own, once it has written its
    first figure (its drawing processes are at work)."""
    folder = shutil.copytree(decoded_run, tmp_path / "run")
    for kind in ("grids", "heatmaps", "looks"):
        shutil.rmtree(folder / kind, ignore_errors=True)
    process = subprocess.Popen([str(Path(sys.executable).parent / "dsl"), "plot", str(folder)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 60
    while not list(folder.glob("*/*.png")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    return process


def group_ends(group: int, within: float = 5.0) -> bool:
    """Whether no process of process group `group` is left, within `within` seconds."""
    deadline = time.monotonic() + within
    while True:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


@pytest.mark.own_process
def test_ctrl_c_while_figures_are_drawn_on_several_processes_is_one_line(decoded_run: Path, tmp_path: Path) -> None:
    """Ctrl-C reaches the whole process group, the drawing processes too: the parent says its one line, no
    drawing process prints a traceback, and none outlives the command."""
    process = plot_mid_drawing(decoded_run, tmp_path)
    os.killpg(process.pid, signal.SIGINT)
    err = process.communicate(timeout=60)[1]
    assert process.returncode == 130, err
    assert "Traceback" not in err and len([line for line in err.splitlines() if line.strip()]) <= 2, err
    assert group_ends(process.pid)


@pytest.mark.own_process
def test_a_dsl_killed_outright_leaves_no_drawing_process(decoded_run: Path, tmp_path: Path) -> None:
    """SIGKILL to dsl alone (the OOM killer, a scheduler's hard limit) while its forked processes draw: they
    end with it, so its output streams close (a script reading them is not left waiting) and no copy of its
    memory stays behind."""
    process = plot_mid_drawing(decoded_run, tmp_path)
    try:
        process.kill()  # the dsl process only, not its group
        process.communicate(timeout=30)  # every holder of its stderr has ended
        assert group_ends(process.pid)
    finally:  # whatever happened, nothing of this test outlives it
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# ------------------------------------------------------------------ names and repairs


def test_a_long_file_name_gives_a_name_dsl_accepts() -> None:
    files = [Path(f"/in/{'a' * 186}.png"), Path(f"/in/{'b' * 190} 2.png"), Path(f"/in/{'c' * 250}.png"),
             Path(f"/in/x/{'a' * 186}.png")]
    names = unique_names(files, Path("/in"))
    assert len(set(names)) == 4
    for name in names:
        assert NAME.fullmatch(name), name
        assert len(f".{name}_steering_layers.png.12345678.dsl-tmp".encode()) < 255


def test_repaired_pictures_are_the_bytes_of_the_uninterrupted_run(decoded_run: Path, run_copy: Path, tmp_path: Path,
                                                                   monkeypatch, capsys) -> None:
    pictures = sorted(decoded_run.glob("images/*/steering/*.png"))
    assert len(pictures) == 10
    damaged = [run_copy / pictures[0].relative_to(decoded_run)]  # alone, it decodes to other bytes (round-off)
    for path in damaged:  # cut in its pixels: dsl's tag (a chunk before them) says it is dsl's to make again
        data = path.read_bytes()
        path.write_bytes(data[:data.index(b"IDAT") + 40])
    code, err = dsl_in_process(["run", f"resume={run_copy}"], tmp_path, monkeypatch, capsys)
    assert code == 0, err
    for path in pictures:
        assert (run_copy / path.relative_to(decoded_run)).read_bytes() == path.read_bytes(), path.name
    assert (run_copy / "similarity.csv").read_bytes() == (decoded_run / "similarity.csv").read_bytes()


@pytest.mark.parametrize("which", ["input", "decoded"])
def test_plot_refuses_a_picture_of_the_users_in_place_of_the_run_s(which: str, decoded_run: Path, run_copy: Path,
                                                                   tmp_path: Path, monkeypatch, capsys) -> None:
    """A PNG of the user's where the run's input or decoded picture was would be drawn in the grids as the run's
    result: `dsl plot` refuses it in one line naming it, and leaves it (and everything else) as it was."""
    picture = (sorted(run_copy.glob("images/*/input.png")) if which == "input"
               else sorted(run_copy.glob("images/*/steering/*.png")))[0]
    Image.new("RGB", (10, 10), "red").save(picture)
    before = {p: p.read_bytes() for p in run_copy.rglob("*") if p.is_file()}
    code, err = dsl_in_process(["plot", str(run_copy)], tmp_path, monkeypatch, capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"dsl: error: {picture} is not a picture dsl made; move it away"), err
    assert {p: p.read_bytes() for p in run_copy.rglob("*") if p.is_file()} == before


# ------------------------------------------------------------------ property: readers take any bytes


ALPHABET = "aZ09_.-/\\ ..~$<>\"',;:\n\r\t\x00é€" + "\u202e"


def random_text(rng: random.Random) -> str:
    if rng.random() < 0.3:
        return rng.choice(["img", "L01H00", "steering", "a.b-c_1"])
    if rng.random() < 0.3:
        return rng.choice(["", "..", ".", "/", "../x", "a/../../b", "L01H00", "img", "steering", "/etc/passwd",
                           "images/img/steering/L01H00.png", "0/images/img/steering/L01H00.png", "a" * 250, "nan",
                           "1e999", "-1", "C:\\x", "~root", ".hidden"])
    return "".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 12)))


def random_value(rng: random.Random, depth: int = 0):
    kind = rng.randint(0, 7 if depth < 2 else 4)
    if kind == 0:
        return random_text(rng)
    if kind == 1:
        return rng.choice([0, 1, -1, 2**70, 0.5, float("inf")])
    if kind == 2:
        return rng.choice([None, True, False])
    if kind in (3, 4):
        return rng.choice(["complete", "failed", "started", "dsl"])
    if kind == 5:
        return [random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {rng.choice(KEYS): random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))}


KEYS = ["made_by", "kind", "status", "error", "config", "versions", "seconds", "images", "skipped", "figures", "jobs",
        "failed", "unfinished", "rows", "complete", "job", "folder", "overrides", "encoder", "lens", "dsl", "name",
        "decode", "decode_batch_size", "decode_fit_seconds"]


def test_readers_refuse_or_accept_random_names_and_values_and_touch_nothing_outside(tmp_path: Path) -> None:
    from dsl_cli.report import header, settings_section
    from dsl_cli.sweeps import read_merged, summary_lines

    rng = random.Random(30)
    folder = tmp_path / "box" / "run"
    folder.mkdir(parents=True)
    (folder / "multirun.yaml").write_text(DSL_MULTIRUN)
    outside = snapshot(tmp_path / "box") | {}
    counts: dict[tuple[str, str], int] = {}
    for case in range(600):
        row = {c: random_text(rng) for c in ("image", "lens", "component", "file")}
        row |= {"sim_embed": rng.choice(["0.5", "x", "", "nan"]), "rank": rng.choice(["1", "1.5", ""])}
        merged = {"job": "0", **row}
        CsvLog(folder / "similarity.csv", SIMILARITY.columns).rewrite([row]) if case % 2 else \
            (folder / "similarity.csv").write_text(
                ",".join(["job", *SIMILARITY.columns]) + "\n" + ",".join(
                    json.dumps(merged.get(c, "")) for c in ["job", *SIMILARITY.columns]) + "\n")
        manifest = random_value(rng) if rng.random() < 0.3 else {"made_by": "dsl", **{
            rng.choice(KEYS): random_value(rng) for _ in range(rng.randint(1, 5))}}
        (folder / "manifest.json").write_text(json.dumps(manifest))
        outcomes = []
        try:
            rows = read_csv(folder / "similarity.csv") if case % 2 else read_merged(folder)
            for got in rows:
                for key in ("image", "lens", "component"):
                    assert NAME.fullmatch(got[key]), got
                if got["file"]:
                    assert (folder / got["file"]).resolve().is_relative_to(folder.resolve())
            outcomes.append(("csv", "accepted"))
        except UserError as err:
            assert "\n" not in err.args[0]
            outcomes.append(("csv", "refused"))
        try:
            data = read_manifest(folder)
            if data is not None:
                header(folder, data, "run")
                settings_section(data)
                if "jobs" in data and all(k in data for k in ("failed", "unfinished", "complete", "rows")):
                    summary_lines(folder, data)
            outcomes.append(("manifest", "accepted"))
        except UserError as err:
            assert "\n" not in err.args[0]
            outcomes.append(("manifest", "refused"))
        for outcome in outcomes:
            counts[outcome] = counts.get(outcome, 0) + 1
    assert min(counts.values()) > 20 and len(counts) == 4, counts
    assert {k: v for k, v in snapshot(tmp_path / "box").items() if not k.startswith("run/")} == \
        {k: v for k, v in outside.items() if not k.startswith("run/")}
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", "multirun.yaml", "similarity.csv"]


@pytest.mark.own_process
@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGINT])
def test_a_signal_ignored_at_the_start_stays_ignored(signum: int, tmp_path: Path) -> None:
    """`nohup dsl run ... &` starts dsl with SIGHUP ignored, so that the run outlives the terminal; a
    script's `dsl run ... &` with SIGINT ignored. dsl leaves them ignored: the hangup does not stop the run."""
    folder = tmp_path / "run"
    process = zygote.popen([DSL, "run", "debug=tiny", "layer=1", "images.limit=1", "decode.steps=20",
                            "decode.batch_size=1", f"hydra.run.dir={folder}"], cwd=tmp_path,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, ignored_signals=(signum,))
    deadline = time.monotonic() + 120
    while not list(folder.glob("images/*/*/*.png")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signum)  # mid-decoding: 1 of 5 pictures written
    err = process.communicate(timeout=120)[1]
    assert process.returncode == 0, err
    assert json.loads((folder / "manifest.json").read_text())["status"] == "complete"


def test_a_stop_during_hydras_set_up_of_a_run_is_a_stop(tmp_path: Path, monkeypatch, capsys) -> None:
    """A SIGTERM just after the run folder is claimed lands in Hydra's set-up of the job (seen once in a full
    suite: inside OmegaConf, where the exception raised mid-statement became an UnboundLocalError, a traceback
    and exit status 1). dsl notes it there and stops when the job starts: one line, 143, no folder left held."""
    from hydra.core.hydra_config import HydraConfig

    real_set_config = HydraConfig.set_config

    def set_config(self, cfg):  # as a library's try/finally whose first assignment the signal would pre-empt
        try:
            signal.raise_signal(signal.SIGTERM)
            old = self
        finally:
            del old
        return real_set_config(self, cfg)

    monkeypatch.setattr(HydraConfig, "set_config", set_config)
    code, err = dsl_in_process(["run", *SCORES_ONLY, "hydra.run.dir=run"], tmp_path, monkeypatch, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 143 and "Traceback" not in err and len(lines) == 1 and "interrupted (SIGTERM)" in lines[0], err
    assert not (tmp_path / "run" / ".dsl.lock").exists()


def test_the_advice_for_a_damaged_job_manifest_in_a_sweep_works(sweep_copy: Path, tmp_path: Path, monkeypatch,
                                                                capsys) -> None:
    """A job's manifest, cut short: the advice was a run's ("restore it, or run the run again into another
    folder"), though moving the job's folder out of the sweep and resuming the sweep is what completes it."""
    job = sweep_copy / "1"
    (job / "manifest.json").write_text('{"made_by": "dsl", "sta')
    code, err = dsl_in_process(["merge", str(sweep_copy)], tmp_path, monkeypatch, capsys)
    advice = f"move the job's folder out of the sweep: `dsl run resume={sweep_copy}` then runs the job again"
    assert code == 2 and advice in one_line(err), err
    job.rename(tmp_path / "job1_damaged")
    code, err = dsl_in_process(["run", f"resume={sweep_copy}"], tmp_path, monkeypatch, capsys)
    assert code == 0, err
    assert json.loads((sweep_copy / "1" / "manifest.json").read_text())["status"] == "complete"
    assert json.loads((sweep_copy / "manifest.json").read_text())["status"] == "complete"


IMPORT_SIGNALLED = """
import signal, sys
sys.path.insert(0, sys.argv[1])
from dsl_cli.errors import STOP_SIGNALS, Interrupted, catch_stop_signals, stop
from dsl_cli.libraries import import_frozen, own_the_collector
own_the_collector()  # a dsl command's process, as `dsl run` makes it
catch_stop_signals(STOP_SIGNALS, lambda signum, frame: stop(signum))
try:
    import_frozen("signalled_midway")
except Interrupted as err:
    print(err.args[0], "after the import:", getattr(sys.modules.get("signalled_midway"), "finished", False))
"""


@pytest.mark.own_process
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=lambda s: s.name)
def test_a_stop_during_a_librarys_import_is_raised_when_the_import_ends(signum: int, tmp_path: Path) -> None:
    """A stop signal raised inside an import could land in C++ code calling back into Python (torch's
    bindings), which ended the process with std::terminate (exit 134, the run's lock left): it waits for the
    import's end. The module here signals its own process halfway through its body."""
    (tmp_path / "signalled_midway.py").write_text(f"import os\nos.kill(os.getpid(), {int(signum)})\nfinished = True\n")
    done = subprocess.run([sys.executable, "-c", IMPORT_SIGNALLED, str(tmp_path)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == f"{signal.Signals(signum).name} after the import: True", \
        done.stdout + done.stderr[-2000:]
