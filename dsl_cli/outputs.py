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
    index.html                             every figure on one page

Every file is written under a temporary name and renamed, so a killed run never leaves half a file.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
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


def grid_image(tiles: list[tuple[Image.Image, str]], title: str, tile: int = 192, columns: int = 6) -> Image.Image:
    """Tiles with a (one- or two-line) caption under each, in rows of `columns`, and a title line on top."""
    columns = max(1, min(columns, len(tiles)))
    rows = math.ceil(len(tiles) / columns)
    line, top = max(14, tile // 12), max(20, tile // 8)
    cell = tile + 2 * line + 8
    sheet = Image.new("RGB", (columns * tile, top + rows * cell), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((4, 2), title, fill="black", font=_font(top - 6))
    for index, (picture, text) in enumerate(tiles):
        x, y = (index % columns) * tile, top + (index // columns) * cell
        sheet.paste(picture.convert("RGB").resize((tile, tile), Image.Resampling.BICUBIC), (x, y))
        draw.multiline_text((x + 3, y + tile + 2), text, fill="black", font=_font(line - 2), spacing=2)
    return sheet


def _caption(row: dict) -> str:
    text = f"{row['component']}  #{row['rank']}\nembed {float(row['sim_embed']):.3f}"
    if row.get("sim_decoded"):
        text += f"  decoded {float(row['sim_decoded']):.3f}"
    return text


def _tiles(run_dir: Path, image: str, rows: list[dict]) -> list[tuple[Image.Image, str]]:
    tiles = [(Image.open(run_dir / "images" / image / "input.png"), f"{image} (input)")]
    for row in rows:
        with Image.open(run_dir / row["file"]) as picture:
            tiles.append((picture.copy(), _caption(row)))
    return tiles


def draw_grids(run_dir: Path, rows: list[dict]) -> list[Path]:
    """Per image and lens: one grid per layer, one of the best-ranked decoded components, and, when several
    layers were decoded, one of the residual stream layer by layer (the Diffusion Lens figure)."""
    written = []
    decoded = [r for r in rows if r["file"]]

    def grid(name: str, tile_rows: list[dict], image: str, title: str) -> None:
        path = run_dir / "grids" / name
        save_png(path, grid_image(_tiles(run_dir, image, tile_rows), title))
        written.append(path)

    for (image, lens), group in group_rows(decoded, ("image", "lens")).items():
        for (layer,), layer_rows in group_rows(group, ("layer",)).items():
            grid(f"{image}_{lens}_L{int(layer):02d}.png", layer_rows, image, f"{image}  {lens}  layer {layer}")
        best = sorted(group, key=lambda r: int(r["rank"]))[:TOP_TILES]
        grid(f"{image}_{lens}_top.png", best, image, f"{image}  {lens}  best {len(best)} by rank")
        stream = [r for r in group if r["kind"] in ("resid", "resid_mid")]
        if len(stream) > 1:
            grid(f"{image}_{lens}_layers.png", stream, image, f"{image}  {lens}  residual stream, layer by layer")
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


def heatmap_matrix(rows: list[dict], value: str) -> tuple[list[int], list[str], np.ndarray]:
    """`value` of each row arranged as layers x columns (heads in order, MLP, mid, resid); NaN if absent."""
    layers = sorted({int(r["layer"]) for r in rows})
    names = {_column_name(r) for r in rows}
    columns = sorted(n for n in names if n.startswith("H")) + [n for n in ("MLP", "mid", "resid") if n in names]
    matrix = np.full((len(layers), len(columns)), np.nan)
    for row in rows:
        if row.get(value):
            matrix[layers.index(int(row["layer"])), columns.index(_column_name(row))] = float(row[value])
    return layers, columns, matrix


def draw_heatmaps(run_dir: Path, rows: list[dict], tag: str = "") -> list[Path]:
    """Per image and lens: similarity to the input over layers x components (embedding and decoded);
    `tag` (a sweep's heatmaps for one value of an override, `lens.alpha=4`) ends the file names and titles."""
    plt = pyplot()
    written = []
    for (image, lens), group in group_rows(rows, ("image", "lens")).items():
        panels = [v for v in ("sim_embed", "sim_decoded") if any(r.get(v) for r in group)]
        layers, columns, _ = heatmap_matrix(group, panels[0])
        width = 1.6 + 0.45 * len(columns)
        height = 1.2 + 0.3 * len(layers)
        fig, axes = plt.subplots(1, len(panels), figsize=(width * len(panels), height), squeeze=False)
        for axis, value in zip(axes[0], panels):
            _, _, matrix = heatmap_matrix(group, value)
            shown = axis.imshow(matrix, cmap="viridis", aspect="auto", interpolation="nearest")
            axis.set_xticks(range(len(columns)), columns, rotation=90, fontsize=7)
            axis.set_yticks(range(len(layers)), [f"L{l}" for l in layers], fontsize=7)
            axis.set_title(f"{value} ({lens})", fontsize=9)
            fig.colorbar(shown, ax=axis, fraction=0.05)
        fig.suptitle(f"{image}  {tag}".strip(), fontsize=10)
        fig.tight_layout()
        path = run_dir / "heatmaps" / (f"{image}_{lens}_{tag}.png" if tag else f"{image}_{lens}.png")
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
        axis.set_xlabel("cosine with the class text embedding")
        axis.set_title(f"{image}: logit lens, top label per component", fontsize=9)
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
    write_index(run_dir, written)
    return written


def redraw_folder(folder: Path) -> dict[Path, int]:
    """`redraw` for a run folder, or for every run below a folder (a --multirun sweep, a date folder):
    {run folder: figures drawn}."""
    if ((folder / "similarity.csv").is_file() and not is_sweep_folder(folder)) or not folder.is_dir():
        return {folder: len(redraw(folder))}
    runs = sorted(p.parent for p in folder.rglob("similarity.csv") if not is_sweep_folder(p.parent))
    if not runs:
        raise UserError(f"{folder}: no dsl run here (no similarity.csv in it or below it)")
    return {run: len(redraw(run)) for run in runs}


def write_index(run_dir: Path, figures: list[Path]) -> None:
    """index.html: every figure of the run on one page, best-ranked grids first, for a quick look."""
    def order(path: Path) -> tuple:
        return (path.parent.name != "grids" or not path.stem.endswith("_top"), str(path))

    items = "\n".join(
        f'<figure><img src="{p.relative_to(run_dir)}" loading="lazy"><figcaption>{p.relative_to(run_dir)}'
        "</figcaption></figure>" for p in sorted(figures, key=order)
    )
    page = (f"<!doctype html><meta charset='utf-8'><title>dsl run {run_dir.name}</title>"
            "<style>img{max-width:100%}figure{margin:1em 0}</style>"
            f"<h1>{run_dir}</h1><p><a href='similarity.csv'>similarity.csv</a> · "
            f"<a href='manifest.json'>manifest.json</a></p>\n{items}\n")
    atomic_write_bytes(run_dir / "index.html", page.encode())
