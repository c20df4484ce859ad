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
from dsl_cli.encoder.reading import direct_attribution, frozen_scale, head_sources, source_shares
from dsl_cli.errors import UserError
from helpers import mid_visual
from dsl_cli.lenses import (AttributionLens, Looks, ScoredImages, describe, encode_texts, imagenet_classifier,
                             prepare_text, text_span)


def jittered(visual: torch.nn.Module, seed: int = 3) -> torch.nn.Module:
    """The tower with random LayerNorm weights and biases and attention input and output biases (open_clip
    starts them at 1 and 0, which would hide a mistake in the scale or a bias left out)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in visual.named_parameters():
            if ("ln" in name or "proj_bias" in name or "out_proj.bias" in name) and param.dim() == 1:
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


def test_frozen_scale_is_ln_posts_standard_deviation_per_image(tiny) -> None:
    final = torch.randn(3, tiny.d_model, generator=torch.Generator().manual_seed(2)) * torch.tensor([[1.0], [5.0], [0.2]])
    sigma = frozen_scale(tiny, final)
    assert sigma.shape == (3, 1)
    hand = (((final - final.mean(-1, keepdim=True)) ** 2).mean(-1) + tiny.visual.ln_post.eps).sqrt()
    torch.testing.assert_close(sigma[:, 0], hand)


def test_attributions_of_a_tower_without_projection_sum_to_its_embedding() -> None:
    """open_clip drops `proj` when it prunes a tower's head: the parts are then D-wide and still add up."""
    visual = jittered(build_tiny_visual())
    visual.proj = None
    encoder = HookedEncoder(visual)
    x = pixels(64)
    parts = direct_attribution(encoder, encoder.run_with_cache(x))
    assert parts.heads.shape == (2, encoder.n_layers, encoder.n_heads, encoder.d_model)
    assert (parts.total() - encoder.embed(x)).abs().max() < 1e-5
    assert parts.bias.abs().max() > 1e-2


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
    for k in (0, 5, len(every) - 1):  # and each is t . part / (|e| |t|), t = e here
        torch.testing.assert_close(shares[:, k], (embeds[:, k] * clean).sum(-1) / clean.norm(dim=-1) ** 2)
    text = torch.nn.functional.normalize(torch.randn(1, tiny.d_embed, generator=torch.Generator().manual_seed(5)))
    lens.target = text
    shares = lens.values(tiny, cache, every, embeds)["attribution"]
    cosine = torch.nn.functional.cosine_similarity(clean, text)
    bias_share = (parts.bias @ text.T).squeeze(-1) / clean.norm(dim=-1)
    assert (shares.sum(1) + bias_share - cosine).abs().max() < 1e-5
    for k in (0, 5, len(every) - 1):
        torch.testing.assert_close(shares[:, k], (embeds[:, k] @ text.T).squeeze(-1) / clean.norm(dim=-1))
    lens.target = torch.ones(1, 16)
    with pytest.raises(UserError) as refused:
        lens.values(tiny, cache, every, embeds)
    assert str(refused.value) == ("lens.target: the text tower's embeddings (16) do not match the image encoder's "
                                  f"({tiny.d_embed}); set encoder.text_name")


def test_a_text_target_is_prepared_before_the_encoder_loads() -> None:
    cfg = OmegaConf.create({"name": "attribution", "target": "a photo of a cat"})
    assert AttributionLens(cfg).prepare_stage == "target" and AttributionLens(cfg).cfg is cfg
    assert AttributionLens(OmegaConf.create({"name": "attribution", "target": None})).prepare_stage is None
    assert AttributionLens().prepare_stage is None


def only_head(visual: torch.nn.Module, layer: int, head: int) -> torch.nn.Module:
    """A copy of the tower whose block `layer` keeps only `head`'s columns of the attention output matrix
    (and no output bias): that block's attention output is then the head's write alone."""
    copied = copy.deepcopy(visual)
    attn = copied.transformer.resblocks[layer].attn
    d_head = attn.embed_dim // attn.num_heads
    with torch.no_grad():
        keep = torch.zeros_like(attn.out_proj.weight)
        keep[:, head * d_head:(head + 1) * d_head] = 1
        attn.out_proj.weight.mul_(keep)
        attn.out_proj.bias.zero_()
    return copied


@pytest.mark.parametrize("build", ["tiny", "mid (LayerScale)"])
def test_source_tokens_sum_to_the_write_and_match_open_clip_with_one_head_kept(build: str, tiny) -> None:
    tiny = tiny if build == "tiny" else HookedEncoder(mid_visual())
    x = pixels(64)
    heads = [Component("head", 0, 1), Component("head", 2, 3), Component("head", tiny.n_layers - 1, 0)]
    parts = head_sources(tiny, x, heads)  # [B, K, T, D]
    cache = tiny.run_with_cache(x)
    for k, c in enumerate(heads):
        assert (parts[:, k].sum(1) - cache.head_writes[:, c.layer, c.head]).abs().max() < 1e-5
        # open_clip's own forward with the other heads' output columns zeroed: the block's attention
        # output (after LayerScale) at CLS is the head's write
        copied = only_head(tiny.visual, c.layer, c.head)
        block, seen = copied.transformer.resblocks[c.layer], {}
        block.ls_1.register_forward_hook(lambda m, a, out: seen.__setitem__("out", out))
        block.attn.register_forward_hook(lambda m, a, out: seen.__setitem__("input", a[0]))
        with torch.no_grad():
            copied(x)
        assert (parts[:, k].sum(1) - seen["out"][:, 0]).abs().max() < 1e-5
        # token by token: torch's attention weights times torch's attention made to attend to that token alone
        normed = seen["input"]
        with torch.no_grad():
            _, weights = block.attn(normed, normed, normed, need_weights=True, average_attn_weights=False)
            for t in range(normed.shape[1]):
                mask = torch.full((normed.shape[1],) * 2, float("-inf"))
                mask[:, t] = 0
                alone = block.ls_1(block.attn(normed, normed, normed, attn_mask=mask, need_weights=False)[0])
                expected = weights[:, c.head, 0, t, None] * alone[:, 0]
                assert (parts[:, k, t] - expected).abs().max() < 1e-5


def test_source_shares_sum_to_one_and_follow_the_parts(tiny) -> None:
    x = pixels(64)
    heads = [Component("head", 1, 2), Component("head", 3, 3)]
    shares = source_shares(tiny, x, heads)
    parts = head_sources(tiny, x, heads)
    write = parts.sum(2, keepdim=True)
    assert (shares.sum(-1) - 1).abs().max() < 1e-5
    expected = (parts * write).sum(-1) / (write * write).sum(-1)
    assert (shares - expected).abs().max() < 1e-6


def test_where_heads_look_reads_the_head_components_only(tiny) -> None:
    """The source shares of the heads among the components (their indices kept, MLPs and layers skipped), in
    float32 on the CPU whatever the pixels' dtype; none without a head."""
    from dsl_cli.lenses import where_heads_look

    x = pixels(64)
    comps = [Component("mlp", 0), Component("head", 1, 2), Component("resid", 2), Component("head", 3, 3)]
    looks = where_heads_look(tiny, x.double(), comps)
    assert looks.heads == [1, 3] and looks.shares.device.type == "cpu" and looks.shares.dtype == torch.float32
    torch.testing.assert_close(looks.shares, source_shares(tiny, x, [comps[1], comps[3]]))
    assert where_heads_look(tiny, x, [Component("mlp", 0), Component("resid", 2)]) is None


def test_top_patches_are_named_by_row_and_column_best_first() -> None:
    """Hand-made shares on a 3 x 3 grid: the CLS token (first) is never named; MLPs get no patches."""
    shares = torch.zeros(1, 1, 10)
    shares[0, 0, 0] = 5.0  # CLS: the largest, never named
    for patch, value in ((5, 0.4), (0, 0.3), (7, 0.2), (8, 0.1), (2, 0.05)):  # patch 5 is row 1, column 2
        shares[0, 0, 1 + patch] = value
    looks = Looks(shares, heads=[1])
    assert looks.grid == 3
    assert looks.top_patches(2) == [["", "r1c2;r0c0;r2c1;r2c2;r0c2"]]
    (row,) = looks.rows(0, "cat", "direct", [Component("mlp", 0), Component("head", 0, 1)])
    assert row["component"] == "L00H01" and row["grid"] == 3 and row["cls_share"] == 5.0
    assert [float(v) for v in row["shares"].split(";")] == pytest.approx(shares[0, 0, 1:].tolist(), abs=1e-5)


def test_a_grid_of_fewer_patches_than_named_names_them_all() -> None:
    """A 2 x 2 grid has 4 patches, fewer than TOP_PATCHES (5): all four are named, best first."""
    shares = torch.tensor([[[0.6, 0.1, 0.04, 0.2, 0.06]]])  # CLS, then r0c0 r0c1 r1c0 r1c1
    assert Looks(shares, heads=[0]).top_patches(1) == [["r1c0;r0c0;r1c1;r0c1"]]


def test_text_span_picks_the_text_of_a_heads_exact_direction_first(tiny) -> None:
    """Hand-made: a pool of random texts holding, at index 7, the exact direction of a head's write (its
    attribution lens embedding); then, for a write 0.8 t1 + 0.6 t2 with t1 and t2 orthogonal among random
    texts, t1 first and t2 second (what is left once t1 is projected out), not a text nearly along t1."""
    cache = tiny.run_with_cache(pixels(64, n=1))
    write = direct_attribution(tiny, cache).heads[:, 2, 1]  # [1, E]
    generator = torch.Generator().manual_seed(11)
    pool = torch.randn(20, tiny.d_embed, generator=generator)
    pool[7] = 3.0 * write[0]  # any length: the direction counts
    assert text_span(write, pool, 3)[0] == 7
    basis, _ = torch.linalg.qr(torch.randn(tiny.d_embed, 4, generator=generator))
    t1, t2 = basis[:, 0], basis[:, 1]
    pool = torch.randn(20, tiny.d_embed, generator=generator) * 0.1
    pool[3], pool[12] = t2, t1
    pool[5] = t1 + 0.05 * basis[:, 2]  # nearly t1: second without the projection, nothing left with it
    assert text_span((0.8 * t1 + 0.6 * t2)[None], pool, 2) == [12, 3]


def test_descriptions_pick_from_a_users_phrases_and_labels_name_the_best_classes(tiny, tmp_path) -> None:
    """A user's pool through the tiny text tower: a component whose embedding is a phrase's own text
    embedding is described by that phrase first; labels are the best cosines with the ImageNet classifier."""
    encoder_cfg = OmegaConf.create({"source": "tiny"})
    phrases = ["a red bus", "a sleeping cat", "a bowl of soup", "a snowy mountain"]
    (tmp_path / "pool.txt").write_text("# my phrases\n" + "\n".join(phrases) + "\n\n")
    texts = encode_texts(encoder_cfg, phrases, "cpu")
    components = [Component("head", 0, 0), Component("resid", 1)]
    embeds = [("a", torch.stack([texts[2], texts[0]])), ("b", torch.stack([2 * texts[2], texts[1]]))]
    scored = ScoredImages(tiny, encoder_cfg, components, embeds, None, tmp_path)
    lens_cfg = OmegaConf.create({"templates": "simple", "top_labels": 2, "span_texts": 2,
                                 "text_pool": str(tmp_path / "pool.txt")})
    labels, descriptions = describe(scored, prepare_text(lens_cfg, encoder_cfg, "cpu"), lens_cfg)
    for image in (0, 1):  # each image alone
        assert descriptions[image][0].split("; ")[0] == "a bowl of soup" and len(descriptions[image][0].split("; ")) == 2
        assert descriptions[image][1] == ""  # the residual stream is not described
    classifier, names = imagenet_classifier(encoder_cfg, "simple", "cpu")
    sims = torch.nn.functional.normalize(embeds[1][1][1], dim=0) @ classifier
    best = sims.argsort(descending=True)[:2].tolist()
    assert labels[1][1] == f"{names[best[0]]} {sims[best[0]]:.3f}; {names[best[1]]} {sims[best[1]]:.3f}"


def test_a_similarity_csv_of_an_earlier_version_still_reads(tmp_path) -> None:
    """The new columns come after the old ones: a file with the old header reads, the new columns empty;
    a header that is not a beginning of today's is refused."""
    from dsl_cli.outputs import SIMILARITY, read_csv

    old = SIMILARITY.columns[:SIMILARITY.columns.index("attribution")]
    row = dict(zip(old, ["cat", "direct", "L01H00", "head", "1", "0", "", "", "0", "2", "4.0", "0.5", "", "1.0",
                         "1", ""]))
    (tmp_path / "old.csv").write_text(",".join(old) + "\n" + ",".join(row[c] for c in old) + "\n")
    (read,) = read_csv(tmp_path / "old.csv")
    assert read == {"image": "cat", "lens": "direct", "component": "L01H00", "kind": "head", "layer": 1, "head": 0,
                    "mode": "", "alpha": None, "seed": 0, "steps": 2, "guidance": 4.0, "sim_embed": 0.5,
                    "sim_decoded": None, "norm": 1.0, "rank": 1, "file": "", "attribution": None, "top_patches": "",
                    "sim_decoded_mean": None, "sim_decoded_std": None, "labels": "", "description": "",
                    "activation": None}
    (tmp_path / "odd.csv").write_text(",".join(old[1:]) + "\n")
    with pytest.raises(UserError, match="not a CSV written by this version"):
        read_csv(tmp_path / "odd.csv")


def test_numbers_read_back_typed_and_an_edited_one_is_refused(tmp_path) -> None:
    """`read_csv` gives number columns as numbers (empty: None) and says which cell of a hand-edited file is
    not a number."""
    from dsl_cli.outputs import LABELS, RunFolder

    folder = RunFolder(tmp_path)
    log = folder.log(LABELS)
    log.append([{"image": "cat", "lens": "logit", "component": "L03", "layer": 3, "head": None, "rank": 1,
                 "label": "tabby", "score": 0.25}])
    assert folder.read(LABELS) == [{"image": "cat", "lens": "logit", "component": "L03", "layer": 3,
                                    "head": None, "rank": 1, "label": "tabby", "score": 0.25}]
    log.path.write_text(log.path.read_text().replace(",1,tabby,", ",first,tabby,"))
    with pytest.raises(UserError, match="row 2: rank 'first' is not a number"):
        folder.read(LABELS)


def projector_text_span(outputs: torch.Tensor, pool: torch.Tensor, k: int) -> list[int]:
    """TextSpan from its definition, with projection matrices: at each step the text whose part orthogonal
    to the directions taken so far explains most of the outputs' part orthogonal to them (sum of squared
    dot products); its unit residual joins the directions."""
    texts = pool.double() / pool.double().norm(dim=-1, keepdim=True)
    outputs, basis, picked = outputs.double(), torch.zeros(0, pool.shape[-1], dtype=torch.float64), []
    for _ in range(k):
        off = torch.eye(pool.shape[-1], dtype=torch.float64) - basis.T @ basis  # projects the directions out
        energy = ((outputs @ off) @ (texts @ off).T).pow(2).sum(0)
        energy[picked] = -float("inf")
        j = int(energy.argmax())
        residual = texts[j] @ off
        basis, picked = torch.cat([basis, (residual / residual.norm())[None]]), picked + [j]
    return picked


@pytest.mark.parametrize("seed", range(4))
def test_text_span_equals_its_definition_written_with_projectors(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    outputs, pool = torch.randn(5, 8, generator=g), torch.randn(12, 8, generator=g) * torch.rand(12, 1, generator=g)
    assert text_span(outputs, pool, 5) == projector_text_span(outputs, pool, 5)


def test_texts_are_encoded_as_open_clips_clip_encodes_them_batch_by_batch(monkeypatch) -> None:
    """`encode_texts` through the tiny text tower, a few prompts a batch: open_clip's own CLIP.encode_text
    (normalised) of the same prompts, in order."""
    from dsl_cli import lenses
    from dsl_cli.encoder import build_tiny_clip

    prompts = ["a cat", "a dog on a sofa", "", "a red bus", "soup"]
    monkeypatch.setattr(lenses, "PROMPTS_PER_BATCH", 2)
    got = encode_texts(OmegaConf.create({"source": "tiny"}), prompts, "cpu")
    tokenizer = __import__("open_clip").get_tokenizer("ViT-B-32")
    with torch.no_grad():
        expected = build_tiny_clip().eval().encode_text(tokenizer(prompts), normalize=True)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_each_head_and_mlp_is_described_from_its_own_embedding_alone(tiny, tmp_path) -> None:
    encoder_cfg = OmegaConf.create({"source": "tiny"})
    phrases = ["a red bus", "a sleeping cat", "a bowl of soup", "a snowy mountain"]
    (tmp_path / "pool.txt").write_text("\n".join(phrases))
    texts = encode_texts(encoder_cfg, phrases, "cpu")
    components = [Component("mlp", 0), Component("head", 1, 1), Component("resid", 2)]
    scored = ScoredImages(tiny, encoder_cfg, components, [("a", torch.stack([texts[3], texts[1], texts[0]]))],
                          None, tmp_path)
    lens_cfg = OmegaConf.create({"templates": "simple", "top_labels": 1, "span_texts": 1,
                                 "text_pool": str(tmp_path / "pool.txt")})
    _, descriptions = describe(scored, prepare_text(lens_cfg, encoder_cfg, "cpu"), lens_cfg)
    assert descriptions == [["a snowy mountain", "a sleeping cat", ""]]
