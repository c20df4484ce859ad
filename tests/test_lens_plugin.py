"""A lens defined here alone, registered, and run end to end through `dsl run`: adding a lens needs no
change to dsl_cli/ (one class, a config, a test). Oracle: cos(-v, e) = -cos(v, e), against the direct lens."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from dsl_cli import cli, lenses


class NegatedDirect(lenses.DirectLens):
    """The direct lens, negated: every embedding points the other way."""

    name = "negated_direct"
    columns = ("mode",)

    def embeddings(self, encoder, cache, components):
        return -super().embeddings(encoder, cache, components)

    def row(self) -> dict:
        return {"mode": "negated"}


@pytest.fixture
def registered():
    lenses.register(NegatedDirect)
    yield
    del lenses.LENSES[NegatedDirect.name]


def rows_of(folder: Path) -> list[dict]:
    with open(folder / "similarity.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_a_lens_from_outside_runs_end_to_end(registered, tmp_path: Path) -> None:
    common = ["run", "debug=tiny", "layer=1", "component=all", "images.limit=2", "lens=direct"]
    assert cli.main([*common, f"hydra.run.dir={tmp_path / 'direct'}"]) == 0
    assert cli.main([*common, "lens.name=negated_direct", f"hydra.run.dir={tmp_path / 'negated'}"]) == 0
    direct, negated = rows_of(tmp_path / "direct"), rows_of(tmp_path / "negated")
    assert [(r["image"], r["component"]) for r in negated] == [(r["image"], r["component"]) for r in direct]
    assert len(negated) == 2 * 5  # two images, four heads and the MLP of layer 1
    for mine, theirs in zip(negated, direct):
        assert mine["lens"] == "negated_direct" and mine["mode"] == "negated"
        assert float(mine["sim_embed"]) == pytest.approx(-float(theirs["sim_embed"]), abs=1e-6)
        assert float(mine["norm"]) == pytest.approx(float(theirs["norm"]), rel=1e-6)
        assert mine["file"] == f"images/{mine['image']}/negated_direct/{mine['component']}.png"
        assert (tmp_path / "negated" / mine["file"]).is_file()
    assert sorted((tmp_path / "negated" / "heatmaps").iterdir())[0].name.endswith("_negated_direct.png")


class Recording(lenses.DirectLens):
    """The direct lens, keeping what the run hands its `values`."""

    name = "recording_direct"
    seen: list = []

    def values(self, encoder, cache, components, embeds):
        self.seen.append((encoder, cache, list(components), embeds))
        return {}


def test_a_lens_values_get_the_runs_encoder_cache_components_and_its_own_embeddings(tmp_path: Path) -> None:
    from dsl_cli.encoder import HookedEncoder

    lenses.register(Recording)
    try:
        assert cli.main(["run", "debug=tiny", "layer=2", "component=all", "images.limit=2", "decode.enabled=false",
                         "lens.name=recording_direct", f"hydra.run.dir={tmp_path}"]) == 0
    finally:
        del lenses.LENSES[Recording.name]
    (encoder, cache, components, embeds), = Recording.seen
    assert isinstance(encoder, HookedEncoder) and cache.embeds.shape == (2, encoder.d_embed)
    assert [c.label for c in components] == [r["component"] for r in rows_of(tmp_path)[:5]]
    assert [c.label for c in components] == ["L02H00", "L02H01", "L02H02", "L02H03", "L02MLP"]
    torch.testing.assert_close(embeds, encoder.direct(cache, components))


def test_an_unknown_lens_is_refused_naming_the_registered_ones(tmp_path: Path, capsys) -> None:
    try:
        code = cli.main(["run", "debug=tiny", "images.limit=1", "lens.name=nothing", f"hydra.run.dir={tmp_path / 'r'}"])
    except SystemExit as stop:  # Hydra's app ends a refused single run with sys.exit
        code = stop.code
    assert code == 2
    assert "lens='nothing': choose one of diffusion, direct, steering, logit, attribution" in capsys.readouterr().err
