"""The method's formulas, each checked against an oracle written out here that shares no code with what it
checks (DESIGN.md section 3): hand-worked steering deltas; the closed form against `readout(x_L + delta)`
with delta computed here; the residual a real steered forward pass ends with; the lens score against a
cosine written here; Spearman and Pearson against their definitions and scipy; the decoder at several
guidance scales against the diffusers pipeline called with the same scale.

Each test names, in its docstring, the wrong method it is there to catch (docs/testing.md).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from dsl_cli.components import parse_component
from dsl_cli.config import DecoderConfig
from dsl_cli.decoder import KandinskyDecoder, load_decoder
from dsl_cli.encoder import STEER_MODES, HookedEncoder, steering_delta
from dsl_cli.lenses import score
from dsl_cli.correlation import POOLED, correlations
from dsl_cli.studies import cosine
from helpers import perturb_

TOL = dict(atol=1e-5, rtol=1e-5)
ALL_TINY = [f"L{l}H{h}" for l in range(4) for h in range(4)] + [f"L{l}MLP" for l in range(4)]


# ---- steering: hand-worked numbers -------------------------------------------------------------------

# c = (3, 0, 4) with |c| = 5, and x_L = (1, 2, 2) with |x_L| = 3; the unit vector c/|c| = (0.6, 0, 0.8).
HAND_WORKED = {  # (mode, alpha): delta, by hand from DESIGN.md section 3
    ("add", 2.0): [6.0, 0.0, 8.0],  # alpha * c
    ("scale", 2.0): [3.0, 0.0, 4.0],  # (alpha - 1) * c
    ("norm", 2.0): [3.6, 0.0, 4.8],  # alpha * |x_L| * c / |c| = 2 * 3 * (0.6, 0, 0.8)
    ("add", 0.5): [1.5, 0.0, 2.0],
    ("scale", 0.5): [-1.5, 0.0, -2.0],
    ("norm", 0.5): [0.9, 0.0, 1.2],  # 0.5 * 3 * (0.6, 0, 0.8)
}


@pytest.mark.parametrize(("mode", "alpha"), list(HAND_WORKED))
def test_steering_delta_hand_worked(mode: str, alpha: float) -> None:
    """Catches: norm without |x_L|, alpha - 1 in place of alpha, scale as alpha * c, add as (alpha - 1) * c."""
    c, x_final = torch.tensor([3.0, 0.0, 4.0]), torch.tensor([1.0, 2.0, 2.0])
    torch.testing.assert_close(steering_delta(c, x_final, mode, alpha), torch.tensor(HAND_WORKED[mode, alpha]))


def test_steering_delta_broadcasts_per_image_and_keeps_zero_writes_zero() -> None:
    """Per image its own |x_L| (writes [B, K, D], final residual [B, 1, D]); a zero write stays 0, not NaN."""
    writes = torch.tensor([[[3.0, 0.0, 4.0], [0.0, 0.0, 0.0]], [[0.0, 2.0, 0.0], [0.0, 0.0, -1.0]]])
    finals = torch.tensor([[[1.0, 2.0, 2.0]], [[0.0, 0.0, 10.0]]])  # |x_L| = 3 and 10
    expected = torch.tensor([[[3.6, 0.0, 4.8], [0.0, 0.0, 0.0]], [[0.0, 20.0, 0.0], [0.0, 0.0, -20.0]]])
    torch.testing.assert_close(steering_delta(writes, finals, "norm", 2.0), expected)


@pytest.mark.parametrize("mode", STEER_MODES)
def test_steering_delta_comes_in_the_writes_dtype(mode: str) -> None:
    """A bf16 write gives a bf16 delta in every mode (norm computes its norms in fp32, then casts back): the
    hand-worked case rounded once to bf16."""
    c, x_final = torch.tensor([3.0, 0.0, 4.0]), torch.tensor([1.0, 2.0, 2.0])
    got = steering_delta(c.bfloat16(), x_final.bfloat16(), mode, 2.0)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, torch.tensor(HAND_WORKED[mode, 2.0]).bfloat16())


def test_an_unknown_steering_mode_is_refused_with_the_modes_to_use() -> None:
    with pytest.raises(ValueError) as refused:
        steering_delta(torch.ones(3), torch.ones(3), "double", 2.0)
    assert str(refused.value) == "unknown steering mode 'double': use one of add, scale, norm"


# ---- steering: closed form and hooked pass against deltas computed here ------------------------------

def delta_here(c: torch.Tensor, x_final: torch.Tensor, mode: str, alpha: float) -> torch.Tensor:
    """DESIGN.md section 3, written out again: c [B, D], x_final [B, D] -> delta [B, D]."""
    if mode == "add":
        return alpha * c
    if mode == "scale":
        return alpha * c - c  # the write c becomes alpha * c
    size = x_final.pow(2).sum(-1, keepdim=True).sqrt()
    return alpha * size * c / c.pow(2).sum(-1, keepdim=True).sqrt()


def write_of(cache, label: str) -> torch.Tensor:
    """[B, D]: the cached CLS write of a head or MLP label."""
    comp = parse_component(label)
    return cache.head_writes[:, comp.layer, comp.head] if comp.kind == "head" else cache.mlp_writes[:, comp.layer]


def layer_norm_here(v: torch.Tensor, ln: torch.nn.LayerNorm) -> torch.Tensor:
    centred = v - v.mean(-1, keepdim=True)
    return centred / (centred.pow(2).mean(-1, keepdim=True) + ln.eps).sqrt() * ln.weight + ln.bias


@pytest.fixture
def perturbed(tiny_visual) -> HookedEncoder:
    """The tiny tower with random biases and LayerNorm affines (so a misplaced one would show)."""
    return HookedEncoder(perturb_(tiny_visual))


def test_readout_is_ln_post_then_proj(perturbed: HookedEncoder, tiny_pixels: torch.Tensor) -> None:
    """R(v) = ln_post(v) @ proj with the LayerNorm written out here."""
    v = torch.randn(5, perturbed.d_model, generator=torch.Generator().manual_seed(2)) * 3 + 1
    visual = perturbed.visual
    torch.testing.assert_close(perturbed.readout(v), layer_norm_here(v, visual.ln_post) @ visual.proj, **TOL)


@pytest.mark.parametrize("alpha", [0.5, 3.0])
@pytest.mark.parametrize("mode", STEER_MODES)
def test_closed_form_is_the_readout_of_x_final_plus_delta_computed_here(
    perturbed: HookedEncoder, tiny_pixels: torch.Tensor, mode: str, alpha: float
) -> None:
    """`steer` = R(x_L + delta) for every head and MLP, delta from this file's formula.
    Catches any wrong delta in the closed form (norm without |x_L|, alpha - 1 for alpha, ...)."""
    cache = perturbed.run_with_cache(tiny_pixels)
    x_final = cache.resid[:, -1]
    got = perturbed.steer(cache, ALL_TINY, mode=mode, alpha=alpha)
    for k, label in enumerate(ALL_TINY):
        expected = perturbed.readout(x_final + delta_here(write_of(cache, label), x_final, mode, alpha))
        torch.testing.assert_close(got[:, k], expected, **TOL, msg=f"{label} {mode} {alpha}")


def final_residuals(visual, run) -> torch.Tensor:
    """[B, T, D]: the transformer's output (the final residual stream, all tokens) during `run()`."""
    seen = []
    handle = visual.transformer.register_forward_hook(lambda m, i, out: seen.append(out.detach().clone()))
    try:
        run()
    finally:
        handle.remove()
    assert len(seen) >= 1
    return seen[-1]


@pytest.mark.parametrize("mode", STEER_MODES)
@pytest.mark.parametrize("label", ["L0H1", "L2H3", "L1MLP", "L3MLP"])
def test_hooked_pass_moves_the_final_residual_by_delta(
    perturbed: HookedEncoder, tiny_pixels: torch.Tensor, mode: str, label: str
) -> None:
    """The reference pass (`steer_hooked`, also `lens.verify`) measured from outside: its final residual at
    the CLS position minus the clean one is delta (add: alpha c; scale: (alpha - 1) c; norm: parallel to c
    with |delta| = alpha |x_L|). Catches the reference sharing a wrong delta with the closed form."""
    alpha, visual = 3.0, perturbed.visual
    clean = final_residuals(visual, lambda: visual(tiny_pixels))[:, 0]
    steered = final_residuals(visual, lambda: perturbed.steer_hooked(tiny_pixels, label, mode, alpha))[:, 0]
    delta = steered - clean
    c = write_of(perturbed.run_with_cache(tiny_pixels), label)
    if mode == "norm":
        torch.testing.assert_close(delta.norm(dim=-1), alpha * clean.norm(dim=-1), **TOL)
        torch.testing.assert_close(cosine(delta, c), torch.ones(len(c)), **TOL)
    torch.testing.assert_close(delta, delta_here(c, clean, mode, alpha), atol=1e-4, rtol=1e-4)


# ---- lens scores -------------------------------------------------------------------------------------

def cosine_here(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(-1) / (a.pow(2).sum(-1).sqrt() * b.pow(2).sum(-1).sqrt())


def test_lens_score_is_the_cosine_written_here(perturbed: HookedEncoder, tiny_pixels: torch.Tensor) -> None:
    """sim_embed = cos(lens embedding, clean embedding) and norm = |write|. Catches a dot product (or an
    unnormalised side) in place of the cosine: the embeddings here are far from unit length."""
    cache = perturbed.run_with_cache(tiny_pixels)
    embeds = perturbed.steer(cache, ALL_TINY, mode="norm", alpha=2.0)
    assert (embeds.norm(dim=-1) - 1).abs().min() > 0.1 and (cache.embeds.norm(dim=-1) - 1).abs().min() > 0.1
    scores = score(perturbed, cache, [parse_component(c) for c in ALL_TINY], embeds)
    torch.testing.assert_close(scores.sim_embed, cosine_here(embeds, cache.embeds[:, None]), **TOL)
    writes = torch.stack([write_of(cache, label) for label in ALL_TINY], 1)
    torch.testing.assert_close(scores.norm, writes.pow(2).sum(-1).sqrt(), **TOL)
    # studies score with the same cosine
    torch.testing.assert_close(cosine(embeds, cache.embeds[:, None]), cosine_here(embeds, cache.embeds[:, None]), **TOL)


# ---- correlations ------------------------------------------------------------------------------------

def ranks_here(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n of distinct values."""
    return np.argsort(np.argsort(x)) + 1.0


def pearson_here(x: np.ndarray, y: np.ndarray) -> float:
    dx, dy = x - x.mean(), y - y.mean()
    return float((dx * dy).sum() / math.sqrt((dx * dx).sum() * (dy * dy).sum()))


def test_spearman_is_one_on_monotone_non_linear_data() -> None:
    """importance = exp(6 dsl): a monotone, far from linear relation. Spearman must be 1 and Pearson well
    below it. Catches Spearman computed as Pearson (and the two columns swapped)."""
    x = np.linspace(0.0, 1.0, 12)
    rows = [{"ablation": "zero", "image": "a", "importance": float(np.exp(6 * v)), "dsl": float(v), "direct": float(-v)}
            for v in x]
    corr = {(r["image"], r["lens"]): r for r in correlations(rows, scores=("dsl", "direct"))}
    assert corr["a", "dsl"]["spearman"] == pytest.approx(1.0) and corr["a", "direct"]["spearman"] == pytest.approx(-1.0)
    pearson = pearson_here(x, np.exp(6 * x))
    assert pearson < 0.9
    assert corr["a", "dsl"]["pearson"] == pytest.approx(pearson) and corr["a", "direct"]["pearson"] == pytest.approx(-pearson)
    assert corr[POOLED, "dsl"]["spearman"] == pytest.approx(1.0)


def test_correlations_on_random_data_match_the_definitions_and_scipy() -> None:
    """Per image and pooled: Spearman = Pearson of the ranks, Pearson by its formula, p-values as scipy's."""
    g = np.random.default_rng(7)
    rows = [{"ablation": "zero", "image": f"i{i}", "importance": float(g.normal()), "dsl": float(g.normal()),
             "direct": float(g.normal())} for i in range(3) for _ in range(9)]
    corr = correlations(rows, scores=("dsl", "direct"))
    assert len(corr) == (3 + 1) * 2
    for r in corr:
        group = [row for row in rows if r["image"] in (row["image"], POOLED)]
        x = np.array([row[r["lens"]] for row in group])
        y = np.array([row["importance"] for row in group])
        assert r["n"] == len(group) == (27 if r["image"] == POOLED else 9)
        assert r["spearman"] == pytest.approx(pearson_here(ranks_here(x), ranks_here(y)), abs=1e-12)
        assert r["pearson"] == pytest.approx(pearson_here(x, y), abs=1e-12)
        assert r["spearman_p"] == pytest.approx(stats.spearmanr(x, y).pvalue, rel=1e-9)
        assert r["pearson_p"] == pytest.approx(stats.pearsonr(x, y).pvalue, rel=1e-9)
        assert abs(r["spearman"] - r["pearson"]) > 1e-3  # random data: the two differ, so a swap would show


# ---- decoder guidance --------------------------------------------------------------------------------

SIZE, STEPS = 64, 2


@pytest.fixture(scope="module")
def dec() -> KandinskyDecoder:
    return load_decoder(DecoderConfig(source="tiny"))


def pipeline_here(pipe, embed: torch.Tensor, negative: torch.Tensor, seed: int, guidance: float) -> np.ndarray:
    """diffusers' pipeline itself, one embedding per call, at the given guidance scale."""
    return pipe(image_embeds=embed[None], negative_image_embeds=negative, generator=torch.Generator().manual_seed(seed),
                height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=guidance, output_type="np").images[0]


@pytest.mark.parametrize("guidance", [1.0, 4.0, 7.5])
def test_decode_equals_the_pipeline_at_the_same_guidance(dec: KandinskyDecoder, guidance: float) -> None:
    """Catches a guidance scale hard-coded (to the pipeline's default 4.0, or any other) or dropped:
    the pictures at 1 (no guidance), 4 and 7.5 differ, and each must equal the pipeline's at that scale."""
    g = torch.Generator().manual_seed(11)
    embeds, negative = torch.randn(2, 32, generator=g), torch.randn(1, 32, generator=g)
    got = dec.decode(embeds, negative, [3, 4], height=SIZE, width=SIZE, steps=STEPS, guidance=guidance,
                     batch_size=2, progress=False)
    for i, seed in enumerate([3, 4]):
        np.testing.assert_allclose(got[i], pipeline_here(dec.pipe, embeds[i], negative, seed, guidance), atol=1e-3)
        for other in {1.0, 4.0, 7.5} - {guidance}:  # the scale matters for these inputs
            assert np.abs(got[i] - pipeline_here(dec.pipe, embeds[i], negative, seed, other)).max() > 1e-2
