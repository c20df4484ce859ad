"""Component selection and ranking (hand-checked cases), and the on-disk cache of the logit lens's classifier."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dsl_cli import lenses
from dsl_cli.components import Component, parse_component
from dsl_cli.config import EncoderConfig
from dsl_cli.encoder import build_tiny_clip, build_tiny_text
from dsl_cli.errors import UserError


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
