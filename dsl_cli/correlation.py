"""Correlations of head importance with lens scores (correlations.csv): Spearman and Pearson with their
p-values and percentile-bootstrap intervals, per image and pooled over all rows. numpy and scipy only (no
torch), so that a sweep's merge can pool its jobs' rows (`study_registry.HeadImportance.pool`) as one run's
study stage computes its own (dsl_cli.studies)."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from dsl_cli.figures import POOLED, SCORES
from dsl_cli.outputs import group_rows


@dataclass(frozen=True)
class Correlation:
    """How correlations are computed: a 95 % interval from `resamples` paired bootstrap resamples (the
    percentile method), seeded."""

    resamples: int = 1000
    seed: int = 0
    confidence: float = 0.95


def _pearson_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson r of each row pair of [R, n] arrays (NaN for a constant row)."""
    from scipy import stats  # half a second to import: only what correlates needs it

    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        return np.atleast_1d(stats.pearsonr(x, y, axis=-1).statistic)


def bootstrap_interval(x: np.ndarray, y: np.ndarray, rank: bool, how: Correlation = Correlation()) -> tuple[float, float]:
    """Percentile bootstrap interval of Pearson r (rank=False) or Spearman rho (rank=True: Pearson of the
    average ranks, as scipy.stats.spearmanr computes it) over (x_i, y_i) pairs resampled with replacement.
    Resamples where a vector is constant (no correlation defined) are left out; NaN when all are."""
    from scipy import stats

    rng = np.random.default_rng(how.seed)
    index = rng.integers(0, len(x), size=(how.resamples, len(x)))  # [R, n]
    xs, ys = x[index], y[index]
    if rank:
        xs, ys = stats.rankdata(xs, axis=-1), stats.rankdata(ys, axis=-1)
    values = _pearson_rows(xs, ys)
    values = values[np.isfinite(values)]
    if not len(values):
        return math.nan, math.nan
    tail = 50 * (1 - how.confidence)
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def _correlate(x: np.ndarray, y: np.ndarray, how: Correlation = Correlation()) -> dict:
    """Spearman and Pearson of two equal-length vectors with their p-values and bootstrap intervals; NaN
    where undefined (n < 2, a constant vector)."""
    from scipy import stats

    result = {"n": len(x), **{f"{name}{part}": math.nan for name in ("spearman", "pearson")
                              for part in ("", "_low", "_high", "_p")}}
    if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return result
    with warnings.catch_warnings():  # n == 2 gives p = 1 with a warning in some scipy versions
        warnings.simplefilter("ignore")
        rho, rho_p = stats.spearmanr(x, y)
        r, r_p = stats.pearsonr(x, y)
    rho_low, rho_high = bootstrap_interval(x, y, rank=True, how=how)
    r_low, r_high = bootstrap_interval(x, y, rank=False, how=how)
    result.update(spearman=float(rho), spearman_low=rho_low, spearman_high=rho_high, spearman_p=float(rho_p),
                  pearson=float(r), pearson_low=r_low, pearson_high=r_high, pearson_p=float(r_p))
    return result


def correlations(rows: list[dict], target: str = "importance", scores: Sequence[str] = SCORES,
                 how: Correlation = Correlation()) -> list[dict]:
    """Spearman and Pearson of `target` vs each score, per ablation: per image and pooled over all rows
    (image `pooled`), each with a bootstrap interval and n: one dict per (ablation, image, lens) with
    `outputs.CorrelationRow`. Pooling mixes images whose importance scales differ; the per-image rows are the
    cleaner test, the pooled one the headline number."""
    out = []
    for (ablation,), block in group_rows(rows, ("ablation",)).items():
        groups = list(group_rows(block, ("image",)).items()) + [((POOLED,), block)]
        for (image,), group in groups:
            y = np.array([r[target] for r in group], dtype=float)
            for lens in scores:
                x = np.array([r[lens] for r in group], dtype=float)
                out.append({"ablation": ablation, "image": image, "lens": lens, **_correlate(x, y, how)})
    return out


def importance_correlations(rows: list[dict], scores: Sequence[str], resamples: int, seed: int) -> list[dict]:
    """correlations.csv's rows for head-importance rows: `correlations` of importance with each score, the
    bootstrap from `study.bootstrap` resamples seeded by the run's `seed`. One run's stage and a sweep's merge
    (`HeadImportance.pool`, over every job's rows) both call it, so pooled numbers are computed one way.
    The rows are put in one order first (images as they first come, then layer and head): the bootstrap
    resamples positions, and a sweep's jobs give their rows layer by layer where one run gives them image by
    image, so the same heads gave other intervals."""
    images = {image: n for n, image in enumerate(dict.fromkeys(r["image"] for r in rows))}
    ordered = sorted(rows, key=lambda r: (images[r["image"]], r["layer"], r["head"]))
    return correlations(ordered, scores=scores, how=Correlation(resamples=resamples, seed=seed))
