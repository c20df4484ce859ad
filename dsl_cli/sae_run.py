"""`dsl run sae.path=FOLDER`: a run over an SAE's features instead of heads (dsl_cli.sae, issue 35).

Before the lens stage, one streamed pass over the run's images encodes the SAE's hook point at the readout
position: every feature's `sae.top_images` most active images are kept in bounded heaps (`TopImages`), and
with `sae.features=top` each image's `sae.top_k` most active features are chosen. The run's components are
the chosen features (the union over images) and the SAE's error term; every lens reads them through a
`FeatureEncoder`. Each image decodes only its own top features (and the error term); the other rows are
scored (column `activation`: f_i at the readout position) but not decoded. `features.csv` lists each chosen
feature's top images (with images.shard/num_shards, each shard writes its own and `merge_top_rows` merges
them); the run page's "SAE features" section shows them beside the features' pictures.
"""

from __future__ import annotations

import csv
import io
import logging
import math
from pathlib import Path
from typing import Optional

import torch
import yaml
from tqdm.auto import tqdm

from dsl_cli.components import Component
from dsl_cli.errors import UserError
from dsl_cli.sae import (FeatureEncoder, TopImages, check_adapter_reach, check_trained_on, load_sae,
                         locate_sae, read_sae_header)

log = logging.getLogger("dsl_cli.sae_run")

FEATURES_CSV = "features.csv"  # each decoded feature's top-activating images
FEATURE_COLUMNS = ("component", "feature", "rank", "image", "activation")
SAE_LENSES = ("steering", "direct", "attribution", "logit")


def sae_config(cfg):
    """The run's `sae` settings when it reads an SAE (sae.path or sae.repo_id set), else None."""
    sae = cfg.get("sae") if hasattr(cfg, "get") else getattr(cfg, "sae", None)
    if sae is None or not (sae.get("path") or sae.get("repo_id")):
        return None
    return sae


def validate_sae(cfg, n_layers: Optional[int] = None, readout=None) -> None:
    """Checks that need no model: the settings, and the SAE's cfg (not its weights) against the run's encoder
    (`n_layers`, where the configs tell it) and the run's adapter (`readout`, an `adapters.Readout`, or None),
    so that an SAE of another encoder, or past a residual adapter's block, is refused before one loads."""
    sae = sae_config(cfg)
    if sae is None:
        return
    if cfg.study.name is not None:
        raise UserError("sae: an interventional study ablates heads; run it without sae.path")
    if cfg.lens.name not in SAE_LENSES:
        raise UserError(f"sae: lens={cfg.lens.name} reads the residual stream, not features; use lens= one of "
                        f"{', '.join(SAE_LENSES)}")
    if sae.top_k < 1 or sae.top_images < 1:
        raise UserError(f"sae.top_k={sae.top_k}, sae.top_images={sae.top_images}: each must be at least 1")
    if cfg.component not in ("heads", "mlp", "all"):  # labels: the user chose components the run would not read
        raise UserError(f"component={cfg.component}: with an SAE the run reads its features at the SAE's own "
                        "layer, chosen by sae.features (top, or feature numbers such as [12, 345]); drop component=")
    chosen_features(sae.features, None)
    found = locate_sae(sae.path, sae.repo_id)
    header = read_sae_header(found)  # its cfg and tensor shapes checked, no weights read
    check_trained_on(header.cfg, str(found), cfg.encoder)
    chosen_features(sae.features, header.d_sae)
    if n_layers is not None and header.layer >= n_layers:
        raise UserError(f"SAE {found}: hook {header.hook_name} is beyond this encoder's {n_layers} layers: give an "
                        f"SAE of this encoder ({cfg.encoder.name})")
    if cfg.lens.name == "steering":
        check_adapter_reach(readout, header.hook_name, str(found))


def chosen_features(spec, d_sae: Optional[int]) -> Optional[list[int]]:
    """`sae.features`: `top` (None: chosen per image) or a list of feature indices."""
    if isinstance(spec, str) and spec.strip() == "top":
        return None
    items = spec if isinstance(spec, (list, tuple)) or hasattr(spec, "__iter__") and not isinstance(spec, str) \
        else [spec]
    out = []
    for item in items:
        if isinstance(item, bool) or not (isinstance(item, int) or (isinstance(item, str) and item.strip().isdigit())):
            raise UserError(f"sae.features={spec}: use top, or a list of feature indices [12, 345]")
        out.append(int(item))
    if not out:
        raise UserError("sae.features=[] names no feature: use top, or a list of feature indices")
    twice = next((i for i in out if out.count(i) > 1), None)
    if twice is not None:  # as an image or a swept value given twice: the same work twice, or a list that misleads
        raise UserError(f"sae.features={spec} names feature {twice} twice: give each feature once")
    if d_sae is not None and any(not 0 <= i < d_sae for i in out):
        raise UserError(f"sae.features={spec}: this SAE's features run from 0 to {d_sae - 1}")
    return out


def feature_stage(cfg, run_dir: Path, encoder, preprocess, image_set,
                  manifest) -> tuple[FeatureEncoder, list[Component]]:
    """Load the SAE, wrap the encoder, stream the images once: (the wrapped encoder, the run's components).
    Writes features.csv; the manifest records the SAE and each image's chosen features."""
    spec = sae_config(cfg)
    with manifest.stage("sae"):
        sae = load_sae(spec.path, spec.repo_id)  # its cfg was checked against the encoder by validate_sae
        _check_layer_asked(Path(run_dir), sae.layer, encoder.n_layers, sae.source)
        manifest.same_weights("sae", [sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec, sae.threshold],
                              f"the SAE {sae.source}")
        features = FeatureEncoder(encoder, sae)
        fixed = chosen_features(spec.features, sae.d_sae)
        top = TopImages(int(spec.top_images))
        per_image: dict[str, list[int]] = {}
        batch_size = cfg.encoder.batch_size
        images = image_set.images
        with tqdm(total=len(images), desc="sae", unit="img") as bar:
            for start in range(0, len(images), batch_size):
                names, pixels = [], []
                for item, picture in image_set.stream(images[start:start + batch_size]):
                    names.append(item.name)
                    pixels.append(preprocess(picture))
                if not names:
                    continue
                cache = features.run_with_cache(torch.stack(pixels).to(features.device, features.dtype))
                acts = sae.to(cache.resid.device).encode(cache[sae.hook_name].float())  # [B, d_sae]
                top.add(names, acts)
                for name, row in zip(names, acts.cpu()):
                    best = row.topk(min(int(spec.top_k), sae.d_sae))
                    per_image[name] = [int(i) for v, i in zip(best.values.tolist(), best.indices.tolist()) if v > 0]
                bar.update(len(names))
        picked = fixed if fixed is not None else sorted({i for chosen in per_image.values() for i in chosen})
        if not picked:
            raise UserError(f"sae: no feature of {sae.source} is active on these images (sae.features=top)")
        write_features_csv(Path(run_dir), top.rows(picked, sae.layer))
    manifest.update(sae={"source": sae.source, "hook_name": sae.hook_name, "architecture": sae.architecture,
                         "d_sae": sae.d_sae, "features": "top" if fixed is None else fixed,
                         "per_image": {name: [f"L{sae.layer:02d}F{i:05d}" for i in chosen]
                                       for name, chosen in per_image.items()} if fixed is None else None})
    return features, sae.components(picked)


def _check_layer_asked(run_dir: Path, layer: int, n_layers: int, source: str) -> None:
    """An SAE is read at the layer it was trained on; a `layer=` on the run's command line (its saved
    overrides) that names another, or several, would be ignored without a word, so it is refused. A preset's
    layer (debug=tiny) was not asked for; a run from the Python API has no command line."""
    from dsl_cli.outputs import RunFolder

    saved = RunFolder(run_dir).overrides_yaml
    overrides = yaml.safe_load(saved.read_text()) if saved.is_file() else []
    for override in overrides if isinstance(overrides, list) else []:
        key, _, value = str(override).partition("=")
        number = value.strip().removeprefix("-")
        if key.lstrip("+~") == "layer" and not (number.isdigit() and int(value) in (layer, layer - n_layers)):
            raise UserError(f"layer={value}: {source} reads its features at layer {layer}, where it was trained; "
                            "with sae= drop layer= (or give that layer)")


def write_features_csv(run_dir: Path, rows: list[dict]) -> None:
    from dsl_cli.outputs import atomic_write_bytes, csv_text

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, FEATURE_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: csv_text(v) for k, v in row.items()} for row in rows)  # 6 decimals, as every CSV
    atomic_write_bytes(run_dir / FEATURES_CSV, buffer.getvalue().encode())


def feature_values(encoder, cache, components) -> dict[str, list]:
    """similarity.csv's `activation` column of a batch ([B][K], None for what is not a feature); {} when the
    encoder reads no SAE."""
    if not isinstance(encoder, FeatureEncoder):
        return {}
    acts = encoder.activations(cache, components).cpu().tolist()
    return {"activation": [[None if math.isnan(v) else v for v in image] for image in acts]}


def feature_picks(cfg, rows: list[dict], picks: list[int]) -> list[int]:
    """Of one image's planned rows, those to decode: with sae.features=top, only the image's own top
    `sae.top_k` features by activation (and the error term); everything otherwise."""
    spec = sae_config(cfg)
    if spec is None or chosen_features(spec.features, None) is not None:
        return picks
    active = [k for k, row in enumerate(rows) if row.get("kind") == "feature" and (row.get("activation") or 0) > 0]
    best = set(sorted(active, key=lambda k: -rows[k]["activation"])[:int(spec.top_k)])
    return [k for k in picks if rows[k].get("kind") != "feature" or k in best]
