"""The report: an `index.html` in every run, study and sweep folder, written from the folder's files alone.

    run     settings; per image its input, its heatmaps (each cell a link to its picture), the best-ranked
            pictures with their scores and its figures; a table of every component, sorted by a click on
            any column and filtered by image, layer and kind; links to every CSV, the manifest and the log
    study   settings; the study's plot and summary tables; links to its files
    sweep   its jobs with their overrides, status, rows and pages; its heatmaps, job beside job

Pages open from file:// with no server and no network: one inline style sheet, one small inline script,
relative links only, and every text escaped. `dsl report FOLDER` (re)writes the pages of a folder and of
every run, study and sweep below it; `dsl plot FOLDER` draws their figures again first; a run writes its
page when it ends.
"""

from __future__ import annotations

import os
import sys
from functools import partial
from pathlib import Path
from typing import Callable, TypeVar
from urllib.parse import quote

import numpy as np

from dsl_cli.errors import PartlyDone, UserError
from dsl_cli.config import decoder_text, encoder_text
from dsl_cli.figures import (NO_SCALE, POOLED, SIMILARITIES, TOP_TILES, colour_limits, dark_cell,
                             drawn_from_files, heatmap_cells, heatmap_matrix, importance_scores,
                             kind_blocks, layer_label, read_tables, redraw, refuse_foreign_pictures)
from dsl_cli.html_parts import esc, img, link, linked_img, rel
from dsl_cli.outputs import (SIMILARITY, RunFolder, atomic_write_bytes, claimed, csv_text, first_label, group_rows,
                             is_sweep_folder, read_bytes_nofollow, read_manifest, run_rows)
from dsl_cli.sae_report import features_section, sae_components_text  # SAE features, without torch
from dsl_cli.study_registry import find_study, redraw_study, refuse_unregistered

STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:1.2em 2em;color:#222;max-width:110em}
h1{font-size:1.5em;margin:.2em 0}h2{font-size:1.2em;margin:1.6em 0 .4em;border-bottom:1px solid #ccc}
h3{font-size:1em;margin:1em 0 .3em}
table{border-collapse:collapse;margin:.3em 0}td,th{padding:2px 7px;text-align:left;vertical-align:top}
table.grid td,table.grid th{border:1px solid #ddd}tbody tr:nth-child(even){background:#f6f6f6}
table.settings th{font-weight:600;white-space:nowrap}
th[data-type]{cursor:pointer;user-select:none;background:#eee;position:sticky;top:0}
th[aria-sort=descending]::after{content:" \\25BC"}th[aria-sort=ascending]::after{content:" \\25B2"}
td.n{text-align:right;font-variant-numeric:tabular-nums}
table.heat td{width:3.6em;height:1.8em;text-align:center;font-size:12px;padding:0;border:1px solid #fff}
table.heat td a{display:block;color:inherit;text-decoration:none;line-height:1.8em}
table.heat th{font-size:12px;font-weight:normal;text-align:center}div.heat p{margin:0 0 .3em}
.row{display:flex;flex-wrap:wrap;gap:1.5em;align-items:flex-start}
figure{margin:0}figcaption{font-size:12px}.gallery{display:flex;flex-wrap:wrap;gap:.6em}
.gallery img,.input img{width:128px;height:128px;object-fit:cover;image-rendering:pixelated}
.figures img{max-width:100%}.figures figure{margin:.8em 0}
.thumbs img{max-width:26em;max-height:18em;border:1px solid #ddd}
.status{padding:1px 8px;border-radius:8px;background:#ddd}.complete{background:#cfe8cf}
.failed,.interrupted{background:#f3c9c9}.running,.started{background:#f3e3b5}
.scale{display:inline-block;width:6em;height:.8em;background:linear-gradient(90deg,#440154,#21918c,#fde725)}
.muted{color:#666}.filters select{margin-right:1em}p.what{margin:.2em 0 .6em}
"""
# sorting: a click on a column header sorts the rows by it (numbers high to low first, text A to Z; a
# second click reverses); filtering: the <select>s of a section keep the rows whose data-* values match
SCRIPT = """
function sortBy(th){const t=th.closest('table'),i=th.cellIndex,num=th.dataset.type==='num';
const desc=th.getAttribute('aria-sort')?th.getAttribute('aria-sort')==='ascending':num;
t.querySelectorAll('th[aria-sort]').forEach(h=>h.removeAttribute('aria-sort'));
th.setAttribute('aria-sort',desc?'descending':'ascending');
const key=r=>{const c=r.cells[i],v=c.dataset.v!==undefined?c.dataset.v:c.textContent;
return num?(v===''?NaN:Number(v)):v};
const rows=[...t.tBodies[0].rows];rows.sort((a,b)=>{let x=key(a),y=key(b);
if(num){if(isNaN(x)||isNaN(y))return isNaN(x)-isNaN(y);return desc?y-x:x-y}
return desc?y.localeCompare(x,undefined,{numeric:true}):x.localeCompare(y,undefined,{numeric:true})});
t.tBodies[0].append(...rows)}
document.querySelectorAll('th[data-type]').forEach(th=>{th.addEventListener('click',()=>sortBy(th));
th.addEventListener('keydown',e=>{if(e.key==='Enter')sortBy(th)})});
function filterRows(box){const sels=[...box.querySelectorAll('select[data-filter]')];let n=0;
box.querySelectorAll('tbody tr').forEach(r=>{const ok=sels.every(s=>!s.value||r.dataset[s.dataset.filter]===s.value);
r.hidden=!ok;n+=ok});box.querySelector('.count').textContent=n+' shown'}
document.querySelectorAll('select[data-filter]').forEach(s=>s.addEventListener('change',
()=>filterRows(s.closest('section'))));
"""


# ---------------------------------------------------------------- HTML pieces


def cell(text, sort=None, numeric: bool = False) -> str:
    """A <td>; `sort` (data-v) is what the page's script sorts by when it differs from the text."""
    attrs = (f' data-v="{esc(sort)}"' if sort is not None else "") + (' class="n"' if numeric else "")
    return f"<td{attrs}>{text}</td>"


def number(value, digits: int = 3) -> str:
    """A numeric <td> from a CSV value (None or '' stays empty), sorted by the value as the CSV holds it."""
    if value in (None, ""):
        return cell("", "", True)
    return cell(f"{value:.{digits}f}", csv_text(value), True)


def table(head: list[str], body: list[str], numeric: set[str] = frozenset()) -> str:
    """A table whose columns sort on a click (`numeric` ones as numbers); `body`: its <tr>s."""
    def th(name: str) -> str:
        return f'<th data-type="{"num" if name in numeric else "text"}" tabindex="0">{esc(name)}</th>'

    return (f'<table class="grid"><thead><tr>{"".join(th(h) for h in head)}</tr></thead>\n'
            f'<tbody>\n{"".join(body)}\n</tbody></table>')


def filters(rows: list[dict], keys: list[tuple[str, str]]) -> str:
    """<select>s that keep the table rows whose data-<key> is the chosen value; `keys`: (data key, label)."""
    boxes = []
    for key, label in keys:
        values = sorted({esc(r[key]) for r in rows}, key=lambda v: (len(v), v))  # 2 before 10
        options = "".join(f'<option value="{v}">{v}</option>' for v in values)
        boxes.append(f'<label>{esc(label)} <select data-filter="{esc(key)}"><option value="">all</option>'
                     f"{options}</select></label>")
    return f'<p class="filters">{"".join(boxes)}<span class="count muted">{len(rows)} shown</span></p>'


def row_attrs(row: dict, keys: list[str]) -> str:
    """data-* attributes of a table row, which the filters match."""
    return "".join(f' data-{k}="{esc(row[k])}"' for k in keys)


def page(title: str, body: str) -> str:
    return ("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"{GENERATOR}<title>{esc(title)}</title><style>{STYLE}</style></head>\n<body>\n{body}\n"
            f"<script>{SCRIPT}</script>\n</body></html>\n")


# ---------------------------------------------------------------- what every page has


def header(folder: Path, manifest: dict, kind: str) -> str:
    """Title: the folder's name (only: the page stays the same when the folder moves), its status and the
    error of a run that failed."""
    error = f'<p class="failed">{esc(manifest["error"])}</p>' if manifest.get("error") else ""
    return f"<h1>dsl {esc(kind)} {esc(folder.resolve().name)} {status_badge(manifest.get('status'))}</h1>{error}"


def _model_settings(cfg: dict, manifest: dict, rows: list[dict] | None = None) -> list[tuple[str, str]]:
    encoder, decoder, lens = (cfg.get(k, {}) for k in ("encoder", "decoder", "lens"))
    return [
        ("encoder", encoder_text(encoder) + (f" from {encoder['checkpoint']}" if encoder.get("checkpoint") else "")),
        ("decoder", decoder_text(decoder) + (f" from {decoder['path']}" if decoder.get("path") else "")),
        ("lens", lens_text(lens, manifest.get("lens_settings"))),
        ("mode, alpha", f"{lens.get('mode')}, {lens.get('alpha')}" if lens.get("name") == "steering" or
         cfg.get("study", {}).get("name") else "not used by this lens"),
        ("components", components_read(cfg, manifest, rows)),
        ("images", ", ".join(manifest.get("images", [])) + (f"; skipped {manifest['skipped']}"
                                                             if manifest.get("skipped") else "")),
        ("seed", cfg.get("seed", manifest.get("seed", ""))),
        # what the run used (the manifest); the setting for runs from before that was recorded
        ("encoder dtype", manifest.get("encoder_dtype") or encoder.get("dtype") or cfg.get("dtype", "")),
    ]


def lens_text(lens: dict, own: list | None = None) -> str:
    """The lens, with the target an attribution lens measures its shares of cos(embedding, target) against
    (the scores mean nothing without it); a lens of the user's with the settings it declared (`own`, the
    manifest's `lens_settings`: `blend 0.3`)."""
    if own:
        return ", ".join([str(lens.get("name", "")), *(f"{key} {_value(lens.get(key))}" for key in own)])
    if lens.get("name") != "attribution":
        return lens.get("name", "")
    target = lens.get("target")
    return f'attribution, target "{target}"' if target else "attribution, target: each image's own embedding"


def components_read(cfg: dict, manifest: dict, rows: list[dict] | None = None) -> str:
    """What a run read: the layers it recorded (`layer_ranges`) and the heads its rows hold (a study: the heads
    it recorded), before the settings asked (`layer=30`) where those differ (`clamp_to_model` moved a layer or
    head beyond a smaller model); an SAE run's features (`sae_components_text`). A run from before the layers
    were recorded: its settings."""
    count = f": {manifest['components']} per image" if "components" in manifest else ""
    layers = manifest.get("layers") if isinstance(manifest.get("layers"), list) else None
    sae = sae_components_text(cfg, manifest)
    if sae or not layers:
        clamped = ("; clamp_to_model: a layer or head beyond the model is read as its last"
                   if cfg.get("clamp_to_model") and not sae else "")
        return ((sae or f"layer={_value(cfg.get('layer'))} head={_value(cfg.get('head'))} "
                        f"component={_value(cfg.get('component'))}")
                + count + (f", layers read {layer_ranges(layers)}" if layers else clamped))
    component = cfg.get("component")
    labels = component not in ("heads", "mlp", "all", None)  # labels (`[L3H01, L2MLP]`): layer= and head= unused
    heads = sorted({r["head"] for r in rows or [] if r.get("kind") == "head" and isinstance(r.get("head"), int)}
                   or {h for h in manifest.get("heads") or [] if isinstance(h, int)})  # a study records its heads
    read = []
    for key, numbers in (("layer", layers), ("head", heads)):
        if numbers:
            asked = None if labels else _asked_numbers(cfg.get(key))
            moved = ", moved into the model by clamp_to_model" if cfg.get("clamp_to_model") and asked else ""
            read.append(f"{key}s read {layer_ranges(numbers)}"
                        + (f" (asked {key}={_value(cfg.get(key))}{moved})"
                           if asked not in (None, set(numbers)) else ""))
        elif key == "head" and not labels and component != "mlp":
            read.append(f"head={cfg.get('head')}")  # the heads are not at hand here (a study's page): as asked
    return ", ".join(read) + f", component={_value(component)}{count}"


def _value(value) -> str:
    """A setting as it is typed on the command line: `[L3MLP, L0H1]`, not Python's `['L3MLP', 'L0H1']`."""
    return "[" + ", ".join(map(str, value)) + "]" if isinstance(value, list) else str(value)


def _asked_numbers(spec) -> set[int] | None | bool:
    """The layers or heads a `layer`/`head` setting names, as far as they are known without the model: a set of
    them (an int, a list, a range `10-20`), None for `all` (whatever the model has), False where only the model
    knows (a negative index counts from its end)."""
    numbers: set[int] = set()
    for item in spec if isinstance(spec, list) else [spec]:
        text = str(item).strip()
        if text == "all":
            return None
        if text.isdigit():
            numbers.add(int(text))
        elif len(text.split("-")) == 2 and all(part.isdigit() for part in text.split("-")):
            low, high = map(int, text.split("-"))
            numbers.update(range(low, high + 1))
        else:
            return False
    return numbers


def layer_ranges(layers: list) -> str:
    """[0, 1, 2, 3, 7] -> `0-3, 7`: the layers a run read (after clamping to the model, `clamp_to_model`)."""
    spans: list[list[int]] = []
    for layer in sorted(int(n) for n in layers if isinstance(n, int)):
        if spans and layer == spans[-1][1] + 1:
            spans[-1][1] = layer
        else:
            spans.append([layer, layer])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def _decode_settings(cfg: dict, manifest: dict, pictures: int | None) -> list[tuple[str, str]]:
    decode = cfg.get("decode", {})
    if not decode.get("enabled", True):
        return [("decoding", "off: scores only")]
    top_k = decode.get("top_k")
    return [
        ("ranked by", cfg.get("lens", {}).get("rank_by", "")),
        ("decoding", f"{manifest.get('scheduler', decode.get('scheduler'))}, {decode.get('steps')} steps, guidance "
                     f"{decode.get('guidance')}, {decode.get('width')}x{decode.get('height')} px, "
                     f"{f'the best {top_k}' if top_k else 'every component'} per image, "
                     f"{_batch_text(decode, manifest)}, {decode.get('dtype')}"),
        ("rows, pictures", rows_text(manifest, pictures)),
    ]


def rows_text(manifest: dict, pictures: int | None) -> str:
    """`20 rows, 20 pictures (16 decoded in the last attempt)`. The manifest's `decoded` counts only the
    pictures of the last attempt (a resumed run keeps those decoded before), so the pictures the folder
    holds are counted from its rows (`pictures`; None where they are not at hand: the manifest's count)."""
    decoded = manifest.get("decoded", 0)
    text = f"{manifest.get('rows', '?')} rows, {decoded if pictures is None else pictures} pictures"
    if pictures is not None and pictures != decoded:
        text += f" ({decoded} decoded in the last attempt)"
    return text


def _batch_text(decode: dict, manifest: dict) -> str:
    """`80 per batch (auto, fitted in 0.4 s)`: the batch the run decoded in, and how it was chosen."""
    asked, used = decode.get("batch_size"), manifest.get("decode_batch_size")
    fitting = manifest.get("decode_fit_seconds")
    if used is None or asked != "auto":
        return f"{asked if used is None else used} per batch"
    return f"{used} per batch (auto{f', fitted in {fitting:.1f} s' if (fitting or 0) >= 0.05 else ''})"


def _record_settings(manifest: dict) -> list[tuple[str, str]]:
    seconds = manifest.get("seconds", {})
    return [
        ("device", manifest.get("device", "")),
        ("versions", ", ".join(f"{k} {v}" for k, v in manifest.get("versions", {}).items())),
        ("commit", manifest.get("git_commit") or "unknown"),
        ("started, finished", f"{manifest.get('started', '?')}, {manifest.get('finished', 'not finished')}"),
        ("stage times", ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items())
                        + (f" (total {sum(seconds.values()):.1f} s)" if seconds else "")),
    ]


def settings_section(manifest: dict, study: bool = False, read: tuple[str, ...] | None = None,
                     rows: list[dict] | None = None) -> str:
    """The settings summary, from manifest.json (the resolved config and what the run recorded); a study's
    settings: those it reads (`read`, its `Study.settings`), or all where it is not known here; a run's
    `rows` (similarity.csv) count the pictures it holds."""
    if not manifest:
        return "<h2>Settings</h2><p class=muted>no manifest.json in this folder</p>"
    cfg = manifest.get("config", {})
    items = _model_settings(cfg, manifest, rows)
    if study:
        shown = {k: v for k, v in cfg.get("study", {}).items() if read is None or k in ("name", *read)}
        clamped = (manifest.get("study") or {}).get("clamped")  # what the model's heads cut short
        clamped = clamped if isinstance(clamped, dict) else {}
        heads = f" over the {manifest['components']} heads" if isinstance(manifest.get("components"), int) else ""
        items.append(("study", ", ".join(f"{k} {_value(v)}"
                                         + (f" (ran {_value(clamped[k])}{heads})" if k in clamped else "")
                                         for k, v in shown.items())))
    else:
        items += _decode_settings(cfg, manifest, None if rows is None else sum(bool(r["file"]) for r in rows))
    body = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in items + _record_settings(manifest))
    return f'<h2>Settings</h2><table class="settings">{body}</table>'




def files_section(folder: Path) -> str:
    """Links to every CSV, the manifest, the log, the saved config and the figure folders that exist."""
    return "<h2>Files</h2><p>" + " · ".join(link(name) for name in RunFolder(folder).listing()) + "</p>"


# ---------------------------------------------------------------- run page


def cell_colours(matrix: np.ndarray, columns: list[str]) -> tuple[dict[tuple[int, int], tuple[str, str]], list[str]]:
    """Background and text colour of every heatmap cell, each kind of component on its own scale (as in the
    PNG heatmaps): ({(layer index, column index): (background, text)}, a line per kind saying its scale)."""
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    colours, scales = {}, []
    for kind, indices in kind_blocks(columns):
        limits = colour_limits(matrix[:, indices])
        scales.append(f"{esc(kind)} <span class=scale></span> {limits[0]:.3f} to {limits[1]:.3f}" if limits
                      else f"{esc(kind)}: one value, no scale")
        for (i, j), v in np.ndenumerate(matrix[:, indices]):
            if np.isfinite(v):
                back = to_hex(colormaps["viridis"]((v - limits[0]) / (limits[1] - limits[0]))) if limits else NO_SCALE
                colours[i, indices[j]] = (back, "#fff" if dark_cell(v, limits) else "#000")
    return colours, scales


def heat_table(rows: list[dict], value: str) -> str:
    """One similarity of one image as an HTML heatmap: layers x components, coloured by `cell_colours`,
    each cell its value and a link to its picture."""
    layers, columns, cells = heatmap_cells(rows)
    _, _, matrix = heatmap_matrix(rows, value)
    colours, scales = cell_colours(matrix, columns)
    body = []
    for i, layer in enumerate(layers):
        tds = []
        for j in range(len(columns)):
            row, shade = cells.get((i, j)), colours.get((i, j))
            if row is None or shade is None:
                tds.append("<td></td>")
                continue
            text = f"{matrix[i, j]:.3f}"
            inner = link(row["file"], text) if row["file"] else esc(text)
            tds.append(f'<td style="background:{shade[0]};color:{shade[1]}" title="{esc(row["component"])} '
                       f'{esc(value)} {text}">{inner}</td>')
        body.append(f"<tr><th>{layer_label(layer)}</th>{''.join(tds)}</tr>")
    groups = "".join(f'<th colspan="{len(indices)}">{esc(kind)}</th>' for kind, indices in kind_blocks(columns))
    head = f"<tr><th></th>{groups}</tr><tr><th></th>" + "".join(f"<th>{esc(c)}</th>" for c in columns) + "</tr>"
    return (f'<div class="heat"><p><b>{esc(value)}</b>: {esc(SIMILARITIES[value])}<br>'
            f'<span class="muted">{"<br>".join(scales)}</span></p>'
            f'<table class="heat"><thead>{head}</thead><tbody>{"".join(body)}</tbody></table></div>')


def best_pictures(rows: list[dict]) -> str:
    """The best-ranked decoded pictures of one image, each with its scores and a link to the full picture."""
    best = sorted((r for r in rows if r["file"]), key=lambda r: r["rank"])[:TOP_TILES]
    if not best:
        return "<p class=muted>no pictures decoded for this image</p>"
    figures = []
    for r in best:
        decoded = f"<br>sim_decoded {r['sim_decoded']:.3f}" if r["sim_decoded"] is not None else ""
        label = f"<br>{esc(r['labels'].split('; ')[0])}" if r.get("labels") else ""  # its top label and cosine
        figures.append(f'<figure>{linked_img(r["file"], r["component"])}'
                       f"<figcaption><b>{esc(r['component'])}</b> #{esc(r['rank'])}<br>"
                       f"sim_embed {r['sim_embed']:.3f}{decoded}{label}</figcaption></figure>")
    return f"<h3>best {len(best)} by rank</h3><div class=gallery>{''.join(figures)}</div>"


def thumbnail(path: str) -> str:
    """A figure shown small, a link to it at full size."""
    return f"<figure>{linked_img(path, path)}<figcaption>{esc(path)}</figcaption></figure>"


def image_figures(folder: Path, image: str, lens: str) -> list[Path]:
    """The image's grids, heatmap, plots and where its heads look, by their names (see dsl_cli.outputs)."""
    run = RunFolder(folder)
    found = [p for p in run.figures("grids") if p.stem.startswith(f"{image}_{lens}_")]
    found += [p for p in (run.figure("heatmaps", f"{image}_{lens}"), run.figure("plots", f"{image}_logit"),
                          run.figure("looks", f"{image}_{lens}")) if p.is_file()]
    return found


def image_section(folder: Path, image: str, rows: list[dict]) -> str:
    """One image: its input, its heatmaps, its best pictures and its figures."""
    panels = [heat_table(rows, v) for v in ("sim_embed", "sim_decoded") if any(r[v] for r in rows)]
    source = RunFolder(folder).input_picture(image)
    picture = (f"<figure class=input>{img(rel(source, folder), f'{image} (input)')}<figcaption>input</figcaption>"
               "</figure>" if source.is_file() else "")
    figures = "".join(thumbnail(rel(p, folder)) for p in image_figures(folder, image, rows[0]["lens"]))
    return (f'<section><h2 id="{esc(image)}">{esc(image)}</h2><div class="row">{picture}{"".join(panels)}</div>'
            f"{best_pictures(rows)}<h3>figures</h3>"
            f'<div class="row thumbs">{figures or "<p class=muted>none drawn</p>"}</div></section>')


def top_labels(label_rows: list[dict]) -> dict[tuple[str, str], dict]:
    """Logit lens: (image, component) -> its top label row, from labels.csv's rows."""
    return {(r["image"], r["component"]): r for r in label_rows if r["rank"] == 1}


COMPONENT_NUMBERS = ["sim_embed", "sim_decoded", "norm", "rank", "layer", "head"]
# columns only some runs fill (attribution: the share of cos(embedding, target); decode.seeds > 1: the mean
# and spread of sim_decoded over the seeds; an SAE feature's activation; a head's top patches; a feature's
# description): shown where any row holds a value, so other runs' tables gain no empty column
LENS_NUMBERS = ("attribution", "sim_decoded_mean", "sim_decoded_std", "activation")
LENS_TEXTS = ("top_patches", "description")


def row_label(row: dict, labels: dict[tuple[str, str], dict]) -> tuple[str, float | None]:
    """A row's top label and its score: the logit lens's (labels.csv), or `lens.text`'s first zero-shot label
    (`tabby 0.31; tiger cat 0.29`); ("", None) where it has none."""
    if (row["image"], row["component"]) in labels:
        label = labels[row["image"], row["component"]]
        return label["label"], label["score"]
    return first_label(row.get("labels"))


def components_section(rows: list[dict], labels: dict[tuple[str, str], dict]) -> str:
    """Every component of every image in one table, sortable by any column, filterable by image, layer
    and kind."""
    numbers = [k for k in LENS_NUMBERS if any(r.get(k) is not None for r in rows)]
    texts = [k for k in LENS_TEXTS if any(r.get(k) for r in rows)]
    labelled = bool(labels) or any(r.get("labels") for r in rows)
    head = ["image", "component", "kind", "layer", "head", "sim_embed", "sim_decoded", "norm", "rank", *numbers,
            *texts]
    head += ["top label", "label score"] if labelled else []
    body = []
    for r in rows:
        tds = [cell(esc(r["image"])), cell(esc(r["component"])), cell(esc(r["kind"])), number(r["layer"], 0),
               number(r["head"], 0), number(r["sim_embed"]), number(r["sim_decoded"]), number(r["norm"]),
               number(r["rank"], 0), *(number(r.get(k), 3 if k.startswith("sim_") else 4) for k in numbers),
               *(cell(esc((r.get(k) or "").replace(";", "; "))) for k in texts)]
        if labelled:
            label, score = row_label(r, labels)
            tds += [cell(esc(label)), number(score)]
        tds.append(cell(link(r["file"], "picture") if r["file"] else ""))
        body.append(f"<tr{row_attrs(r, ['image', 'layer', 'kind'])}>{''.join(tds)}</tr>\n")
    return (f'<section id="components"><h2>All components</h2>'
            f"{filters(rows, [('image', 'image'), ('layer', 'layer'), ('kind', 'kind')])}"
            f"{table(head + ['file'], body, {*COMPONENT_NUMBERS, *numbers, 'label score'})}</section>")


def checked_files(folder: Path, rows: list[dict]) -> dict[str, list[dict] | None]:
    """The run's tables beside similarity.csv (`read_tables`), refused where `dsl plot` refuses them (a
    complete run's table cut short or edited), and its pictures, refused where one is not dsl's (a PNG of the
    user's put in place of a result): the page would show either as the run's."""
    run = RunFolder(folder)
    tables = read_tables(run, rows)
    refuse_foreign_pictures(run, rows, advice=f"`dsl run resume={folder}` makes it again")
    return tables


def run_page(folder: Path) -> str:
    """The page of a run folder (similarity.csv, labels.csv, manifest.json and the pictures and figures)."""
    manifest = read_manifest(folder) or {}
    rows = run_rows(folder)
    tables = checked_files(folder, rows)
    images = group_rows(rows, ("image",))
    contents = " · ".join(f'<a href="#{esc(quote(image))}">{esc(image)}</a>' for (image,) in images)
    body = [header(folder, manifest, "run"), f"<p>images: {contents} · <a href='#components'>all components</a>"
            "</p>" if rows else "<p class=muted>no rows in similarity.csv yet</p>",
            settings_section(manifest, rows=rows), files_section(folder)]
    body += [image_section(folder, image, group) for (image,), group in images.items()]
    if rows:
        body.append(components_section(rows, top_labels(tables["labels"] or [])))
    body.append(features_section(folder, rows))
    return page(f"dsl run {folder.name}", "\n".join(body))


# ---------------------------------------------------------------- study page


def importance_tables(rows: list[dict], corr: list[dict]) -> str:
    """Head importance: the correlations (`corr`: pooled first, then per image, each with its bootstrap 95 %
    interval and n) and every (image, head) row (`rows`); both tables as the study checked them."""
    corr = sorted(corr, key=lambda r: r["image"] != POOLED)
    head = ["ablation", "image", "lens", "n", "spearman", "spearman 95 % CI", "spearman_p", "pearson",
            "pearson 95 % CI", "pearson_p"]
    body = [f"<tr>{cell(esc(r['ablation']))}{cell(esc(r['image']))}{cell(esc(r['lens']))}{number(r['n'], 0)}"
            + "".join(number(r[k]) if k in r else interval(r, k.split()[0]) for k in head[4:]) + "</tr>\n"
            for r in corr]
    numbers = ["layer", "head", "importance", *importance_scores(rows)]
    heads = [f"<tr{row_attrs(r, ['image', 'layer'])}>{cell(esc(r['ablation']))}{cell(esc(r['image']))}"
             f"{cell(esc(r['component']))}"
             + "".join(number(r[k], 0 if k in ("layer", "head") else 4) for k in numbers) + "</tr>\n"
             for r in rows]
    return ("<h2>Correlations with importance</h2><p class=muted>pooled: over every (image, head) pair at "
            "once; then per image; intervals: percentile bootstrap over the pairs</p>"
            f"{table(head, body, {'n', 'spearman', 'spearman_p', 'pearson', 'pearson_p'})}"
            f"<section><h2>Every head</h2>{filters(rows, [('image', 'image'), ('layer', 'layer')])}"
            f"{table(['ablation', 'image', 'component', *numbers], heads, set(numbers))}</section>")


def interval(row: dict, name: str) -> str:
    """A table cell `[low, high]` of a correlation's bootstrap interval."""
    low, high = (row.get(f"{name}_{end}") for end in ("low", "high"))
    text = f"[{low:.3f}, {high:.3f}]" if low is not None else ""
    return cell(esc(text))


def overlay_tables(folder: Path, rows: list[dict]) -> str:
    """Overlay removal: each composite with its pictures and decoded fade grid, and the overlay similarity
    per order (at the start, mean over the steps, at the end, the area under the curve; random orders
    averaged); `rows`: study_overlay_removal.csv's, checked by the study."""
    run = RunFolder(folder)
    body, summary = [], []
    for (image, order), group in group_rows(rows, ("image", "order")).items():
        runs = [[r["overlay_sim"] for r in run] for run in group_rows(group, ("seed",)).values()]
        curve = np.mean(runs, axis=0)
        auc = np.mean([r["auc"] for r in group if r["step"] == 0])
        summary.append({"image": image, "order": order})
        body.append(f"<tr{row_attrs(summary[-1], ['image', 'order'])}>{cell(esc(image))}{cell(esc(order))}"
                    f"{number(len(runs), 0)}{number(curve[0])}{number(curve.mean())}{number(curve[-1])}"
                    f"{number(auc)}</tr>\n")
    pictures = "".join(f"<figure>{img(rel(run.overlay_picture(image), folder), image)}<figcaption>{esc(image)}"
                       f"</figcaption></figure>" for (image,) in group_rows(rows, ("image",))
                       if run.overlay_picture(image).is_file())
    fades = "".join(thumbnail(rel(p, folder)) for p in run.figures("grids") if p.stem.endswith("_overlay_fade"))
    numbers = ["orders", "at start", "mean over steps", "at end", "area under the curve"]
    return (f"<h2>Composites</h2><div class=gallery>{pictures}</div>"
            + (f"<h2>Decoded as the heads go</h2><div class='row thumbs'>{fades}</div>" if fades else "")
            + "<section><h2>Overlay similarity per order</h2><p class=muted>cos(e of the ablated composite, e of "
            "the foreground); lower: the overlay is removed sooner</p>"
            f"{filters(summary, [('image', 'composite'), ('order', 'order')])}"
            f"{table(['composite', 'order', *numbers], body, set(numbers))}</section>")


def study_page(folder: Path) -> str:
    """The page of a study's run folder: settings, the plot, the summary tables, the files."""
    manifest, run = read_manifest(folder) or {}, RunFolder(folder)
    study = find_study(folder)  # None for a study that wrote no table yet: its page has none
    if study is None:
        refuse_unregistered(folder)  # a plugin's study, where its module was not imported: its tables would go
    name = manifest.get("config", {}).get("study", {}).get("name") or (study.name if study else "")
    plot = run.figure("plots", name)
    body = [header(folder, manifest, f"study {name}"),
            settings_section(manifest, study=True, read=(*study.settings, *study.new_settings) if study else None),
            files_section(folder),
            f'<h2>Plot</h2><div class="figures">{img(rel(plot, folder), name) if plot.is_file() else "none drawn"}</div>']
    if study is not None:
        body.append(study.page(folder, sys.modules[__name__]))
    return page(f"dsl study {name} {folder.name}", "\n".join(body))


# ---------------------------------------------------------------- sweep page


JobLister = Callable[[Path], list[dict]]  # a sweep folder -> its jobs as a merged manifest lists them


def merged_manifest(sweep_dir: Path) -> dict | None:
    """A sweep's manifest once merged (it lists the jobs); None before (none yet, or only the claim's)."""
    manifest = read_manifest(sweep_dir)
    return manifest if manifest is not None and "jobs" in manifest else None


def manifest_jobs(sweep_dir: Path) -> list[dict]:
    """A sweep's jobs as its merge listed them; not merged, the run folders below it, folder and status only.
    `dsl report` hands down `sweeps.listed_jobs` instead (dsl_cli.sweeps is above this module), which lists an
    unmerged sweep's jobs with their overrides, and refuses a merged CSV that lost rows since the merge."""
    manifest = merged_manifest(sweep_dir)
    if manifest is not None:
        return manifest["jobs"]
    numbered = sorted((_job_number(p.parent), p.parent) for p in sweep_dir.glob("*/manifest.json"))
    return [{"job": num, "folder": rel(f, sweep_dir), "overrides": [], "rows": "",
             **{k: (read_manifest(f) or {}).get(k) for k in ("status", "error")}} for num, f in numbered]


def _job_number(folder: Path) -> int:
    """A sweep job's number, as Hydra saved it in its folder (`hydra.job.num`; the folder's name need not say it:
    `hydra.sweep.subdir=job_${hydra.job.num}`); without it (a copy without dot-folders), the folder's name where
    it is a number (Hydra's default), else -1."""
    import yaml

    try:
        num = yaml.safe_load(read_bytes_nofollow(RunFolder(folder).hydra_yaml))["hydra"]["job"]["num"]
    except (OSError, yaml.YAMLError, TypeError, KeyError):
        num = None
    return num if type(num) is int else int(folder.name) if folder.name.isdigit() else -1


def _job_link(sweep_dir: Path, folder: str | None) -> str:
    """A job's page, or its folder where it has none (yet), or nothing for a job that never started."""
    if folder is None:
        return ""
    page = RunFolder(sweep_dir / folder).page
    return link(rel(page, sweep_dir) if page.is_file() else f"{folder}/", folder)


def status_badge(status: str | None) -> str:
    return f'<span class="status {esc(status)}">{esc(status)}</span>' if status else ""


def jobs_table(sweep_dir: Path, jobs: list[dict]) -> str:
    head = ["job", "overrides", "status", "rows", "page", "error"]
    body = [f"<tr>{number(j['job'], 0)}{cell(esc(' '.join(j['overrides'])))}"
            f"{cell(status_badge(j['status']), j['status'])}{number(j['rows'], 0)}"
            f"{cell(_job_link(sweep_dir, j['folder']))}{cell(esc(j['error']))}</tr>\n" for j in jobs]
    return f"<h2>Jobs</h2>{table(head, body, {'job', 'rows'})}"


def jobs_figures(sweep_dir: Path, jobs: list[dict]) -> str:
    """Each heatmap and plot that the jobs drew, job beside job, captioned with the overrides that tell the
    jobs apart."""
    by_name: dict[str, list[tuple[dict, str]]] = {}
    for job in (j for j in jobs if j["folder"] is not None):
        for path in RunFolder(sweep_dir / job["folder"]).figures("heatmaps", "plots"):
            by_name.setdefault(rel(path, sweep_dir / job["folder"]), []).append((job, rel(path, sweep_dir)))
    shared = set.intersection(*(set(job["overrides"]) for job in jobs)) if jobs else set()
    sections = []
    for name, found in by_name.items():
        figures = "".join(f"<figure>{img(path, name)}<figcaption>job {job['job']}: "
                          f"{esc(' '.join(o for o in job['overrides'] if o not in shared))}</figcaption></figure>"
                          for job, path in found)
        sections.append(f"<h3>{esc(name)} of each job</h3><div class='row figures'>{figures}</div>")
    return ("<h2>Each job's own heatmaps and plots</h2><p class=muted>one figure per job, from that job's rows "
            "alone</p>" + ("".join(sections) or "<p class=muted>none drawn</p>"))


def merged_studies(manifest: dict) -> dict[str, dict]:
    """The manifest's `studies` (`sweeps.merge_studies`), those entries whose every value has its type (a manifest
    edited by hand, or one of an older dsl without them: none)."""
    studies = manifest.get("studies")
    kinds = {"table": str, "rows": int, "jobs": list, "pooled": list, "not_pooled": (str, type(None))}
    return {name: entry for name, entry in (studies.items() if isinstance(studies, dict) else [])
            if isinstance(entry, dict) and all(isinstance(entry.get(k), t) for k, t in kinds.items())}


def studies_section(manifest: dict) -> str:
    """Each study's table merged over its jobs, and what was computed again over all of them (or why not:
    `sweeps.pooling_refusal`); nothing for a sweep without a study."""
    items = [f"<li>{esc(name)}: {link(entry['table'])}, {entry['rows']} rows of jobs "
             f"{esc(', '.join(map(str, entry['jobs'])))}"
             + (f"; pooled over all of them: {' · '.join(map(link, entry['pooled']))}" if entry["pooled"] else "")
             + (f"; not pooled: {esc(entry['not_pooled'])}" if entry["not_pooled"] else "") + "</li>"
             for name, entry in merged_studies(manifest).items()]
    return f"<h2>Studies merged</h2><ul>{''.join(items)}</ul>" if items else ""


def pooled_figures(sweep_dir: Path, manifest: dict) -> str:
    """The figures each study drew over all the jobs at once (`sweeps.merge_studies`), shown before each job's
    own; nothing where none was pooled."""
    shown = []
    for name, entry in merged_studies(manifest).items():
        jobs = ", ".join(map(str, entry["jobs"]))
        shown += [f"<figure>{linked_img(path, f'{name}, pooled over jobs {jobs}')}<figcaption>{esc(path)}: "
                  f"{esc(name)} pooled over jobs {esc(jobs)}, as one run over all their heads and images"
                  "</figcaption></figure>"
                  for path in entry["pooled"] if isinstance(path, str) and path.endswith(".png")
                  and ".." not in Path(path).parts and not Path(path).is_absolute() and (sweep_dir / path).is_file()]
    return (f"<h2>Pooled over all jobs</h2><div class='figures'>{''.join(shown)}</div>" if shown else "")


def sweep_page(sweep_dir: Path, list_jobs: JobLister = manifest_jobs) -> str:
    """The page of a sweep folder: its jobs with their overrides, status and pages (as `list_jobs` finds them),
    and the sweep's merged heatmaps, from the manifest that `dsl merge` (or the end of the sweep) wrote; each
    job's heatmaps and plots side by side."""
    manifest = merged_manifest(sweep_dir)
    jobs = list_jobs(sweep_dir)
    figures = (manifest or {}).get("figures")
    merged = "".join(thumbnail(path) for path in (figures if isinstance(figures, list) else []))
    done = sum(j["status"] == "complete" for j in jobs)
    note = "" if manifest else (f"<p class=muted>not merged yet: <code>dsl merge {esc(sweep_dir)}</code> lists "
                                "every job and draws the merged heatmaps</p>")
    body = [header(sweep_dir, manifest or {}, "sweep"), f"<p>{done} of {len(jobs)} jobs complete</p>{note}",
            files_section(sweep_dir), jobs_table(sweep_dir, jobs)]
    body += [studies_section(manifest or {}), pooled_figures(sweep_dir, manifest or {})]
    if merged:
        body.append("<h2>Merged heatmaps</h2><p class=muted>the rows of all jobs in one figure per image and lens "
                    f"(and per value of a swept setting)</p><div class='row thumbs'>{merged}</div>")
    body.append(jobs_figures(sweep_dir, jobs))
    return page(f"dsl sweep {sweep_dir.name}", "\n".join(body))


# ---------------------------------------------------------------- folders


def folder_kind(folder: Path) -> str | None:
    """sweep, study, run, or None for a folder that holds none of them, or that is not dsl's (its manifest is
    another program's, or it has none and holds files of others: `RunFolder.is_own`)."""
    if not RunFolder(folder).is_own():
        return None
    manifest = read_manifest(folder)
    if (manifest or {}).get("kind") in ("sae", "adapter"):  # `dsl sae train`'s, `dsl adapter fit`'s: no run
        return None
    if is_sweep_folder(folder):
        return "sweep"
    if RunFolder(folder).csv(SIMILARITY).is_file():
        return "run"
    if RunFolder(folder).holds_study() or (manifest or {}).get("config", {}).get("study", {}).get("name"):
        return "study"
    return "run" if manifest is not None else None


def kind_or_refusal(folder: Path) -> str | UserError | None:
    """`folder_kind`, or the UserError of a folder whose manifest is damaged: that folder alone is then
    refused by `each_folder`, the others still done."""
    try:
        return folder_kind(folder)
    except UserError as err:
        return err


MARKERS = ("manifest.json", "similarity.csv", "multirun.yaml")  # the files that mark a run, study or sweep


def report_folders(root: Path) -> list[tuple[str | UserError, Path]]:
    """(kind, folder) of every run, study and sweep at or below `root`, deepest first; a folder whose kind
    cannot be read has its refusal for kind (`kind_or_refusal`)."""
    if not root.is_dir():
        raise UserError(f"{root}: not a folder; give a run, study or sweep folder (or a folder of them)")
    found = {root} | {p.parent for name in MARKERS for p in root.rglob(name)}
    kinds = [(kind_or_refusal(f), f) for f in found if ".submitit" not in f.parts]
    folders = sorted(((k, f) for k, f in kinds if k), key=lambda kf: (-len(kf[1].parts), str(kf[1])))
    if not folders:
        raise UserError(_nothing_to_report(root, [f for _, f in kinds]))
    return folders


def _nothing_to_report(root: Path, found: list[Path]) -> str:
    """Why `root` holds nothing `dsl report` or `dsl plot` works on: an adapter's or SAE's own folder (whose
    manifest said otherwise: "no manifest.json"), files of another program where dsl's would be (`found`: the
    folders that hold one of MARKERS, and `root`), or no dsl folder at all."""
    kind = (read_manifest(root) or {}).get("kind") if RunFolder(root).is_own() else None
    if kind == "adapter":
        return (f"{root}: the folder of an adapter: `dsl adapter fit` wrote its page (index.html); report and "
                "plot work on the folders of `dsl run`")
    if kind == "sae":
        return (f"{root}: the folder of an SAE (`dsl sae train`): report and plot work on the folders of "
                f"`dsl run` (a run over its features: dsl run sae={root})")
    foreign = next((f for f in sorted(found) if _markers(f) and not RunFolder(f).is_own()), None)
    if foreign is None:
        return (f"{root}: no dsl run here, nor a study or sweep (no manifest.json, similarity.csv or multirun.yaml "
                "in it or below it)")
    where = f"{foreign}: " if foreign == root else f"{root}: no dsl run here, nor a study or sweep; {foreign} "
    if _markers(foreign) == ["similarity.csv"]:
        return (f"{where}holds a similarity.csv but no manifest.json: dsl works only in folders it can show it "
                "made (their manifest.json); restore it")
    names = " and ".join(_markers(foreign))
    return (f"{where}holds {names} of another program, not dsl's: report and plot work only in dsl's folders (a "
            "manifest.json that dsl wrote, or a sweep's multirun.yaml of `dsl run`)")


def _markers(folder: Path) -> list[str]:
    """Which of MARKERS `folder` holds."""
    return [name for name in MARKERS if os.path.lexists(folder / name)]


PAGES = {"run": run_page, "study": study_page, "sweep": sweep_page}


def write_page(kind: str, folder: Path, list_jobs: JobLister = manifest_jobs) -> Path:
    """Write the page of a `kind` (run, study, sweep) folder; returns its path. `list_jobs`: how a sweep's jobs
    are found (`sweep_page`)."""
    page = RunFolder(folder).page
    with drawn_from_files(folder):
        html = sweep_page(folder, list_jobs) if kind == "sweep" else PAGES[kind](folder)
    write_own_page(page, html)
    return page


GENERATOR = '<meta name="generator" content="dsl">'  # in every page dsl writes: a page it may replace


def write_own_page(path: Path, html: str) -> None:
    """Write a page, replacing only one that dsl wrote (it holds GENERATOR, or, written before that, the
    page's script): a user's own index.html is refused with one line, and left as it is."""
    if path.is_symlink() or path.exists() and not path.is_file():
        raise UserError(f"{path}: not a file dsl wrote (a link or a folder); move it aside and run again")
    if path.exists():
        try:
            old = read_bytes_nofollow(path)
        except OSError as err:
            raise UserError(f"cannot read {path} ({err.strerror or err})") from err
        if GENERATOR.encode() not in old and SCRIPT.split("\n", 2)[1].encode() not in old:
            raise UserError(f"{path}: a page that dsl did not write; move it aside and `dsl report` writes dsl's")
    atomic_write_bytes(path, html.encode())


T = TypeVar("T")


def each_folder(folders: list[tuple[str | UserError, Path]], work: Callable[[str, Path], T]) -> dict[Path, T]:
    """`work(kind, folder)` on each (kind, folder) while holding it. One of several that is refused (its
    files damaged, its kind a UserError from `report_folders`, a run holding it) is left as it is and the
    others done, then `PartlyDone` names it with the others' results; a lone folder's refusal is raised as
    it is."""
    done, refused = {}, []
    for kind, folder in folders:
        try:
            if isinstance(kind, UserError):
                raise kind
            with claimed(folder):
                done[folder] = work(kind, folder)
        except UserError as err:
            if len(folders) == 1:
                raise
            refused.append((folder, err))
    if refused:
        raise PartlyDone(refused, len(folders), done)
    return done


def write_pages(root: Path, list_jobs: JobLister = manifest_jobs) -> list[Path]:
    """`dsl report`: write (or refresh) the page of every run, study and sweep at or below `root`, and, when
    `root` is none of them itself (`outputs/paper`, a date folder), its own page linking them all. A refused
    folder among several is left as it is: the rest are written, then `PartlyDone` names it. `list_jobs`:
    how a sweep's jobs are found (`sweep_page`; the cli's also checks a merged sweep's CSV)."""
    root = Path(root)  # the Python API's callers give a str
    found = report_folders(root)
    try:
        pages, refused = list(each_folder(found, partial(write_page, list_jobs=list_jobs)).values()), None
    except PartlyDone as err:
        pages, refused = list(err.done.values()), err
    if root not in {folder for _, folder in found}:  # a folder of runs, not one itself
        page = RunFolder(root).page
        # a folder refused for a damaged manifest is named in the error line, not on the page
        write_own_page(page, collection_page(root, [f for k, f in found if not isinstance(k, UserError)]))
        pages.append(page)
    if refused:
        raise PartlyDone(refused.refused, refused.total, pages)
    return pages


# where runs, studies and sweeps draw their figures (every folder of RunFolder.FIGURES, looks/ too), plots
# first: a study's summary plot leads its section
FIGURE_FOLDERS = ("plots", *(name for name in RunFolder.FIGURES if name != "plots"))


def collection_page(root: Path, folders: list[Path]) -> str:
    """The page of a folder of runs, studies and sweeps: each (not a sweep's jobs, which its sweep's page
    shows) with a link to its own page and every figure it drew, in name order."""
    top = sorted(f for f in folders if not any(other in f.parents for other in folders))
    sections, unfinished = [], []
    for folder in top:
        manifest = read_manifest(folder) or {}
        status = manifest.get("status")
        figures = RunFolder(folder).figures(*FIGURE_FOLDERS)
        shown = "".join(thumbnail(rel(p, root)) for p in figures) or "<p class=muted>no figures</p>"
        what = what_it_is(folder, manifest)
        section = (f"<section><h2>{link(rel(RunFolder(folder).page, root), rel(folder, root))} "
                   f"{status_badge(status)}</h2>{f'<p class=what>{esc(what)}</p>' if what else ''}"
                   f"<div class='row thumbs'>{shown}</div></section>")
        (unfinished if status in ("failed", "interrupted", "running") else sections).append(section)
    folded = (f"<details><summary>{len(unfinished)} failed or unfinished</summary>{''.join(unfinished)}</details>"
              if unfinished else "")
    return page(f"dsl {root.resolve().name}", f"<h1>dsl {esc(root.resolve().name)}</h1>"
                f"<p>{len(sections)} folders; each figure links to itself at full size</p>" + "".join(sections)
                + folded)


COMPONENT_WORDS = {"heads": "heads", "mlp": "MLPs", "all": "heads and MLPs"}


def what_it_is(folder: Path, manifest: dict) -> str:
    """One line saying what a run, study or sweep is, from what its manifest records: `steering lens, layer 3,
    heads, 2 images`, `study head_importance, 2 images`, `sweep of 4 jobs: layer=0,1 x lens.alpha=1,4`; empty
    where its manifest (read by the caller) says nothing of it (a run that failed before writing its settings)."""
    if is_sweep_folder(folder):
        try:
            return sweep_text(manifest_jobs(folder))
        except UserError:  # a job's manifest damaged: its sweep's own page says so; the overview goes on
            return "sweep"
    cfg = manifest.get("config") if isinstance(manifest.get("config"), dict) else {}
    images = manifest.get("images")
    counted = f"{len(images)} image{'s' * (len(images) != 1)}" if isinstance(images, list) and images else ""
    study = (cfg.get("study") or {}).get("name") if isinstance(cfg.get("study"), dict) else None
    if study:
        return ", ".join(filter(None, [f"study {study}", counted]))
    lens = (cfg.get("lens") or {}).get("name") if isinstance(cfg.get("lens"), dict) else None
    if not lens:
        return counted
    sae = (cfg.get("sae") or {}).get("path") if isinstance(cfg.get("sae"), dict) else None
    layers = manifest.get("layers") if isinstance(manifest.get("layers"), list) else None
    if layers:
        where = f"layer{'s' * (len(layers) != 1)} {layer_ranges(layers)}"
    else:
        where = f"layer {cfg.get('layer')}" if "layer" in cfg else ""
    component = cfg.get("component")
    what = (f"features of the SAE {sae}" if sae else ", ".join(map(str, component)) if isinstance(component, list)
            else COMPONENT_WORDS.get(component, component) if isinstance(component, str) else "")
    return ", ".join(filter(None, [f"{lens} lens", where, str(what or ""), counted]))


def sweep_text(jobs: list[dict]) -> str:
    """`sweep of 4 jobs: layer=0,1 x lens.alpha=1,4`: the settings its jobs' overrides set apart, each with its
    values in the order of the jobs; a study the jobs share is named."""
    values: dict[str, list[str]] = {}
    jobs = [job if isinstance(job.get("overrides"), list) else {**job, "overrides": []} for job in jobs]
    for job in jobs:
        for override in job["overrides"]:
            key, _, value = str(override).partition("=")
            values.setdefault(key, [])
            if value not in values[key]:
                values[key].append(value)
    swept = {key: found for key, found in values.items()  # set apart: values that differ, or not set by every job
             if len(found) > 1 or any(f"{key}={found[0]}" not in job["overrides"] for job in jobs)}
    study = values["study"][0] if "study" in values and "study" not in swept else None
    return (f"sweep of {len(jobs)} job{'s' * (len(jobs) != 1)}" + (f" of study {study}" if study else "")
            + (": " + " x ".join(f"{key}={','.join(found)}" for key, found in swept.items()) if swept else ""))


def redraw_folder(root: Path) -> dict[Path, int]:
    """`dsl plot`: draw the figures of every run and study at or below `root` again from their files, then
    refresh the pages: {folder: figures drawn}, without the folders that had nothing to draw."""
    drawn = each_folder(report_folders(root), _redraw_one)
    return {folder: count for folder, count in drawn.items() if count is not None}


def _redraw_one(kind: str, folder: Path) -> int | None:
    """Draw one run's or study's figures again and write its page: how many, or None with nothing to draw."""
    count = None
    # a run without similarity.csv has nothing to draw, unless it completed: run_rows refuses that one
    if kind == "run" and (RunFolder(folder).csv(SIMILARITY).is_file() or run_rows(folder)):
        count = len(redraw(folder))
    elif kind == "study" and RunFolder(folder).holds_study():
        count = len(redraw_study(folder))
    write_page(kind, folder)
    return count
