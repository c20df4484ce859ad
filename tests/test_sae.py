"""SAE features as components (dsl_cli.sae, issue 35): SAELens folders read as SAELens writes them, encode and
decode as the formulas say, features plus error adding up to the residual, the closed-form DSL of a feature
equal to a real forward pass that steers it and patches every later write, a run over features, and the
top-activating images of a planted feature.

Shapes are asymmetric: the model has 6 layers of 8 heads (width 128), 3 images, SAEs of 40 features."""

from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path

import pytest
import torch

from dsl_cli.components import Component, parse_component
from dsl_cli.encoder import HookedEncoder
from dsl_cli.errors import UserError
from dsl_cli.sae import (FeatureEncoder, Sae, TopImages, load_sae, merge_top_rows, save_sae, steer_feature_hooked,
                         steer_features)
from helpers import docs_text, mid_visual, perturb_

D_SAE, K, N_IMAGES = 40, 6, 3


def random_sae(arch: str, hook: str, d_in: int, seed: int = 0, apply_b_dec: bool = True) -> Sae:
    g = torch.Generator().manual_seed(seed)
    return Sae(W_enc=torch.randn(d_in, D_SAE, generator=g) * 0.2, b_enc=torch.randn(D_SAE, generator=g) * 0.1,
               W_dec=torch.randn(D_SAE, d_in, generator=g) * 0.2, b_dec=torch.randn(d_in, generator=g) * 0.1,
               hook_name=hook, architecture=arch, k=K if arch == "topk" else None,
               threshold=torch.rand(D_SAE, generator=g) * 0.3 if arch == "jumprelu" else None,
               apply_b_dec_to_input=apply_b_dec)


def write_saelens(folder, arch: str, hook: str, d_in: int, seed: int = 0, nested_k: bool = False,
                  apply_b_dec: bool = True):
    """An SAE in the SAELens layout, written here with safetensors and json (not with dsl's `save_sae`)."""
    from safetensors.torch import save_file

    sae = random_sae(arch, hook, d_in, seed, apply_b_dec)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {"W_enc": sae.W_enc, "b_enc": sae.b_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec}
    if arch == "jumprelu":
        tensors["threshold"] = sae.threshold
    save_file(tensors, str(folder / "sae_weights.safetensors"))
    cfg = {"d_in": d_in, "d_sae": D_SAE, "hook_name": hook, "architecture": arch, "normalize_activations": "none",
           "apply_b_dec_to_input": apply_b_dec, "model_name": "test", "dtype": "float32"}
    if arch == "topk":
        cfg.update({"activation_fn_kwargs": {"k": K}} if nested_k else {"k": K})
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return folder, tensors


@pytest.fixture(scope="module")
def encoder() -> HookedEncoder:
    return HookedEncoder(perturb_(mid_visual(), seed=5)).eval()


@pytest.fixture(scope="module")
def pixels() -> torch.Tensor:
    return torch.randn(N_IMAGES, 3, 64, 64, generator=torch.Generator().manual_seed(7))


def formulas(arch: str, t: dict, x: torch.Tensor, apply_b_dec: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """f(x) and x_hat written out from the tensors (DESIGN.md section 7)."""
    pre = (x - t["b_dec"] * apply_b_dec) @ t["W_enc"] + t["b_enc"]
    if arch == "standard":
        f = torch.where(pre > 0, pre, torch.zeros_like(pre))
    elif arch == "jumprelu":
        f = torch.where((pre > t["threshold"]) & (pre > 0), pre, torch.zeros_like(pre))
    else:
        f = torch.zeros_like(pre)
        for row in range(pre.shape[0]):
            order = sorted(range(pre.shape[1]), key=lambda j: -pre[row, j].item())[:K]
            for j in order:
                f[row, j] = max(pre[row, j].item(), 0.0)
    return f, f @ t["W_dec"] + t["b_dec"]


ARCHS = ("standard", "topk", "jumprelu")
HOOKS = ("blocks.2.hook_resid_post", "blocks.3.hook_resid_pre", "blocks.1.hook_resid_mid", "blocks.4.hook_mlp_out",
         "blocks.2.hook_attn_out")


@pytest.mark.parametrize("arch", ARCHS)
def test_encode_decode_match_the_formulas(tmp_path, encoder, pixels, arch):
    folder, t = write_saelens(tmp_path / arch, arch, "blocks.2.hook_resid_post", encoder.d_model, nested_k=True)
    sae = load_sae(str(folder))
    assert (sae.architecture, sae.layer, sae.point, sae.d_sae) == (arch, 2, "hook_resid_post", D_SAE)
    x = encoder.run_with_cache(pixels)["blocks.2.hook_resid_post"]  # [3, 128]
    f, x_hat = formulas(arch, t, x)
    assert (sae.encode(x) > 0).any()
    torch.testing.assert_close(sae.encode(x), f, rtol=0, atol=1e-6)
    torch.testing.assert_close(sae.decode(sae.encode(x)), x_hat, rtol=0, atol=1e-5)
    if arch == "topk":
        assert ((sae.encode(x) != 0).sum(-1) <= K).all()


def test_apply_b_dec_to_input_false_and_plain_layout(tmp_path, encoder, pixels):
    folder, t = write_saelens(tmp_path / "nob", "standard", "blocks.2.hook_resid_post", encoder.d_model,
                              apply_b_dec=False)
    sae = load_sae(str(folder))
    x = encoder.run_with_cache(pixels)["blocks.2.hook_resid_post"]
    torch.testing.assert_close(sae.encode(x), formulas("standard", t, x, apply_b_dec=False)[0], rtol=0, atol=1e-6)
    # the plain layout: one .safetensors with the cfg as string metadata
    from safetensors.torch import save_file

    plain = tmp_path / "plain.safetensors"
    save_file(t, str(plain), metadata={"hook_name": "blocks.2.hook_resid_post", "architecture": "standard",
                                       "apply_b_dec_to_input": "false"})
    torch.testing.assert_close(load_sae(str(plain)).encode(x), sae.encode(x), rtol=0, atol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_features_plus_error_equal_the_residual(tmp_path, encoder, pixels, arch):
    hook = "blocks.3.hook_resid_pre"
    sae = load_sae(str(write_saelens(tmp_path / arch, arch, hook, encoder.d_model, seed=2)[0]))
    features = FeatureEncoder(encoder, sae)
    cache = features.run_with_cache(pixels)
    every = sae.components(range(D_SAE))  # all features, then the error term
    writes = features.component_writes(cache, every)  # [3, 41, 128]
    total = sae.b_dec + writes.sum(1)
    torch.testing.assert_close(total, cache[hook], rtol=0, atol=1e-5)
    assert cache[hook].sub(total).abs().max() < 1e-5
    assert writes[:, -1].norm(dim=-1).min() > 1e-3  # the error term is not empty: it carries what the SAE misses


# each architecture at two hook points, each hook point once at least (all 15 pairs cost minutes on 2 CPUs)
PAIRS = [(ARCHS[i % 3], HOOKS[i % 5]) for i in range(6)]


@pytest.mark.parametrize(("arch", "hook"), PAIRS)
def test_closed_form_feature_dsl_equals_the_hooked_run(tmp_path, encoder, pixels, arch, hook):
    sae = load_sae(str(write_saelens(tmp_path / arch, arch, hook, encoder.d_model, seed=3)[0]))
    features = FeatureEncoder(encoder, sae)
    cache = features.run_with_cache(pixels)
    active = sae.encode(cache[hook])[0].topk(2).indices.tolist()  # active in image 0 at least
    layer = sae.layer
    labels = [f"L{layer}F{i:05d}" for i in active] + [f"L{layer}Ferr", "L5H03"]  # features beside a head
    for mode, alpha in (("scale", 3.0), ("add", 1.5), ("norm", 2.0)):
        closed = features.steer(cache, labels, mode=mode, alpha=alpha)  # [3, 4, 48]
        for k, label in enumerate(labels):
            hooked = features.steer_hooked(pixels, label, mode=mode, alpha=alpha)
            relative = (hooked - closed[:, k]).norm(dim=-1) / closed[:, k].norm(dim=-1)
            assert relative.max() < 1e-5, (mode, label, relative)
    # without patching the later writes, the run differs: the patching is what the closed form rests on
    unpatched = steer_feature_hooked(encoder, sae, pixels, labels[0], "scale", 3.0, patch=False)
    if sae.layer < encoder.n_layers - 1:
        closed = steer_features(encoder, sae, cache, [parse_component(labels[0])], "scale", 3.0)[:, 0]
        assert (unpatched - closed).norm(dim=-1).max() / closed.norm(dim=-1).max() > 1e-4


def test_lenses_read_features(tmp_path, encoder, pixels):
    sae = load_sae(str(write_saelens(tmp_path / "s", "topk", "blocks.2.hook_resid_post", encoder.d_model)[0]))
    features = FeatureEncoder(encoder, sae)
    cache = features.run_with_cache(pixels)
    labels = ["L02F00007", "L02Ferr"]
    writes = features.component_writes(cache, labels)
    torch.testing.assert_close(features.direct(cache, labels), encoder.readout(writes))
    # attribution: every feature's share, the error's and b_dec's through the frozen readout sum to the block's
    from dsl_cli.encoder.reading import frozen_scale, linear_readout

    every = sae.components(range(D_SAE))
    parts = features.feature_attribution(cache, every).sum(1)
    sigma = frozen_scale(encoder, cache.resid[:, -1])
    whole = linear_readout(encoder, cache["blocks.2.hook_resid_post"], sigma)
    torch.testing.assert_close(parts + linear_readout(encoder, sae.b_dec.expand(N_IMAGES, -1), sigma), whole,
                               rtol=0, atol=1e-5)
    acts = features.activations(cache, labels)
    assert torch.isnan(acts[:, 1]).all() and (acts[:, 0] >= 0).all()


# ---------------------------------------------------------------- features through an adapter


def random_adapter(encoder, readout, q: int = 21, seed: int = 0):
    """W [q, p] and b [q] at random, for the source readout `readout` (an `adapters.Readout`)."""
    from dsl_cli.adapters import Adapter

    g = torch.Generator().manual_seed(seed)
    p = readout.width(encoder)
    return Adapter(torch.randn(q, p, generator=g) / p**0.5, torch.randn(q, generator=g),
                   {"readout": {"kind": readout.kind, "layer": readout.layer}})


# an adapter of the residual after block 2 (x_3) of the 6: SAEs that reach x_3, and SAEs after it
REACHING = ("blocks.2.hook_resid_post", "blocks.2.hook_mlp_out", "blocks.2.hook_resid_pre", "blocks.0.hook_attn_out",
            "blocks.3.hook_resid_pre")
PAST = ("blocks.3.hook_attn_out", "blocks.3.hook_resid_mid", "blocks.4.hook_resid_pre", "blocks.5.hook_resid_post")


@pytest.mark.parametrize("hook", REACHING)
def test_features_through_a_residual_adapter_steer_the_residual_it_maps(tmp_path, encoder, pixels, hook):
    """Through an adapter of x_3 (the residual after block 2), a feature's DSL is W (x_3 + delta(w)) + b, as a
    head's is (norm mode scales w to |x_3|); it was W (x_L + delta) + b, the final residual through a map
    fitted on x_3. Its direct lens is W w + b, as a head's."""
    from dsl_cli.adapters import AdaptedEncoder, Readout

    adapter = random_adapter(encoder, Readout("resid", 2))
    sae = load_sae(str(write_saelens(tmp_path / "s", "standard", hook, encoder.d_model, seed=3)[0]))
    features = FeatureEncoder(AdaptedEncoder(encoder, adapter), sae)
    cache = features.run_with_cache(pixels)
    active = sae.encode(cache[hook])[0].topk(2).indices.tolist()
    labels = [f"L{sae.layer}F{i:05d}" for i in active] + [f"L{sae.layer}Ferr", "L1H03"]  # beside a head
    writes = features.component_writes(cache, labels)  # [3, 4, 128]
    x3 = cache.resid[:, 3:4]  # [3, 1, 128]
    unit = writes / writes.norm(dim=-1, keepdim=True)
    for mode, alpha, steered in (("add", 1.5, x3 + 1.5 * writes), ("scale", 3.0, x3 + 2.0 * writes),
                                 ("norm", 2.0, x3 + 2.0 * x3.norm(dim=-1, keepdim=True) * unit)):
        closed = features.steer(cache, labels, mode=mode, alpha=alpha)  # [3, 4, 21]
        torch.testing.assert_close(closed, adapter(steered), rtol=0, atol=1e-4, msg=f"{mode} {hook}")
    clean = features.steer(cache, labels, mode="scale", alpha=1.0)  # the identity steer: the clean embedding
    torch.testing.assert_close(clean, cache.embeds[:, None].expand_as(clean), rtol=0, atol=1e-5)
    torch.testing.assert_close(features.direct(cache, labels), adapter(writes), rtol=0, atol=1e-5)


@pytest.mark.parametrize("hook", PAST)
def test_features_after_a_residual_adapter_s_block_are_refused(tmp_path, encoder, pixels, hook):
    """An SAE after block 2 writes nothing into x_3, which the adapter maps: steering its features would give
    the clean embedding for every feature, so it is refused in one line, as a later head is."""
    from dsl_cli.adapters import AdaptedEncoder, Readout

    sae = load_sae(str(write_saelens(tmp_path / "s", "standard", hook, encoder.d_model, seed=3)[0]))
    features = FeatureEncoder(AdaptedEncoder(encoder, random_adapter(encoder, Readout("resid", 2))), sae)
    cache = features.run_with_cache(pixels)
    with pytest.raises(UserError, match=rf"^SAE .* sits at {hook}, after block 2, whose residual the adapter maps: "
                                        r".*fit an adapter of block \d \(adapter.readout=resid adapter.layer=\d\)$"):
        features.steer(cache, [f"L{sae.layer}F00001"])
    features.direct(cache, [f"L{sae.layer}F00001"])  # the direct lens reads a write alone: as a later head's


def test_the_hooked_reference_of_a_feature_goes_through_the_adapter(tmp_path, encoder, pixels):
    """lens.verify's reference for a feature was the source encoder's embedding [B, 48] beside the closed form
    through the adapter [B, 21] (a crash); it is the real pass mapped, equal to the closed form, and through an
    adapter of the residual stream refused as a head's is."""
    from dsl_cli.adapters import AdaptedEncoder, Readout

    hook = "blocks.2.hook_resid_post"
    sae = load_sae(str(write_saelens(tmp_path / "s", "topk", hook, encoder.d_model, seed=3)[0]))
    adapter = random_adapter(encoder, Readout("embed"))
    features = FeatureEncoder(AdaptedEncoder(encoder, adapter), sae)
    cache = features.run_with_cache(pixels)
    labels = [f"L02F{sae.encode(cache[hook])[0].argmax().item():05d}", "L02Ferr"]
    for mode, alpha in (("norm", 2.0), ("add", 1.5)):
        closed = features.steer(cache, labels, mode=mode, alpha=alpha)
        for k, label in enumerate(labels):
            hooked = features.steer_hooked(pixels, label, mode=mode, alpha=alpha)
            torch.testing.assert_close(hooked, adapter(steer_feature_hooked(encoder, sae, pixels, label, mode, alpha)))
            torch.testing.assert_close(hooked, closed[:, k], rtol=0, atol=1e-4)
    resid = FeatureEncoder(AdaptedEncoder(encoder, random_adapter(encoder, Readout("resid", 2))), sae)
    with pytest.raises(UserError, match="^lens.verify: the hooked reference reads the embedding"):
        resid.steer_hooked(pixels, labels[0])


def fitted_adapter(folder, tmp_path, monkeypatch, capsys) -> Path:
    """`dsl adapter fit` of tiny_dinov2's embedding (64 wide) to the tiny Kandinsky 2.2's space (32)."""
    from helpers import dsl_in_process

    pictures = tmp_path / "pics"
    if not pictures.exists():
        planted_images(pictures, n=6)
    code, err = dsl_in_process(["adapter", "fit", "debug=tiny", "encoder=tiny_dinov2", f"images.path={pictures}",
                                "adapter.examples=0", f"adapter.out={folder}"], tmp_path, monkeypatch, capsys)
    assert code == 0, err[-3000:]
    return folder


def test_a_run_over_features_verifies_through_an_embedding_adapter(tmp_path, monkeypatch, capsys):
    """The audit's command: `lens.verify=true` with an SAE through an embedding adapter ended in `internal error
    ... RuntimeError: The size of tensor a (32) must match the size of tensor b (64)`, exit 1."""
    from helpers import dsl_in_process

    adapter = fitted_adapter(tmp_path / "embed", tmp_path, monkeypatch, capsys)
    run = tmp_path / "run"
    code, err = dsl_in_process(["run", "debug=tiny", "encoder=tiny_dinov2", f"adapter={adapter}",
                                f"sae={tiny_sae_folder(tmp_path / 'sae')}", "lens=steering", "lens.verify=true",
                                "images.limit=2", "sae.top_k=2", "decode.enabled=false", f"hydra.run.dir={run}"],
                               tmp_path, monkeypatch, capsys)
    assert code == 0, err[-3000:]
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["verify_ok"] and manifest["verify_max_abs_diff"] < 1e-4


def test_a_run_steering_an_sae_past_a_residual_adapter_s_block_is_refused_before_loading(tmp_path, monkeypatch,
                                                                                       capsys):
    """The SAE's hook (its cfg.json) and the adapter's block (its file) are both known before any model loads:
    an SAE at block 1 through an adapter of the residual after block 0 is one line, exit 2, nothing written;
    through an adapter of block 1 the same run completes."""
    from dsl_cli.adapters import Adapter
    from helpers import dsl_in_process

    fitted = Adapter.load(fitted_adapter(tmp_path / "embed", tmp_path, monkeypatch, capsys))
    sae = tiny_sae_folder(tmp_path / "sae")  # blocks.1.hook_resid_post
    for layer in (0, 1):  # tiny_dinov2's embedding and residual are both 64 wide: the same W read as an adapter of x
        fitted.meta["readout"] = {"kind": "resid", "layer": layer}
        fitted.save(tmp_path / f"block{layer}")
    args = ["run", "debug=tiny", "encoder=tiny_dinov2", f"sae={sae}", "lens=steering", "images.limit=1",
            "decode.enabled=false"]
    with monkeypatch.context() as patched:
        patched.setattr("dsl_cli.run.load_encoder", _no_encoder)
        code, err = dsl_in_process([*args, f"adapter={tmp_path / 'block0'}", f"hydra.run.dir={tmp_path / 'early'}"],
                                   tmp_path, patched, capsys)
    lines = [line for line in err.splitlines() if line.startswith("dsl: error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert "sits at blocks.1.hook_resid_post, after block 0, whose residual the adapter maps" in lines[0]
    assert not (tmp_path / "early").exists()
    code, err = dsl_in_process([*args, f"adapter={tmp_path / 'block1'}", f"hydra.run.dir={tmp_path / 'late'}"],
                               tmp_path, monkeypatch, capsys)
    assert code == 0, err[-3000:]


def test_labels_parse_as_before_and_features_round_trip():
    assert parse_component("L12F01234") == Component("feature", 12, feature=1234)
    assert parse_component("L3F7").label == "L03F00007"
    assert parse_component("L12Ferr") == Component("feature_error", 12)
    for label, kind in (("L30H05", "head"), ("L2MLP", "mlp"), ("L7", "resid"), ("L3mid", "resid_mid"),
                        ("embed", "embed")):
        assert parse_component(label).kind == kind
    with pytest.raises(ValueError, match="L<layer>F<feature>"):
        parse_component("L3X1")


def test_refusals(tmp_path, encoder):
    folder, _ = write_saelens(tmp_path / "wide", "standard", "blocks.2.hook_resid_post", 64)
    with pytest.raises(UserError, match="d_in=64"):
        FeatureEncoder(encoder, load_sae(str(folder)))
    folder, _ = write_saelens(tmp_path / "deep", "standard", "blocks.9.hook_resid_post", encoder.d_model)
    with pytest.raises(UserError, match="beyond"):
        FeatureEncoder(encoder, load_sae(str(folder)))
    cfg = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps({**cfg, "hook_name": "blocks.2.attn.hook_z"}))
    with pytest.raises(UserError, match="hook_name"):
        load_sae(str(folder))
    with pytest.raises(UserError, match="not an SAE"):
        load_sae(str(tmp_path))
    with pytest.raises(UserError, match="no such file or folder"):  # it said "not an SAE" of a typo
        load_sae(str(tmp_path / "my_sea"))
    with pytest.raises(UserError, match="hf download someone/saes --include 'layer_2/\\*'"):
        load_sae("layer_2", repo_id="someone/saes")


OPEN_CLIP_B16 = {"source": "open_clip", "name": "ViT-B-16", "pretrained": "laion2b_s34b_b88k"}
HF_DINO = {"source": "hf", "name": "hf", "repo_id": "facebook/dinov2-base", "checkpoint": None}


@pytest.mark.parametrize(("model_name", "by_dsl", "encoder", "refused"), [
    ("openai/clip-vit-base-patch32", False, OPEN_CLIP_B16, True),  # the same width (768), another patch size
    ("open-clip:laion/CLIP-ViT-L-14-laion2B-s32B-b82K", False, OPEN_CLIP_B16, True),  # ViT-Prisma's spelling
    ("open-clip:laion/CLIP-ViT-B-16-laion2B-s34B-b88K", False, OPEN_CLIP_B16, False),
    ("openai/clip-vit-base-patch16", False, OPEN_CLIP_B16, False),  # transformers' spelling of ViT-B-16
    ("laion/CLIP-ViT-bigG-14-laion2B-39B-b160k", False,
     {"source": "kandinsky_prior", "name": "ViT-bigG-14", "repo_id": "kandinsky-community/kandinsky-2-2-prior"}, False),
    ("timm/vit_large_patch14_clip_224.openai", False, {"source": "open_clip", "name": "ViT-L-14"}, False),
    ("ViT-B-32", False, HF_DINO, True),  # a CLIP named, the run's encoder is none
    ("ViT-L-14", False, {**HF_DINO, "checkpoint": "/weights/folder"}, False),  # the config does not name it
    ("gpt2", False, OPEN_CLIP_B16, False),  # a name dsl cannot compare: read (and logged)
    (None, False, OPEN_CLIP_B16, False),
    ("facebook/dinov2-base", True, HF_DINO, False),
    ("hf", True, HF_DINO, False),  # what `dsl sae train` wrote of a transformers model before
    ("timm/vit_base_patch16_224.augreg_in21k_ft_in1k", True, HF_DINO, True),  # dsl's own name of another encoder
    ("ViT-L-14", True, {"source": "tiny", "name": "tiny"}, True),
    # the tiny ViTs of three libraries share encoder.name `tiny`: an SAE of one is not another's
    ("tiny", True, {"source": "hf", "name": "tiny", "repo_id": "tiny-dinov2"}, True),
    ("tiny", True, {"source": "timm", "name": "tiny"}, True),
    ("tiny", True, {"source": "tiny", "name": "tiny"}, False),
])
def test_an_sae_trained_on_another_encoder_is_refused(model_name, by_dsl, encoder, refused):
    """An SAE whose cfg names (`model_name`) another encoder than the run's was read without a word when the
    widths agreed: refused where the names can be compared (CLIP ViTs, as open_clip, its hub repositories,
    transformers and timm spell them; any name `dsl sae train` wrote), read where they cannot."""
    from omegaconf import OmegaConf

    from dsl_cli.sae import check_trained_on

    sae = random_sae("standard", "blocks.1.hook_resid_post", 64)
    sae.cfg = {"model_name": model_name} if model_name else {}
    if by_dsl:
        sae.cfg["trained_by"] = "dsl sae train"
    cfg = OmegaConf.create(encoder)
    if refused:
        with pytest.raises(UserError, match=f"trained on {model_name} .* this run's encoder is "):
            check_trained_on(sae.cfg, sae.source, cfg)
    else:
        check_trained_on(sae.cfg, sae.source, cfg)


def _no_encoder(*args, **kwargs):
    raise AssertionError("the encoder was loaded")


def test_a_run_with_an_sae_of_another_encoder_ends_in_one_line(tmp_path, monkeypatch, capsys):
    from helpers import dsl_in_process

    folder = tiny_sae_folder(tmp_path / "sae")
    cfg = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps({**cfg, "model_name": "openai/clip-vit-large-patch14"}))
    monkeypatch.setattr("dsl_cli.run.load_encoder", _no_encoder)  # refused from its cfg, before any model loads
    code, err = dsl_in_process(["run", "debug=tiny", f"sae={folder}", "decode.enabled=false", "images.limit=1",
                                f"hydra.run.dir={tmp_path / 'run'}"], tmp_path, monkeypatch, capsys)
    lines = [line for line in err.splitlines() if line.startswith("dsl: error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert "trained on openai/clip-vit-large-patch14" in lines[0] and "encoder is tiny" in lines[0]
    assert "encoder=" in lines[0]


@pytest.mark.parametrize("edit, message", [
    (lambda cfg: {**cfg, "hook_name": "blocks.7.hook_resid_post"}, "hook blocks.7.hook_resid_post is beyond this "
                                                                   "encoder's 4 layers"),
    (lambda cfg: "{not json", "not readable"),
    (lambda cfg: [cfg], "not readable .*JSON list"),
    # each refused only once the encoder had loaded before: its cfg and its tensors' shapes are read first
    (lambda cfg: {**cfg, "architecture": "gated"}, "architecture 'gated' is not read by dsl"),
    (lambda cfg: {**cfg, "hook_name": "blocks.1.attn.hook_z"}, "hook_name 'blocks.1.attn.hook_z' is not one dsl"),
    (lambda cfg: {k: v for k, v in cfg.items() if k != "hook_name"}, "names no hook_name"),
    (lambda cfg: {k: v for k, v in cfg.items() if k != "k"}, "a topk SAE needs k between 1 and d_sae=40"),
    (lambda cfg: {**cfg, "d_in": 96}, "cfg says d_in=96, its weights have 64"),
    (lambda cfg: {**cfg, "normalize_activations": "expected_average_only_in"}, "normalize_activations="),
])
def test_an_sae_cfg_that_cannot_be_this_encoders_is_refused_before_the_encoder_loads(edit, message, tmp_path,
                                                                                     monkeypatch, capsys):
    """The SAE's cfg.json is read in the preflight (weights untouched): a hook past the encoder's layers or a
    damaged cfg is one line before ViT-bigG-14 would load."""
    from helpers import dsl_in_process

    folder = tiny_sae_folder(tmp_path / "sae")
    edited = edit(json.loads((folder / "cfg.json").read_text()))
    (folder / "cfg.json").write_text(edited if isinstance(edited, str) else json.dumps(edited))
    monkeypatch.setattr("dsl_cli.run.load_encoder", _no_encoder)
    code, err = dsl_in_process(["run", "debug=tiny", f"sae={folder}", "decode.enabled=false", "images.limit=1",
                                f"hydra.run.dir={tmp_path / 'run'}"], tmp_path, monkeypatch, capsys)
    lines = [line for line in err.splitlines() if line.startswith("dsl: error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert re.search(message, lines[0]), lines[0]


def test_top_images_heap_and_shard_merge():
    names = [f"img{i}" for i in range(10)]
    acts = torch.zeros(10, 3)
    acts[:, 1] = torch.arange(10.0)  # feature 1: img9 most active
    acts[[2, 5], 2] = torch.tensor([1.0, 3.0])
    whole = TopImages(3)
    for start in range(0, 10, 4):  # streamed in batches
        whole.add(names[start:start + 4], acts[start:start + 4])
    assert [n for n, _ in whole.top(1)] == ["img9", "img8", "img7"]
    assert [n for n, _ in whole.top(2)] == ["img5", "img2"] and whole.top(0) == []
    shards = []
    for part in (range(0, 5), range(5, 10)):  # two shards, merged
        top = TopImages(3)
        top.add([names[i] for i in part], acts[list(part)])
        shards.append(top.rows([1, 2], layer=4))
    assert merge_top_rows(shards, 3) == whole.rows([1, 2], layer=4)


# ---------------------------------------------------------------- dsl run over features


def tiny_sae_folder(folder, arch: str = "topk"):
    """An SAE for debug=tiny's ViT (width 64) at block 1's output, in the SAELens layout."""
    return write_saelens(folder, arch, "blocks.1.hook_resid_post", 64, seed=4)[0]


def test_a_run_continued_after_its_sae_was_trained_again_is_refused(tmp_path, monkeypatch, capsys):
    """The manifest records a fingerprint of the SAE's weights; a continued run (resume=) whose SAE folder now
    holds other weights would mix two SAEs' features in one table: refused in one line, nothing written."""
    from helpers import dsl_in_process

    sae = tiny_sae_folder(tmp_path / "sae")
    run = tmp_path / "run"
    args = ["run", "debug=tiny", f"sae={sae}", "decode.enabled=false", "images.limit=1", f"hydra.run.dir={run}"]
    code, err = dsl_in_process(args, tmp_path, monkeypatch, capsys)
    assert code == 0, err
    assert len(json.loads((run / "manifest.json").read_text())["fingerprints"]["sae"]) == 16
    before = (run / "similarity.csv").read_bytes()
    write_saelens(tmp_path / "sae", "topk", "blocks.1.hook_resid_post", 64, seed=5)  # trained again
    code, err = dsl_in_process(["run", f"resume={run}"], tmp_path, monkeypatch, capsys)
    lines = [line for line in err.splitlines() if line.startswith("dsl: error:")]
    assert code == 2 and len(lines) == 1 and "changed since the run started" in lines[0], err[-3000:]
    assert (run / "similarity.csv").read_bytes() == before
    write_saelens(tmp_path / "sae", "topk", "blocks.1.hook_resid_post", 64, seed=4)  # given back
    assert dsl_in_process(["run", f"resume={run}"], tmp_path, monkeypatch, capsys)[0] == 0


def readme_example() -> tuple[str, list[str]]:
    """The user guide's "SAE features" example: its Python block and its `dsl` command's words."""
    import re
    import shlex

    section = re.search(r"## SAE features\n(.*?)\n## ", docs_text(), re.S).group(1)
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    line = re.search(r"```sh\n(.*?)```", section, re.S).group(1).strip()
    return code, shlex.split(line)


def test_run_over_features_end_to_end(tmp_path, monkeypatch, capsys):
    """The README's worked example, as typed (in this process): a run over a tiny SAE's features."""
    from helpers import dsl_in_process

    code, words = readme_example()
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    assert (tmp_path / "my_sae" / "cfg.json").is_file() and load_sae("my_sae").architecture == "topk"
    assert words[:2] == ["dsl", "run"] and "sae=my_sae" in words  # short for sae.path=my_sae
    run = tmp_path / "run"
    code, err = dsl_in_process([*words[1:], f"hydra.run.dir={run}"], tmp_path, monkeypatch, capsys)
    assert code == 0, err
    with (run / "similarity.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    manifest = json.loads((run / "manifest.json").read_text())
    per_image = manifest["sae"]["per_image"]
    assert set(per_image) == {"astronaut", "chelsea"} and all(len(v) == 2 for v in per_image.values())
    chosen = sorted({label for labels in per_image.values() for label in labels})
    assert all(len(labels) < len(chosen) for labels in per_image.values())  # the images' top features differ
    for image, labels in per_image.items():
        mine = {r["component"]: r for r in rows if r["image"] == image}
        assert sorted(mine) == chosen + ["L01Ferr"]  # every chosen feature scored in every image, and the error
        assert all(mine[c]["kind"] == "feature" and mine[c]["layer"] == "1" for c in chosen)
        assert mine["L01Ferr"]["kind"] == "feature_error" and mine["L01Ferr"]["activation"] == ""
        decoded = {c for c, r in mine.items() if r["file"]}
        assert decoded == set(labels) | {"L01Ferr"}  # an image decodes its own top features only
        for c in decoded:
            assert (run / mine[c]["file"]).is_file() and float(mine[c]["activation"] or 1) > 0
    assert manifest["verify_ok"] and manifest["verify_max_abs_diff"] < 1e-5  # lens.verify: hooked == closed
    assert sorted(p.name for p in (run / "grids").iterdir()) == ["astronaut_steering_L01.png",
                                                                  "chelsea_steering_L01.png"]
    with (run / "features.csv").open() as handle:
        tops = list(csv.DictReader(handle))
    assert sorted({r["component"] for r in tops}) == chosen
    assert all(re.fullmatch(r"-?\d+\.\d{6}", r["activation"]) for r in tops), tops  # 6 decimals, as every CSV
    page = (run / "index.html").read_text()
    assert 'id="sae-features"' in page and all(f'id="{c}"' in page for c in chosen)
    assert "images/astronaut/input.png" in page.split('id="sae-features"')[1]
    for damage in ("component,rank\n", "component,feature,rank,image,activation\n../x,1,1,astronaut,0.5\n"):
        (run / "features.csv").write_text(damage)  # a column gone; a name that is a path
        code, err = dsl_in_process(["report", str(run)], tmp_path, monkeypatch, capsys)
        lines = [line for line in err.splitlines() if line.startswith("dsl: error:")]
        assert code == 2 and len(lines) == 1 and "features.csv" in lines[0], err[-2000:]


def planted_images(folder, n: int = 7, planted=(1, 4, 5)):
    """n pictures of smooth noise; a bright checkerboard patch in the top left corner of those in `planted`."""
    from PIL import Image

    folder.mkdir()
    g = torch.Generator().manual_seed(11)
    for i in range(n):
        base = torch.nn.functional.interpolate(torch.rand(1, 3, 8, 8, generator=g), size=64, mode="bilinear")[0]
        base = 0.25 + 0.4 * base
        if i in planted:
            checker = ((torch.arange(24)[:, None] // 4 + torch.arange(24)[None] // 4) % 2).float()
            base[:, :24, :24] = checker
        array = (base.permute(1, 2, 0).numpy() * 255).astype("uint8")
        Image.fromarray(array).save(folder / f"pic{i}.png")
    return [f"pic{i}" for i in planted]


def test_top_images_of_a_planted_feature_are_where_it_was_planted(tmp_path, monkeypatch, capsys):
    """A feature built along the direction the planted patch adds to block 1's CLS residual: its top images,
    from two shards merged, are exactly the planted pictures."""
    from dsl_cli.config import EncoderConfig
    from dsl_cli.encoder import load_encoder
    from dsl_cli.sae import merge_top_rows
    from helpers import dsl_in_process
    from PIL import Image

    planted = planted_images(tmp_path / "pics")
    encoder, preprocess = load_encoder(EncoderConfig(source="tiny"))
    names = sorted(p.stem for p in (tmp_path / "pics").iterdir())
    pixels = torch.stack([preprocess(Image.open(tmp_path / "pics" / f"{n}.png").convert("RGB")) for n in names])
    x = encoder.run_with_cache(pixels)["blocks.1.hook_resid_post"]
    mask = torch.tensor([n in planted for n in names])
    sae = random_sae("standard", "blocks.1.hook_resid_post", 64, seed=6, apply_b_dec=False)
    sae.b_enc -= 10.0  # every random feature silent ...
    u = x[mask].mean(0) - x[~mask].mean(0)
    u = u / u.norm()
    scores = x @ u  # ... but feature 17, which reads the planted direction above the plain pictures' level
    sae.W_enc[:, 17], sae.b_enc[17] = u, -(scores[~mask].max() + scores[mask].min()) / 2
    assert scores[mask].min() > scores[~mask].max()
    save_sae(sae, tmp_path / "planted")
    shards = []
    for shard in (0, 1):
        run = tmp_path / f"shard{shard}"
        code, err = dsl_in_process(["run", "debug=tiny", f"sae.path={tmp_path / 'planted'}", "lens=direct",
                                    f"images.path={tmp_path / 'pics'}", "decode.enabled=false", "sae.features=[17,3]",
                                    "sae.top_images=3", f"images.shard={shard}", "images.num_shards=2",
                                    f"hydra.run.dir={run}"], tmp_path, monkeypatch, capsys)
        assert code == 0, err
        with (run / "features.csv").open() as handle:
            shards.append(list(csv.DictReader(handle)))
        assert {r["image"] for r in shards[-1]} <= {n for n in names[shard::2]}  # a shard sees its own images
    merged = merge_top_rows(shards, 3)
    assert [r["image"] for r in merged if r["feature"] == 17] == sorted(planted, key=lambda n: -scores[names.index(n)])
    assert not [r for r in merged if r["feature"] == 3]  # a silent feature has no top image


def test_topk_zeroes_negative_top_values(tmp_path, encoder, pixels):
    """SAELens's TopK applies ReLU to the k values it keeps: with every pre-activation pushed below 0 but
    a few, fewer than k features are active, and none negative."""
    folder, t = write_saelens(tmp_path / "neg", "topk", "blocks.2.hook_resid_post", encoder.d_model)
    sae = load_sae(str(folder))
    x = encoder.run_with_cache(pixels)["blocks.2.hook_resid_post"]
    pre = sae.pre(x)
    sae.b_enc = sae.b_enc - pre.sort(-1, descending=True).values[:, 2].max()  # at most 2 positive per image
    t = {**t, "b_enc": sae.b_enc}
    f = sae.encode(x)
    assert ((f > 0).sum(-1) <= 2).all() and (f >= 0).all() and (sae.pre(x).topk(K).values < 0).any()
    torch.testing.assert_close(f, formulas("topk", t, x)[0], rtol=0, atol=1e-6)


# ---------------------------------------------------------------- dsl sae train


def test_sae_train_explains_the_residuals_and_resumes_after_sigterm_to_the_same_weights(tmp_path, monkeypatch,
                                                                                           capsys):
    """A TopK SAE (96 features, k 8) trained on debug=tiny's block 1 over 10 generated pictures explains more
    than 60 % of the residuals' variance (every token); stopped by SIGTERM after step 5 and started again, it
    ends with the very weights of a training never stopped."""
    import os
    import signal

    from safetensors.torch import load_file

    from dsl_cli import sae_train
    from helpers import dsl_in_process

    planted_images(tmp_path / "pics", n=10, planted=(2, 7))
    args = ["sae", "train", "debug=tiny", "layer=1", f"images.path={tmp_path / 'pics'}", "train.d_sae=96",
            "train.k=8", "train.epochs=7", "train.batch_size=4", "train.lr=5e-3", "train.checkpoint_every=4"]
    code, err = dsl_in_process([*args, f"train.out={tmp_path / 'whole'}"], tmp_path, monkeypatch, capsys)
    assert code == 0, err
    metrics = json.loads((tmp_path / "whole" / "training.json").read_text())
    assert metrics["steps"] == 21 and metrics["tokens"] == 10 * 17 and metrics["explained_variance"] > 0.6
    assert 0 <= metrics["dead_features"] < 96 and not (tmp_path / "whole" / "checkpoint.pt").exists()
    sae = load_sae(str(tmp_path / "whole"))  # SAELens layout, read back by `sae.path=`
    assert (sae.architecture, sae.k, sae.hook_name, sae.d_sae) == ("topk", 8, "blocks.1.hook_resid_post", 96)

    def stop_after_5(step: int) -> None:
        if step == 5:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(sae_train, "_after_step", stop_after_5)
    code, err = dsl_in_process([*args, f"train.out={tmp_path / 'stopped'}"], tmp_path, monkeypatch, capsys)
    assert code == 128 + signal.SIGTERM, err
    assert (tmp_path / "stopped" / "checkpoint.pt").is_file() and not (tmp_path / "stopped" / "cfg.json").exists()
    manifest = json.loads((tmp_path / "stopped" / "manifest.json").read_text())
    assert manifest["status"] == "interrupted" and manifest["error"] == "interrupted by SIGTERM"  # was `started`
    monkeypatch.setattr(sae_train, "_after_step", lambda step: None)
    code, err = dsl_in_process([*args, f"train.out={tmp_path / 'stopped'}"], tmp_path, monkeypatch, capsys)
    assert code == 0, err
    whole, resumed = (load_file(str(tmp_path / name / "sae_weights.safetensors")) for name in ("whole", "stopped"))
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(whole[name], resumed[name]), name
    assert json.loads((tmp_path / "stopped" / "manifest.json").read_text())["status"] == "complete"


def test_sae_train_asks_for_its_layer(tmp_path, monkeypatch, capsys):
    """Without `layer=`, `dsl sae train` took the run config's layer=30: refused on a small encoder with a
    line about a layer nobody gave, and on ViT-bigG-14 (48 blocks) trained at block 30 without a word."""
    from helpers import dsl_in_process

    out = tmp_path / "sae"
    code, err = dsl_in_process(["sae", "train", "debug=tiny", f"images.path={tmp_path}", f"train.out={out}"],
                               tmp_path, monkeypatch, capsys)
    lines = [line for line in err.splitlines() if line.startswith("dsl: error:")]
    assert code == 2 and len(lines) == 1 and "give the block to train at, layer=N" in lines[0], err[-3000:]
    assert "30" not in lines[0] and not out.exists()
    code, err = dsl_in_process(["sae", "train", "debug=tiny", "layer=1,2", f"images.path={tmp_path}",
                                f"train.out={out}"], tmp_path, monkeypatch, capsys)
    assert code == 2 and err.startswith("dsl: error: layer=1,2: a comma or range() sweeps") and err.count("\n") == 1
    assert not out.exists()


def _no_images(*args, **kwargs):
    raise AssertionError("the images were loaded")


@pytest.mark.parametrize("preset", [["debug=tiny", "encoder=tiny_timm"], ["debug=tiny_timm"]])
def test_sae_train_refuses_an_encoder_without_a_cls_readout(preset, tmp_path, monkeypatch, capsys):
    """A mean-pooled ViT (the tiny timm one) trained an SAE, exit 0, that `dsl run sae=` then refused ("SAE
    features need a CLS readout"): refused in one line, exit 2, before any model loads where the config tells
    the readout, else right after the encoder loads; no image read, no folder made."""
    from helpers import dsl_in_process

    planted_images(tmp_path / "pics", n=2, planted=(1,))
    out = tmp_path / "sae"
    args = ["sae", "train", *preset, "layer=1", f"images.path={tmp_path / 'pics'}", "train.d_sae=16", "train.k=2",
            "train.epochs=1", f"train.out={out}"]
    monkeypatch.setattr("dsl_cli.images.load_images", _no_images)
    with monkeypatch.context() as patched:
        patched.setattr("dsl_cli.encoder.load_encoder", _no_encoder)  # the config tells: tiny timm pools by mean
        code, err = dsl_in_process(args, tmp_path, patched, capsys)
    lines = [line for line in err.splitlines() if line.startswith("dsl: error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert "reads its embedding by mean pooling" in lines[0] and "encoder=tiny" in lines[0] and not out.exists()
    monkeypatch.setattr("dsl_cli.sae_train.known_readout", lambda cfg: None)  # a config that does not tell
    code, err = dsl_in_process(args, tmp_path, monkeypatch, capsys)
    assert code == 2 and err.count("dsl: error:") == 1 and "by mean pooling" in err and not out.exists(), err


def test_a_failed_sae_training_is_recorded_and_continued(tmp_path, monkeypatch, capsys):
    """A training that fails (here its loss turns NaN, which wrote an SAE of NaN) says so in its manifest, as
    a run's does (it said `started`); the same command, fixed, continues in its folder (a stopped one:
    `test_sae_train_explains_the_residuals_and_resumes_after_sigterm_to_the_same_weights`)."""
    from helpers import dsl_in_process

    planted_images(tmp_path / "pics", n=2, planted=(1,))
    out = tmp_path / "sae"
    args = ["sae", "train", "debug=tiny", "layer=1", f"images.path={tmp_path / 'pics'}", "train.d_sae=16",
            "train.k=2", "train.epochs=2", "train.batch_size=2", f"train.out={out}"]
    code, err = dsl_in_process([*args, "train.lr=1e30"], tmp_path, monkeypatch, capsys)
    lines = [line for line in err.splitlines() if line.startswith("dsl: error:")]
    assert code == 2 and len(lines) == 1 and "not finite" in lines[0], err[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "failed" and "not finite" in manifest["error"] and manifest["kind"] == "sae"
    assert not (out / "cfg.json").exists()
    code, err = dsl_in_process(args, tmp_path, monkeypatch, capsys)
    assert code == 0, err[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and "error" not in manifest and manifest["kind"] == "sae"
    assert json.loads((out / "cfg.json").read_text())["model_name"] == "tiny"  # what `dsl run sae=` compares


class _Planted:
    """A pickle that, loaded with `weights_only=False`, would write a file: what a planted checkpoint may do."""

    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (Path.write_text, (Path(self.target), "ran"))


def test_sae_train_writes_only_its_own_folder_and_refuses_the_rest_in_one_line(tmp_path, monkeypatch, capsys):
    """`dsl sae train` claims its folder as `dsl run` claims a run's: a misspelt setting, a folder of the
    user's, a planted link, a finished SAE and a checkpoint that is not its own (here one whose pickle would
    run code) are each one `dsl: error:` line with status 2, and nothing of the user's changes."""
    from helpers import dsl_in_process

    planted_images(tmp_path / "pics", n=4, planted=(1,))
    args = ["sae", "train", "debug=tiny", "layer=1", f"images.path={tmp_path / 'pics'}", "train.d_sae=32",
            "train.k=4", "train.epochs=1"]

    def refused(out: str, *extra: str) -> str:
        code, err = dsl_in_process([*args, *extra, f"train.out={tmp_path / out}"], tmp_path, monkeypatch, capsys)
        lines = [line for line in err.splitlines() if line.startswith("dsl: error:")]
        assert code == 2 and len(lines) == 1 and "Traceback" not in err, err[-3000:]
        return lines[0]

    assert "train.kk=3: no such setting" in refused("any", "train.kk=3")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "cfg.json").write_text("precious")
    assert "not a dsl folder" in refused("mine") and (tmp_path / "mine" / "cfg.json").read_text() == "precious"
    code, err = dsl_in_process([*args, f"train.out={tmp_path / 'done'}"], tmp_path, monkeypatch, capsys)
    assert code == 0, err
    weights = (tmp_path / "done" / "sae_weights.safetensors").read_bytes()
    umask = os.umask(0)
    os.umask(umask)
    for name in ("sae_weights.safetensors", "cfg.json", "training.json"):  # as any new file: 0644 under 022
        assert (tmp_path / "done" / name).stat().st_mode & 0o777 == 0o666 & ~umask, name
    line = refused("done", "train.d_sae=16")
    assert "already holds an SAE, complete: to make it again" in line and "choose another train.out" in line
    assert (tmp_path / "done" / "sae_weights.safetensors").read_bytes() == weights
    (tmp_path / "done" / "training.json").unlink()
    (tmp_path / "done" / "training.json").symlink_to(tmp_path / "mine" / "cfg.json")
    assert "symbolic link" in refused("done")
    (tmp_path / "evil").mkdir()
    (tmp_path / "evil" / "manifest.json").write_text(json.dumps({"made_by": "dsl", "kind": "sae", "status": "started"}))
    torch.save({"identity": _Planted(str(tmp_path / "ran.txt"))}, tmp_path / "evil" / "checkpoint.pt")
    assert "evil/checkpoint.pt: not a checkpoint of `dsl sae train`" in refused("evil")
    assert not (tmp_path / "ran.txt").exists()
    # any pickle: torch's weights-only loader warned of its protocol on the terminal, above the one line
    import pickle
    import warnings

    planted = pickle.dumps({"identity": "someone's", "step": 3}, protocol=4)
    (tmp_path / "evil" / "checkpoint.pt").write_bytes(planted)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert "evil/checkpoint.pt: not a checkpoint of `dsl sae train`" in refused("evil")
    assert not caught, [str(w.message) for w in caught]
    assert (tmp_path / "evil" / "checkpoint.pt").read_bytes() == planted  # left as it was


def test_sae_from_the_hugging_face_cache(tmp_path, monkeypatch, encoder, pixels):
    """sae.repo_id + sae.path: the folder inside the repository, looked up in the hub cache (offline)."""
    import huggingface_hub.constants as constants

    cache = tmp_path / "hub"
    repo = cache / "models--someone--vit-saes"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    folder, _ = write_saelens(repo / "snapshots" / commit / "layer_2", "jumprelu", "blocks.2.hook_resid_post",
                              encoder.d_model)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    sae = load_sae("layer_2", repo_id="someone/vit-saes")
    x = encoder.run_with_cache(pixels)["blocks.2.hook_resid_post"]
    torch.testing.assert_close(sae.encode(x), load_sae(str(folder)).encode(x), rtol=0, atol=0)
    with pytest.raises(UserError, match="hf download someone/vit-saes --include 'layer_9/\\*'"):
        load_sae("layer_9", repo_id="someone/vit-saes")
    # an SAE that is one file of the repository: named as a file (`--include 'FILE/*'` fetched nothing)
    from safetensors.torch import save_file

    tensors = {name: getattr(sae, name) for name in ("W_enc", "b_enc", "W_dec", "b_dec")}
    save_file(tensors, str(folder.parent / "plain.safetensors"), metadata={"hook_name": "blocks.2.hook_resid_post"})
    assert load_sae("plain.safetensors", repo_id="someone/vit-saes").architecture == "standard"
    with pytest.raises(UserError, match=r"fetch it with: hf download someone/vit-saes sae/layer_9.safetensors$"):
        load_sae("sae/layer_9.safetensors", repo_id="someone/vit-saes")


@pytest.mark.parametrize(("overrides", "fragment"), [
    (["lens=diffusion"], "lens=diffusion reads the residual stream, not features"),
    (["study=head_importance"], "an interventional study ablates heads"),
    (["sae.features=[3,x]"], "use top, or a list of feature indices"),
    (["sae.features=[12,3,12]"], "sae.features=[12, 3, 12] names feature 12 twice: give each feature once"),
    (["sae.top_k=0"], "must be at least 1"),
    (["component=[L01F00001]"], "chosen by sae.features"),  # was ignored: the run read the top features
    (["component=[L1H02]"], "drop component="),
])
def test_run_refusals_before_any_model(tmp_path, monkeypatch, capsys, overrides, fragment):
    from helpers import dsl_in_process

    sae = tiny_sae_folder(tmp_path / "sae")
    code, err = dsl_in_process(["run", "debug=tiny", f"sae.path={sae}", *overrides], tmp_path, monkeypatch, capsys)
    assert code == 2 and fragment in err, err


@pytest.mark.parametrize(("layer", "allowed"), [("1", True), ("-3", True), ("2", False), ("-1", False),
                                                ("all", False), ("'[1,2]'", False)])
def test_a_layer_on_the_command_line_that_is_not_the_saes_is_refused(tmp_path, monkeypatch, capsys, layer, allowed):
    """The SAE is read at its own layer (1 of debug=tiny's 4): `layer=` naming it, or its negative index,
    runs; any other was ignored without a word and is refused in one line. debug=tiny's own layer is not
    asked for and never refused (the other tests of this module run with it)."""
    from helpers import dsl_in_process

    sae = tiny_sae_folder(tmp_path / "sae")
    args = ["run", "debug=tiny", f"sae={sae}", "decode.enabled=false", "images.limit=1", f"layer={layer}",
            f"hydra.run.dir={tmp_path / 'run'}"]
    code, err = dsl_in_process(args, tmp_path, monkeypatch, capsys)
    lines = [line for line in err.splitlines() if line.startswith("dsl: error:")]
    if allowed:
        assert code == 0, err[-3000:]
    else:
        assert code == 2 and len(lines) == 1 and "reads its features at layer 1" in lines[0], err[-3000:]


def test_a_feature_that_is_off_in_an_image_ranks_last_and_is_not_decoded_by_top_k(tmp_path, monkeypatch, capsys):
    """A feature whose activation is 0 writes nothing: its embedding is the clean one (cosine 1), which ranked
    it first, so that `decode.top_k` decoded the input picture instead of the active features."""
    from helpers import dsl_in_process

    sae = tiny_sae_folder(tmp_path / "sae")
    run = tmp_path / "run"
    args = ["run", "debug=tiny", f"sae={sae}", "sae.features=[0,1,2,3,4,5,6,7]", "images.limit=2", "decode.top_k=2",
            "decode.steps=1", f"hydra.run.dir={run}"]
    code, err = dsl_in_process(args, tmp_path, monkeypatch, capsys)
    assert code == 0, err
    with (run / "similarity.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    for image in {r["image"] for r in rows}:
        mine = sorted((r for r in rows if r["image"] == image), key=lambda r: int(r["rank"]))
        off = [r for r in mine if r["kind"] == "feature" and float(r["activation"]) == 0]
        on = [r for r in mine if r not in off]
        assert off and on, "the planted SAE should leave some of these features off in each image"
        assert mine == on + off  # the features that are off rank after every component that writes
        assert all(float(r["norm"]) == 0 and not r["file"] for r in off)
        assert {r["component"] for r in mine if r["file"]} == {r["component"] for r in on[:2]}


def test_sae_train_looks_its_weights_up_first(tmp_path, monkeypatch, capsys):
    """`dsl sae train encoder=vitl14` without the weights went to open_clip's loader, which retried the hub for
    most of a minute; the preflight names what to fetch at once, before any folder is made."""
    import huggingface_hub.constants as constants
    from helpers import dsl_in_process

    from dsl_cli import weights

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    looked_up = []
    original = weights.require
    monkeypatch.setattr(weights, "require", lambda needs: looked_up.append(needs) or original(needs))
    out = tmp_path / "sae"
    code, err = dsl_in_process(["sae", "train", "encoder=vitl14", "layer=3", "images.limit=2", f"train.out={out}"],
                               tmp_path, monkeypatch, capsys)
    assert code == 2 and looked_up and "hf download" in err and not out.exists(), err


def test_a_run_over_relative_paths_resumes_from_another_folder(tmp_path, monkeypatch, capsys):
    """`dsl run sae=my_sae images.path=photos ...` interrupted, then `dsl run resume=/abs/run` from another
    folder: the saved relative paths were read from there ("sae.path=my_sae: not an SAE"), and the run was
    marked failed. Paths that name something where the run starts are recorded absolute."""
    from helpers import dsl_in_process

    tiny_sae_folder(tmp_path / "my_sae")
    from PIL import Image

    (tmp_path / "photos").mkdir()
    for n in range(2):
        Image.effect_noise((64, 48), 40 + 20 * n).convert("RGB").save(tmp_path / "photos" / f"p{n}.png")
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    args = ["run", "debug=tiny", "sae=my_sae", "images.path=photos", "decode.enabled=false", f"hydra.run.dir={run}"]
    code, err = dsl_in_process(args, tmp_path, monkeypatch, capsys)
    assert code == 0, err
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code, err = dsl_in_process(["run", f"resume={run}"], elsewhere, monkeypatch, capsys)
    assert code == 0, err
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["config"]["sae"]["path"] == str(tmp_path / "my_sae")
    assert manifest["config"]["images"]["path"] == str(tmp_path / "photos")


def test_a_training_s_checkpoint_names_its_encoder_whole() -> None:
    """A checkpoint is continued only by the training it belongs to: its identity named the encoder by source
    and name alone (`hf` for every transformers model), so one model's checkpoint continued with another's."""
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from dsl_cli.sae_train import Setup, TrainOptions

    def identity(**encoder) -> dict:
        cfg = OmegaConf.create({"encoder": {"source": "hf", "name": "hf", "pretrained": None, "checkpoint": None,
                                            "repo_id": "facebook/dinov2-small", "subfolder": "", **encoder}})
        setup = SimpleNamespace(cfg=cfg, hook="blocks.1.hook_resid_post", d_in=64, d_sae=512, images=[],
                                options=TrainOptions())
        return Setup.identity(setup)

    assert identity() == identity()
    assert identity(repo_id="facebook/dinov2-base") != identity()
    assert identity(checkpoint="/models/mine") != identity() and identity(pretrained="laion") != identity()


@pytest.mark.parametrize("damage, message", [
    ("W_dec", "W_dec has shape (64, 40), expected (40, 64)"),
    ("b_dec", "no tensor b_dec"),
    ("features", "sae.features=[12, 40]: this SAE's features run from 0 to 39"),
])
def test_an_saes_tensors_and_features_are_checked_before_the_encoder_loads(damage, message, tmp_path, monkeypatch,
                                                                         capsys):
    """Shapes come from the weights file's header (no values read): a tensor missing or of the wrong shape, or a
    feature the SAE does not have, is one line before the encoder (ViT-bigG-14) would load."""
    from safetensors.torch import load_file, save_file

    from helpers import dsl_in_process

    folder = tiny_sae_folder(tmp_path / "sae")
    tensors = load_file(str(folder / "sae_weights.safetensors"))
    if damage == "W_dec":
        tensors["W_dec"] = tensors["W_dec"].T.contiguous()
    elif damage == "b_dec":
        del tensors["b_dec"]
    save_file(tensors, str(folder / "sae_weights.safetensors"))
    features = ["sae.features=[12,40]"] if damage == "features" else []
    monkeypatch.setattr("dsl_cli.run.load_encoder", _no_encoder)
    code, err = dsl_in_process(["run", "debug=tiny", f"sae={folder}", *features, "decode.enabled=false",
                                "images.limit=1", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path, monkeypatch, capsys)
    lines = [line for line in err.splitlines() if line.startswith("dsl: error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert message in lines[0], lines[0]


def test_a_plain_file_s_string_metadata_holds_a_topk_sae(tmp_path, encoder, pixels):
    """A .safetensors file's metadata holds only strings: `k`, `d_in` and `d_sae` as digits are the numbers (a
    TopK SAE could not be given in this layout), anything else is one line naming the metadata."""
    from safetensors.torch import save_file

    _, t = write_saelens(tmp_path / "folder", "topk", "blocks.2.hook_resid_post", encoder.d_model)
    meta = {"hook_name": "blocks.2.hook_resid_post", "architecture": "topk", "k": str(K),
            "d_in": str(encoder.d_model), "d_sae": str(D_SAE)}
    save_file(t, str(tmp_path / "plain.safetensors"), metadata=meta)
    x = encoder.run_with_cache(pixels)["blocks.2.hook_resid_post"]
    torch.testing.assert_close(load_sae(str(tmp_path / "plain.safetensors")).encode(x), formulas("topk", t, x)[0],
                               rtol=0, atol=1e-6)
    save_file(t, str(tmp_path / "bad.safetensors"), metadata={**meta, "k": "six"})
    with pytest.raises(UserError, match=r"k='six', which is not a whole number; fix its metadata"):
        load_sae(str(tmp_path / "bad.safetensors"))


@pytest.mark.parametrize("name", ["W_enc", "b_enc", "W_dec", "b_dec", "threshold"])
def test_nan_weights_are_named_as_a_damaged_file(name, tmp_path):
    """A NaN in W_enc or the threshold compares false: every feature read as off, and the run said 'no feature
    is active' instead of naming the file."""
    from safetensors.torch import load_file, save_file

    folder = write_saelens(tmp_path / "sae", "jumprelu", "blocks.1.hook_resid_post", 64)[0]
    tensors = load_file(str(folder / "sae_weights.safetensors"))
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    save_file(tensors, str(folder / "sae_weights.safetensors"))
    with pytest.raises(UserError, match=rf"{name} holds NaN or inf: the file is damaged"):
        load_sae(str(folder))
