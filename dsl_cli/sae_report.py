"""The run page's "SAE features" section (dsl_cli.sae_run): for each decoded feature, the images it is most
active on (features.csv) beside what DSL decodes from it (similarity.csv). Read from the folder's CSVs alone,
no torch: `dsl report` draws it for any run folder that has a features.csv."""

from __future__ import annotations

import csv
from pathlib import Path

from dsl_cli.html_parts import esc, linked_img, rel
from dsl_cli.outputs import RunFolder

FEATURES_CSV = "features.csv"  # the same name as dsl_cli.sae_run.FEATURES_CSV (that module imports torch)


def read_features(folder: Path) -> dict[str, list[dict]]:
    """features.csv -> component label -> its top images [{image, rank, activation}], best first."""
    path = Path(folder) / FEATURES_CSV
    if not path.is_file():
        return {}
    out: dict[str, list[dict]] = {}
    with path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            out.setdefault(row["component"], []).append(
                {"image": row["image"], "rank": int(row["rank"]), "activation": float(row["activation"])})
    return {label: sorted(rows, key=lambda r: r["rank"]) for label, rows in sorted(out.items())}


def features_section(folder: Path, rows: list[dict]) -> str:
    """HTML: one block per feature in features.csv (its top images, then its decoded pictures); "" if none.
    rows: the run's similarity.csv rows."""
    features = read_features(folder)
    if not features:
        return ""
    run = RunFolder(folder)
    blocks = []
    for label, tops in features.items():
        shown = []
        for top in tops:
            picture = run.input_picture(top["image"])
            inner = linked_img(rel(picture, folder), top["image"]) if picture.is_file() else esc(top["image"])
            shown.append(f"<figure>{inner}<figcaption>#{top['rank']} {esc(top['image'])}<br>"
                         f"f = {top['activation']:.3f}</figcaption></figure>")
        decoded = [f"<figure>{linked_img(r['file'], r['component'])}<figcaption>{esc(r['image'])} · {esc(r['lens'])}"
                   f"<br>sim_embed {r['sim_embed']:.3f}</figcaption></figure>"
                   for r in rows if r["component"] == label and r.get("file")]
        blocks.append(f'<h3 id="{esc(label)}">{esc(label)}</h3><p>most active on</p>'
                      f'<div class=gallery>{"".join(shown) or "<p class=muted>no image</p>"}</div>'
                      f'<p>decoded (DSL)</p><div class=gallery>'
                      f'{"".join(decoded) or "<p class=muted>not decoded</p>"}</div>')
    return ('<section id="sae-features"><h2>SAE features</h2><p>each feature\'s most active images '
            f'({FEATURES_CSV}) beside its decoded pictures</p>{"".join(blocks)}</section>')
