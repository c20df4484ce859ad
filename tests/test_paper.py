"""The paper, reproduced from configs (issue 17): every `experiment=paper_*` end to end under debug=tiny
(the commands of scripts/reproduce_paper.sh, once), the correlations and their bootstrap intervals on hand-made
cases, batched ablation against one-at-a-time ablation and against an independent direct-path reference,
and the overlay orders (greedy's first step, random seeds, areas under the curve)."""

from __future__ import annotations

import copy
import csv
import json
import math
import os
import shlex
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats as scipy_stats

from dsl_cli.components import parse_component
from dsl_cli.correlation import POOLED, Correlation, bootstrap_interval, correlations
from dsl_cli.encoder import HookedEncoder
from dsl_cli.studies import area_under, head_importance, overlay_removal, random_order
from dsl_cli.study_registry import run_study
from helpers import TINY_HEADS, ablated_copy, cos, dsl_here, forward, perturb_, study_cfg

N_LAYERS, N_HEADS = 4, 4  # debug=tiny's ViT
EVERY_HEAD = [f"L{layer:02d}H{head:02d}" for layer in range(N_LAYERS) for head in range(N_HEADS)]
EXPERIMENTS = ["paper_residual_stream", "paper_top_heads", "paper_dl_vs_dsl", "paper_head_importance",
               "paper_overlay_removal", "paper_logit_lens"]


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


# ---- every experiment, end to end under debug=tiny ----------------------------------------------------

@pytest.fixture(scope="module")
def paper(tmp_path_factory) -> Path:
    """scripts/reproduce_paper.sh on tiny models and two sample photos, in a fresh folder: outputs/debug/paper
    (a tiny preview never writes where the real runs go). The script runs with a `dsl` first on its PATH that
    records each command it is given; the test checks those commands, then runs each of them with dsl in this
    process, in the script's order (a process each would import torch six times over)."""
    root = tmp_path_factory.mktemp("paper")
    fake = root / "bin" / "dsl"
    fake.parent.mkdir()
    log = shlex.quote(str(root / "commands"))
    fake.write_text(f'#!/usr/bin/env bash\nprintf "%s\\0" "$@" >> {log}\nprintf "\\n" >> {log}\n')
    fake.chmod(0o755)
    script = Path(__file__).parents[1] / "scripts" / "reproduce_paper.sh"
    env = {**os.environ, "PATH": f"{fake.parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(["bash", str(script), "debug=tiny", "images.limit=2"], cwd=root, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-3000:]
    commands = [line.rstrip("\0").split("\0") for line in (root / "commands").read_text().splitlines()]
    assert commands == [*(["run", f"experiment={name}", "debug=tiny", "images.limit=2"] for name in EXPERIMENTS),
                        ["report", "outputs/debug/paper"]]
    for command in commands:
        assert dsl_here(command, root) == 0, command
    assert not (root / "outputs" / "paper").exists()
    return root / "outputs" / "debug" / "paper"


def manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def test_every_experiment_runs_into_its_own_folder_and_one_page_links_every_figure(paper: Path) -> None:
    assert sorted(p.name for p in paper.iterdir() if p.is_dir()) == sorted(EXPERIMENTS)
    assert all(manifest(paper / name)["status"] == "complete" for name in EXPERIMENTS)
    page = (paper / "index.html").read_text()
    figures = [p for name in EXPERIMENTS for kind in ("plots", "grids", "heatmaps")
               for p in (paper / name).glob(f"{kind}/*.png")]
    assert figures and all(f'href="{p.relative_to(paper).as_posix()}"' in page for p in figures)
    assert all(f'href="{name}/index.html"' in page for name in EXPERIMENTS)


def test_residual_stream_reads_every_layer(paper: Path) -> None:
    folder = paper / "paper_residual_stream"
    rows = read_rows(folder / "similarity.csv")
    for image in ("astronaut", "chelsea"):
        assert [r["component"] for r in rows if r["image"] == image] == [f"L{l:02d}" for l in range(N_LAYERS)]
        assert (folder / "grids" / f"{image}_diffusion_layers.png").is_file()
    assert all(r["lens"] == "diffusion" and r["file"] for r in rows)  # every layer decoded


def test_top_heads_ranks_every_head_and_decodes_the_ten_best(paper: Path) -> None:
    """debug=tiny shrinks the models only: every head of every layer (4 x 4) is ranked and the top 10
    (decode.top_k=10) decoded, not the default heads of layer 30."""
    folder = paper / "paper_top_heads"
    assert manifest(folder)["config"]["layer"] == "all" and manifest(folder)["config"]["decode"]["top_k"] == 10
    rows = read_rows(folder / "similarity.csv")
    for image in ("astronaut", "chelsea"):
        group = [r for r in rows if r["image"] == image]
        assert [r["component"] for r in group] == EVERY_HEAD
        assert {r["component"] for r in group if r["file"]} == {r["component"] for r in group if int(r["rank"]) <= 10}
        assert all((folder / r["file"]).is_file() for r in group if r["file"])


def test_dl_vs_dsl_shows_the_same_heads_through_both_lenses_in_one_grid(paper: Path) -> None:
    folder = paper / "paper_dl_vs_dsl"
    assert manifest(folder)["kind"] == "sweep" and manifest(folder)["status"] == "complete"
    rows = read_rows(folder / "similarity.csv")
    layer3 = [f"L03H{h:02d}" for h in range(N_HEADS)]  # layer 30 clamped to the tiny model's last
    for lens in ("direct", "steering"):
        assert sorted({r["component"] for r in rows if r["lens"] == lens and r["file"]}) == layer3
    for image in ("astronaut", "chelsea"):
        grid = folder / "grids" / f"{image}_direct_vs_steering.png"
        assert grid.is_file() and f"grids/{grid.name}" in manifest(folder)["figures"]


def test_head_importance_runs_both_ablations_over_every_head(paper: Path) -> None:
    folder = paper / "paper_head_importance"
    rows = read_rows(folder / "study_head_importance.csv")
    assert {r["ablation"] for r in rows} == {"zero", "mean"}
    assert sorted({r["component"] for r in rows}) == EVERY_HEAD
    corr = read_rows(folder / "correlations.csv")
    pooled = [r for r in corr if r["image"] == POOLED]
    assert {(r["ablation"], r["lens"]) for r in pooled} == {(a, s) for a in ("zero", "mean")
                                                            for s in ("dsl", "direct", "direct_importance")}
    assert all(int(r["n"]) == 2 * len(EVERY_HEAD) for r in pooled)
    assert (folder / "plots" / "head_importance.png").is_file()


def test_overlay_removal_orders_and_fades(paper: Path) -> None:
    folder = paper / "paper_overlay_removal"
    rows = read_rows(folder / "study_overlay_removal.csv")
    assert {r["order"] for r in rows} == {"dsl", "direct", "greedy", "random"}
    assert len({r["seed"] for r in rows if r["order"] == "random"}) == 5
    assert max(int(r["step"]) for r in rows) == len(EVERY_HEAD)  # study.steps=40 stops at the 16 heads there are
    for composite in ("chelsea_on_astronaut", "astronaut_on_chelsea"):
        assert (folder / "grids" / f"{composite}_overlay_fade.png").is_file()
        decoded = sorted(p.name for p in (folder / "images" / "overlay_steps" / composite).iterdir())
        # decode_steps [0, 5, 10, 20, 40]: 20 and 40 are past the last step, 16
        assert decoded == [f"{o}_{s:03d}.png" for o in ("direct", "dsl", "greedy", "random") for s in (0, 5, 10, 16)]


def test_logit_lens_names_every_layer_and_decodes_nothing(paper: Path) -> None:
    folder = paper / "paper_logit_lens"
    labels = read_rows(folder / "labels.csv")
    assert {f"L{l:02d}" for l in range(N_LAYERS)} <= {r["component"] for r in labels}
    assert not any(r["file"] for r in read_rows(folder / "similarity.csv"))
    assert (folder / "plots" / "astronaut_logit.png").is_file()


# ---- correlations and their intervals ------------------------------------------------------------------

def one_correlation(x: list[float], y: list[float], **how) -> dict:
    rows = [{"ablation": "zero", "image": "a", "importance": b, "dsl": a} for a, b in zip(x, y)]
    return correlations(rows, scores=("dsl",), how=Correlation(**how))[0]


def test_correlations_give_the_known_answers() -> None:
    perfect = one_correlation([1, 2, 3, 4, 5], [2, 4, 6, 8, 10])
    assert perfect["spearman"] == pytest.approx(1) and perfect["pearson"] == pytest.approx(1)
    assert perfect["spearman_low"] == pytest.approx(1) and perfect["pearson_high"] == pytest.approx(1)
    reversed_ = one_correlation([1, 2, 3, 4, 5], [5, 4, 3, 2, 1])
    assert reversed_["spearman"] == pytest.approx(-1) and reversed_["pearson"] == pytest.approx(-1)
    swapped = one_correlation([1, 2, 3, 4], [1, 3, 2, 4])  # 1 - 6 * 2 / (4 * 15); by hand for Pearson: 4 / 5
    assert swapped["spearman"] == pytest.approx(0.8) and swapped["pearson"] == pytest.approx(0.8)
    # ties get their average rank: x ranks 1, 2.5, 2.5, 4 against 1, 2, 3, 4: 4.5 / sqrt(4.5 * 5)
    tied = one_correlation([1, 2, 2, 4], [1, 2, 3, 4])
    assert tied["spearman"] == pytest.approx(math.sqrt(0.9))
    assert tied["n"] == 4


def test_pooled_and_per_image_correlations_are_kept_apart() -> None:
    rows = [{"ablation": "zero", "image": "a", "importance": v, "dsl": v} for v in (1.0, 2.0, 3.0)]
    rows += [{"ablation": "zero", "image": "b", "importance": v, "dsl": -v} for v in (1.0, 2.0, 3.0)]
    by = {r["image"]: r for r in correlations(rows, scores=("dsl",))}
    assert by["a"]["spearman"] == pytest.approx(1) and by["b"]["spearman"] == pytest.approx(-1)
    assert by[POOLED]["n"] == 6 and by[POOLED]["spearman"] == pytest.approx(0)  # 1,2,3 vs 1,2,3 and -1,-2,-3


def test_bootstrap_interval_holds_the_estimate_and_narrows_as_n_grows() -> None:
    rng = np.random.default_rng(0)
    widths = {}
    for n in (20, 80, 640):
        x = rng.normal(size=n)
        y = x + rng.normal(size=n)
        result = one_correlation(list(x), list(y), resamples=2000)
        for name in ("spearman", "pearson"):
            assert result[f"{name}_low"] <= result[name] <= result[f"{name}_high"]
        widths[n] = (result["spearman_high"] - result["spearman_low"], result["pearson_high"] - result["pearson_low"])
    assert widths[20][0] > widths[80][0] > widths[640][0] and widths[20][1] > widths[80][1] > widths[640][1]
    # at n = 640 the percentile interval of Pearson r is close to Fisher's z interval (an independent formula)
    r = result["pearson"]
    fisher = np.tanh(np.arctanh(r) + np.array([-1, 1]) * 1.959964 / math.sqrt(640 - 3))
    assert abs(result["pearson_low"] - fisher[0]) < 0.02 and abs(result["pearson_high"] - fisher[1]) < 0.02


def test_spearman_intervals_resample_ranks() -> None:
    """A monotone, far from linear relation: Spearman 1 in every resample (interval [1, 1]), Pearson less."""
    x = np.arange(1.0, 21.0)
    result = one_correlation(list(x), list(np.exp(x)))
    assert result["spearman_low"] == pytest.approx(1) and result["spearman_high"] == pytest.approx(1)
    assert result["pearson_low"] < result["pearson"] < 0.8


def test_bootstrap_is_seeded_and_skips_undefined_resamples() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=30)
    y = x + rng.normal(size=30)
    assert bootstrap_interval(x, y, rank=True) == bootstrap_interval(x, y, rank=True)
    assert bootstrap_interval(x, y, rank=True, how=Correlation(seed=1)) != bootstrap_interval(
        x, y, rank=True, how=Correlation(seed=2))
    low, high = bootstrap_interval(np.array([1.0, 2.0]), np.array([1.0, 2.0]), rank=False)
    assert (low, high) == (pytest.approx(1), pytest.approx(1))  # resamples of one distinct pair are left out


# ---- batched ablation --------------------------------------------------------------------------------

@pytest.mark.parametrize("ablation", ["zero", "mean"])
def test_batched_ablation_equals_one_at_a_time(tiny_visual, tiny_pixels, ablation) -> None:
    """All 3 x 16 (image, head) ablations in one forward (copies of each image, a different head ablated
    in each) against one forward per ablation, and against open_clip's forward on zeroed weights."""
    enc = HookedEncoder(perturb_(tiny_visual))
    batched = head_importance(enc, tiny_pixels, TINY_HEADS, ablation=ablation, batch_size=len(tiny_pixels) * 16)
    single = head_importance(enc, tiny_pixels, TINY_HEADS, ablation=ablation, batch_size=1)
    got, one = (torch.tensor([r["importance"] for r in rows]) for rows in (batched, single))
    torch.testing.assert_close(got, one, atol=1e-5, rtol=0)
    means = enc.mean_writes(tiny_pixels) if ablation == "mean" else None
    clean = forward(enc.visual, tiny_pixels)
    for k in (0, 7, 15):
        expected = 1 - cos(forward(ablated_copy(enc.visual, [TINY_HEADS[k]], means), tiny_pixels), clean)
        torch.testing.assert_close(got.view(3, 16)[:, k], expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("ablation", ["zero", "mean"])
def test_direct_importance_is_the_direct_path_of_the_ablation(tiny_visual, tiny_pixels, ablation) -> None:
    """Reference: open_clip's blocks run by hand; the head's write at the CLS token is the difference of
    its block's attention output with and without the head's W_O columns (LayerScale included), taken out
    of (or, for mean ablation, swapped for the mean write in) the final residual, then ln_post and proj."""
    visual = perturb_(tiny_visual)
    enc = HookedEncoder(visual)
    means = enc.mean_writes(tiny_pixels) if ablation == "mean" else None
    rows = head_importance(enc, tiny_pixels, TINY_HEADS, ablation=ablation, means=means)
    with torch.no_grad():
        x = visual.ln_pre(visual.patch_dropout(_tokens(visual, tiny_pixels)))
        inputs = []
        for block in visual.transformer.resblocks:
            inputs.append(x)
            x = block(x)
        final, clean = x[:, 0], visual(tiny_pixels)
        for k, label in enumerate(TINY_HEADS):
            comp = parse_component(label)
            block = visual.transformer.resblocks[comp.layer]
            zeroed = copy.deepcopy(block)
            d = block.attn.head_dim
            zeroed.attn.out_proj.weight[:, comp.head * d:(comp.head + 1) * d] = 0
            normed = block.ln_1(inputs[comp.layer])
            write = (block.ls_1(block.attention(normed)) - zeroed.ls_1(zeroed.attention(normed)))[:, 0]
            put_back = means.heads[comp.layer, comp.head] if means is not None else 0
            expected = 1 - cos(visual.ln_post(final - write + put_back) @ visual.proj, clean)
            got = torch.tensor([rows[b * 16 + k]["direct_importance"] for b in range(3)])
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def _tokens(visual, pixels: torch.Tensor) -> torch.Tensor:
    """Patch embedding, class token and positions, as open_clip's VisionTransformer.forward starts."""
    x = visual.conv1(pixels).flatten(2).transpose(1, 2)
    cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
    return torch.cat([cls, x], 1) + visual.positional_embedding.to(x.dtype)


# ---- overlay orders ----------------------------------------------------------------------------------

def test_first_greedy_step_lowers_the_overlay_similarity_at_least_as_much_as_any_order(tiny_visual, tiny_pixels):
    enc = HookedEncoder(perturb_(tiny_visual))
    rows = overlay_removal(enc, tiny_pixels[:2], tiny_pixels[1:], TINY_HEADS, steps=2, greedy_pool=None,
                           random_orders=4, seed=0)
    for image in ("0", "1"):
        first = {(r["order"], r["seed"]): r["overlay_sim"] for r in rows if r["image"] == image and r["step"] == 1}
        assert len(first) == 3 + 4
        assert all(first["greedy", None] <= sim + 1e-7 for sim in first.values())
        assert min(v for k, v in first.items() if k[0] != "greedy") > first["greedy", None] - 1e-7


def test_random_orders_differ_between_seeds_and_repeat_for_one():
    assert random_order(16, 3) == random_order(16, 3)
    assert random_order(16, 3) != random_order(16, 4)
    assert sorted(random_order(16, 3)) == list(range(16))


def test_area_under_the_curve_by_hand():
    # trapezoids of unit width: (1 + 0.5) / 2 + (0.5 + 0.5) / 2 + (0.5 + 0) / 2
    assert area_under([1.0, 0.5, 0.5, 0.0]) == pytest.approx(1.5)
    assert area_under([0.8, 0.4]) == pytest.approx(0.6)  # two points: one trapezoid
    assert area_under([0.9]) == 0.0


def test_areas_in_the_csv_equal_a_hand_computation(tmp_path, tiny_run):
    run_study(study_cfg("overlay_removal", steps=4), tmp_path, *tiny_run)
    rows = read_rows(tmp_path / "study_overlay_removal.csv")
    runs: dict[tuple, list[dict]] = {}
    for row in rows:
        runs.setdefault((row["image"], row["order"], row["seed"]), []).append(row)
    assert len(runs) == 3 * (3 + 2)
    for run in runs.values():
        sims = [float(r["overlay_sim"]) for r in sorted(run, key=lambda r: int(r["step"]))]
        by_hand = sum((a + b) / 2 for a, b in zip(sims, sims[1:]))
        assert all(float(r["auc"]) == pytest.approx(by_hand, abs=1e-5) for r in run)


def test_overlay_position_and_scale_come_from_the_config(tmp_path, tiny_run):
    """The composite saved by the study: the background's centre square with the foreground, resized to
    `overlay_scale` of its side, in the `overlay_position` corner (PIL's own fit as the reference)."""
    from PIL import Image, ImageOps

    encoder, preprocess, images, components = tiny_run
    run_study(study_cfg("overlay_removal", overlay_position="bottom-right", overlay_scale=0.3, decode_steps=[]),
              tmp_path, encoder, preprocess, images[:2], components)
    composite = np.asarray(Image.open(tmp_path / "images" / "overlays" / "img1_on_img0.png"))
    background, foreground = images[0].load(), images[1].load()
    side = min(background.size)
    small = round(0.3 * side)
    patch = np.asarray(ImageOps.fit(foreground, (small, small), Image.Resampling.BICUBIC))
    square = np.asarray(ImageOps.fit(background, (side, side), Image.Resampling.BICUBIC))
    assert composite.shape[:2] == (side, side)
    assert (composite[side - small:, side - small:] == patch).all()
    assert (composite[:side - small] == square[:side - small]).all()


def test_bootstrap_interval_is_the_central_percentile_interval_of_the_resampled_correlations() -> None:
    """Written out here: R resamples of the n pairs with replacement (numpy's generator seeded with the
    study's seed, one row of n indices per resample), Pearson r of each (Spearman: of the ranks), then the
    2.5th and 97.5th percentiles for 95 % confidence (90 %: the 5th and 95th)."""
    g = np.random.default_rng(5)
    x = g.normal(size=12)
    y = x + g.normal(size=12)
    for rank, confidence in ((False, 0.95), (True, 0.95), (False, 0.9)):
        how = Correlation(resamples=300, seed=9, confidence=confidence)
        index = np.random.default_rng(9).integers(0, 12, size=(300, 12))
        values = []
        for row in index:
            a, b = x[row], y[row]
            if rank:
                a, b = scipy_stats.rankdata(a), scipy_stats.rankdata(b)
            if a.std() > 0 and b.std() > 0:
                values.append(np.corrcoef(a, b)[0, 1])
        tail = 100 * (1 - confidence) / 2
        expected = np.percentile(values, [tail, 100 - tail])
        assert bootstrap_interval(x, y, rank=rank, how=how) == pytest.approx(tuple(expected), abs=1e-9)
