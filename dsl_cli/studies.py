"""Interventional studies: the paper's two validations of DSL (DESIGN.md section 3, "Interventional studies").

Only the studies' names and headline results are public; the procedures here are reconstructions:

- head importance: per image and head, importance = 1 - cos(e_ablated, e), the head ablated (zero or mean)
  in a full forward pass with no patching; correlated (Spearman, Pearson; per image and pooled over all
  (image, head) pairs) with the DSL score and the direct-lens score, both cos(lens embedding, e) as the
  main runs rank by (`sim_embed`).
- overlay removal: composites of a background with a foreground pasted on it. Heads are ranked by
  cos(DSL embedding on the composite, e_fg), e_fg the foreground image's own embedding, and ablated
  cumulatively in that order; the overlay similarity cos(e_ablated(composite), e_fg) is traced after each
  step. Compared with an ACDC-like greedy order and with random orders.

Shapes: B images, K components, E embedding width, S image side. Everything runs through
`HookedEncoder.ablate_hooked`, batched over (image, ablation set) rows.
"""

from __future__ import annotations

import math
import textwrap
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image
from scipy import stats
from torch import Tensor
from tqdm.auto import tqdm

from dsl_cli.components import Component, parse_component
from dsl_cli.encoder import HookedEncoder, MeanWrites
from dsl_cli.errors import UserError
from dsl_cli.images import InputImage, overlay
from dsl_cli.memory import release_memory, rows_that_fit
from dsl_cli.outputs import CsvLog, group_rows, pyplot, read_csv, read_manifest, save_figure, save_png

IMPORTANCE_COLUMNS = ["image", "component", "layer", "head", "ablation", "mode", "alpha", "importance", "dsl",
                      "direct"]
CORRELATION_COLUMNS = ["image", "lens", "n", "spearman", "spearman_p", "pearson", "pearson_p"]
OVERLAY_COLUMNS = ["image", "background", "foreground", "ablation", "order", "seed", "step", "component",
                   "dsl_score", "overlay_sim"]
POOLED = "pooled"  # the `image` value of correlations over all (image, head) rows
STUDY_MAX_ROWS = 256  # ablated rows per forward pass on a GPU: beyond this a bigger batch gains little


# ---------------------------------------------------------------- shared pieces


def validate_study(study, seed: int = 0) -> None:
    """Checks on `cfg.study` that need no model (called by `dsl_cli.run.validate` before anything loads);
    `seed` is the run's: the random orders use seeds seed .. seed + random_orders - 1, all within 64 bits."""
    if study.steps < 1:
        raise UserError(f"study.steps={study.steps}: must be at least 1")
    if study.greedy_pool is not None and study.greedy_pool < 1:
        raise UserError(f"study.greedy_pool={study.greedy_pool}: must be at least 1 (or null for all heads)")
    if study.random_orders < 0:
        raise UserError(f"study.random_orders={study.random_orders}: must be 0 or more")
    if not 0 < study.overlay_scale <= 1:
        raise UserError(f"study.overlay_scale={study.overlay_scale}: must be in (0, 1]")
    if seed + study.random_orders - 1 >= 2**64:
        raise UserError(f"seed={seed}: the random orders use seeds up to seed + study.random_orders - 1, "
                        "which must stay below 2**64")


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
    out = []
    start, step = 0, max(1, batch_size)
    with tqdm(total=len(plan), desc=desc, unit="row", leave=False, disable=desc is None) as bar:
        while start < len(plan):
            chunk = plan[start:start + step]
            index = torch.tensor([i for i, _ in chunk])
            try:
                embeds = encoder.ablate_hooked(pixels[index], [list(s) for _, s in chunk], how=how, means=means)
            except torch.cuda.OutOfMemoryError:
                if step == 1:
                    raise
                embeds = None  # retried below, once the traceback holding the batch's tensors is gone
            if embeds is None:
                step //= 2
                release_memory(encoder.device)
                continue
            out.append(embeds.float().cpu())
            start += len(chunk)
            bar.update(len(chunk))
    return torch.cat(out) if out else torch.empty(0, encoder.d_embed)


def ablation_row_bytes(encoder: HookedEncoder) -> int:
    """Working memory of one row of an ablated forward pass, an upper estimate: a block's tokens at full width
    a few times over, its MLP's hidden activations, and the per-head writes at every token that the
    ablation hooks recompute (three copies of [T, H, D] in the worst case of every head ablated)."""
    tokens = encoder.visual.grid_size[0] * encoder.visual.grid_size[1] + 1
    hidden = encoder.blocks[0].mlp.c_fc.out_features
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
) -> list[dict]:
    """One row per (image, component), image-major: importance = 1 - cos(e_ablated, e) (the component
    alone ablated in a full forward pass), dsl = cos(DSL embedding, e), direct = cos(R(write), e).

    pixels [B, 3, S, S]; components: heads (MLPs work too); means: for mean ablation (default: the mean
    over these images, see `HookedEncoder.ablate_hooked`); names: B image names (default "0", "1", ...).
    """
    comps = [parse_component(c) for c in components]
    cache = encoder.run_with_cache(pixels)
    clean = cache.embeds.float().cpu().unsqueeze(1)  # [B, 1, E]
    dsl = cosine(encoder.steer(cache, comps, mode=mode, alpha=alpha), clean)  # [B, K]
    direct = cosine(encoder.direct(cache, comps), clean)  # [B, K]
    if ablation == "mean" and means is None:
        means = encoder.mean_writes(pixels, batch_size)
    plan = [(b, [c]) for b in range(len(pixels)) for c in comps]
    ablated = ablated_embeds(encoder, pixels, plan, ablation, means, batch_size, desc="ablate")
    importance = 1.0 - cosine(ablated.view(len(pixels), len(comps), -1), clean)  # [B, K]
    rows = []
    for b, name in enumerate(_names(names, len(pixels))):
        for k, comp in enumerate(comps):
            rows.append({"image": name, "component": comp.label, "layer": comp.layer, "head": comp.head,
                         "ablation": ablation, "mode": mode, "alpha": float(alpha),
                         "importance": importance[b, k].item(), "dsl": dsl[b, k].item(),
                         "direct": direct[b, k].item()})
    return rows


def _correlate(x: np.ndarray, y: np.ndarray) -> dict:
    """Spearman and Pearson of two equal-length vectors; NaN where undefined (n < 2, a constant vector)."""
    result = {"n": len(x), "spearman": math.nan, "spearman_p": math.nan, "pearson": math.nan,
              "pearson_p": math.nan}
    if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return result
    with warnings.catch_warnings():  # n == 2 gives p = 1 with a warning in some scipy versions
        warnings.simplefilter("ignore")
        rho, rho_p = stats.spearmanr(x, y)
        r, r_p = stats.pearsonr(x, y)
    result.update(spearman=float(rho), spearman_p=float(rho_p), pearson=float(r), pearson_p=float(r_p))
    return result


def correlations(rows: list[dict], target: str = "importance", scores: Sequence[str] = ("dsl", "direct")) -> list[dict]:
    """Spearman and Pearson of `target` vs each score, per image and pooled over all rows (image
    `pooled`): one dict per (image, lens) with CORRELATION_COLUMNS. Pooling mixes images whose importance
    scales differ; the per-image rows are the cleaner test, the pooled one the headline number."""
    groups = list(group_rows(rows, ("image",)).items()) + [((POOLED,), rows)]
    out = []
    for (image,), group in groups:
        y = np.array([float(r[target]) for r in group])
        for lens in scores:
            x = np.array([float(r[lens]) for r in group])
            out.append({"image": image, "lens": lens, **_correlate(x, y)})
    return out


# ---------------------------------------------------------------- overlay removal


@dataclass(frozen=True)
class OverlaySettings:
    """How the overlay study ablates and orders heads (study.*, the run's seed, lens and batch size)."""

    steps: int = 20
    greedy_pool: Optional[int] = 32
    random_orders: int = 5
    seed: int = 0
    ablation: str = "zero"
    mode: str = "norm"
    alpha: float = 2.0
    batch_size: int = 64


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
    """`overlay_curves` with its settings as keywords (the notebook entry; see `OverlaySettings`)."""
    settings = OverlaySettings(steps, greedy_pool, random_orders, seed, ablation, mode, alpha, batch_size)
    return overlay_curves(encoder, composite_pixels, foreground_pixels, components, settings, means, names)


def overlay_curves(encoder: HookedEncoder, composite_pixels: Tensor, foreground_pixels: Tensor,
                   components: Sequence[Component | str], settings: OverlaySettings,
                   means: Optional[MeanWrites] = None, names: Optional[Sequence[str]] = None) -> list[dict]:
    """Overlay-similarity curves under cumulative ablation, as CSV rows (OVERLAY_COLUMNS less background and
    foreground): per composite, order `dsl`, `greedy` and `random` (seed = seed + r for r < random_orders,
    the same orders for every composite), steps 0..min(steps, K) each; step 0 ablates nothing,
    `component` is the one ablated at that step, overlay_sim = cos(e_ablated(composite), e_fg).

    composite_pixels, foreground_pixels [B, 3, S, S] (pair b: composite b and its foreground b).
    dsl: by cos(DSL embedding of the head on the composite, e_fg), best first. greedy (ACDC-like): each step
    ablates, among the `greedy_pool` best not-yet-ablated heads by DSL rank (all remaining if None), the one
    that lowers the overlay similarity most (ties: the better DSL rank). means: for mean ablation (default:
    the mean over the composites).
    """
    comps, s = [parse_component(c) for c in components], settings
    if s.ablation == "mean" and means is None:
        means = encoder.mean_writes(composite_pixels, s.batch_size)
    e_fg = encoder.embed(foreground_pixels).float().cpu()  # [B, E]
    cache = encoder.run_with_cache(composite_pixels)
    dsl_scores = cosine(encoder.steer(cache, comps, mode=s.mode, alpha=s.alpha), e_fg.unsqueeze(1))  # [B, K]
    base = cosine(cache.embeds, e_fg)  # [B]: nothing ablated
    rows = []
    for b, name in enumerate(tqdm(_names(names, len(composite_pixels)), desc="overlay", unit="img")):
        curves = _Curves(encoder, composite_pixels[b:b + 1], e_fg[b], comps, s, means, base[b].item())
        rows += [{"image": name, **row} for row in curves.rows(dsl_scores[b])]
    return rows


@dataclass
class _Curves:
    """The overlay curves of one composite (pixels [1, 3, S, S], target e_fg [E], base: nothing ablated)."""

    encoder: HookedEncoder
    pixels: Tensor
    target: Tensor
    comps: list[Component]
    settings: OverlaySettings
    means: Optional[MeanWrites]
    base: float

    def rows(self, scores: Tensor) -> list[dict]:
        """Rows of every order, DSL scores [K] of the heads on this composite."""
        s, n_steps = self.settings, min(self.settings.steps, len(self.comps))
        ranked = torch.sort(scores, descending=True, stable=True).indices.tolist()
        rows = self.record(scores, "dsl", None, ranked, self.curve(ranked[:n_steps]))
        picked, sims = _greedy(self.encoder, self.pixels, self.target, self.comps, ranked, n_steps, s.greedy_pool,
                               s.ablation, self.means, s.batch_size)
        rows += self.record(scores, "greedy", None, picked, [self.base, *sims])
        for r in range(s.random_orders):
            order = random_order(len(self.comps), s.seed + r)[:n_steps]
            rows += self.record(scores, "random", s.seed + r, order, self.curve(order))
        return rows

    def curve(self, order: list[int]) -> list[float]:
        """Overlay similarity after each prefix of `order`: step 0 (base) .. len(order), one batch."""
        plan = [(0, [self.comps[k] for k in order[:step]]) for step in range(1, len(order) + 1)]
        ablated = ablated_embeds(self.encoder, self.pixels, plan, self.settings.ablation, self.means,
                                 self.settings.batch_size)
        return [self.base, *cosine(ablated, self.target).tolist()]

    def record(self, scores: Tensor, order: str, run_seed: Optional[int], picked: list[int],
               sims: Sequence[float]) -> list[dict]:
        return [{"ablation": self.settings.ablation, "order": order, "seed": run_seed, "step": step,
                 "component": self.comps[picked[step - 1]].label if step else "",
                 "dsl_score": scores[picked[step - 1]].item() if step else None, "overlay_sim": float(sim)}
                for step, sim in enumerate(sims)]


def random_order(count: int, seed: int) -> list[int]:
    """A seeded permutation of range(count) (torch's CPU generator: the same on every machine)."""
    return torch.randperm(count, generator=torch.Generator().manual_seed(seed)).tolist()


def _greedy(
    encoder: HookedEncoder, pixels: Tensor, target: Tensor, comps: list[Component], ranked: list[int],
    n_steps: int, pool: Optional[int], ablation: str, means: Optional[MeanWrites], batch_size: int,
) -> tuple[list[int], list[float]]:
    """The ACDC-like order on one composite (pixels [1, 3, S, S], target [E]): each step tries every
    candidate on top of the heads ablated so far (one batched pass) and keeps the one with the lowest
    overlay similarity. Returns (component indices, similarity after each step)."""
    picked: list[int] = []
    sims: list[float] = []
    for _ in range(n_steps):
        candidates = [k for k in ranked if k not in picked][:pool]
        plan = [(0, [comps[j] for j in picked + [k]]) for k in candidates]
        trial = cosine(ablated_embeds(encoder, pixels, plan, ablation, means, batch_size), target)
        best = int(torch.argmin(trial))  # the first minimum: the better DSL rank on ties
        picked.append(candidates[best])
        sims.append(trial[best].item())
    return picked, sims


# ---------------------------------------------------------------- the study as a run stage


def run_study(cfg, run_dir: Path, encoder: HookedEncoder, preprocess, images: list[InputImage],
              components: list[Component]) -> dict:
    """Run `cfg.study.name` on the run's images and the selected heads; write `study_<name>.csv`
    (+ `correlations.csv`), `plots/<name>.png` (and the composites under `images/overlays/`).
    Returns a summary for the manifest. DSL scores use `cfg.lens.mode`/`cfg.lens.alpha`; clean passes
    run `cfg.encoder.batch_size` images at a time, ablated ones `ablation_rows` rows."""
    study = cfg.study  # checked by `validate_study` before anything loaded
    heads = [c for c in components if c.kind == "head"]
    if not heads:
        raise UserError(f"study={study.name} ablates attention heads: select some with layer=... head=... "
                        "(component=heads)")
    if study.name == "head_importance":
        return _run_head_importance(cfg, run_dir, encoder, preprocess, images, heads)
    return _run_overlay_removal(cfg, run_dir, encoder, preprocess, images, heads)


def _pixels(preprocess, pictures: Sequence[Image.Image | InputImage]) -> Tensor:
    """[B, 3, S, S] on the CPU; ablated_embeds moves each batch to the encoder's device. Inputs are read
    one at a time, so only their preprocessed pixels are held together."""
    return torch.stack([preprocess(p.load() if isinstance(p, InputImage) else p) for p in pictures])


def _run_head_importance(cfg, run_dir: Path, encoder: HookedEncoder, preprocess, images: list[InputImage],
                         heads: list[Component]) -> dict:
    study, step = cfg.study, cfg.encoder.batch_size
    pixels = _pixels(preprocess, images)
    # mean ablation: one mean over the whole image set, not per batch
    means = encoder.mean_writes(pixels, step) if study.ablation == "mean" else None
    rows, ablated = [], ablation_rows(encoder, step)
    for start in tqdm(range(0, len(images), step), desc="head importance", unit="batch"):
        rows += head_importance(encoder, pixels[start:start + step], heads, study.ablation, cfg.lens.mode,
                                float(cfg.lens.alpha), means, [i.name for i in images[start:start + step]], ablated)
    corr = correlations(rows)
    CsvLog(run_dir / "study_head_importance.csv", IMPORTANCE_COLUMNS).rewrite(rows)
    CsvLog(run_dir / "correlations.csv", CORRELATION_COLUMNS).rewrite(corr)
    plot = redraw_study(run_dir)[0]  # from the CSVs just written, as `dsl plot` draws it
    pooled = {r["lens"]: {"spearman": r["spearman"], "pearson": r["pearson"]} for r in corr if r["image"] == POOLED}
    return {"study": "head_importance", "rows": len(rows), "ablation": study.ablation, "pooled": pooled,
            "files": ["study_head_importance.csv", "correlations.csv", str(plot.relative_to(run_dir))]}


def composites(images: list[InputImage], scale: float) -> list[tuple[str, InputImage, InputImage, Image.Image]]:
    """(name, background, foreground, composite) per image: each image in turn is the background and the
    NEXT image (cyclically) the foreground, so n images give n composites and every image is used once in
    each role. Needs at least two images."""
    if len(images) < 2:
        raise UserError("study=overlay_removal pastes one image on another: give at least two images")
    out = []
    for i, background in enumerate(images):
        foreground = images[(i + 1) % len(images)]
        name = f"{foreground.name}_on_{background.name}"
        out.append((name, background, foreground, overlay(background.load(), foreground.load(), scale)))
    return out


def _run_overlay_removal(cfg, run_dir: Path, encoder: HookedEncoder, preprocess, images: list[InputImage],
                         heads: list[Component]) -> dict:
    study = cfg.study
    pairs = composites(images, study.overlay_scale)
    for name, _, _, picture in pairs:
        save_png(run_dir / "images" / "overlays" / f"{name}.png", picture)
    composite_pixels = _pixels(preprocess, [p for *_, p in pairs])
    foreground_pixels = _pixels(preprocess, [fg for _, _, fg, _ in pairs])
    settings = OverlaySettings(steps=study.steps, greedy_pool=study.greedy_pool, random_orders=study.random_orders,
                               seed=cfg.seed, ablation=study.ablation, mode=cfg.lens.mode,
                               alpha=float(cfg.lens.alpha), batch_size=ablation_rows(encoder, cfg.encoder.batch_size))
    rows = overlay_curves(encoder, composite_pixels, foreground_pixels, heads, settings,
                          names=[name for name, *_ in pairs])
    roles = {name: (bg.name, fg.name) for name, bg, fg, _ in pairs}
    for row in rows:
        row["background"], row["foreground"] = roles[row["image"]]
    CsvLog(run_dir / "study_overlay_removal.csv", OVERLAY_COLUMNS).rewrite(rows)
    plot = redraw_study(run_dir)[0]  # from the CSV just written, as `dsl plot` draws it
    # mean overlay similarity over the curve (lower: the overlay is removed sooner), per order
    mean_sim = {order: float(np.mean([float(r["overlay_sim"]) for r in group]))
                for (order,), group in group_rows(rows, ("order",)).items()}
    return {"study": "overlay_removal", "rows": len(rows), "composites": len(pairs), "ablation": study.ablation,
            "mean_overlay_sim": mean_sim,
            "files": ["study_overlay_removal.csv", str(plot.relative_to(run_dir))]}


# ---------------------------------------------------------------- figures


def _pooled_title(lens: str, pooled: dict) -> str:
    """A head-importance panel's title: the correlation is over all (image, head) pairs at once, n of them."""
    n = int(float(pooled.get("n", 0) or 0))
    spearman, pearson = (float(pooled.get(k, math.nan) or math.nan) for k in ("spearman", "pearson"))
    return f"{lens}: Spearman {spearman:.3f}, Pearson {pearson:.3f}\npooled over n = {n} (image, head) pairs"


def plot_head_importance(rows: list[dict], corr: list[dict], ablation: str = "zero"):
    """Importance vs the DSL and the direct score, one panel per lens, a colour per image; each title gives
    the Spearman and Pearson correlations pooled over all (image, head) pairs, and their number; the
    figure's title the settings. Rows and correlations as written (dicts of numbers) or as read back from
    the CSVs (strings). Returns the matplotlib figure."""
    plt = pyplot()
    lenses = [("dsl", "DSL"), ("direct", "direct")]
    fig, axes = plt.subplots(1, len(lenses), figsize=(5.4 * len(lenses), 4.8), squeeze=False, layout="constrained")
    pooled = {r["lens"]: r for r in corr if r["image"] == POOLED}
    groups = group_rows(rows, ("image",))
    for axis, (lens, title) in zip(axes[0], lenses):
        for (image,), group in groups.items():
            axis.scatter([float(r[lens]) for r in group], [float(r["importance"]) for r in group], s=12,
                         alpha=0.7, label=image)
        axis.set_title(_pooled_title(title, pooled.get(lens, {})), fontsize=9)
        axis.set_xlabel(f"{title} score: cos(lens embedding, e)")
        axis.set_ylabel(f"importance: 1 - cos(e {ablation}-ablated, e)")
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="outside lower center", ncols=min(6, len(groups)),
               fontsize=8)
    first = rows[0] if rows else {}
    heads = len(rows) // max(1, len(groups))
    fig.suptitle(f"head importance: {ablation} ablation, DSL {first.get('mode', '')} alpha "
                 f"{float(first.get('alpha') or math.nan):g}; {len(groups)} images x {heads} heads", fontsize=10)
    return fig


# how each order is drawn: DSL on top, solid with dots; greedy dashed under it (it often takes the same heads)
ORDER_STYLES = {
    "dsl": {"color": "tab:blue", "linestyle": "-", "marker": "o", "markersize": 3.5, "linewidth": 1.6, "zorder": 4},
    "greedy": {"color": "tab:orange", "linestyle": "--", "marker": "s", "markersize": 5, "linewidth": 2.4,
               "markerfacecolor": "none", "zorder": 3},
    "random": {"color": "tab:gray", "linestyle": ":", "linewidth": 1.4, "zorder": 2},
}


def _draw_orders(axis, group: list[dict]) -> None:
    """One composite's curves: each order's overlay similarity per step; random orders as mean +- 1 sd."""
    for (order,), lines in group_rows(group, ("order",)).items():
        curves = np.array([[float(r["overlay_sim"]) for r in run] for run in
                           group_rows(lines, ("seed",)).values()])  # [runs, steps + 1]
        x, mean = np.arange(curves.shape[1]), curves.mean(0)
        label = order if len(curves) == 1 else f"{order} (mean of {len(curves)}, band +-1 sd)"
        axis.plot(x, mean, label=label, **ORDER_STYLES.get(order, {}))
        if len(curves) > 1:
            std = curves.std(0)
            axis.fill_between(x, mean - std, mean + std, alpha=0.2, color=ORDER_STYLES.get(order, {}).get("color"),
                              zorder=1, linewidth=0)


def plot_overlay_removal(rows: list[dict], settings: str = ""):
    """Overlay similarity vs ablation step, one panel per composite: the DSL and greedy orders as lines
    (DSL drawn over greedy), the random orders as their mean with a band of +-1 standard deviation; one
    legend for all panels, outside them; `settings` in the title. Returns the figure."""
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator

    groups = group_rows(rows, ("image",))
    columns = min(3, len(groups))
    n_rows = math.ceil(len(groups) / columns)
    fig, axes = plt.subplots(n_rows, columns, figsize=(4.6 * columns, 1.0 + 3.4 * n_rows), squeeze=False,
                             layout="constrained")
    for axis, ((image,), group) in zip(axes.flat, groups.items()):
        _draw_orders(axis, group)
        axis.set_title(image, fontsize=9)
        axis.set_xlabel("heads ablated")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.set_ylabel("cos(e ablated composite, e foreground)")
    for axis in list(axes.flat)[len(groups):]:
        axis.axis("off")
    fig.legend(*axes.flat[0].get_legend_handles_labels(), loc="outside lower center", ncols=3, fontsize=8)
    fig.suptitle(textwrap.fill(f"overlay removal: {settings}" if settings else "overlay removal",
                               int(4.6 * columns * 72 / 6)), fontsize=10)
    return fig


def overlay_settings(rows: list[dict], config: dict) -> str:
    """The settings of an overlay-removal study, for its title: ablation, the DSL ranking, the orders."""
    study, lens = config.get("study", {}), config.get("lens", {})
    random_orders = len({r["seed"] for r in rows if r["order"] == "random"})
    return (f"{rows[0]['ablation'] if rows else ''} ablation; heads ranked by DSL ({lens.get('mode')}, alpha "
            f"{float(lens.get('alpha', math.nan)):g}); greedy among the {study.get('greedy_pool') or 'all'} best by DSL; "
            f"{random_orders} random orders")


def redraw_study(run_dir: Path) -> list[Path]:
    """Draw a study's plot again from its CSVs and manifest alone (`dsl plot`): [the plot's path]."""
    config = (read_manifest(run_dir) or {}).get("config", {})
    try:
        if (run_dir / "study_head_importance.csv").is_file():
            rows = read_csv(run_dir / "study_head_importance.csv", IMPORTANCE_COLUMNS)
            corr = read_csv(run_dir / "correlations.csv", CORRELATION_COLUMNS)
            figure = plot_head_importance(rows, corr, rows[0]["ablation"] if rows else "zero")
            name = "head_importance"
        elif (run_dir / "study_overlay_removal.csv").is_file():
            rows = read_csv(run_dir / "study_overlay_removal.csv", OVERLAY_COLUMNS)
            figure, name = plot_overlay_removal(rows, overlay_settings(rows, config)), "overlay_removal"
        else:
            raise UserError(f"{run_dir}: no study CSV here (study_head_importance.csv or study_overlay_removal.csv)")
    except (KeyError, ValueError) as err:  # a number that does not parse: the CSV was edited
        raise UserError(f"{run_dir}: a CSV value is not what dsl writes ({type(err).__name__}: {err})") from err
    path = run_dir / "plots" / f"{name}.png"
    save_figure(figure, path)
    return [path]
