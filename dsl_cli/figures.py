"""A study's figures, drawn from its files alone (the CSVs, the decoded pictures, the manifest): no model and no
torch, so `dsl plot` and `dsl report` draw them without loading one (`dsl_cli.studies` writes the files and
calls `redraw_study`).

    plots/head_importance.png      importance vs each score, a panel per (ablation, score)
    plots/overlay_removal.png      overlay similarity vs heads ablated, a panel per composite
    grids/<composite>_overlay_fade.png   the decoded ablated composites, a row per order
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import numpy as np

from dsl_cli.errors import UserError
from dsl_cli.outputs import (CORRELATIONS, IMPORTANCE, OVERLAY, RunFolder, drawn_from_files, grid_image, group_rows,
                             open_picture, pyplot, read_manifest, save_figure, save_png)

SCORES = ("dsl", "direct", "direct_importance")  # what head importance is correlated with
POOLED = "pooled"  # the `image` value of correlations over all (image, head) rows


SCORE_TITLES = {"dsl": ("DSL score", "cos(DSL embedding, e)"), "direct": ("naive-lens score", "cos(R(write), e)"),
                "direct_importance": ("direct importance", "1 - cos(R(x_L - write), e)")}


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
    fig, axes = plt.subplots(max(1, len(blocks)), len(SCORES), figsize=(5.2 * len(SCORES), 0.8 + 4.6 * len(blocks)),
                             squeeze=False, layout="constrained")
    pooled = {(r["ablation"], r["lens"]): r for r in corr if r["image"] == POOLED}
    for line, ((ablation,), block) in zip(axes, blocks.items()):
        for axis, lens in zip(line, SCORES):
            for (image,), group in group_rows(block, ("image",)).items():
                axis.scatter([r[lens] for r in group], [r["importance"] for r in group], s=12,
                             alpha=0.7, label=image)
            title, formula = SCORE_TITLES[lens]
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


def _draw_orders(axis, group: list[dict]) -> None:
    """One composite's curves: each order's overlay similarity per step; random orders as mean +- 1 sd."""
    for (order,), lines in group_rows(group, ("order",)).items():
        curves = np.array([[r["overlay_sim"] for r in run] for run in
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


def overlay_settings(rows: list[dict], config: dict) -> str:
    """The settings of an overlay-removal study, for its title: ablation, the DSL ranking, the orders."""
    study, lens = config.get("study", {}), config.get("lens", {})
    random_orders = len({r["seed"] for r in rows if r["order"] == "random"})
    return (f"{rows[0]['ablation'] if rows else ''} ablation; heads ranked by DSL ({lens.get('mode')}, alpha "
            f"{float(lens.get('alpha', math.nan)):g}) and by the naive lens; greedy among the "
            f"{study.get('greedy_pool') or 'all'} best by DSL; {random_orders} random orders; overlay at "
            f"{study.get('overlay_position', 'center')}, scale {study.get('overlay_scale')}")


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


def redraw_study(run_dir: Path) -> list[Path]:
    """Draw a study's figures again from its CSVs, pictures and manifest alone (`dsl plot`): [the plot's
    path, then any grids]."""
    config = (read_manifest(run_dir) or {}).get("config", {})
    folder, grids = RunFolder(run_dir), []
    with drawn_from_files(run_dir):
        if folder.csv(IMPORTANCE).is_file():
            rows = folder.read(IMPORTANCE)
            corr = folder.read(CORRELATIONS)
            figure, name = plot_head_importance(rows, corr), "head_importance"
        elif folder.csv(OVERLAY).is_file():
            rows = folder.read(OVERLAY)
            figure, name = plot_overlay_removal(rows, overlay_settings(rows, config)), "overlay_removal"
            grids = draw_fade_grids(run_dir, rows)
        else:
            raise UserError(f"{run_dir}: no study CSV here (study_head_importance.csv or study_overlay_removal.csv)")
    path = folder.figure("plots", name)
    save_figure(figure, path)
    return [path, *grids]
