"""Sweeps: image shards."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf
from PIL import Image

from dsl_cli.config import ImagesConfig
from dsl_cli.errors import UserError
from dsl_cli.images import load_images


# ---------------------------------------------------------------- image shards


def test_image_shards_are_disjoint_stable_and_cover_the_set(tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    for index, name in enumerate(["a.png", "a.jpg", "b.png", "c.png", "d.png", "e.png", "f.png"]):
        Image.new("RGB", (32, 32), (index * 30, 0, 0)).save(folder / name)
    cfg = OmegaConf.structured(ImagesConfig(source="folder", path=str(folder)))
    whole = [(item.name, item.source) for item in load_images(cfg).images]
    assert len({name for name, _ in whole}) == 7  # the two `a` files keep distinct names
    for count in range(1, 8):
        shards = []
        for index in range(count):
            cfg.shard, cfg.num_shards = index, count
            shards.append([(item.name, item.source) for item in load_images(cfg).images])
            assert [(i.name, i.source) for i in load_images(cfg).images] == shards[-1]  # stable
        together = [item for shard in shards for item in shard]
        assert sorted(together) == sorted(whole), count  # every image once: no overlap, no gap


@pytest.mark.parametrize(("shard", "count", "fragment"), [
    (3, 3, "images.shard=3: must be between 0 and"), (None, 2, "needs images.shard"),
    (0, 0, "images.num_shards=0"), (5, 6, "holds no image"),
])
def test_bad_shard_settings_are_refused(shard, count, fragment) -> None:
    cfg = OmegaConf.structured(ImagesConfig(source="samples", shard=shard, num_shards=count))
    with pytest.raises(UserError, match=fragment):
        load_images(cfg)
