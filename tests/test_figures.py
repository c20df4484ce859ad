"""Regression tests for the figures' flaws (issue 18): captions that ran into the next cell, titles without
settings, heatmaps with one colour scale for every kind of component, `L1` for `L01`, strips without
values, a meaningless colour bar, duplicated grids, a DSL curve hidden under the greedy one, a legend on
the random band, correlations that did not say they were pooled. Measured on what is drawn: the pixels of
a grid, the text artists and images of a matplotlib figure."""

from __future__ import annotations

import math
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageChops
from scipy import stats

from dsl_cli import figures
from dsl_cli.figures import POOLED, SCORES, plot_head_importance, plot_overlay_removal
from dsl_cli.figures import grid_image, grid_plan, heatmap_figure, settings_text
from dsl_cli.outputs import save_png
from dsl_cli.correlation import correlations

TILE = 96
RED = (255, 0, 0)


# ---------------------------------------------------------------- grids


def ink_box(sheet: Image.Image, blank: Image.Image) -> tuple[int, int, int, int] | None:
    """Bounding box (x0, y0, x1, y1) of the pixels where `sheet` differs from `blank`."""
    return ImageChops.difference(sheet, blank).getbbox()


def colour(index: int) -> tuple[int, int, int]:
    """A colour of its own for tile `index` (so that tiles side by side can be told apart)."""
    return (255, 10 * index, 0)


def tile_box(sheet: Image.Image, index: int) -> tuple[int, int, int, int]:
    """Where tile `index` (its own colour) lies in a grid: (x0, y0, x1, y1), found in the pixels."""
    ys, xs = np.nonzero(np.all(np.asarray(sheet) == colour(index), axis=-1))
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


CAPTIONS = [
    "L01H00  #12\nembed -0.246\ndecoded -0.832",  # negative values: the caption of issue 18 ran over
    "a_photo_with_a_very_long_file_name_2024-03-01 (input)",
    "L47MLP  #768\nembed -0.999999\ndecoded -0.999999",
    "L01  #1\nembed 1.000",
]


def test_captions_stay_inside_their_cell() -> None:
    """Each caption drawn alone on a grid whose other captions are empty: its ink lies under its own tile,
    no wider than the tile and above the next row of tiles. Tiles are found by their colours."""
    tiles = [(Image.new("RGB", (8, 8), colour(i)), "") for i in range(6)]
    blank = grid_image(tiles, "title", tile=TILE, columns=3)
    cells = [tile_box(blank, i) for i in range(6)]
    assert all(x1 - x0 == TILE for x0, _, x1, _ in cells)
    for index in range(len(tiles)):
        caption = CAPTIONS[index % len(CAPTIONS)]
        sheet = grid_image([(p, caption if i == index else "") for i, (p, _) in enumerate(tiles)], "title",
                           tile=TILE, columns=3)
        x0, y0, x1, y1 = ink_box(sheet, blank)
        cx0, _, cx1, cy1 = cells[index]
        below = [c[1] for c in cells if c[1] > cy1]
        assert cx0 <= x0 and x1 <= cx1, (caption, (x0, x1), (cx0, cx1))
        assert cy1 <= y0 and y1 <= (min(below) if below else sheet.height), (caption, (y0, y1))


def test_a_long_title_wraps_inside_the_sheet() -> None:
    tiles = [(Image.new("RGB", (8, 8), colour(i)), "") for i in range(2)]
    title = "chelsea: best 16 by rank | steering lens (norm, alpha 2), seed 0, 100 steps, guidance 4"
    sheet = grid_image(tiles, title, tile=TILE, columns=2, note=figures.CAPTION_NOTE)
    header = sheet.crop((0, 0, sheet.width, tile_box(sheet, 0)[1]))
    x0, _, x1, _ = ink_box(header, Image.new("RGB", header.size, "white"))
    assert x0 > 0 and x1 < sheet.width - 1  # nothing runs to the edge (where it would be cut off)
    from PIL import ImageDraw

    draw, font = ImageDraw.Draw(sheet), figures._font(max(14, TILE // 11))
    lines = figures._wrap(draw, title, font, sheet.width - 8)
    assert len(lines) > 1 and " ".join(lines) == title


def rows_of(layers: list[int], heads: int, extra: tuple[str, ...] = (), lens: str = "steering") -> list[dict]:
    """Rows as `read_csv` gives them (numbers typed), with seeded values: heads near 0.2, MLP near 0.5,
    the residual stream near 0.9 (as in a logit-lens run)."""
    rng = np.random.default_rng(0)
    rows = []
    for layer in layers:
        comps = [("head", f"L{layer:02d}H{h:02d}", h, 0.2) for h in range(heads)]
        comps += [(kind, f"L{layer:02d}{suffix}", None, centre) for kind, suffix, centre in
                  (("mlp", "MLP", 0.5), ("resid", "", 0.9)) if kind in extra]
        for kind, label, head, centre in comps:
            rows.append({"image": "chelsea", "lens": lens, "component": label, "kind": kind, "layer": layer,
                         "head": head, "mode": "norm", "alpha": 2.0, "seed": 0, "steps": 100,
                         "guidance": 4.0, "sim_embed": round(centre + rng.normal(0, 0.05), 6),
                         "sim_decoded": round(0.8 + rng.normal(0, 0.03), 6), "norm": 1.0, "rank": 1,
                         "file": f"images/chelsea/{lens}/{label}.png"})
    return rows


def test_grid_plan_leaves_out_duplicates() -> None:
    """A one-layer run's best grid shows the same pictures as its layer grid; a Diffusion Lens run's layer
    grids hold one picture each of the layer-by-layer grid: neither is drawn twice."""
    one_layer = rows_of([1], 4, ("mlp",))
    assert [name for name, *_ in grid_plan(one_layer)] == ["L01"]
    stream = [r for r in rows_of([0, 1, 2, 3], 0, ("resid",))]
    assert [name for name, *_ in grid_plan(stream)] == ["layers"]
    logit = rows_of([1, 3], 4, ("resid",), lens="logit")
    assert [name for name, *_ in grid_plan(logit)] == ["layers", "L01", "L03", "top"]


def test_grid_titles_name_the_settings(tmp_path: Path, monkeypatch) -> None:
    rows = rows_of([1], 2)
    for row in [*rows, {"file": "images/chelsea/input.png"}]:
        path = tmp_path / row["file"]
        path.parent.mkdir(parents=True, exist_ok=True)
        save_png(path, Image.new("RGB", (8, 8), RED))  # as a run writes them (dsl's tag)
    titles = []
    real = figures.grid_image
    monkeypatch.setattr(figures, "grid_image", lambda tiles, title, **kw: titles.append((title, kw)) or real(
        tiles, title, **kw))
    figures.draw_grids(tmp_path, rows)
    assert titles, "no grid drawn"
    for title, kw in titles:
        for words in ("chelsea", "steering lens", "norm", "alpha 2", "seed 0", "100 steps", "guidance 4"):
            assert words in title, (words, title)
        assert "embed = sim_embed" in kw["note"] and "decoded = sim_decoded" in kw["note"]


def test_settings_text_of_a_lens_without_mode() -> None:
    row = rows_of([1], 1)[0] | {"lens": "diffusion", "mode": "", "alpha": None}
    assert settings_text(row) == "diffusion lens, seed 0, 100 steps, guidance 4"
    assert settings_text(row, decoded=False) == "diffusion lens"  # a run of scores alone took no steps


def test_heatmaps_of_a_run_that_decoded_nothing_name_no_steps_or_decoder(tmp_path: Path, monkeypatch) -> None:
    """`decode.enabled=false`: the heatmaps' titles said "2 steps, guidance 4 | ... -> kandinsky22"."""
    from helpers import dsl_here

    run = tmp_path / "run"
    assert dsl_here(["run", "debug=tiny", "images.limit=1", "layer=1", "decode.enabled=false",
                     f"hydra.run.dir={run}"], tmp_path) == 0
    titles, original = [], figures.heatmap_figure
    monkeypatch.setattr(figures, "heatmap_figure", lambda rows, title, limits=None: titles.append(title)
                        or original(rows, title, limits))
    figures.draw_heatmaps(run, figures.run_rows(run))
    assert titles and all("steps" not in t and "guidance" not in t and "kandinsky" not in t for t in titles), titles


# ---------------------------------------------------------------- matplotlib figures


def hidden_tick_labels(fig) -> set[int]:
    """ids of the tick labels matplotlib does not draw: those of ticks outside their axis' view."""
    hidden = set()
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            low, high = sorted(axis.get_view_interval())
            slack = 1e-9 * max(1.0, abs(high - low))
            for tick, loc in zip(axis.get_major_ticks(), axis.get_majorticklocs()):
                if not low - slack <= loc <= high + slack:
                    hidden |= {id(tick.label1), id(tick.label2)}
    return hidden


def texts(fig) -> list:
    """Every text artist of a drawn figure that is drawn and not empty."""
    fig.canvas.draw()
    hidden = hidden_tick_labels(fig) | {id(t) for ax in fig.axes if not ax.axison for t in ax.findobj()}
    from matplotlib.text import Text

    return [t for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip() and id(t) not in hidden]


def assert_legible(fig, min_points: float = 6.5) -> None:
    """Every text inside the figure, at a readable size, and no two texts overlapping."""
    renderer = fig.canvas.get_renderer()
    width, height = fig.canvas.get_width_height()
    boxes = []
    for text in texts(fig):
        box = text.get_window_extent(renderer)
        assert box.x0 >= -1 and box.y0 >= -1 and box.x1 <= width + 1 and box.y1 <= height + 1, text.get_text()
        assert text.get_fontsize() >= min_points, (text.get_text(), text.get_fontsize())
        boxes.append((text.get_text(), box))
    for (a, box_a), (b, box_b) in combinations(boxes, 2):
        overlap = min(box_a.x1, box_b.x1) - max(box_a.x0, box_b.x0), min(box_a.y1, box_b.y1) - max(box_a.y0, box_b.y0)
        assert min(overlap) <= 1, f"{a!r} overlaps {b!r}"


def kind_of(label: str) -> str:
    return "heads" if label.startswith("H") else label


def test_heatmap_colour_scale_per_kind_of_component() -> None:
    """Logit-lens-like values (residual stream near 0.9, heads near 0.2, MLP near 0.5): every image in the
    figure holds one kind of component, and its colour scale runs from that kind's own minimum to maximum
    (computed here from the rows)."""
    rows = rows_of([0, 1, 2, 3], 4, ("mlp", "resid"), lens="logit")
    fig = heatmap_figure(rows, "chelsea\nsettings")
    images = [a for ax in fig.axes for a in ax.get_images()]
    assert len(images) == 2 * 3  # two panels x (heads, MLP, resid)
    seen = set()
    for image in images:
        axis = image.axes
        labels = [t.get_text() for t in axis.get_xticklabels()]
        kinds = {kind_of(label) for label in labels}
        assert len(kinds) == 1, labels
        kind = kinds.pop()
        value = "sim_embed" if "sim_embed" in axis.get_figure().get_suptitle() else "sim_decoded"
        expected = [float(r[value]) for r in rows if kind_of(r["component"][3:] or "resid") == kind]
        assert image.norm.vmin == pytest.approx(min(expected)) and image.norm.vmax == pytest.approx(max(expected))
        seen.add((value, kind))
    assert seen == {(v, k) for v in ("sim_embed", "sim_decoded") for k in ("heads", "MLP", "resid")}


def test_heatmap_cells_show_their_values_and_rows_are_named_like_components() -> None:
    rows = rows_of([1, 3], 4, ("mlp",))
    fig = heatmap_figure(rows, "chelsea")
    embed_axes = [ax for ax in fig.axes if ax.get_images() and "sim_embed" in ax.get_figure().get_suptitle()]
    shown = sorted(t.get_text() for ax in embed_axes for t in ax.texts)
    assert shown == sorted(f"{float(r['sim_embed']):.3f}" for r in rows)
    for axis in embed_axes:
        assert [t.get_text() for t in axis.get_yticklabels()] == ["L01", "L03"]  # as in L01H00, not L1


def test_a_cell_filled_by_two_jobs_shows_the_one_with_a_value() -> None:
    """A sweep whose jobs overlap (`layer=0,all` with decode.top_k): job 0 decoded L01H02, job 1 did not; the
    merged heatmap showed the last row read, a blank cell, with the colour scale still spanning its value."""
    from dsl_cli.figures import heatmap_matrix

    rows = rows_of([1, 3], 4, ())
    decoded = next(r for r in rows if r["component"] == "L01H02")
    undecoded = {**decoded, "sim_decoded": None, "file": ""}
    for order in ([decoded, undecoded], [undecoded, decoded]):
        layers, columns, matrix = heatmap_matrix([r for r in rows if r is not decoded] + order, "sim_decoded")
        assert matrix[layers.index(1), columns.index("H02")] == pytest.approx(float(decoded["sim_decoded"]))


def test_one_value_gets_no_colour_bar() -> None:
    """A one-layer Diffusion Lens heatmap is one cell per panel: grey, its value written in it, no colour
    bar (a scale of one value means nothing)."""
    rows = rows_of([1], 0, ("resid",), lens="diffusion")
    fig = heatmap_figure(rows, "chelsea")
    images = [a for ax in fig.axes for a in ax.get_images()]
    assert len(images) == 2
    assert [ax for ax in fig.axes if ax.axison and not ax.get_images()] == []  # no colour bar shown
    for image in images:
        assert image.cmap.N == 1
        assert [t.get_text() for t in image.axes.texts] in ([f"{float(rows[0][v]):.3f}"] for v in
                                                             ("sim_embed", "sim_decoded"))


@pytest.mark.parametrize("shape", [([1], 4, ("mlp",)), ([1], 0, ("resid",)), ([0, 1, 2, 3], 4, ("mlp", "resid")),
                                   (list(range(12)), 16, ("mlp", "resid"))])
def test_heatmaps_are_legible(shape) -> None:
    layers, heads, extra = shape
    rows = rows_of(layers, heads, extra)
    fig = heatmap_figure(rows, f"chelsea: similarity to the input, per layer and component\n{settings_text(rows[0])}")
    assert_legible(fig)
    # one-layer strips have room for a colour bar with several ticks
    bars = [ax for ax in fig.axes if ax.axison and not ax.get_images()]
    scaled = [(value, kind) for value in ("sim_embed", "sim_decoded") for kind in {r["kind"] for r in rows}
              if len({r[value] for r in rows if r["kind"] == kind}) > 1]  # a block of one value has no bar
    assert len(bars) == len(scaled)
    for axis in bars:
        assert len([t for t in axis.get_yticklabels() if t.get_text()]) >= 3


def importance_rows() -> list[dict]:
    rng = np.random.default_rng(1)
    return [{"image": image, "component": f"L03H{h:02d}", "layer": 3, "head": h, "ablation": "zero",
             "mode": "norm", "alpha": 2.0, "importance": float(rng.uniform(0, 0.01)), "dsl": float(rng.uniform()),
             "direct": float(rng.uniform()), "direct_importance": float(rng.uniform(0, 0.01))}
            for image in ("astronaut", "chelsea", "coffee") for h in range(5)]


def test_head_importance_titles_say_pooled_n_and_the_interval() -> None:
    """The correlations in the titles are the pooled ones, with n, as scipy computes them on all pairs, and
    their bootstrap 95 % intervals; a row of panels per ablation, a panel per score."""
    rows = importance_rows()
    rows += [{**r, "ablation": "mean"} for r in rows]
    corr = correlations(rows)
    fig = plot_head_importance(rows, corr)
    titles = [ax.get_title() for ax in fig.axes]
    assert len(titles) == 2 * 3
    pooled = {(r["ablation"], r["lens"]): r for r in corr if r["image"] == POOLED}
    for title, (ablation, lens) in zip(titles, [(a, s) for a in ("zero", "mean") for s in SCORES]):
        x, y = [r[lens] for r in rows[:15]], [r["importance"] for r in rows[:15]]
        assert title.startswith(f"{ablation} ablation") and "pooled over n = 15 (image, head) pairs" in title
        assert f"Spearman {stats.spearmanr(x, y)[0]:.3f} [" in title and f"Pearson {stats.pearsonr(x, y)[0]:.3f} [" in title
        p = pooled[ablation, lens]
        assert f"[{p['spearman_low']:.3f}, {p['spearman_high']:.3f}]" in title and "95 % CI" in title
    assert "alpha 2" in fig.get_suptitle()
    assert_legible(fig)


def overlay_rows() -> list[dict]:
    """Two composites where the DSL and greedy curves coincide (the case that hid the DSL curve)."""
    rows = []
    for image in ("chelsea_on_astronaut", "coffee_on_chelsea"):
        same = [0.95, 0.93, 0.92, 0.92]
        runs = [("dsl", None, same), ("greedy", None, same)] + [("random", s, [0.95, 0.95 - 0.01 * s, 0.94, 0.93])
                                                           for s in range(3)]
        for order, seed, curve in runs:
            rows += [{"image": image, "ablation": "zero", "order": order, "seed": seed, "step": step,
                      "overlay_sim": value, "auc": 2.8} for step, value in enumerate(curve)]
    return rows


def test_overlay_removal_shows_dsl_over_greedy_and_keeps_the_legend_off_the_data() -> None:
    fig = plot_overlay_removal(overlay_rows(), "zero ablation; heads ranked by DSL (norm, alpha 2)")
    renderer = (fig.canvas.draw(), fig.canvas.get_renderer())[1]
    for axis in fig.axes:
        if not axis.lines:
            continue
        lines = {line.get_label().split(" ")[0]: line for line in axis.lines}
        dsl, greedy = lines["dsl"], lines["greedy"]
        assert dsl.get_zorder() > greedy.get_zorder()  # drawn last, on top
        assert dsl.get_linestyle() != greedy.get_linestyle() and greedy.get_linewidth() > dsl.get_linewidth()
        assert axis.get_legend() is None
        legend = fig.legends[0].get_window_extent(renderer)
        assert not legend.overlaps(axis.get_window_extent(renderer))
    assert "zero ablation" in fig.get_suptitle()
    assert_legible(fig)


def drawn_label_plots(folder: Path, rows: list[dict]) -> list:
    """The matplotlib figures `draw_label_plots` draws of `rows`, kept instead of saved."""
    captured = []
    real = figures.save_figure
    try:
        figures.save_figure = lambda fig, path: captured.append(fig)
        figures.draw_label_plots(folder, rows)
    finally:
        figures.save_figure = real
    return captured


def test_label_plot_is_legible(tmp_path: Path) -> None:
    rows = [{"image": "chelsea", "lens": "logit", "component": f"L{l:02d}", "layer": l, "head": None,
             "rank": 1, "label": "desert grassland whiptail lizard", "score": round(math.sin(l), 6)}
            for l in range(12)]
    captured = drawn_label_plots(tmp_path, rows)
    assert len(captured) == 1
    assert_legible(captured[0])


# ---------------------------------------------------------------- figures drawn while the run decodes


def figure_bytes(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for kind in figures.FIGURE_KINDS + ("plots",)
            for p in sorted((run_dir / kind).glob("*.png"))}


def test_figures_are_drawn_early_on_a_gpu_or_when_asked() -> None:
    import torch
    from omegaconf import OmegaConf

    from dsl_cli.run import draws_while_decoding

    for setting, cpu, gpu in ((None, False, True), (True, True, True), (False, False, False)):
        cfg = OmegaConf.create({"decode": {"draw_early": setting}})
        assert (draws_while_decoding(cfg, torch.device("cpu")), draws_while_decoding(cfg, torch.device("cuda"))) == (cpu, gpu)


@pytest.mark.parametrize("rank_by", ["sim_embed", "sim_decoded"])
def test_figures_drawn_while_decoding_equal_those_drawn_after(rank_by: str, tmp_path: Path, monkeypatch,
                                                            capsys) -> None:
    """Where the decoding runs on a GPU (or `decode.draw_early=true`), each image's figures are drawn as soon as
    its last picture is written. They are the bytes `dsl plot` draws from the finished run's files, whatever
    the ranking (by sim_decoded, an image's ranks are final only once its pictures are), with components left
    undecoded (top_k)."""
    import shutil

    from helpers import dsl_in_process

    started = []
    draw = figures.EarlyFigures.draw
    monkeypatch.setattr(figures.EarlyFigures, "draw", lambda self, image, rows: started.append(image) or
                        draw(self, image, rows))
    args = ["run", "debug=tiny", "layer=1", "images.limit=3", "decode.top_k=3", "decode.batch_size=2",
            f"lens.rank_by={rank_by}", "decode.draw_early=true", "hydra.run.dir=run"]  # as on a GPU
    code, err = dsl_in_process(args, tmp_path, monkeypatch, capsys)
    assert code == 0, err
    assert started == ["astronaut", "chelsea", "coffee"]  # each once, in the order they finished decoding
    shutil.copytree(tmp_path / "run", tmp_path / "copy")
    for path in figure_bytes(tmp_path / "copy"):
        (tmp_path / "copy" / path).unlink()
    code, err = dsl_in_process(["plot", str(tmp_path / "copy")], tmp_path, monkeypatch, capsys)
    assert code == 0, err
    drawn = figure_bytes(tmp_path / "run")
    assert drawn == figure_bytes(tmp_path / "copy") and len(drawn) == 9  # a grid, heatmap, looks per image


def test_drawing_processes_start_with_pyplot_imported() -> None:
    """The parent imports pyplot once before it forks its drawing processes: each of them importing it anew
    cost 0.2 s of CPU per process and per run (a fresh interpreter: in this one pyplot is imported already)."""
    import subprocess
    import sys

    script = ("import sys\nfrom dsl_cli import figures\n"
              "def imported():\n    return 'matplotlib.pyplot' in sys.modules\n"
              "pool = figures._drawing_pool(1)\nprint(pool.submit(imported).result())\npool.shutdown()\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["True"]


def test_label_plot_title_stays_inside_and_names_no_decoder(tmp_path: Path) -> None:
    """The logit lens's chart: its title (the image, what it shows, the encoder) ran off the right edge, being
    centred over an axis pushed right by the labels, and named the decoder, though the labels decode nothing."""
    import json

    (tmp_path / "manifest.json").write_text(json.dumps({"made_by": "dsl", "status": "complete", "config": {
        "encoder": {"source": "open_clip", "name": "ViT-bigG-14", "pretrained": "laion2b_s39b_b160k"},
        "decoder": {"family": "kandinsky22", "source": "pretrained"}, "decode": {"enabled": True}}}))
    rows = [{"image": "a_photo_with_a_long_name", "lens": "logit", "component": f"L{l:02d}", "layer": l,
             "head": None, "rank": 1, "label": "Mexican hairless dog (xoloitzcuintli)", "score": math.sin(l)}
            for l in range(12)]
    assert "kandinsky22" in figures.models_text(tmp_path)  # the manifest is read: the decoder could be named
    captured = drawn_label_plots(tmp_path, rows)
    fig = captured[0]
    fig.canvas.draw()
    title = " ".join(t.get_text() for t in texts(fig) if "logit lens" in t.get_text())
    assert "ViT-bigG-14" in title and "kandinsky" not in title, title
    assert_legible(fig)


def test_looks_says_which_heads_were_not_decoded(tmp_path: Path) -> None:
    """Under decode.top_k=1 the other heads have no picture: their cell was left blank, with no word why."""
    from dsl_cli.outputs import RunFolder, save_png

    save_png(RunFolder(tmp_path).input_picture("chelsea"), Image.new("RGB", (32, 32), "green"))
    save_png(tmp_path / "images" / "chelsea" / "steering" / "L01H00.png", Image.new("RGB", (32, 32), "blue"))
    patch = {"image": "chelsea", "lens": "steering", "grid": 2, "cls_share": 0.1, "shares": "0.1;0.2;-0.1;0.3"}
    decoded = {"lens": "steering", "file": "images/chelsea/steering/L01H00.png", "rank": 1}
    heads = [({**patch, "component": "L01H00"}, decoded), ({**patch, "component": "L01H01"}, {**decoded, "file": ""}),
             ({**patch, "component": "L01H02"}, None)]
    fig = figures.looks_figure(tmp_path, "chelsea", heads, "chelsea: where each head looks")
    shown = [t.get_text() for t in texts(fig)]
    assert shown.count("not decoded\n(outside decode.top_k)") == 2, shown
    assert_legible(fig)


def steps_rows(steps: int = 3) -> list[dict]:
    """study_overlay_removal.csv rows of one composite: the dsl order, and two random runs."""
    return [{"image": "cat_on_dog", "order": order, "seed": seed, "step": step, "overlay_sim": 1.0 - 0.1 * step,
             "auc": 1.0} for order, seed in (("dsl", None), ("random", 0), ("random", 1)) for step in range(steps)]


def test_overlay_removal_plots_each_value_at_its_step() -> None:
    """The curves were drawn by the rows' position in the file, not their `step`."""
    rows = steps_rows()
    rows[0], rows[2] = rows[2], rows[0]  # the dsl order's steps 2, 1, 0
    fig = plot_overlay_removal(rows)
    dsl = next(line for line in fig.axes[0].get_lines() if line.get_label() == "dsl")
    np.testing.assert_allclose(dsl.get_ydata(), [1.0, 0.9, 0.8])


@pytest.mark.parametrize("removed", [1, 5, 8])  # a middle step of dsl's, of a random run's, the file's last row
def test_overlay_removal_refuses_a_file_cut_short(removed: int) -> None:
    rows = steps_rows()
    del rows[removed]
    with pytest.raises(figures.UserError, match="study_overlay_removal.csv: cat_on_dog .* lacks step"):
        plot_overlay_removal(rows)
