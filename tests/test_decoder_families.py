"""Decoder families beyond Kandinsky 2.2: Kandinsky 2.1 (ViT-L/14) and Stable unCLIP (ViT-H/14).

For each, with the dummy components of diffusers' own pipeline tests: our batched, seeded decoding equals the
diffusers pipeline called once per item, as its docs call it; `dsl run` with the family's tiny debug preset
runs every lens end to end; an encoder whose embeddings the decoder cannot decode is refused before any model
loads; the weights preflight names each family's repository.
"""

from __future__ import annotations

import csv
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module
from PIL import Image

from dsl_cli.config import DecoderConfig, register_configs
from dsl_cli.decoder import FAMILIES, Decoder, load_decoder
from dsl_cli.errors import UserError
from helpers import dsl_in_process, fake_cache
import zygote  # dsl processes forked after the model libraries' imports (tests/zygote.py)

DSL = str(Path(sys.executable).parent / "dsl")
STEPS, GUIDANCE = 2, 4.0
SIZES = {"kandinsky21": 64, "unclip_h14": 32}  # the tiny Stable unCLIP's VAE does not upsample its latents
NOISE_LEVEL = 250  # Stable unCLIP's noise augmentation draws from each item's generator too


def config(*overrides: str):
    register_configs()
    with initialize_config_module(config_module="dsl_cli.configs", version_base="1.3"):
        return compose(config_name="run", overrides=list(overrides))


def tiny(family: str, scheduler: str = "ddpm") -> Decoder:
    return load_decoder(DecoderConfig(family=family, source="tiny", noise_level=NOISE_LEVEL), scheduler=scheduler)


def _inputs(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return torch.randn(n, 32, generator=g), torch.randn(1, 32, generator=g)


def reference(dec: Decoder, embed: torch.Tensor, negative: torch.Tensor, seed: int) -> np.ndarray:
    """The diffusers pipeline itself, one embedding per call, as its docs call it: Kandinsky 2.1 with the
    empty prompt and the negative image embedding, Stable unCLIP with `image_embeds=` and `noise_level`."""
    size = SIZES[dec.name]
    common = dict(generator=torch.Generator().manual_seed(seed), height=size, width=size,
                  num_inference_steps=STEPS, guidance_scale=GUIDANCE, output_type="np")
    if dec.name == "kandinsky21":
        out = dec.pipe(prompt="", image_embeds=embed[None], negative_image_embeds=negative, **common)
    else:
        out = dec.pipe(prompt="", image_embeds=embed[None], noise_level=NOISE_LEVEL, **common)
    return out.images[0]


def ours(dec: Decoder, embeds: torch.Tensor, negative: torch.Tensor, seeds: list[int], batch: int) -> np.ndarray:
    size = SIZES[dec.name]
    return dec.decode(embeds, negative, seeds, height=size, width=size, steps=STEPS, guidance=GUIDANCE,
                      batch_size=batch, progress=False)


# DDPM adds fresh noise at every step (the case where per-item generators matter most); DDIM is what both
# repositories ship.
@pytest.mark.parametrize("scheduler", ["ddpm", "ddim"])
@pytest.mark.parametrize("family", list(SIZES))
def test_batched_seeded_decoding_equals_the_pipeline_one_item_at_a_time(family: str, scheduler: str) -> None:
    dec = tiny(family, scheduler)
    assert dec.embed_dim == 32 and type(dec.pipe).__name__ == dec.pipeline.__name__
    assert type(dec.pipe.scheduler).__name__ == {"ddpm": "DDPMScheduler", "ddim": "DDIMScheduler"}[scheduler]
    embeds, negative = _inputs(4)
    seeds = [3, 4, 5, 3]
    batched = ours(dec, embeds, negative, seeds, batch=4)
    single = ours(dec, embeds, negative, seeds, batch=1)
    assert batched.shape == (4, SIZES[family], SIZES[family], 3) and batched.std() > 0.01
    for i, seed in enumerate(seeds):
        expected = reference(dec, embeds[i], negative, seed)
        np.testing.assert_array_equal(single[i], expected)  # batch 1: the very same computation
        np.testing.assert_allclose(batched[i], expected, atol=2e-3)
    # Seeds, not positions, set the noise: items 0 and 3 share a seed but not an embedding.
    assert np.abs(batched[0] - batched[3]).max() > 1e-2


def test_unclip_noise_level_reaches_the_pipeline() -> None:
    """noise_level (decoder.noise_level) changes the pictures, as the pipeline's noise augmentation does."""
    embeds, negative = _inputs(1)
    quiet = load_decoder(DecoderConfig(family="unclip_h14", source="tiny"), scheduler="ddim")
    loud = tiny("unclip_h14", "ddim")
    assert (quiet.noise_level, loud.noise_level) == (0, NOISE_LEVEL)
    assert np.abs(ours(quiet, embeds, negative, [0], 1) - ours(loud, embeds, negative, [0], 1)).max() > 1e-2


def test_out_of_memory_halving_works_for_every_family(monkeypatch: pytest.MonkeyPatch) -> None:
    for family in SIZES:
        dec = tiny(family)
        embeds, negative = _inputs(3)
        expected = ours(dec, embeds, negative, [0, 1, 2], batch=1)
        original, tried = type(dec.pipe).__call__, []

        def call(self, *args, **kwargs):
            tried.append(len(kwargs["image_embeds"]))
            if tried[-1] > 1:
                raise torch.cuda.OutOfMemoryError("injected")
            return original(self, *args, **kwargs)

        monkeypatch.setattr(type(dec.pipe), "__call__", call)
        np.testing.assert_allclose(ours(dec, embeds, negative, [0, 1, 2], batch=4), expected, atol=2e-3)
        assert tried == [3, 2, 1, 1, 1]


def test_unconditional_embeddings_follow_each_family() -> None:
    """Kandinsky (both): the encoder's embedding of an all-zeros image, as their priors' `get_zero_embed`;
    Stable unCLIP: zeros, which its pipeline itself puts in the unconditional half of the batch."""
    from dsl_cli.encoder import build_tiny_visual, HookedEncoder

    encoder = HookedEncoder(build_tiny_visual())
    zero_image = encoder.visual(torch.zeros(1, 3, 64, 64))
    for family in ("kandinsky22", "kandinsky21"):
        torch.testing.assert_close(tiny(family).negative_embed(encoder), zero_image)
    assert torch.equal(tiny("unclip_h14").negative_embed(encoder), torch.zeros(1, 32))


def test_each_family_is_one_class_and_its_defaults_reach_decode() -> None:
    assert set(FAMILIES) == {"kandinsky22", "kandinsky21", "unclip_h14"}
    defaults = {  # the pipelines' own defaults (their __call__ signatures and the repositories' schedulers)
        "kandinsky22": (512, 100, 4.0, "ddpm"), "kandinsky21": (512, 100, 4.0, "ddim"),
        "unclip_h14": (768, 20, 10.0, "ddim"),
    }
    for family, (size, steps, guidance, scheduler) in defaults.items():
        decode = config(f"decoder={family}").decode
        assert (decode.height, decode.width, decode.steps, decode.guidance, decode.scheduler) == (
            size, size, steps, guidance, scheduler), family
    assert config("decoder=unclip_h14", "decode.steps=50").decode.steps == 50
    assert config("decoder=unclip_h14", "decode=fast").decode.steps == 25


# ------------------------------------------------------------------ dsl run, every lens, each family

LENSES = ("steering", "direct", "diffusion", "logit")


@pytest.fixture(scope="module", params=["tiny_k21", "tiny_unclip"])
def sweep(request, tmp_path_factory) -> tuple[str, Path]:
    """`dsl run -m debug=PRESET lens=<every lens>`: one job per lens, one process, merged as a sweep."""
    folder = tmp_path_factory.mktemp(request.param)
    result = zygote.run([DSL, "run", "-m", f"debug={request.param}", f"lens={','.join(LENSES)}", "layer=1",
                             "images.limit=1", f"hydra.sweep.dir={folder}"], cwd=folder, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return request.param, folder


@pytest.mark.own_process
def test_tiny_debug_presets_run_every_lens_end_to_end(sweep: tuple[str, Path]) -> None:
    preset, folder = sweep
    family, size = {"tiny_k21": ("kandinsky21", 64), "tiny_unclip": ("unclip_h14", 32)}[preset]
    for job, lens in enumerate(LENSES):
        run = folder / str(job)
        manifest = json.loads((run / "manifest.json").read_text())
        assert manifest["status"] == "complete"
        assert manifest["config"]["decoder"]["family"] == family and manifest["config"]["lens"]["name"] == lens
        with open(run / "similarity.csv", newline="") as handle:
            rows = list(csv.DictReader(handle))
        assert rows and all(row["file"] and row["sim_decoded"] for row in rows)
        for row in rows:
            with Image.open(run / row["file"]) as picture:
                assert picture.size == (size, size)
        assert f"{family} (tiny)" in (run / "index.html").read_text()  # the page names the decoder
    assert (folder / "similarity.csv").is_file() and (folder / "index.html").is_file()  # the merged sweep


def read_rows(folder: Path) -> list[dict]:
    with open(folder / "similarity.csv", newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.own_process
def test_resume_decodes_only_what_is_missing_for_every_family(sweep: tuple[str, Path], tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """Two pictures of a finished run lost: `dsl run resume=` decodes again the batch of four they were made
    in (float round-off depends on the batch), and they are the pictures the run made, byte for byte."""
    _, folder = sweep
    original, copy = folder / "0", tmp_path / "run"
    shutil.copytree(original, copy)
    lost = [row["file"] for row in read_rows(original)][-2:]
    for name in lost:
        (copy / name).unlink()
    assert dsl_in_process(["run", f"resume={copy}"], tmp_path, monkeypatch, capsys)[0] == 0
    assert json.loads((copy / "manifest.json").read_text())["decoded"] == 4  # debug presets: batches of 4
    for name in lost:
        assert (copy / name).read_bytes() == (original / name).read_bytes(), name
    kept = [{k: v for k, v in row.items() if k != "sim_decoded"} for row in read_rows(copy)]
    assert kept == [{k: v for k, v in row.items() if k != "sim_decoded"} for row in read_rows(original)]


# ------------------------------------------------------------------ pairing, before any model loads

MISMATCHES = {
    "tiny_encoder_real_decoder": (["debug=tiny", "decoder=kandinsky21_random"],
                                  "encoder tiny gives 32-wide image embeddings but decoder kandinsky21 (random) "
                                  "decodes 768-wide ones: use encoder=vitl14"),
    "vitl14_into_unclip": (["encoder=vitl14", "decoder=unclip_h14"],
                           "encoder ViT-L-14 openai gives 768-wide image embeddings but decoder unclip_h14 "
                           "(pretrained) decodes 1024-wide ones: use encoder=vith14 or decoder=kandinsky21"),
    "vith14_into_kandinsky22": (["encoder=vith14"], "decoder kandinsky22 (pretrained) decodes 1280-wide ones: "
                                "use encoder=kandinsky_prior or decoder=unclip_h14"),
    "bigg_into_tiny_k21": (["debug=tiny_k21", "encoder=bigg14"], "decodes 32-wide ones: use encoder=tiny or "
                           "decoder=kandinsky22"),
    "same_width_other_space": (["encoder=vitl14", "encoder.pretrained=laion2b_s32b_b82k", "decoder=kandinsky21"],
                               "encoder ViT-L-14 laion2b_s32b_b82k embeds images in another space than the one "
                               "decoder kandinsky21 was trained on (ViT-L-14 openai): use encoder=vitl14"),
    "unknown_family": (["debug=tiny", "decoder.family=dalle"],
                       "decoder.family='dalle': choose one of kandinsky22, kandinsky21, unclip_h14"),
}


def refused_before_any_model(overrides: list[str], message: str, folder: Path, monkeypatch, capsys) -> None:
    """`dsl run OVERRIDES` in this process stops with exit 2 and one line holding `message`, without loading
    a model or images or looking for weights."""
    from dsl_cli import run

    def loads(*args, **kwargs):
        raise AssertionError("a model or its weights were looked for")

    for name in ("load_encoder", "load_decoder", "preflight", "load_images"):
        monkeypatch.setattr(run, name, loads)
    code, err = dsl_in_process(["run", *overrides], folder, monkeypatch, capsys)
    lines = [line for line in err.splitlines() if line.startswith("dsl: error:")]
    assert code == 2 and "Traceback" not in err and len(lines) == 1, err
    assert message in lines[0]


@pytest.mark.parametrize("case", list(MISMATCHES))
def test_a_mismatched_encoder_and_decoder_are_refused_before_any_model_loads(
        case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    refused_before_any_model(*MISMATCHES[case], tmp_path, monkeypatch, capsys)


@pytest.mark.parametrize(("overrides", "message"), [
    (["debug=tiny_unclip", "decoder.noise_level=1000"], "decoder.noise_level=1000: must be between 0 and 999"),
    (["debug=tiny_unclip", "decoder.noise_level=-1"], "decoder.noise_level=-1: must be between 0 and 999"),
    (["debug=tiny_unclip", "decode.height=36"], "decode.height=36: must be a multiple of 8 for this decoder (e.g. 32)"),
    (["debug=tiny_unclip", "decoder.scheduler=euler"], "decoder.scheduler=euler: Invalid value 'euler'"),
])
def test_bad_decoder_settings_are_refused_before_any_model_loads(
        overrides: list[str], message: str, tmp_path: Path, monkeypatch, capsys) -> None:
    refused_before_any_model(overrides, message, tmp_path, monkeypatch, capsys)


def test_every_family_that_decodes_the_encoders_space_is_offered(monkeypatch: pytest.MonkeyPatch) -> None:
    """A second family on bigG's CLIP (say, a fine-tuned Kandinsky 2.2) is named beside the first."""
    from dsl_cli.decoder import KandinskyDecoder, check_pairing
    from dsl_cli.encoder import embedding_space

    twin = type("TwinDecoder", (KandinskyDecoder,), {"name": "kandinsky22_twin"})
    monkeypatch.setitem(FAMILIES, twin.name, twin)
    cfg = config("encoder=bigg14", "decoder=kandinsky21")
    with pytest.raises(UserError) as refused:
        check_pairing(embedding_space(cfg.encoder), cfg.decoder)
    assert str(refused.value).endswith("decodes 768-wide ones: use encoder=vitl14 or decoder=kandinsky22 "
                                       "or decoder=kandinsky22_twin")


def test_matching_pairs_pass_the_check() -> None:
    from dsl_cli.decoder import check_pairing
    from dsl_cli.encoder import embedding_space

    for overrides in (["encoder=vitl14", "decoder=kandinsky21"], ["encoder=vith14", "decoder=unclip_h14"],
                      [], ["encoder=bigg14"], ["encoder=vitl14_random", "decoder=kandinsky21"],
                      ["encoder=vith14_random", "decoder=unclip_h14_random"], ["debug=tiny_k21"],
                      ["debug=tiny_unclip"], ["debug=tiny"], ["experiment=vitl14_resid"],
                      ["experiment=vitl14_top_heads"], ["experiment=vith14_resid"], ["experiment=vith14_top_heads"],
                      ["experiment=vitl14_resid", "debug=tiny_k21"],
                      ["experiment=vith14_top_heads", "debug=tiny_unclip"]):
        cfg = config(*overrides)
        check_pairing(embedding_space(cfg.encoder), cfg.decoder)


# ------------------------------------------------------------------ weights of each family

# The files of the real repositories (their listings on the hub), as a download would put them in the cache.
K21, UNCLIP = "kandinsky-community/kandinsky-2-1", "stabilityai/stable-diffusion-2-1-unclip"
REPO_FILES = {
    K21: ["model_index.json", "scheduler/scheduler_config.json", "unet/config.json", "movq/config.json",
          "movq/diffusion_pytorch_model.safetensors", "text_encoder/config.json", "text_encoder/model.safetensors",
          "tokenizer/tokenizer_config.json", "tokenizer/special_tokens_map.json", "tokenizer/sentencepiece.bpe.model",
          "tokenizer/tokenizer.json", "unet/diffusion_pytorch_model.safetensors"],
    UNCLIP: ["model_index.json", "feature_extractor/preprocessor_config.json", "image_encoder/config.json",
             "image_encoder/model.safetensors", "image_normalizer/config.json",
             "image_normalizer/diffusion_pytorch_model.safetensors", "image_noising_scheduler/scheduler_config.json",
             "scheduler/scheduler_config.json", "text_encoder/config.json", "text_encoder/model.safetensors",
             "tokenizer/merges.txt", "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json",
             "tokenizer/vocab.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
             "vae/config.json", "vae/diffusion_pytorch_model.safetensors"],
}


@pytest.mark.parametrize(("overrides", "encoder_repo", "decoder_repo"), [
    (["encoder=vitl14", "decoder=kandinsky21"], "timm/vit_large_patch14_clip_224.openai", K21),
    (["encoder=vith14", "decoder=unclip_h14"], "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", UNCLIP),
])
def test_the_preflight_knows_each_familys_weights(overrides: list[str], encoder_repo: str, decoder_repo: str,
                                                   tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants as constants

    from dsl_cli.preflight import preflight

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(UserError) as refused:
        preflight(config(*overrides))
    lines = str(refused.value).splitlines()
    assert lines[0].startswith("2 of the weights this run needs")
    assert [line.split(": ", 1)[1].split()[:3] for line in lines[1:3]] == [
        ["hf", "download", encoder_repo], ["hf", "download", decoder_repo]]
    fake_cache(tmp_path / "hub", decoder_repo, REPO_FILES[decoder_repo][:-1])  # all but the last file
    with pytest.raises(UserError, match=f"1 of the weights(.|\n)*{decoder_repo}"):
        preflight(config(*overrides, f"encoder.checkpoint={__file__}"))
    fake_cache(tmp_path / "hub", decoder_repo, REPO_FILES[decoder_repo])
    preflight(config(*overrides, f"encoder.checkpoint={__file__}"))  # a local file: nothing missing now


@pytest.mark.parametrize("family", list(SIZES))
def test_decoder_bytes_count_every_module_of_the_family(family: str) -> None:
    """What the GPU must hold for the decoder (dsl_cli.memory), counted on the meta device, equals the
    parameters of the built pipeline: the text and image encoders it loads included."""
    from dsl_cli.decoder import decoder_bytes

    pipe = tiny(family).pipe
    built = sum(p.numel() for m in pipe.components.values() if isinstance(m, torch.nn.Module) for p in m.parameters())
    assert decoder_bytes("tiny", torch.float32, family) == 4 * built
    text = sum(p.numel() for p in pipe.text_encoder.parameters())
    assert decoder_bytes("tiny", torch.float32, family) > 4 * (text + sum(p.numel() for p in pipe.unet.parameters()))


# The released architectures, with random weights: parameter counts as published (Kandinsky 2.1's model card:
# UNet 1.22 B, XLM-RoBERTa-large text encoder 560 M, MoVQ 67 M; Stable Diffusion 2.x: UNet 865.9 M, which
# unCLIP's class-embedding projection (2048 -> 1280 -> 1280, 4.26 M) joins, VAE 83.65 M, OpenCLIP ViT-H/14
# text tower 340 M and image tower 632 M).
REAL_COUNTS = {
    "kandinsky21": {"unet": 1.22e9, "text_encoder": 560e6, "movq": 67.8e6},
    "unclip_h14": {"unet": 865.9e6 + 4.26e6, "vae": 83.65e6, "text_encoder": 340e6, "image_encoder": 632e6},
}


@pytest.mark.parametrize("family", ["kandinsky22", *REAL_COUNTS])
def test_the_random_source_loads_the_real_architectures_with_the_published_sizes(family: str) -> None:
    """The released architectures, as `decoder.source=random` loads them, on PyTorch's meta device (shapes
    only: no memory, no weights, seconds), so that every run of the suite checks them; the slow test below
    decodes with them."""
    pipe = load_decoder(DecoderConfig(family=family, source="random"), device="meta").pipe
    counts = {"kandinsky22": {"unet": 1.253e9, "movq": 67.8e6}, **REAL_COUNTS}[family]  # 2.2: DESIGN.md section 2
    for part, count in counts.items():
        assert sum(p.numel() for p in getattr(pipe, part).parameters()) == pytest.approx(count, rel=1e-2), part
    if family == "unclip_h14":  # ViT-H/14's processor: shortest side to 224, centre crop 224 x 224
        assert pipe.feature_extractor.size == {"shortest_edge": 224}
        assert pipe.feature_extractor.crop_size == {"height": 224, "width": 224}


@pytest.mark.slow
@pytest.mark.parametrize("family", list(REAL_COUNTS))
def test_real_architecture_with_random_weights_builds_and_decodes(family: str) -> None:
    dec = load_decoder(DecoderConfig(family=family, source="random"), scheduler="ddim")
    for part, count in REAL_COUNTS[family].items():
        assert sum(p.numel() for p in getattr(dec.pipe, part).parameters()) == pytest.approx(count, rel=1e-2), part
    assert dec.embed_dim == dec.width == {"kandinsky21": 768, "unclip_h14": 1024}[family]
    embeds = torch.randn(1, dec.embed_dim, generator=torch.Generator().manual_seed(0))
    image = dec.decode(embeds, torch.zeros(1, dec.embed_dim), 0, height=64, width=64, steps=1, guidance=4.0,
                       progress=False)
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()


def test_the_hub_files_of_each_family_are_those_diffusers_saves() -> None:
    """What `dsl weights` fetches: the pipeline's index, and each model's config and weights by the names
    diffusers saves them under (`diffusion_pytorch_model.safetensors`)."""
    files = {name for group in FAMILIES["kandinsky22"].hub_files for name in group}
    assert {"model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
            "movq/config.json", "movq/diffusion_pytorch_model.safetensors"} <= files


def test_stable_unclip_is_asked_with_the_empty_prompt_and_no_added_noise_by_default() -> None:
    """What the unCLIP pipeline is given besides the embeddings: the empty prompt per picture (the tiny
    tokenizer has no vocabulary, so the pictures cannot show it) and, for a pipeline wrapped in Python,
    noise level 0; its processor resizes and crops to the image tower's size."""
    from dsl_cli.decoder import UnclipDecoder

    dec = load_decoder(DecoderConfig(family="unclip_h14", source="tiny"), scheduler="ddim")
    embeds, negative = _inputs(2)
    inputs = dec._inputs(embeds, negative)
    assert inputs["prompt"] == ["", ""] and inputs["noise_level"] == 0 and inputs["image_embeds"] is embeds
    assert UnclipDecoder(dec.pipe).noise_level == 0
    side = dec.pipe.image_encoder.config.image_size
    assert dec.pipe.feature_extractor.crop_size == {"height": side, "width": side}
    assert dec.pipe.feature_extractor.size == {"shortest_edge": side}
