"""The run page's "SAE features" section (dsl_cli.sae_run): for each decoded feature, the images it is most
active on (features.csv) beside what DSL decodes from it (similarity.csv). Read from the folder's CSVs alone,
no torch: `dsl report` draws it for any run folder that has a features.csv."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

from dsl_cli.html_parts import esc, linked_img, rel
from dsl_cli.errors import UserError
from dsl_cli.outputs import RunFolder, check_name, read_bytes_nofollow

FEATURES_CSV = "features.csv"  # the same name as dsl_cli.sae_run.FEATURES_CSV (that module imports torch)


def read_features(folder: Path) -> dict[str, list[dict]]:
    """features.csv -> component label -> its top images [{image, rank, activation}], best first. Read as
    data (no link followed, each name a plain name): damage is one UserError line naming the file."""
    path = Path(folder) / FEATURES_CSV
    if not os.path.lexists(path):
        return {}
    out: dict[str, list[dict]] = {}
    try:
        reader = csv.DictReader(io.StringIO(read_bytes_nofollow(path).decode("utf-8"), newline=""))
        missing = {"component", "rank", "image", "activation"} - set(reader.fieldnames or ())
        if missing:
            raise KeyError(", ".join(sorted(missing)))
        for number, row in enumerate(reader, start=2):
            where = f"{path} row {number}:"
            out.setdefault(check_name(row["component"], f"{where} component"), []).append(
                {"image": check_name(row["image"], f"{where} image"), "rank": int(row["rank"]),
                 "activation": float(row["activation"])})
    except (OSError, UnicodeDecodeError, csv.Error, KeyError, TypeError, ValueError) as err:
        raise UserError(f"{path}: not the features.csv dsl writes ({type(err).__name__}: {err}); run the "
                        "run again into a new folder to write it") from None
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


def sae_components_text(cfg: dict, manifest: dict) -> str | None:
    """What an SAE run reads, for its settings (`layer=`, `head=`, `component=` are not used: the features are
    read at the SAE's own layer): `SAE my_sae (topk, 40 features at blocks.1.hook_resid_post): the 2 most
    active features of each image, each scored in every image, and the error term`; None for a run without an SAE."""
    asked = cfg.get("sae") or {}
    if not isinstance(asked, dict) or not (asked.get("path") or asked.get("repo_id")):  # `sae_run.sae_config`
        return None
    read = manifest.get("sae") if isinstance(manifest.get("sae"), dict) else {}  # recorded once the SAE loaded
    source = read.get("source") or asked.get("path") or asked.get("repo_id")
    about = ", ".join(str(x) for x in (read.get("architecture"),
                                       read.get("d_sae") and f"{read['d_sae']} features at {read.get('hook_name')}")
                      if x)
    features = asked.get("features", "top")
    chosen = (f"the {asked.get('top_k')} most active features of each image, each scored in every image,"
              if features == "top"
              else f"features {', '.join(map(str, features)) if isinstance(features, list) else features}")
    return f"SAE {source}{f' ({about})' if about else ''}: {chosen} and the error term"
