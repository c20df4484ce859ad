"""What `dsl run resume=`, `dsl report` and `dsl plot` check in a complete run's folder before they take its files
as the run's: a picture of the user's in place of a result is refused in one line (by resume before any model
loads, the run left complete), and a table beside similarity.csv cut short is refused by report as by plot, both
naming the resume that writes it again."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from dsl_cli import run as run_module
from helpers import dsl_here, dsl_in_process
from test_trust import one_line, snapshot

# the logit lens (labels.csv) on one head and the residual stream of one image, decode.seeds=2 (seeds.csv, and
# baselines.csv's pictures): every table a run writes beside similarity.csv, 8 pictures, in batches of 2
EXTRAS = ["debug=tiny", "lens=logit", "layer=1", "head=0", "images.limit=1", "decode.seeds=2", "decode.batch_size=2"]
PICTURES = {"input": "images/astronaut/input.png", "decoded": "images/astronaut/logit/L01H00.png",
            "seed": "images/astronaut/logit/seed1/L01H00.png", "baseline": "images/_baselines/logit/seed1/mean.png"}


@pytest.fixture(scope="module")
def extras_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("extras")
    assert dsl_here(["run", *EXTRAS, f"hydra.run.dir={root / 'run'}"], root) == 0
    return root / "run"


@pytest.fixture
def extras_copy(extras_run: Path, tmp_path: Path) -> Path:
    shutil.copytree(extras_run, tmp_path / "run")
    return tmp_path / "run"


def users_picture(path: Path) -> None:
    """A PNG of the user's (no `Software: dsl` text inside) in place of dsl's picture at `path`."""
    assert path.is_file(), path
    Image.new("RGB", (10, 10), "red").save(path)


def without_log(files: dict[str, bytes]) -> dict[str, bytes]:
    """A folder's snapshot but its dsl.log (Hydra's log of each attempt, appended to)."""
    return {name: data for name, data in files.items() if name != "dsl.log"}


# ------------------------------------------------------------------ a picture of the user's in place of a result


@pytest.mark.parametrize("which", list(PICTURES))
def test_resume_refuses_a_users_picture_before_any_model_and_the_run_stays_complete(
        which: str, extras_copy: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    """Refused before the classifier or the encoder loads, and before the attempt's record starts: the manifest
    (status complete) and every other file stay as they were."""
    picture = extras_copy / PICTURES[which]
    users_picture(picture)
    before = without_log(snapshot(extras_copy))

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(run_module, "load_encoder", no_model)
    monkeypatch.setattr(run_module, "_prepare", no_model)
    code, err = dsl_in_process(["run", f"resume={extras_copy}"], tmp_path, monkeypatch, capsys)
    assert code == 2, err[-3000:]
    assert one_line(err) == f"dsl: error: {picture} is not a picture dsl made; move it away and run the command again"
    assert without_log(snapshot(extras_copy)) == before
    assert json.loads((extras_copy / "manifest.json").read_text())["status"] == "complete"


@pytest.mark.parametrize("which", ["input", "decoded"])
def test_report_refuses_a_users_picture_that_its_page_would_show_as_the_runs(
        which: str, extras_copy: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    picture = extras_copy / PICTURES[which]
    users_picture(picture)
    before = snapshot(extras_copy)
    code, err = dsl_in_process(["report", str(extras_copy)], tmp_path, monkeypatch, capsys)
    assert code == 2 and one_line(err) == (f"dsl: error: {picture} is not a picture dsl made; move it away and "
                                           f"`dsl run resume={extras_copy}` makes it again"), err
    assert snapshot(extras_copy) == before


# ------------------------------------------------------------------ a table cut short


@pytest.mark.parametrize("table", ["labels", "seeds", "baselines", "patches"])
def test_a_table_cut_short_is_refused_by_report_and_plot_and_the_resume_they_name_writes_it_again(
        table: str, extras_run: Path, extras_copy: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    """labels.csv and patches.csv are written whole by each attempt, seeds.csv and baselines.csv by decoding again
    the pictures whose rows are missing: `dsl run resume=` gives back the uninterrupted run's file."""
    path = extras_copy / f"{table}.csv"
    path.write_text(path.read_text().splitlines(keepends=True)[0])  # the header alone
    before = snapshot(extras_copy)
    for command in ("report", "plot"):
        code, err = dsl_in_process([command, str(extras_copy)], tmp_path, monkeypatch, capsys)
        line = one_line(err)
        assert code == 2 and line.startswith(f"dsl: error: {path}: astronaut logit ") and line.endswith(
            f"the file was cut short or edited: `dsl run resume={extras_copy}` writes it again"), (command, line)
        assert snapshot(extras_copy) == before
    code, err = dsl_in_process(["run", f"resume={extras_copy}"], tmp_path, monkeypatch, capsys)
    assert code == 0, err[-3000:]
    assert path.read_bytes() == (extras_run / f"{table}.csv").read_bytes()
