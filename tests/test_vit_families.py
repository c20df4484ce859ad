"""Any ViT opened up: timm and transformers vision transformers beside open_clip, through `HookedEncoder`.

Every family is a tiny random model built from the library's own config class, with asymmetric shapes (3 layers,
4 heads, 2 images, width 48, MLP 80) and random LayerScale gammas, so that a wrong axis or an unfolded gamma
shows. Each is checked against the library's own forward: the decomposition sums to its final hidden state,
the cache's embedding and the readout equal its pooled output, the closed form equals the hooked reference for
every component, and a classifier head read at the last layer gives its logits.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from timm.models.vision_transformer import VisionTransformer

from dsl_cli.encoder import HookedEncoder
from dsl_cli.encoder import timm_api

LAYERS, HEADS, IMAGES, WIDTH, SIDE, PATCH = 3, 4, 2, 48, 32, 8
ATOL = 1e-5


def _randomised(model: torch.nn.Module) -> torch.nn.Module:
    """Every parameter drawn at random: LayerScale gammas (their inits are constants, which would hide a gamma
    on the wrong axis), biases (some libraries start them at zero), and weights at 1/sqrt(fan-in) (timm's
    0.02 makes every write so small that steering would hardly move the output)."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("gamma", "lambda1")):
                p.copy_(torch.rand(p.shape, generator=generator) + 0.5)
            elif p.dim() == 1:
                p.copy_((1.0 if "norm" in name else 0.0) + 0.1 * torch.randn(p.shape, generator=generator))
            else:
                p.copy_(torch.randn(p.shape, generator=generator) / p[0].numel() ** 0.5)
    return model.eval()


def _timm(**kwargs) -> VisionTransformer:
    torch.manual_seed(0)
    base = dict(img_size=SIDE, patch_size=PATCH, embed_dim=WIDTH, depth=LAYERS, num_heads=HEADS, mlp_ratio=80 / 48,
                init_values=0.1, reg_tokens=2, num_classes=5)
    return _randomised(VisionTransformer(**{**base, **kwargs}))


HF_SHAPE = dict(hidden_size=WIDTH, num_hidden_layers=LAYERS, num_attention_heads=HEADS, image_size=SIDE,
                patch_size=PATCH)


def _hf(model_class, config_class, **kwargs):
    torch.manual_seed(0)
    config = config_class(**HF_SHAPE, **kwargs)
    config._attn_implementation = "eager"
    return _randomised(model_class(config))


# name -> (build, readout, exact)
FAMILIES = {
    "timm_token": (lambda: _timm(global_pool="token"), "cls", True),
    "timm_avg_fc_norm": (lambda: _timm(global_pool="avg"), "mean", True),
    "timm_avg_norm_first": (lambda: _timm(global_pool="avg", fc_norm=False), "mean", False),
    "timm_map": (lambda: _timm(global_pool="map", class_token=False, reg_tokens=0), "map", False),
    "clip": (lambda: _hf(transformers.CLIPVisionModelWithProjection, transformers.CLIPVisionConfig,
                         intermediate_size=80, projection_dim=24), "cls", True),
    "clip_no_projection": (lambda: _hf(transformers.CLIPVisionModel, transformers.CLIPVisionConfig,
                                       intermediate_size=80), "cls", True),
    "dinov2": (lambda: _hf(transformers.Dinov2Model, transformers.Dinov2Config, mlp_ratio=2,
                           layerscale_value=0.5), "cls", True),
    "dinov2_registers": (lambda: _hf(transformers.Dinov2WithRegistersModel, transformers.Dinov2WithRegistersConfig,
                                     mlp_ratio=2, num_register_tokens=2), "cls", True),
    "vit_classifier": (lambda: _hf(transformers.ViTForImageClassification, transformers.ViTConfig,
                                   intermediate_size=80, num_labels=7), "cls", True),
    "deit": (lambda: _hf(lambda c: transformers.DeiTModel(c, add_pooling_layer=False), transformers.DeiTConfig,
                         intermediate_size=80), "cls", True),
    "siglip": (lambda: _hf(transformers.SiglipVisionModel, transformers.SiglipVisionConfig, intermediate_size=80),
               "map", False),
}


@pytest.fixture(scope="module")
def pixels() -> torch.Tensor:
    return torch.randn(IMAGES, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    build, readout, exact = FAMILIES[request.param]
    model = build()
    return request.param, model, HookedEncoder(model), readout, exact


def library_run(name: str, model, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The library's own forward: (final residual before any final norm [B, T, D], pooled embedding [B, E]),
    the residual read by a forward hook of torch's own on the last block."""
    seen = {}
    blocks = model.blocks if name.startswith("timm") else None
    if blocks is None:
        base = {"CLIPVisionModelWithProjection": lambda m: m.vision_model,
                "ViTForImageClassification": lambda m: m.vit}.get(type(model).__name__, lambda m: m)(model)
        blocks = base.layers if hasattr(base, "layers") else (
            base.encoder.layers if hasattr(base.encoder, "layers") else base.encoder.layer)
    handle = blocks[-1].register_forward_hook(lambda m, a, out: seen.__setitem__("x", out))
    try:
        with torch.no_grad():
            if name.startswith("timm"):
                pooled = model.forward_head(model.forward_features(pixels), pre_logits=True)
            else:
                out = model(pixel_values=pixels)
                if name == "clip":
                    pooled = out.image_embeds
                elif name in ("clip_no_projection", "siglip"):
                    pooled = out.pooler_output
                elif name == "vit_classifier":  # the classifier's input: the class token after the final norm
                    pooled = model.vit(pixel_values=pixels).last_hidden_state[:, 0]
                else:
                    pooled = out.last_hidden_state[:, 0]
                    if name.startswith("dinov2"):
                        torch.testing.assert_close(pooled, out.pooler_output, atol=0, rtol=0)
    finally:
        handle.remove()
    final = seen["x"][0] if isinstance(seen["x"], tuple) else seen["x"]
    return final, pooled


def pooled_position(encoder: HookedEncoder, tokens: torch.Tensor) -> torch.Tensor:
    return encoder.family.pool(tokens)


def all_components(encoder: HookedEncoder) -> list[str]:
    return [f"L{l}H{h}" for l in range(encoder.n_layers) for h in range(encoder.n_heads)] + \
        [f"L{l}MLP" for l in range(encoder.n_layers)]


def test_shapes_readout_kind_and_exactness(family):
    name, model, encoder, readout, exact = family
    assert (encoder.n_layers, encoder.n_heads, encoder.d_model, encoder.image_size) == (LAYERS, HEADS, WIDTH, SIDE)
    assert (encoder.readout_kind, encoder.exact) == (readout, exact)
    assert encoder.steering_path == ("closed form" if exact else "hooked")


def test_decomposition_sums_to_the_library_final_residual_and_pooled_output(family, pixels):
    name, model, encoder, _, exact = family
    final, pooled = library_run(name, model, pixels)
    cache = encoder.run_with_cache(pixels)
    total = cache.resid[:, 0] + cache.head_writes.sum((1, 2)) + cache.attn_bias.sum(1) + cache.mlp_writes.sum(1)
    torch.testing.assert_close(total, pooled_position(encoder, final), atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(cache.resid[:, -1], pooled_position(encoder, final), atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(cache.embeds, pooled, atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(encoder.embed(pixels), pooled, atol=0, rtol=0)  # the library's own forward
    # the middle of every block too: x_mid = x + heads + bias, x_next = x_mid + mlp
    torch.testing.assert_close(cache.resid_mid, cache.resid[:, :-1] + cache.head_writes.sum(2) + cache.attn_bias,
                               atol=ATOL, rtol=ATOL)
    if exact:  # the readout of the pooled final residual is the library's pooled output
        torch.testing.assert_close(encoder.readout(cache.resid[:, -1]), pooled, atol=ATOL, rtol=ATOL)
        torch.testing.assert_close(encoder.diffusion_lens(cache, [LAYERS - 1])[:, 0], pooled, atol=ATOL, rtol=ATOL)
    else:
        with pytest.raises(NotImplementedError):
            encoder.readout(cache.resid[:, -1])
        torch.testing.assert_close(cache.stream_embeds[:, -1], pooled, atol=ATOL, rtol=ATOL)
        torch.testing.assert_close(encoder.diffusion_lens(cache, [LAYERS - 1])[:, 0], pooled, atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("mode", ["norm", "add", "scale"])
def test_closed_form_equals_the_hooked_reference_for_every_component(family, pixels, mode):
    name, model, encoder, _, exact = family
    cache = encoder.run_with_cache(pixels)
    components = all_components(encoder)
    closed = encoder.steer(cache, components, mode=mode, alpha=2.5)
    for k, component in enumerate(components if mode == "norm" else components[::5]):
        hooked = encoder.steer_hooked(pixels, component, mode=mode, alpha=2.5)
        torch.testing.assert_close(closed[:, components.index(component)], hooked, atol=ATOL, rtol=ATOL,
                                   msg=f"{name} {component}")
    # without patching the answer differs (later sub-blocks react): the patching is what the hooks do
    unpatched = encoder.steer_hooked(pixels, "L0H1", mode=mode, alpha=2.5, patch=False)
    assert (unpatched - closed[:, 1]).abs().max() > 1e-4


def test_hook_points_see_what_the_cache_holds(family, pixels):
    name, model, encoder, _, _ = family
    cache = encoder.run_with_cache(pixels)
    seen = {}

    def keep(x, hook):
        seen[hook.name] = x

    names = [f"blocks.{l}.{p}" for l in range(LAYERS) for p in ("hook_resid_pre", "attn.hook_result", "hook_attn_out",
                                                                "hook_resid_mid", "hook_mlp_out", "hook_resid_post")]
    embeds = encoder.run_with_hooks(pixels, {n: keep for n in names})
    torch.testing.assert_close(embeds, cache.embeds, atol=ATOL, rtol=ATOL)
    pool = encoder.family.pool
    for l in range(LAYERS):
        torch.testing.assert_close(pool(seen[f"blocks.{l}.hook_resid_pre"]), cache.resid[:, l], atol=ATOL, rtol=ATOL)
        torch.testing.assert_close(pool(seen[f"blocks.{l}.attn.hook_result"]), cache.head_writes[:, l],
                                   atol=ATOL, rtol=ATOL)
        torch.testing.assert_close(pool(seen[f"blocks.{l}.hook_attn_out"]), cache[f"blocks.{l}.hook_attn_out"],
                                   atol=ATOL, rtol=ATOL)
        torch.testing.assert_close(pool(seen[f"blocks.{l}.hook_resid_mid"]), cache.resid_mid[:, l], atol=ATOL, rtol=ATOL)
        torch.testing.assert_close(pool(seen[f"blocks.{l}.hook_mlp_out"]), cache.mlp_writes[:, l], atol=ATOL, rtol=ATOL)
        torch.testing.assert_close(pool(seen[f"blocks.{l}.hook_resid_post"]), cache.resid[:, l + 1], atol=ATOL, rtol=ATOL)


def test_editing_hook_points_changes_the_library_forward_as_a_hand_edit_would(family, pixels):
    """Zeroing head 2's write of block 1 at every token through the hooks equals zeroing its columns of the
    output projection by hand (the library's own module, edited in a copy)."""
    import copy

    name, model, encoder, _, _ = family
    edited = copy.deepcopy(encoder)
    with torch.no_grad():
        parts = edited.block_parts(1)
        d = parts.d_head
        weight = parts.out_weight if not name.startswith(("clip", "dinov2", "vit", "deit", "siglip")) else None
        if weight is None:  # transformers: q/k/v/out are separate modules; the out weight is the module's own
            attn = edited.family._attention(edited.blocks[1])
            weight = (attn.o_proj if hasattr(attn, "o_proj") else attn.out_proj).weight
        weight[:, 2 * d:3 * d] = 0
    expected = edited.embed(pixels)
    ablated = encoder.ablate_hooked(pixels, ["L1H2"])
    torch.testing.assert_close(ablated, expected, atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(encoder.ablate_hooked(pixels, []), encoder.embed(pixels), atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("name", ["timm_token", "vit_classifier"])
def test_the_classifier_head_read_at_the_last_layer_gives_the_model_logits(name, pixels):
    build, _, _ = FAMILIES[name]
    model = build()
    encoder = HookedEncoder(model)
    cache = encoder.run_with_cache(pixels)
    with torch.no_grad():
        logits = model(pixels) if name.startswith("timm") else model(pixel_values=pixels).logits
        lens = encoder.classifier(encoder.diffusion_lens(cache, [LAYERS - 1])[:, 0])
    torch.testing.assert_close(lens, logits, atol=ATOL, rtol=ATOL)
    names = encoder.family.class_names()
    assert names is not None and len(names) == logits.shape[-1]


def test_the_mean_readout_caches_mean_writes_not_all_tokens(pixels):
    """The mean readout's cache holds each component's write averaged over the patch tokens (the register and
    class tokens left out), [B, L, H, D] like the CLS cache."""
    model = FAMILIES["timm_avg_fc_norm"][0]()
    encoder = HookedEncoder(model)
    cache = encoder.run_with_cache(pixels)
    assert cache.head_writes.shape == (IMAGES, LAYERS, HEADS, WIDTH)
    seen = {}
    encoder.run_with_hooks(pixels, {"blocks.2.attn.hook_result": lambda x, hook: seen.__setitem__("w", x)})
    assert encoder.family.n_prefix == 3  # class token and two registers
    torch.testing.assert_close(cache.head_writes[:, 2], seen["w"][:, 3:].mean(1), atol=ATOL, rtol=ATOL)


def test_timm_private_calls_compose_to_timm_forward(pixels):
    """`timm_api.tokens`, the blocks, `norm` and `forward_head` equal timm's own forward: if a timm release
    renames `_pos_embed`, this fails (and dsl_cli/encoder/timm_api.py is the one file to fix)."""
    model = FAMILIES["timm_token"][0]()
    with torch.no_grad():
        x = timm_api.tokens(model, pixels)
        assert x.shape == (IMAGES, 1 + 2 + (SIDE // PATCH) ** 2, WIDTH)
        for block in model.blocks:
            x = block(x)
        torch.testing.assert_close(model.forward_head(model.norm(x)), model(pixels), atol=0, rtol=0)


def test_unsupported_variants_are_refused_saying_why():
    from timm.models.vision_transformer import ParallelScalingBlock

    with pytest.raises(NotImplementedError, match="global_pool=''"):
        HookedEncoder(_timm(global_pool=""))
    with pytest.raises(NotImplementedError, match="qk_norm"):
        HookedEncoder(_timm(qk_norm=True))
    with pytest.raises(NotImplementedError, match="plain pre-norm Block"):
        HookedEncoder(_timm(block_fn=ParallelScalingBlock))
    from timm.models.vision_transformer import ParallelThingsBlock

    with pytest.raises(NotImplementedError, match=r"^timm ParallelThingsBlock: only the plain"):  # was "with NoneType"
        HookedEncoder(_timm(block_fn=ParallelThingsBlock, init_values=None))
    with pytest.raises(NotImplementedError, match="not a supported vision transformer"):
        HookedEncoder(transformers.BertModel(transformers.BertConfig(hidden_size=32, num_hidden_layers=1,
                                                                    num_attention_heads=2, intermediate_size=40)))


# ---- real-size architectures, built on the meta device (no memory, no weights) ----------------------------------


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.slow
def test_real_size_architectures_have_the_published_parameter_counts():
    with torch.device("meta"):
        # facebook/dinov2-base (config: image 518, patch 14, 12 x 768, LayerScale): its model.safetensors holds
        # 86,580,480 parameters (the hub's file listing; mask token and 1370 positions included).
        dinov2 = transformers.Dinov2Model(transformers.Dinov2Config(image_size=518, patch_size=14))
        # ViT-B/16 at 224 with a 1000-class head: 86,567,656 (torchvision's ViT_B_16_Weights meta "num_params";
        # timm's vit_base_patch16_224 and transformers' google/vit-base-patch16-224 are the same network).
        vit_timm = VisionTransformer(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12)
        vit_hf = transformers.ViTForImageClassification(transformers.ViTConfig(num_labels=1000))
        # SigLIP-B/16 at 224, vision tower with its attention-pooling head: 92.9 M (timm's model card of
        # vit_base_patch16_siglip_224.webli, "Params (M): 92.9"; google/siglip-base-patch16-224 in transformers).
        siglip = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(image_size=224, patch_size=16))
    assert _count(dinov2) == 86_580_480
    assert _count(vit_timm) == _count(vit_hf) == 86_567_656
    assert round(_count(siglip) / 1e6, 1) == 92.9
    for model, readout in ((dinov2, "cls"), (vit_timm, "cls"), (vit_hf, "cls"), (siglip, "map")):
        encoder = HookedEncoder(model)
        assert (encoder.n_layers, encoder.n_heads, encoder.d_model, encoder.readout_kind) == (12, 12, 768, readout)


def test_direct_attribution_and_head_sources_add_up_in_every_exact_family(family, pixels):
    """The attribution lens's parts sum to the embedding, and each head's parts by source token sum to its
    cached write at the readout position (the CLS query, or the mean over the pooled queries)."""
    from dsl_cli.components import parse_component
    from dsl_cli.encoder.reading import direct_attribution, head_sources

    name, model, encoder, _, exact = family
    cache = encoder.run_with_cache(pixels)
    if not exact:
        with pytest.raises(NotImplementedError, match="no exact direct attribution"):
            direct_attribution(encoder, cache)
    else:
        parts = direct_attribution(encoder, cache)
        torch.testing.assert_close(parts.total(), cache.embeds.float(), atol=ATOL, rtol=ATOL)
    heads = [parse_component(label) for label in ("L0H3", "L2H1")]
    sources = head_sources(encoder, pixels, heads)  # [B, K, T, D]
    expected = torch.stack([cache.head_writes[:, c.layer, c.head] for c in heads], 1)
    torch.testing.assert_close(sources.sum(2), expected.float(), atol=ATOL, rtol=ATOL)


def test_a_pooled_cache_moves_and_casts_whole(pixels):
    encoder = HookedEncoder(FAMILIES["siglip"][0]())
    cache = encoder.run_with_cache(pixels).to(torch.float64)
    assert (cache.readout, cache.exact) == ("map", False)
    assert cache.pixels.dtype == cache.stream_embeds.dtype == cache.resid.dtype == torch.float64


# ---- loading (encoder.source timm | hf) and the debug presets ---------------------------------------------------


@pytest.mark.parametrize(("source", "readout", "head"), [("timm", "mean", True), ("hf", "cls", False)])
def test_the_tiny_presets_load_with_their_library_preprocessing(source, readout, head):
    import numpy as np
    from PIL import Image

    from dsl_cli.config import EncoderConfig
    from dsl_cli.encoder import load_encoder
    from dsl_cli.encoder.loading import embedding_space
    from dsl_cli.errors import UserError

    cfg = EncoderConfig(source=source, name="tiny", pretrained=None, repo_id="tiny-dinov2", subfolder="")
    encoder, preprocess = load_encoder(cfg)
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8))
    pixels = preprocess(picture)
    assert pixels.shape == (3, 64, 64) and pixels.dtype == torch.float32
    for mode in ("L", "RGBA", "P"):  # through the Python API as well as the run's RGB pictures (timm's failed)
        torch.testing.assert_close(preprocess(picture.convert(mode)), preprocess(picture.convert(mode).convert("RGB")))
    assert (encoder.n_layers, encoder.n_heads, encoder.readout_kind) == (4, 4, readout)
    assert (encoder.classifier is not None) == head and encoder.family.n_prefix == 3  # class token, 2 registers
    again, _ = load_encoder(cfg)  # seeded: the same weights every time
    torch.testing.assert_close(again.embed(pixels[None]), encoder.embed(pixels[None]), atol=0, rtol=0)
    with pytest.raises(UserError, match="has no decoder in dsl"):
        embedding_space(cfg)


def test_hf_weights_come_from_the_cache_only(tmp_path, monkeypatch):
    from dsl_cli.config import EncoderConfig
    from dsl_cli.encoder import load_encoder
    from dsl_cli.errors import UserError

    with pytest.raises(UserError, match="not in the Hugging Face cache.*hf download dsl-tests/no-such-vit"):
        load_encoder(EncoderConfig(source="hf", name="hf", repo_id="dsl-tests/no-such-vit", subfolder=""))
    monkeypatch.setattr("huggingface_hub.try_to_load_from_cache", lambda *args, **kwargs: None)  # an empty cache
    with pytest.raises(UserError, match="weights not in the Hugging Face cache; fetch them with: hf download timm/"):
        load_encoder(EncoderConfig(source="timm", name="vit_base_patch16_224.augreg_in21k_ft_in1k", pretrained="hub"))


@pytest.mark.parametrize(("preset", "lens"), [
    ("tiny_timm", ("lens=steering", "component=all", "lens.verify=true")),
    ("tiny_timm", ("lens=logit", "layer=[1,3]")),
    ("tiny_timm", ("lens=attribution", "component=all")),
    ("tiny_dinov2", ("lens=steering", "component=all", "lens.verify=true")),
    ("tiny_dinov2", ("lens=diffusion", "layer=all")),
    ("tiny_dinov2", ("lens=direct", "component=all")),
])
def test_the_debug_presets_run_end_to_end_with_the_lenses_that_do_not_decode(preset, lens, tmp_path):
    import json

    from helpers import dsl_here

    folder = tmp_path / "run"
    code = dsl_here(["run", f"debug={preset}", "layer=1", "images.limit=2", f"hydra.run.dir={folder}", *lens],
                    tmp_path)
    assert code == 0, (folder / "dsl.log").read_text()[-3000:]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["status"] == "complete" and (folder / "index.html").is_file()
    if "lens.verify=true" in lens:
        assert manifest["verify_ok"] is True
    if "lens=logit" in lens:  # named by the model's own 1000-class head
        assert (folder / "labels.csv").read_text().count("\n") > 1


@pytest.mark.parametrize(("preset", "extra", "message"), [
    ("tiny_timm", ("lens=steering", "decode.enabled=true"), "encoder timm:tiny has no decoder in dsl"),
    ("tiny_dinov2", ("lens=logit",), "lens=logit names labels with a classifier head or a CLIP text tower"),
])
def test_what_these_vits_cannot_do_is_refused_in_one_line(preset, extra, message, tmp_path, monkeypatch, capsys):
    from helpers import dsl_in_process

    code, err = dsl_in_process(["run", f"debug={preset}", "layer=1", "images.limit=1",
                                f"hydra.run.dir={tmp_path / 'run'}", *extra], tmp_path, monkeypatch, capsys)
    assert code == 2 and message in err
    assert len([line for line in err.splitlines() if line.startswith("dsl: error")]) == 1
    assert "encode:" not in err  # refused before any image is encoded (the logit lens's once scored them all)


def test_the_preflight_names_the_hub_files_these_encoders_read():
    from dsl_cli.config import EncoderConfig
    from dsl_cli.encoder.loading import needs

    timm_cfg = EncoderConfig(source="timm", name="vit_base_patch16_224.augreg_in21k_ft_in1k", pretrained="hub")
    hf_cfg = EncoderConfig(source="hf", name="hf", repo_id="facebook/dinov2-base", subfolder="", pretrained="hub")
    assert [w.command for w in needs(timm_cfg)[0]] == [
        "hf download timm/vit_base_patch16_224.augreg_in21k_ft_in1k model.safetensors"]
    assert [w.command for w in needs(hf_cfg)[0]] == [
        "hf download facebook/dinov2-base config.json preprocessor_config.json model.safetensors"]
    assert needs(EncoderConfig(source="timm", name="tiny", pretrained=None)) == ([], [])
    assert needs(EncoderConfig(source="timm", name="vit_base_patch16_224", pretrained=None)) == ([], [])
    assert needs(EncoderConfig(source="hf", name="hf", checkpoint="/nowhere", subfolder=""))[1] == [
        "encoder.checkpoint=/nowhere: not a folder with config.json (save_pretrained)"]


def test_token_count_and_mlp_width_for_the_studies_memory_estimate(family, pixels):
    name, model, encoder, _, _ = family
    assert encoder.n_tokens == encoder.family.tokens(pixels).shape[1]
    assert encoder.d_mlp == (96 if name.startswith("dinov2") else 80)


def test_lenses_that_need_a_linear_readout_are_refused_in_one_line_for_attention_pooling(pixels):
    from omegaconf import OmegaConf

    from dsl_cli.components import parse_component
    from dsl_cli.errors import UserError
    from dsl_cli.lenses import get_lens

    encoder = HookedEncoder(FAMILIES["siglip"][0]())
    cache = encoder.run_with_cache(pixels)
    heads = [parse_component("L1H2")]
    for name, message in (("direct", "lens=direct: the map readout pools every token"),
                          ("attribution", "lens=attribution: the map readout .* no exact direct attribution")):
        with pytest.raises(UserError, match=message):
            get_lens(OmegaConf.create({"name": name})).embeddings(encoder, cache, heads)
    # the stream reads as the Diffusion Lens does, and steering takes the hooked path
    stream = get_lens(OmegaConf.create({"name": "direct"})).embeddings(encoder, cache, [parse_component("L2")])
    torch.testing.assert_close(stream[:, 0], cache.embeds, atol=ATOL, rtol=ATOL)
    steering = get_lens(OmegaConf.create({"name": "steering", "mode": "norm", "alpha": 2.0}))
    torch.testing.assert_close(steering.embeddings(encoder, cache, heads)[:, 0],
                               encoder.steer_hooked(pixels, "L1H2"), atol=ATOL, rtol=ATOL)


# ---- timm CLIP towers: `head` is CLIP's projection, not a classifier ------------------------------------------


def _clip_pair(quick_gelu: bool = False):
    """A tiny open_clip vision tower and timm's CLIP tower of the same weights, converted by timm's own loader
    (`checkpoint_filter_fn`: `proj` becomes `head.weight`, with a zero `head.bias`)."""
    import timm
    from timm.models.vision_transformer import checkpoint_filter_fn

    from dsl_cli.encoder.openclip_api import build_vision_tower

    name = "vit_base_patch16_clip_quickgelu_224.openai" if quick_gelu else "vit_base_patch16_clip_224.openai"
    torch.manual_seed(0)
    visual = _randomised(build_vision_tower(24, dict(image_size=SIDE, patch_size=PATCH, width=WIDTH, layers=LAYERS,
                                                     head_width=WIDTH // HEADS, mlp_ratio=2.0), quick_gelu))
    tower = timm.create_model(name, pretrained=False, img_size=SIDE, patch_size=PATCH, embed_dim=WIDTH, depth=LAYERS,
                              num_heads=HEADS, mlp_ratio=2.0, num_classes=24)
    state = checkpoint_filter_fn({f"visual.{k}": v for k, v in visual.state_dict().items()}, tower)
    tower.load_state_dict(state)
    return visual, tower.eval()


@pytest.mark.parametrize("quick_gelu", [False, True])
def test_a_timm_clip_tower_embeds_through_its_projection_as_timm_and_open_clip_do(pixels, quick_gelu):
    visual, tower = _clip_pair(quick_gelu)
    encoder = HookedEncoder(tower)
    with torch.no_grad():
        timm_embeds, clip_embeds = tower(pixels), visual(pixels)
    assert encoder.d_embed == 24 and encoder.classifier is None and encoder.family.class_names() is None
    torch.testing.assert_close(encoder.embed(pixels), timm_embeds, atol=0, rtol=0)  # timm's own model(pixels)
    torch.testing.assert_close(timm_embeds, clip_embeds, atol=ATOL, rtol=ATOL)  # = open_clip's image embedding
    torch.testing.assert_close(HookedEncoder(visual).embed(pixels), timm_embeds, atol=ATOL, rtol=ATOL)
    cache = encoder.run_with_cache(pixels)
    torch.testing.assert_close(encoder.readout(cache.resid[:, -1]), clip_embeds, atol=ATOL, rtol=ATOL)
    from dsl_cli.encoder.reading import direct_attribution

    torch.testing.assert_close(direct_attribution(encoder, cache).total(), clip_embeds, atol=ATOL, rtol=ATOL)
    closed = encoder.steer(cache, ["L1H2"], mode="norm", alpha=2.5)[:, 0]
    torch.testing.assert_close(closed, encoder.steer_hooked(pixels, "L1H2", mode="norm", alpha=2.5),
                               atol=ATOL, rtol=ATOL)


def test_mobileclip_b_is_a_clip_tower_too():
    """MobileCLIP-B's timm tower (`vit_base_mci_224.apple_mclip`: a convolutional stem before plain ViT blocks)
    is not a `*_clip_*` entrypoint, but timm's `_convert_mobileclip` stores its projection as a bias-free `head`
    as for the others: the embedding is `model(pixels)`, 512 wide, with no classifier (it was the 768-wide input
    of a "512-class classifier")."""
    import timm

    torch.manual_seed(0)
    tower = timm.create_model("vit_base_mci_224.apple_mclip", pretrained=False, depth=2, img_size=64).eval()
    pixels = torch.randn(3, 3, 64, 64)
    encoder = HookedEncoder(tower)
    assert encoder.d_embed == 512 and encoder.classifier is None and encoder.family.class_names() is None
    with torch.no_grad():
        torch.testing.assert_close(encoder.embed(pixels), tower(pixels), atol=0, rtol=0)
    cache = encoder.run_with_cache(pixels)
    closed = encoder.steer(cache, ["L1H7"], mode="norm", alpha=2.5)[:, 0]
    torch.testing.assert_close(closed, encoder.steer_hooked(pixels, "L1H7", mode="norm", alpha=2.5),
                               atol=ATOL, rtol=ATOL)


def test_a_fine_tuned_timm_clip_keeps_its_classifier():
    """`openai_ft_in1k` is CLIP fine-tuned into an ImageNet classifier: its head is one, its input the embedding;
    a plain `VisionTransformer` (no pretrained config) keeps its head too, as does a head with a bias."""
    import timm

    small = dict(img_size=SIDE, patch_size=PATCH, embed_dim=WIDTH, depth=1, num_heads=HEADS)
    tuned = HookedEncoder(timm.create_model("vit_base_patch16_clip_224.openai_ft_in1k", pretrained=False, **small))
    assert tuned.classifier is not None and tuned.d_embed == WIDTH and len(tuned.family.class_names()) == 1000
    assert HookedEncoder(_timm(global_pool="token")).classifier is not None
    biased = timm.create_model("vit_base_patch16_clip_224.openai", pretrained=False, **small)
    with torch.no_grad():
        biased.head.bias.fill_(0.5)
    assert HookedEncoder(biased).classifier is not None


def test_a_timm_clip_tower_writes_no_invented_class_labels(tmp_path, monkeypatch, capsys):
    """The logit lens of a CLIP tower (no classifier; timm holds no text tower) is refused in one line, where it
    wrote `class 236` rows from the projection's 512 outputs."""
    import timm
    from safetensors.torch import save_file

    from helpers import dsl_in_process

    name = "vit_xsmall_patch16_clip_224.tinyclip_yfcc15m"  # a small real CLIP tower (8 M parameters)
    weights = tmp_path / "tower.safetensors"
    save_file({k: v.contiguous() for k, v in timm.create_model(name, pretrained=False).state_dict().items()}, weights)
    code, err = dsl_in_process(["run", "encoder=timm", f"encoder.name={name}", f"encoder.checkpoint={weights}",
                                "lens=logit", "decode.enabled=false", "layer=9", "images.limit=1", "device=cpu",
                                f"hydra.run.dir={tmp_path / 'run'}"], tmp_path, monkeypatch, capsys)
    assert code == 2 and "lens=logit names labels with a classifier head or a CLIP text tower" in err, err
    assert not (tmp_path / "run" / "labels.csv").exists()


def test_a_timm_clip_tower_pairs_with_the_decoders_of_its_clip():
    """open_clip's registry names the timm repository of each CLIP it loads from timm's hub: the timm tower of
    those weights (with open_clip's activation) embeds in that CLIP's space, ViT-L-14 openai's for Kandinsky 2.1;
    the GELU tower of OpenAI's QuickGELU weights and the fine-tuned classifiers do not."""
    from dsl_cli.config import DecoderConfig, EncoderConfig
    from dsl_cli.decoder import check_pairing
    from dsl_cli.encoder.loading import EmbeddingSpace, embedding_space
    from dsl_cli.errors import UserError

    def space(name: str, **kwargs) -> EmbeddingSpace:
        return embedding_space(EncoderConfig(source="timm", name=name, **{"pretrained": "hub", **kwargs}))

    quick = space("vit_large_patch14_clip_quickgelu_224.openai")
    assert quick == EmbeddingSpace("ViT-L-14", "openai", 768)
    check_pairing(quick, DecoderConfig(family="kandinsky21", source="pretrained"))
    assert space("vit_large_patch14_clip_quickgelu_224.openai", checkpoint="/x.safetensors").weights is None
    assert space("vit_base_patch16_clip_224.laion400m_e32") == EmbeddingSpace("ViT-B-16", "laion400m_e32", 512)
    with pytest.raises(UserError, match="runs ViT-L-14 openai's weights with GELU where that CLIP uses QuickGELU.*"
                                        "encoder.name=vit_large_patch14_clip_quickgelu_224.openai"):
        space("vit_large_patch14_clip_224.openai")
    for name in ("vit_large_patch14_clip_224.openai_ft_in1k", "vit_large_patch14_clip_224.laion2b"):
        with pytest.raises(UserError, match="has no decoder in dsl"):
            space(name)


# ---- the image size is what the library's preprocessing feeds ----------------------------------------------------


def test_a_transformers_dinov2_is_sized_by_its_processor_not_its_config(tmp_path):
    """facebook/dinov2-base says image_size=518 but its processor crops to 224 (the position embeddings are
    interpolated): the image size, the token count and the zero image of the negative embedding are 224's."""
    import numpy as np
    from PIL import Image

    from dsl_cli.config import EncoderConfig
    from dsl_cli.encoder import load_encoder

    torch.manual_seed(0)
    config = transformers.Dinov2Config(hidden_size=WIDTH, num_hidden_layers=1, num_attention_heads=HEADS,
                                       image_size=74, patch_size=14, mlp_ratio=2)  # 518 and 224, scaled by 1/7
    transformers.Dinov2Model(config).save_pretrained(tmp_path)
    transformers.BitImageProcessor(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32}).save_pretrained(
        tmp_path)
    encoder, preprocess = load_encoder(EncoderConfig(source="hf", name="hf", checkpoint=str(tmp_path), subfolder=""))
    picture = preprocess(Image.fromarray(np.zeros((50, 70, 3), dtype=np.uint8)))
    assert picture.shape == (3, 32, 32)
    assert encoder.image_size == 32 and encoder.n_tokens == (32 // 14) ** 2 + 1
    assert encoder.n_tokens == encoder.family.tokens(picture[None]).shape[1]
    torch.testing.assert_close(encoder.zero_embed(), encoder.embed(torch.zeros(1, 3, 32, 32)), atol=0, rtol=0)


def test_a_timm_dinov2_is_fed_at_the_size_its_architecture_takes():
    """timm's DINOv2 takes 518-pixel images (its patch embedding refuses others) and its data config feeds 518:
    no gap there."""
    from dsl_cli.config import EncoderConfig
    from dsl_cli.encoder import load_encoder

    encoder, _ = load_encoder(EncoderConfig(source="timm", name="vit_small_patch14_dinov2.lvd142m", pretrained=None))
    assert encoder.image_size == 518 and encoder.n_tokens == 37 * 37 + 1


def test_a_users_encoder_family_opens_up_their_own_vit(pixels):
    """Encoder families are a registry: a researcher's subclass of timm's ViT (its own class, which no built-in
    family claims) is refused until they register a family that handles it, then opened up exactly: the
    embedding is the model's, and DSL's closed form equals the hooked pass."""
    from dsl_cli.encoder import families

    class MyViT(VisionTransformer):
        """A user's ViT: timm's, with a method of their own."""

    class MyFamily(families.TimmFamily):
        name = "my_vit"

        @classmethod
        def handles(cls, model) -> bool:
            return isinstance(model, MyViT)

    torch.manual_seed(0)
    model = _randomised(MyViT(img_size=SIDE, patch_size=PATCH, embed_dim=WIDTH, depth=LAYERS, num_heads=HEADS,
                              num_classes=0)).eval()
    with pytest.raises(NotImplementedError, match="of open_clip, timm or transformers, got MyViT"):
        HookedEncoder(model)
    saved = list(families.FAMILIES)
    try:
        assert families.register_family(MyFamily) is MyFamily and families.FAMILIES[0] is MyFamily
        encoder = HookedEncoder(model)
        assert encoder.family.name == "my_vit" and (encoder.n_layers, encoder.n_heads) == (LAYERS, HEADS)
        with torch.no_grad():
            torch.testing.assert_close(encoder.embed(pixels), model(pixels), atol=ATOL, rtol=ATOL)
        cache = encoder.run_with_cache(pixels)
        closed = encoder.steer(cache, ["L2H1"], mode="norm", alpha=2.0)[:, 0]
        torch.testing.assert_close(closed, encoder.steer_hooked(pixels, "L2H1", mode="norm", alpha=2.0),
                                   atol=ATOL, rtol=ATOL)
        with pytest.raises(TypeError, match="a Family subclass with a name"):
            families.register_family(MyViT)
    finally:
        families.FAMILIES[:] = saved
    with pytest.raises(NotImplementedError, match="got MyViT"):
        HookedEncoder(model)


def _clip_whole() -> torch.nn.Module:
    """A whole CLIP whose projection width (24) is not its vision config's own default (512)."""
    text = dict(hidden_size=WIDTH, num_hidden_layers=1, num_attention_heads=HEADS, intermediate_size=80)
    vision = dict(HF_SHAPE, intermediate_size=80)
    torch.manual_seed(0)
    return transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=vision,
                                                          projection_dim=24)).eval()


# a model saved with save_pretrained -> the library's own image embedding of it
SAVED_HF = {
    "clip_projection": (lambda: FAMILIES["clip"][0](), lambda m, x: m(pixel_values=x).image_embeds),
    "clip_no_projection": (lambda: FAMILIES["clip_no_projection"][0](), lambda m, x: m(pixel_values=x).pooler_output),
    "clip_whole": (_clip_whole, lambda m, x: m.get_image_features(pixel_values=x).pooler_output),  # projected
    "vit_no_pooler": (lambda: _hf(lambda c: transformers.ViTModel(c, add_pooling_layer=False), transformers.ViTConfig,
                                  intermediate_size=80), lambda m, x: m(pixel_values=x).last_hidden_state[:, 0]),
    "vit_pooler": (lambda: _hf(transformers.ViTModel, transformers.ViTConfig, intermediate_size=80),
                   lambda m, x: m(pixel_values=x).last_hidden_state[:, 0]),
    "deit_no_pooler": (FAMILIES["deit"][0], lambda m, x: m(pixel_values=x).last_hidden_state[:, 0]),
}


@pytest.mark.parametrize("name", list(SAVED_HF))
def test_a_saved_transformers_model_loads_as_its_class_and_embeds_as_it_does(name, pixels, tmp_path):
    """`encoder=hf encoder.checkpoint=FOLDER` of every class dsl opens up, as save_pretrained wrote it: a
    CLIPVisionModel (no projection; it was refused, its projection said missing), a whole CLIP whose projection is
    not its vision config's default width (refused the same way), a ViT or DeiT saved without the pooler dsl
    never reads (refused, the pooler said missing): each embeds as the library's own forward does."""
    from dsl_cli.config import EncoderConfig
    from dsl_cli.encoder import load_encoder

    build, library_embed = SAVED_HF[name]
    model = build()
    model.save_pretrained(tmp_path)
    transformers.CLIPImageProcessor(size={"shortest_edge": SIDE}, crop_size={"height": SIDE, "width": SIDE}
                                    ).save_pretrained(tmp_path)
    encoder, _ = load_encoder(EncoderConfig(source="hf", name="hf", checkpoint=str(tmp_path), subfolder=""))
    with torch.no_grad():
        expected = library_embed(model, pixels)
        torch.testing.assert_close(encoder.embed(pixels), expected, atol=ATOL, rtol=0)


def test_a_transformers_folder_that_cannot_be_opened_up_is_named_by_its_folder(tmp_path):
    """Its refusal named `encoder hf:hf` (the config's name, the same for every transformers model)."""
    from dsl_cli.config import EncoderConfig
    from dsl_cli.encoder import load_encoder
    from dsl_cli.errors import UserError

    _hf(transformers.SiglipVisionModel, transformers.SiglipVisionConfig, intermediate_size=80,
        vision_use_head=False).save_pretrained(tmp_path)
    transformers.SiglipImageProcessor(size={"height": SIDE, "width": SIDE}).save_pretrained(tmp_path)
    with pytest.raises(UserError, match=f"^encoder hf:{tmp_path} cannot be opened up: SigLIP without"):
        load_encoder(EncoderConfig(source="hf", name="hf", checkpoint=str(tmp_path), subfolder=""))
