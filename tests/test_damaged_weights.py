"""Damaged or mismatched weights and configs: each is one line (a UserError naming the file), never a
traceback, never weights left random, and refused as early as the file allows (before any model loads where
its config tells). Tiny models, fixed seeds, no downloads; the loaders are called directly where that tests
the same thing as a run."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from dsl_cli.config import DecoderConfig
from dsl_cli.decoder import KandinskyDecoder, check_pairing, get_family
from dsl_cli.encoder import embedding_space, load_encoder, loading, vit_loading
from dsl_cli.errors import UserError
from helpers import perturb_


def one_line(err: pytest.ExceptionInfo, *needles: str) -> str:
    """The refusal's message, checked to be one line naming each of `needles`."""
    message = str(err.value)
    assert "\n" not in message and "\\n" not in message, message
    for needle in needles:
        assert needle in message, message
    return message


def edit_json(file: Path, edit) -> None:
    file.write_text(json.dumps(edit(json.loads(file.read_text()))))


def drop_tensors(file: Path, *names: str) -> None:
    tensors = load_file(file)
    save_file({k: v for k, v in tensors.items() if k not in names}, file)


def copy_folder(source: Path, target: Path) -> Path:
    import shutil

    return Path(shutil.copytree(source, target))


# ------------------------------------------------------------------ the text tower follows the encoder


def compose(*overrides: str):
    from test_weights import config

    return config(*overrides).encoder


def test_an_open_clip_encoder_over_the_default_preset_gets_its_own_text_tower() -> None:
    assert loading.text_model_id(compose("encoder.source=open_clip", "encoder.name=ViT-B-16",
                                         "encoder.pretrained=openai")) == ("ViT-B-16", "openai")
    assert loading.text_model_id(compose()) == loading.PRIOR_TEXT_MODEL  # the default run: bigG's
    assert loading.text_model_id(compose("encoder.source=open_clip", "encoder.name=ViT-B-16",
                                         "encoder.pretrained=openai", "encoder.text_name=ViT-L-14")) == (
        "ViT-L-14", "openai")


# ------------------------------------------------------------------ a local prior folder (encoder.checkpoint)


def save_prior(folder: Path, projection_dim: int = 32) -> Path:
    import transformers

    torch.manual_seed(0)
    config = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=2, image_size=32, patch_size=16,
                                           projection_dim=projection_dim, hidden_act="gelu")
    perturb_(transformers.CLIPVisionModelWithProjection(config)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def prior(tmp_path_factory) -> Path:
    return save_prior(tmp_path_factory.mktemp("prior") / "image_encoder")


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> Path:
    """diffusers' dummy Kandinsky 2.2 pipeline (32-wide embeddings), saved as decoder.path takes it."""
    folder = tmp_path_factory.mktemp("decoder") / "kandinsky22"
    KandinskyDecoder.build(False, "cpu").save_pretrained(folder)
    return folder


def prior_cfg(folder: Path):
    return SimpleNamespace(source="kandinsky_prior", name="ViT-bigG-14", pretrained=None, checkpoint=str(folder),
                           repo_id="kandinsky-community/kandinsky-2-2-prior", subfolder="image_encoder")


@pytest.mark.parametrize("content", [[1], "config", None, "image_size-as-text"])
def test_a_prior_config_of_the_wrong_shape_is_one_line(content, prior: Path, tmp_path: Path) -> None:
    folder = copy_folder(prior, tmp_path / "prior")
    if content == "image_size-as-text":
        edit_json(folder / "config.json", lambda config: {**config, "image_size": "64"})
    else:
        (folder / "config.json").write_text(json.dumps(content))
    with pytest.raises(UserError) as refused:
        load_encoder(prior_cfg(folder))
    one_line(refused, str(folder / "config.json"))
    with pytest.raises(UserError):  # and before any model loads: the layer check reads the same file
        loading.model_shape(prior_cfg(folder))


def test_a_prior_config_of_more_layers_than_its_weights_names_the_missing_tensor(prior: Path, tmp_path: Path) -> None:
    """It was a bare `KeyError: 'vision_model.encoder.layers.2...'`."""
    folder = copy_folder(prior, tmp_path / "prior")
    edit_json(folder / "config.json", lambda config: {**config, "num_hidden_layers": 3})
    with pytest.raises(UserError) as refused:
        load_encoder(prior_cfg(folder))
    one_line(refused, "they lack vision_model.encoder.layers.2.", "the config and the weights are not of one model")


def test_a_prior_of_another_width_is_refused_by_the_pairing_check(pipeline: Path, tmp_path: Path) -> None:
    """Judged by its config.json's projection_dim, not by encoder.name (which says bigG, 1280 wide)."""
    decoder = DecoderConfig(path=str(pipeline))
    check_pairing(embedding_space(prior_cfg(save_prior(tmp_path / "same"))), decoder)  # 32 = 32: fits
    with pytest.raises(UserError) as refused:
        check_pairing(embedding_space(prior_cfg(save_prior(tmp_path / "wide", projection_dim=48))), decoder)
    one_line(refused, "48-wide", "32-wide", str(tmp_path / "wide"))


# ------------------------------------------------------------------ a decoder folder (decoder.path)


def damage_decoder(folder: Path, damage: str) -> None:
    index, unet = folder / "model_index.json", folder / "unet"
    if damage == "unet lacks conv_in":
        drop_tensors(unet / "diffusion_pytorch_model.safetensors", "conv_in.weight")
    elif damage == "unet config of other sizes":
        edit_json(unet / "config.json", lambda config: {**config, "layers_per_block": 2})
    elif damage == "index is a list":
        index.write_text("[]")
    elif damage == "index lists the unet alone":
        edit_json(index, lambda saved: {k: v for k, v in saved.items() if k.startswith("_") or k == "unet"})
    elif damage == "index names another pipeline":
        edit_json(index, lambda saved: {**saved, "_class_name": "StableDiffusionPipeline"})
    elif damage == "another family's pipeline":
        edit_json(index, lambda saved: {**saved, "_class_name": "KandinskyPipeline"})


DECODER_DAMAGE = {  # damage -> what the one line says
    "unet lacks conv_in": "conv_in.weight",
    "unet config of other sizes": "unet",
    "index is a list": "model_index.json",
    "index lists the unet alone": "lists no scheduler, movq",
    "index names another pipeline": "StableDiffusionPipeline",
    "another family's pipeline": "use decoder=kandinsky21",
}


@pytest.mark.parametrize("damage", DECODER_DAMAGE)
def test_a_damaged_decoder_folder_is_one_line(damage: str, pipeline: Path, tmp_path: Path) -> None:
    folder = copy_folder(pipeline, tmp_path / "decoder")
    damage_decoder(folder, damage)
    cfg = DecoderConfig(path=str(folder))
    with pytest.raises(UserError) as refused:
        KandinskyDecoder.load_pretrained(cfg, torch.float32)
    message = one_line(refused, DECODER_DAMAGE[damage], str(folder))
    assert "hf download" not in message  # a local folder is saved again, not downloaded
    if damage.startswith("index") or damage.startswith("another"):  # told by the preflight, before loading
        assert DECODER_DAMAGE[damage] in " ".join(KandinskyDecoder.needs(cfg)[1])


def test_a_damaged_cached_decoder_is_fetched_again_with_force_download(pipeline: Path, tmp_path: Path,
                                                                      monkeypatch) -> None:
    folder = copy_folder(pipeline, tmp_path / "snapshot")
    (folder / "movq" / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    from dsl_cli import decoder

    monkeypatch.setattr(decoder, "_index_file", lambda path, repo: folder / "model_index.json")
    real = get_family("kandinsky22")
    cfg = DecoderConfig(repo_id="kandinsky-community/kandinsky-2-2-decoder")
    original = real._load_model.__func__

    def from_folder(cls, where, name, entry, dtype, cfg):  # the hub's files, as the cache holds them
        return original(cls, str(folder), name, entry, dtype, cfg)

    monkeypatch.setattr(real, "_load_model", classmethod(from_folder))
    with pytest.raises(UserError) as refused:
        real.load_pretrained(cfg, torch.float32)
    one_line(refused, "movq", "--force-download")


# ------------------------------------------------------------------ transformers, timm and open_clip files


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory) -> Path:
    """A tiny random DINOv2 with its image processor, as save_pretrained writes them."""
    import transformers

    folder = tmp_path_factory.mktemp("hf") / "dinov2"
    config = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                                       patch_size=16)
    torch.manual_seed(0)
    transformers.Dinov2Model(config).save_pretrained(folder)
    transformers.BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
                                   ).save_pretrained(folder)
    return folder


def damage_hf(folder: Path, damage: str) -> None:
    weights = folder / "model.safetensors"
    if damage == "a tensor missing":
        drop_tensors(weights, "encoder.layer.1.mlp.fc1.weight")
    elif damage == "config is a list":
        (folder / "config.json").write_text("[1]")
    elif damage == "zero-byte weights":
        weights.write_bytes(b"")
    elif damage == "hidden_size changed":
        edit_json(folder / "config.json", lambda config: {**config, "hidden_size": 48})


HF_DAMAGE = {"a tensor missing": "encoder.layer.1.mlp.fc1.weight", "config is a list": "cannot load",
             "zero-byte weights": "cannot load", "hidden_size changed": "lack"}


@pytest.mark.parametrize("damage", HF_DAMAGE)
def test_a_damaged_transformers_folder_is_one_line(damage: str, hf_folder: Path, tmp_path: Path) -> None:
    folder = copy_folder(hf_folder, tmp_path / "hf")
    damage_hf(folder, damage)
    cfg = SimpleNamespace(source="hf", name="hf", pretrained="hub", checkpoint=str(folder), repo_id="x/y",
                          subfolder="")
    with pytest.raises(UserError) as refused:
        vit_loading.load_vit(cfg)
    one_line(refused, HF_DAMAGE[damage], str(folder))


def save_hf_clip(folder: Path, whole: bool = False) -> Path:
    """A tiny random CLIP of 2 vision layers (with a text tower of 3 where `whole`) and its processor."""
    import transformers

    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                  patch_size=16, projection_dim=16)
    torch.manual_seed(0)
    if whole:
        text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                    projection_dim=16)
        transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=vision,
                                                       projection_dim=16)).save_pretrained(folder)
    else:
        transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**vision)).save_pretrained(folder)
    transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
                                    ).save_pretrained(folder)
    return folder


def test_a_transformers_config_of_fewer_layers_than_its_weights_is_refused(tmp_path: Path) -> None:
    """transformers drops the tensors of blocks a config.json does not build and only logs it: a CLIP of 2
    layers whose config says 1 ran as a 1-layer model. A whole CLIP's text tower (3 layers) is not the vision
    model's and loads as before."""
    folder = save_hf_clip(tmp_path / "clip")
    edit_json(folder / "config.json", lambda config: {**config, "num_hidden_layers": 1})
    cfg = SimpleNamespace(source="hf", name="hf", pretrained="hub", checkpoint=str(folder), repo_id="x/y",
                          subfolder="")
    with pytest.raises(UserError) as refused:
        vit_loading.load_vit(cfg)
    one_line(refused, "blocks past the 1 layer that config.json says", "vision_model.encoder.layers.1.",
             str(folder))
    whole = save_hf_clip(tmp_path / "whole", whole=True)
    model, _ = vit_loading.load_vit(SimpleNamespace(**{**vars(cfg), "checkpoint": str(whole)}))
    assert len(model.vision_model.encoder.layers) == 2


def test_a_transformers_run_prints_none_of_the_librarys_bars_or_reports(tmp_path: Path) -> None:
    """A fresh process, as a user's (transformers imported by the hf loader itself, not beforehand): its
    "Loading weights" bar and its load report (a whole CLIP's text tower is 'UNEXPECTED' in its vision model)
    reached the terminal; they go to the run's dsl.log."""
    import os
    import subprocess
    import sys

    whole = save_hf_clip(tmp_path / "whole", whole=True)
    done = subprocess.run([sys.executable, "-m", "dsl_cli.cli", "run", "encoder=hf", f"encoder.checkpoint={whole}",
                           "lens=diffusion", "layer=all", "decode.enabled=false", "images.limit=1",
                           f"hydra.run.dir={tmp_path / 'run'}"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Loading weights" not in done.stderr and "LOAD REPORT" not in done.stderr, done.stderr
    assert "LOAD REPORT" in (tmp_path / "run" / "dsl.log").read_text()


def test_a_cached_transformers_repository_of_bin_weights_is_found(tmp_path: Path, monkeypatch) -> None:
    """An older repository holds pytorch_model.bin, not model.safetensors: it was called missing, with a
    command that cannot fetch a file the repository does not have."""
    from huggingface_hub import constants

    from helpers import fake_cache

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    cfg = SimpleNamespace(source="hf", name="hf", pretrained="hub", checkpoint=None, repo_id="my/vitbin",
                          subfolder="")
    (weights,), problems = vit_loading.needs(cfg)
    assert not problems and not weights.cached()
    fake_cache(tmp_path / "hub", "my/vitbin", ["config.json", "preprocessor_config.json", "pytorch_model.bin"])
    assert weights.cached()


@pytest.mark.parametrize("content", ["zero-byte", "truncated", "a list"])
def test_a_damaged_timm_file_is_one_line(content: str, tmp_path: Path) -> None:
    if content == "a list":
        file = tmp_path / "weights.pth"
        torch.save([1, 2], file)
    else:
        file = tmp_path / "weights.safetensors"
        save_file({"cls_token": torch.zeros(1, 1, 192)}, file)
        file.write_bytes(b"" if content == "zero-byte" else file.read_bytes()[:-100])
    cfg = SimpleNamespace(source="timm", name="vit_tiny_patch16_224", pretrained="hub", checkpoint=str(file))
    with pytest.raises(UserError) as refused:
        vit_loading.load_vit(cfg)
    one_line(refused, str(file), "encoder.checkpoint")


@pytest.mark.parametrize("content", ["a link to a text file", "a list", "zero-byte"])
def test_an_unreadable_open_clip_file_is_final(content: str, tmp_path: Path, monkeypatch) -> None:
    """Our reader's error wins, and open_clip's loader (which builds the whole CLIP first) is never tried."""
    file = tmp_path / "weights.bin"
    if content == "a list":
        torch.save([1, 2, 3], file)
    elif content == "zero-byte":
        file.write_bytes(b"")
    else:
        (tmp_path / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
        file.symlink_to(tmp_path / "passwd")

    def never(*args, **kwargs):
        raise AssertionError("open_clip's loader was tried on an unreadable file")

    monkeypatch.setattr(loading.open_clip, "create_model", never)
    with pytest.raises(UserError) as refused:
        loading._load_open_clip_visual("ViT-S-32", None, str(file), "cpu")
    one_line(refused, str(file))


# ------------------------------------------------------------------ adapters and SAEs


def save_adapter(folder: Path, damage: str) -> Path:
    from safetensors.torch import save

    torch.manual_seed(0)
    q, p = 32, 16
    meta: object = {"readout": {"kind": "embed", "layer": None},
                    "target": {"family": "kandinsky22", "space": {"model": "tiny", "weights": None, "width": q}}}
    tensors = {"W": torch.randn(q, p), "b": torch.randn(q), "negative": torch.randn(q)}
    if damage == "metadata a list":
        meta = [1]
    elif damage == "metadata a string":
        meta = "adapter"
    elif damage == "readout a string":
        meta["readout"] = "embed"
    elif damage == "width not a number":
        meta["target"]["space"]["width"] = "abc"
    elif damage == "W 1-D":
        tensors["W"] = torch.randn(q)
    elif damage == "W of another width":
        tensors.update(W=torch.randn(48, p), b=torch.randn(48), negative=torch.randn(48))
    elif damage == "negative of length 7":
        tensors["negative"] = torch.randn(7)
    folder.mkdir()
    (folder / "adapter.safetensors").write_bytes(save(tensors, metadata={"dsl_adapter": json.dumps(meta)}))
    return folder


@pytest.mark.parametrize("damage", ["metadata a list", "metadata a string", "readout a string", "width not a number",
                                    "W 1-D", "W of another width", "negative of length 7"])
def test_a_hand_edited_adapter_is_one_line(damage: str, tmp_path: Path) -> None:
    from dsl_cli.adapters import Adapter

    Adapter.load(save_adapter(tmp_path / "good", "none"))  # the undamaged file loads
    with pytest.raises(UserError) as refused:
        Adapter.load(save_adapter(tmp_path / "adapter", damage))
    one_line(refused, str(tmp_path / "adapter" / "adapter.safetensors"))


@pytest.mark.parametrize("field", [{"k": [6]}, {"d_in": None}, {"k": 6.5}])
def test_an_sae_cfg_of_the_wrong_type_is_one_line(field: dict) -> None:
    from dsl_cli.sae import sae_from

    torch.manual_seed(0)
    tensors = {"W_enc": torch.randn(8, 16), "b_enc": torch.zeros(16), "W_dec": torch.randn(16, 8),
               "b_dec": torch.zeros(8)}
    cfg = {"hook_name": "blocks.1.hook_resid_post", "architecture": "topk", "k": 4, "d_in": 8, **field}
    sae_from(tensors, {**cfg, "k": 4, "d_in": 8}, "good")  # the same SAE with whole numbers loads
    with pytest.raises(UserError) as refused:
        sae_from(tensors, cfg, "sae")
    one_line(refused, "SAE sae", next(iter(field)))


def test_a_vit_without_a_decoder_points_to_adapters() -> None:
    cfg = SimpleNamespace(source="timm", name="tiny")
    assert "dsl adapter fit" in str(vit_loading.no_decoder(cfg))


def test_a_long_library_message_is_cut_at_a_word_and_says_so() -> None:
    """A library's message was cut at 200 characters mid-word ('... torch.Size([96]). si)')."""
    from dsl_cli.weights import reason

    text = reason(RuntimeError("size mismatch for visual.proj: copying a param with shape torch.Size([64]) " * 4))
    assert text.endswith("torch.Size([64]) ...") or text.endswith(" ..."), text
    assert len(text) <= len("RuntimeError: ") + 204 and not text.removesuffix(" ...").endswith(("si", "cop")), text
    assert reason(ValueError("short")) == "ValueError: short"
