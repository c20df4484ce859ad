"""The files dsl draws figures from and into: a file of the user's at a figure's path is never replaced, and a
CSV cut short or edited (a row removed, a `nan` typed in) is refused with one line that says what to do."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from PIL import Image

from dsl_cli.outputs import CORRELATIONS, SIMILARITY, CsvLog, is_dsl_png, read_csv
from helpers import dsl_in_process
from test_trust import one_line
# the fixtures of those tests: a finished tiny run that decoded layer 1 of two images (grids, heatmaps, looks),
# a copy of it per test, and a merged two-job sweep
from test_trust import decoded_run, run_copy, sweep, sweep_copy  # noqa: F401

USERS = "is not a figure dsl drew; move it away and run the command again"


def users_png(path: Path) -> bytes:
    """A PNG of the user's (no `Software: dsl` text) saved over `path`; its bytes."""
    assert is_dsl_png(path), path  # a figure dsl drew was there
    Image.new("RGB", (10, 10), "red").save(path)
    return path.read_bytes()


# ------------------------------------------------------------------ a user's file at a figure's path


@pytest.mark.parametrize("folder", ["grids", "heatmaps"])
def test_plot_refuses_to_replace_a_users_png_at_a_figures_path(folder: str, run_copy: Path, tmp_path: Path,
                                                              monkeypatch, capsys) -> None:
    path = sorted((run_copy / folder).glob("*.png"))[0]
    mine = users_png(path)
    code, err = dsl_in_process(["plot", str(run_copy)], tmp_path, monkeypatch, capsys)
    assert code == 2 and f"{path.name} {USERS}" in one_line(err), err
    assert path.read_bytes() == mine


def test_plot_still_replaces_dsls_own_figures(run_copy: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    path = sorted((run_copy / "grids").glob("*.png"))[0]
    before = path.stat().st_ino
    code, err = dsl_in_process(["plot", str(run_copy)], tmp_path, monkeypatch, capsys)
    assert code == 0, err
    assert path.stat().st_ino != before and is_dsl_png(path)  # written again (an atomic rename: a new inode)


def test_merge_refuses_to_replace_a_users_png_at_a_heatmaps_path(sweep_copy: Path, tmp_path: Path, monkeypatch,
                                                                capsys) -> None:
    path = sorted((sweep_copy / "heatmaps").glob("*.png"))[0]
    mine = users_png(path)
    code, err = dsl_in_process(["merge", str(sweep_copy)], tmp_path, monkeypatch, capsys)
    assert code == 2 and f"{path.name} {USERS}" in one_line(err), err
    assert path.read_bytes() == mine


# ------------------------------------------------------------------ CSVs cut short or edited


def test_plot_refuses_a_merged_csv_with_a_row_removed_and_merge_mends_it(sweep_copy: Path, tmp_path: Path,
                                                                         monkeypatch, capsys) -> None:
    csv_path = sweep_copy / "similarity.csv"
    lines = csv_path.read_text().splitlines(keepends=True)
    csv_path.write_text("".join(lines[:2] + lines[3:]))
    code, err = dsl_in_process(["plot", str(sweep_copy)], tmp_path, monkeypatch, capsys)
    line = one_line(err)
    assert code == 2 and f"{len(lines) - 2} rows where the merge wrote {len(lines) - 1}" in line, err
    assert f"`dsl merge {sweep_copy}` writes it again" in line
    code, err = dsl_in_process(["merge", str(sweep_copy)], tmp_path, monkeypatch, capsys)  # the advice works
    assert code == 0, err
    assert len(csv_path.read_text().splitlines()) == len(lines)
    code, err = dsl_in_process(["plot", str(sweep_copy)], tmp_path, monkeypatch, capsys)
    assert code == 0, err


def test_plot_refuses_a_merged_csv_with_a_row_repeated(sweep_copy: Path, tmp_path: Path, monkeypatch,
                                                       capsys) -> None:
    csv_path = sweep_copy / "similarity.csv"
    lines = csv_path.read_text().splitlines(keepends=True)
    csv_path.write_text("".join(lines[:2] + lines[1:2] + lines[3:]))  # as many rows, one of them twice
    code, err = dsl_in_process(["plot", str(sweep_copy)], tmp_path, monkeypatch, capsys)
    assert code == 2 and "has 2 rows" in one_line(err), err


@pytest.mark.parametrize("typed", ["nan", "inf", "-inf", "NaN", "abc"])
def test_plot_refuses_a_non_finite_score_typed_into_similarity_csv(typed: str, run_copy: Path, tmp_path: Path,
                                                                   monkeypatch, capsys) -> None:
    rows = read_csv(run_copy / "similarity.csv")
    rows[1]["sim_embed"] = typed
    CsvLog(run_copy / "similarity.csv", SIMILARITY.columns).rewrite(rows)
    code, err = dsl_in_process(["plot", str(run_copy)], tmp_path, monkeypatch, capsys)
    assert code == 2 and f"sim_embed '{typed}' is not a number" in one_line(err), err
    assert f"delete it, and `dsl run resume={run_copy}` writes it again" in one_line(err), err


@pytest.mark.parametrize("damage", ["a value edited", "the header deleted"])
def test_an_edited_csv_says_what_writes_it_again_and_that_does(damage: str, run_copy: Path, tmp_path: Path,
                                                              monkeypatch, capsys) -> None:
    """Edited rather than cut short, a CSV was refused with no way out (resume refused it too)."""
    path = run_copy / "similarity.csv"
    whole, lines = path.read_bytes(), path.read_text().splitlines(keepends=True)
    lines = lines[1:] if damage == "the header deleted" else [lines[0], lines[1].replace(",0.", ",x0.", 1), *lines[2:]]
    path.write_text("".join(lines))
    code, err = dsl_in_process(["report", str(run_copy)], tmp_path, monkeypatch, capsys)
    advice = f"delete it, and `dsl run resume={run_copy}` writes it again"
    assert code == 2 and one_line(err).endswith(advice), err
    path.unlink()
    assert dsl_in_process(["run", f"resume={run_copy}"], tmp_path, monkeypatch, capsys)[0] == 0
    assert path.read_bytes() == whole


def test_an_edited_value_in_a_merged_csv_names_the_merge_that_writes_it_again(sweep_copy: Path, tmp_path: Path,
                                                                               monkeypatch, capsys) -> None:
    path = sweep_copy / "similarity.csv"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join([lines[0], lines[1].replace(",head,", ",hxad,", 1), *lines[2:]]))
    code, err = dsl_in_process(["report", str(sweep_copy)], tmp_path, monkeypatch, capsys)
    assert code == 2 and f"the file was edited: `dsl merge {sweep_copy}` writes it again" in err, err
    assert dsl_in_process(["merge", str(sweep_copy)], tmp_path, monkeypatch, capsys)[0] == 0
    assert dsl_in_process(["report", str(sweep_copy)], tmp_path, monkeypatch, capsys)[0] == 0


def test_earlier_attempts_keep_dsls_keys_the_latest_hundred_and_never_refuse_a_folder(tmp_path: Path) -> None:
    """A record dsl carries but never reads: a damaged one is dropped, not a reason to refuse the run."""
    import json

    from dsl_cli.outputs import MAX_ATTEMPTS, Manifest, read_manifest

    path = tmp_path / "manifest.json"
    attempts = [{"started": str(n), "status": "interrupted", "blob": "x" * 10} for n in range(MAX_ATTEMPTS + 5)]
    path.write_text(json.dumps({"made_by": "dsl", "status": "interrupted", "started": "last",
                                "earlier_attempts": [*attempts, 7]}))
    manifest = Manifest(path)
    manifest.start(status="running", started="now")
    kept = json.loads(path.read_text())["earlier_attempts"]
    assert len(kept) == MAX_ATTEMPTS and kept[-1] == {"started": "last", "status": "interrupted"}
    assert all("blob" not in a for a in kept) and kept[0]["started"] == str(6)
    path.write_text(json.dumps({"made_by": "dsl", "status": "complete", "earlier_attempts": "damaged"}))
    assert read_manifest(tmp_path)["status"] == "complete"
    Manifest(path).start(status="running", started="again")
    assert "earlier_attempts" not in json.loads(path.read_text())


def test_empty_cells_and_a_correlations_nan_still_read(tmp_path: Path) -> None:
    """dsl writes an undefined number as an empty cell (sim_decoded of a component not decoded), and
    correlations.csv holds the nan of a correlation of constant scores: both are dsl's, not edits."""
    CsvLog(tmp_path / "similarity.csv", SIMILARITY.columns).rewrite([
        {"image": "a", "lens": "steering", "component": "L01H00", "layer": 1, "head": 0, "kind": "head",
         "sim_embed": 0.5}])
    assert read_csv(tmp_path / "similarity.csv")[0]["sim_decoded"] is None
    CsvLog(tmp_path / "correlations.csv", CORRELATIONS.columns).rewrite([
        {"ablation": "mean", "image": "pooled", "lens": "dsl", "n": 3, "spearman": float("nan")}])
    assert read_csv(tmp_path / "correlations.csv", CORRELATIONS)[0]["spearman"] != 0  # nan, read as it is


@pytest.mark.parametrize("kept", [1, 3])  # the header alone; the header and two of the four heads
def test_plot_refuses_a_patches_csv_cut_short(kept: int, run_copy: Path, tmp_path: Path, monkeypatch,
                                              capsys) -> None:
    """patches.csv (where each head looks) cut short: the looks figure left the heads out without a word."""
    path = run_copy / "patches.csv"
    lines = path.read_text().splitlines(keepends=True)
    assert len(lines) == 9  # a row per head of layer 1 and image
    path.write_text("".join(lines[:kept]))
    code, err = dsl_in_process(["plot", str(run_copy)], tmp_path, monkeypatch, capsys)
    assert code == 2 and re.search(r"patches.csv: astronaut steering L01H0\d has 0 rows, not 1; the file was cut "
                                   "short or edited", one_line(err)), err
