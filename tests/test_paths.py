"""Paths as a user types them: `~` in every path value, paths Hydra's grammar refuses unquoted, and a path
given without `images=folder`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from diffusers import KandinskyV22Pipeline
from PIL import Image

from dsl_cli.config import DecoderConfig, EncoderConfig, ImagesConfig
from dsl_cli.decoder import load_decoder
from dsl_cli.encoder import load_encoder
from dsl_cli.errors import UserError
from dsl_cli.images import load_images

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
