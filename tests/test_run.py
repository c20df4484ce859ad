"""`dsl run` end to end on the tiny models: every lens writes every file, the CSV is tidy and right,
`decode.top_k` decodes only the best, and `dsl plot` redraws figures from the files alone."""

from __future__ import annotations

import csv
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dsl_cli import cli, figures
from dsl_cli.encoder import build_tiny_visual, load_encoder
from dsl_cli.config import EncoderConfig
from dsl_cli.lenses import LENSES, lens_class
from dsl_cli.outputs import TEMP_SUFFIX
from helpers import dsl_here
import zygote  # dsl processes forked after the model libraries' imports (tests/zygote.py)

DSL = str(Path(sys.executable).parent / "dsl")
N_IMAGES, N_LAYERS, N_HEADS = 2, 4, 4  # two sample photos; debug=tiny's ViT has 4 layers of 4 heads
SMALL = ("layer=1", "images.limit=2")  # what these runs look at unless they say otherwise


def run_tiny(folder: Path, *overrides: str) -> Path:
    """`dsl run debug=tiny layer=1 images.limit=2 ...` in this process (what these tests read is the run's
    files, not its process: `test_the_terminal_shows_dsl_and_labelled_bars_only` starts the console script),
    into `folder`; returns the run folder."""
    code = dsl_here(["run", "debug=tiny", *SMALL, f"hydra.run.dir={folder}", *overrides], folder.parent)
    log = folder / "dsl.log"
    assert code == 0, log.read_text()[-3000:] if log.is_file() else f"dsl run exited {code}"
    return folder


def read_rows(folder: Path, name: str = "similarity.csv") -> list[dict]:
    with open(folder / name, newline="") as handle:
        return list(csv.DictReader(handle))


LENS_RUNS = {  # text (labels, descriptions) on for all but the direct lens, which shows the default: off
    "steering": ("lens=steering", "component=all", "lens.verify=true", "lens.text=true"),
    "direct": ("lens=direct", "component=all"),
    "diffusion": ("lens=diffusion", "layer=all", "lens.text=true"),
    "logit": ("lens=logit", "layer=[1,3]", "lens.text=true"),
    "attribution": ("lens=attribution", "component=all", 'lens.target="a photo of a dog"', "lens.text=true"),
}
EXPECTED_COMPONENTS = {  # per image; checked against the label lists, not against the code
    "steering": ["L01H00", "L01H01", "L01H02", "L01H03", "L01MLP"],
    "direct": ["L01H00", "L01H01", "L01H02", "L01H03", "L01MLP"],
    "diffusion": ["L00", "L01", "L02", "L03"],
    "logit": ["L01", "L01H00", "L01H01", "L01H02", "L01H03", "L03", "L03H00", "L03H01", "L03H02", "L03H03"],
    "attribution": ["L01H00", "L01H01", "L01H02", "L01H03", "L01MLP"],
}

# per image: no grid shows only pictures that another one shows (a one-layer run's best grid is its layer
# grid; a Diffusion Lens run's one-picture layer grids are in its layer-by-layer grid)
EXPECTED_GRIDS = {
    "steering": ["L01"],
    "direct": ["L01"],
    "diffusion": ["layers"],
    "logit": ["layers", "L01", "L03", "top"],
    "attribution": ["L01"],
}


def keep_the_classifier(patch: pytest.MonkeyPatch) -> None:
    """The tiny text tower's ImageNet classifier (1000 classes x 7 prompts), built by the first run that needs
    it and handed, as a copy, to the runs after it: dsl keeps a pretrained tower's classifier on disk but
    builds the tiny one's in every run, seconds that the runs below would spend building the same tensor."""
    from dsl_cli import lenses

    built: dict = {}
    build = lenses.imagenet_classifier

    def once(encoder_cfg, templates: str, device):
        key = (str(encoder_cfg), templates)
        if key not in built:
            built[key] = build(encoder_cfg, templates, device)
        classifier, names = built[key]
        return classifier.clone(), list(names)

    patch.setattr(lenses, "imagenet_classifier", once)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    with pytest.MonkeyPatch.context() as patch:
        keep_the_classifier(patch)
        return {lens: run_tiny(root / lens, *overrides) for lens, overrides in LENS_RUNS.items()}


@pytest.mark.parametrize("lens", list(LENSES))  # every registered lens has a case above
def test_each_lens_writes_every_file(runs: dict[str, Path], lens: str) -> None:
    assert lens in LENS_RUNS, f"the registered lens {lens!r} has no case in LENS_RUNS"
    folder = runs[lens]
    rows = read_rows(folder)
    images = sorted({r["image"] for r in rows})
    assert len(images) == N_IMAGES
    # exactly images x components rows, one per component, in component order
    for image in images:
        assert [r["component"] for r in rows if r["image"] == image] == EXPECTED_COMPONENTS[lens]
    assert len(rows) == N_IMAGES * len(EXPECTED_COMPONENTS[lens])
    for row in rows:
        assert row["lens"] == lens
        for key in ("sim_embed", "sim_decoded", "norm"):
            assert math.isfinite(float(row[key])), (key, row)
        with Image.open(folder / row["file"]) as picture:
            assert picture.size == (64, 64)
        assert row["file"] == f"images/{row['image']}/{lens}/{row['component']}.png"
        assert (row["attribution"] != "") == (lens == "attribution")  # a share of cos(embedding, target)
        assert row["attribution"] == "" or abs(float(row["attribution"])) <= 1
    for image in images:
        assert (folder / "images" / image / "input.png").is_file()
        grids = sorted(p.name for p in (folder / "grids").glob(f"{image}_{lens}_*.png"))
        assert grids == sorted(f"{image}_{lens}_{name}.png" for name in EXPECTED_GRIDS[lens])
        assert (folder / "heatmaps" / f"{image}_{lens}.png").is_file()
        if lens == "logit":
            assert (folder / "plots" / f"{image}_logit.png").is_file()
        assert (folder / "looks" / f"{image}_{lens}.png").is_file() == (lens != "diffusion")
        for declared in lens_class(lens).figures:  # what the lens says a run of it draws
            assert (folder / declared.replace("<image>", image).replace("<lens>", lens)).is_file(), declared
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["config"]["lens"]["name"] == lens
    assert {"torch", "diffusers", "open_clip"} <= set(manifest["versions"])
    assert manifest["device"] == "cpu" and manifest["seed"] == 0
    assert {"images", "encoder", "lens", "decode", "write"} <= set(manifest["seconds"])
    assert 0 <= manifest["decode_fit_seconds"] <= manifest["seconds"]["decode"]  # a part of decode
    assert manifest["rows"] == len(rows) and manifest["decoded"] == sum(1 for r in rows if r["file"])
    # the logit lens's text tower, the attribution target's and every lens's labels run before the encoder
    before = {"logit": ["classifier"], "attribution": ["target"]}.get(lens, [])
    before += ["text"] if "lens.text=true" in LENS_RUNS[lens] else []
    assert manifest["stages_done"] == ["images", *before, "encoder", "lens", "decoder", "decode", "write"]
    assert manifest["scheduler"] == "DDPMScheduler"  # decode.scheduler=ddpm, as recorded by the run
    assert (folder / "dsl.log").is_file() and (folder / "index.html").is_file()
    assert not list(folder.rglob(f"*{TEMP_SUFFIX}")), "a temporary file was left behind"


@pytest.mark.parametrize("lens", list(LENSES))  # every registered lens has a case above
def test_ranks_follow_similarity(runs: dict[str, Path], lens: str) -> None:
    rows = read_rows(runs[lens])
    for image in {r["image"] for r in rows}:
        group = [r for r in rows if r["image"] == image]
        assert sorted(int(r["rank"]) for r in group) == list(range(1, len(group) + 1))
        by_rank = sorted(group, key=lambda r: int(r["rank"]))
        sims = [float(r["sim_embed"]) for r in by_rank]
        assert sims == sorted(sims, reverse=True)


@pytest.mark.parametrize("lens", ["steering", "attribution"])
def test_where_each_head_looks(runs: dict[str, Path], lens: str) -> None:
    """patches.csv holds every head's shares (summing to 1 with the CLS token's); `top_patches` names the
    five largest, read here from patches.csv."""
    rows, patches = read_rows(runs[lens]), read_rows(runs[lens], "patches.csv")
    by_key = {(p["image"], p["component"]): p for p in patches}
    assert len(patches) == sum(1 for r in rows if r["kind"] == "head")
    for row in rows:
        if row["kind"] != "head":
            assert row["top_patches"] == ""
            continue
        patch = by_key[(row["image"], row["component"])]
        shares = [float(v) for v in patch["shares"].split(";")]
        assert int(patch["grid"]) ** 2 == len(shares) == 16  # the tiny ViT: 64 px in 16 px patches
        assert abs(sum(shares) + float(patch["cls_share"]) - 1) < 1e-3
        best = sorted(range(16), key=lambda p: -shares[p])[:5]
        assert row["top_patches"] == ";".join(f"r{p // 4}c{p % 4}" for p in best)


@pytest.mark.parametrize("lens", list(LENSES))  # every registered lens has a case above
def test_every_component_has_labels_and_every_submodule_a_description(runs: dict[str, Path], lens: str) -> None:
    import open_clip

    if "lens.text=true" not in LENS_RUNS[lens]:  # the default: no text tower, the columns stay empty
        assert all(row["labels"] == row["description"] == "" for row in read_rows(runs[lens]))
        return
    for row in read_rows(runs[lens]):
        labels = [text.rsplit(" ", 1) for text in row["labels"].split("; ")]
        assert len(labels) == 5 and all(name in open_clip.IMAGENET_CLASSNAMES for name, _ in labels)
        cosines = [float(value) for _, value in labels]
        assert cosines == sorted(cosines, reverse=True)
        described = row["description"].split("; ") if row["description"] else []
        assert len(described) == (3 if row["kind"] in ("head", "mlp") else 0)
    if lens == "logit":  # the logit lens's own labels.csv names the same best class
        best = {(r["image"], r["component"]): r["label"] for r in read_rows(runs[lens], "labels.csv") if r["rank"] == "1"}
        assert all(row["labels"].split("; ")[0].rsplit(" ", 1)[0] == best[(row["image"], row["component"])]
                   for row in read_rows(runs[lens]))


def test_verify_checks_the_closed_form_against_the_hooked_pass(runs: dict[str, Path]) -> None:
    manifest = json.loads((runs["steering"] / "manifest.json").read_text())
    assert manifest["verify_ok"] is True and 0 <= manifest["verify_max_abs_diff"] < 1e-4


def test_last_layer_of_the_diffusion_lens_is_the_embedding(runs: dict[str, Path]) -> None:
    """Hand-computed case: R(x_L) is the image embedding itself, so its similarity to the input is 1."""
    rows = read_rows(runs["diffusion"])
    last = [r for r in rows if r["component"] == f"L{N_LAYERS - 1:02d}"]
    assert last and all(abs(float(r["sim_embed"]) - 1.0) < 1e-5 for r in last)
    assert all(float(r["sim_embed"]) < 0.9999 for r in rows if r["component"] == "L00")


def test_sim_decoded_is_the_saved_picture_re_encoded(runs: dict[str, Path]) -> None:
    """Independent path: open_clip's own forward on the PNG as saved, against the input's own embedding."""
    folder = runs["steering"]
    visual = build_tiny_visual().eval()
    _, preprocess = load_encoder(EncoderConfig(source="tiny", name="tiny", pretrained=None))
    inputs = {"astronaut": "astronaut.png", "chelsea": "chelsea.png"}
    import skimage

    data = Path(skimage.__file__).parent / "data"
    rows = read_rows(folder)
    for row in rows[:2] + rows[-2:]:  # both images
        with torch.no_grad():
            clean = visual(preprocess(Image.open(data / inputs[row["image"]]).convert("RGB"))[None])
            decoded = visual(preprocess(Image.open(folder / row["file"]).convert("RGB"))[None])
        expected = torch.nn.functional.cosine_similarity(decoded, clean).item()
        assert abs(float(row["sim_decoded"]) - expected) < 1e-5


def test_logit_lens_labels(runs: dict[str, Path]) -> None:
    import open_clip

    rows = read_rows(runs["logit"], "labels.csv")
    assert len(rows) == N_IMAGES * len(EXPECTED_COMPONENTS["logit"]) * 5  # lens.top_labels=5
    assert {r["label"] for r in rows} <= set(open_clip.IMAGENET_CLASSNAMES)
    for (image, component) in {(r["image"], r["component"]) for r in rows}:
        scores = [float(r["score"]) for r in rows if (r["image"], r["component"]) == (image, component)]
        assert scores == sorted(scores, reverse=True) and all(-1 <= s <= 1 for s in scores)


def test_top_k_decodes_only_the_best_and_scores_everything(tmp_path: Path) -> None:
    folder = run_tiny(tmp_path / "topk", "lens=steering", "component=all", "decode.top_k=2")
    rows = read_rows(folder)
    assert len(rows) == N_IMAGES * (N_HEADS + 1)
    assert all(math.isfinite(float(r["sim_embed"])) for r in rows)
    for image in {r["image"] for r in rows}:
        decoded = [r for r in rows if r["image"] == image and r["file"]]
        assert sorted(int(r["rank"]) for r in decoded) == [1, 2]
        assert len(list((folder / "images" / image / "steering").glob("*.png"))) == 2
        assert all(r["sim_decoded"] == "" for r in rows if r["image"] == image and not r["file"])


def test_plot_redraws_from_files_alone(runs: dict[str, Path], tmp_path: Path, monkeypatch) -> None:
    folder = shutil.copytree(runs["logit"], tmp_path / "copy")
    figures = sorted(p.relative_to(folder) for d in ("grids", "heatmaps", "plots") for p in (folder / d).glob("*.png"))
    before = {p: (folder / p).read_bytes() for p in figures}
    for d in ("grids", "heatmaps", "plots"):
        shutil.rmtree(folder / d)

    def no_model(*args, **kwargs):
        raise AssertionError("dsl plot built a model")

    # any way of building a model goes through these constructors
    monkeypatch.setattr("dsl_cli.encoder.HookedEncoder.__init__", no_model)
    monkeypatch.setattr("dsl_cli.decoder.KandinskyDecoder.__init__", no_model)
    assert cli.main(["plot", str(folder)]) == 0
    after = sorted(p.relative_to(folder) for d in ("grids", "heatmaps", "plots") for p in (folder / d).glob("*.png"))
    assert after == figures
    assert all((folder / p).read_bytes() == before[p] for p in figures)


def test_plot_redraws_every_run_below_a_folder(runs: dict[str, Path], tmp_path: Path, capsys) -> None:
    for lens in ("direct", "diffusion"):
        shutil.copytree(runs[lens], tmp_path / "sweep" / lens)
        shutil.rmtree(tmp_path / "sweep" / lens / "heatmaps")
    assert cli.main(["plot", str(tmp_path / "sweep")]) == 0
    assert capsys.readouterr().out.count("redrew") == 2
    assert all((tmp_path / "sweep" / lens / "heatmaps").is_dir() for lens in ("direct", "diffusion"))


def test_plot_on_a_folder_that_is_not_a_run(tmp_path: Path, capsys) -> None:
    assert cli.main(["plot", str(tmp_path)]) == 2
    assert "no dsl run here" in capsys.readouterr().err


@pytest.mark.parametrize(("study", "files"), [
    ("head_importance", ["study_head_importance.csv", "correlations.csv", "plots/head_importance.png"]),
    ("overlay_removal", ["study_overlay_removal.csv", "plots/overlay_removal.png"]),
])
def test_studies_run_through_the_cli(study: str, files: list[str], tmp_path: Path, monkeypatch) -> None:
    titles = []
    original = figures.plot_overlay_removal
    monkeypatch.setattr(figures, "plot_overlay_removal", lambda rows, settings: titles.append(settings)
                        or original(rows, settings))
    settings = ["study.steps=3", "study.random_orders=2"] if study == "overlay_removal" else ["study.bootstrap=20"]
    folder = run_tiny(tmp_path / study, f"study={study}", "layer=all", *settings)
    for name in files:
        assert (folder / name).is_file(), name
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["status"] == "complete" and "study" in manifest["seconds"]
    rows = read_rows(folder, f"study_{study}.csv")
    if study == "head_importance":
        assert len(rows) == N_IMAGES * N_LAYERS * N_HEADS
    else:  # per composite: DSL, naive-lens and greedy orders and 2 random orders, each with steps 0..3
        assert len(rows) == N_IMAGES * (3 + 2) * 4
        # the default greedy pool (32) is all 16 heads: the title said "among the 32 best"
        assert manifest["components"] == N_LAYERS * N_HEADS
        assert len(titles) == 1 and f"greedy among all {N_LAYERS * N_HEADS} heads;" in titles[0], titles
        assert len(list(folder.glob("grids/*_overlay_fade.png"))) == N_IMAGES  # decode_steps, clamped to 3
    assert not (folder / "similarity.csv").exists()  # a study ranks no lens pictures


def test_rank_by_decoded_similarity(tmp_path: Path) -> None:
    rows = read_rows(run_tiny(tmp_path / "decoded", "lens.rank_by=sim_decoded"))
    for image in {r["image"] for r in rows}:
        by_rank = sorted((r for r in rows if r["image"] == image), key=lambda r: int(r["rank"]))
        sims = [float(r["sim_decoded"]) for r in by_rank]
        assert sims == sorted(sims, reverse=True) and len(sims) == N_HEADS


def test_diffusion_lens_between_attention_and_mlp(tmp_path: Path) -> None:
    """x_{l,mid} = x_l + attention writes: for layer 0 of the tiny model, read out by the run and checked
    against open_clip's own blocks (hooks on ls_1), for every image."""
    folder = run_tiny(tmp_path / "mid", "lens=diffusion", "lens.mid=true", "layer=0", "decode.enabled=false")
    rows = read_rows(folder)
    assert [r["component"] for r in rows] == ["L00mid", "L00"] * N_IMAGES
    visual = build_tiny_visual().eval()
    _, preprocess = load_encoder(EncoderConfig(source="tiny", name="tiny", pretrained=None))
    import skimage

    data = Path(skimage.__file__).parent / "data"
    block = visual.transformer.resblocks[0]
    for row in rows[::2]:
        pixels = preprocess(Image.open(data / f"{row['image']}.png").convert("RGB"))[None]
        captured = {}
        hooks = [visual.transformer.register_forward_pre_hook(lambda m, a: captured.setdefault("x0", a[0])),
                 block.ls_1.register_forward_hook(lambda m, a, out: captured.setdefault("attn", out))]
        with torch.no_grad():
            clean = visual(pixels)
            mid = (captured["x0"] + captured["attn"])[:, 0]
            readout = visual.ln_post(mid) @ visual.proj
        for hook in hooks:
            hook.remove()
        expected = torch.nn.functional.cosine_similarity(readout, clean).item()
        assert abs(float(row["sim_embed"]) - expected) < 1e-5


def test_the_terminal_shows_dsl_and_labelled_bars_only(tmp_path: Path) -> None:
    """open_clip's tokenizer INFO lines (logged to the root logger) and the libraries' other chatter go to
    the run's dsl.log; every progress bar on the terminal names its stage."""
    result = zygote.run([DSL, "run", "debug=tiny", "lens=logit", "layer=1", "images.limit=1",
                             "decode.enabled=false", "hydra.run.dir=quiet"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    terminal = result.stdout + result.stderr
    assert "tokenizer" not in terminal and "tokenizer" in (tmp_path / "quiet" / "dsl.log").read_text()
    logged = [line for line in terminal.splitlines() if line.startswith("[")]
    assert logged and all("][dsl_cli." in line for line in logged), logged
    assert {"encode", "classifier"} <= set(re.findall(r"(?:^|\r)(\w+): +\d+%\|", terminal, re.M))
    assert not re.search(r"(?:^|\r) *\d+%\|", terminal, re.M), "a progress bar without a name"


def test_whole_run_in_bf16_records_its_precision_and_switches(runs: dict[str, Path], tmp_path: Path) -> None:
    """Encoder and decoder in bf16 with channels_last, on the CPU: against the fp32 run of the same lens and
    components; the manifest records the dtypes and switches that were used."""
    folder = run_tiny(tmp_path / "bf16", *LENS_RUNS["steering"], "encoder.dtype=bf16", "decode.dtype=bf16",
                      "decode.channels_last=true", "decode.batch_size=auto")
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert (manifest["encoder_dtype"], manifest["decoder_dtype"]) == ("bf16", "bf16")
    assert (manifest["channels_last"], manifest["compile_unet"]) == (True, False)
    assert manifest["decode_batch_size"] == 8 and manifest["encoder_offloaded"] is False  # auto on the CPU: 8
    assert manifest["verify_ok"] is True  # bf16 tolerance
    fp32 = {(r["image"], r["component"]): r for r in read_rows(runs["steering"])}
    rows = read_rows(folder)
    assert len(rows) == len(fp32)
    for row in rows:
        reference = fp32[(row["image"], row["component"])]
        assert abs(float(row["sim_embed"]) - float(reference["sim_embed"])) < 0.01  # measured: 0.0044
        assert math.isfinite(float(row["sim_decoded"]))
    reference_manifest = json.loads((runs["steering"] / "manifest.json").read_text())
    assert (reference_manifest["encoder_dtype"], reference_manifest["decoder_dtype"]) == ("fp32", "fp32")


def grey_levels(a: Path, b: Path) -> int:
    """The largest difference between two pictures, in grey levels."""
    with Image.open(a) as first, Image.open(b) as second:
        return int(abs(torch.tensor(np.asarray(first), dtype=torch.int) - torch.tensor(np.asarray(second))).max())


def test_decode_seeds_pictures_spread_and_baselines(tmp_path: Path) -> None:
    """decode.seeds=3: each component's pictures differ across seeds, and its seed-1 picture is the one a run
    with seed=1 makes (within the grey level batching may change); mean and spread of sim_decoded over the
    seeds, computed here from the CSVs; baseline rows for every image, baseline and seed."""
    chosen = ("component=[L01H01,L01MLP]",)
    three = run_tiny(tmp_path / "three", *chosen, "decode.seeds=3")
    one = run_tiny(tmp_path / "one", *chosen, "seed=1")
    rows, seeds = read_rows(three), read_rows(three, "seeds.csv")
    assert len(seeds) == len(rows) * 2
    for row in rows:
        mine = sorted((r for r in seeds if (r["image"], r["component"]) == (row["image"], row["component"])),
                      key=lambda r: int(r["seed"]))
        files = [row["file"]] + [r["file"] for r in mine]
        assert [int(r["seed"]) for r in mine] == [1, 2]
        assert all(grey_levels(three / a, three / b) > 20 for a, b in ((files[0], files[1]), (files[1], files[2])))
        assert grey_levels(three / files[1], one / row["file"]) <= 1
        values = torch.tensor([float(row["sim_decoded"])] + [float(r["sim_decoded"]) for r in mine])
        assert abs(float(row["sim_decoded_mean"]) - values.mean().item()) < 1e-5
        assert abs(float(row["sim_decoded_std"]) - values.std().item()) < 1e-5
    baselines = read_rows(three, "baselines.csv")
    assert sorted((r["image"], r["component"], r["seed"]) for r in baselines) == sorted(
        (image, name, str(seed)) for image in ("astronaut", "chelsea") for name in ("uncond", "mean")
        for seed in range(3))
    for r in baselines:
        assert r["file"] == f"images/_baselines/steering/seed{r['seed']}/{r['component']}.png"
        assert (three / r["file"]).is_file() and -1 <= float(r["sim_decoded"]) <= 1
    for image in ("astronaut", "chelsea"):
        assert (three / "grids" / f"{image}_steering_seeds.png").is_file()
    assert not (one / "seeds.csv").exists() and read_rows(one)[0]["sim_decoded_mean"] == ""


def test_figures_drawn_on_several_processes_are_the_figures_drawn_in_one(runs: dict[str, Path], tmp_path: Path) -> None:
    """`redraw` draws the heatmaps and each image's figures as jobs on forked processes: the same files, byte
    for byte, listed in the same order, as drawn one after another here."""
    from dsl_cli.figures import redraw

    drawn = {}
    for workers in (1, 3):
        folder = shutil.copytree(runs["steering"], tmp_path / str(workers))
        for kind in ("grids", "heatmaps", "looks", "plots"):
            shutil.rmtree(folder / kind, ignore_errors=True)
        listed = [p.relative_to(folder) for p in redraw(folder, workers=workers)]
        drawn[workers] = listed, {p: (folder / p).read_bytes() for p in listed}
    assert len(drawn[1][0]) > 3 and len({p.parts[0] for p in drawn[1][0]}) >= 2
    assert drawn[3] == drawn[1]


def test_startup_is_counted_from_the_process_start_once_per_process(monkeypatch) -> None:
    """`seconds.startup`: the first job of a process gets the seconds since the process started (as `ps`
    counts them: whole seconds), later jobs none; where /proc cannot be read, none."""
    import os

    from dsl_cli import run

    monkeypatch.setattr(run, "_STARTED_A_JOB", False)
    first = run.startup_seconds()
    elapsed = int(subprocess.run(["ps", "-o", "etimes=", "-p", str(os.getpid())], capture_output=True, text=True,
                                 check=True).stdout)
    assert first is not None and elapsed - 1 <= first <= elapsed + 2 and run.startup_seconds() is None
    monkeypatch.setattr(run, "_STARTED_A_JOB", False)
    monkeypatch.setattr("builtins.open", lambda *args, **kwargs: (_ for _ in ()).throw(PermissionError("no /proc")))
    assert run.startup_seconds() is None
