"""Paths as a user types them: `~` in every path value, paths Hydra's grammar refuses unquoted, and a path
given without `images=folder`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from diffusers import KandinskyV22Pipeline
from PIL import Image

from dsl_cli.config import DecoderConfig, EncoderConfig, ImagesConfig, path_override
from dsl_cli.decoder import load_decoder
from dsl_cli.encoder import load_encoder
from dsl_cli.errors import UserError
from dsl_cli.images import load_images
from helpers import dsl_in_process

@pytest.fixture
def home(tmp_path: Path, monkeypatch) -> Path:
    """A home folder with two photo folders, one whose name Hydra's grammar refuses unquoted."""
    home = tmp_path / "home"
    for folder, color in (("photos", "red"), ("my photos (2)", "blue")):
        (home / folder).mkdir(parents=True)
        Image.new("RGB", (80, 60), color).save(home / folder / f"{color}.png")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)  # dsl_run changes into home; this puts the folder back afterwards
    return home


def dsl_run(home: Path, *args: str) -> int:
    """`dsl run ARGS` as typed without a shell (so nothing expands `~` but dsl), in `home`, in this process."""
    from dsl_cli import cli

    os.chdir(home)
    try:
        return cli.main(["run", *args])
    except SystemExit as exit_:
        return exit_.code


def test_tilde_and_odd_paths_work_as_typed(home: Path) -> None:
    assert dsl_run(home, "debug=tiny", "images.path=~/photos", "decode.enabled=false", "hydra.run.dir=~/runs/a") == 0
    manifest = json.loads((home / "runs" / "a" / "manifest.json").read_text())
    assert manifest["images"] == ["red"]  # images.path alone selects the folder, not the sample photos
    assert manifest["config"]["images"]["path"] == str(home / "photos")
    assert not (home / "~").exists()

    assert dsl_run(home, "debug=tiny", "images=folder", "images.path=~/my photos (2)", "decode.enabled=false",
                   "hydra.run.dir=~/runs/b") == 0
    assert json.loads((home / "runs" / "b" / "manifest.json").read_text())["images"] == ["blue"]

    assert dsl_run(home, "resume=~/runs/b") == 0  # a finished run: nothing left to do, and no error
    assert json.loads((home / "runs" / "b" / "manifest.json").read_text())["status"] == "complete"


def test_tilde_in_model_paths(home: Path, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=32, patch_size=16, projection_dim=16)
    transformers.CLIPVisionModelWithProjection(config).save_pretrained(home / "encoder")
    encoder, _ = load_encoder(EncoderConfig(source="kandinsky_prior", checkpoint="~/encoder"))
    assert encoder.n_layers == 1

    tiny = load_decoder(DecoderConfig(source="tiny")).pipe
    KandinskyV22Pipeline(unet=tiny.unet, movq=tiny.movq, scheduler=tiny.scheduler).save_pretrained(home / "decoder")
    assert load_decoder(DecoderConfig(source="pretrained", path="~/decoder")).embed_dim == 32


def test_a_path_given_is_used(home: Path) -> None:
    assert [i.name for i in load_images(ImagesConfig(path="~/photos")).images] == ["red"]
    assert len(load_images(ImagesConfig()).images) == 5  # no path: the sample photos
    with pytest.raises(UserError, match="give one of them"):
        load_images(ImagesConfig(path="~/photos", names=["coffee"]))


def test_a_path_holding_a_comma_is_one_path_in_a_run_and_in_a_sweep(home: Path, capsys) -> None:
    """`images.path=~/c,d` (a folder that exists): Hydra read the comma as a sweep, refused in several lines
    without --multirun and, with it, ran two jobs on `~/c` and `d` that did not exist."""
    (home / "c,d").mkdir()
    Image.new("RGB", (40, 30), "green").save(home / "c,d" / "green.png")
    fast = ["debug=tiny", "decode.enabled=false", "layer=1", "images.path=~/c,d"]
    assert dsl_run(home, *fast, "hydra.run.dir=~/runs/one") == 0
    assert json.loads((home / "runs" / "one" / "manifest.json").read_text())["config"]["images"]["path"] == str(
        home / "c,d")
    assert dsl_run(home, "-m", *fast, "hydra.sweep.dir=~/runs/sweep") == 0
    manifest = json.loads((home / "runs" / "sweep" / "manifest.json").read_text())
    assert [job["overrides"][-1] for job in manifest["jobs"]] == [f"images.path='{home / 'c,d'}'"]  # one job
    capsys.readouterr()


def test_a_comma_path_that_may_also_mean_a_sweep_is_refused_only_in_a_sweep(home: Path, monkeypatch) -> None:
    """`c,d` where the folders c, d and c,d all exist: one path in a run (nothing else it can mean); in a
    --multirun either, so refused with both spellings rather than guessed."""
    for name in ("c", "d", "c,d"):
        (home / name).mkdir()
    monkeypatch.chdir(home)
    assert path_override("images.path=c,d") == f"images.path='{home}/c,d'"
    with pytest.raises(UserError, match=r"names one path and, as a sweep, 2 paths .* images.path='choice\(c,d\)'"):
        path_override("images.path=c,d", sweep=True)
    assert path_override(f"images.path={home}/c,{home}/d", sweep=True) == f"images.path={home}/c,{home}/d"
    assert path_override("hydra.run.dir=out/a,b") == "hydra.run.dir='out/a,b'"  # a folder to make: never a sweep


@pytest.mark.parametrize("override", ["layer=1,2", "images.path=/no/such/c,d", "seed=range(0,3)"])
def test_a_sweep_without_multirun_is_one_line_and_status_2(override: str, tmp_path: Path, monkeypatch,
                                                          capsys) -> None:
    code, err = dsl_in_process(["run", "debug=tiny", override], tmp_path, monkeypatch, capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"dsl: error: {override}: a comma or range() sweeps several values, which only "), err


def test_the_guides_examples_of_image_names_are_the_names_given(tmp_path: Path) -> None:
    """The user guide said only characters other than letters, digits, `_`, `.` and `-` bring a hash, but
    `-dash.png` is `dash-2a75a154` (ends are stripped), and its `a b.png` example showed a hash no file gets."""
    import re

    from dsl_cli.images import unique_names

    guide = (Path(__file__).parents[1] / "docs" / "user-guide.md").read_text()
    examples = dict(re.findall(r"`([^`/]+\.png)` -> `([^`]+)`", " ".join(guide.split())))
    assert {"a b.png", "-dash.png"} <= set(examples), examples
    files = [tmp_path / name for name in examples]
    assert dict(zip(examples, unique_names(files, tmp_path))) == examples
