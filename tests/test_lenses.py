"""Component selection and ranking (hand-checked cases), and the on-disk cache of the logit lens's classifier."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dsl_cli import lenses
from dsl_cli.components import Component, parse_component
from dsl_cli.config import EncoderConfig
from dsl_cli.encoder import HookedEncoder, build_tiny_clip, build_tiny_text, build_tiny_visual
from dsl_cli.errors import UserError
from dsl_cli.weights import cache_folder


def test_layer_specs() -> None:
    assert lenses.parse_layers(3, 48) == [3]
    assert lenses.parse_layers([30, 12, 30], 48) == [12, 30]
    assert lenses.parse_layers("10-12", 48) == [10, 11, 12]
    assert lenses.parse_layers(-1, 48) == [47]
    assert lenses.parse_layers("all", 4) == [0, 1, 2, 3]
    with pytest.raises(UserError, match="layers run from 0 to 47"):
        lenses.parse_layers(48, 48)
    with pytest.raises(UserError, match="range 10-20"):
        lenses.parse_layers("ten", 48)


def test_component_selection() -> None:
    heads = lenses.select_components("steering", 2, [1, 3], "all", 4, 4)
    assert [c.label for c in heads] == ["L02H01", "L02H03", "L02MLP"]
    stream = lenses.select_components("diffusion", "0-1", "all", "heads", 4, 4)
    assert [c.label for c in stream] == ["L00", "L01"]
    labels = lenses.select_components("direct", 0, "all", ["L3H1", "L0MLP"], 4, 4)
    assert labels == [Component("head", 3, 1), Component("mlp", 0)]
    with pytest.raises(UserError, match="steers heads and MLPs only"):
        lenses.select_components("steering", 0, "all", ["L3"], 4, 4)
    assert parse_component("L30H05").label == "L30H05" and parse_component("l2mlp").label == "L02MLP"
    assert parse_component("L3mid") == Component("resid_mid", 3) and Component("resid_mid", 3).label == "L03mid"
    with_mid = lenses.select_components("diffusion", [0, 1], "all", "heads", 4, 4, mid=True)
    assert [c.label for c in with_mid] == ["L00mid", "L00", "L01mid", "L01"]


def test_rank_is_one_for_the_largest_and_stable_on_ties() -> None:
    values = torch.tensor([[0.1, 0.9, 0.5, 0.9]])
    assert lenses.rank(values).tolist() == [[4, 1, 3, 2]]


def test_classifier_is_cached_for_hub_weights(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("DSL_CACHE", str(tmp_path))
    calls = []

    def fake_text_model(cfg, device, dtype):
        calls.append(cfg)
        import open_clip

        return build_tiny_text(), open_clip.get_tokenizer("ViT-B-32")

    monkeypatch.setattr(lenses, "text_model_id", lambda cfg: ("ViT-B-32", "some_hub_tag"))
    monkeypatch.setattr(lenses, "load_text_model", fake_text_model)
    cfg = EncoderConfig(source="tiny")
    first, names = lenses.imagenet_classifier(cfg, "simple", "cpu")
    second, _ = lenses.imagenet_classifier(cfg, "simple", "cpu")
    assert len(calls) == 1, "the second call should read the cache, not build the text tower"
    assert len(list(tmp_path.glob("ViT-B-32_some_hub_tag_simple_*.pt"))) == 1
    torch.testing.assert_close(first, second)
    assert first.shape == (32, 1000) and len(names) == 1000


def test_classifier_of_tiny_weights_is_not_cached(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("DSL_CACHE", str(tmp_path))
    lenses.imagenet_classifier(EncoderConfig(source="tiny"), "simple", "cpu")
    assert not list(tmp_path.iterdir())


def test_classifier_built_in_batches_equals_open_clips_in_one_go() -> None:
    """The labelled progress bar builds the classifier a few classes at a time from the text tower alone,
    padding cut off; the result is open_clip's own zero-shot classifier from the whole CLIP in one go."""
    import open_clip

    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    ours, names = lenses.text_classifier(build_tiny_text(), tokenizer, "simple", "cpu")
    theirs = open_clip.build_zero_shot_classifier(build_tiny_clip(), tokenizer=tokenizer, classnames=names,
                                                  templates=open_clip.SIMPLE_IMAGENET_TEMPLATES,
                                                  num_classes_per_batch=None, device="cpu")
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)


def test_clamp_moves_layers_and_heads_into_the_model_with_a_warning(caplog) -> None:
    with pytest.raises(UserError, match="layer=30 is outside this model"):
        lenses.select_components("steering", 30, "all", "heads", 4, 4)
    chosen = lenses.select_components("steering", [1, 30, -9], [2, 7], "heads", 4, 4, clamp=True)
    assert [c.label for c in chosen] == ["L00H02", "L00H03", "L01H02", "L01H03", "L03H02", "L03H03"]
    labels = lenses.select_components("direct", 0, "all", ["L30H05", "L3H3", "L12MLP"], 4, 4, clamp=True)
    assert [c.label for c in labels] == ["L03H03", "L03MLP"]  # L30H05 and L3H3 are one component now
    assert sum("clamp_to_model" in r.getMessage() for r in caplog.records) == 6


# ---- edges of the checks, and what each message says (mutation testing: docs/testing.md) -----------

def test_component_labels_are_checked_at_the_edges_of_the_model() -> None:
    labels = ["L3H3", "L0H0", "L3MLP", "L0mid", "L3mid", "embed"]
    assert [c.label for c in lenses.check_components(labels, 4, 4)] == ["L03H03", "L00H00", "L03MLP", "L00mid",
                                                                         "L03mid", "embed"]
    for bad, message in [("L4H0", "L4H0: layer 4 is outside this model (0 to 3)"),
                         ("L4mid", "L4mid: layer 4 is outside this model (0 to 3)"),
                         ("L4MLP", "layer 4 is outside this model (0 to 3)"),
                         ("L0H4", "L0H4: head 4 is outside this model (0 to 3)"),
                         ("L2X", "or use component=heads, mlp or all")]:
        with pytest.raises(UserError) as err:
            lenses.check_components([bad], 4, 4)
        assert message in str(err.value)


def test_head_and_layer_specs_at_the_edges() -> None:
    assert lenses.parse_heads(0, 4) == [0] and lenses.parse_heads([3, 0], 4) == [0, 3]
    assert lenses.parse_heads("all", 3) == [0, 1, 2]
    with pytest.raises(UserError, match="head=4 is outside this model: heads run from 0 to 3"):
        lenses.parse_heads(4, 4)
    with pytest.raises(UserError, match="head='x': use all, an int or a list of ints"):
        lenses.parse_heads("x", 4)
    assert lenses.parse_heads(["2", " 1 "], 4) == [1, 2]  # digits as a command line may give them
    with pytest.raises(UserError, match="head=-1 is outside this model"):  # a number, but no head's
        lenses.parse_heads("-1", 4)
    with pytest.raises(UserError) as refused:
        lenses.parse_heads([], 4)
    assert str(refused.value) == "head=[] names no head: use all, an int or a list of ints"
    assert lenses.parse_layers(-4, 4) == [0] and lenses.parse_layers(["all", 1], 4) == [0, 1, 2, 3]
    with pytest.raises(UserError, match="layer=-5 is outside this model"):
        lenses.parse_layers(-5, 4)
    with pytest.raises(UserError, match="range 10-20"):
        lenses.parse_layers(["all", "ten"], 4)  # items after `all` are still checked
    with pytest.raises(UserError, match=r"layer=\[\] names no layer; layers run from 0 to 3"):
        lenses.parse_layers([], 4)


def test_clamping_moves_a_head_into_the_model_and_says_so(caplog) -> None:
    with caplog.at_level("WARNING", logger="dsl_cli.lenses"):
        assert lenses.parse_heads([1, 9], 4, clamp=True) == [1, 3]
    assert caplog.messages == ["head=9 is outside this model: heads run from 0 to 3; clamp_to_model=true "
                               "(debug=tiny) uses 3 instead"]


def test_a_lens_reads_no_mid_stream_and_clamps_nothing_unless_asked() -> None:
    """`Lens.components` from a notebook, settings left out: no `L1mid`, and a layer outside the model refused."""
    lens = lenses.lens_class("diffusion")()
    assert [c.label for c in lens.components(1, "all", "all", 4, 4)] == ["L01"]
    assert [c.label for c in lens.components(1, "all", "all", 4, 4, mid=True)] == ["L01mid", "L01"]
    with pytest.raises(UserError, match="layer=9 is outside this model"):
        lens.components(9, "all", "all", 4, 4)


def test_labels_of_kinds_a_lens_does_not_read_are_refused_naming_the_kinds_it_reads() -> None:
    class HeadsAndMlps(lenses.Lens):
        name, label_kinds = "kinds", ("head", "mlp")

    with pytest.raises(UserError) as refused:
        HeadsAndMlps().components(["L1H02", "L2"], "all", ["L1H02", "L2"], 4, 4)
    assert str(refused.value) == "component=['L1H02', 'L2']: lens=kinds reads head and mlp components only"


def test_component_kinds_each_lens_selects() -> None:
    def labels(lens, component, layer=1, head="all"):
        return [c.label for c in lenses.select_components(lens, layer, head, component, 4, 2)]

    assert labels("steering", "heads") == ["L01H00", "L01H01"]
    assert labels("direct", "mlp") == ["L01MLP"]
    assert labels("steering", "all") == ["L01H00", "L01H01", "L01MLP"]
    assert labels("logit", "mlp") == ["L01", "L01MLP"]  # the residual stream first
    assert [c.kind for c in lenses.select_components("logit", 1, "all", "heads", 4, 2)] == ["resid", "head", "head"]
    assert labels("diffusion", "all", layer=[0, 2]) == ["L00", "L02"]
    assert labels("steering", ["L1MLP", "L0H1"]) == ["L01MLP", "L00H01"]
    assert labels("direct", ["L3", "L1mid"]) == ["L03", "L01mid"]  # only steering refuses the stream
    with pytest.raises(UserError, match="lens=steering steers heads and MLPs only"):
        lenses.select_components("steering", 0, "all", ["L1mid"], 4, 2)
    with pytest.raises(UserError, match="lens='lens': choose one of diffusion, direct, steering, logit"):
        lenses.select_components("lens", 0, "all", "heads", 4, 2)


def test_rank_along_the_last_axis_of_any_shape() -> None:
    values = torch.tensor([[[0.2, 0.7, 0.1], [0.5, 0.5, 0.9]], [[3.0, 2.0, 1.0], [-1.0, 0.0, -2.0]]])
    assert lenses.rank(values).tolist() == [[[2, 1, 3], [2, 3, 1]], [[1, 2, 3], [2, 1, 3]]]
    ties = torch.zeros(1, 500).index_fill_(1, torch.arange(0, 500, 7), 1.0)
    expected = sorted(range(500), key=lambda i: (-ties[0, i].item(), i))  # equal values keep their order
    assert lenses.rank(ties)[0].argsort().tolist() == expected


def test_top_labels_are_the_best_cosines_written_here() -> None:
    g = torch.Generator().manual_seed(4)
    embeds, classifier = torch.randn(2, 3, 8, generator=g) * 5, torch.randn(8, 10, generator=g)
    classifier = classifier / classifier.norm(dim=0)
    values, indices = lenses.top_labels(embeds, classifier.double(), 4)  # any precision of the classifier
    cosines = (embeds @ classifier) / embeds.norm(dim=-1, keepdim=True)
    expected = cosines.sort(dim=-1, descending=True)
    torch.testing.assert_close(values, expected.values[..., :4])
    assert torch.equal(indices, expected.indices[..., :4])


def test_dsl_s_cache_folder(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.delenv("DSL_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_folder() == tmp_path / "xdg" / "dsl"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_folder() == tmp_path / "home" / ".cache" / "dsl"
    monkeypatch.setenv("DSL_CACHE", "~/elsewhere")
    assert cache_folder() == tmp_path / "home" / "elsewhere"


def test_labels_are_counted_as_open_clip_lists_them() -> None:
    import open_clip

    assert lenses.n_labels() == len(open_clip.IMAGENET_CLASSNAMES)


def test_classifier_prompts_and_precision(monkeypatch, tmp_path: Path) -> None:
    import open_clip

    seen = {}

    def fake_classifier(model, **kwargs):  # called once per batch of classes
        seen["classnames"] = [*seen.get("classnames", []), *kwargs.pop("classnames")]
        seen.update(kwargs)
        return torch.zeros(32, len(seen["classnames"]))

    monkeypatch.setattr(open_clip, "build_zero_shot_classifier", fake_classifier)
    for templates, prompts in (("openai", open_clip.OPENAI_IMAGENET_TEMPLATES),
                               ("simple", open_clip.SIMPLE_IMAGENET_TEMPLATES)):
        seen.clear()
        lenses.text_classifier(None, "tokenizer", templates, "cpu")
        assert seen["templates"] is prompts and seen["device"] == "cpu" and seen["tokenizer"] == "tokenizer"
        assert list(seen["classnames"]) == list(open_clip.IMAGENET_CLASSNAMES)
    monkeypatch.undo()
    monkeypatch.setenv("DSL_CACHE", str(tmp_path))
    calls = []
    monkeypatch.setattr(lenses, "load_text_model", lambda *a: calls.append(a) or ("model", "tokenizer"))
    monkeypatch.setattr(lenses, "text_classifier", lambda *a: calls.append(a) or (torch.zeros(32, 1000), []))
    cfg = EncoderConfig(source="tiny")
    lenses.imagenet_classifier(cfg, "openai", "cpu")
    # the text tower is built in float32 whatever the encoder's precision: it runs once, its result is kept
    assert calls == [(cfg, "cpu", torch.float32), ("model", "tokenizer", "openai", "cpu")]


# ---- what a lens does once every image is scored: verify, labels (mutation testing: docs/testing.md) ---------

def _scored(encoder, pixels: torch.Tensor, comps: list[Component], embeds: torch.Tensor,
            run_dir: Path) -> lenses.ScoredImages:
    names = [f"img{i}" for i in range(len(pixels))]
    return lenses.ScoredImages(encoder, EncoderConfig(source="tiny"), comps, list(zip(names, embeds)),
                               lambda name: pixels[names.index(name)][None], run_dir)


def test_verify_reports_the_largest_gap_between_the_closed_form_and_a_hooked_pass(tiny_encoder, tiny_pixels,
                                                                                   tmp_path, caplog) -> None:
    """`lens.verify=true`: the closed form of every image and component against `steer_hooked` at the lens's
    mode and alpha; the largest gaps (absolute, and relative to the hooked embedding's norm), and whether the
    relative one is within the tolerance of the encoder's dtype (float32 1e-5, bfloat16 3e-2)."""
    from omegaconf import OmegaConf

    comps = [parse_component(c) for c in ("L1H02", "L2MLP", "L3H00")]
    lens = lenses.get_lens(OmegaConf.create({"name": "steering", "mode": "norm", "alpha": 3.0, "verify": True}))
    embeds = tiny_encoder.steer(tiny_encoder.run_with_cache(tiny_pixels), comps, mode="norm", alpha=3.0).float()
    report = lens.after_scoring(_scored(tiny_encoder, tiny_pixels, comps, embeds, tmp_path))
    assert report["verify_ok"] is True and report["verify_max_abs_diff"] < 1e-5 and report["verify_max_rel_diff"] < 1e-6
    wrong = embeds.clone()
    wrong[1, 2, 5] += 0.01  # one coordinate of one image's component off by 0.01
    norm = embeds[1, 2].norm().item()
    with caplog.at_level("WARNING", logger="dsl_cli.lenses"):
        report = lens.after_scoring(_scored(tiny_encoder, tiny_pixels, comps, wrong, tmp_path))
    assert report["verify_max_abs_diff"] == pytest.approx(0.01, abs=1e-5) and report["verify_ok"] is False
    assert report["verify_max_rel_diff"] == pytest.approx(0.01 / norm, rel=1e-3)
    assert caplog.messages == ["lens.verify: closed form and hooked reference differ by "
                               f"{report['verify_max_rel_diff']:.3g} of the embedding's norm (> 1e-05)"]
    other = tiny_encoder.steer(tiny_encoder.run_with_cache(tiny_pixels), comps, mode="add", alpha=3.0).float()
    assert lens.after_scoring(_scored(tiny_encoder, tiny_pixels, comps, other, tmp_path))["verify_ok"] is False
    half = HookedEncoder(build_tiny_visual().to(torch.bfloat16))  # bfloat16's tolerance is 3e-2 of the norm
    closed = half.steer(half.run_with_cache(tiny_pixels), comps, mode="norm", alpha=3.0).float()
    for share, passes in ((0.01, True), (0.06, False)):  # a gap of 1 % and 6 % of the embedding's norm
        wrong = closed.clone()
        wrong[1, 2, 5] += share * closed[1, 2].norm()
        report = lens.after_scoring(_scored(half, tiny_pixels, comps, wrong, tmp_path))
        assert report["verify_ok"] is passes and report["verify_max_rel_diff"] >= share * 0.9, (share, report)
    lens.cfg.verify = False
    assert lens.after_scoring(_scored(tiny_encoder, tiny_pixels, comps, wrong, tmp_path)) == {}


def test_a_gap_exactly_at_the_tolerance_passes_verify(tiny_encoder, tiny_pixels, tmp_path, monkeypatch,
                                                     caplog) -> None:
    """The tolerance is the largest relative gap that passes (1e-5 in float32): no warning, `verify_ok` true;
    the absolute gap is reported, not judged."""
    from omegaconf import OmegaConf

    lens = lenses.get_lens(OmegaConf.create({"name": "steering", "mode": "norm", "alpha": 3.0, "verify": True}))
    monkeypatch.setattr(lens, "verify", lambda scored: (0.5, 1e-5))
    comps = [parse_component("L1H02")]
    with caplog.at_level("WARNING", logger="dsl_cli.lenses"):
        report = lens.after_scoring(_scored(tiny_encoder, tiny_pixels, comps, torch.zeros(2, 1, 8), tmp_path))
    assert report == {"verify_max_abs_diff": 0.5, "verify_max_rel_diff": 1e-5, "verify_ok": True}
    assert caplog.messages == []


def test_the_relative_gap_is_the_norm_of_the_difference_over_the_hooked_norm() -> None:
    hooked, closed = torch.tensor([3.0, 4.0, 0.0]), torch.tensor([3.0, 4.0, 0.5])
    assert lenses.verify_gap(hooked, closed) == pytest.approx((0.5, 0.1))


def test_verify_steers_at_the_lens_s_mode_and_shows_its_progress(tiny_encoder, tiny_pixels, tmp_path,
                                                                  monkeypatch) -> None:
    from omegaconf import OmegaConf

    real, bars = lenses.tqdm, []
    monkeypatch.setattr(lenses, "tqdm", lambda *a, **k: bars.append((k.get("desc"), k.get("unit"))) or real(*a, **k))
    comps = [parse_component(c) for c in ("L1H02", "L2MLP")]
    for mode in ("add", "scale"):
        lens = lenses.get_lens(OmegaConf.create({"name": "steering", "mode": mode, "alpha": 3.0, "verify": True}))
        embeds = tiny_encoder.steer(tiny_encoder.run_with_cache(tiny_pixels), comps, mode=mode, alpha=3.0).float()
        assert lens.after_scoring(_scored(tiny_encoder, tiny_pixels, comps, embeds, tmp_path))["verify_ok"] is True
    assert bars == [("verify", "img")] * 2


def test_a_text_target_goes_through_the_encoder_s_text_tower_on_its_device(monkeypatch) -> None:
    from omegaconf import OmegaConf

    asked, unit = [], torch.nn.functional.normalize(torch.ones(1, 32), dim=-1)
    monkeypatch.setattr(lenses, "encode_texts", lambda cfg, texts, device: asked.append((cfg, texts, device)) or unit)
    lens = lenses.get_lens(OmegaConf.create({"name": "attribution", "target": 7}))
    encoder_cfg = EncoderConfig(source="tiny")
    lens.prepare(encoder_cfg, torch.device("cpu"))
    assert asked == [(encoder_cfg, ["7"], torch.device("cpu"))] and lens.target is unit


def test_logit_labels_are_the_classes_nearest_each_component_by_cosine(tiny_encoder, tmp_path, monkeypatch) -> None:
    """labels.csv: for every image and component, the `lens.top_labels` classes whose classifier column has
    the largest cosine with the lens embedding, best first, with that cosine; the classifier is prepared on
    the encoder's device where the run did not prepare it."""
    from omegaconf import OmegaConf

    from dsl_cli.outputs import LABELS, RunFolder

    g = torch.Generator().manual_seed(0)
    classifier = torch.nn.functional.normalize(torch.randn(32, 5, generator=g), dim=0)  # [E, classes]
    names = ["tench", "goldfish", "shark", "hen", "ostrich"]
    asked = []
    monkeypatch.setattr(lenses, "imagenet_classifier", lambda cfg, templates, device: asked.append(
        (cfg.source, templates, device)) or (classifier, names))
    lens = lenses.get_lens(OmegaConf.create({"name": "logit", "top_labels": 3, "templates": ["a {}"]}))
    comps = [parse_component(c) for c in ("L1", "L2H03")]
    embeds = torch.randn(2, 2, 32, generator=g)
    assert lens.after_scoring(_scored(tiny_encoder, torch.zeros(2, 3, 64, 64), comps, embeds, tmp_path)) == {}
    assert asked == [("tiny", ["a {}"], tiny_encoder.device)]
    expected = []
    for i in range(2):
        for k, comp in enumerate(comps):
            cos = [torch.dot(embeds[i, k], classifier[:, c]).item() / embeds[i, k].norm().item() for c in range(5)]
            best = sorted(range(5), key=lambda c: -cos[c])[:3]
            expected += [(f"img{i}", "logit", comp.label, comp.layer, comp.head, r + 1, names[c], pytest.approx(cos[c], abs=1e-6))
                         for r, c in enumerate(best)]
    got = [tuple(row.values()) for row in RunFolder(tmp_path).read(LABELS)]
    assert got == expected


@pytest.mark.parametrize("name", ["diffusion", "direct", "steering", "attribution"])
def test_lens_embeddings_are_those_of_the_lens_the_config_names(name: str, tiny_encoder, tiny_pixels) -> None:
    from omegaconf import OmegaConf

    cache = tiny_encoder.run_with_cache(tiny_pixels)
    cfg = OmegaConf.create({"name": name, "mode": "add", "alpha": 2.0, "target": None})
    comps = [parse_component(c) for c in (("L1", "L3") if name == "diffusion" else ("L1H02", "L2MLP"))]
    expected = {"diffusion": lambda: tiny_encoder.diffusion_lens(cache, [1, 3]),
                "direct": lambda: tiny_encoder.direct(cache, comps),
                "steering": lambda: tiny_encoder.steer(cache, comps, mode="add", alpha=2.0),
                "attribution": lambda: lenses.direct_attribution(tiny_encoder, cache).pick(comps)}[name]()
    torch.testing.assert_close(lenses.lens_embeddings(cfg, tiny_encoder, cache, comps), expected)


@pytest.mark.parametrize("name, dtype, says", [
    ("direct", "bf16", "img1 L02MLP: the direct lens embedding or its score is not finite (NaN or inf) with "
                       "encoder.dtype=bf16; use encoder.dtype=fp32"),
    ("steering", "fp32", "img1 L02MLP: the steering lens embedding or its score is not finite (NaN or inf) with "
                         "lens.alpha=1e+20 (lens.mode=norm); use a smaller lens.alpha"),
])
def test_a_non_finite_embedding_is_refused_naming_the_image_component_and_setting(name: str, dtype: str,
                                                                                   says: str) -> None:
    from omegaconf import OmegaConf

    lens = lenses.get_lens(OmegaConf.create({"name": name, "mode": "norm", "alpha": 1e20}))
    comps = [parse_component(c) for c in ("L1H02", "L2MLP")]
    embeds, sims = torch.ones(2, 2, 8), torch.zeros(2, 2)
    scores = lenses.Scores(sim_embed=sims, norm=torch.ones(2, 2))
    lenses.check_finite(lens, dtype, ["img0", "img1"], comps, torch.ones(2, 8), embeds, scores)  # all finite
    embeds[1, 1, 3] = float("inf")
    with pytest.raises(UserError) as refused:
        lenses.check_finite(lens, dtype, ["img0", "img1"], comps, torch.ones(2, 8), embeds, scores)
    assert str(refused.value) == says


def test_a_non_finite_image_embedding_is_refused_first_naming_the_image() -> None:
    """The encoder's own embedding of an image (clean [B, E]) NaN or inf: the first such image is named, with
    the encoder's precision, before any lens value is looked at."""
    from omegaconf import OmegaConf

    lens = lenses.get_lens(OmegaConf.create({"name": "direct"}))
    comps = [parse_component(c) for c in ("L1H02", "L2MLP")]
    clean, embeds = torch.ones(3, 8), torch.full((3, 2, 8), float("nan"))
    clean[1, 7], clean[2, 0] = float("nan"), float("-inf")
    scores = lenses.Scores(sim_embed=torch.zeros(3, 2), norm=torch.ones(3, 2))
    with pytest.raises(UserError) as refused:
        lenses.check_finite(lens, "bf16", ["img0", "img1", "img2"], comps, clean, embeds, scores)
    assert str(refused.value) == ("img1: the encoder's embedding is not finite (NaN or inf) with encoder.dtype=bf16; "
                                  "use encoder.dtype=fp32")


def test_an_empty_component_list_is_refused_saying_what_to_give() -> None:
    with pytest.raises(UserError) as refused:
        lenses.check_components([], 4, 4)
    assert str(refused.value) == "component=[] names no component: use heads, mlp, all, or labels [L3H01,L2MLP]"


def test_building_the_classifier_says_what_it_does_and_where_it_keeps_it(tmp_path, monkeypatch, caplog) -> None:
    """The terminal while the ImageNet classifier is made: one log line with its size, a bar over the 1000
    classes; then where it is kept, and on the next run where it is read from; a template set that does not
    exist is refused naming those that do."""
    import open_clip

    bars = []
    real = lenses.tqdm
    monkeypatch.setattr(lenses, "tqdm", lambda *a, **k: bars.append(k) or real(*a, **k))
    monkeypatch.setattr(open_clip, "build_zero_shot_classifier",
                        lambda model, classnames, **kwargs: torch.ones(32, len(classnames)))
    monkeypatch.setattr(lenses, "load_text_model", lambda *a: ("model", "tokenizer"))
    monkeypatch.setattr(lenses, "text_model_id", lambda cfg: ("ViT-B-32", "some_hub_tag"))
    monkeypatch.setenv("DSL_CACHE", str(tmp_path))
    with caplog.at_level("INFO", logger="dsl_cli.lenses"):
        lenses.imagenet_classifier(EncoderConfig(source="tiny"), "simple", "cpu")
        kept = lenses.classifier_file(EncoderConfig(source="tiny"), "simple")
        lenses.imagenet_classifier(EncoderConfig(source="tiny"), "simple", "cpu")
    assert caplog.messages == [
        f"ImageNet classifier: 1000 classes x {len(open_clip.SIMPLE_IMAGENET_TEMPLATES)} prompts through the text tower",
        f"ImageNet classifier kept in {kept} (later runs read it, no text tower)",
        f"ImageNet classifier read from {kept}"]
    assert bars == [{"total": 1000, "desc": "classifier", "unit": "class"}]
    with pytest.raises(UserError) as refused:
        lenses.text_classifier(None, "tokenizer", "fancy", "cpu")
    assert str(refused.value) == "lens.templates='fancy': use openai or simple"


def test_a_text_pool_is_one_phrase_a_line_and_a_bad_one_is_refused_in_one_line(tmp_path) -> None:
    pool = tmp_path / "pool.txt"
    pool.write_text("# phrases for heads\n  a red bus  \n\n   # an indented comment\nune tasse de café\n",
                    encoding="utf-8")
    assert lenses.read_text_pool(str(pool)) == ["a red bus", "une tasse de café"]
    pool.write_text("# nothing but a comment\n\n")
    with pytest.raises(UserError) as refused:
        lenses.read_text_pool(str(pool))
    assert str(refused.value) == f"lens.text_pool={pool}: holds no phrase (one a line)"
    with pytest.raises(UserError, match=f"^lens.text_pool={tmp_path / 'absent.txt'}: not a readable text file"):
        lenses.read_text_pool(str(tmp_path / "absent.txt"))


def test_a_lens_name_that_cannot_name_files_is_refused() -> None:
    class Spaced(lenses.Lens):
        name = "my lens"

    with pytest.raises(ValueError) as refused:
        lenses.register(Spaced)
    assert str(refused.value) == "lens name 'my lens': use letters, digits and _ (it names files and CSV rows)"
    assert "my lens" not in lenses.LENSES


def test_a_lens_filling_a_column_the_csv_does_not_have_is_refused_when_registered() -> None:
    class Extra(lenses.Lens):
        name = "extra_column"
        columns = ("mode", "novelty", "surprise")

    with pytest.raises(ValueError) as refused:
        lenses.register(Extra)
    assert str(refused.value) == ("lens 'extra_column': similarity.csv has no column 'novelty', 'surprise' "
                                  "(its columns: outputs.SimilarityRow)")
    assert "extra_column" not in lenses.LENSES


@pytest.mark.parametrize("column", ["image", "layer", "sim_embed", "rank", "file", "activation", "description"])
def test_a_lens_filling_a_column_that_is_the_runs_own_is_refused_when_registered(column: str) -> None:
    """A plugin lens's `image` column named another image's pictures, which overwrote each other; its
    `sim_embed` ended in an internal error."""
    class Liar(lenses.Lens):
        name = "liar"
        columns = ("mode", column)

    with pytest.raises(ValueError) as refused:
        lenses.register(Liar)
    assert str(refused.value) == (f"lens 'liar': {column!r} of similarity.csv is the run's to fill; a lens fills "
                                  "mode, alpha, attribution")
    assert "liar" not in lenses.LENSES


def test_a_plugin_lens_cannot_take_the_name_of_one_of_dsls_own() -> None:
    class Steering(lenses.Lens):
        name = "steering"

    with pytest.raises(ValueError, match="'steering' is one of dsl's own lenses"):
        lenses.register(Steering)
    assert lenses.LENSES["steering"] is lenses.SteeringLens
