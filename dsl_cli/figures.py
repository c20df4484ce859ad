"""Every figure, drawn from a folder's files alone (its CSVs, decoded pictures and manifest): no model and no
torch, so that `dsl plot`, `dsl report` and `dsl merge` draw them without loading one. A run's figures
(`redraw`), a sweep's heatmaps (`dsl_cli.sweeps`), the built-in studies' (drawn by their `Study.draw`,
`dsl_cli.study_registry.redraw_study`):

    grids/<image>_<lens>_<what>.png      decoded pictures with captions (per layer, the best, seeds, lenses)
    heatmaps/<image>_<lens>.png          similarity to the input, layers x components, one scale per kind
    plots/<image>_logit.png              the logit lens: the top label of each component
    looks/<image>_<lens>.png             where each head looks, beside its picture
    plots/head_importance.png            importance vs each score, a panel per (ablation, score)
    plots/overlay_removal.png            overlay similarity vs heads ablated, a panel per composite
    grids/<composite>_overlay_fade.png   the decoded ablated composites, a row per order
"""

from __future__ import annotations

import ctypes
import io
import math
import multiprocessing
import os
import signal
import sys
import textwrap
from collections import Counter
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from dsl_cli.config import decoder_text, encoder_text
from dsl_cli.errors import UserError, raise_if_stopped
from dsl_cli.outputs import (BASELINE_NAMES, BASELINES, IMPORTANCE, LABELS, OVERLAY, PATCHES, PNG_LEVEL, PNG_SOFTWARE,
                             SEEDS, SIMILARITY, RunFolder, atomic_write_bytes, first_label, group_rows, is_dsl_png,
                             open_picture,
                             png_bytes, read_manifest, run_rows, usable_cores)

TOP_TILES = 16  # tiles in the per-image top grid
SEED_GRID_ROWS = 8  # components in a seeds grid
SEED_NOTE = ("decoded = sim_decoded of that seed's picture; uncond: the decoder's unconditional embedding; "
             "mean: the mean embedding of the run's images (what the decoder makes without the component)")
LOOK_COLUMNS = 4  # heads per row of a `looks` figure (each: where it looks, its picture)
CAPTION_LINES = 4  # a grid caption: component and rank, embed, decoded, top label
NO_SCALE = "#e8e8e8"  # the grey of a heatmap block that holds a single value
HEATMAP_CELL = 0.5  # inches: a heatmap cell's width, room for a value such as -0.123
SIMILARITIES = {
    "sim_embed": "cos(lens embedding, input embedding)",
    "sim_decoded": "cos(embedding of the decoded picture, input embedding)",
}
CAPTION_NOTE = (f"#rank; embed = sim_embed = {SIMILARITIES['sim_embed']}; "
                f"decoded = sim_decoded = {SIMILARITIES['sim_decoded']}")
LABEL_NOTE = "; last line: the top ImageNet label of the lens embedding"
SHARE_NOTE = "; share = attribution = the part's share of cos(embedding, target)"
FIGURE_DPI = 110  # the pixels per inch of every matplotlib figure's PNG
TITLE_PAD = 6 / 72  # inches between a panel and its title (matplotlib's own pad, 6 points)
LABEL_PLOT_WIDTH = 7  # inches: a logit-lens bar chart's width
MAX_LABEL_BARS = 64  # components in a logit-lens bar chart (bigG's 816 would make it 229 inches high)


def pyplot():
    """matplotlib's pyplot on the Agg backend: figures are files here, never windows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> None:
    """A matplotlib figure as PNG, written atomically and without a timestamp (reruns give equal files), its
    Software text dsl's (`outputs.is_dsl_png`). zlib's fastest level: a fifth of a run's figure time went into
    zlib's default level, for files 14 % smaller (the pixels are the same)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=FIGURE_DPI, metadata={"Software": PNG_SOFTWARE},
                pil_kwargs={"compress_level": PNG_LEVEL})
    pyplot().close(fig)
    write_figure(path, buffer.getvalue())


def save_png(path: Path, image: Image.Image) -> None:
    """A figure composed with PIL (a grid) as PNG, written as `save_figure` writes one."""
    write_figure(path, png_bytes(image))


def write_figure(path: Path, data: bytes) -> None:
    """Every figure's one way to disk: a file at `path` that dsl did not draw (a PNG of the user's, a link) is
    refused before anything replaces it, since dsl never overwrites a file it did not make; dsl's own earlier
    figure is replaced. Cheap where a fresh run writes: a path that holds nothing costs one lstat."""
    if os.path.lexists(path) and (os.path.islink(path) or not is_dsl_png(path)):
        raise UserError(f"{path} is not a figure dsl drew; move it away and run the command again")
    atomic_write_bytes(path, data)


def refuse_foreign(path: Path, advice: str = "run the command again", refusal: type[UserError] = UserError) -> None:
    """Refuse a file at `path`, where dsl puts a picture, that dsl did not write (a PNG of the user's, any
    other file): it is neither taken as a result, drawn in a grid, shown on a page, nor written over. dsl's own
    pictures say so inside (`is_dsl_png`); one of them cut short still does, and is made again. `advice`: what
    to do once it is moved away; `refusal`: the error raised (a continued run's `Refused` keeps its manifest)."""
    if os.path.lexists(path) and not is_dsl_png(path):
        raise refusal(f"{path} is not a picture dsl made; move it away and {advice}")


def refuse_foreign_pictures(folder: RunFolder, rows: list[dict], advice: str = "run the command again",
                            refusal: type[UserError] = UserError) -> None:
    """`refuse_foreign` on every picture a run's `rows` (of similarity.csv, seeds.csv, baselines.csv) name and
    on their images' inputs: the results a resumed run would keep and a page would show as the run's."""
    inputs = [folder.input_picture(image) for image in dict.fromkeys(r["image"] for r in rows)]
    for path in [*inputs, *(folder.file(r["file"]) for r in rows if r["file"])]:
        refuse_foreign(path, advice, refusal)


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: fixed-size bitmap font
        return ImageFont.load_default()


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: float) -> str:
    """`text`, cut short with an ellipsis where it would be wider than `width` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: float) -> list[str]:
    """`text` broken into lines at most `width` pixels wide (at spaces; a word too long is cut short)."""
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] += f" {word}"
        else:
            lines.append(_fit(draw, word, font, width))
    return lines


def grid_image(tiles: list[tuple[Image.Image, str]], title: str, tile: int = 192, columns: int = 6,
               note: str = "") -> Image.Image:
    """Tiles in rows of `columns`, each with a caption of up to CAPTION_LINES lines under it, under a title
    and a note (wrapped to the sheet's width). Every caption line is cut to its tile's width, so a caption
    never runs into the next cell."""
    columns = max(1, min(columns, len(tiles)))
    rows = math.ceil(len(tiles) / columns)
    small, big = _font(max(11, tile // 14)), _font(max(14, tile // 11))
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    width, pad = columns * tile, 4
    header = [(line, big) for line in _wrap(measure, title, big, width - 2 * pad)]
    header += [(line, small) for line in _wrap(measure, note, small, width - 2 * pad)]
    line_height = {id(f): f.getbbox("Hg")[3] + 3 for f in (small, big)}
    top = pad + sum(line_height[id(f)] for _, f in header) + pad
    cell = tile + CAPTION_LINES * line_height[id(small)] + pad
    sheet = Image.new("RGB", (width, top + rows * cell), "white")
    draw = ImageDraw.Draw(sheet)
    y = pad
    for line, font in header:
        draw.text((pad, y), line, fill="black", font=font)
        y += line_height[id(font)]
    for index, (picture, text) in enumerate(tiles):
        x, y = (index % columns) * tile, top + (index // columns) * cell
        sheet.paste(picture.convert("RGB").resize((tile, tile), Image.Resampling.BICUBIC), (x, y))
        for n, line in enumerate(text.splitlines()[:CAPTION_LINES]):
            draw.text((x + 3, y + tile + 2 + n * line_height[id(small)]), _fit(draw, line, small, tile - 6),
                      fill="black", font=small)
    return sheet


def settings_text(row: dict, decoded: bool = True) -> str:
    """The settings a row of similarity.csv was made with, for titles:
    `steering lens (norm, alpha 2), seed 0, 100 steps, guidance 4`; the decoding's seed, steps and guidance
    only where something was `decoded` (a run of scores alone named steps it never took)."""
    lens = f"{row['lens']} lens"
    details = [row["mode"]] if row.get("mode") else []
    details += [f"alpha {row['alpha']:g}"] if row.get("alpha") is not None else []  # a lens may have a mode alone
    if details:
        lens += f" ({', '.join(details)})"
    return f"{lens}, seed {row['seed']}, {row['steps']} steps, guidance {row['guidance']:g}" if decoded else lens


def caption_note(rows: list[dict]) -> str:
    """The note under a grid's title, explaining its captions: the share only where captions show one (the
    attribution lens), the label line only where they have one (`lens.text=true`, the logit lens)."""
    return (CAPTION_NOTE + (SHARE_NOTE if any(r.get("attribution") is not None for r in rows) else "")
            + (LABEL_NOTE if any(r.get("labels") for r in rows) else ""))


def models_text(folder: Path, decoded: bool = True) -> str:
    """The encoder and decoder of a run (from its manifest), for figure titles: `ViT-L-14 openai ->
    kandinsky21`; empty where the manifest does not say (a sweep's, an old run's). `decoded`: whether the
    figure shows anything decoded: a logit lens's labels or a heatmap of scores alone name no decoder."""
    try:
        manifest = read_manifest(folder) or {}
    except UserError:
        return ""
    config = manifest.get("config", {})
    encoder, decoder = config.get("encoder") or {}, config.get("decoder") or {}
    if not encoder:
        return ""
    text = encoder_text(encoder)
    adapter = manifest.get("adapter") or {}
    if adapter:  # a run decoded through a fitted adapter (dsl_cli.adapters): its name and held-out cosine
        cosine = adapter.get("heldout_cosine")
        text += f" via adapter {adapter.get('name')}" + (f" (held-out cos {cosine:.2f})" if cosine is not None else "")
    if decoded and decoder and (config.get("decode") or {}).get("enabled", True):
        text += f" -> {decoder_text(decoder)}"
    return text


def shared_models_text(folders: Sequence[Path], decoded: bool = True) -> str:
    """`models_text` of runs that share their models (a sweep's jobs): that text, or empty where they differ."""
    texts = {models_text(folder, decoded) for folder in folders}
    return texts.pop() if len(texts) == 1 else ""


def _caption(row: dict) -> str:
    text = f"{row['component']}  #{row['rank']}\nembed {row['sim_embed']:.3f}"
    if row.get("attribution") is not None:  # the attribution lens: what the part gives of the similarity
        text += f"  share {row['attribution']:.3f}"
    if row.get("sim_decoded") is not None:
        text += f"\ndecoded {row['sim_decoded']:.3f}"
    if row.get("labels"):  # the top zero-shot label, without its cosine
        text += "\n" + first_label(row["labels"])[0]
    return text


def with_logit_labels(rows: list[dict], labels: list[dict] | None) -> list[dict]:
    """similarity.csv's rows with the logit lens's top label (labels.csv's rank 1) in their `labels` column, in
    the form `lens.text` writes (`tabby 0.31`), for the grids' captions; a row that has its own labels, or none
    in labels.csv, is left as it is."""
    top = {(r["image"], r["lens"], r["component"]): f"{r['label']} {r['score']:.2f}"
           for r in labels or [] if r["rank"] == 1}
    return [row if row.get("labels") else row | {"labels": top.get((row["image"], row["lens"], row["component"]), "")}
            for row in rows]


def _tiles(run_dir: Path, image: str, rows: list[dict]) -> list[tuple[Image.Image, str]]:
    tiles = [(open_picture(RunFolder(run_dir).input_picture(image), run_dir), f"{image} (input)")]
    tiles += [(open_picture(run_dir / row["file"], run_dir), _caption(row)) for row in rows]
    return tiles


def grid_plan(rows: list[dict]) -> list[tuple[str, list[dict], str]]:
    """The grids of one image and lens as (name suffix, rows, what they show): the residual stream layer by
    layer (when several layers), one grid per layer, the best-ranked; a grid whose pictures all appear in
    one planned before it is left out (a one-layer run's best grid is its layer's grid)."""
    stream = [r for r in rows if r["kind"] in ("resid", "resid_mid")]
    plan = [("layers", stream, "residual stream, layer by layer")] if len(stream) > 1 else []
    plan += [(f"L{int(layer):02d}", layer_rows, f"layer {layer}")
             for (layer,), layer_rows in group_rows(rows, ("layer",)).items()]
    best = sorted(rows, key=lambda r: r["rank"])[:TOP_TILES]
    plan.append(("top", best, f"best {len(best)} by rank"))
    kept: list[tuple[str, list[dict], str]] = []
    for name, plan_rows, what in plan:
        shown = {r["component"] for r in plan_rows}
        if not any(shown <= {r["component"] for r in earlier} for _, earlier, _ in kept):
            kept.append((name, plan_rows, what))
    return kept


def draw_grids(run_dir: Path, rows: list[dict]) -> list[Path]:
    """Per image and lens, the grids of `grid_plan`, titled with the image, what they show and the run's
    settings and models, captions explained in a note under the title."""
    written, models = [], models_text(run_dir)
    for (image, lens), group in group_rows([r for r in rows if r["file"]], ("image", "lens")).items():
        for name, tile_rows, what in grid_plan(group):
            path = RunFolder(run_dir).figure("grids", f"{image}_{lens}_{name}")
            title = f"{image}: {what} | {settings_text(group[0])} | {models}".rstrip(" |")
            save_png(path, grid_image(_tiles(run_dir, image, tile_rows), title, note=caption_note(tile_rows)))
            written.append(path)
    return written


def draw_lens_comparison(folder: Path, rows: list[dict]) -> list[Path]:
    """Per image, the components that more than one lens decoded, each lens's picture side by side (a row
    per component, a column per lens, in the order the lenses first appear): `grids/<image>_<a>_vs_<b>.png`.
    rows: similarity.csv rows with `file` relative to `folder` (a merged sweep's, or one run's)."""
    written = []
    for (image,), group in group_rows([r for r in rows if r["file"]], ("image",)).items():
        lenses = list(dict.fromkeys(r["lens"] for r in group))
        cells = {(r["component"], r["lens"]): r for r in group}
        shared = [c for c in dict.fromkeys(r["component"] for r in group)
                  if all((c, lens) in cells for lens in lenses)]
        if len(lenses) < 2 or not shared:
            continue
        tiles = [(open_picture(folder / cells[c, lens]["file"], folder), f"{lens}: {_caption(cells[c, lens])}")
                 for c in shared for lens in lenses]
        path = RunFolder(folder).figure("grids", f"{image}_{'_vs_'.join(lenses)}")
        title = f"{image}: {' | '.join(lenses)}, the same components side by side (a row each)"
        note = " | ".join(settings_text(cells[shared[0], lens]) for lens in lenses) + f"; {caption_note(group)}"
        save_png(path, grid_image(tiles, title, columns=len(lenses), note=note))
        written.append(path)
    return written


def seed_tiles(run_dir: Path, rows: list[dict], extra: dict[tuple, list[dict]]) -> list[tuple[Image.Image, str]]:
    """One line of tiles per row (its first seed's picture, then its other seeds', in seed order), captioned
    with the component, the seed and sim_decoded; `extra` holds the other seeds' rows by (image, component)."""
    tiles = []
    for row in rows:
        seeds = [row] + sorted(extra.get((row["image"], row["component"]), []), key=lambda r: r["seed"])
        tiles += [(open_picture(run_dir / r["file"], run_dir),
                   f"{r['component']} seed {r['seed']}\ndecoded {r['sim_decoded']:.3f}") for r in seeds]
    return tiles


def draw_seed_grids(run_dir: Path, rows: list[dict], seed_rows: list[dict], baseline_rows: list[dict]) -> list[Path]:
    """Per image and lens, `grids/<image>_<lens>_seeds.png`: the best-ranked decoded components (at most
    SEED_GRID_ROWS), one line each with a picture per seed, then the baselines' pictures per seed."""
    extra = group_rows(seed_rows, ("image", "component"))
    written = []
    for (image, lens), group in group_rows([r for r in rows if r["file"]], ("image", "lens")).items():
        best = sorted(group, key=lambda r: r["rank"])[:SEED_GRID_ROWS]
        baselines = [r for r in baseline_rows if (r["image"], r["lens"]) == (image, lens)]
        firsts = [r for r in baselines if r["seed"] == group[0]["seed"]]
        tiles = seed_tiles(run_dir, best + firsts, {**extra, **group_rows(
            [r for r in baselines if r not in firsts], ("image", "component"))})
        columns = max(1, len(tiles) // max(1, len(best) + len(firsts)))
        title = f"{image}: each component with {columns} seeds, then the baselines | {settings_text(group[0])}"
        path = RunFolder(run_dir).figure("grids", f"{image}_{lens}_seeds")
        save_png(path, grid_image(tiles, title, columns=columns, note=SEED_NOTE))
        written.append(path)
    return written


def _column_name(row: dict) -> str:
    if row["kind"] == "head":
        return f"H{row['head']:02d}"
    if row["kind"] in ("feature", "feature_error"):  # an SAE's feature (L12F01234 -> F01234) or error (Ferr)
        return "F" + row["component"].split("F", 1)[1]
    return {"mlp": "MLP", "resid": "resid", "resid_mid": "mid"}.get(row["kind"], row["kind"])


def heatmap_cells(rows: list[dict]) -> tuple[list[int], list[str], dict[tuple[int, int], dict]]:
    """Rows arranged as layers x columns (heads in order, MLP, mid, resid): (layers, column names,
    {(layer index, column index): row}). Where two rows fill one cell (the jobs of a sweep whose layers
    overlap, `layer=0,all`), the one with more values is shown: the job that decoded the component, not the
    last one read."""
    layers = sorted({r["layer"] for r in rows})
    names = {_column_name(r) for r in rows}
    columns = sorted(n for n in names if n.startswith("H")) + [n for n in ("MLP", "mid", "resid") if n in names]
    columns += sorted(n for n in names if n.startswith("F"))  # SAE features, then their error term (Ferr)
    cells: dict[tuple[int, int], dict] = {}
    for row in rows:
        cell = (layers.index(row["layer"]), columns.index(_column_name(row)))
        if cell not in cells or _filled(row) > _filled(cells[cell]):
            cells[cell] = row
    return layers, columns, cells


def _filled(row: dict) -> int:
    return sum(value not in (None, "") for value in row.values())


def heatmap_matrix(rows: list[dict], value: str) -> tuple[list[int], list[str], np.ndarray]:
    """`value` of each row arranged as in `heatmap_cells`: (layers, columns, [layers, columns]); NaN if absent."""
    layers, columns, cells = heatmap_cells(rows)
    matrix = np.full((len(layers), len(columns)), np.nan)
    for (i, j), row in cells.items():
        if row.get(value) is not None:
            matrix[i, j] = row[value]
    return layers, columns, matrix


def kind_blocks(columns: list[str]) -> list[tuple[str, list[int]]]:
    """Heatmap columns by component kind, each kind on its own colour scale (the residual stream's
    similarities near 1 would flatten the heads' 0.1 to 0.3): [(heads | MLP | mid | resid, column indices)]."""
    blocks = [("heads", [i for i, c in enumerate(columns) if c.startswith("H")])]
    blocks += [(name, [columns.index(name)]) for name in ("MLP", "mid", "resid") if name in columns]
    blocks.append(("features", [i for i, c in enumerate(columns) if c.startswith("F")]))  # SAE features
    return [(name, indices) for name, indices in blocks if indices]


Limits = dict[tuple[str, str], "tuple[float, float] | None"]  # (similarity, kind) -> a colour scale


def _kind(row: dict) -> str:
    """The heatmap block of a row: heads, MLP, mid or resid (as `kind_blocks` names them)."""
    name = _column_name(row)
    return "heads" if name.startswith("H") else "features" if name.startswith("F") else name


def shared_limits(rows: list[dict]) -> Limits:
    """One colour scale per similarity and component kind over every heatmap drawn from `rows` (each image
    and lens of a run, every job of a sweep), so that a colour means the same value in each of them."""
    values: dict[tuple[str, str], list[float]] = {}
    for row in rows:
        for value in ("sim_embed", "sim_decoded"):
            if row.get(value) is not None:
                values.setdefault((value, _kind(row)), []).append(row[value])
    return {key: colour_limits(np.array(found, dtype=float)) for key, found in values.items()}


def colour_limits(values: np.ndarray) -> tuple[float, float] | None:
    """(vmin, vmax) of a block's colour scale: its own range; None where it holds fewer than two distinct
    values (a scale of one value means nothing: such a block is drawn on the cosine's range, -1 to 1)."""
    finite = values[np.isfinite(values)]
    if finite.size == 0 or finite.min() == finite.max():
        return None
    return float(finite.min()), float(finite.max())


def dark_cell(value: float, limits: tuple[float, float] | None) -> bool:
    """Whether a heatmap cell is dark enough for white text: viridis is dark below about 0.6 of its scale;
    a block without a scale is light grey."""
    return limits is not None and (value - limits[0]) / (limits[1] - limits[0]) < 0.6


def layer_label(layer: int) -> str:
    """A heatmap row's label, spelt as the layer's components are (`L01` for L01H00)."""
    return f"L{layer:02d}"


def _draw_block(axis, bar, values: np.ndarray, names: list[str], layers: list[int], kind: str,
                limits: "tuple[float, float] | None") -> None:
    """One kind's columns of a heatmap panel: cells coloured on the kind's scale `limits` (shared by the
    figures drawn together; its colour bar in `bar`), each with its value; without a scale (a single value)
    the block is grey, with no colour bar: a scale of one value says nothing."""
    from matplotlib.colors import ListedColormap
    from matplotlib.ticker import MaxNLocator

    low, high = limits or (-1.0, 1.0)
    cmap = "viridis" if limits else ListedColormap([NO_SCALE])
    shown = axis.imshow(values, cmap=cmap, vmin=low, vmax=high, aspect="auto", interpolation="nearest")
    for (i, j), value in np.ndenumerate(values):
        if np.isfinite(value):
            axis.text(j, i, f"{value:.3f}", ha="center", va="center", fontsize=7, in_layout=False,  # inside
                      color="white" if dark_cell(value, limits) else "black")  # its cell: no room to make
    axis.set_xticks(range(len(names)), names, rotation=90 if len(names) > 1 else 0, fontsize=7)
    axis.set_yticks(range(len(layers)), [layer_label(l) for l in layers], fontsize=7)
    axis.set_title(kind, fontsize=8, y=1.0)
    if limits:
        axis.figure.colorbar(shown, cax=bar, ticks=MaxNLocator(nbins=4)).ax.tick_params(labelsize=7)
    else:
        bar.axis("off")


def heatmap_figure(rows: list[dict], title: str, limits: Limits | None = None):
    """Similarity to the input over layers x components of one image and lens: a panel per similarity
    (sim_embed, then sim_decoded where pictures were decoded), each split by component kind, every kind on
    its own colour scale (`limits`, default `shared_limits(rows)`), every cell labelled with its value.
    `title`'s lines are wrapped to the figure's width. Returns the matplotlib figure.
    The layout is fixed in inches (`heatmap_frame`): matplotlib's constrained layout took a third of the
    figure's time, measuring every tick label of every panel."""
    plt = pyplot()
    limits = shared_limits(rows) if limits is None else limits
    panels = [v for v in ("sim_embed", "sim_decoded") if any(r.get(v) for r in rows)]
    layers, columns, _ = heatmap_matrix(rows, panels[0])
    blocks = kind_blocks(columns)
    frame = heatmap_frame(len(panels), len(layers), [[columns[i] for i in indices] for _, indices in blocks], title)
    fig = plt.figure(figsize=(frame.width, frame.height))
    grid = fig.add_gridspec(len(panels) + 1, 1, height_ratios=[frame.band] + [frame.panel] * len(panels),
                            left=0, right=1, bottom=0, top=1, hspace=0)
    for n, value in enumerate(panels):
        _, _, matrix = heatmap_matrix(rows, value)
        panel = fig.add_subfigure(grid[n + 1, 0])
        for (kind, indices), (block, bar) in zip(blocks, frame.blocks):
            _draw_block(panel.add_axes(block), panel.add_axes(bar), matrix[:, indices], [columns[i] for i in indices],
                        layers, kind, limits.get((value, kind)))
        panel.suptitle(f"{value}: {SIMILARITIES[value]}", fontsize=8, y=1 - 0.05 / frame.panel, va="top")
    fig.suptitle(frame.title, fontsize=9, y=1 - 0.08 / frame.height, va="top")
    return fig


@dataclass
class HeatmapFrame:
    """A heatmap figure's fixed layout: its size and bands in inches, each block's axes and colour bar as
    (left, bottom, width, height) shares of its panel, and the title wrapped to the width."""

    width: float
    height: float
    band: float  # the title's band at the top
    panel: float  # each panel's height
    blocks: list[tuple[tuple[float, ...], tuple[float, ...]]]
    title: str


def heatmap_frame(n_panels: int, n_layers: int, block_names: list[list[str]], title: str) -> HeatmapFrame:
    """The layout of `n_panels` heatmaps of `n_layers` rows and blocks of columns named `block_names`. Each block: 0.4
    inches for the layer labels, HEATMAP_CELL per column, the colour bar and its labels in 0.9; the blocks
    centred. Each panel, from the top: its title, the blocks' titles, the cells (at least 0.75 inches, for
    a colour bar's ticks), the column labels (turned upright when there are several)."""
    needed = 0.2 + sum(HEATMAP_CELL * len(names) + 1.3 for names in block_names)
    width = max(5.5, needed)  # room for the title; the blocks keep their width, centred
    chars = int(width * 72 / 5.5)  # characters of 9-point text that fit across the figure
    title = "\n".join(textwrap.fill(line, chars, break_on_hyphens=False) for line in title.splitlines())
    band = 0.2 + 0.16 * (title.count("\n") + 1)
    cells = max(0.3 * n_layers, 0.75)
    upright = max((len(n) for names in block_names if len(names) > 1 for n in names), default=0)
    labels = max(0.3, 0.15 + 0.075 * upright)  # 7-point characters, turned upright, below the cells
    panel = 0.44 + cells + labels + 0.1
    bottom = (labels + 0.1) / panel
    blocks, x = [], (width - needed) / 2 + 0.1
    for names in block_names:
        left, cell_width = x + 0.4, HEATMAP_CELL * len(names)
        blocks.append(((left / width, bottom, cell_width / width, cells / panel),
                       ((left + cell_width + 0.12) / width, bottom, 0.125 / width, cells / panel)))
        x += cell_width + 1.3
    return HeatmapFrame(width, band + n_panels * panel, band, panel, blocks, title)


def draw_heatmaps(run_dir: Path, rows: list[dict], tag: str = "", limits: Limits | None = None,
                  values: str = "", model_dirs: Sequence[Path] = ()) -> list[Path]:
    """Per image and lens: `heatmap_figure`, titled with the image, the run's settings and models, all on the
    colour scales `limits` (default: shared by the figures drawn here); `tag` (a sweep's heatmaps for one
    value of an override, `lens.alpha=4`) ends the file names, and `values` (those values as typed, where the
    tag had to shorten or hash them; default: the tag) the titles. `model_dirs`: the runs whose models name
    the figures (a sweep's jobs; default: `run_dir`'s own)."""
    written = []
    decoders = {decoded: shared_models_text(model_dirs or [run_dir], decoded) for decoded in (False, True)}
    limits = shared_limits(rows) if limits is None else limits
    for (image, lens), group in group_rows(rows, ("image", "lens")).items():
        decoded = any(r["file"] for r in group)
        models = decoders[decoded]  # a decoder, its steps and guidance named only where it decoded something
        fig = heatmap_figure(group, f"{image}: similarity to the input, per layer and component\n"
                                    + " | ".join(p for p in (settings_text(group[0], decoded), values or tag, models)
                                                 if p),
                             limits)
        path = RunFolder(run_dir).figure("heatmaps", f"{image}_{lens}_{tag}" if tag else f"{image}_{lens}")
        save_figure(fig, path)
        written.append(path)
    return written


def label_bars(group: list[dict]) -> list[dict]:
    """The top-label rows of one image a logit-lens chart shows, in their order: all of them, or, past
    MAX_LABEL_BARS, the residual stream's and then the best-scoring others' up to that many."""
    if len(group) <= MAX_LABEL_BARS:
        return group
    stream = [r for r in group if not any(k in r["component"] for k in ("H", "MLP"))][:MAX_LABEL_BARS]
    others = sorted((r for r in group if r not in stream), key=lambda r: -r["score"])
    kept = {id(r) for r in stream + others[:MAX_LABEL_BARS - len(stream)]}
    return [r for r in group if id(r) in kept]


def draw_label_plots(run_dir: Path, label_rows: list[dict]) -> list[Path]:
    """Logit lens: per image, the top label of each component with its cosine, as a bar chart (at most
    MAX_LABEL_BARS bars: `label_bars`)."""
    plt = pyplot()
    written, models = [], models_text(run_dir, decoded=False)  # labels: the encoder's alone, nothing decoded
    for (image,), group in group_rows([r for r in label_rows if r["rank"] == 1], ("image",)).items():
        bars = label_bars(group)
        fig, axis = plt.subplots(figsize=(LABEL_PLOT_WIDTH, 1.2 + 0.28 * len(bars)), layout="constrained")
        axis.barh(range(len(bars)), [r["score"] for r in bars], color="tab:blue")
        axis.set_yticks(range(len(bars)), [f"{r['component']}: {r['label']}" for r in bars], fontsize=7)
        axis.invert_yaxis()
        axis.set_xlabel("cosine of the component's embedding\nwith the class's text embedding", fontsize=8)
        shown = "each component" if len(bars) == len(group) else (
            f"{len(bars)} of {len(group)} components (the residual stream, then the best-scoring)")
        title = " | ".join(p for p in (f"{image}: logit lens, the top ImageNet label of {shown}", models) if p)
        # over the whole figure, not the axis (pushed right by the labels, it ran off the right edge), wrapped
        # at about 10 characters an inch at 9 points
        fig.suptitle(textwrap.fill(title, int(LABEL_PLOT_WIDTH * 10)), fontsize=9)
        path = RunFolder(run_dir).figure("plots", f"{image}_logit")
        save_figure(fig, path)
        written.append(path)
    return written


def share_grid(row: dict) -> np.ndarray:
    """A patches.csv row's patch shares as the patch grid [grid, grid] (row by row from the top left)."""
    grid = row["grid"]
    return np.array([float(v) for v in row["shares"].split(";")]).reshape(grid, grid)


LOOK_ALPHA = 0.55  # the patch shares' opacity over the input


def look_panel(picture: Image.Image, shares: np.ndarray, limit: float) -> Image.Image:
    """`picture` (RGB) with a head's patch shares [grid, grid] over it, each patch a block of its colour on the
    scale -limit..limit centred at 0 (coolwarm: red adds to the write, blue takes from it). A share that is
    not a number (a head that wrote nothing) leaves its patch as it is."""
    from matplotlib import colormaps

    known = np.isfinite(shares)
    colours = colormaps["coolwarm"]((np.clip(np.where(known, shares, 0) / limit, -1, 1) + 1) / 2, bytes=True)
    overlay = Image.fromarray(colours[..., :3]).resize(picture.size, Image.Resampling.NEAREST)
    shown = Image.fromarray((known * 255).astype(np.uint8)).resize(picture.size, Image.Resampling.NEAREST)
    return Image.composite(Image.blend(picture, overlay, LOOK_ALPHA), picture, shown)


def share_limit(shares: list[np.ndarray]) -> float:
    """The largest absolute share of any head (their one colour scale); 1 where none is a non-zero number."""
    return max((float(np.abs(s[np.isfinite(s)]).max()) for s in shares if np.isfinite(s).any()), default=0.0) or 1.0


def _fitted(picture: Image.Image, box: tuple[float, float]) -> tuple[int, int]:
    """The pixel size of `picture` scaled to fit `box` (width, height in pixels), its aspect kept."""
    scale = min(box[0] / picture.width, box[1] / picture.height)
    return max(1, round(picture.width * scale)), max(1, round(picture.height * scale))


def undecoded_note(heads: list[tuple[dict, dict | None]]) -> str:
    """What the picture cell of a head with no picture says: where some of the figure's heads were decoded,
    the others were left out by decode.top_k; where none was, the run decoded nothing."""
    if any(row and row["file"] for _, row in heads):
        return "not decoded\n(outside decode.top_k)"
    return "not decoded"


def looks_figure(run_dir: Path, image: str, heads: list[tuple[dict, dict | None]], title: str):
    """Per head, where it looks (`look_panel`) beside its decoded picture: heads [(patches.csv row,
    similarity.csv row or None)], LOOK_COLUMNS heads to a row, one colour bar for all. The panels are
    composed as pixels and placed whole (`figimage`): an axes per panel took two thirds of the figure's time."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    plt = pyplot()
    picture = open_picture(RunFolder(run_dir).input_picture(image), run_dir).convert("RGB")
    columns = min(LOOK_COLUMNS, len(heads))
    rows = math.ceil(len(heads) / columns)
    width = 3.2 * columns + 0.8
    title = textwrap.fill(title, int(width * 13))  # about 13 characters an inch at 9 points
    band = 0.5 + 0.16 * (title.count("\n") + 1)  # the title's band and the panels' titles, in inches
    height = 1.75 * rows + 0.22 + band
    fig = plt.figure(figsize=(width, height), dpi=FIGURE_DPI)  # figimage places pixels: the saved size
    # the cells of a rows x 2*columns grid in a fixed frame (inches): 0.1 left and below, 1.2 right for the
    # colour bar, the title band above; gaps of 0.06 and 0.3 cell
    left, bottom, top = 0.1, 0.1, height - band
    cell_w = (width - 1.3) / (2 * columns + 0.06 * (2 * columns - 1))
    cell_h = (top - bottom) / (rows + 0.3 * (rows - 1))
    shares = [share_grid(patch_row) for patch_row, _ in heads]
    limit = share_limit(shares)  # one scale for every head: one colour bar
    box = (cell_w * FIGURE_DPI, cell_h * FIGURE_DPI)
    base = picture.resize(_fitted(picture, box), Image.Resampling.LANCZOS)
    for n, ((patch_row, row), grid) in enumerate(zip(heads, shares)):
        y = top - (n // columns) * 1.3 * cell_h - cell_h  # the cell's lower edge
        pair = [(look_panel(base, grid, limit), f"{patch_row['component']}: where it looks")]
        if row and row["file"]:
            decoded = open_picture(run_dir / row["file"], run_dir).convert("RGB")
            pair.append((decoded.resize(_fitted(decoded, box), Image.Resampling.LANCZOS),
                         f"{row['lens']} lens picture"))
        else:  # the picture's cell says why it is empty, not left blank as if a picture failed to show
            x = left + (2 * (n % columns) + 1) * 1.06 * cell_w
            fig.text((x + cell_w / 2) / width, (y + cell_h / 2) / height, undecoded_note(heads), fontsize=7,
                     ha="center", va="center", color="0.4")
        for k, (panel, label) in enumerate(pair):  # each centred in its cell, its title above it
            x = left + (2 * (n % columns) + k) * 1.06 * cell_w
            px, py = (x + cell_w / 2) * FIGURE_DPI - panel.width / 2, (y + cell_h / 2) * FIGURE_DPI - panel.height / 2
            fig.figimage(np.asarray(panel), round(px), round(py), origin="upper")
            fig.text((x + cell_w / 2) / width, ((py + panel.height) / FIGURE_DPI + TITLE_PAD) / height, label,
                     fontsize=7, ha="center", va="bottom")
    span = min(1.0, 3.0 / rows) * (top - bottom)  # the colour bar: beside the panels, at most 3 rows high
    bar = fig.colorbar(ScalarMappable(Normalize(-limit, limit), "coolwarm"),
                       cax=fig.add_axes((1 - 1.05 / width, (bottom + (top - bottom - span) / 2) / height,
                                         0.12 / width, span / height)))
    bar.set_label("share of the head's write per patch\n(red adds to it, blue takes from it)", fontsize=7)
    bar.ax.tick_params(labelsize=7)
    fig.suptitle(title, fontsize=9, y=1 - 0.08 / height, va="top")
    return fig


def draw_looks(run_dir: Path, rows: list[dict], patch_rows: list[dict]) -> list[Path]:
    """Per image and lens, `looks_figure` of its best-ranked heads (at most TOP_TILES)."""
    by_component = {(r["image"], r["lens"], r["component"]): r for r in rows}
    written = []
    for (image, lens), group in group_rows(patch_rows, ("image", "lens")).items():
        heads = [(p, by_component.get((image, lens, p["component"]))) for p in group]
        heads.sort(key=lambda pair: pair[1]["rank"] if pair[1] else math.inf)
        decoded = any(row and row["file"] for _, row in heads)  # a run without decoding shows no picture
        title = (f"{image}: where each head looks (share of its CLS write per patch)"
                 + (f" and its {lens} lens picture" if decoded else f", {lens} lens (nothing decoded)"))
        fig = looks_figure(run_dir, image, heads[:TOP_TILES], title)
        path = RunFolder(run_dir).figure("looks", f"{image}_{lens}")
        save_figure(fig, path)
        written.append(path)
    return written


def redraw(run_dir: Path, workers: int | None = None, early: "EarlyFigures | None" = None) -> list[Path]:
    """Draw every grid, heatmap, label plot, seed grid and 'where it looks' figure of a run from its files
    alone (no model, no GPU): the heatmaps (one colour scale for every image) and each image's own figures as
    separate jobs, on `workers` processes (default: the cores this process may use). The images whose figures
    `early` drew while the run decoded are not drawn again."""
    run_dir = Path(run_dir)  # the Python API's callers give a str
    folder = RunFolder(run_dir)
    if not folder.csv(SIMILARITY).is_file():
        raise UserError(f"{run_dir}: no similarity.csv here; give the folder of a dsl run")
    rows = run_rows(run_dir)
    if not rows:
        raise UserError(f"{folder.csv(SIMILARITY)}: no rows yet; finish the run first (dsl run resume={run_dir})")
    unscored = next((r for r in rows if r["sim_embed"] is None), None)  # every row dsl writes is scored
    if unscored is not None:
        raise UserError(f"{run_dir}: a CSV value is not what dsl writes ({SIMILARITY.name}: {unscored['image']} "
                        f"{unscored['component']} has no sim_embed; the file was cut short or edited)")
    started = set(early.futures) if early is not None else set()
    with drawn_from_files(run_dir):
        by_image, tables = group_rows(rows, ("image",)), tables_by_image(folder, rows)
        limits = shared_limits(rows)  # one colour scale for every image's heatmap, drawn in several jobs
        heatmaps = [(run_dir, None, chunk, {"limits": limits}) for chunk in _split(list(by_image.values()), workers)]
        jobs = heatmaps + [(run_dir, image, image_rows, image_tables(tables, image))
                           for (image,), image_rows in by_image.items() if image not in started]
        drawn = iter(in_parallel(_draw_job, jobs, workers))
        done = early.results() if early is not None else {}  # after the other jobs: those ran meanwhile
        parts = [next(drawn) for _ in heatmaps] + [done[image] if image in done else next(drawn)
                                                   for (image,) in by_image]
    return [path for kind in FIGURE_KINDS for part in parts for path in part.get(kind, [])]


def _split(groups: list[list[dict]], workers: int | None) -> list[list[dict]]:
    """The images' row groups joined into one consecutive chunk per worker (at most one per image)."""
    count = max(1, min(len(groups), workers or usable_cores()))
    size = math.ceil(len(groups) / count)
    return [[row for group in groups[start:start + size] for row in group] for start in range(0, len(groups), size)]


def tables_by_image(folder: RunFolder, rows: list[dict] | None = None) -> dict[str, dict[tuple, list[dict]] | None]:
    """`read_tables`, each table grouped by image (what an image's figures show)."""
    return {name: None if table is None else group_rows(table, ("image",))
            for name, table in read_tables(folder, rows).items()}


def read_tables(folder: RunFolder, rows: list[dict] | None = None) -> dict[str, list[dict] | None]:
    """The tables beside similarity.csv that a run's figures and page show (None: the run has no such table);
    with the run's `rows`, each checked against them (`check_table_rows`): `dsl plot` and `dsl report` refuse
    the same tables."""
    read = {name: folder.read(table) if folder.csv(table).is_file() else None
            for name, table in (("labels", LABELS), ("seeds", SEEDS), ("baselines", BASELINES), ("patches", PATCHES))}
    if rows is not None:
        check_table_rows(folder, rows, read)
    return read


def check_table_rows(folder: RunFolder, rows: list[dict], tables: dict[str, list[dict] | None]) -> None:
    """Refuse a complete run's table cut short or edited, as `run_rows` refuses its similarity.csv: drawn as
    whole, a looks figure left out heads and a label plot components without a word. Each of similarity.csv's
    rows wants as many rows of a table: patches.csv one per head, labels.csv lens.top_labels per logit-lens
    component, seeds.csv decode.seeds - 1 per decoded component, baselines.csv decode.seeds per image and
    baseline (where the run made them)."""
    manifest = read_manifest(folder.path) or {}
    if manifest.get("status") != "complete":
        return  # a run still going: its tables are written as it goes
    config = manifest.get("config") or {}
    seeds = (config.get("decode") or {}).get("seeds", 1)
    seeds = seeds if type(seeds) is int else None
    baselines = [{"image": image, "lens": lens, "component": name}
                 for image, lens in dict.fromkeys((r["image"], r["lens"]) for r in rows) for name in BASELINE_NAMES]
    wanted = {"patches": ([r for r in rows if r["kind"] == "head"], 1),
              "labels": ([r for r in rows if r["lens"] == "logit"],
                         label_count(tables["labels"], (config.get("lens") or {}).get("top_labels"))),
              "seeds": ([r for r in rows if r["file"]], None if seeds is None else seeds - 1),
              "baselines": (baselines, seeds)}
    for name, (owners, count) in wanted.items():
        problem = None if tables[name] is None else keyed_problem(owners, tables[name], count)
        if problem is not None:
            # a resumed run writes each of these tables again: labels.csv and patches.csv whole, seeds.csv and
            # baselines.csv by decoding again the pictures whose rows are missing
            raise UserError(f"{folder.path / name}.csv: {problem}; the file was cut short or edited: "
                            f"`dsl run resume={folder.path}` writes it again")


def label_count(labels: list[dict] | None, top_labels: object) -> int | None:
    """The labels.csv rows each logit-lens component wants: as many as each other (None), since a classifier
    head of fewer classes than `lens.top_labels` gives fewer; where the table holds none at all (emptied but
    for its header), `lens.top_labels`, or at least one where the manifest does not say."""
    if labels:
        return None
    return top_labels if type(top_labels) is int and top_labels >= 1 else 1


def keyed_problem(owners: list[dict], table: list[dict], count: int | None) -> str | None:
    """What is wrong with `table` where each (image, lens, component) of `owners` wants `count` rows (None:
    as many as each other): the first key with another number of rows."""
    have = Counter((r["image"], r["lens"], r["component"]) for r in table)
    want = {(r["image"], r["lens"], r["component"]) for r in owners}
    count = count if count is not None else max(have.values(), default=0)
    for key in sorted(want | set(have)):
        expected = count if key in want else 0
        if have[key] != expected:
            return f"{' '.join(key)} has {have[key]} rows, not {expected}"
    return None


def image_tables(tables: dict[str, dict[tuple, list[dict]] | None], image: str) -> dict[str, list[dict] | None]:
    """One image's rows of each of `tables_by_image`."""
    return {name: None if t is None else t.get((image,), []) for name, t in tables.items()}


class EarlyFigures:
    """Each image's own figures (grids, label plot, 'where it looks'), drawn in a forked process as soon as
    the image's last picture is decoded, while the run decodes the next images' pictures: the figures that
    need every image (the heatmaps share one colour scale) are all that is left at the end. Off Linux (no
    fork) it draws nothing early. Use as a context manager: on an error or Ctrl-C, drawings not started
    are dropped."""

    def __init__(self, run_dir: Path, workers: int | None = None):
        self.run_dir = run_dir
        self.workers = workers or max(1, usable_cores() // 2)  # half: the decoding goes on beside it
        self.pool: ProcessPoolExecutor | None = None  # made at the first drawing: most runs on the CPU draw none
        self.futures: dict[str, Future] = {}
        self.tables: dict | None = None  # read at the first drawing: written before decoding, not during it

    def __enter__(self) -> "EarlyFigures":
        return self

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)

    def draw(self, image: str, rows: list[dict]) -> None:
        """Start drawing `image`'s figures from its final rows of similarity.csv (and the other tables' rows
        of it, read now)."""
        if sys.platform != "linux" or image in self.futures:
            return
        if self.pool is None:
            self.pool = _drawing_pool(self.workers)
            self.tables = tables_by_image(RunFolder(self.run_dir))
        self.futures[image] = self.pool.submit(_draw_job, self.run_dir, image, rows, image_tables(self.tables, image))
        raise_if_stopped()  # a stop that came while the pool forked a process

    def results(self) -> dict[str, dict[str, list[Path]]]:
        """Each early image's figures, once drawn (an error in a drawing is raised here)."""
        with drawn_from_files(self.run_dir):
            return {image: future.result() for image, future in self.futures.items()}


FIGURE_KINDS = ("grids", "heatmaps", "labels", "seeds", "looks")  # the order `redraw` lists its figures in


def _draw_job(run_dir: Path, image: str | None, rows: list[dict], tables: dict) -> dict[str, list[Path]]:
    """One job of `redraw`: the heatmaps of the images of `rows` on the scale tables["limits"] (image None), or
    one image's other figures."""
    if image is None:
        return {"heatmaps": draw_heatmaps(run_dir, rows, limits=tables["limits"])}
    drawn = {"grids": draw_grids(run_dir, with_logit_labels(rows, tables["labels"]))}
    if tables["labels"] is not None:
        drawn["labels"] = draw_label_plots(run_dir, tables["labels"])
    if tables["seeds"] is not None or tables["baselines"] is not None:
        drawn["seeds"] = draw_seed_grids(run_dir, rows, tables["seeds"] or [], tables["baselines"] or [])
    if tables["patches"] is not None:
        drawn["looks"] = draw_looks(run_dir, rows, tables["patches"])
    return drawn


def in_parallel(function, jobs: list[tuple], workers: int | None = None) -> list:
    """[function(*job) for job in jobs], on up to `workers` forked processes (default: the cores this process
    may use): figures are drawn on one core each, and a run of many images drew them one after another. The
    forks only draw with matplotlib and PIL (never CUDA, which a fork cannot use); where fork is not the
    platform's way (macOS, Windows), or for a single job, they run here."""
    workers = min(len(jobs), workers or usable_cores())
    if workers <= 1 or sys.platform != "linux":
        return [function(*job) for job in jobs]
    pool = _drawing_pool(workers)
    try:
        drawing = pool.map(function, *zip(*jobs))
        raise_if_stopped()  # a stop that came while a drawing process forked is raised now, not at the end
        return list(drawing)
    finally:  # on Ctrl-C or an error, the jobs not started are dropped; running ones end in seconds
        pool.shutdown(wait=True, cancel_futures=True)


def _drawing_pool(workers: int) -> ProcessPoolExecutor:
    """`workers` processes forked from this one (its imports and files at hand), each leaving stop signals
    to this process and ending with it."""
    pyplot()  # imported once here, not once in each process forked below (0.2 s of CPU each)
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"),
                               initializer=_drawing_process, initargs=(os.getpid(),))


PR_SET_PDEATHSIG = 1  # Linux's prctl option: the signal a process gets when its parent ends


def _drawing_process(parent: int) -> None:
    """In a drawing process: Ctrl-C, SIGTERM and SIGHUP reach the whole process group, and the parent says
    the one line about them (a worker would print a traceback of its own). It is killed when the parent ends:
    a dsl killed outright (SIGKILL, the OOM killer, a scheduler's hard limit) left its drawing processes
    waiting for work forever, with a copy of its memory and its output streams open, so that a shell or
    script waiting for that output waited too."""
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    prctl = getattr(ctypes.CDLL(None), "prctl", None)  # drawing pools exist on Linux only (glibc, musl)
    if prctl is not None:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent ended before the line above
        os._exit(0)


@contextmanager
def drawn_from_files(run_dir: Path) -> Iterator[None]:
    """Figures drawn from a folder's CSVs: a value missing or not what dsl writes there (a file edited by hand
    or cut short) is one UserError line, not a traceback."""
    try:
        yield
    except (KeyError, ValueError, TypeError) as err:
        raise UserError(f"{run_dir}: a CSV value is not what dsl writes ({type(err).__name__}: {err})") from err

SCORES = ("dsl", "direct", "direct_importance")  # what head importance is correlated with (default lenses)
POOLED = "pooled"  # the `image` value of correlations over all (image, head) rows
DEFAULT_LENSES = ("steering", "direct")  # what a study compares unless `study.lenses` says otherwise
LENS_COLUMNS = {"steering": "dsl"}  # a study's score column of a lens, where it is not the lens's name


def score_column(lens: str) -> str:
    """The column (and overlay order) a study writes lens `lens`'s score in: `dsl` for the steering lens (DSL),
    the lens's own name for every other one (`direct`, ...)."""
    return LENS_COLUMNS.get(lens, lens)


def importance_scores(rows: list[dict]) -> list[str]:
    """The scores head importance was correlated with, as its CSV rows hold them: dsl, direct and
    direct_importance, then one per further lens (a column beyond `outputs.ImportanceRow`'s), each where it
    holds a value."""
    extra = [k for k in dict.fromkeys(k for r in rows for k in r) if k not in IMPORTANCE.columns]
    return [c for c in (*SCORES, *extra) if not rows or any(r.get(c) is not None for r in rows)]


SCORE_TITLES = {"dsl": ("DSL score", "cos(DSL embedding, e)"), "direct": ("naive-lens score", "cos(R(write), e)"),
                "direct_importance": ("direct importance", "1 - cos(R(x_L - write), e)")}


def score_title(score: str) -> tuple[str, str]:
    """(title, formula) of a score column: a further lens's is its score, cos(its embedding, e)."""
    return SCORE_TITLES.get(score, (f"{score} score", f"cos({score} embedding, e)"))


def _pooled_title(lens: str, pooled: dict) -> str:
    """A head-importance panel's title: the pooled correlations (over all (image, head) pairs at once, n of
    them) with their bootstrap 95 % intervals."""
    def value(key: str) -> float:
        number = pooled.get(key)
        return math.nan if number is None else float(number)

    n = int(value("n")) if math.isfinite(value("n")) else 0
    parts = [f"{name.capitalize()} {value(name):.3f} [{value(name + '_low'):.3f}, {value(name + '_high'):.3f}]"
             for name in ("spearman", "pearson")]
    return f"{lens}\npooled over n = {n} (image, head) pairs\n{parts[0]} (95 % CI)\n{parts[1]}"


def plot_head_importance(rows: list[dict], corr: list[dict]):
    """Importance vs each score (DSL, naive lens, closed-form direct importance), a column per score and a
    row per ablation, a colour per image; each title gives the Spearman and Pearson correlations pooled
    over all (image, head) pairs with their bootstrap 95 % intervals and n; the figure's title the
    settings. Rows and correlations as written (dicts of numbers) or as read back from the CSVs (strings).
    Returns the matplotlib figure."""
    plt = pyplot()
    blocks = group_rows(rows, ("ablation",))
    scores = importance_scores(rows)
    fig, axes = plt.subplots(max(1, len(blocks)), len(scores), figsize=(5.2 * len(scores), 0.8 + 4.6 * len(blocks)),
                             squeeze=False, layout="constrained")
    pooled = {(r["ablation"], r["lens"]): r for r in corr if r["image"] == POOLED}
    for line, ((ablation,), block) in zip(axes, blocks.items()):
        for axis, lens in zip(line, scores):
            for (image,), group in group_rows(block, ("image",)).items():
                axis.scatter([r[lens] for r in group], [r["importance"] for r in group], s=12,
                             alpha=0.7, label=image)
            title, formula = score_title(lens)
            axis.set_title(_pooled_title(f"{ablation} ablation, {title}", pooled.get((ablation, lens), {})),
                           fontsize=9)
            axis.set_xlabel(f"{title}: {formula}")
            axis.set_ylabel(f"importance: 1 - cos(e {ablation}-ablated, e)")
    images = group_rows(rows, ("image",))
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="outside lower center", ncols=min(6, len(images)),
               fontsize=8)
    first = rows[0] if rows else {}
    heads = len(rows) // max(1, len(images) * len(blocks))
    alpha = math.nan if first.get("alpha") is None else first["alpha"]
    fig.suptitle(f"head importance: DSL {first.get('mode', '')} alpha {alpha:g}; "
                 f"{len(images)} images x {heads} heads; points: (image, head) pairs", fontsize=10)
    return fig


# how each order is drawn: DSL on top, solid with dots; greedy dashed under it (it often takes the same heads)
ORDER_STYLES = {
    "dsl": {"color": "tab:blue", "linestyle": "-", "marker": "o", "markersize": 3.5, "linewidth": 1.6, "zorder": 4},
    "direct": {"color": "tab:green", "linestyle": "-.", "marker": "^", "markersize": 3.5, "linewidth": 1.4,
               "zorder": 3},
    "greedy": {"color": "tab:orange", "linestyle": "--", "marker": "s", "markersize": 5, "linewidth": 2.4,
               "markerfacecolor": "none", "zorder": 3},
    "random": {"color": "tab:gray", "linestyle": ":", "linewidth": 1.4, "zorder": 2},
}


def overlay_problem(group: list[dict]) -> str | None:
    """What is wrong with one composite's rows of study_overlay_removal.csv: every order's every run (seed)
    ablates the same heads, so each holds steps 0..N once; a row removed or repeated breaks that (the curves,
    drawn by position, were shifted a step and put a value at the wrong count of heads)."""
    runs = group_rows(group, ("order", "seed"))
    last = max((r["step"] for r in group), default=0)
    for (order, seed), run in runs.items():
        steps = sorted(r["step"] for r in run)
        if steps != list(range(last + 1)):
            gap = next((s for s in range(last + 1) if s not in steps), None)
            what = f"lacks step {gap}" if gap is not None else f"has {len(steps)} rows for {last + 1} steps"
            return f"{group[0]['image']} {order}" + (f" seed {seed}" if seed is not None else "") + f" {what}"
    return None


def _draw_orders(axis, group: list[dict]) -> None:
    """One composite's curves: each order's overlay similarity per step (placed by the rows' `step`, not their
    position in the file); random orders as mean +- 1 sd."""
    for (order,), lines in group_rows(group, ("order",)).items():
        curves = np.array([[r["overlay_sim"] for r in sorted(run, key=lambda r: r["step"])] for run in
                           group_rows(lines, ("seed",)).values()])  # [runs, steps + 1]
        x, mean = np.arange(curves.shape[1]), curves.mean(0)
        label = order if len(curves) == 1 else f"{order} (mean of {len(curves)}, band +-1 sd)"
        axis.plot(x, mean, label=label, **ORDER_STYLES.get(order, {}))
        if len(curves) > 1:
            std = curves.std(0)
            axis.fill_between(x, mean - std, mean + std, alpha=0.2, color=ORDER_STYLES.get(order, {}).get("color"),
                              zorder=1, linewidth=0)


def plot_overlay_removal(rows: list[dict], settings: str = ""):
    """Overlay similarity vs ablation step, one panel per composite titled with each order's area under the
    curve (random: their mean): the DSL, naive-lens and greedy orders as lines (DSL drawn over greedy), the
    random orders as their mean with a band of +-1 standard deviation; one
    legend for all panels, outside them; `settings` in the title. Returns the figure."""
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator

    groups = group_rows(rows, ("image",))
    problem = next(filter(None, map(overlay_problem, groups.values())), None)
    if problem is not None:
        raise UserError(f"{OVERLAY.name}: {problem}; the file was cut short or edited: restore it, or run the study "
                        "again into a new folder (hydra.run.dir)")
    columns = min(3, len(groups))
    n_rows = math.ceil(len(groups) / columns)
    fig, axes = plt.subplots(n_rows, columns, figsize=(4.6 * columns, 1.0 + 3.4 * n_rows), squeeze=False,
                             layout="constrained")
    for axis, ((image,), group) in zip(axes.flat, groups.items()):
        _draw_orders(axis, group)
        auc = {order: np.mean([r["auc"] for r in lines if r["step"] == 0])  # random: their mean
               for (order,), lines in group_rows(group, ("order",)).items()}
        axis.set_title(image + "\n" + textwrap.fill("area under the curve: " + ", ".join(
            f"{o} {v:.2f}" for o, v in auc.items()), 60), fontsize=8)
        axis.set_xlabel("heads ablated")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.set_ylabel("cos(e ablated composite, e foreground)")
    for axis in list(axes.flat)[len(groups):]:
        axis.axis("off")
    fig.legend(*axes.flat[0].get_legend_handles_labels(), loc="outside lower center", ncols=3, fontsize=8)
    fig.suptitle(textwrap.fill(f"overlay removal: {settings}" if settings else "overlay removal",
                               int(4.6 * columns * 72 / 6)), fontsize=10)
    return fig


def overlay_settings(rows: list[dict], config: dict, heads: int | None = None) -> str:
    """The settings of an overlay-removal study, for its title: ablation, the DSL ranking, the orders; `heads`,
    the number the study ablates, where known (a greedy pool at least that large is all of them)."""
    study, lens = config.get("study", {}), config.get("lens", {})
    random_orders = len({r["seed"] for r in rows if r["order"] == "random"})
    lenses = list(study.get("lenses") or DEFAULT_LENSES)
    short = {"steering": "DSL", "direct": "the naive lens"}
    named = [f"DSL ({lens.get('mode')}, alpha {float(lens.get('alpha', math.nan)):g})" if name == "steering"
             else short.get(name, f"the {name} lens") for name in lenses]
    pool = study.get("greedy_pool")
    if pool is None or (heads is not None and pool >= heads):
        greedy = f"greedy among all {heads} heads" if heads is not None else "greedy among all heads"
    else:
        greedy = f"greedy among the {pool} best by {short.get(lenses[0], lenses[0])}"
    return (f"{rows[0]['ablation'] if rows else ''} ablation; heads ranked by {' and by '.join(named)}; {greedy}; "
            f"{random_orders} random orders; overlay at {study.get('overlay_position', 'center')}, "
            f"scale {study.get('overlay_scale')}")


def _order_name(order: str, seed) -> str:
    return f"{order} (seed {seed})" if seed is not None else order


def draw_fade_grids(run_dir: Path, rows: list[dict]) -> list[Path]:
    """Per composite, the decoded ablated composites that `decode_kept` saved: a row per order (dsl, direct,
    greedy, the first random one), a column per step, each captioned with its overlay similarity:
    `grids/<composite>_overlay_fade.png`. Nothing where no picture was decoded."""
    written = []
    for (image,), group in group_rows(rows, ("image",)).items():
        first_seed = min((r["seed"] for r in group if r["order"] == "random"), default=None)
        runs = {(r["order"], r["step"]): r for r in group if r["order"] != "random" or r["seed"] == first_seed}
        found = {key: RunFolder(run_dir).overlay_step(image, *key) for key in runs}
        found = {key: path for key, path in found.items() if path.is_file()}
        if not found:
            continue
        steps = sorted({step for _, step in found})
        orders = [o for o in dict.fromkeys(order for order, _ in runs) if all((o, k) in found for k in steps)]
        tiles = [(open_picture(found[o, k], run_dir),
                  f"{_order_name(o, runs[o, k]['seed'])}, step {k}\noverlay sim {runs[o, k]['overlay_sim']:.3f}")
                 for o in orders for k in steps]
        path = RunFolder(run_dir).figure("grids", f"{image}_overlay_fade")
        title = f"{image}: the ablated composite decoded, a row per order, after {', '.join(map(str, steps))} heads"
        note = "overlay sim = cos(e of the ablated composite, e of the pasted image); lower: the pasted object is gone"
        save_png(path, grid_image(tiles, title, columns=len(steps), note=note))
        written.append(path)
    return written
