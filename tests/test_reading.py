"""Reading a head: the exact direct attribution (parts sum to open_clip's own embedding; a hand computation
from the cache agrees) and the source-token decomposition of a head's CLS write (sums to the write; equals
open_clip's own forward with the other heads' output columns zeroed)."""

from __future__ import annotations

import copy

import open_clip
import pytest
import torch
from omegaconf import OmegaConf

from dsl_cli.components import Component
from dsl_cli.encoder import HookedEncoder, build_tiny_visual
from dsl_cli.encoder import openclip_api
from dsl_cli.encoder.reading import direct_attribution, head_sources
from dsl_cli.lenses import AttributionLens


def jittered(visual: torch.nn.Module, seed: int = 3) -> torch.nn.Module:
    """The tower with random LayerNorm weights and biases and attention output biases (open_clip starts them
    at 1 and 0, which would hide a mistake in the scale or the bias term)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in visual.named_parameters():
            if ("ln" in name or "out_proj.bias" in name) and param.dim() == 1:
                param.add_(0.3 * torch.randn(param.shape, generator=generator))
    return visual.eval()


def vit_b16() -> HookedEncoder:
    """open_clip's ViT-B-16 image tower (224 px, 12 layers of 12 heads, width 768) with random weights."""
    cfg = open_clip.get_model_config("ViT-B-16")
    torch.manual_seed(0)
    visual = openclip_api.build_vision_tower(cfg["embed_dim"], cfg["vision_cfg"], False)
    return HookedEncoder(jittered(visual))


@pytest.fixture(scope="module")
def tiny() -> HookedEncoder:
    return HookedEncoder(jittered(build_tiny_visual()))


def pixels(side: int, n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, side, side, generator=torch.Generator().manual_seed(1))


def hand_attribution(encoder: HookedEncoder, cache, write: torch.Tensor) -> torch.Tensor:
    """One write [B, D] through ln_post with its scale frozen, written out from the cache alone."""
    final = cache.resid[:, -1]
    mean = final.mean(-1, keepdim=True)
    sigma = ((final - mean) ** 2).mean(-1, keepdim=True).add(encoder.visual.ln_post.eps).sqrt()
    centred = write - write.mean(-1, keepdim=True)
    return (centred / sigma * encoder.visual.ln_post.weight) @ encoder.visual.proj


@pytest.mark.parametrize("build,side", [("tiny", 64), ("vit_b16", 224)])
def test_attributions_and_terms_sum_to_the_embedding(build: str, side: int, tiny) -> None:
    encoder = tiny if build == "tiny" else vit_b16()
    x = pixels(side)
    cache = encoder.run_with_cache(x)
    parts = direct_attribution(encoder, cache)
    own = encoder.embed(x)  # open_clip's own forward
    assert (parts.total() - own).abs().max() < 1e-5
    assert parts.heads.shape == (2, encoder.n_layers, encoder.n_heads, encoder.d_embed)
    assert parts.bias.abs().max() > 1e-2  # the bias term is not empty, so leaving it out would fail
    # an independent hand computation from the cache, part by part
    for layer in (0, encoder.n_layers - 1):
        for head in (0, encoder.n_heads - 1):
            hand = hand_attribution(encoder, cache, cache.head_writes[:, layer, head])
            assert (parts.heads[:, layer, head] - hand).abs().max() < 1e-6
        assert (parts.mlps[:, layer] - hand_attribution(encoder, cache, cache.mlp_writes[:, layer])).abs().max() < 1e-6
    assert (parts.embed - hand_attribution(encoder, cache, cache.resid[:, 0])).abs().max() < 1e-6
    hand_bias = encoder.visual.ln_post.bias @ encoder.visual.proj
    hand_bias = hand_bias + hand_attribution(encoder, cache, cache.attn_bias.sum(1))
    assert (parts.bias - hand_bias).abs().max() < 1e-6


def test_shares_of_every_part_sum_to_the_cosine_with_the_target(tiny) -> None:
    cache = tiny.run_with_cache(pixels(64))
    every = [Component("head", l, h) for l in range(tiny.n_layers) for h in range(tiny.n_heads)]
    every += [Component("mlp", l) for l in range(tiny.n_layers)] + [Component("embed", -1)]
    parts = direct_attribution(tiny, cache)
    lens = AttributionLens(OmegaConf.create({"name": "attribution", "target": None}))
    embeds = lens.embeddings(tiny, cache, every)
    shares = lens.values(tiny, cache, every, embeds)["attribution"]
    clean = cache.embeds
    bias_share = (parts.bias * clean).sum(-1) / clean.norm(dim=-1) ** 2
    assert (shares.sum(1) + bias_share - 1).abs().max() < 1e-5  # own embedding: the shares sum to 1
    text = torch.nn.functional.normalize(torch.randn(1, tiny.d_embed, generator=torch.Generator().manual_seed(5)))
    lens.target = text
    shares = lens.values(tiny, cache, every, embeds)["attribution"]
    cosine = torch.nn.functional.cosine_similarity(clean, text)
    bias_share = (parts.bias @ text.T).squeeze(-1) / clean.norm(dim=-1)
    assert (shares.sum(1) + bias_share - cosine).abs().max() < 1e-5
