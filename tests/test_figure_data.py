"""The figures a researcher reads in the first hour, checked on what they are drawn from: the legend says only
what the captions show, heatmaps drawn together share their colour scales (a run's images, a sweep's jobs),
titles name the encoder and decoder, the logit-lens chart stays a readable height at bigG's size, and the
"where each head looks" strips have a colour bar."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dsl_cli import figures as fig_module
from dsl_cli.figures import caption_note, heatmap_figure, label_bars, models_text, shared_limits
from dsl_cli.outputs import save_png
from test_figures import rows_of


def captured(monkeypatch, name: str) -> list:
    """Calls of figures.`name` (grid_image or save_figure) recorded, the real function still called for
    grid_image; figures are not saved."""
    calls: list = []
    real = getattr(fig_module, name)
    if name == "save_figure":
        monkeypatch.setattr(fig_module, name, lambda fig, path: calls.append((fig, path)))
    else:
        monkeypatch.setattr(fig_module, name, lambda *a, **kw: calls.append((a, kw)) or real(*a, **kw))
    return calls


def pictures_for(folder: Path, rows: list[dict]) -> None:
    for path in {folder / r["file"] for r in rows} | {folder / f"images/{r['image']}/input.png" for r in rows}:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_png(path, Image.new("RGB", (8, 8), "red"))  # as a run writes them (dsl's tag)


def write_manifest(folder: Path, encoder: dict, decoder: dict, decode: bool = True) -> None:
    config = {"encoder": encoder, "decoder": decoder, "decode": {"enabled": decode}, "lens": {}, "study": {},
              "images": {}}
    (folder / "manifest.json").write_text(json.dumps({"made_by": "dsl", "status": "complete", "config": config}))


# ---------------------------------------------------------------- the grids' legend


def test_the_legend_speaks_of_a_label_line_only_where_captions_have_one(tmp_path: Path, monkeypatch) -> None:
    rows = rows_of([1], 3)
    assert "ImageNet" not in caption_note(rows)
    labelled = [r | {"labels": "tabby 0.31; tiger cat 0.29"} for r in rows]
    assert "last line: the top ImageNet label" in caption_note(labelled)

    pictures_for(tmp_path, rows)
    grids = captured(monkeypatch, "grid_image")
    fig_module.draw_grids(tmp_path, rows)
    fig_module.draw_grids(tmp_path, labelled)
    notes = [kw["note"] for _, kw in grids]
    assert notes and all(("ImageNet" in note) == (n >= len(notes) // 2) for n, note in enumerate(notes))


def test_a_logit_lens_grid_names_each_components_top_label_from_labels_csv(tmp_path: Path, monkeypatch) -> None:
    """The logit lens's point is each component's label (labels.csv); its grids showed the pictures and
    scores alone. The caption's last line is the rank-1 label of that component, whatever the file's order."""
    rows = rows_of([1, 2], 3, ("resid",), lens="logit")
    labels = [{"image": "chelsea", "lens": "logit", "component": r["component"], "rank": rank,
               "label": f"{r['component']} label {rank}", "score": 0.5 - rank / 10} for r in rows for rank in (2, 1)]
    pictures_for(tmp_path, rows)
    grids = captured(monkeypatch, "grid_image")
    fig_module._draw_job(tmp_path, "chelsea", rows, {"labels": labels, "seeds": None, "baselines": None,
                                                     "patches": None})
    captions = [caption for (tiles, *_), _ in grids for _, caption in tiles[1:]]
    assert captions and all(c.endswith(f"{c.split()[0]} label 1") for c in captions), captions
    assert all("last line: the top ImageNet label" in kw["note"] for _, kw in grids)
    own = [r | {"labels": "tabby 0.31; tiger cat 0.29"} for r in rows]  # lens.text's labels are kept
    assert {r["labels"] for r in fig_module.with_logit_labels(own, labels)} == {"tabby 0.31; tiger cat 0.29"}


def test_an_attribution_grid_shows_each_parts_share_and_says_what_it_is(tmp_path: Path, monkeypatch) -> None:
    """The attribution lens's column is the share of cos(embedding, target); its grids showed the scores
    alone. Every caption shows its own row's share; only such a grid's legend speaks of shares."""
    rows = [r | {"lens": "attribution", "attribution": round(0.01 * (n + 1), 3)}
            for n, r in enumerate(rows_of([1], 3, ("mlp",)))]
    pictures_for(tmp_path, rows)
    grids = captured(monkeypatch, "grid_image")
    fig_module.draw_grids(tmp_path, rows)
    captions = {caption.split()[0]: caption for (tiles, *_), _ in grids for _, caption in tiles[1:]}
    assert captions and all(f"share {r['attribution']:.3f}" in captions[r["component"]] for r in rows), captions
    assert all("share = attribution" in kw["note"] for _, kw in grids)
    assert "share" not in caption_note(rows_of([1], 3))


# ---------------------------------------------------------------- heatmaps: one scale for figures drawn together


def clims(fig) -> dict[tuple[str, str], tuple[float, float]]:
    """(similarity, kind) -> (vmin, vmax) of each coloured block of a heatmap figure."""
    found = {}
    for axis in fig.axes:
        for image in axis.get_images():
            value = "sim_embed" if "sim_embed" in axis.get_figure().get_suptitle() else "sim_decoded"
            found[value, axis.get_title()] = (image.norm.vmin, image.norm.vmax)
    return found


def test_the_heatmaps_of_a_run_share_their_colour_scales(tmp_path: Path, monkeypatch) -> None:
    """Two images whose heads lie in different ranges: both figures are coloured on the range of both."""
    cat = rows_of([0, 1, 2], 4, ("mlp",))
    dog = [r | {"image": "dog", "sim_embed": r["sim_embed"] + 0.5} for r in rows_of([0, 1, 2], 4, ("mlp",))]
    figures = captured(monkeypatch, "save_figure")
    fig_module.draw_heatmaps(tmp_path, cat + dog)
    assert len(figures) == 2
    first, second = (clims(fig) for fig, _ in figures)
    assert first == second
    heads = [r["sim_embed"] for r in cat + dog if r["kind"] == "head"]
    assert first["sim_embed", "heads"] == pytest.approx((min(heads), max(heads)))


def test_a_sweep_s_heatmaps_are_titled_with_the_values_as_typed(tmp_path: Path, monkeypatch) -> None:
    """Swept paths that sanitise alike get file tags of their own, and titles with the paths as typed (the
    titles showed the tags: `images.path=_a_b` for both)."""
    from dsl_cli import sweeps

    rows = [r | {"job": job, "override.images.path": path} for job, path in enumerate(["/a/b", "/a_b"])
            for r in rows_of([0, 1], 3)]
    monkeypatch.setattr(sweeps, "read_merged", lambda folder: rows)
    monkeypatch.setattr(sweeps, "draw_lens_comparison", lambda folder, rows: [])
    titles, real = [], fig_module.heatmap_figure
    monkeypatch.setattr(fig_module, "heatmap_figure", lambda group, title, *args: titles.append(title) or real(
        group, title, *args))
    drawn = sweeps.draw_sweep(tmp_path)
    assert len(set(drawn)) == len(drawn) == 2 and not any("/a" in path.name for path in drawn), drawn
    assert sorted(title.split(" | ")[1] for title in titles) == ["images.path=/a/b", "images.path=/a_b"], titles


def test_a_sweep_colours_every_job_on_one_scale(tmp_path: Path, monkeypatch) -> None:
    """The heatmaps of a sweep's values (lens.alpha=1 and 4 here) are drawn with the limits of all its rows."""
    from dsl_cli import sweeps

    low = [r | {"job": 0, "override.lens.alpha": "1"} for r in rows_of([0, 1], 3)]
    high = [r | {"job": 1, "override.lens.alpha": "4", "sim_embed": r["sim_embed"] * 3} for r in rows_of([0, 1], 3)]
    monkeypatch.setattr(sweeps, "read_merged", lambda folder: low + high)
    given = []
    monkeypatch.setattr(sweeps, "draw_heatmaps", lambda folder, rows, tag="", limits=None, values="", model_dirs=():
                        given.append(limits) or [])
    monkeypatch.setattr(sweeps, "draw_lens_comparison", lambda folder, rows: [])
    sweeps.draw_sweep(tmp_path)
    assert len(given) == 2 and given[0] == given[1] == shared_limits(low + high)


def test_shared_limits_keep_each_kind_on_its_own_scale() -> None:
    rows = rows_of([0, 1], 4, ("mlp", "resid"))
    limits = shared_limits(rows)
    for kind, name in (("head", "heads"), ("mlp", "MLP"), ("resid", "resid")):
        values = [r["sim_embed"] for r in rows if r["kind"] == kind]
        assert limits["sim_embed", name] == pytest.approx((min(values), max(values)))
    fig = heatmap_figure(rows, "title", limits)
    assert clims(fig)["sim_embed", "heads"] == pytest.approx(limits["sim_embed", "heads"])


# ---------------------------------------------------------------- titles name the models


@pytest.mark.parametrize(("encoder", "decoder", "expected"), [
    ({"source": "tiny", "name": "tiny"}, {"family": "kandinsky22", "source": "tiny"}, "tiny encoder -> kandinsky22 (tiny)"),
    ({"source": "kandinsky_prior", "name": "ViT-bigG-14"}, {"family": "kandinsky22", "source": "pretrained"},
     "ViT-bigG-14 (Kandinsky 2.2 prior) -> kandinsky22"),
    ({"source": "open_clip", "name": "ViT-L-14", "pretrained": "openai"},
     {"family": "kandinsky21", "source": "pretrained"}, "ViT-L-14 (openai) -> kandinsky21"),
    ({"source": "open_clip", "name": "ViT-H-14", "pretrained": None}, {"family": "unclip_h14", "source": "random"},
     "ViT-H-14 (random weights) -> unclip_h14 (random)"),
    # a local transformers folder is named by its folder, not by the preset's default repo_id
    ({"source": "hf", "name": "hf", "repo_id": "facebook/dinov2-base", "checkpoint": "/data/my-clip/",
      "pretrained": "hub"}, {"family": "kandinsky22", "source": "tiny"}, "hf my-clip (local weights) -> kandinsky22 (tiny)"),
    ({"source": "hf", "name": "hf", "repo_id": "facebook/dinov2-base", "pretrained": "hub"},
     {"family": "kandinsky22", "source": "tiny"}, "hf facebook/dinov2-base (hub) -> kandinsky22 (tiny)"),
])
def test_titles_name_the_encoder_and_decoder(encoder: dict, decoder: dict, expected: str, tmp_path: Path,
                                             monkeypatch) -> None:
    write_manifest(tmp_path, encoder, decoder)
    assert models_text(tmp_path) == expected
    rows = rows_of([1], 2)
    pictures_for(tmp_path, rows)
    grids, figures = captured(monkeypatch, "grid_image"), captured(monkeypatch, "save_figure")
    fig_module.draw_grids(tmp_path, rows)
    fig_module.draw_heatmaps(tmp_path, rows)
    assert grids and all(expected in args[1] for args, _ in grids)
    assert figures and all(expected in " ".join(fig.get_suptitle().split()) for fig, _ in figures)  # wrapped


def test_a_run_that_decodes_nothing_names_no_decoder(tmp_path: Path) -> None:
    write_manifest(tmp_path, {"source": "tiny", "name": "tiny"}, {"family": "kandinsky22", "source": "tiny"}, False)
    assert models_text(tmp_path) == "tiny encoder"


# ---------------------------------------------------------------- the logit lens at bigG's size


def bigg_label_rows() -> list[dict]:
    """Top-label rows of one image for bigG's residual stream (49) and every head and MLP (816)."""
    rng = np.random.default_rng(0)
    names = ["embed"] + [f"L{l:02d}" for l in range(48)]
    names += [f"L{l:02d}H{h:02d}" for l in range(48) for h in range(16)] + [f"L{l:02d}MLP" for l in range(48)]
    return [{"image": "chelsea", "lens": "logit", "component": c, "rank": 1, "label": "tabby cat",
             "score": float(rng.uniform(-0.1, 0.4))} for c in names]


def test_the_logit_lens_chart_is_capped_in_height_and_keeps_the_stream(tmp_path: Path, monkeypatch) -> None:
    rows = bigg_label_rows()
    bars = label_bars(rows)
    assert len(bars) == fig_module.MAX_LABEL_BARS
    stream = [r["component"] for r in rows[:49]]
    assert [r["component"] for r in bars[:49]] == stream  # the stream first, in layer order
    others = [r for r in rows[49:] if r in bars]
    assert min(r["score"] for r in others) >= max(r["score"] for r in rows[49:] if r not in bars)
    figures = captured(monkeypatch, "save_figure")
    fig_module.draw_label_plots(tmp_path, rows)
    (fig, _), = figures
    assert fig.get_size_inches()[1] <= 20  # was about 229 inches
    fig.canvas.draw()
    axis = fig.axes[0]
    label = axis.xaxis.label.get_window_extent()
    assert label.y0 >= 0, "the x label is cut off at the bottom"
    assert "64 of 865 components" in fig.get_suptitle()  # the figure's title, wrapped: the axis's ran off it


def test_a_short_logit_lens_chart_shows_every_component() -> None:
    rows = bigg_label_rows()[:12]
    assert label_bars(rows) == rows


# ---------------------------------------------------------------- where each head looks


def test_where_each_head_looks_has_one_colour_bar_for_every_head(tmp_path: Path) -> None:
    (tmp_path / "images" / "chelsea").mkdir(parents=True)
    save_png(tmp_path / "images" / "chelsea" / "input.png", Image.new("RGB", (64, 64), "white"))
    rng = np.random.default_rng(0)
    heads = [({"component": f"L01H{h:02d}", "grid": 4,
               "shares": ";".join(f"{v:.4f}" for v in rng.normal(0, 0.1 * (h + 1), 16))}, None) for h in range(3)]
    fig = fig_module.looks_figure(tmp_path, "chelsea", heads, "title")
    assert len(fig.images) == 3  # a panel per head (no decoded pictures here)
    limit = max(float(np.abs(fig_module.share_grid(p)).max()) for p, _ in heads)
    for shown, (patch_row, _) in zip(fig.images, heads):  # every head on the one scale
        panel = np.asarray(shown.get_array())
        white = Image.new("RGB", (panel.shape[1], panel.shape[0]), "white")
        assert (panel == np.asarray(fig_module.look_panel(white, fig_module.share_grid(patch_row), limit))).all()
    (bar,) = fig.axes  # the panels are pixels, not axes: the colour bar is the only one
    assert "share of the head's write" in bar.get_ylabel() and bar.get_ylim() == pytest.approx((-limit, limit))
    assert sorted(t.get_text() for t in fig.texts if t.get_text() != fig.get_suptitle()) == [
        f"L01H{h:02d}: where it looks" for h in range(3)] + ["not decoded"] * 3  # no picture beside any head


@pytest.mark.parametrize("decoded", [True, False])
def test_where_each_head_looks_promises_a_picture_only_where_one_was_decoded(decoded: bool, tmp_path: Path,
                                                                             monkeypatch) -> None:
    rows = rows_of([1], 2)
    rows = rows if decoded else [r | {"file": ""} for r in rows]
    pictures_for(tmp_path, [r for r in rows_of([1], 2)])
    patches = [{"image": "chelsea", "lens": "steering", "component": r["component"], "grid": 2,
                "shares": "0.1;0.2;-0.1;0.3"} for r in rows]
    figures = captured(monkeypatch, "save_figure")
    fig_module.draw_looks(tmp_path, rows, patches)
    ((fig, _),) = figures
    title = " ".join(fig.get_suptitle().split())  # wrapped to the figure's width
    assert ("its steering lens picture" in title) == decoded, title
    assert ("nothing decoded" in title) != decoded


def test_a_look_panel_colours_each_patch_on_the_shared_scale() -> None:
    """A 2 x 2 grid over a white 40 x 40 picture: the patch at the scale's top is red, at its bottom blue, at 0
    the picture under coolwarm's grey middle; a share of half the scale, paler red. Patches are blocks."""
    from matplotlib import colormaps

    shares = np.array([[0.2, -0.2], [0.0, 0.1]])
    panel = np.asarray(fig_module.look_panel(Image.new("RGB", (40, 40), "white"), shares, limit=0.2)).astype(float)
    colour = lambda v: np.array(colormaps["coolwarm"]((v + 1) / 2)[:3]) * 255  # noqa: E731
    expected = {(5, 5): colour(1.0), (5, 35): colour(-1.0), (35, 5): colour(0.0), (35, 35): colour(0.5)}
    for (y, x), rgb in expected.items():
        assert panel[y, x] == pytest.approx(0.45 * 255 + 0.55 * rgb, abs=1.5), (y, x)
    assert (panel[:20, :20] == panel[0, 0]).all() and (panel[20:, 20:] == panel[39, 39]).all()
    assert panel[5, 5, 0] > panel[5, 5, 2] and panel[5, 35, 2] > panel[5, 35, 0]  # red above 0, blue below


def test_a_share_that_is_not_a_number_leaves_its_patch_and_the_scale_alone() -> None:
    """A head whose write is zero has shares 0/0: its patches show the picture as it is, and the colour scale
    is the other shares' (a NaN scale made every panel black)."""
    shares = np.array([[np.nan, 0.2], [-0.1, 0.0]])
    picture = Image.new("RGB", (40, 40), (10, 200, 30))
    panel = np.asarray(fig_module.look_panel(picture, shares, limit=fig_module.share_limit([shares])))
    assert (panel[:20, :20] == (10, 200, 30)).all()  # the NaN patch
    assert not (panel[:20, 20:] == (10, 200, 30)).all(axis=-1).any()  # the others coloured
    assert fig_module.share_limit([shares, np.full((2, 2), np.nan)]) == pytest.approx(0.2)
    assert fig_module.share_limit([np.zeros((2, 2)), np.full((2, 2), np.nan)]) == 1.0
