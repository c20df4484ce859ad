"""Outputs: the last stage. Everything a run writes, and `dsl plot`, which redraws figures from files alone.

Run folder layout:
    similarity.csv                         one tidy row per (image, lens, component, seed)
    labels.csv                             logit lens: top labels per component
    images/<image>/input.png               the input, centre-cropped to the decode size
    images/<image>/<lens>/<component>.png  decoded pictures
    grids/<image>_<lens>_L<layer>.png      input first, then each component of the layer, labelled
    grids/<image>_<lens>_top.png           the best-ranked decoded components of the image
    grids/<image>_<lens>_layers.png        diffusion and logit lenses: the residual stream, layer by layer
    heatmaps/<image>_<lens>.png            layers x (heads, MLP, residual) similarity
    plots/<image>_logit.png                logit lens: top label per layer
    manifest.json                          config, versions, device, timings, counts, status
    index.html                             the run's page (dsl_cli.report)

Every file is written under a temporary name and renamed, so a killed run never leaves half a file.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
import textwrap
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from dsl_cli.errors import UserError

COLUMNS = [
    "image", "lens", "component", "kind", "layer", "head", "mode", "alpha", "seed", "steps", "guidance",
    "sim_embed", "sim_decoded", "norm", "rank", "file",
]
LABEL_COLUMNS = ["image", "lens", "component", "layer", "head", "rank", "label", "score"]
TOP_TILES = 16  # tiles in the per-image top grid
CAPTION_LINES = 3  # a grid caption: component and rank, embed, decoded
NO_SCALE = "#e8e8e8"  # the grey of a heatmap block that holds a single value
HEATMAP_CELL = 0.5  # inches: a heatmap cell's width, room for a value such as -0.123
SIMILARITIES = {
    "sim_embed": "cos(lens embedding, input embedding)",
    "sim_decoded": "cos(embedding of the decoded picture, input embedding)",
}
CAPTION_NOTE = (f"#rank; embed = sim_embed = {SIMILARITIES['sim_embed']}; "
                f"decoded = sim_decoded = {SIMILARITIES['sim_decoded']}")


# ---------------------------------------------------------------- atomic files


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same folder and an atomic rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def save_png(path: Path, image: Image.Image) -> None:
    atomic_write_bytes(path, png_bytes(image))


def write_json(path: Path, data: dict) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=2, default=str) + "\n").encode())


def check_writable(folder: Path) -> None:
    """Fail early, with the fix, when the run folder cannot be written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise UserError(
            f"cannot write to the output folder {folder} ({err.strerror}); choose another with hydra.run.dir=..."
        ) from None


class Manifest:
    """manifest.json: what the run is, and how far it got; rewritten (atomically) after every change."""

    def __init__(self, path: Path):
        self.path, self.data = path, {}

    def update(self, **values) -> None:
        self.data.update(values)
        write_json(self.path, self.data)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time a stage; record it as done (with its seconds) when it finishes."""
        start = time.perf_counter()
        yield
        self.data.setdefault("seconds", {})[name] = round(time.perf_counter() - start, 3)
        self.update(stages_done=[*self.data.get("stages_done", []), name])


def read_manifest(folder: Path) -> dict | None:
    """The manifest.json of a run or sweep folder, or None where there is none."""
    path = folder / "manifest.json"
    return json.loads(path.read_text()) if path.is_file() else None


def is_sweep_folder(folder: Path) -> bool:
    """A --multirun sweep folder: Hydra saved the sweep's config there; its jobs are run folders below."""
    return (folder / "multirun.yaml").is_file()


def refuse_existing_run(folder: Path) -> None:
    """A fresh run must not write into a folder that holds one: it would take that run's rows as its own
    (and Hydra would overwrite the saved config that `resume=` reads)."""
    if (folder / "manifest.json").exists():
        raise UserError(f"{folder} already holds a run: complete it with `dsl run resume={folder}` "
                        "or choose another hydra.run.dir")


# ---------------------------------------------------------------- CSV


def _format(value) -> str:
    """CSV text of a value; floats at 6 decimals so that float noise below that never changes a file."""
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6f}"
    return str(value)


class CsvLog:
    """An append-only CSV whose rows are on disk as soon as `append` returns (flushed and fsynced)."""

    def __init__(self, path: Path, columns: list[str]):
        self.path, self.columns = path, columns
        if not path.exists():
            atomic_write_bytes(path, (",".join(columns) + "\n").encode())

    def append(self, rows: Iterable[dict]) -> None:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, self.columns, lineterminator="\n")
        writer.writerows({k: _format(row.get(k)) for k in self.columns} for row in rows)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(buffer.getvalue())
            handle.flush()
            os.fsync(handle.fileno())

    def rewrite(self, rows: list[dict]) -> None:
        """Replace the whole file at once (used to drop a torn last line and to store final ranks)."""
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, self.columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: _format(row.get(k)) for k in self.columns} for row in rows)
        atomic_write_bytes(self.path, buffer.getvalue().encode())


def read_csv(path: Path, columns: list[str] = COLUMNS) -> list[dict]:
    """Rows of a CSV written by CsvLog; a torn last line (a killed run) is dropped."""
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines = lines[:-1]
    rows = list(csv.DictReader(lines))
    return [row for row in rows if len(row) == len(columns) and None not in row.values()]


# ---------------------------------------------------------------- figures


def pyplot():
    """matplotlib's pyplot on the Agg backend: figures are files here, never windows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> None:
    """A matplotlib figure as PNG, written atomically and without a timestamp (reruns give equal files)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, metadata={"Software": None})
    pyplot().close(fig)
    atomic_write_bytes(path, buffer.getvalue())


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


def settings_text(row: dict) -> str:
    """The settings a row of similarity.csv was made with, for titles:
    `steering lens (norm, alpha 2), seed 0, 100 steps, guidance 4`."""
    lens = f"{row['lens']} lens"
    if row.get("mode"):
        lens += f" ({row['mode']}, alpha {float(row['alpha']):g})"
    return f"{lens}, seed {row['seed']}, {row['steps']} steps, guidance {float(row['guidance']):g}"


def _caption(row: dict) -> str:
    text = f"{row['component']}  #{row['rank']}\nembed {float(row['sim_embed']):.3f}"
    if row.get("sim_decoded"):
        text += f"\ndecoded {float(row['sim_decoded']):.3f}"
    return text


def _tiles(run_dir: Path, image: str, rows: list[dict]) -> list[tuple[Image.Image, str]]:
    tiles = [(Image.open(run_dir / "images" / image / "input.png"), f"{image} (input)")]
    for row in rows:
        with Image.open(run_dir / row["file"]) as picture:
            tiles.append((picture.copy(), _caption(row)))
    return tiles


def grid_plan(rows: list[dict]) -> list[tuple[str, list[dict], str]]:
    """The grids of one image and lens as (name suffix, rows, what they show): the residual stream layer by
    layer (when several layers), one grid per layer, the best-ranked; a grid whose pictures all appear in
    one planned before it is left out (a one-layer run's best grid is its layer's grid)."""
    stream = [r for r in rows if r["kind"] in ("resid", "resid_mid")]
    plan = [("layers", stream, "residual stream, layer by layer")] if len(stream) > 1 else []
    plan += [(f"L{int(layer):02d}", layer_rows, f"layer {layer}")
             for (layer,), layer_rows in group_rows(rows, ("layer",)).items()]
    best = sorted(rows, key=lambda r: int(r["rank"]))[:TOP_TILES]
    plan.append(("top", best, f"best {len(best)} by rank"))
    kept: list[tuple[str, list[dict], str]] = []
    for name, plan_rows, what in plan:
        shown = {r["component"] for r in plan_rows}
        if not any(shown <= {r["component"] for r in earlier} for _, earlier, _ in kept):
            kept.append((name, plan_rows, what))
    return kept


def draw_grids(run_dir: Path, rows: list[dict]) -> list[Path]:
    """Per image and lens, the grids of `grid_plan`, titled with the image, what they show and the run's
    settings, captions explained in a note under the title."""
    written = []
    for (image, lens), group in group_rows([r for r in rows if r["file"]], ("image", "lens")).items():
        for name, tile_rows, what in grid_plan(group):
            path = run_dir / "grids" / f"{image}_{lens}_{name}.png"
            title = f"{image}: {what} | {settings_text(group[0])}"
            save_png(path, grid_image(_tiles(run_dir, image, tile_rows), title, note=CAPTION_NOTE))
            written.append(path)
    return written


def group_rows(rows: list[dict], keys: tuple[str, ...]) -> dict[tuple, list[dict]]:
    """Rows by the values of `keys`, in first-seen order."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in keys), []).append(row)
    return groups


def _column_name(row: dict) -> str:
    if row["kind"] == "head":
        return f"H{int(row['head']):02d}"
    return {"mlp": "MLP", "resid": "resid", "resid_mid": "mid"}.get(row["kind"], row["kind"])


def heatmap_cells(rows: list[dict]) -> tuple[list[int], list[str], dict[tuple[int, int], dict]]:
    """Rows arranged as layers x columns (heads in order, MLP, mid, resid): (layers, column names,
    {(layer index, column index): row})."""
    layers = sorted({int(r["layer"]) for r in rows})
    names = {_column_name(r) for r in rows}
    columns = sorted(n for n in names if n.startswith("H")) + [n for n in ("MLP", "mid", "resid") if n in names]
    cells = {(layers.index(int(r["layer"])), columns.index(_column_name(r))): r for r in rows}
    return layers, columns, cells


def heatmap_matrix(rows: list[dict], value: str) -> tuple[list[int], list[str], np.ndarray]:
    """`value` of each row arranged as in `heatmap_cells`: (layers, columns, [layers, columns]); NaN if absent."""
    layers, columns, cells = heatmap_cells(rows)
    matrix = np.full((len(layers), len(columns)), np.nan)
    for (i, j), row in cells.items():
        if row.get(value):
            matrix[i, j] = float(row[value])
    return layers, columns, matrix


def kind_blocks(columns: list[str]) -> list[tuple[str, list[int]]]:
    """Heatmap columns by component kind, each kind on its own colour scale (the residual stream's
    similarities near 1 would flatten the heads' 0.1 to 0.3): [(heads | MLP | mid | resid, column indices)]."""
    blocks = [("heads", [i for i, c in enumerate(columns) if c.startswith("H")])]
    blocks += [(name, [columns.index(name)]) for name in ("MLP", "mid", "resid") if name in columns]
    return [(name, indices) for name, indices in blocks if indices]


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


def _draw_block(axis, bar, values: np.ndarray, names: list[str], layers: list[int], kind: str) -> None:
    """One kind's columns of a heatmap panel: cells coloured on the kind's own scale (its colour bar in
    `bar`), each with its value; a block of a single value is grey, with no colour bar: a scale of one
    value says nothing."""
    from matplotlib.colors import ListedColormap
    from matplotlib.ticker import MaxNLocator

    limits = colour_limits(values)
    low, high = limits or (-1.0, 1.0)
    cmap = "viridis" if limits else ListedColormap([NO_SCALE])
    shown = axis.imshow(values, cmap=cmap, vmin=low, vmax=high, aspect="auto", interpolation="nearest")
    for (i, j), value in np.ndenumerate(values):
        if np.isfinite(value):
            axis.text(j, i, f"{value:.3f}", ha="center", va="center", fontsize=7, in_layout=False,  # inside
                      color="white" if dark_cell(value, limits) else "black")  # its cell: no room to make
    axis.set_xticks(range(len(names)), names, rotation=90 if len(names) > 1 else 0, fontsize=7)
    axis.set_yticks(range(len(layers)), [layer_label(l) for l in layers], fontsize=7)
    axis.set_title(kind, fontsize=8)
    if limits:
        axis.figure.colorbar(shown, cax=bar, ticks=MaxNLocator(nbins=4)).ax.tick_params(labelsize=7)
    else:
        bar.axis("off")


def heatmap_figure(rows: list[dict], title: str):
    """Similarity to the input over layers x components of one image and lens: a panel per similarity
    (sim_embed, then sim_decoded where pictures were decoded), each split by component kind, every kind on
    its own colour scale, every cell labelled with its value. `title`'s lines are wrapped to the figure's
    width. Returns the matplotlib figure."""
    plt = pyplot()
    panels = [v for v in ("sim_embed", "sim_decoded") if any(r.get(v) for r in rows)]
    layers, columns, _ = heatmap_matrix(rows, panels[0])
    blocks = kind_blocks(columns)
    cell_height = max(0.3, 0.75 / len(layers))  # a one-layer panel still has room for a colour bar's ticks
    needed = 0.2 + sum(HEATMAP_CELL * len(indices) + 1.3 for _, indices in blocks)
    width = max(5.5, needed)  # room for the title; the blocks keep their width, centred
    fig = plt.figure(figsize=(width, 0.8 + len(panels) * (1.0 + cell_height * len(layers))), layout="constrained")
    # each kind's columns, then a narrow column for its colour bar: every cell as wide as any other
    margin = (width - needed) / 2 / HEATMAP_CELL
    ratios = [margin + 1e-3, *(r for _, indices in blocks for r in (len(indices), 0.25)), margin + 1e-3]
    for subfig, value in zip(np.atleast_1d(fig.subfigures(len(panels), 1)), panels):
        _, _, matrix = heatmap_matrix(rows, value)
        axes = subfig.subplots(1, len(ratios), width_ratios=ratios)
        for spare in (axes[0], axes[-1]):
            spare.axis("off")
        for n, (kind, indices) in enumerate(blocks):
            _draw_block(axes[2 * n + 1], axes[2 * n + 2], matrix[:, indices], [columns[i] for i in indices],
                        layers, kind)
        subfig.suptitle(f"{value}: {SIMILARITIES[value]}", fontsize=8)
    chars = int(width * 72 / 5.5)  # characters of 9-point text that fit across the figure
    fig.suptitle("\n".join(textwrap.fill(line, chars) for line in title.splitlines()), fontsize=9)
    return fig


def draw_heatmaps(run_dir: Path, rows: list[dict]) -> list[Path]:
    """Per image and lens: `heatmap_figure`, titled with the image and the run's settings."""
    written = []
    for (image, lens), group in group_rows(rows, ("image", "lens")).items():
        fig = heatmap_figure(group, f"{image}: similarity to the input, per layer and component\n"
                                    f"{settings_text(group[0])}")
        path = run_dir / "heatmaps" / f"{image}_{lens}.png"
        save_figure(fig, path)
        written.append(path)
    return written


def draw_label_plots(run_dir: Path, label_rows: list[dict]) -> list[Path]:
    """Logit lens: per image, the top label of each component with its cosine, as a bar chart."""
    plt = pyplot()
    written = []
    for (image,), group in group_rows([r for r in label_rows if r["rank"] == "1"], ("image",)).items():
        fig, axis = plt.subplots(figsize=(7, 1 + 0.28 * len(group)))
        scores = [float(r["score"]) for r in group]
        axis.barh(range(len(group)), scores, color="tab:blue")
        axis.set_yticks(range(len(group)), [f"{r['component']}: {r['label']}" for r in group], fontsize=7)
        axis.invert_yaxis()
        axis.set_xlabel("cosine of the component's embedding with the class's text embedding")
        axis.set_title(f"{image}: logit lens, the top ImageNet label of each component", fontsize=9)
        fig.tight_layout()
        path = run_dir / "plots" / f"{image}_logit.png"
        save_figure(fig, path)
        written.append(path)
    return written


def redraw(run_dir: Path) -> list[Path]:
    """Draw every grid, heatmap and label plot of a run from its files alone (no model, no GPU)."""
    csv_path = run_dir / "similarity.csv"
    if not csv_path.is_file():
        raise UserError(f"{run_dir}: no similarity.csv here; give the folder of a dsl run")
    rows = read_csv(csv_path)
    if not rows:
        raise UserError(f"{csv_path}: no rows yet; finish the run first (dsl run resume={run_dir})")
    written = draw_grids(run_dir, rows) + draw_heatmaps(run_dir, rows)
    labels = run_dir / "labels.csv"
    if labels.is_file():
        written += draw_label_plots(run_dir, read_csv(labels, LABEL_COLUMNS))
    return written
