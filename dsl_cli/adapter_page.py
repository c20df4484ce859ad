"""The page of a fitted adapter (`index.html` beside `adapter.safetensors`): its metrics and, for a few
held-out images, the picture decoded through the adapter beside the target encoder's own decoding. Reads
`adapter.json` and `examples.json` alone: no torch, no model (`dsl report` style)."""

from __future__ import annotations

import html
import json
from pathlib import Path

METRICS = (
    ("cosine_mean", "cosine to the target, mean", "1 is perfect; what the decoder sees, direction-wise"),
    ("cosine_p5", "cosine, 5th percentile", "the worst images' cosine: 1 in 20 held-out images is below it"),
    ("cosine_centred", "cosine about the targets' mean", "the same with the mean target subtracted from both: "
     "embeddings share a large common direction, which makes the plain cosine look better than the fit is"),
    ("r2", "R^2", "share of the target's variance (about its held-out mean) the adapter explains"),
    ("top1", "top-1 retrieval", "held-out images whose mapped embedding is closest to their own target"),
    ("top5", "top-5 retrieval", "... whose own target is among the 5 closest"),
)


def _num(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else html.escape(str(value))


def _lambda_choice(meta: dict) -> str:
    """How `adapters.fit` chose the ridge strength: the least held-out error, or, with no image held out,
    nothing to validate on: the smallest positive strength it tried."""
    if meta.get("heldout_images"):
        return "picked on the held-out images"
    return "the smallest positive strength tried: no image held out, so not chosen by validation"


def _metrics_section(meta: dict, rows: str, pool) -> str:
    """The held-out metrics, or why there are none (few images: the held-out share is picked by name hash)."""
    if not meta.get("heldout_images"):
        share = meta.get("heldout_fraction")
        return ("<h2>Held-out metrics</h2><p>none: no image was held out (about "
                f"{f'{share:.0%}' if isinstance(share, float) else 'a share'} of the images are, by a hash of their "
                "names); fit with more images, or a larger adapter.heldout, for held-out metrics</p>")
    return (f"<h2>Held-out metrics ({pool} images; retrieval among them)</h2>"
            f"<table><tr><th>metric</th><th>value</th><th>how to read it</th></tr>{rows}</table>")


def write_adapter_page(folder: Path) -> Path:
    folder = Path(folder)
    meta = json.loads((folder / "adapter.json").read_text())
    examples_file = folder / "examples.json"
    examples = json.loads(examples_file.read_text()) if examples_file.is_file() else []
    metrics = meta.get("metrics") or {}
    pool = metrics.get("retrieval_pool", metrics.get("heldout_images", 0))
    rows = "".join(f"<tr><td>{html.escape(label)}</td><td class=n>{_num(metrics.get(key))}</td>"
                   f"<td>{html.escape(note)}</td></tr>" for key, label, note in METRICS)
    readout = meta.get("readout") or {}
    settings = [
        ("source encoder", meta.get("source_label")),
        ("readout", "embedding" if readout.get("kind") == "embed" else f"residual after block {readout.get('layer')}"),
        ("target", meta.get("target_label")),
        ("W", f"{meta.get('q')} x {meta.get('p')}"),
        ("images", f"{meta.get('images')} read; {meta.get('train_rows')} training rows "
                   f"({meta.get('augment', 0)} augmented views per training image); "
                   f"{meta.get('heldout_images')} held out (by name hash)"),
        ("ridge lambda", f"{meta.get('lambda', 0):.4g} ({meta.get('relative_lambda', 0):g} x the mean source "
                         f"variance), {_lambda_choice(meta)}"),
    ]
    settings_html = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in settings)
    body = [f"<h1>{html.escape(meta.get('name', 'adapter'))}</h1>", f"<table>{settings_html}</table>",
            _metrics_section(meta, rows, pool)]
    if examples:
        body.append("<h2>Held-out images: the target encoder's own decoding beside the adapter's</h2>"
                    "<table><tr><th>image</th><th>input</th><th>target's own</th><th>through the adapter</th>"
                    "<th>cosine</th></tr>")
        for ex in examples:
            cells = "".join(f"<td><img src='{html.escape(ex[k], quote=True)}' width=128></td>"
                            for k in ("input", "target", "adapted"))
            body.append(f"<tr><td>{html.escape(ex['name'])}</td>{cells}<td class=n>{_num(ex.get('cosine'))}</td></tr>")
        body.append("</table>")
    style = ("body{font-family:sans-serif;max-width:60em;margin:1em auto}td,th{padding:2px 8px;text-align:left}"
             "td.n{text-align:right;font-variant-numeric:tabular-nums}")
    text = (f"<!doctype html><html><head><meta charset=utf-8><title>{html.escape(meta.get('name', 'adapter'))}"
            f"</title><style>{style}</style></head><body>{''.join(body)}</body></html>\n")
    path = folder / "index.html"
    path.write_text(text)
    return path
