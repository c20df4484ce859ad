"""Interventional studies: ablation in a real forward pass, head importance, overlay removal, run_study.

The oracle for ablation is open_clip's own forward on a deep copy of the tower whose weights do the
ablation: zeroing head h's columns of `attn.out_proj.weight` removes W_O[:, h] z_h (the bias stays);
zeroing an MLP's `c_proj` removes its write; adding the mean write to the (LayerScale-divided) output bias
puts the mean write back in. No hooks are involved on that side.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from open_clip.transformer import VisionTransformer
from PIL import Image

from dsl_cli.components import parse_component
from dsl_cli.encoder import HookedEncoder, MeanWrites
from dsl_cli.errors import UserError
from dsl_cli.figures import POOLED, SCORES, _draw_orders, _pooled_title, draw_fade_grids, overlay_settings
from dsl_cli.images import overlay
from dsl_cli.outputs import CORRELATIONS, IMPORTANCE, OVERLAY, group_rows, read_csv, save_png
from dsl_cli.correlation import correlations
from dsl_cli.studies import (STUDY_MAX_ROWS, ablation_row_bytes, ablation_rows, head_importance,
                             overlay_removal)
from dsl_cli.study_registry import run_study
from helpers import (REPO, TINY_HEADS, ablated_copy, cos, dsl_in_process, forward, mid_visual, perturb_,
                     study_cfg)

TOL = dict(atol=1e-5, rtol=1e-5)
@pytest.fixture(params=["tiny", "mid"])
def visual(request, tiny_visual) -> VisionTransformer:
    """The tiny tower with random biases/LayerNorms, and a LayerScale + QuickGELU tower."""
    return perturb_(tiny_visual) if request.param == "tiny" else mid_visual()


# ---- ablate_hooked -----------------------------------------------------------------------------------

ABLATION_SETS = [["L0H00"], ["L1H03"], ["L3H02"], ["L2MLP"], ["L1H00", "L1H02", "L3H01"], ["L0H01", "L0MLP", "L2H03"]]


@pytest.mark.parametrize("components", ABLATION_SETS, ids="+".join)
def test_zero_ablation_equals_zeroed_weights(visual, tiny_pixels, components):
    enc = HookedEncoder(visual)
    expected = forward(ablated_copy(visual, components), tiny_pixels)
    torch.testing.assert_close(enc.ablate_hooked(tiny_pixels, components), expected, **TOL)
    assert (expected - forward(visual, tiny_pixels)).abs().max() > 1e-4  # the ablation does something


@pytest.mark.parametrize("components", [["L1H03"], ["L2MLP"], ["L0H01", "L0MLP", "L2H03"]], ids="+".join)
def test_mean_ablation_equals_zeroed_weights_plus_mean_in_the_bias(visual, tiny_pixels, components):
    enc = HookedEncoder(visual)
    g = torch.Generator().manual_seed(5)
    means = MeanWrites(heads=torch.randn(enc.n_layers, enc.n_heads, enc.d_model, generator=g),
                       mlps=torch.randn(enc.n_layers, enc.d_model, generator=g), tokens=1)
    expected = forward(ablated_copy(visual, components, means), tiny_pixels)
    torch.testing.assert_close(enc.ablate_hooked(tiny_pixels, components, how="mean", means=means), expected, **TOL)


def test_mean_writes_average_the_sub_block_outputs_over_images_and_tokens(visual, tiny_pixels):
    """Oracle: open_clip's own ls_1/ls_2 outputs. Heads: sum_h mean(a_h) + output bias = mean(ls_1 output)."""
    enc = HookedEncoder(visual)
    seen, handles = {}, []
    for l, block in enumerate(visual.transformer.resblocks):
        for name in ("ls_1", "ls_2"):
            handles.append(getattr(block, name).register_forward_hook(
                lambda m, i, out, key=(l, name): seen.__setitem__(key, out.mean((0, 1)))))
    forward(visual, tiny_pixels)
    for h in handles:
        h.remove()
    means = enc.mean_writes(tiny_pixels, batch_size=2)  # batches of 2 and 1: the mean is over all images
    assert means.tokens == len(tiny_pixels) * 17
    for l, block in enumerate(visual.transformer.resblocks):
        bias = block.ls_1(block.attn.out_proj.bias)
        torch.testing.assert_close(means.heads[l].sum(0) + bias, seen[(l, "ls_1")], **TOL)
        torch.testing.assert_close(means.mlps[l], seen[(l, "ls_2")], **TOL)
    # the default for how="mean" is the mean over the given images
    torch.testing.assert_close(enc.ablate_hooked(tiny_pixels, ["L1H02"], how="mean"),
                               forward(ablated_copy(visual, ["L1H02"], means), tiny_pixels), **TOL)


def test_per_image_ablation_sets_equal_separate_passes(tiny_encoder, tiny_pixels):
    sets = [[], ["L1H01", "L3MLP"], ["L2H02"]]
    batched = tiny_encoder.ablate_hooked(tiny_pixels, sets)
    for b, chosen in enumerate(sets):
        torch.testing.assert_close(batched[b:b + 1], tiny_encoder.ablate_hooked(tiny_pixels[b:b + 1], chosen), **TOL)
    torch.testing.assert_close(batched[0], tiny_encoder.embed(tiny_pixels)[0], atol=0, rtol=0)  # nothing ablated


def test_bad_ablations_are_refused(tiny_encoder, tiny_pixels):
    for bad in (["L2"], ["embed"], ["L4H00"], ["L0H04"]):
        with pytest.raises(ValueError):
            tiny_encoder.ablate_hooked(tiny_pixels, bad)
    with pytest.raises(ValueError, match="ablation"):
        tiny_encoder.ablate_hooked(tiny_pixels, ["L0H00"], how="half")
    with pytest.raises(ValueError, match="per image|one per image"):
        tiny_encoder.ablate_hooked(tiny_pixels, [["L0H00"], ["L1H00"]])


# ---- head importance ---------------------------------------------------------------------------------

def test_head_importance_rows_and_reference(tiny_visual, tiny_pixels):
    enc = HookedEncoder(tiny_visual)
    rows = head_importance(enc, tiny_pixels, TINY_HEADS, names=["a", "b", "c"], batch_size=7)
    assert len(rows) == len(tiny_pixels) * len(TINY_HEADS)
    assert all(math.isfinite(r[k]) for r in rows for k in ("importance", "dsl", "direct"))
    clean = forward(tiny_visual, tiny_pixels)
    by_key = {(r["image"], r["component"]): r for r in rows}
    for head in ("L0H02", "L3H01"):
        expected = 1 - cos(forward(ablated_copy(tiny_visual, [head]), tiny_pixels), clean)
        got = torch.tensor([by_key[(name, parse_component(head).label)]["importance"] for name in "abc"])
        torch.testing.assert_close(got, expected, **TOL)
    cache = enc.run_with_cache(tiny_pixels)
    dsl = cos(enc.steer(cache, ["L3H01"])[:, 0], clean)
    torch.testing.assert_close(torch.tensor([by_key[(n, "L03H01")]["dsl"] for n in "abc"]), dsl, **TOL)


def test_correlations():
    g = np.random.default_rng(0)
    rows = [{"ablation": "zero", "image": f"i{i}", "importance": x, "dsl": x, "direct": y}
            for i in range(2) for x, y in zip(g.normal(size=8), g.normal(size=8))]
    corr = correlations(rows, scores=("dsl", "direct"))
    assert [(r["image"], r["lens"]) for r in corr] == [(i, l) for i in ("i0", "i1", POOLED) for l in ("dsl", "direct")]
    for r in corr:
        assert -1 <= r["spearman"] <= 1 and -1 <= r["pearson"] <= 1
        if r["lens"] == "dsl":  # a vector with itself
            assert r["spearman"] == pytest.approx(1) and r["pearson"] == pytest.approx(1)
    assert corr[-1]["n"] == 16
    flat = correlations([{"ablation": "zero", "image": "x", "importance": 1.0, "dsl": 0.5, "direct": 0.5}] * 3,
                        scores=("dsl", "direct"))
    assert all(math.isnan(r["spearman"]) for r in flat)  # constant: undefined, not an error


# ---- overlay removal ---------------------------------------------------------------------------------

def test_overlay_removal_curves(tiny_visual, tiny_pixels):
    enc = HookedEncoder(tiny_visual)
    composite, foreground = tiny_pixels[:2], tiny_pixels[1:]
    steps, pool = 4, 5
    rows = overlay_removal(enc, composite, foreground, TINY_HEADS, steps=steps, greedy_pool=pool,
                           random_orders=2, seed=3, batch_size=6)
    e_fg = forward(tiny_visual, foreground)
    for b, name in enumerate(["0", "1"]):
        mine = [r for r in rows if r["image"] == name]
        curves = {}
        for r in mine:
            curves.setdefault((r["order"], r["seed"]), []).append(r)
        assert set(curves) == {("dsl", None), ("direct", None), ("greedy", None), ("random", 3), ("random", 4)}
        assert all([r["step"] for r in c] == list(range(steps + 1)) for c in curves.values())
        base = cos(forward(tiny_visual, composite[b:b + 1]), e_fg[b:b + 1]).item()
        assert all(c[0]["overlay_sim"] == pytest.approx(base, abs=1e-5) for c in curves.values())
        # the DSL order goes down the DSL score
        dsl_scores = [r["dsl_score"] for r in curves[("dsl", None)][1:]]
        assert dsl_scores == sorted(dsl_scores, reverse=True)
        # greedy step 1: the lowest single-head ablation among the pool best by DSL (oracle: zeroed weights)
        cache = enc.run_with_cache(composite[b:b + 1])
        ranking = cos(enc.steer(cache, TINY_HEADS)[0], e_fg[b]).argsort(descending=True)[:pool]
        singles = {TINY_HEADS[k]: cos(forward(ablated_copy(tiny_visual, [TINY_HEADS[k]]), composite[b:b + 1]),
                                      e_fg[b:b + 1]).item() for k in ranking.tolist()}
        first = curves[("greedy", None)][1]
        assert first["overlay_sim"] == pytest.approx(min(singles.values()), abs=1e-5)
        assert parse_component(first["component"]) == parse_component(min(singles, key=singles.get))
        # the DSL curve at step 2 is the two best DSL heads ablated together
        top2 = [c["component"] for c in curves[("dsl", None)][1:3]]
        both = cos(forward(ablated_copy(tiny_visual, top2), composite[b:b + 1]), e_fg[b:b + 1]).item()
        assert curves[("dsl", None)][2]["overlay_sim"] == pytest.approx(both, abs=1e-5)

    def random_curves(seed):
        out = overlay_removal(enc, composite[:1], foreground[:1], TINY_HEADS, steps=steps, greedy_pool=1,
                              random_orders=1, seed=seed)
        return [(r["component"], r["overlay_sim"]) for r in out if r["order"] == "random"]

    assert random_curves(3) == random_curves(3)
    assert random_curves(3) != random_curves(4)


def test_overlay_composes_centre_squares():
    background = Image.new("RGB", (100, 80), (255, 0, 0))
    foreground = Image.new("RGB", (60, 30), (0, 0, 255))
    picture = overlay(background, foreground, scale=0.5)
    assert picture.size == (80, 80)
    pixels = np.asarray(picture)
    blue = np.argwhere((pixels == (0, 0, 255)).all(-1))
    assert blue.min(0).tolist() == [20, 20] and blue.max(0).tolist() == [59, 59]  # 40 px, centred
    assert tuple(pixels[0, 0]) == (255, 0, 0)
    with pytest.raises(UserError):
        overlay(background, foreground, scale=0)


# ---- run_study ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("ablation", ["zero", "mean"])
def test_run_study_head_importance_writes_files(tmp_path, tiny_run, ablation):
    summary = run_study(study_cfg("head_importance", ablation=ablation), tmp_path, *tiny_run)
    rows = read_csv(tmp_path / "study_head_importance.csv", IMPORTANCE)
    assert len(rows) == 3 * 8 and {r["ablation"] for r in rows} == {ablation}  # heads only: the MLP is left out
    assert len(read_csv(tmp_path / "correlations.csv", CORRELATIONS)) == (3 + 1) * 3
    assert (tmp_path / "plots" / "head_importance.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert summary["rows"] == 24 and set(summary["pooled"]) == {f"{ablation} {s}" for s in SCORES}


def test_run_study_overlay_removal_writes_files(tmp_path, tiny_run):
    summary = run_study(study_cfg("overlay_removal"), tmp_path, *tiny_run)
    rows = read_csv(tmp_path / "study_overlay_removal.csv", OVERLAY)
    assert len(rows) == 3 * (3 + 2) * (3 + 1)  # composites x (dsl, direct, greedy, 2 random) x (steps + 1)
    assert {(r["background"], r["foreground"]) for r in rows} == {("img0", "img1"), ("img1", "img2"), ("img2", "img0")}
    assert (tmp_path / "plots" / "overlay_removal.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (tmp_path / "images" / "overlays").iterdir()) == [
        "img0_on_img2.png", "img1_on_img0.png", "img2_on_img1.png"]
    assert set(summary["mean_auc"]) == {"dsl", "direct", "greedy", "random"}


def test_run_study_refuses_bad_set_ups(tmp_path, tiny_run):
    encoder, preprocess, images, components = tiny_run
    with pytest.raises(UserError, match="two images"):
        run_study(study_cfg("overlay_removal"), tmp_path, encoder, preprocess, images[:1], components)
    with pytest.raises(UserError, match="heads"):
        run_study(study_cfg("head_importance"), tmp_path, encoder, preprocess, images, components[-1:])


# ---- settings, edge cases and what the study stage writes (mutation testing: docs/testing.md) --------

def test_study_settings_are_checked_at_their_edges():
    from dsl_cli.study_registry import validate_study

    ok = dict(name="overlay_removal", ablation="mean", steps=1, greedy_pool=1, random_orders=0, overlay_scale=1.0,
              overlay_position="top-left", decode_steps=[0], bootstrap=1000)
    validate_study(OmegaConf.create(ok))
    validate_study(OmegaConf.create({**ok, "greedy_pool": None}))
    for bad, message in [
        (dict(ablation="both"), "study.ablation=both: overlay removal takes one ablation (zero or mean)"),
        (dict(bootstrap=0), "study.bootstrap=0: must be at least 1 (resamples)"),
        (dict(decode_steps=[0, -1]), "study.decode_steps=[0, -1]: steps are 0 or more"),
        (dict(steps=0), "study.steps=0: must be at least 1"),
        (dict(greedy_pool=0), "study.greedy_pool=0: must be at least 1 (or null for all heads)"),
        (dict(random_orders=-1), "study.random_orders=-1: must be 0 or more"),
        (dict(overlay_scale=0.0), "study.overlay_scale=0.0: must be in (0, 1]"),
        (dict(overlay_scale=1.01), "study.overlay_scale=1.01: must be in (0, 1]"),
    ]:
        with pytest.raises(UserError) as err:
            validate_study(OmegaConf.create({**ok, **bad}))
        assert str(err.value) == message


@pytest.mark.parametrize(("name", "setting", "message"), [
    ("head_importance", dict(steps=3), "study.steps=3: study=head_importance does not read it (it reads ablation, "
                                       "bootstrap, lenses); leave it out"),
    ("head_importance", dict(decode_steps=[0, 7]), "study.decode_steps=[0, 7]: study=head_importance does not read"),
    ("overlay_removal", dict(bootstrap=5), "study.bootstrap=5: study=overlay_removal does not read it"),
])
def test_a_setting_the_study_does_not_read_is_refused(name: str, setting: dict, message: str):
    """`study=head_importance study.steps=3` ran with `steps` silently ignored; a setting left at its default
    (every field is in the config) is not a choice, and passes."""
    from dsl_cli.config import StudyConfig
    from dsl_cli.study_registry import validate_study

    study = OmegaConf.merge(OmegaConf.structured(StudyConfig), {"name": name})
    validate_study(study)
    with pytest.raises(UserError) as err:
        validate_study(OmegaConf.merge(study, setting))
    assert str(err.value).startswith(message)


def test_the_random_orders_seeds_stay_within_64_bits_at_the_edge():
    """The random orders use seeds seed .. seed + random_orders - 1: the last may be 2**64 - 1, not 2**64
    (torch's generator takes 64 bits); the default seed is the config's, 0."""
    from dsl_cli.study_registry import validate_study

    study = OmegaConf.create(dict(name="overlay_removal", ablation="zero", steps=1, greedy_pool=None, random_orders=5,
                                  overlay_scale=0.5, overlay_position="center", decode_steps=[0], bootstrap=1000))
    validate_study(study, seed=2**64 - 5)  # last seed 2**64 - 1
    validate_study(OmegaConf.merge(study, {"random_orders": 2**64}))  # seed 0: seeds 0 .. 2**64 - 1
    with pytest.raises(UserError) as err:
        validate_study(study, seed=2**64 - 4)  # last seed 2**64
    assert str(err.value) == (f"seed={2**64 - 4}: the random orders use seeds up to seed + study.random_orders - 1, "
                              "which must stay below 2**64")


def test_correlations_are_undefined_only_where_they_must_be():
    def corr(values):
        rows = [{"ablation": "zero", "image": "a", "importance": y, "dsl": x, "direct": x} for x, y in values]
        return correlations(rows, scores=("dsl", "direct"))[0]

    one = corr([(0.1, 0.2)])
    assert one["n"] == 1 and all(math.isnan(one[k]) for k in ("spearman", "spearman_p", "pearson", "pearson_p"))
    assert list(one) == CORRELATIONS.columns  # an undefined row has every column, empty where undefined
    assert all(math.isnan(v) for k, v in one.items() if k not in ("ablation", "image", "lens", "n"))
    two = corr([(0.1, 0.2), (0.3, 0.1)])  # two points: defined, -1
    assert two["n"] == 2 and two["spearman"] == pytest.approx(-1) and two["pearson"] == pytest.approx(-1)
    flat_y = corr([(0.1, 0.5), (0.3, 0.5), (0.2, 0.5)])
    assert math.isnan(flat_y["spearman"]) and math.isnan(flat_y["pearson"])
    rows = [{"ablation": "zero", "image": "a", "y": float(i), "s": float(i * i)} for i in range(4)]
    assert [(r["lens"], r["spearman"]) for r in correlations(rows, target="y", scores=("s",))] == [("s", 1.0), ("s", 1.0)]


def test_head_importance_rows_carry_the_settings_and_mean_ablation(tiny_visual, tiny_pixels):
    enc = HookedEncoder(perturb_(tiny_visual))
    heads = ["L1H2", "L3H0"]
    rows = head_importance(enc, tiny_pixels[:2], heads, ablation="mean", mode="add", alpha=3.0, batch_size=1)
    assert [(r["image"], r["component"], r["layer"], r["head"]) for r in rows] == [
        ("0", "L01H02", 1, 2), ("0", "L03H00", 3, 0), ("1", "L01H02", 1, 2), ("1", "L03H00", 3, 0)]
    assert {(r["ablation"], r["mode"], r["alpha"]) for r in rows} == {("mean", "add", 3.0)}
    means = enc.mean_writes(tiny_pixels[:2])
    clean = forward(enc.visual, tiny_pixels[:2])
    cache = enc.run_with_cache(tiny_pixels[:2])
    for k, head in enumerate(heads):
        ablated = forward(ablated_copy(enc.visual, [head], means), tiny_pixels[:2])
        got = torch.tensor([rows[b * 2 + k]["importance"] for b in range(2)])
        torch.testing.assert_close(got, 1 - cos(ablated, clean), **TOL)
        dsl = cos(enc.steer(cache, [head], mode="add", alpha=3.0)[:, 0], clean)
        direct = cos(enc.readout(cache.head_writes[:, parse_component(head).layer, parse_component(head).head]), clean)
        torch.testing.assert_close(torch.tensor([rows[b * 2 + k]["dsl"] for b in range(2)]), dsl, **TOL)
        torch.testing.assert_close(torch.tensor([rows[b * 2 + k]["direct"] for b in range(2)]), direct, **TOL)


def test_study_summaries_agree_with_the_files(tmp_path, tiny_run):
    summary = run_study(study_cfg("head_importance"), tmp_path / "hi", *tiny_run)
    corr = read_csv(tmp_path / "hi" / "correlations.csv", CORRELATIONS)
    pooled = {r["lens"]: r for r in corr if r["image"] == POOLED}
    for lens in SCORES:
        for key in ("n", "spearman", "spearman_low", "spearman_high", "pearson", "pearson_low", "pearson_high"):
            assert summary["pooled"][f"zero {lens}"][key] == pytest.approx(float(pooled[lens][key]), abs=1e-6)
    assert (summary["study"], summary["ablation"]) == ("head_importance", ["zero"])
    assert summary["files"] == ["study_head_importance.csv", "correlations.csv", "plots/head_importance.png"]

    summary = run_study(study_cfg("overlay_removal"), tmp_path / "or", *tiny_run)
    rows = read_csv(tmp_path / "or" / "study_overlay_removal.csv", OVERLAY)
    for order in ("dsl", "direct", "greedy", "random"):
        areas = [r["auc"] for r in rows if r["order"] == order and r["step"] == 0]
        assert summary["mean_auc"][order] == pytest.approx(np.mean(areas), abs=1e-6)
    assert (summary["rows"], summary["composites"]) == (len(rows), 3)
    assert summary["files"] == ["study_overlay_removal.csv", "plots/overlay_removal.png"]


def test_kept_composites_are_decoded_as_the_pipeline_decodes_them(tmp_path, tiny_encoder):
    """`decode_kept` saves, for each kept (composite, order, seed, step), the picture diffusers' own pipeline
    makes of that embedding with the run's decode settings (scheduler, steps, guidance, size, seed) and the
    encoder's zero-image negative; settings unlike the defaults so that one taken from the wrong place shows."""
    from diffusers import DDIMScheduler

    from dsl_cli.config import DecoderConfig
    from dsl_cli.decoder import load_decoder, to_uint8
    from dsl_cli.outputs import RunFolder
    from dsl_cli.studies import decode_kept

    g = torch.Generator().manual_seed(1)
    kept = {("a_on_b", "dsl", None, 0): torch.randn(32, generator=g),
            ("a_on_b", "greedy", None, 3): torch.randn(32, generator=g)}
    cfg = OmegaConf.create({"seed": 7, "decoder": DecoderConfig(source="tiny"), "decode": {
        "dtype": "fp32", "scheduler": "ddim", "height": 64, "width": 64, "steps": 3, "guidance": 7.5, "batch_size": 2}})
    decode_kept(cfg, tmp_path, tiny_encoder, kept)
    pipe = load_decoder(DecoderConfig(source="tiny")).pipe
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    negative = tiny_encoder.zero_embed()
    for (composite, order, _, step), embed in kept.items():
        expected = pipe(image_embeds=embed[None], negative_image_embeds=negative, height=64, width=64,
                        generator=torch.Generator().manual_seed(7), num_inference_steps=3, guidance_scale=7.5,
                        output_type="np").images[0]
        saved = np.asarray(Image.open(RunFolder(tmp_path).overlay_step(composite, order, step)), dtype=np.int16)
        assert saved.shape == (64, 64, 3)
        assert np.abs(saved - to_uint8(expected)).max() <= 1, (order, step)


def test_the_study_stage_ablates_over_every_batch_with_one_mean_and_bootstraps_with_the_run_seed(tmp_path, tiny_run):
    """`run_study` (head importance, both ablations) with batches of 2 of the 3 images: each row's importance
    is 1 - cos(the tower with that head ablated, the clean tower), the mean ablation using the mean writes of
    all three images; correlations.csv is `correlations` of those rows with the study's resamples and the
    run's seed. The oracle ablates a copy of the tower's weights (tests/helpers.py), not the hooks."""
    from dsl_cli.correlation import Correlation

    encoder, preprocess, images, components = tiny_run
    cfg = study_cfg("head_importance", ablation="both", bootstrap=50)
    cfg.seed, cfg.encoder.batch_size, cfg.lens = 3, 2, {"mode": "add", "alpha": 1.5}
    run_study(cfg, tmp_path, *tiny_run)
    rows = read_csv(tmp_path / "study_head_importance.csv", IMPORTANCE)
    pixels = torch.stack([preprocess(i.load()) for i in images])
    clean, means = forward(encoder.visual, pixels), encoder.mean_writes(pixels)
    heads = [c.label for c in components if c.kind == "head"]
    assert [(r["ablation"], r["image"], r["component"]) for r in rows] == [
        (a, i.name, h) for a in ("zero", "mean") for i in images for h in heads]
    assert {(r["mode"], r["alpha"]) for r in rows} == {("add", 1.5)}
    for ablation, with_means in (("zero", None), ("mean", means)):
        for head in (heads[0], heads[-1]):
            expected = 1 - cos(forward(ablated_copy(encoder.visual, [head], with_means), pixels), clean)
            got = torch.tensor([r["importance"] for r in rows if (r["ablation"], r["component"]) == (ablation, head)])
            torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
    expected_corr = correlations(rows, how=Correlation(resamples=50, seed=3))
    got_corr = read_csv(tmp_path / "correlations.csv", CORRELATIONS)
    assert [(r["ablation"], r["image"], r["lens"]) for r in got_corr] == [
        (r["ablation"], r["image"], r["lens"]) for r in expected_corr]
    # the file's importances have 6 decimals (about 3 digits at the tiny model's 1e-3), which moves the
    # correlations of the rows read back by up to 1.2e-3; another seed or resample count moves them by 0.3
    # to 0.8 (checked here, so that the comparison says something)
    keys = ("spearman", "spearman_low", "spearman_high", "pearson_low", "pearson_high")

    def gap(a: list[dict], b: list[dict]) -> float:
        return max(abs(x[k] - y[k]) for x, y in zip(a, b) for k in keys if not math.isnan(x[k]))

    assert gap(got_corr, expected_corr) < 1e-2
    assert gap(correlations(rows, how=Correlation(resamples=50, seed=4)), expected_corr) > 0.1
    assert gap(correlations(rows, how=Correlation(resamples=40, seed=3)), expected_corr) > 0.1


def test_a_zero_ablation_ignores_the_means_a_study_passes_along(tiny_encoder, tiny_pixels):
    """A study with both ablations hands its one set of mean writes to both: the zero ablation must put
    nothing back (it did, and `study.ablation=both` wrote mean-ablation numbers as zero-ablation rows)."""
    means = tiny_encoder.mean_writes(tiny_pixels)
    for heads in (["L1H0"], ["L2H3", "L3MLP"]):
        torch.testing.assert_close(tiny_encoder.ablate_hooked(tiny_pixels, heads, "zero", means),
                                   tiny_encoder.ablate_hooked(tiny_pixels, heads, "zero"), atol=0, rtol=0)
    rows = head_importance(tiny_encoder, tiny_pixels, ["L1H0"], "zero", means=means)
    plain = head_importance(tiny_encoder, tiny_pixels, ["L1H0"], "zero")
    assert [(r["importance"], r["direct_importance"]) for r in rows] == [
        (r["importance"], r["direct_importance"]) for r in plain]


def test_the_overlay_study_stage_passes_every_setting_through(tmp_path, tiny_run):
    """`run_study` (overlay removal) with settings unlike the defaults (mean ablation, greedy pool 2, 3
    random orders, seed 11, mode add, alpha 0.5, 2 steps): its rows are those of `overlay_curves` called
    here on the same composites with those settings, each with its composite's background and foreground;
    the summary's mean areas come from the rows."""
    from dsl_cli.studies import OverlaySettings, composites, overlay_curves

    encoder, preprocess, images, components = tiny_run
    cfg = study_cfg("overlay_removal", ablation="mean", greedy_pool=2, random_orders=3, steps=2, decode_steps=[])
    cfg.seed, cfg.lens = 11, {"mode": "add", "alpha": 0.5}
    summary = run_study(cfg, tmp_path, *tiny_run)
    rows = read_csv(tmp_path / "study_overlay_removal.csv", OVERLAY)
    pairs = composites(images, 0.45, "center")
    pixels = lambda pictures: torch.stack([preprocess(p) for p in pictures])  # noqa: E731
    heads = [c for c in components if c.kind == "head"]
    settings = OverlaySettings(steps=2, greedy_pool=2, random_orders=3, seed=11, ablation="mean", mode="add",
                               alpha=0.5, batch_size=7)
    expected = overlay_curves(encoder, pixels([p for *_, p in pairs]), pixels([fg.load() for _, _, fg, _ in pairs]),
                              heads, settings, names=[name for name, *_ in pairs]).rows
    assert len(rows) == len(expected) == 3 * (3 + 3) * 3  # composites x (dsl, direct, greedy, 3 random) x steps
    roles = {name: (bg.name, fg.name) for name, bg, fg, _ in pairs}
    for got, want in zip(rows, expected):
        assert (got["background"], got["foreground"]) == roles[want["image"]]
        assert {k: got[k] for k in ("image", "ablation", "order", "seed", "step", "component")} == {
            k: want[k] for k in ("image", "ablation", "order", "seed", "step", "component")}
        assert got["overlay_sim"] == pytest.approx(want["overlay_sim"], abs=2e-6)
    assert summary["ablation"] == "mean" and summary["composites"] == 3
    assert summary["mean_auc"]["random"] == pytest.approx(np.mean([r["auc"] for r in rows if r["order"] == "random"
                                                                  and r["step"] == 0]), abs=1e-5)


def test_an_ablated_row_is_sized_from_the_tower_and_a_gpu_batch_from_free_memory(tiny_encoder, monkeypatch) -> None:
    """The tiny tower: 16 patches + CLS = 17 tokens, 4 heads of width 64, MLP 256 wide; a row holds
    17 x (3 x 4 x 64 + 2 x 256 + 8 x 64) values, 4 bytes each in float32, 2 in bfloat16. On the CPU a study
    runs `batch_size` rows at once; on CUDA as many as `rows_that_fit` gives for that row, at most
    STUDY_MAX_ROWS."""
    import dsl_cli.studies as studies

    assert ablation_row_bytes(tiny_encoder) == 17 * (3 * 4 * 64 + 2 * 256 + 8 * 64) * 4
    assert ablation_row_bytes(HookedEncoder(tiny_encoder.visual.to(torch.bfloat16))) == 17 * 1792 * 2
    assert ablation_rows(tiny_encoder, 5) == 5
    asked = []
    monkeypatch.setattr(type(tiny_encoder), "device", property(lambda self: torch.device("cuda")))
    monkeypatch.setattr(studies, "rows_that_fit", lambda device, row, most: asked.append((device, row, most)) or 42)
    assert ablation_rows(tiny_encoder, 5) == 42
    assert asked == [(torch.device("cuda"), 17 * 1792 * 2, STUDY_MAX_ROWS)]


# ---- what the figures say: titles, captions and curves from the numbers of the CSVs --------------------------

def test_a_head_importance_title_gives_the_pooled_correlations_as_the_csv_has_them() -> None:
    pooled = {"n": 12, "spearman": 0.5, "spearman_low": 0.25, "spearman_high": 0.75, "pearson": -0.125,
              "pearson_low": -0.5, "pearson_high": 0.0}
    assert _pooled_title("mean ablation, DSL score", pooled) == (
        "mean ablation, DSL score\npooled over n = 12 (image, head) pairs\n"
        "Spearman 0.500 [0.250, 0.750] (95 % CI)\nPearson -0.125 [-0.500, 0.000]")
    assert _pooled_title("x", {}) == "x\npooled over n = 0 (image, head) pairs\nSpearman nan [nan, nan] (95 % CI)\n" \
                                     "Pearson nan [nan, nan]"


def test_an_overlay_removal_title_names_its_settings() -> None:
    rows = [{"ablation": "mean", "order": order, "seed": seed} for order, seed in
            (("dsl", None), ("random", 3), ("random", 3), ("random", 4), ("greedy", None))]
    config = {"lens": {"mode": "norm", "alpha": 2.0},
              "study": {"greedy_pool": 8, "overlay_position": "top_left", "overlay_scale": 0.4}}
    assert overlay_settings(rows, config) == (
        "mean ablation; heads ranked by DSL (norm, alpha 2) and by the naive lens; greedy among the 8 best by DSL; "
        "2 random orders; overlay at top_left, scale 0.4")
    assert overlay_settings([], config).startswith(" ablation; heads ranked by DSL (norm, alpha 2)")
    # a pool of at least the heads the study ablates is all of them: the title said "the 32 best" of 12 heads
    assert "; greedy among the 8 best by DSL; " in overlay_settings(rows, config, heads=9)
    for heads in (8, 3):
        assert f"; greedy among all {heads} heads; " in overlay_settings(rows, config, heads=heads)
    config["study"] = {"greedy_pool": None, "overlay_scale": 0.5}
    assert overlay_settings(rows[:1], config).endswith("greedy among all heads; 0 random orders; "
                                                       "overlay at center, scale 0.5")
    assert "; greedy among all 12 heads; " in overlay_settings(rows, config, heads=12)


def test_overlay_curves_are_drawn_per_order_and_random_orders_as_mean_and_band() -> None:
    from dsl_cli.figures import pyplot

    sims = {("dsl", None): [0.9, 0.5, 0.25], ("random", 1): [0.9, 0.8, 0.6], ("random", 2): [0.9, 0.6, 0.4],
            ("custom", 1): [0.9, 0.9, 0.9], ("custom", 2): [0.9, 0.7, 0.5]}
    group = [{"order": order, "seed": seed, "step": step, "overlay_sim": value}
             for (order, seed), values in sims.items() for step, value in enumerate(values)]
    figure, axis = pyplot().subplots()
    _draw_orders(axis, group)
    dsl, random, custom = axis.get_lines()  # an order without a style of its own is drawn in matplotlib's
    assert dsl.get_label() == "dsl" and random.get_label() == "random (mean of 2, band +-1 sd)"
    assert custom.get_label() == "custom (mean of 2, band +-1 sd)"
    np.testing.assert_allclose(dsl.get_xdata(), [0, 1, 2])
    np.testing.assert_allclose(dsl.get_ydata(), [0.9, 0.5, 0.25])
    np.testing.assert_allclose(random.get_ydata(), [0.9, 0.7, 0.5])
    assert (dsl.get_linestyle(), dsl.get_marker(), random.get_linestyle()) == ("-", "o", ":")
    band, _ = axis.collections  # mean +- the population standard deviation of the two runs: 0, 0.1, 0.1
    ys = sorted({round(float(y), 6) for _, y in band.get_paths()[0].vertices})
    assert ys == [0.4, 0.6, 0.8, 0.9]
    from matplotlib.colors import to_rgba

    assert (band.get_alpha(), band.get_zorder(), list(band.get_linewidth())) == (0.2, 1, [0.0])
    assert tuple(band.get_facecolor()[0]) == to_rgba("tab:gray", 0.2)  # the random orders' colour, faint
    pyplot().close(figure)


def test_fade_grids_show_each_order_s_decoded_steps_captioned_with_their_similarity(tmp_path, monkeypatch) -> None:
    """A row per order whose pictures are all there (the first random seed only), a column per step that has
    pictures, each tile captioned with its order, step and overlay similarity."""
    import dsl_cli.figures as figures
    from dsl_cli.outputs import RunFolder

    folder, drawn = RunFolder(tmp_path), []
    values = {("dsl", None): [0.9, 0.5, 0.25], ("greedy", None): [0.9, 0.4, 0.2], ("random", 7): [0.9, 0.8, 0.7],
              ("random", 8): [0.9, 0.6, 0.5]}
    rows = [{"image": "nothing_decoded", "order": "dsl", "seed": None, "step": 0, "overlay_sim": 0.9}]
    rows += [{"image": "cat_on_dog", "order": order, "seed": seed, "step": step, "overlay_sim": value}
             for (order, seed), sims in values.items() for step, value in enumerate(sims)]
    for order, step, shade in (("dsl", 0, 10), ("dsl", 2, 20), ("greedy", 0, 30), ("greedy", 2, 40),
                               ("random", 0, 50), ("random", 2, 60), ("direct", 0, 70)):
        path = folder.overlay_step("cat_on_dog", order, step)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_png(path, Image.new("RGB", (8, 8), (shade, 0, 0)))  # as the study writes them (dsl's tag)
    monkeypatch.setattr(figures, "grid_image", lambda tiles, title, columns, note: drawn.append(
        ([(t.getpixel((0, 0))[0], caption) for t, caption in tiles], title, columns, note)) or Image.new("RGB", (4, 4)))
    assert draw_fade_grids(tmp_path, rows) == [folder.figure("grids", "cat_on_dog_overlay_fade")]
    assert folder.figure("grids", "cat_on_dog_overlay_fade").is_file()
    ((tiles, title, columns, note),) = drawn
    assert tiles == [(10, "dsl, step 0\noverlay sim 0.900"), (20, "dsl, step 2\noverlay sim 0.250"),
                     (30, "greedy, step 0\noverlay sim 0.900"), (40, "greedy, step 2\noverlay sim 0.200"),
                     (50, "random (seed 7), step 0\noverlay sim 0.900"), (60, "random (seed 7), step 2\noverlay sim 0.700")]
    assert columns == 2 and title == "cat_on_dog: the ablated composite decoded, a row per order, after 0, 2 heads"
    assert note.startswith("overlay sim = cos(e of the ablated composite, e of the pasted image)")
    folder.overlay_step("cat_on_dog", "dsl", 2).write_bytes(b"not a picture")
    with pytest.raises(UserError, match=f"not a readable picture .* `dsl run resume={tmp_path}` makes it again"):
        draw_fade_grids(tmp_path, rows)


def test_mean_ablated_overlay_curves_match_weights_ablated_with_the_composites_means(tiny_visual, tiny_pixels):
    """Mean ablation, two composites, DSL in `add` mode at alpha 0.5, two random orders from seed 5: every
    step of every order is the composite through a copy of the tower whose weights ablate the heads taken
    so far, their mean writes over the composites put back in the bias; the DSL order follows the DSL
    score at those settings; random order r is `random_order(16, 5 + r)`; step 0 names no head."""
    from dsl_cli.studies import random_order

    enc = HookedEncoder(tiny_visual)
    composite, foreground = tiny_pixels[:2], tiny_pixels[1:]
    rows = overlay_removal(enc, composite, foreground, TINY_HEADS, steps=3, greedy_pool=4, random_orders=2, seed=5,
                           ablation="mean", mode="add", alpha=0.5, batch_size=5)
    means, e_fg = enc.mean_writes(composite), forward(tiny_visual, foreground)
    for b, name in enumerate(["0", "1"]):
        curves = group_rows([r for r in rows if r["image"] == name], ("order", "seed"))
        assert set(curves) == {("dsl", None), ("direct", None), ("greedy", None), ("random", 5), ("random", 6)}
        for (order, seed), curve in curves.items():
            assert (curve[0]["component"], curve[0]["dsl_score"]) == ("", None)
            picked = [r["component"] for r in curve[1:]]
            for step in (1, 3):
                oracle = forward(ablated_copy(tiny_visual, picked[:step], means), composite[b:b + 1])
                assert curve[step]["overlay_sim"] == pytest.approx(cos(oracle, e_fg[b:b + 1]).item(), abs=1e-5)
        for r in (0, 1):
            assert [parse_component(c["component"]) for c in curves[("random", 5 + r)][1:]] == [
                parse_component(TINY_HEADS[k]) for k in random_order(16, 5 + r)[:3]]
        dsl = cos(enc.steer(enc.run_with_cache(composite[b:b + 1]), TINY_HEADS, mode="add", alpha=0.5)[0], e_fg[b])
        assert [parse_component(c["component"]) for c in curves[("dsl", None)][1:]] == [
            parse_component(TINY_HEADS[k]) for k in dsl.argsort(descending=True)[:3].tolist()]


def test_the_python_api_defaults_are_the_config_defaults() -> None:
    """`head_importance` and `overlay_removal` called from a notebook study what `dsl run study=...` does."""
    import inspect

    from dsl_cli import studies

    config = lambda name: OmegaConf.load(Path(studies.__file__).parent / "configs" / "study" / f"{name}.yaml")  # noqa: E731
    lens = OmegaConf.load(Path(studies.__file__).parent / "configs" / "lens" / "steering.yaml")
    defaults = {k: p.default for k, p in inspect.signature(overlay_removal).parameters.items()}
    overlay = config("overlay_removal")
    assert {k: defaults[k] for k in ("steps", "greedy_pool", "random_orders", "ablation", "mode", "alpha")} == {
        "steps": overlay.steps, "greedy_pool": overlay.greedy_pool, "random_orders": overlay.random_orders,
        "ablation": overlay.ablation, "mode": lens.mode, "alpha": lens.alpha}
    defaults = {k: p.default for k, p in inspect.signature(head_importance).parameters.items()}
    assert (defaults["ablation"], defaults["mode"], defaults["alpha"]) == (config("head_importance").ablation,
                                                                          lens.mode, lens.alpha)


def test_long_study_work_shows_named_progress_bars(tmp_path, tiny_run, monkeypatch) -> None:
    """What the terminal shows while a study runs: a bar per ablation over the image batches, one over the
    ablated rows of each batch (`head_importance` called alone), one over the composites."""
    import dsl_cli.studies as studies

    real, seen = studies.tqdm, []
    monkeypatch.setattr(studies, "tqdm", lambda *a, **k: seen.append((k.get("desc"), k.get("unit"), k.get("disable")))
                        or real(*a, **k))
    run_study(study_cfg("head_importance", ablation="both", bootstrap=10), tmp_path / "hi", *tiny_run)
    encoder, _, _, components = tiny_run
    head_importance(encoder, torch.zeros(1, 3, 64, 64), components[:2])
    run_study(study_cfg("overlay_removal", steps=1, random_orders=1, decode_steps=[]), tmp_path / "or", *tiny_run)
    ablate = ("ablate", "row", False)
    assert [s for s in seen if s[0] is not None] == [("head importance (zero)", "batch", None), ablate,
                                                     ("head importance (mean)", "batch", None), ablate,
                                                     ablate, ("overlay", "img", None)]


def test_composites_default_to_the_centre_and_need_two_images(tiny_run) -> None:
    from dsl_cli.studies import composites

    images = tiny_run[2]
    default, centre = composites(images, 0.45), composites(images, 0.45, "center")
    assert [n for n, *_ in default] == [n for n, *_ in centre]
    assert all(np.array_equal(np.asarray(a[3]), np.asarray(b[3])) for a, b in zip(default, centre))
    with pytest.raises(UserError) as refused:
        composites(images[:1], 0.45)
    assert str(refused.value) == "study=overlay_removal pastes one image on another: give at least two images"


def test_the_overlay_study_decodes_only_with_decoding_on_and_steps_to_decode() -> None:
    from dsl_cli.study_registry import decodes

    cfg = lambda decode, steps: OmegaConf.create({"study": {"decode_steps": steps}, **decode})  # noqa: E731
    assert decodes(cfg({"decode": {"enabled": True}}, [0, 5])) is True
    assert decodes(cfg({"decode": {"enabled": False}}, [0, 5])) is False
    assert decodes(cfg({"decode": {"enabled": True}}, [])) is False
    assert decodes(cfg({}, [0, 5])) is False  # a config without a decode group (the Python API's)


def test_ablated_rows_halve_their_batch_on_out_of_memory_and_show_their_progress(tiny_encoder, tiny_pixels,
                                                                                 monkeypatch) -> None:
    """`ablated_embeds`: an out-of-memory error halves the rows per pass (down to one, which is the last
    try); no plan gives no rows; the bar counts rows and goes away when done, hidden without a name."""
    import dsl_cli.studies as studies
    from dsl_cli.studies import ablated_embeds

    plan = [(i % 3, [parse_component(c)]) for i, c in enumerate(TINY_HEADS[:5])]
    expected = ablated_embeds(tiny_encoder, tiny_pixels, plan, batch_size=5)
    real, passes = tiny_encoder.ablate_hooked, []

    def ablate(pixels, *args, **kwargs):
        passes.append(len(pixels))
        if len(pixels) > limit:
            raise torch.cuda.OutOfMemoryError("injected")
        return real(pixels, *args, **kwargs)

    monkeypatch.setattr(tiny_encoder, "ablate_hooked", ablate)
    for limit, tried in ((2, [4, 2, 2, 1]), (1, [4, 2, 1, 1, 1, 1, 1])):
        passes.clear()
        torch.testing.assert_close(ablated_embeds(tiny_encoder, tiny_pixels, plan, batch_size=4), expected)
        assert passes == tried
    limit = 0
    with pytest.raises(torch.cuda.OutOfMemoryError):
        ablated_embeds(tiny_encoder, tiny_pixels, plan, batch_size=2)
    assert ablated_embeds(tiny_encoder, tiny_pixels, [], batch_size=2).shape == (0, tiny_encoder.d_embed)
    bars = []
    monkeypatch.setattr(studies, "tqdm", lambda **k: bars.append(k) or __import__("tqdm").tqdm(**k))
    limit = 99
    ablated_embeds(tiny_encoder, tiny_pixels, plan, batch_size=4, desc="ablate")
    ablated_embeds(tiny_encoder, tiny_pixels, plan, batch_size=4)
    assert bars == [{"total": 5, "desc": "ablate", "unit": "row", "leave": False, "disable": False},
                    {"total": 5, "desc": None, "unit": "row", "leave": False, "disable": True}]


def test_each_correlation_row_holds_its_bootstrap_intervals_at_the_caller_s_settings() -> None:
    """Spearman and Pearson with the intervals `bootstrap_interval` gives at the caller's resamples and seed
    (ranks for Spearman, values for Pearson); importance spanning exactly 1 is an ordinary case."""
    from scipy import stats

    from dsl_cli.correlation import Correlation, bootstrap_interval

    g = np.random.default_rng(4)
    x = g.normal(size=12)
    y = x + g.normal(size=12)
    y = (y - y.min()) / (y.max() - y.min())  # from 0 to 1 exactly
    rows = [{"image": "a", "ablation": "zero", "importance": float(b), "dsl": float(a), "direct": -float(a),
             "direct_importance": float(a) ** 3} for a, b in zip(x, y)]
    how = Correlation(resamples=40, seed=3)
    row = next(r for r in correlations(rows, how=how) if r["image"] == "a" and r["lens"] == "dsl")
    assert row["n"] == 12 and row["spearman"] == pytest.approx(stats.spearmanr(x, y).statistic)
    assert row["pearson"] == pytest.approx(stats.pearsonr(x, y).statistic)
    for name, rank in (("spearman", True), ("pearson", False)):
        low, high = bootstrap_interval(x, y, rank=rank, how=how)
        assert (row[f"{name}_low"], row[f"{name}_high"]) == pytest.approx((low, high)), name
        assert low < row[name] < high


def test_a_study_without_heads_says_how_to_select_some(tmp_path, tiny_run) -> None:
    encoder, preprocess, images, components = tiny_run
    mlps = [c for c in components if c.kind == "mlp"]
    with pytest.raises(UserError) as refused:
        run_study(study_cfg("head_importance"), tmp_path, encoder, preprocess, images, mlps)
    assert str(refused.value) == ("study=head_importance ablates attention heads: select some with layer=... "
                                  "head=... (component=heads)")


def test_the_overlay_study_decodes_the_kept_steps_and_redraws_from_its_files(tmp_path, tiny_run, monkeypatch) -> None:
    """With decoding on, the stage decodes each order's composite at study.decode_steps (a picture per order,
    composite and step); its summary; `dsl plot` titles the plot with the settings of the saved manifest."""
    import json

    import dsl_cli.figures as figures
    import dsl_cli.studies as studies
    from dsl_cli.config import DecoderConfig
    from dsl_cli.study_registry import redraw_study
    from dsl_cli.outputs import RunFolder

    cfg = study_cfg("overlay_removal", steps=2, random_orders=1, decode_steps=[0, 2])
    cfg.decoder = OmegaConf.structured(DecoderConfig(source="tiny"))
    cfg.decode = {"enabled": True, "dtype": "fp32", "scheduler": "ddpm", "height": 64, "width": 64, "steps": 1,
                  "guidance": 4.0, "batch_size": 4}
    summary = run_study(cfg, tmp_path, *tiny_run)
    assert summary["study"] == "overlay_removal" and summary["composites"] == 3
    folder, names = RunFolder(tmp_path), [n for n, *_ in studies.composites(tiny_run[2], 0.45, "center")]
    for name in names:
        for order in ("dsl", "direct", "greedy", "random"):
            assert all(folder.overlay_step(name, order, step).is_file() for step in (0, 2)), (name, order)
    (tmp_path / "manifest.json").write_text(json.dumps({"made_by": "dsl",  # dsl's: read back (`read_manifest`)
                                                        "config": {"lens": {"mode": "add", "alpha": 0.5},
                                                                   "study": {"greedy_pool": 4}}}))
    titles = []
    monkeypatch.setattr(figures, "plot_overlay_removal", lambda rows, settings: titles.append(settings) or
                        figures.pyplot().figure())
    redraw_study(tmp_path)
    assert titles[0].startswith("zero ablation; heads ranked by DSL (add, alpha 0.5)")


def test_overlay_removal_from_a_notebook_with_its_defaults_and_its_keywords(tiny_visual, tiny_pixels) -> None:
    """Called with its defaults: 5 random orders from seed 0 and the DSL order at norm mode, alpha 2, every one
    of the 16 tiny heads in turn (20 steps asked); a pool of one makes the greedy order the DSL order; the
    means and names given are the ones used; no step at all leaves step 0 alone."""
    enc = HookedEncoder(tiny_visual)
    composite, foreground = tiny_pixels[:1], tiny_pixels[1:2]
    rows = overlay_removal(enc, composite, foreground, TINY_HEADS)
    curves = group_rows(rows, ("order", "seed"))
    assert sorted(seed for order, seed in curves if order == "random") == [0, 1, 2, 3, 4]
    dsl = cos(enc.steer(enc.run_with_cache(composite), TINY_HEADS, mode="norm", alpha=2.0)[0], forward(tiny_visual,
                                                                                                     foreground)[0])
    assert [parse_component(r["component"]) for r in curves[("dsl", None)][1:]] == [
        parse_component(TINY_HEADS[k]) for k in dsl.argsort(descending=True).tolist()]
    rows = overlay_removal(enc, composite, foreground, TINY_HEADS, steps=3, greedy_pool=1, random_orders=0)
    curves = group_rows(rows, ("order", "seed"))
    assert [r["component"] for r in curves[("greedy", None)]] == [r["component"] for r in curves[("dsl", None)]]
    others = enc.mean_writes(tiny_pixels[2:])
    given = overlay_removal(enc, composite, foreground, TINY_HEADS, steps=2, random_orders=0, ablation="mean",
                            means=others, names=["cat"])
    step = next(r for r in given if r["order"] == "dsl" and r["step"] == 2)
    picked = [r["component"] for r in given if r["order"] == "dsl" and r["step"] > 0]
    oracle = forward(ablated_copy(tiny_visual, picked, others), composite)
    assert step["image"] == "cat" and step["overlay_sim"] == pytest.approx(
        cos(oracle, forward(tiny_visual, foreground)).item(), abs=1e-5)
    assert {(r["order"], r["step"]) for r in overlay_removal(enc, composite, foreground, TINY_HEADS, steps=0,
                                                             random_orders=1)} == {
        ("dsl", 0), ("direct", 0), ("greedy", 0), ("random", 0)}


def test_redrawing_a_folder_without_a_study_or_with_an_edited_csv_says_so(tmp_path) -> None:
    from dsl_cli.outputs import RunFolder
    from dsl_cli.study_registry import redraw_study

    with pytest.raises(UserError) as refused:
        redraw_study(tmp_path)
    assert str(refused.value) == (f"{tmp_path}: no study CSV here (study_head_importance.csv or "
                                  "study_overlay_removal.csv)")
    RunFolder(tmp_path).csv(OVERLAY).write_text("image,background\ncat,dog\n")  # its numbers cut off
    with pytest.raises(UserError) as refused:
        redraw_study(tmp_path)
    assert str(refused.value).startswith(f"{tmp_path}: a CSV value is not what dsl writes (TypeError: ")


def test_the_direct_effect_of_an_ablated_mlp_or_head_puts_its_mean_write_back(tiny_visual, tiny_pixels) -> None:
    """`direct_ablated` with means: ln_post(x_L - w + mean w) @ proj, written here with the tower's own
    ln_post and proj, for an MLP and a head."""
    from dsl_cli.studies import direct_ablated

    enc = HookedEncoder(perturb_(tiny_visual))
    cache, means = enc.run_with_cache(tiny_pixels), enc.mean_writes(tiny_pixels)
    got = direct_ablated(enc, cache, [parse_component("L2MLP"), parse_component("L1H3")], means)
    with torch.no_grad():
        for k, (write, mean) in enumerate(((cache.mlp_writes[:, 2], means.mlps[2]),
                                           (cache.head_writes[:, 1, 3], means.heads[1, 3]))):
            expected = tiny_visual.ln_post(cache.resid[:, -1] - write + mean) @ tiny_visual.proj
            torch.testing.assert_close(got[:, k], expected, atol=1e-5, rtol=1e-5)


def test_overlay_removal_takes_twenty_steps_by_default_where_there_are_more_heads() -> None:
    enc = HookedEncoder(mid_visual())
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    rows = overlay_removal(enc, pixels[:1], pixels[1:], [f"L{l}H{h}" for l in range(6) for h in range(8)],
                           random_orders=0)
    assert sorted({r["step"] for r in rows}) == list(range(21))


def test_the_importance_table_holds_a_column_for_each_score_the_study_correlates() -> None:
    """`outputs.ImportanceRow` and `studies.SCORES` name the same scores, in the same order (the CSV's last
    columns): a score added to one and not the other would be written nowhere or read as empty."""
    assert IMPORTANCE.columns[-len(SCORES):] == list(SCORES)
    assert IMPORTANCE.columns[:-len(SCORES)] == ["image", "component", "layer", "head", "ablation", "mode", "alpha",
                                                 "importance"]


@pytest.fixture(scope="module")
def study_folders(tmp_path_factory, tiny_run) -> dict[str, Path]:
    """A complete folder of each study (head importance: 3 images x 8 heads, both ablations): its files and a
    manifest as a run writes them."""
    root = tmp_path_factory.mktemp("studies")
    made = {}
    for name, settings in (("head_importance", {"ablation": "both"}), ("overlay_removal", {"decode_steps": []})):
        cfg = study_cfg(name, bootstrap=20, **settings)
        summary = run_study(cfg, root / name, *tiny_run)
        manifest = {"made_by": "dsl", "status": "complete", "config": OmegaConf.to_container(cfg), "study": summary}
        (root / name / "manifest.json").write_text(json.dumps(manifest))
        made[name] = root / name
    return made


TABLE_DAMAGE = {"a row removed": lambda lines: lines[:5] + lines[6:], "a row repeated": lambda lines: [*lines, lines[3]],
                "a row overwritten": lambda lines: [lines[0], lines[2], *lines[2:]],  # as many rows, one twice
                "the last rows cut": lambda lines: lines[:-8]}


@pytest.mark.parametrize("damage", list(TABLE_DAMAGE))
@pytest.mark.parametrize("study, name", [("head_importance", "study_head_importance.csv"),
                                         ("head_importance", "correlations.csv"),
                                         ("overlay_removal", "study_overlay_removal.csv")])
def test_plot_and_report_refuse_a_study_table_cut_short_or_edited(study: str, name: str, damage: str, study_folders,
                                                                  tmp_path: Path, monkeypatch, capsys) -> None:
    """A study's table holds one row per ablation, image and head (head importance), per ablation, image (and
    pooled) and score (its correlations) or per composite, order, seed and step (overlay removal), as many as
    the manifest counts: a row removed, repeated or overwritten, or the table cut short, is refused by `dsl plot`
    and `dsl report` in one line naming the file, and nothing in the folder is touched (the figure and page were
    drawn from what was left, without a word)."""
    folder = tmp_path / study
    shutil.copytree(study_folders[study], folder)
    for command in ("plot", "report"):  # the undamaged study is drawn and shown
        assert dsl_in_process([command, str(folder)], tmp_path, monkeypatch, capsys)[0] == 0
    table = folder / name
    table.write_text("".join(TABLE_DAMAGE[damage](table.read_text().splitlines(keepends=True))))
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    for command in ("plot", "report"):
        code, err = dsl_in_process([command, str(folder)], tmp_path, monkeypatch, capsys)
        assert code == 2 and "Traceback" not in err and err.count("\n") == 1, (command, err)
        assert err.startswith(f"dsl: error: {table}: ") and "cut short or edited" in err, (command, err)
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before


def _documented_grids(experiment: str) -> list[re.Pattern]:
    """The grids docs/studies.md's table of the paper's experiments names for `experiment`, as patterns."""
    row = next(line for line in (REPO / "docs" / "studies.md").read_text().splitlines()
               if line.startswith(f"| `{experiment}` |"))
    figures = row.split("|")[2]
    return [re.compile(re.escape(name).replace(re.escape("<image>"), r"\w+").replace(re.escape("<NN>"), r"\d\d"))
            for name in re.findall(r"`(grids/[^`]+\.png)`", figures)]


@pytest.mark.parametrize("best_layers", [[47, 47, 46, 47, 45, 44, 47, 46, 40, 47], [47] * 10])
def test_the_paper_table_names_every_grid_that_paper_top_heads_draws(best_layers: list[int]) -> None:
    """paper_top_heads decodes each image's 10 best of 768 heads (decode.top_k=10): its grids, as `grid_plan`
    plans them from the decoded rows, are each one the docs' table names (they named `_top` alone, where each
    layer holding one of the 10 gets a grid too, and `_top` goes where one layer holds all 10)."""
    from dsl_cli.figures import grid_plan

    rows = [{"component": f"L{layer:02d}H{head:02d}", "layer": layer, "head": head, "kind": "head",
             "rank": rank, "file": f"images/cat/steering/L{layer:02d}H{head:02d}.png"}
            for rank, (layer, head) in enumerate(zip(best_layers, range(10)), start=1)]
    drawn = [f"grids/cat_steering_{name}.png" for name, _, _ in grid_plan(rows)]
    assert drawn and all(any(p.fullmatch(path) for p in _documented_grids("paper_top_heads")) for path in drawn), drawn
