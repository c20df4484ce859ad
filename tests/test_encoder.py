"""The encoder: loading, the CLS cache and its exact decomposition, and closed-form DSL vs the hooked pass.

Oracles are open_clip's own forward (fused attention), transformers' own CLIPVisionModelWithProjection and
the hooked reference pass; all weights are random, nothing is downloaded.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from open_clip.transformer import QuickGELU, ResidualAttentionBlock, VisionTransformer
from PIL import Image

from dsl_cli.components import Component
from dsl_cli.encoder import STEER_MODES, HookedEncoder, build_tiny_clip, load_encoder, load_text_model
from dsl_cli.errors import UserError
from helpers import mid_visual, perturb_

TOL = dict(atol=1e-5, rtol=1e-5)


def encoder_config(**kw) -> SimpleNamespace:
    base = dict(source="open_clip", name="ViT-B-32", pretrained=None, checkpoint=None,
                repo_id="kandinsky-community/kandinsky-2-2-prior", subfolder="image_encoder",
                text_name=None, text_pretrained=None)
    return SimpleNamespace(**{**base, **kw})


@pytest.fixture(params=["tiny", "mid"])
def visual(request, tiny_visual) -> VisionTransformer:
    return tiny_visual if request.param == "tiny" else mid_visual()


def clean_sublayer_outputs(visual: VisionTransformer, pixels: torch.Tensor) -> dict:
    """open_clip's own forward, observed through hooks: {(layer, 'ls_1'|'ls_2'): [B,T,D]} and the
    per-block outputs from forward_intermediates."""
    seen, handles = {}, []
    for l, block in enumerate(visual.transformer.resblocks):
        for name in ("ls_1", "ls_2"):
            handles.append(getattr(block, name).register_forward_hook(
                lambda m, i, out, key=(l, name): seen.__setitem__(key, out.detach().clone())))
    with torch.no_grad():
        visual(pixels)
        blocks_out = visual.forward_intermediates(pixels, output_fmt="NLC", output_extra_tokens=True)
    for h in handles:
        h.remove()
    seen["block_cls"] = torch.stack([t[:, 0] for t in blocks_out["image_intermediates_prefix"]], 1)
    return seen


# ---- the cache and the decomposition ----------------------------------------------------------------

def test_cache_matches_open_clip_forward(visual, tiny_pixels):
    enc = HookedEncoder(visual)
    cache = enc.run_with_cache(tiny_pixels)
    with torch.no_grad():
        expected = visual(tiny_pixels)
    torch.testing.assert_close(cache.embeds, expected, **TOL)
    torch.testing.assert_close(enc.readout(cache.resid[:, -1]), expected, **TOL)

    seen = clean_sublayer_outputs(visual, tiny_pixels)
    torch.testing.assert_close(cache.resid[:, 1:], seen["block_cls"], **TOL)
    attn_out = torch.stack([seen[(l, "ls_1")][:, 0] for l in range(enc.n_layers)], 1)
    mlp_out = torch.stack([seen[(l, "ls_2")][:, 0] for l in range(enc.n_layers)], 1)
    torch.testing.assert_close(cache.head_writes.sum(2) + cache.attn_bias, attn_out, **TOL)
    torch.testing.assert_close(cache.mlp_writes, mlp_out, **TOL)
    torch.testing.assert_close(cache.resid_mid, cache.resid[:, 1:] - mlp_out, **TOL)


def test_decomposition_is_exact(visual, tiny_pixels):
    cache = HookedEncoder(visual).run_with_cache(tiny_pixels)
    total = cache.resid[:, 0] + cache.head_writes.sum((1, 2)) + cache.attn_bias.sum(1) + cache.mlp_writes.sum(1)
    torch.testing.assert_close(total, cache.resid[:, -1], **TOL)
    torch.testing.assert_close(cache.resid[:, :-1] + cache.head_writes.sum(2) + cache.attn_bias, cache.resid_mid, **TOL)
    torch.testing.assert_close(cache.resid_mid + cache.mlp_writes, cache.resid[:, 1:], **TOL)


def test_each_head_write_matches_attention_with_other_heads_silenced(visual, tiny_pixels):
    """Oracle per head: PyTorch's own MultiheadAttention with every other head's output columns zeroed."""
    enc = HookedEncoder(visual)
    cache = enc.run_with_cache(tiny_pixels)
    layer = enc.n_layers // 2
    block = visual.transformer.resblocks[layer]
    with torch.no_grad():
        normed = block.ln_1(cache_input_of(visual, tiny_pixels, layer))
        for h in range(enc.n_heads):
            attn = copy.deepcopy(block.attn)
            keep = torch.zeros(enc.d_model, dtype=torch.bool)
            keep[h * enc.d_head:(h + 1) * enc.d_head] = True
            attn.out_proj.weight[:, ~keep] = 0
            attn.out_proj.bias.zero_()
            alone = block.ls_1(attn(normed, normed, normed, need_weights=False)[0])[:, 0]
            torch.testing.assert_close(cache.head_writes[:, layer, h], alone, **TOL)


def cache_input_of(visual: VisionTransformer, pixels: torch.Tensor, layer: int) -> torch.Tensor:
    """[B,T,D]: the residual stream entering block `layer`, from open_clip's forward."""
    captured = {}
    handle = visual.transformer.resblocks[layer].register_forward_pre_hook(
        lambda m, args: captured.__setitem__("x", args[0].clone()))
    with torch.no_grad():
        visual(pixels)
    handle.remove()
    return captured["x"]


def test_cache_is_batch_invariant(visual, tiny_pixels):
    enc = HookedEncoder(visual)
    batched = enc.run_with_cache(tiny_pixels)
    for i in range(len(tiny_pixels)):
        alone = enc.run_with_cache(tiny_pixels[i:i + 1])
        for name in ("resid", "resid_mid", "head_writes", "attn_bias", "mlp_writes", "embeds"):
            torch.testing.assert_close(getattr(batched, name)[i:i + 1], getattr(alone, name), **TOL)


def test_cache_names_and_lenses(tiny_encoder, tiny_pixels):
    enc, cache = tiny_encoder, tiny_encoder.run_with_cache(tiny_pixels)
    assert (enc.n_layers, enc.n_heads, enc.d_model, enc.d_head, enc.d_embed, enc.image_size) == (4, 4, 64, 16, 32, 64)
    torch.testing.assert_close(cache["blocks.2.attn.hook_result"], cache.head_writes[:, 2])
    torch.testing.assert_close(cache[Component("mlp", 1).hook_name], cache.mlp_writes[:, 1])
    torch.testing.assert_close(cache["blocks.3.hook_resid_post"], cache.resid[:, 4])
    torch.testing.assert_close(cache["hook_embed"], cache.resid[:, 0])  # the old name of blocks.0.hook_resid_pre
    torch.testing.assert_close(cache[Component("embed", -1).hook_name], cache.resid[:, 0])
    assert Component("embed", -1).hook_name == "blocks.0.hook_resid_pre"
    with pytest.raises(KeyError):
        cache["blocks.9.hook_mlp_out"]

    writes = enc.component_writes(cache, ["L01H02", Component("mlp", 3), "L0", "embed"])
    expected = torch.stack([cache.head_writes[:, 1, 2], cache.mlp_writes[:, 3], cache.resid[:, 1], cache.resid[:, 0]], 1)
    torch.testing.assert_close(writes, expected)

    lens = enc.diffusion_lens(cache, ["embed", 0, "L3"])
    assert lens.shape == (3, 3, 32)
    torch.testing.assert_close(lens[:, 2], cache.embeds, **TOL)
    torch.testing.assert_close(enc.diffusion_lens(cache, [1], mid=True)[:, 0], enc.readout(cache.resid_mid[:, 1]))
    torch.testing.assert_close(enc.direct(cache, ["L2MLP"])[:, 0], enc.readout(cache.mlp_writes[:, 2]))
    assert cache.to("cpu").embeds.shape == (3, 32)


def test_zero_embed_is_the_tower_on_zeros(tiny_encoder, tiny_visual):
    with torch.no_grad():
        expected = tiny_visual(torch.zeros(1, 3, 64, 64))
    torch.testing.assert_close(tiny_encoder.zero_embed(), expected)


def test_towers_that_also_return_tokens_give_the_pooled_embedding(tiny_visual, tiny_pixels):
    tiny_visual.output_tokens = True
    enc = HookedEncoder(tiny_visual)
    assert enc.zero_embed().shape == (1, 32)
    torch.testing.assert_close(enc.steer(enc.run_with_cache(tiny_pixels), ["L1H1"])[:, 0],
                               enc.steer_hooked(tiny_pixels, "L1H1"), **TOL)


def test_towers_without_projection_read_out_in_the_residual_width(tiny_visual, tiny_pixels):
    """open_clip drops `proj` when it prunes a tower's head: the embedding is then ln_post(x_L), [B, D]."""
    tiny_visual.proj = None
    enc = HookedEncoder(tiny_visual)
    cache = enc.run_with_cache(tiny_pixels)
    with torch.no_grad():
        expected = tiny_visual(tiny_pixels)
    assert expected.shape == (3, enc.d_model)
    torch.testing.assert_close(cache.embeds, expected, **TOL)
    torch.testing.assert_close(enc.steer(cache, ["L1H1"])[:, 0], enc.steer_hooked(tiny_pixels, "L1H1"), **TOL)


BLOCKS_REFUSED = ("{}: qk_norm, scaled cosine attention, head/attention/fc scaling and cross-attention blocks are "
                  "not covered by the per-head decomposition")


def small_tower(**kw) -> VisionTransformer:
    return VisionTransformer(image_size=32, patch_size=16, width=32, layers=1, heads=2, mlp_ratio=2.0,
                             output_dim=16, attn_pooler_heads=2, **kw)


def cross_attention_tower() -> VisionTransformer:
    visual = small_tower()
    visual.transformer.resblocks[0] = ResidualAttentionBlock(32, 2, is_cross_attention=True)
    return visual


def sequence_first_tower() -> VisionTransformer:
    visual = small_tower()
    visual.transformer.batch_first = False
    return visual


@pytest.mark.parametrize(("build", "message"), [
    (lambda: small_tower(attentional_pool=True), "attentional pooling is not covered by the CLS-token decomposition"),
    (lambda: small_tower(pool_type="avg"), "pool_type 'avg': only CLS pooling ('tok') is decomposed"),
    (lambda: small_tower(qk_norm=True), BLOCKS_REFUSED.format("CustomResidualAttentionBlock")),
    (lambda: small_tower(scale_attn=True), BLOCKS_REFUSED.format("CustomResidualAttentionBlock")),
    (cross_attention_tower, BLOCKS_REFUSED.format("ResidualAttentionBlock")),
    (sequence_first_tower, "only batch-first transformers are supported"),
    (lambda: torch.nn.Linear(2, 2),
     "HookedEncoder needs a vision transformer of open_clip, timm or transformers, got Linear "
     "(ResNet and other towers are not decomposed; `register_family` adds one)"),
])
def test_unsupported_towers_are_refused_saying_why(build, message):
    with pytest.raises(NotImplementedError) as refused:
        HookedEncoder(build())
    assert str(refused.value) == message


def test_bad_components_and_modes_are_refused(tiny_encoder, tiny_pixels):
    cache = tiny_encoder.run_with_cache(tiny_pixels)
    for bad in (["L2"], ["embed"], ["L4H00"], ["L0H04"]):
        with pytest.raises(ValueError):
            tiny_encoder.steer(cache, bad)
    with pytest.raises(ValueError, match="mode"):
        tiny_encoder.steer(cache, ["L0H00"], mode="double")
    with pytest.raises(ValueError):
        tiny_encoder.diffusion_lens(cache, ["L0MLP"])


def test_labels_outside_the_tower_are_refused_naming_its_range(tiny_encoder, tiny_pixels) -> None:
    cache = tiny_encoder.run_with_cache(tiny_pixels)
    for bad, says in (("L4H00", "L04H00: layer out of range 0..3"), ("L0H04", "L00H04: head out of range 0..3"),
                      ("L4", "L04: layer out of range 0..3"), ("L2", "L02: only heads and MLPs can be steered or ablated")):
        with pytest.raises(ValueError) as refused:
            (tiny_encoder.steer(cache, [bad]) if bad == "L2" else tiny_encoder.component_writes(cache, [bad]))
        assert str(refused.value) == says


def test_readout_takes_vectors_of_any_precision(tiny_visual) -> None:
    """A bf16 tower reads float32 vectors as their bf16 rounding (R(v) = ln_post(v) @ proj in its dtype)."""
    half = HookedEncoder(tiny_visual.to(torch.bfloat16))
    v = torch.randn(3, half.d_model, dtype=torch.float64)
    torch.testing.assert_close(half.readout(v), half.readout(v.bfloat16()), rtol=0, atol=0)


def test_residual_labels_read_the_stream_where_hooks_see_it(tiny_encoder, tiny_pixels) -> None:
    """`component_writes` of `L1mid`, `L2` and `embed`: the CLS row of blocks.1.hook_resid_mid,
    blocks.2.hook_resid_post and blocks.0.hook_resid_pre in a hooked open_clip pass."""
    seen = {}

    def keep(x, hook):
        seen[hook.name] = x[:, 0].clone()

    points = ["blocks.1.hook_resid_mid", "blocks.2.hook_resid_post", "blocks.0.hook_resid_pre"]
    tiny_encoder.run_with_hooks(tiny_pixels, {name: keep for name in points})
    got = tiny_encoder.component_writes(tiny_encoder.run_with_cache(tiny_pixels), ["L1mid", "L2", "embed"])
    for k, name in enumerate(points):
        torch.testing.assert_close(got[:, k], seen[name], msg=name)


# ---- DSL: closed form vs the hooked reference --------------------------------------------------------

TINY_COMPONENTS = [f"L{l}H{h}" for l in range(4) for h in range(4)] + [f"L{l}MLP" for l in range(4)]


@pytest.mark.parametrize("mode", STEER_MODES)
def test_closed_form_steering_equals_hooked_pass_for_every_tiny_component(tiny_visual, tiny_pixels, mode):
    enc = HookedEncoder(perturb_(tiny_visual))
    pixels, alpha = tiny_pixels[:2], 3.0
    closed = enc.steer(enc.run_with_cache(pixels), TINY_COMPONENTS, mode=mode, alpha=alpha)
    assert closed.shape == (2, len(TINY_COMPONENTS), 32)
    for k, comp in enumerate(TINY_COMPONENTS):
        hooked = enc.steer_hooked(pixels, comp, mode=mode, alpha=alpha)
        torch.testing.assert_close(closed[:, k], hooked, **TOL, msg=f"{comp} {mode}")
        unpatched = enc.steer_hooked(pixels, comp, mode=mode, alpha=alpha, patch=False)
        gap = (unpatched - hooked).abs().max().item()
        if comp == "L3MLP":  # nothing comes after the last MLP: patching changes nothing
            assert gap < 1e-5
        else:
            assert gap > 1e-2, f"{comp} {mode}: patching made no difference ({gap:.2e})"


@pytest.mark.parametrize("comp", ["L00H00", "L02H05", "L03MLP", "L05H07", "L05MLP"])
def test_closed_form_steering_equals_hooked_pass_with_layerscale(comp, tiny_pixels):
    enc = HookedEncoder(mid_visual())
    cache = enc.run_with_cache(tiny_pixels)
    for mode in STEER_MODES:
        torch.testing.assert_close(enc.steer(cache, [comp], mode, 2.0)[:, 0],
                                   enc.steer_hooked(tiny_pixels, comp, mode, 2.0), **TOL)


# ---- loading -----------------------------------------------------------------------------------------

def test_tiny_loading_shares_the_text_space(tiny_pixels):
    enc, preprocess = load_encoder(encoder_config(source="tiny"))
    assert preprocess(Image.new("RGB", (90, 70), "red")).shape == (3, 64, 64)
    tower, tokenizer = load_text_model(encoder_config(source="tiny"))
    clip, tokens = build_tiny_clip(), tokenizer(["a photo of a dog", "a cat"])
    with torch.no_grad():  # the encoder and the text tower are the two sides of one CLIP
        torch.testing.assert_close(clip.encode_image(tiny_pixels), enc.run_with_cache(tiny_pixels).embeds, **TOL)
        text = tower.encode_text(tokens)
        torch.testing.assert_close(text, clip.encode_text(tokens), **TOL)
    assert text.shape == (2, enc.d_embed)
    # the builder is seeded and leaves the caller's RNG alone
    state = torch.random.get_rng_state()
    build_tiny_clip()
    assert torch.equal(state, torch.random.get_rng_state())


def test_open_clip_random_weights_build_only_the_vision_tower():
    enc, preprocess = load_encoder(encoder_config(name="ViT-S-32", pretrained=None))
    assert (enc.n_layers, enc.n_heads, enc.d_model, enc.d_embed, enc.image_size) == (12, 6, 384, 384, 224)
    assert preprocess(Image.new("RGB", (300, 240))).shape == (3, 224, 224)
    pixels = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(enc.run_with_cache(pixels).embeds, enc.visual(pixels), **TOL)


@pytest.mark.parametrize("act,eps,image,patch,layers", [("gelu", 1e-5, 64, 16, 3), ("quick_gelu", 1e-6, 32, 8, 2)])
def test_kandinsky_prior_layout_maps_onto_open_clip(tmp_path, act, eps, image, patch, layers):
    transformers = pytest.importorskip("transformers")
    config = transformers.CLIPVisionConfig(
        hidden_size=64, intermediate_size=256, num_hidden_layers=layers, num_attention_heads=4, image_size=image,
        patch_size=patch, projection_dim=32, hidden_act=act, layer_norm_eps=eps)
    torch.manual_seed(0)
    hf = perturb_(transformers.CLIPVisionModelWithProjection(config)).eval()
    hf.save_pretrained(tmp_path)

    enc, preprocess = load_encoder(encoder_config(source="kandinsky_prior", checkpoint=str(tmp_path)))
    pixels = torch.randn(2, 3, image, image)
    with torch.no_grad():
        expected = hf(pixel_values=pixels).image_embeds
    torch.testing.assert_close(enc.run_with_cache(pixels).embeds, expected, **TOL)
    assert preprocess(Image.new("RGB", (100, 80))).shape == (3, image, image)


@pytest.fixture
def offline_empty_hub(tmp_path, monkeypatch):
    """HF_HUB_OFFLINE=1 with an empty HF_HOME; huggingface_hub reads both at import, so its constants too."""
    import huggingface_hub.constants as hub

    home = tmp_path / "hf"
    home.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HOME", str(home))
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(home / "hub"))
    yield home
    assert not list(home.rglob("*.safetensors")) and not list(home.rglob("*.bin")), "something was downloaded"


def test_missing_prior_weights_offline_is_a_user_error(offline_empty_hub):
    with pytest.raises(UserError, match="kandinsky-community/kandinsky-2-2-prior") as err:
        load_encoder(encoder_config(source="kandinsky_prior"))
    assert "`hf download kandinsky-community/kandinsky-2-2-prior image_encoder/config.json" in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_open_clip_weights_offline_is_a_user_error(offline_empty_hub, tmp_path):
    with pytest.raises(UserError, match="laion/CLIP-ViT-B-32-laion2B-s34B-b79K") as err:
        load_encoder(encoder_config(name="ViT-B-32", pretrained="laion2b_s34b_b79k"))
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="encoder.checkpoint"):
        load_encoder(encoder_config(name="ViT-B-32", checkpoint=str(tmp_path / "missing.bin")))
    with pytest.raises(UserError):
        load_encoder(encoder_config(name="No-Such-Model"))


# ---- real size ---------------------------------------------------------------------------------------

@pytest.mark.slow
def test_bigg_random_weights_give_all_dsl_embeddings():
    enc, preprocess = load_encoder(encoder_config(name="ViT-bigG-14", pretrained=None))
    assert (enc.n_layers, enc.n_heads, enc.d_model, enc.d_head, enc.d_embed) == (48, 16, 1664, 104, 1280)
    assert enc.blocks[0].mlp.c_fc.out_features == 8192
    pixels = preprocess(Image.new("RGB", (256, 256), "gray"))[None]
    cache = enc.run_with_cache(pixels)
    assert cache.head_writes.shape == (1, 48, 16, 1664)
    components = [f"L{l}H{h}" for l in range(48) for h in range(16)] + [f"L{l}MLP" for l in range(48)]
    steered = enc.steer(cache, components)
    assert steered.shape == (1, 816, 1280) and torch.isfinite(steered).all()
    total = cache.resid[:, 0] + cache.head_writes.sum((1, 2)) + cache.attn_bias.sum(1) + cache.mlp_writes.sum(1)
    torch.testing.assert_close(total, cache.resid[:, -1], atol=1e-3, rtol=1e-4)


@pytest.mark.slow
def test_bigg_bf16_dsl_embeddings_stay_within_0_999_of_fp32():
    """The real-size ViT (random weights) cast to bf16 against itself in fp32, on a sample photo, every
    head and MLP (scripts/bench_encoder.py measured 0.99987 at the lowest over 2 photos)."""
    from omegaconf import OmegaConf

    from dsl_cli.config import ImagesConfig
    from dsl_cli.images import load_images

    fp32, preprocess = load_encoder(encoder_config(name="ViT-bigG-14", pretrained=None))
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    photo = load_images(OmegaConf.structured(ImagesConfig(names=["astronaut"]))).images[0].load()
    pixels = preprocess(photo)[None]
    components = [f"L{l}H{h}" for l in range(48) for h in range(16)] + [f"L{l}MLP" for l in range(48)]
    ours = bf16.steer(bf16.run_with_cache(pixels), components).float()
    reference = fp32.steer(fp32.run_with_cache(pixels), components)
    assert torch.nn.functional.cosine_similarity(ours, reference, dim=-1).min() >= 0.999


# ---- cache names, casts, loading paths and their messages (mutation testing: docs/testing.md) ---------

def test_cache_names_at_the_edges_and_casts(tiny_encoder, tiny_pixels):
    cache = tiny_encoder.run_with_cache(tiny_pixels[:2])
    torch.testing.assert_close(cache["blocks.0.hook_attn_bias"], cache.attn_bias[:, 0])
    torch.testing.assert_close(cache["blocks.3.hook_resid_mid"], cache.resid_mid[:, 3])
    torch.testing.assert_close(cache["blocks.0.hook_mlp_out"], cache.mlp_writes[:, 0])
    assert cache["embeds"] is cache.embeds
    for bad in ("blocks.4.hook_mlp_out", "blocks.x.hook_mlp_out", "layers.1.hook_mlp_out", "a.b", "embed"):
        with pytest.raises(KeyError, match=f"no cached tensor named '{bad}'"):
            cache[bad]
    assert {t.dtype for t in vars(cache.to(torch.float64)).values()} == {torch.float64}
    assert {t.dtype for t in vars(cache.to(dtype=torch.float16)).values()} == {torch.float16}
    with pytest.raises(ValueError, match="the diffusion lens reads residual-stream labels .* not embed"):
        tiny_encoder.diffusion_lens(cache, ["embed"], mid=True)
    with pytest.raises(ValueError, match=r"residual-stream labels \(L<layer>, embed\), not L00H01"):
        tiny_encoder.diffusion_lens(cache, ["L0H1"])


def test_zero_embed_in_double_precision(tiny_visual):
    enc = HookedEncoder(tiny_visual.double())
    with torch.no_grad():
        expected = tiny_visual(torch.zeros(1, 3, 64, 64, dtype=torch.float64))
    assert enc.zero_embed().dtype == torch.float64
    torch.testing.assert_close(enc.zero_embed(), expected)


def hf_config(**kw) -> dict:
    return dict(hidden_size=64, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4, image_size=32,
                patch_size=16, projection_dim=32, **kw)


def test_hf_config_defaults_and_unsupported_activation():
    from open_clip.transformer import LayerNorm

    from dsl_cli.encoder.loading import vision_transformer_from_hf_config

    visual = vision_transformer_from_hf_config(hf_config())  # CLIPVisionConfig's own defaults
    block = visual.transformer.resblocks[0]
    assert isinstance(block.mlp.gelu, QuickGELU) and isinstance(block.ln_1, LayerNorm) and block.ln_1.eps == 1e-5
    assert vision_transformer_from_hf_config(hf_config(layer_norm_eps=1e-6)).ln_post.eps == 1e-6
    with pytest.raises(UserError) as err:
        vision_transformer_from_hf_config(hf_config(hidden_act="relu"))
    assert str(err.value) == "hidden_act 'relu' of the image encoder is not supported (use gelu or quick_gelu)"


def test_hf_weights_with_unmapped_keys_are_refused():
    transformers = pytest.importorskip("transformers")
    from dsl_cli.encoder.loading import hf_to_open_clip_state_dict

    hf = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**hf_config())).state_dict()
    hf["vision_model.embeddings.position_ids"] = torch.arange(5)  # a buffer older files carry: ignored
    assert "positional_embedding" in hf_to_open_clip_state_dict(dict(hf), 1)
    extra = {f"extra.{i}": torch.zeros(1) for i in range(6)}
    with pytest.raises(UserError) as err:
        hf_to_open_clip_state_dict({**hf, **extra}, 1)
    assert str(err.value) == ("image encoder weights hold keys that are not mapped: "
                              "extra.0, extra.1, extra.2, extra.3, extra.4")


PRIOR_FETCH = ("`hf download kandinsky-community/kandinsky-2-2-prior image_encoder/config.json "
               "image_encoder/model.safetensors`")


def test_prior_folders_without_weights_are_refused(tmp_path):
    for files in ([], ["config.json"], ["model.safetensors"]):
        folder = tmp_path / str(len(list(tmp_path.iterdir())))
        folder.mkdir()
        for name in files:
            (folder / name).write_text("{}")
        with pytest.raises(UserError) as err:
            load_encoder(encoder_config(source="kandinsky_prior", checkpoint=str(folder)))
        assert str(err.value) == (f"{folder} must hold config.json and model.safetensors (a "
                                  f"CLIPVisionModelWithProjection); fetch them with {PRIOR_FETCH}")


def test_prior_folders_with_broken_weights_are_refused_in_one_line(tmp_path):
    """A file that is not safetensors, a tensor missing, a tensor of another shape, a config that is not JSON."""
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file, save_file

    hf = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**hf_config(hidden_act="gelu")))
    fc1 = "vision_model.encoder.layers.0.mlp.fc1.weight"
    breakages = {
        "SafetensorError": lambda folder: (folder / "model.safetensors").write_bytes(b"not weights"),
        f"they lack {fc1}, which its config asks for": lambda folder: save_file(
            {k: v for k, v in load_file(folder / "model.safetensors").items() if k != fc1}, folder / "model.safetensors"),
        "size mismatch for transformer.resblocks.0.mlp.c_fc.weight": lambda folder: save_file(
            {k: v[:-1].contiguous() if k == fc1 else v for k, v in load_file(folder / "model.safetensors").items()},
            folder / "model.safetensors"),
        "JSONDecodeError": lambda folder: (folder / "config.json").write_text("{not json"),
    }
    for i, (reason, breaking) in enumerate(breakages.items()):
        folder = tmp_path / str(i)
        hf.save_pretrained(folder)
        breaking(folder)
        with pytest.raises(UserError) as err:
            load_encoder(encoder_config(source="kandinsky_prior", checkpoint=str(folder)))
        assert str(err.value).startswith(f"{folder}: cannot read the image encoder weights from it (")
        assert reason in str(err.value) and "\n" not in str(err.value)


def test_prior_from_the_hub_cache(tmp_path, monkeypatch):
    """The cached snapshot's image_encoder/ folder is read; only its config and safetensors are asked for."""
    transformers = pytest.importorskip("transformers")
    import huggingface_hub

    torch.manual_seed(0)
    hf = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**hf_config(hidden_act="gelu")))
    hf.save_pretrained(tmp_path / "snapshot" / "image_encoder")
    asked = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo, allow_patterns: asked.append((repo, allow_patterns)) or str(tmp_path / "snapshot"))
    enc, preprocess = load_encoder(encoder_config(source="kandinsky_prior"))
    assert asked == [("kandinsky-community/kandinsky-2-2-prior", ["image_encoder/config.json",
                                                                  "image_encoder/model.safetensors"])]
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(enc.embed(pixels), hf.eval()(pixel_values=pixels).image_embeds, **TOL)
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8))
    torch.testing.assert_close(preprocess(picture), eval_transform(32)(picture))  # the prior's processor


def test_offline_prior_message_names_the_download(offline_empty_hub):
    with pytest.raises(UserError) as err:
        load_encoder(encoder_config(source="kandinsky_prior"))
    assert str(err.value) == (
        "the image encoder of kandinsky-community/kandinsky-2-2-prior (image_encoder/) is not in the Hugging Face "
        f"cache and could not be downloaded: run {PRIOR_FETCH} or set encoder.checkpoint=/path/to/folder "
        "(config.json + model.safetensors)")


def test_open_clip_messages_name_the_fix(offline_empty_hub):
    with pytest.raises(UserError) as err:
        load_encoder(encoder_config(name="ViT-B-32", pretrained="laion2b_s34b_b79k"))
    assert "fetch them with `hf download laion/CLIP-ViT-B-32-laion2B-s34B-b79K open_clip_pytorch_model.bin` or set" in str(err.value)
    with pytest.raises(UserError) as err:
        load_encoder(encoder_config(name="No-Such-Model"))
    assert str(err.value) == "unknown open_clip model 'No-Such-Model' (open_clip.list_models() lists the known ones)"


def eval_transform(size: int):
    """Shortest-edge bicubic resize, centre crop, OpenAI mean/std: open_clip's evaluation transform."""
    import open_clip

    return open_clip.image_transform(size, is_train=False)


def test_random_open_clip_weights_keep_the_models_activation():
    enc, preprocess = load_encoder(encoder_config(name="ViT-B-32-quickgelu", pretrained=None))
    assert isinstance(enc.blocks[0].mlp.gelu, QuickGELU)
    picture = Image.fromarray(np.random.default_rng(1).integers(0, 256, (180, 300, 3), dtype=np.uint8))
    torch.testing.assert_close(preprocess(picture), eval_transform(224)(picture))
    enc, _ = load_encoder(encoder_config(name="ViT-S-32", pretrained=None))
    assert not isinstance(enc.blocks[0].mlp.gelu, QuickGELU)


def test_inputs_are_cast_to_the_encoders_precision(tiny_visual, tiny_pixels):
    """float32 pixels into a float64 (and a bfloat16) encoder: every entry casts them, and the steered write
    keeps the stream's dtype."""
    visual = perturb_(tiny_visual)
    reference = HookedEncoder(copy.deepcopy(visual))
    enc = HookedEncoder(visual.double())
    with torch.no_grad():
        expected = visual(tiny_pixels.double())
    torch.testing.assert_close(enc.embed(tiny_pixels), expected)
    cache = enc.run_with_cache(tiny_pixels)
    torch.testing.assert_close(cache.embeds, expected)
    for mode in STEER_MODES:
        hooked = enc.steer_hooked(tiny_pixels, "L1H1", mode, 2.0)
        assert hooked.dtype == torch.float64
        torch.testing.assert_close(hooked, enc.steer(cache, ["L1H1"], mode, 2.0)[:, 0])
    means = enc.mean_writes(tiny_pixels, batch_size=2)
    assert means.heads.dtype == torch.float32  # accumulated in float32 whatever the encoder's dtype
    torch.testing.assert_close(means.heads, reference.mean_writes(tiny_pixels).heads, **TOL)
    assert enc.ablate_hooked(tiny_pixels, ["L1H1", "L2MLP"]).dtype == torch.float64
    with pytest.raises(ValueError, match="only heads and MLPs can be steered"):
        enc.steer_hooked(tiny_pixels, "L2")

    low = HookedEncoder(copy.deepcopy(visual).to(torch.bfloat16))
    for mode in STEER_MODES:
        steered = low.steer_hooked(tiny_pixels, "L1H1", mode, 2.0)
        assert steered.dtype == torch.bfloat16
        torch.testing.assert_close(steered.float(), reference.steer_hooked(tiny_pixels, "L1H1", mode, 2.0),
                                   atol=0.15, rtol=0.05)
    assert low.ablate_hooked(tiny_pixels, ["L1H1", "L2MLP"], how="mean").dtype == torch.bfloat16


def test_loaders_set_up_the_models_they_return(monkeypatch):
    enc, preprocess = load_encoder(encoder_config(source="tiny"), dtype=torch.float64)
    assert enc.dtype == torch.float64 and not any(p.requires_grad for p in enc.parameters())
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8))
    torch.testing.assert_close(preprocess(picture), eval_transform(64)(picture))
    model, tokenizer = load_text_model(encoder_config(name="ViT-S-32", pretrained=None), dtype=torch.float64)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert model.encode_text(tokenizer(["a photo of a cat"])).dtype == torch.float64
    with pytest.raises(UserError) as err:
        load_encoder(encoder_config(source="keras"))
    assert str(err.value) == "unknown encoder.source 'keras': use open_clip, kandinsky_prior, tiny, timm or hf"

    def refuse(visual):
        raise NotImplementedError("attentional pooling")

    monkeypatch.setattr("dsl_cli.encoder.loading.HookedEncoder", refuse)
    with pytest.raises(UserError) as err:
        load_encoder(encoder_config(source="tiny", name="tiny"))
    assert str(err.value) == "encoder tiny:tiny cannot be opened up: attentional pooling"


def test_text_model_ids():
    from dsl_cli.encoder import text_model_id

    assert text_model_id(encoder_config(source="tiny")) == ("tiny", None)
    assert text_model_id(encoder_config(source="kandinsky_prior")) == ("ViT-bigG-14", "laion2b_s39b_b160k")
    assert text_model_id(encoder_config(source="kandinsky_prior", text_name="ViT-L-14", text_pretrained="openai")) == (
        "ViT-L-14", "openai")
    assert text_model_id(encoder_config(name="ViT-B-16", pretrained="openai")) == ("ViT-B-16", "openai")


def test_missing_text_weights_name_the_model(offline_empty_hub):
    for load in (load_text_model, load_encoder):
        with pytest.raises(UserError) as err:
            load(encoder_config(name="ViT-B-32", pretrained="laion2b_s34b_b79k"))
        assert str(err.value).startswith("open_clip weights ViT-B-32/laion2b_s34b_b79k could not be loaded (")
        assert "`hf download laion/CLIP-ViT-B-32-laion2B-s34B-b79K open_clip_pytorch_model.bin`" in str(err.value)
    with pytest.raises(UserError, match="neither a file nor a pretrained tag .* set encoder.checkpoint="):
        load_encoder(encoder_config(name="ViT-B-32", pretrained="no_such_tag"))  # not a hub tag: no command


def test_weights_named_by_path_or_tag(tmp_path, monkeypatch) -> None:
    """`~` in a weights path is the home folder; a name that is neither a file nor one of the model's
    pretrained tags is refused in one line that says where the tags are listed."""
    from dsl_cli.encoder.loading import _expand, checkpoint_file

    monkeypatch.setenv("HOME", str(tmp_path))
    assert _expand("~/w.safetensors") == str(tmp_path / "w.safetensors") and _expand(None) is None
    (tmp_path / "w.safetensors").write_bytes(b"")
    assert checkpoint_file("ViT-B-32", str(tmp_path / "w.safetensors")) == str(tmp_path / "w.safetensors")
    with pytest.raises(UserError) as refused:
        checkpoint_file("ViT-B-32", "no_such_tag")
    assert str(refused.value) == ("'no_such_tag' is neither a file nor a pretrained tag of open_clip's ViT-B-32 "
                                  "(open_clip.list_pretrained() lists the tags): set encoder.checkpoint=/path/to/weights")


def test_the_cached_attention_output_is_the_block_s_own(tiny_visual, tiny_pixels) -> None:
    """cache["blocks.1.hook_attn_out"] (the heads' writes and the output bias, summed) is what the block's
    attention writes at the CLS token in a real forward pass, read there by a hook."""
    from helpers import perturb_

    enc = HookedEncoder(perturb_(tiny_visual))
    cache, seen = enc.run_with_cache(tiny_pixels), {}

    def read(x, hook):
        seen[hook.name] = x[:, 0].clone()

    enc.run_with_hooks(tiny_pixels, {"blocks.1.hook_attn_out": read, "blocks.2.hook_mlp_out": read})
    torch.testing.assert_close(cache["blocks.1.hook_attn_out"], seen["blocks.1.hook_attn_out"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cache["blocks.2.hook_mlp_out"], seen["blocks.2.hook_mlp_out"], atol=1e-5, rtol=1e-5)


def test_the_embedding_space_of_each_config_is_known_without_loading_it() -> None:
    """Model, weights tag and width: the prior's image encoder is bigG laion2b_s39b_b160k (whatever its
    `pretrained` says); open_clip's is its tag, or none for a local checkpoint or random weights."""
    from dsl_cli.config import EncoderConfig
    from dsl_cli.encoder import embedding_space
    from dsl_cli.encoder.loading import EmbeddingSpace

    def space(**fields) -> EmbeddingSpace:
        return embedding_space(EncoderConfig(**fields))

    assert space(source="tiny") == EmbeddingSpace("tiny", None, 32)
    assert space(source="kandinsky_prior", pretrained=None) == EmbeddingSpace("ViT-bigG-14", "laion2b_s39b_b160k", 1280)
    assert space(source="kandinsky_prior", name="ViT-L-14") == EmbeddingSpace("ViT-L-14", None, 768)
    assert space(name="ViT-L-14", pretrained="openai") == EmbeddingSpace("ViT-L-14", "openai", 768)
    assert space(name="ViT-L-14", pretrained="openai", checkpoint="~/mine.pt") == EmbeddingSpace("ViT-L-14", None, 768)
    assert space(name="ViT-H-14", pretrained=None) == EmbeddingSpace("ViT-H-14", None, 1024)
    with pytest.raises(UserError, match="unknown open_clip model 'ViT-Q-99'"):
        space(name="ViT-Q-99")
