"""Every pretrained path equals its upstream library's own.

Encoders and text towers: for each preset (bigg14, vitl14, vith14, kandinsky_prior), a random checkpoint saved in
the upstream file layout is served in place of the download (only the library's download function is replaced:
open_clip's `hf_hub_download`, huggingface_hub's `snapshot_download`), and dsl's tower must equal the upstream
library's own model built for that tag from the same file, on the sample photos and on random images. The real
architectures are shrunk (2 layers, two heads' width; the embedding width, patch, image size, MLP ratio and
activation kept) by changing open_clip's own model config, which both sides read.

Decoders: the upstream configs of every supported repository (tests/fixtures/upstream, each file saying where its
values come from) build the real architectures on the meta device: the parameter counts DESIGN.md gives, and the
shapes dsl's own `random` builds have. And every `hf download` line of README.md and of dsl's messages does what
it says with the installed `hf`.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import open_clip.factory
import open_clip.pretrained
import pytest
import torch
from PIL import Image

from dsl_cli.check import compose, sample_photos
from dsl_cli.encoder import load_encoder, load_text_model
from helpers import docs_text, perturb_

FIXTURES = Path(__file__).parent / "fixtures" / "upstream"
ROOT = Path(__file__).parent.parent
PROMPTS = ["a photo of a dog.", "an astronaut riding a horse", "", "a red cup of coffee"]
PRESETS = ["bigg14", "vitl14", "vith14"]


def relative(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return float(((ours - theirs).norm(dim=-1) / theirs.norm(dim=-1)).max())


def upstream_file(name: str) -> dict:
    """A fixture config, without its `_source` note (and `_class_name`, which diffusers reads itself)."""
    data = json.loads((FIXTURES / name).read_text())
    assert data.pop("_source")["values"], name  # every file says where its values come from
    return data


# ---------------------------------------------------------------- open_clip towers, served files


def shrunk(name: str) -> dict:
    """open_clip's own config of `name` with 2 vision layers of two heads' width and a 1-layer, 2-head text
    tower; the embedding width, patch, image size, MLP ratio, vocabulary and context kept."""
    cfg = open_clip.get_model_config(name)
    vision, text = cfg["vision_cfg"], cfg["text_cfg"]
    vision.update(layers=2, width=2 * vision.get("head_width", 64))
    text.update(layers=1, width=2 * (text["width"] // text["heads"]), heads=2)
    return cfg


@pytest.fixture
def served(monkeypatch, tmp_path):
    """Files served in place of open_clip's downloads: {(repo, filename): path}; the shrunk configs in place."""
    files: dict[tuple[str, str], Path] = {}

    def hf_hub_download(repo_id, filename, revision=None, cache_dir=None, **kwargs):
        if (repo_id, filename) not in files:
            raise OSError(f"not served: {repo_id}/{filename}")
        return str(files[(repo_id, filename)])

    monkeypatch.setattr(open_clip.pretrained, "hf_hub_download", hf_hub_download)
    for name in ("ViT-bigG-14", "ViT-L-14", "ViT-H-14"):
        monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, name, shrunk(name))
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return files


def serve_open_clip(files: dict, folder: Path, name: str, tag: str, seed: int = 0) -> Path:
    """A random CLIP of `name` saved as open_clip's hub file of `tag` (open_clip_pytorch_model.bin: the whole
    CLIP's state dict, torch.save), served where open_clip's download looks for it."""
    repo, filename = os.path.split(open_clip.get_pretrained_cfg(name, tag)["hf_hub"])
    torch.manual_seed(seed)
    model = perturb_(open_clip.create_model(name), seed=seed)
    path = folder / f"{name}-{tag}" / (filename or "open_clip_pytorch_model.bin")
    path.parent.mkdir(parents=True)
    torch.save(model.state_dict(), path)
    files[(repo, filename or "open_clip_pytorch_model.bin")] = path
    return path


def upstream(name: str, weights: str, tag: str):
    """open_clip's own CLIP and transform for these weights, with the tag's activation."""
    quick = bool(open_clip.get_pretrained_cfg(name, tag).get("quick_gelu", False))
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=weights, force_quick_gelu=quick)
    return model.eval(), preprocess


def random_photos(n: int = 2) -> list[Image.Image]:
    g = np.random.default_rng(7)
    return [Image.fromarray(g.integers(0, 256, (180 + 60 * i, 260, 3), dtype=np.uint8)) for i in range(n)]


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    return sample_photos() + random_photos()


def assert_same_encoder(encoder, preprocess, reference, reference_preprocess, photos) -> None:
    ours = torch.stack([preprocess(p) for p in photos])
    theirs = torch.stack([reference_preprocess(p) for p in photos])
    assert torch.equal(ours, theirs), "the pixels after preprocessing differ"
    noise = torch.randn(2, *ours.shape[1:], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for pixels in (ours, noise):
            assert relative(encoder.embed(pixels), reference.encode_image(pixels)) < 1e-5
        assert relative(encoder.zero_embed(), reference.encode_image(torch.zeros_like(ours[:1]))) < 1e-5


@pytest.mark.parametrize("preset", PRESETS)
def test_each_open_clip_encoder_is_open_clips_own_for_its_tag(preset, served, tmp_path, photos) -> None:
    cfg = compose([f"encoder={preset}"]).encoder
    serve_open_clip(served, tmp_path, cfg.name, cfg.pretrained)
    encoder, preprocess = load_encoder(cfg)
    reference, reference_preprocess = upstream(cfg.name, cfg.pretrained, cfg.pretrained)
    assert_same_encoder(encoder, preprocess, reference, reference_preprocess, photos)


@pytest.mark.parametrize("preset", ["kandinsky_prior", *PRESETS])
def test_each_text_tower_is_open_clips_own_for_its_tag(preset, served, tmp_path) -> None:
    from dsl_cli.encoder import text_model_id

    cfg = compose([f"encoder={preset}"]).encoder
    name, tag = text_model_id(cfg)
    serve_open_clip(served, tmp_path, name, tag)
    tower, tokenizer = load_text_model(cfg)
    reference, _ = upstream(name, tag, tag)
    tokens = tokenizer(PROMPTS)
    with torch.no_grad():
        assert relative(tower.encode_text(tokens), reference.encode_text(tokens)) < 1e-5


def test_vitl14_from_a_local_file_keeps_the_tags_settings(served, tmp_path, photos) -> None:
    """encoder=vitl14 encoder.checkpoint=FILE: `encoder.pretrained: openai` says what the file holds, so the
    tower is built with the tag's QuickGELU and preprocessing (open_clip's own loader, given a file, applies
    neither), for the image and the text tower alike."""
    file = serve_open_clip(served, tmp_path, "ViT-L-14", "openai")
    served.clear()  # nothing is downloaded: the file is named
    cfg = compose(["encoder=vitl14", f"encoder.checkpoint={file}", f"encoder.text_pretrained={file}"]).encoder
    encoder, preprocess = load_encoder(cfg)
    reference, reference_preprocess = upstream("ViT-L-14", str(file), "openai")
    assert_same_encoder(encoder, preprocess, reference, reference_preprocess, photos)
    tower, tokenizer = load_text_model(cfg)
    with torch.no_grad():
        assert relative(tower.encode_text(tokenizer(PROMPTS)), reference.encode_text(tokenizer(PROMPTS))) < 1e-5


def test_vitl14_is_built_with_the_openai_tags_quick_gelu(served, tmp_path) -> None:
    """OpenAI's CLIP uses QuickGELU; open_clip's plain ViT-L-14 config does not say so, its `openai` tag does."""
    from open_clip.transformer import QuickGELU

    assert open_clip.get_pretrained_cfg("ViT-L-14", "openai")["quick_gelu"] is True
    assert not open_clip.get_model_config("ViT-L-14").get("quick_gelu", False)
    serve_open_clip(served, tmp_path, "ViT-L-14", "openai")
    encoder, _ = load_encoder(compose(["encoder=vitl14"]).encoder)
    assert all(isinstance(block.mlp.gelu, QuickGELU) for block in encoder.visual.transformer.resblocks)
    tower, _ = load_text_model(compose(["encoder=vitl14"]).encoder)
    assert all(isinstance(block.mlp.gelu, QuickGELU) for block in tower.text.transformer.resblocks)


def test_the_prior_encoder_is_transformers_own(tmp_path, monkeypatch, photos) -> None:
    """encoder=kandinsky_prior: a random CLIPVisionModelWithProjection with the prior's config (shrunk), saved
    with save_pretrained where the hub snapshot would be, equals transformers' own model with the prior's
    CLIPImageProcessor (its preprocessor_config.json; transformers' PIL one, as in test_preprocess.py)."""
    import huggingface_hub
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from dsl_cli.check import pil_clip_image_processor

    config = upstream_file("kandinsky-2-2-prior/image_encoder/config.json")
    config.update(num_hidden_layers=2, hidden_size=208, num_attention_heads=2, intermediate_size=1024)
    torch.manual_seed(0)
    model = perturb_(CLIPVisionModelWithProjection(CLIPVisionConfig(**config))).eval()
    snapshot = tmp_path / "snapshot"
    model.save_pretrained(snapshot / "image_encoder")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo, allow_patterns: str(snapshot))
    encoder, preprocess = load_encoder(compose(["encoder=kandinsky_prior"]).encoder)
    reference = CLIPVisionModelWithProjection.from_pretrained(snapshot / "image_encoder").eval()
    processor = pil_clip_image_processor()(**upstream_file("kandinsky-2-2-prior/image_processor/preprocessor_config.json"))
    ours = torch.stack([preprocess(p) for p in photos])
    theirs = processor(images=photos, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)
    with torch.no_grad():
        for pixels in (ours, torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))):
            assert relative(encoder.embed(pixels), reference(pixel_values=pixels).image_embeds) < 1e-5
        zero = torch.zeros(1, 3, 224, 224)  # the priors' get_zero_embed
        assert relative(encoder.zero_embed(), reference(pixel_values=zero).image_embeds) < 1e-5


# ---------------------------------------------------------------- decoders: upstream configs, meta device


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def shapes(module: torch.nn.Module) -> dict[str, tuple]:
    return {name: tuple(t.shape) for name, t in module.state_dict().items()}


def build_meta(cls, config: dict):
    with torch.device("meta"):
        return cls.from_config(config) if hasattr(cls, "from_config") else cls(config)


def test_the_kandinsky_22_architectures_have_designs_sizes() -> None:
    from diffusers import UNet2DConditionModel, VQModel

    unet = build_meta(UNet2DConditionModel, upstream_file("kandinsky-2-2-decoder/unet/config.json"))
    movq = build_meta(VQModel, upstream_file("kandinsky-2-2-decoder/movq/config.json"))
    assert round(count(unet) / 1e9, 3) == 1.253 and round(count(movq) / 1e6, 1) == 67.8
    assert movq.config.norm_num_groups == 32 and movq.config.act_fn == "silu"
    assert 2 ** (len(movq.config.block_out_channels) - 1) == 8  # the MoVQ's scale factor


def test_the_prior_encoder_is_bigg_of_1845m_parameters_and_maps_onto_open_clip() -> None:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from dsl_cli.encoder.loading import vision_transformer_from_hf_config

    config = upstream_file("kandinsky-2-2-prior/image_encoder/config.json")
    hf = build_meta(CLIPVisionModelWithProjection, CLIPVisionConfig(**config))
    with torch.device("meta"):
        ours = vision_transformer_from_hf_config(config)
        theirs = open_clip.CLIP(**open_clip.get_model_config("ViT-bigG-14")).visual  # open_clip's own bigG
    assert round(count(hf) / 1e9, 3) == round(count(ours) / 1e9, 3) == 1.845
    assert count(ours) == count(theirs) == count(hf) and shapes(ours) == shapes(theirs)
    assert isinstance(ours.transformer.resblocks[0].mlp.gelu, torch.nn.GELU)  # hidden_act gelu: exact


FAMILY_FIXTURES = {
    "kandinsky22": ("kandinsky-2-2-decoder", {"unet": "UNet2DConditionModel", "movq": "VQModel"}),
    "kandinsky21": ("kandinsky-2-1", {"unet": "UNet2DConditionModel", "movq": "VQModel",
                                      "text_encoder": "MultilingualCLIP"}),
    "unclip_h14": ("stable-diffusion-2-1-unclip", {
        "unet": "UNet2DConditionModel", "vae": "AutoencoderKL", "text_encoder": "CLIPTextModel",
        "image_encoder": "CLIPVisionModelWithProjection", "image_normalizer": "StableUnCLIPImageNormalizer"}),
}


def _upstream_component(folder: str, component: str, cls_name: str):
    import diffusers
    import transformers
    from diffusers.pipelines.kandinsky.text_encoder import MCLIPConfig, MultilingualCLIP
    from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import StableUnCLIPImageNormalizer

    config = upstream_file(f"{folder}/{component}/config.json")
    if cls_name == "MultilingualCLIP":
        return build_meta(MultilingualCLIP, MCLIPConfig(**config))
    if cls_name == "StableUnCLIPImageNormalizer":
        return build_meta(StableUnCLIPImageNormalizer, config)
    if hasattr(diffusers, cls_name):
        return build_meta(getattr(diffusers, cls_name), config)
    cls = getattr(transformers, cls_name)
    return build_meta(cls, cls.config_class(**config))


@pytest.mark.parametrize("family", list(FAMILY_FIXTURES))
def test_dsls_random_decoders_have_the_upstream_architectures(family: str) -> None:
    """decoder=<family>_random builds every component with the upstream repository's architecture: the same
    tensors of the same shapes as the component built from the repository's config, and its schedulers'
    configs."""
    from dsl_cli.decoder import get_family

    folder, components = FAMILY_FIXTURES[family]
    pipe = get_family(family).build(True, "meta")
    for component, cls_name in components.items():
        theirs = _upstream_component(folder, component, cls_name)
        ours = getattr(pipe, component)
        assert type(ours).__name__ == cls_name
        assert shapes(ours) == shapes(theirs), f"{family} {component}"
    schedulers = {"scheduler": "scheduler"} | ({"image_noising_scheduler": "image_noising_scheduler"}
                                                if family == "unclip_h14" else {})
    for attribute, fixture in schedulers.items():
        config = json.loads((FIXTURES / folder / fixture / "scheduler_config.json").read_text())
        ours = getattr(pipe, attribute)
        assert type(ours).__name__ == config["_class_name"], f"{family} {attribute}"
        theirs = type(ours).from_config({k: v for k, v in config.items() if k != "_source"})
        public = lambda scheduler: {k: v for k, v in scheduler.config.items() if not k.startswith("_")}  # noqa: E731
        assert public(ours) == public(theirs), f"{family} {attribute}"


# ---------------------------------------------------------------- hf download lines


def readme_commands() -> list[str]:
    text = docs_text()  # the README and its guides
    lines = [line.split("#")[0].strip() for line in text.splitlines()]
    return [line for line in lines if line.startswith("hf download ")]


def message_commands() -> list[str]:
    """The `hf download` lines dsl's messages give: every family's decoder, the prior's image encoder and the
    open_clip weights of every preset's encoder and text tower."""
    from dsl_cli.decoder import FAMILIES
    from dsl_cli.encoder import text_model_id
    from dsl_cli.weights import hub_download_command, prior_encoder_weights

    commands = []
    for family in FAMILIES.values():
        repo = compose([f"decoder={family.name}"]).decoder.repo_id
        hub = family.hub_weights(repo) if hasattr(family, "hub_weights") else None
        if hub is None:
            from dsl_cli.weights import decoder_weights

            hub = decoder_weights(repo, family.name)
        commands.append(hub.command)
    commands.append(prior_encoder_weights("kandinsky-community/kandinsky-2-2-prior", "image_encoder").command)
    for preset in PRESETS:
        cfg = compose([f"encoder={preset}"]).encoder
        commands += [hub_download_command(cfg.name, cfg.pretrained), hub_download_command(*text_model_id(cfg))]
    return sorted(set(commands))


def hf_parse(command: str) -> dict:
    """What the installed `hf download` makes of a command line (its own click parser)."""
    import click
    from huggingface_hub.cli.hf import app

    args = shlex.split(command)
    assert args[:2] == ["hf", "download"], command
    download = app.get_command(click.Context(app), "download")
    download = download.materialize() if hasattr(download, "materialize") else download
    return download.make_context("download", args[2:]).params


GLOB = re.compile(r"[*?\[]")


def test_every_hf_download_line_is_collected() -> None:
    readme, messages = readme_commands(), message_commands()
    assert len(readme) >= 7 and len(messages) >= 6
    assert any("stable-diffusion-2-1-unclip" in c for c in readme) and any("unclip" in c for c in messages)


@pytest.mark.parametrize("source", ["README.md", "messages"])
def test_every_hf_download_line_names_files_not_globs(source: str) -> None:
    for command in readme_commands() if source == "README.md" else message_commands():
        params = hf_parse(command)
        assert not [name for name in params["filenames"] or [] if GLOB.search(name)], command
        assert not (params["filenames"] and params["exclude"]), f"hf ignores --exclude beside files: {command}"
        for pattern in params["exclude"] or []:
            assert " " not in pattern, command


def test_every_hf_download_line_runs_dry_offline_without_ignoring_anything(tmp_path: Path) -> None:
    """Each line, with --dry-run, against an empty cache, offline: hf understands it (no usage error, no
    'Ignoring' warning); it stops only because it may not reach the hub."""
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    for command in sorted(set(readme_commands() + message_commands())):
        result = subprocess.run([*shlex.split(command), "--dry-run"], env=env, capture_output=True, text=True,
                                timeout=120)
        output = result.stdout + result.stderr
        assert "Ignoring" not in output and "No such option" not in output and "Usage:" not in output, (command, output)
        assert "offline" in output.lower(), (command, output[-500:])
    assert not [p for p in (tmp_path / "hf").rglob("*") if p.is_file() and p.suffix in (".bin", ".safetensors")]


@pytest.mark.parametrize("family", ["kandinsky21", "unclip_h14"])
def test_the_hub_files_of_transformers_towers_are_the_names_transformers_reads(family: str, tmp_path: Path) -> None:
    """A pipeline's transformers tower (text_encoder, image_encoder) is saved as model.safetensors, or, in older
    repositories, pytorch_model.bin: what transformers' own save_pretrained writes and from_pretrained reads."""
    from safetensors.torch import load_file
    from transformers import CLIPTextConfig, CLIPTextModel

    from dsl_cli.decoder import get_family

    config = CLIPTextConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                            vocab_size=50, max_position_embeddings=8, projection_dim=8)
    model = CLIPTextModel(config)
    model.save_pretrained(tmp_path / "safe")
    saved = sorted(p.name for p in (tmp_path / "safe").iterdir() if p.suffix in (".safetensors", ".bin"))
    (tmp_path / "bin").mkdir()
    config.save_pretrained(tmp_path / "bin")
    torch.save(load_file(tmp_path / "safe" / saved[0]), tmp_path / "bin" / "pytorch_model.bin")
    CLIPTextModel.from_pretrained(tmp_path / "bin", use_safetensors=False)  # the name transformers reads
    towers = [names for names in get_family(family).hub_files if names[0].split("/")[-1] == saved[0]]
    assert towers and all(len(names) == 2 and names[1] == names[0].replace(saved[0], "pytorch_model.bin")
                          for names in towers), towers


def test_a_file_open_clip_must_convert_keeps_the_tags_quick_gelu(served, tmp_path, photos) -> None:
    """Positions saved for another grid go through open_clip's own loader (dsl's fallback), which is given the
    tag's activation (force_quick_gelu): the tower is still OpenAI's, QuickGELU and all."""
    from open_clip.transformer import QuickGELU

    file = serve_open_clip(served, tmp_path, "ViT-L-14", "openai")
    state = torch.load(file, weights_only=True)
    state["visual.positional_embedding"] = state["visual.positional_embedding"][:5].clone()  # CLS + 2 x 2
    torch.save(state, file)
    cfg = compose(["encoder=vitl14", f"encoder.checkpoint={file}"]).encoder
    encoder, preprocess = load_encoder(cfg)
    assert all(isinstance(block.mlp.gelu, QuickGELU) for block in encoder.visual.transformer.resblocks)
    reference, reference_preprocess = upstream("ViT-L-14", str(file), "openai")
    assert_same_encoder(encoder, preprocess, reference, reference_preprocess, photos)


def test_the_readme_table_says_what_each_encoder_is_built_with() -> None:
    """README's table of encoders (Check your weights) against open_clip's own config functions for each tag."""
    from dsl_cli.encoder.loading import tag_settings

    text = docs_text()  # the README and its guides
    rows = {line.split("|")[1].strip(" `"): [cell.strip() for cell in line.split("|")[2:-1]]
            for line in text.splitlines()
            if re.match(r"\| `(bigg14|vitl14|vith14|kandinsky_prior)` \| ", line) and line.count("|") == 8}
    assert set(rows) == {"bigg14", "vitl14", "vith14", "kandinsky_prior"}
    for preset in PRESETS:
        cfg = compose([f"encoder={preset}"]).encoder
        model, activation, mean_std, resize, size, width = rows[preset]
        settings, config = tag_settings(cfg.name, cfg.pretrained), open_clip.get_model_config(cfg.name)
        assert f"{cfg.name} `{cfg.pretrained}`" == model
        assert activation.startswith("QuickGELU" if settings.quick_gelu else "GELU (exact)"), preset
        assert mean_std == "OpenAI CLIP" and settings.preprocess["mean"] == open_clip.OPENAI_DATASET_MEAN
        assert settings.preprocess["std"] == open_clip.OPENAI_DATASET_STD
        assert resize == f"{settings.preprocess['interpolation']}, {settings.preprocess['resize_mode']} edge"
        assert (int(size), int(width)) == (config["vision_cfg"]["image_size"], config["embed_dim"])
    prior = upstream_file("kandinsky-2-2-prior/image_encoder/config.json")
    assert rows["kandinsky_prior"][1].startswith("GELU (exact)") and prior["hidden_act"] == "gelu"
    assert (int(rows["kandinsky_prior"][4]), int(rows["kandinsky_prior"][5])) == (prior["image_size"],
                                                                                  prior["projection_dim"])
