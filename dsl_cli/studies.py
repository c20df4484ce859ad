"""Interventional studies: the paper's two validations of DSL (DESIGN.md section 3, "Interventional studies").

Only the studies' names and headline results are public; the procedures here are reconstructions:

- head importance: per image and head, importance = 1 - cos(e_ablated, e), the head ablated (zero or mean)
  in a full forward pass with no patching; correlated (Spearman, Pearson, each with a percentile-bootstrap
  95 % interval and n; per image and pooled over all (image, head) pairs) with the DSL score and the
  naive-lens score, both cos(lens embedding, e) as the main runs rank by (`sim_embed`), and with the
  closed-form direct importance 1 - cos(R(x_L - a_h), e).
- overlay removal: composites of a background with a foreground pasted on it. Heads are ranked by
  cos(DSL embedding on the composite, e_fg), e_fg the foreground image's own embedding, and ablated
  cumulatively in that order; the overlay similarity cos(e_ablated(composite), e_fg) is traced after each
  step, with the area under each curve. Compared with the naive lens's ranking, an ACDC-like greedy order
  and random orders; the ablated composites can be decoded at chosen steps (`decode_kept`).

Each score is a lens's (`study.lenses`, any registered lens; default steering and direct, whose columns and
orders are `dsl` and `direct`: `figures.score_column`). The studies as run stages, their settings, files,
figures and pages are classes of `dsl_cli.study_registry`; this module computes.

Shapes: B images, K components, E embedding width, S image side. Everything runs through
`HookedEncoder.ablate_hooked`, batched over (image, ablation set) rows.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from tqdm.auto import tqdm

from dsl_cli.components import Component, parse_component
from dsl_cli.correlation import importance_correlations
from dsl_cli.decoder import load_decoder, to_pil
from dsl_cli.devices import resolve_dtype
from dsl_cli.encoder import HookedEncoder, MeanWrites
from dsl_cli.errors import UserError
from dsl_cli.figures import DEFAULT_LENSES, POOLED, score_column
from dsl_cli.images import InputImage, overlay
from dsl_cli.lenses import Lens, get_lens
from dsl_cli.memory import halving_batches, release_memory, rows_that_fit
from dsl_cli.outputs import CORRELATIONS, IMPORTANCE, OVERLAY, RunFolder, group_rows, save_png
from dsl_cli.study_registry import decodes, study_stage

log = logging.getLogger("dsl_cli.studies")

STUDY_MAX_ROWS = 256  # ablated rows per forward pass on a GPU: beyond this a bigger batch gains little


# ---------------------------------------------------------------- shared pieces


def study_lenses(cfg, names: Optional[Sequence[str]] = None) -> dict[str, Lens]:
    """The lenses a study compares, by their score column (`figures.score_column`), in order: `names` (default
    `study.lenses`, else steering and direct), each with the run's lens settings (`cfg.lens`: DSL's mode and
    alpha) and its own name."""
    names = list(names if names is not None else cfg.study.get("lenses") or DEFAULT_LENSES)
    return {score_column(name): get_lens(cfg.lens, name=name) for name in names}


def default_lenses(mode: str = "norm", alpha: float = 2.0) -> dict[str, Lens]:
    """DSL (`mode`, `alpha`) and the naive lens, by their score columns: what a study compares by default."""
    return {"dsl": get_lens("steering", mode=mode, alpha=alpha), "direct": get_lens("direct")}


def lens_scores(lenses: dict[str, Lens], encoder: HookedEncoder, cache, comps: list[Component],
                target: Tensor) -> dict[str, Tensor]:
    """cos(each lens's embedding of each component, target [B, 1, E]) -> column -> [B, K]."""
    return {column: cosine(lens.embeddings(encoder, cache, comps), target) for column, lens in lenses.items()}


def study_ablations(study) -> tuple[str, ...]:
    """`study.ablation` as the ablations to run: `both` is zero, then mean."""
    return ("zero", "mean") if study.ablation == "both" else (str(study.ablation),)


def cosine(a: Tensor, b: Tensor) -> Tensor:
    """Cosine along the last axis in float32 on the CPU: [..., E] x [..., E] (broadcast) -> [...]."""
    return torch.nn.functional.cosine_similarity(a.float().cpu(), b.float().cpu(), dim=-1)


def ablated_embeds(
    encoder: HookedEncoder,
    pixels: Tensor,
    plan: Sequence[tuple[int, Sequence[Component]]],
    how: str = "zero",
    means: Optional[MeanWrites] = None,
    batch_size: int = 64,
    desc: Optional[str] = None,
) -> Tensor:
    """Embeddings of ablated forward passes -> [N, E] (float32, CPU), one per plan row.

    pixels [B, 3, S, S]; plan: N rows (image index into pixels, components ablated together). Rows are
    run `batch_size` at a time, so different ablations of the same or other images share a forward pass;
    on CUDA out-of-memory the batch is halved (for the rest of the call) and the same rows are retried.
    """
    def run(start: int, stop: int) -> Tensor:
        chunk = plan[start:stop]
        index = torch.tensor([i for i, _ in chunk])
        return encoder.ablate_hooked(pixels[index], [list(s) for _, s in chunk], how=how, means=means)

    out = []
    with tqdm(total=len(plan), desc=desc, unit="row", leave=False, disable=desc is None) as bar:
        for start, stop, embeds in halving_batches(len(plan), batch_size, run, encoder.device, "ablating", log):
            out.append(embeds.float().cpu())
            bar.update(stop - start)
    return torch.cat(out) if out else torch.empty(0, encoder.d_embed)


def ablation_row_bytes(encoder: HookedEncoder) -> int:
    """Working memory of one row of an ablated forward pass, an upper estimate: a block's tokens at full width
    a few times over, its MLP's hidden activations, and the per-head writes at every token that the
    ablation hooks recompute (three copies of [T, H, D] in the worst case of every head ablated)."""
    tokens, hidden = encoder.n_tokens, encoder.d_mlp
    elements = tokens * (3 * encoder.n_heads * encoder.d_model + 2 * hidden + 8 * encoder.d_model)
    return elements * torch.finfo(encoder.dtype).bits // 8


def ablation_rows(encoder: HookedEncoder, batch_size: int) -> int:
    """Rows per ablated forward pass: on CUDA as many as its free memory holds (at most STUDY_MAX_ROWS), so a
    study uses the GPU it is given; `batch_size` on the CPU."""
    if encoder.device.type != "cuda":
        return batch_size
    return rows_that_fit(encoder.device, ablation_row_bytes(encoder), STUDY_MAX_ROWS)


def _names(names: Optional[Sequence[str]], count: int) -> list[str]:
    return list(names) if names is not None else [str(i) for i in range(count)]


# ---------------------------------------------------------------- head importance


def head_importance(
    encoder: HookedEncoder,
    pixels: Tensor,
    components: Sequence[Component | str],
    ablation: str = "zero",
    mode: str = "norm",
    alpha: float = 2.0,
    means: Optional[MeanWrites] = None,
    names: Optional[Sequence[str]] = None,
    batch_size: int = 64,
    lenses: Optional[dict[str, Lens]] = None,
) -> list[dict]:
    """One row per (image, component), image-major: importance = 1 - cos(e_ablated, e) (the component
    alone ablated in a full forward pass), dsl = cos(DSL embedding, e), direct = cos(R(write), e) (the
    naive lens), direct_importance = 1 - cos(R(x_L - write [+ mean write]), e) (the closed-form direct
    effect: the same ablation on the final residual only, nothing downstream recomputed). `lenses` (score
    column -> lens, `study_lenses`) replaces dsl and direct: each lens's cos(embedding, e) in its column.

    pixels [B, 3, S, S]; components: heads (MLPs work too); means: for mean ablation (default: the mean
    over these images, see `HookedEncoder.ablate_hooked`); names: B image names (default "0", "1", ...).
    The ablated passes are batched: `batch_size` rows per forward, each row a copy of one image with its
    own component ablated.
    """
    comps = [parse_component(c) for c in components]
    cache = encoder.run_with_cache(pixels)
    clean = cache.embeds.float().cpu().unsqueeze(1)  # [B, 1, E]
    if ablation == "zero":
        means = None  # the study passes its one mean to both ablations; zero puts nothing back
    elif means is None:
        means = encoder.mean_writes(pixels, batch_size)
    lenses = default_lenses(mode, alpha) if lenses is None else lenses
    scores = {**lens_scores(lenses, encoder, cache, comps, clean),  # [B, K] each
              "direct_importance": 1.0 - cosine(direct_ablated(encoder, cache, comps, means), clean)}
    plan = [(b, [c]) for b in range(len(pixels)) for c in comps]
    ablated = ablated_embeds(encoder, pixels, plan, ablation, means, batch_size, desc="ablate")
    importance = 1.0 - cosine(ablated.view(len(pixels), len(comps), -1), clean)  # [B, K]
    rows = []
    for b, name in enumerate(_names(names, len(pixels))):
        for k, comp in enumerate(comps):
            rows.append({"image": name, "component": comp.label, "layer": comp.layer, "head": comp.head,
                         "ablation": ablation, "mode": mode, "alpha": float(alpha),
                         "importance": importance[b, k].item(),
                         **{key: value[b, k].item() for key, value in scores.items()}})
    return rows


def direct_ablated(encoder: HookedEncoder, cache, comps: Sequence[Component],
                   means: Optional[MeanWrites] = None) -> Tensor:
    """R(x_L - w_c + m_c) -> [B, K, E]: the final residual with component c's CLS write w_c taken out (and
    its mean write m_c put in with `means`), read out; the direct path of the ablation alone."""
    writes = encoder.component_writes(cache, comps).float()  # [B, K, D]
    final = cache.resid[:, -1:].float()  # [B, 1, D]
    if means is None:
        return encoder.readout(final - writes)
    put_back = torch.stack([means.heads[c.layer, c.head] if c.kind == "head" else means.mlps[c.layer]
                            for c in comps]).to(writes.device)  # [K, D]
    return encoder.readout(final - writes + put_back)


# ---------------------------------------------------------------- overlay removal


@dataclass(frozen=True)
class OverlaySettings:
    """How the overlay study ablates and orders heads (study.*, the run's seed, lens and batch size);
    keep_steps: the steps whose ablated embeddings are kept for decoding (a step past the last is the last)."""

    steps: int = 20
    greedy_pool: Optional[int] = 32
    random_orders: int = 5
    seed: int = 0
    ablation: str = "zero"
    mode: str = "norm"
    alpha: float = 2.0
    batch_size: int = 64
    keep_steps: tuple[int, ...] = ()


@dataclass
class OverlayResult:
    """The overlay study's CSV rows, and the ablated composite embeddings [E] kept at `keep_steps`, by
    (composite, order, seed, step), for the dsl, direct and greedy orders and the first random one."""

    rows: list[dict]
    kept: dict[tuple, Tensor]


def overlay_removal(
    encoder: HookedEncoder,
    composite_pixels: Tensor,
    foreground_pixels: Tensor,
    components: Sequence[Component | str],
    steps: int = 20,
    greedy_pool: Optional[int] = 32,
    random_orders: int = 5,
    seed: int = 0,
    ablation: str = "zero",
    means: Optional[MeanWrites] = None,
    mode: str = "norm",
    alpha: float = 2.0,
    names: Optional[Sequence[str]] = None,
    batch_size: int = 64,
) -> list[dict]:
    """`overlay_curves` with its settings as keywords (the notebook entry; see `OverlaySettings`): its rows."""
    settings = OverlaySettings(steps, greedy_pool, random_orders, seed, ablation, mode, alpha, batch_size)
    return overlay_curves(encoder, composite_pixels, foreground_pixels, components, settings, means, names).rows


def overlay_curves(encoder: HookedEncoder, composite_pixels: Tensor, foreground_pixels: Tensor,
                   components: Sequence[Component | str], settings: OverlaySettings,
                   means: Optional[MeanWrites] = None, names: Optional[Sequence[str]] = None,
                   lenses: Optional[dict[str, Lens]] = None) -> OverlayResult:
    """Overlay-similarity curves under cumulative ablation, as CSV rows (`outputs.OverlayRow` less background and
    foreground): per composite, orders `dsl`, `direct`, `greedy` and `random` (seed = seed + r for r <
    random_orders, the same orders for every composite), steps 0..min(steps, K) each; step 0 ablates
    nothing, `component` is the one ablated at that step, overlay_sim = cos(e_ablated(composite), e_fg),
    auc the area under the order's curve (`area_under`).

    composite_pixels, foreground_pixels [B, 3, S, S] (pair b: composite b and its foreground b).
    dsl: by cos(DSL embedding of the head on the composite, e_fg), best first; direct: the same with the
    naive lens R(write). greedy (ACDC-like): each step ablates, among the `greedy_pool` best not-yet-ablated
    heads by DSL rank (all remaining if None), the one that lowers the overlay similarity most (ties: the
    better DSL rank). means: for mean ablation (default: the mean over the composites). `lenses` (order name
    -> lens, `study_lenses`) replaces dsl and direct: an order per lens, by cos(its embedding, e_fg); the greedy
    pool is the first lens's best; `dsl_score` is DSL's score where DSL is one of them.
    """
    comps, s = [parse_component(c) for c in components], settings
    if s.ablation == "mean" and means is None:
        means = encoder.mean_writes(composite_pixels, s.batch_size)
    e_fg = encoder.embed(foreground_pixels).float().cpu()  # [B, E]
    cache = encoder.run_with_cache(composite_pixels)
    lenses = default_lenses(s.mode, s.alpha) if lenses is None else lenses
    scores = lens_scores(lenses, encoder, cache, comps, e_fg.unsqueeze(1))  # [B, K] each
    clean = cache.embeds.float().cpu()  # [B, E]: nothing ablated
    result = OverlayResult([], {})
    for b, name in enumerate(tqdm(_names(names, len(composite_pixels)), desc="overlay", unit="img")):
        curves = _Curves(encoder, composite_pixels[b:b + 1], e_fg[b], comps, s, means, clean[b])
        rows, kept = curves.run({lens: value[b] for lens, value in scores.items()})
        result.rows += [{"image": name, **row} for row in rows]
        result.kept.update({(name, *key): embed for key, embed in kept.items()})
    return result


def area_under(sims: Sequence[float]) -> float:
    """Area under an overlay curve: the trapezoid rule over steps 0..n, one unit apart (lower: the overlay
    went sooner)."""
    return float(np.trapezoid(np.asarray(sims, dtype=np.float64))) if len(sims) > 1 else 0.0


@dataclass
class _Curves:
    """The overlay curves of one composite (pixels [1, 3, S, S], target e_fg [E], clean: its embedding [E])."""

    encoder: HookedEncoder
    pixels: Tensor
    target: Tensor
    comps: list[Component]
    settings: OverlaySettings
    means: Optional[MeanWrites]
    clean: Tensor

    def run(self, scores: dict[str, Tensor]) -> tuple[list[dict], dict[tuple, Tensor]]:
        """Rows of every order and the embeddings kept, from the lenses' scores [K] of the heads."""
        s, n_steps = self.settings, min(self.settings.steps, len(self.comps))
        ranked = {lens: torch.sort(v, descending=True, stable=True).indices.tolist() for lens, v in scores.items()}
        runs = [(lens, None, ranked[lens][:n_steps], *self.curve(ranked[lens][:n_steps])) for lens in scores]
        picked, embeds = _greedy(self.encoder, self.pixels, self.target, self.comps, next(iter(ranked.values())),
                                 n_steps, s, self.means)
        runs.append(("greedy", None, picked, *self.trace(embeds)))
        for r in range(s.random_orders):
            order = random_order(len(self.comps), s.seed + r)[:n_steps]
            runs.append(("random", s.seed + r, order, *self.curve(order)))
        rows, kept = [], {}
        steps = sorted({min(step, n_steps) for step in s.keep_steps})
        for order, seed, picked, sims, embeds in runs:
            rows += self.record(scores.get("dsl"), order, seed, picked, sims)
            if seed in (None, s.seed):
                kept.update({(order, seed, step): embeds[step] for step in steps})
        return rows, kept

    def curve(self, order: list[int]) -> tuple[list[float], Tensor]:
        """Overlay similarity and embedding [n + 1, E] after each prefix of `order`: step 0 (nothing) ..
        len(order), in batches of rows."""
        plan = [(0, [self.comps[k] for k in order[:step]]) for step in range(1, len(order) + 1)]
        return self.trace(ablated_embeds(self.encoder, self.pixels, plan, self.settings.ablation, self.means,
                                         self.settings.batch_size))

    def trace(self, ablated: Tensor) -> tuple[list[float], Tensor]:
        """(overlay similarities, embeddings [n + 1, E]) of the ablated embeddings [n, E] after step 0."""
        embeds = torch.cat([self.clean[None], ablated])
        return cosine(embeds, self.target).tolist(), embeds

    def record(self, scores: Optional[Tensor], order: str, run_seed: Optional[int], picked: list[int],
               sims: Sequence[float]) -> list[dict]:
        auc = area_under(sims)
        return [{"ablation": self.settings.ablation, "order": order, "seed": run_seed, "step": step,
                 "component": self.comps[picked[step - 1]].label if step else "",
                 "dsl_score": scores[picked[step - 1]].item() if step and scores is not None else None,
                 "overlay_sim": float(sim),
                 "auc": auc} for step, sim in enumerate(sims)]


def random_order(count: int, seed: int) -> list[int]:
    """A seeded permutation of range(count) (torch's CPU generator: the same on every machine)."""
    return torch.randperm(count, generator=torch.Generator().manual_seed(seed)).tolist()


def _greedy(encoder: HookedEncoder, pixels: Tensor, target: Tensor, comps: list[Component], ranked: list[int],
            n_steps: int, s: OverlaySettings, means: Optional[MeanWrites] = None) -> tuple[list[int], Tensor]:
    """The ACDC-like order on one composite (pixels [1, 3, S, S], target [E]): each step tries every
    candidate on top of the heads ablated so far (one batched pass) and keeps the one with the lowest
    overlay similarity. Returns (component indices, the embedding after each step [n_steps, E])."""
    picked: list[int] = []
    embeds = []
    for _ in range(n_steps):
        candidates = [k for k in ranked if k not in picked][:s.greedy_pool]
        plan = [(0, [comps[j] for j in picked + [k]]) for k in candidates]
        trial = ablated_embeds(encoder, pixels, plan, s.ablation, means, s.batch_size)
        best = int(torch.argmin(cosine(trial, target)))  # the first minimum: the better DSL rank on ties
        picked.append(candidates[best])
        embeds.append(trial[best])
    return picked, torch.stack(embeds) if embeds else torch.empty(0, encoder.d_embed)


# ---------------------------------------------------------------- the study as a run stage


def _pixels(preprocess, pictures: Sequence[Image.Image | InputImage]) -> Tensor:
    """[B, 3, S, S] on the CPU; ablated_embeds moves each batch to the encoder's device. Inputs are read
    one at a time, so only their preprocessed pixels are held together."""
    return torch.stack([preprocess(p.load() if isinstance(p, InputImage) else p) for p in pictures])


@study_stage("head_importance")
def head_importance_stage(cfg, run_dir: Path, encoder: HookedEncoder, preprocess, images: list[InputImage],
                          heads: list[Component]) -> dict:
    """Head importance on the run's images and heads, into study_head_importance.csv (a column per further lens
    of `study.lenses`) and correlations.csv; returns the manifest's summary less its figures."""
    study, step = cfg.study, cfg.encoder.batch_size
    lenses = study_lenses(cfg)
    pixels = _pixels(preprocess, images)
    ablations = study_ablations(study)
    # mean ablation: one mean over the whole image set, not per batch
    means = encoder.mean_writes(pixels, step) if "mean" in ablations else None
    rows, ablated = [], ablation_rows(encoder, step)
    for ablation in ablations:
        for start in tqdm(range(0, len(images), step), desc=f"head importance ({ablation})", unit="batch"):
            rows += head_importance(encoder, pixels[start:start + step], heads, ablation, cfg.lens.mode,
                                    float(cfg.lens.alpha), means, [i.name for i in images[start:start + step]],
                                    ablated, lenses)
    table = IMPORTANCE.with_columns([c for c in lenses if c not in IMPORTANCE.columns])
    scores = [c for c in table.columns[table.columns.index("importance") + 1:] if rows and c in rows[0]]
    corr = importance_correlations(rows, scores, study.bootstrap, cfg.seed)
    RunFolder(run_dir).write(table, rows)
    RunFolder(run_dir).write(CORRELATIONS, corr)
    pooled = {f"{r['ablation']} {r['lens']}": {k: r[k] for k in ("n", "spearman", "spearman_low", "spearman_high",
                                                                 "pearson", "pearson_low", "pearson_high")}
              for r in corr if r["image"] == POOLED}
    return {"study": "head_importance", "rows": len(rows), "ablation": list(ablations), "pooled": pooled,
            "files": ["study_head_importance.csv", "correlations.csv"]}


def composites(images: list[InputImage], scale: float,
               position: str = "center") -> list[tuple[str, InputImage, InputImage, Image.Image]]:
    """(name, background, foreground, composite) per image: each image in turn is the background and the
    NEXT image (cyclically) the foreground, pasted at `scale` and `position` (`dsl_cli.images.overlay`), so
    n images give n composites and every image is used once in each role. Needs at least two images."""
    if len(images) < 2:
        raise UserError("study=overlay_removal pastes one image on another: give at least two images")
    out = []
    for i, background in enumerate(images):
        foreground = images[(i + 1) % len(images)]
        name = f"{foreground.name}_on_{background.name}"
        out.append((name, background, foreground, overlay(background.load(), foreground.load(), scale, position)))
    return out


@study_stage("overlay_removal")
def overlay_removal_stage(cfg, run_dir: Path, encoder: HookedEncoder, preprocess, images: list[InputImage],
                          heads: list[Component]) -> dict:
    """Overlay removal on composites of the run's images, an order per lens of `study.lenses`, into
    study_overlay_removal.csv (and the composites, and the decoded steps); returns the manifest's summary less
    its figures."""
    study = cfg.study
    pairs = composites(images, study.overlay_scale, study.overlay_position)
    for name, _, _, picture in pairs:
        save_png(RunFolder(run_dir).overlay_picture(name), picture)
    composite_pixels = _pixels(preprocess, [p for *_, p in pairs])
    foreground_pixels = _pixels(preprocess, [fg for _, _, fg, _ in pairs])
    settings = OverlaySettings(steps=study.steps, greedy_pool=study.greedy_pool, random_orders=study.random_orders,
                               seed=cfg.seed, ablation=study_ablations(study)[0], mode=cfg.lens.mode,
                               alpha=float(cfg.lens.alpha), batch_size=ablation_rows(encoder, cfg.encoder.batch_size),
                               keep_steps=tuple(study.decode_steps) if decodes(cfg) else ())
    result = overlay_curves(encoder, composite_pixels, foreground_pixels, heads, settings,
                            names=[name for name, *_ in pairs], lenses=study_lenses(cfg))
    roles = {name: (bg.name, fg.name) for name, bg, fg, _ in pairs}
    for row in result.rows:
        row["background"], row["foreground"] = roles[row["image"]]
    RunFolder(run_dir).write(OVERLAY, result.rows)
    decode_kept(cfg, run_dir, encoder, result.kept)
    # area under each order's curve, averaged over composites (and seeds): lower, the overlay went sooner
    mean_auc = {order: float(np.mean([r["auc"] for r in group if r["step"] == 0]))
                for (order,), group in group_rows(result.rows, ("order",)).items()}
    return {"study": "overlay_removal", "rows": len(result.rows), "composites": len(pairs),
            "ablation": settings.ablation, "mean_auc": mean_auc, "files": ["study_overlay_removal.csv"],
            "clamped": clamped_settings(study, len(heads), decodes(cfg))}


def clamped_settings(study, heads: int, decoded: bool) -> dict:
    """The overlay settings that the model's `heads` cut short, as they ran (`steps 40` over 16 heads ran
    16 steps), for the study's page; {} where every one ran as asked."""
    steps = min(int(study.steps), heads)
    ran = {"steps": steps, "greedy_pool": heads if study.greedy_pool is None else min(int(study.greedy_pool), heads),
           "decode_steps": sorted({min(int(step), steps) for step in study.decode_steps}) if decoded else None}
    asked = {"steps": study.steps, "greedy_pool": study.greedy_pool,
             "decode_steps": list(study.decode_steps) if decoded else None}
    return {key: value for key, value in ran.items() if value != asked[key] and not (
        key == "greedy_pool" and asked[key] is None)}


def decode_kept(cfg, run_dir: Path, encoder: HookedEncoder, kept: dict[tuple, Tensor]) -> None:
    """Decode the kept ablated-composite embeddings (the run's decoder and decode settings, seed `seed`
    for every picture) into `RunFolder.overlay_step` files."""
    if not kept:
        return
    decode, keys = cfg.decode, list(kept)
    release_memory(encoder.device)  # the ablation batches' cache, before the decoder loads beside the encoder
    decoder = load_decoder(cfg.decoder, device=encoder.device, dtype=resolve_dtype(decode.dtype, encoder.device),
                           scheduler=decode.scheduler)
    negative = decoder.negative_embed(encoder).float().cpu()
    pictures = decoder.decode(torch.stack([kept[k] for k in keys]), negative, [cfg.seed] * len(keys),
                              decode.height, decode.width, steps=decode.steps, guidance=float(decode.guidance),
                              batch_size=decode.batch_size)
    for (composite, order, _, step), picture in zip(keys, pictures):
        save_png(RunFolder(run_dir).overlay_step(composite, order, step), to_pil(picture))
