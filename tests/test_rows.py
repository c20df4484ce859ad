"""The run's row bookkeeping, in-process (`dsl_cli.run.run` on the tiny models): every CSV value recomputed
here from the encoder, the decoder pipeline and the pictures on disk; which items are decoded
(`decode.top_k`, `decode.enabled`); ranks by either similarity; resume after an interruption.

Settings are unlike the defaults (mode add, alpha 3, guidance 7.5, seed 5, layer 2) so that a value taken
from the wrong place shows.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf
from PIL import Image

from dsl_cli.config import DecoderConfig, EncoderConfig, register_configs
from dsl_cli.decoder import load_decoder, to_uint8
from dsl_cli.encoder import load_encoder
from dsl_cli.run import run

NAMES = ["blobs", "noise"]  # the folder's images, in the order a run reads them (sorted by name)


def read_csv(path: Path) -> list[dict]:
    """The CSV's rows as the text the file holds (csv module, not dsl's reader): what a user's script reads."""
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("pictures")
    g = np.random.default_rng(3)
    smooth = np.kron(g.integers(0, 256, (7, 9, 3)), np.ones((10, 10, 1))).astype(np.uint8)  # 70 x 90 blocks
    Image.fromarray(smooth).save(folder / "blobs.png")
    Image.fromarray(g.integers(0, 256, (80, 64, 3), dtype=np.uint8)).save(folder / "noise.png")
    return folder


def config(image_folder: Path, *overrides: str):
    register_configs()
    with initialize_config_module("dsl_cli.configs", version_base="1.3"):
        return compose("run", ["debug=tiny", "images=folder", f"images.path={image_folder}", "seed=5", *overrides])


@pytest.fixture(scope="module")
def tiny():
    """The tiny encoder and its preprocessing, built apart from the run."""
    return load_encoder(EncoderConfig(source="tiny"))


def lens_here(tiny, image_folder: Path, components: list[str], lens: str = "steering", **steer):
    """(clean [B,E], lens embeddings [B,K,E], writes [B,K,D]) of the folder's images, from the encoder."""
    encoder, preprocess = tiny
    pixels = torch.stack([preprocess(Image.open(image_folder / f"{n}.png").convert("RGB")) for n in NAMES])
    cache = encoder.run_with_cache(pixels)
    embeds = encoder.steer(cache, components, **steer) if lens == "steering" else encoder.direct(cache, components)
    return cache.embeds, embeds, encoder.component_writes(cache, components)


def cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))


def ranks_here(values: list[float]) -> list[int]:
    """1 = largest; ties keep the earlier item first."""
    order = sorted(range(len(values)), key=lambda i: (-values[i], i))
    return [order.index(i) + 1 for i in range(len(values))]


def by_image(rows: list[dict]) -> dict[str, list[dict]]:
    return {name: [r for r in rows if r["image"] == name] for name in NAMES}


def re_embed(tiny, picture: Path) -> torch.Tensor:
    encoder, preprocess = tiny
    with torch.no_grad():
        return encoder.visual(preprocess(Image.open(picture).convert("RGB"))[None])[0]


LAYER2 = ["L02H00", "L02H01", "L02H02", "L02H03", "L02MLP"]


def test_rows_are_the_scores_computed_here_and_top_k_pictures_are_the_pipelines(
    tmp_path: Path, image_folder: Path, tiny
) -> None:
    folder = tmp_path / "run"
    cfg = config(image_folder, "lens=steering", "lens.mode=add", "lens.alpha=3", "layer=2", "component=all",
                 "decode.guidance=7.5", "decode.top_k=2", "decode.batch_size=3")
    run(cfg, folder)
    rows = read_csv(folder / "similarity.csv")
    assert [(r["image"], r["component"]) for r in rows] == [(n, c) for n in NAMES for c in LAYER2]
    clean, embeds, writes = lens_here(tiny, image_folder, LAYER2, mode="add", alpha=3.0)
    sims = cos(embeds, clean[:, None])
    for b, (name, group) in enumerate(by_image(rows).items()):
        assert [int(r["rank"]) for r in group] == ranks_here(sims[b].tolist())
        for k, row in enumerate(group):
            expected = {"lens": "steering", "kind": "mlp" if k == 4 else "head", "layer": "2",
                        "head": "" if k == 4 else str(k), "mode": "add", "alpha": "3.000000", "seed": "5",
                        "steps": "2", "guidance": "7.500000"}
            assert {key: row[key] for key in expected} == expected
            assert float(row["sim_embed"]) == pytest.approx(sims[b, k].item(), abs=2e-6)
            assert float(row["norm"]) == pytest.approx(writes[b, k].norm().item(), rel=1e-5)
            decoded = int(row["rank"]) <= 2
            assert row["file"] == (f"images/{name}/steering/{row['component']}.png" if decoded else "")
            assert (row["sim_decoded"] != "") == decoded
    pictures = sorted(folder.glob("images/*/steering/*.png"))
    assert len(pictures) == 4
    manifest = json.loads((folder / "manifest.json").read_text())
    assert (manifest["rows"], manifest["to_decode"], manifest["decoded"]) == (10, 4, 4)
    assert manifest["extra_to_decode"] == 0 and not (folder / "baselines.csv").exists()  # one seed, no baselines

    # each picture is the pipeline's at this embedding, the encoder's zero-image negative, seed and guidance
    pipe = load_decoder(DecoderConfig(source="tiny")).pipe
    negative = tiny[0].zero_embed()
    for b, name in enumerate(NAMES):
        for k, label in enumerate(LAYER2):
            row = by_image(rows)[name][k]
            if not row["file"]:
                continue
            expected = pipe(image_embeds=embeds[b, k][None], negative_image_embeds=negative,
                            generator=torch.Generator().manual_seed(5), height=64, width=64, num_inference_steps=2,
                            guidance_scale=7.5, output_type="np").images[0]
            saved = np.asarray(Image.open(folder / row["file"]), dtype=np.int16)
            assert np.abs(saved - to_uint8(expected)).max() <= 1, label
            assert float(row["sim_decoded"]) == pytest.approx(
                cos(re_embed(tiny, folder / row["file"]), clean[b]).item(), abs=2e-6)


def test_ranks_by_decoded_similarity_put_the_undecoded_last(tmp_path: Path, image_folder: Path, tiny) -> None:
    folder = tmp_path / "run"
    run(config(image_folder, "lens=steering", "layer=2", "component=all", "decode.top_k=3",
               "lens.rank_by=sim_decoded"), folder)
    rows = read_csv(folder / "similarity.csv")
    clean, embeds, _ = lens_here(tiny, image_folder, LAYER2)  # norm, alpha 2: the defaults
    for b, group in enumerate(by_image(rows).values()):
        embed_sims = cos(embeds[b], clean[b]).tolist()
        embed_ranks = ranks_here(embed_sims)
        assert [bool(r["file"]) for r in group] == [rank <= 3 for rank in embed_ranks]  # planned by sim_embed
        # the decoded by sim_decoded, then the undecoded by sim_embed (a cosine: -10 puts them below all)
        sims = [float(r["sim_decoded"]) if r["file"] else -10 + e for r, e in zip(group, embed_sims)]
        assert [int(r["rank"]) for r in group] == ranks_here(sims)


def test_without_decoding_every_row_is_written_and_no_picture(tmp_path: Path, image_folder: Path, tiny) -> None:
    folder = tmp_path / "run"
    run(config(image_folder, "lens=direct", "layer=[0,3]", "head=[1,2]", "decode.enabled=false"), folder)
    rows = read_csv(folder / "similarity.csv")
    labels = ["L00H01", "L00H02", "L03H01", "L03H02"]
    assert [(r["image"], r["component"]) for r in rows] == [(n, c) for n in NAMES for c in labels]
    clean, embeds, _ = lens_here(tiny, image_folder, labels, lens="direct")
    for b, group in enumerate(by_image(rows).values()):
        for k, row in enumerate(group):
            assert (row["lens"], row["mode"], row["alpha"], row["file"], row["sim_decoded"]) == ("direct", "", "", "", "")
            assert float(row["sim_embed"]) == pytest.approx(cos(embeds[b, k], clean[b]).item(), abs=2e-6)
    assert not list(folder.glob("images/*/direct/*.png"))
    assert json.loads((folder / "manifest.json").read_text())["to_decode"] == 0


def test_resume_decodes_only_what_is_missing(tmp_path: Path, image_folder: Path) -> None:
    """An interrupted run (3 rows never written, 1 picture lost after its row) is completed by resume: the
    4 pictures are decoded again, nothing else, and rows and pictures equal an uninterrupted run's."""
    cfg = config(image_folder, "lens=steering", "layer=1", "decode.batch_size=1")  # batches as the reference
    reference = tmp_path / "reference"
    run(cfg, reference)
    expected_rows = read_csv(reference / "similarity.csv")
    expected_pictures = {p.relative_to(reference): p.read_bytes() for p in reference.glob("images/*/steering/*.png")}
    assert len(expected_rows) == len(expected_pictures) == 8

    folder = tmp_path / "interrupted"
    shutil.copytree(reference, folder)
    kept = expected_rows[:5]  # as CsvLog.append left them: the first pictures' rows
    text = (reference / "similarity.csv").read_text().splitlines(keepends=True)
    (folder / "similarity.csv").write_text("".join(text[:1 + len(kept)]))
    for row in expected_rows[len(kept):] + kept[1:2]:
        (folder / row["file"]).unlink()
    (folder / ".hydra").mkdir()
    OmegaConf.save(cfg, folder / ".hydra" / "config.yaml")
    (folder / "manifest.json").write_text('{"made_by": "dsl", "status": "interrupted"}')  # as a killed run leaves it

    run(OmegaConf.merge(cfg, {"resume": str(folder)}), folder)
    assert json.loads((folder / "manifest.json").read_text())["decoded"] == 4
    assert read_csv(folder / "similarity.csv") == expected_rows
    assert {p.relative_to(folder): p.read_bytes() for p in folder.glob("images/*/steering/*.png")} == expected_pictures


def test_the_encoding_bar_counts_the_images(tmp_path: Path, image_folder: Path, monkeypatch) -> None:
    """`encode`: one bar over the run's images, advanced by each batch's."""
    import dsl_cli.run as run_module

    bars = []
    real = run_module.tqdm

    def recording(*args, **kwargs):
        bars.append(real(*args, **kwargs))
        return bars[-1]

    monkeypatch.setattr(run_module, "tqdm", recording)
    run(config(image_folder, "lens=direct", "layer=0", "head=[1]", "decode.enabled=false", "encoder.batch_size=1"),
        tmp_path / "run")
    (bar,) = [b for b in bars if b.desc == "encode"]
    assert (bar.total, bar.n, bar.unit) == (len(NAMES), len(NAMES), "img")
    assert [r["image"] for r in read_csv(tmp_path / "run" / "similarity.csv")] == NAMES  # every batch's rows


def test_a_decoded_batch_that_is_not_finite_names_its_row_and_saves_nothing(tmp_path: Path) -> None:
    """The first picture holding NaN or inf is named by its row's image and component, with the decode
    settings and the fix, before any picture of the batch is saved."""
    from dsl_cli.errors import UserError
    from dsl_cli.outputs import RunFolder
    from dsl_cli.run import Scored, _write_batch

    rows = [{"image": image, "lens": "direct", "component": component}
            for image, component in (("blobs", "L01H02"), ("noise", "L02MLP"))]
    scored = [Scored(row["image"], torch.zeros(1, 8), torch.zeros(8), [row], []) for row in rows]
    pictures = np.full((2, 4, 4, 3), 0.5, dtype=np.float32)
    pictures[1, 3, 0, 2] = np.inf
    cfg = OmegaConf.create({"decode": {"guidance": 4.0, "dtype": "bf16"}, "encoder": {"batch_size": 2}})
    with pytest.raises(UserError) as refused:
        _write_batch(cfg, None, None, None, RunFolder(tmp_path), scored, [(0, 0), (1, 0)], pictures, None)
    assert str(refused.value) == ("noise L02MLP: the decoded picture is not finite (NaN or inf) with "
                                  "decode.guidance=4.0, decode.dtype=bf16; lower decode.guidance or use "
                                  "decode.dtype=fp32")
    assert not list(tmp_path.rglob("*.png"))


def test_patches_and_top_patches_are_where_the_heads_look(tmp_path: Path, image_folder: Path, tiny) -> None:
    """patches.csv: each head's source shares (CLS first), computed here with `source_shares`; `top_patches`
    names its five largest patches (row r, column c of the 4 x 4 grid); MLPs and layers get none, and a run
    without a head writes no patches.csv."""
    from dsl_cli.components import parse_component
    from dsl_cli.encoder.reading import source_shares

    encoder, preprocess = tiny
    pixels = torch.stack([preprocess(Image.open(image_folder / f"{n}.png").convert("RGB")) for n in NAMES])
    heads = [label for label in LAYER2 if "H" in label]
    shares = source_shares(encoder, pixels, [parse_component(label) for label in heads])  # [B, K, 17]
    folder = tmp_path / "run"
    run(config(image_folder, "lens=direct", "layer=2", "component=all", "decode.enabled=false"), folder)
    rows, patches = read_csv(folder / "similarity.csv"), read_csv(folder / "patches.csv")
    assert [(p["image"], p["component"]) for p in patches] == [(n, h) for n in NAMES for h in heads]
    for patch in patches:
        b, k = NAMES.index(patch["image"]), heads.index(patch["component"])
        assert (patch["lens"], patch["grid"]) == ("direct", "4")
        assert float(patch["cls_share"]) == pytest.approx(shares[b, k, 0].item(), abs=1e-5)
        assert [float(v) for v in patch["shares"].split(";")] == pytest.approx(shares[b, k, 1:].tolist(), abs=1e-5)
    for row in rows:
        if row["kind"] != "head":
            assert row["top_patches"] == ""
            continue
        b, k = NAMES.index(row["image"]), heads.index(row["component"])
        best = sorted(range(16), key=lambda p: -shares[b, k, 1 + p].item())[:5]
        assert row["top_patches"] == ";".join(f"r{p // 4}c{p % 4}" for p in best)
    stream = tmp_path / "stream"
    run(config(image_folder, "lens=diffusion", "layer=[1,2]", "decode.enabled=false"), stream)
    assert all(row["top_patches"] == "" for row in read_csv(stream / "similarity.csv"))
    assert not (stream / "patches.csv").exists() or read_csv(stream / "patches.csv") == []


def test_attribution_rows_hold_each_parts_share_of_the_cosine(tmp_path: Path, image_folder: Path, tiny) -> None:
    """`attribution` = e . part / |e|^2 with e the image's own embedding and part the component's exact direct
    part (`direct_attribution`), written out here."""
    from dsl_cli.components import parse_component
    from dsl_cli.encoder.reading import direct_attribution

    encoder, preprocess = tiny
    pixels = torch.stack([preprocess(Image.open(image_folder / f"{n}.png").convert("RGB")) for n in NAMES])
    cache = encoder.run_with_cache(pixels)
    parts = direct_attribution(encoder, cache).pick([parse_component(label) for label in LAYER2])  # [B, K, E]
    e = cache.embeds.float()
    expected = (parts.float() @ e[:, :, None])[..., 0] / (e * e).sum(-1, keepdim=True)
    folder = tmp_path / "run"
    run(config(image_folder, "lens=attribution", "layer=2", "component=all", "decode.enabled=false"), folder)
    rows = read_csv(folder / "similarity.csv")
    assert [(r["image"], r["component"]) for r in rows] == [(n, c) for n in NAMES for c in LAYER2]
    for row in rows:
        b, k = NAMES.index(row["image"]), LAYER2.index(row["component"])
        assert float(row["attribution"]) == pytest.approx(expected[b, k].item(), abs=2e-6)


def test_an_embedding_that_is_not_finite_stops_the_run_naming_its_row_and_setting(
    tmp_path: Path, image_folder: Path, tiny, monkeypatch
) -> None:
    """The first (image, component) whose lens embedding is NaN or inf is named, with the setting to change:
    the encoder's precision for most lenses, lens.alpha for steering (which overflows at alpha 1e20)."""
    from dsl_cli import lenses
    from dsl_cli.errors import UserError

    real = lenses.DirectLens.embeddings

    def poisoned(self, encoder, cache, components):
        embeds = real(self, encoder, cache, components).clone()
        embeds[1, 2, 0] = float("nan")  # the second image's third component
        return embeds

    monkeypatch.setattr(lenses.DirectLens, "embeddings", poisoned)
    with pytest.raises(UserError) as refused:
        run(config(image_folder, "lens=direct", "layer=2", "component=all", "decode.enabled=false",
                   "encoder.batch_size=2"), tmp_path / "direct")
    assert str(refused.value) == ("noise L02H02: the direct lens embedding or its score is not finite (NaN or "
                                  "inf) with encoder.dtype=fp32; the model overflows on this image even in fp32: "
                                  "leave the image out or use other weights")  # fp32 is in use: not the fix
    _, steered, _ = lens_here(tiny, image_folder, LAYER2, alpha=1e20)  # norm mode
    b, k = (int(v) for v in (~torch.isfinite(steered).all(-1)).nonzero()[0])  # the first that overflows
    with pytest.raises(UserError) as refused:
        run(config(image_folder, "lens=steering", "lens.alpha=1e20", "layer=2", "decode.enabled=false"),
            tmp_path / "steering")
    assert str(refused.value) == (f"{NAMES[b]} {LAYER2[k]}: the steering lens embedding or its score is not "
                                  "finite (NaN or inf) with lens.alpha=1e+20 (lens.mode=norm); use a smaller "
                                  "lens.alpha")


def test_extra_seeds_and_baselines_are_the_pipelines_pictures_scored_against_each_image(
    tmp_path: Path, image_folder: Path, tiny
) -> None:
    """decode.seeds=2: seeds.csv holds the decoded component of each image again at seed 6, baselines.csv the
    unconditional embedding's and the images' mean embedding's pictures at seeds 5 and 6, scored against every
    image; each picture is the pipeline's, each sim_decoded the cosine of its re-encoding here."""
    folder = tmp_path / "run"
    run(config(image_folder, "lens=steering", "layer=2", "decode.top_k=1", "decode.seeds=2"), folder)
    clean, embeds, _ = lens_here(tiny, image_folder, LAYER2)  # norm mode, alpha 2: debug=tiny's lens
    pipe, negative = load_decoder(DecoderConfig(source="tiny")).pipe, tiny[0].zero_embed()

    def check(row: dict, embed: torch.Tensor, b: int) -> None:
        expected = pipe(image_embeds=embed[None], negative_image_embeds=negative,
                        generator=torch.Generator().manual_seed(int(row["seed"])), height=64, width=64,
                        num_inference_steps=2, guidance_scale=4.0, output_type="np").images[0]
        saved = np.asarray(Image.open(folder / row["file"]), dtype=np.int16)
        assert np.abs(saved - to_uint8(expected)).max() <= 1, row
        assert float(row["sim_decoded"]) == pytest.approx(cos(re_embed(tiny, folder / row["file"]), clean[b]).item(),
                                                          abs=2e-6)

    best = {r["image"]: r["component"] for r in read_csv(folder / "similarity.csv") if r["rank"] == "1"}
    seeds = read_csv(folder / "seeds.csv")
    assert [(r["image"], r["lens"], r["component"], r["seed"]) for r in seeds] == [
        (n, "steering", best[n], "6") for n in NAMES]
    for row in seeds:
        b = NAMES.index(row["image"])
        check(row, embeds[b, LAYER2.index(row["component"])], b)
    baselines = read_csv(folder / "baselines.csv")
    assert sorted((r["image"], r["component"], r["seed"]) for r in baselines) == sorted(
        (n, c, s) for n in NAMES for c in ("uncond", "mean") for s in ("5", "6"))
    for row in baselines:
        embed = negative[0] if row["component"] == "uncond" else clean.mean(0)
        check(row, embed, NAMES.index(row["image"]))


def test_ranks_by_decoded_similarity_put_the_undecoded_below_a_negative_cosine() -> None:
    """lens.rank_by=sim_decoded: per image, 1 = the highest decoded cosine, even a negative one ranking above
    a component that was not decoded; ties keep component order. The components `decode.top_k` left
    undecoded follow by sim_embed (they were ranked in component order, L00H01 at 0.345 above L02H03 at 0.574)."""
    from dsl_cli.run import _finish_rows

    cfg = OmegaConf.create({"lens": {"rank_by": "sim_decoded"}})
    values = {"a": [(-0.5, 0.9), (None, 0.1), (0.2, 0.0), (-0.5, 0.5), (None, 0.3)], "b": [(None, 0.9), (0.1, 0.0)]}
    rows = [{"image": image, "component": f"c{k}", "sim_decoded": decoded, "sim_embed": embed, "rank": 0}
            for image, sims in values.items() for k, (decoded, embed) in enumerate(sims)]
    assert [r["rank"] for r in _finish_rows(cfg, rows)] == [2, 5, 1, 3, 4, 2, 1]
    kept = [dict(r) for r in rows]
    assert _finish_rows(OmegaConf.create({"lens": {"rank_by": "sim_embed"}}), rows) == kept  # ranks as scored


def test_rows_are_sorted_by_image_then_component_order_whatever_order_they_came_in() -> None:
    """Rows of images and components the run did not score (none in practice) go last, in the order given."""
    from dsl_cli.run import Scored, sorted_rows

    def scored(name: str, components: list[str]) -> Scored:
        return Scored(name, torch.zeros(1), torch.zeros(1), [{"component": c} for c in components], [])

    run_order = [scored("b", ["L1H0", "L0MLP"]), scored("a", ["L1H0", "L0MLP"])]
    keys = [("a", "L0MLP"), ("x", "L9H9"), ("b", "L0MLP"), ("a", "L1H0"), ("b", "L2H2"), ("b", "L1H0")]
    rows = [{"image": image, "component": component} for image, component in keys]
    assert [(r["image"], r["component"]) for r in sorted_rows(rows, run_order)] == [
        ("b", "L1H0"), ("b", "L0MLP"), ("a", "L1H0"), ("a", "L0MLP"), ("x", "L9H9"), ("b", "L2H2")]


def test_images_that_all_vanish_before_they_are_read_stop_the_run_listing_three(tmp_path: Path, tiny) -> None:
    """Listed, then gone when their turn comes (images.skip_bad=true): one line naming the first three."""
    from dsl_cli.errors import UserError
    from dsl_cli.images import ImageSet, InputImage
    from dsl_cli.outputs import RunFolder
    from dsl_cli.run import score_images

    encoder, preprocess = tiny
    image_set = ImageSet([InputImage(n, None, str(tmp_path / f"{n}.png")) for n in "abcd"], skip_bad=True)
    cfg = OmegaConf.create({"encoder": {"batch_size": 2}, "decode": {"width": 64, "height": 64}})
    with pytest.raises(UserError) as refused:
        score_images(cfg, None, RunFolder(tmp_path), encoder, preprocess, image_set, [])
    assert str(refused.value) == f"no readable image; skipped: {image_set.skipped[:3]}"
    assert [s["path"] for s in image_set.skipped] == [str(tmp_path / f"{n}.png") for n in "abcd"]
