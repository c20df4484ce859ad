"""`dsl check`: dsl's models against the upstream libraries' own loaders, on tiny models saved in the upstream
layouts (an open_clip CLIP checkpoint registered under a model name, a diffusers pipeline saved with
`save_pretrained`). A faithful copy passes; a fault planted in dsl's copy (one tensor, the activation, the
preprocessing mean, the scheduler) fails with exit status 1, naming the stage. Nothing is downloaded."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import open_clip
import pytest
import torch
from open_clip.transformer import QuickGELU

from dsl_cli import check, decoder as decoders
from dsl_cli.decoder import KandinskyDecoder
from dsl_cli.encoder import loading
from dsl_cli.encoder.loading import TINY_EMBED_DIM, TINY_TEXT_CFG, TINY_VISION_CFG, build_tiny_clip
from helpers import perturb_

NAME = "dsl-check-tiny"


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    """The tiny CLIP registered with open_clip and saved as an open_clip checkpoint; the tiny Kandinsky 2.2
    pipeline saved with save_pretrained."""
    folder = tmp_path_factory.mktemp("upstream")
    (folder / f"{NAME}.json").write_text(json.dumps({"embed_dim": TINY_EMBED_DIM, "vision_cfg": TINY_VISION_CFG,
                                                     "text_cfg": TINY_TEXT_CFG}))
    open_clip.add_model_config(folder / f"{NAME}.json")
    torch.save(perturb_(build_tiny_clip()).state_dict(), folder / "clip.bin")
    KandinskyDecoder.build(False, "cpu").save_pretrained(folder / "decoder")
    return {"clip": folder / "clip.bin", "decoder": folder / "decoder"}


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch):
    """Offline, an empty hub cache and dsl cache; the decoding compared is 16 px (the tiny MoVQ's 8 latents)."""
    import huggingface_hub.constants as constants

    monkeypatch.setattr(check, "CHECK_SIZE", 16)

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("DSL_CACHE", str(tmp_path / "dsl"))


def encoder_args(saved, text: bool = False) -> list[str]:
    return ["encoder=bigg14", f"encoder.name={NAME}", "encoder.pretrained=null", f"encoder.checkpoint={saved['clip']}",
            f"encoder.text_pretrained={saved['clip']}", f"lens.text={str(text).lower()}", "device=cpu"]


def decoder_args(saved) -> list[str]:
    return [f"decoder.path={saved['decoder']}", "device=cpu"]


ALL = "all"


def args_for(saved, which: str) -> list[str]:
    if which == "encoder":
        return [*encoder_args(saved, text=True), "decode.enabled=false"]
    if which == "decoder":  # a random-weight encoder has no upstream copy: the decoder alone is compared
        return ["encoder=bigg14", f"encoder.name={NAME}", "encoder.pretrained=null", *decoder_args(saved)]
    return [*encoder_args(saved, text=True), *decoder_args(saved)]


def test_a_faithful_copy_passes_prints_one_table_and_is_remembered(saved, capsys, monkeypatch, tmp_path) -> None:
    from dsl_cli import cli

    monkeypatch.chdir(tmp_path)
    assert cli.main(["check", *args_for(saved, ALL)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["stage", "model", "compared", "difference", "limit", "result", "how"]
    rows = [line.split("  ") for line in out[1:-1]]
    assert [row[0].strip() for row in rows] == ["encoder"] * 3 + ["text"] + ["decoder"] * 3
    for measure in ("pixels", "embeddings", "zero image", "text features", "tensors", "scheduler", "picture"):
        assert sum(f"  {measure}  " in line and "  ok  " in line for line in out) == 1, measure
    assert out[-1] == "PASS: dsl's encoder, text, decoder equal the upstream libraries' own"
    cfg = check.compose(args_for(saved, ALL))
    assert check.recorded(cfg) == {"encoder": "passed", "text": "passed", "decoder": "passed"}


def _plant_in_encoder(monkeypatch, fault) -> None:
    real = loading.load_encoder

    def planted(cfg, device="cpu", dtype=torch.float32):
        encoder, preprocess = real(cfg, device, dtype)
        return fault(encoder, preprocess)

    monkeypatch.setattr(loading, "load_encoder", planted)


def one_tensor(encoder, preprocess):
    with torch.no_grad():
        encoder.visual.transformer.resblocks[1].mlp.c_fc.weight[0, 0] += 0.5
    return encoder, preprocess


def activation(encoder, preprocess):
    for block in encoder.visual.transformer.resblocks:
        block.mlp.gelu = QuickGELU()
    return encoder, preprocess


def mean(encoder, preprocess):
    shifted = copy.deepcopy(preprocess)
    normalize = shifted.transforms[-1]
    normalize.mean = tuple(m + 0.01 for m in normalize.mean)
    return encoder, shifted


@pytest.mark.parametrize("fault, stage", [(one_tensor, "encoder (embeddings)"), (activation, "encoder (embeddings)"),
                                          (mean, "encoder (pixels)")])
def test_a_fault_in_dsls_encoder_fails_naming_the_stage(fault, stage, saved, capsys, monkeypatch) -> None:
    _plant_in_encoder(monkeypatch, fault)
    args = [*encoder_args(saved), "decode.enabled=false"]
    assert check.main(args) == 1
    verdict = capsys.readouterr().out.splitlines()[-1]
    assert verdict.startswith(f"MISMATCH in {stage}"), verdict
    assert check.recorded(check.compose(args)) == {"encoder": "failed"}


def test_a_fault_in_dsls_text_tower_fails_naming_the_stage(saved, capsys, monkeypatch) -> None:
    real = loading.load_text_model

    def planted(cfg, device="cpu", dtype=torch.float32):
        tower, tokenizer = real(cfg, device, dtype)
        with torch.no_grad():
            tower.text.token_embedding.weight.mul_(1.01)
        return tower, tokenizer

    monkeypatch.setattr(loading, "load_text_model", planted)
    assert check.main(args_for(saved, "encoder")) == 1
    assert capsys.readouterr().out.splitlines()[-1].startswith("MISMATCH in text (text features)")


def _plant_in_decoder(monkeypatch, fault) -> None:
    real = decoders.load_decoder

    def planted(cfg, *args, **kwargs):
        decoder = real(cfg, *args, **kwargs)
        fault(decoder.pipe)
        return decoder

    monkeypatch.setattr(decoders, "load_decoder", planted)


def scheduler(pipe):
    pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, beta_end=0.02)


def unet_tensor(pipe):
    with torch.no_grad():
        pipe.unet.conv_in.bias[0] += 0.5


@pytest.mark.parametrize("fault, stages", [(scheduler, ["decoder (scheduler)", "decoder (picture)"]),
                                           (unet_tensor, ["decoder (tensors)", "decoder (picture)"])])
def test_a_fault_in_dsls_decoder_fails_naming_the_stage(fault, stages, saved, capsys, monkeypatch) -> None:
    _plant_in_decoder(monkeypatch, fault)
    assert check.main(args_for(saved, "decoder")) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[-1].startswith(f"MISMATCH in {', '.join(stages)}:"), out[-1]
    assert "unet.conv_in.bias" in "\n".join(out) or fault is scheduler


def test_bad_input_is_exit_status_2(saved, capsys, tmp_path) -> None:
    assert check.main(["encoder.nme=x"]) == 2
    assert "encoder.nme: no such setting" in capsys.readouterr().err
    assert check.main(["--multirun"]) == 2
    assert check.main(["decoder.path=" + str(tmp_path / "none"), "encoder=bigg14_random", "device=cpu"]) == 2
    assert "not the folder of a saved KandinskyV22Pipeline" in capsys.readouterr().err
    assert check.main(["--help"]) == 0 and "usage: dsl check" in capsys.readouterr().out


def test_weights_not_on_this_machine_are_named_before_anything_loads(capsys) -> None:
    """dsl check downloads nothing: what is missing is listed, with its command, as `dsl run` lists it."""
    assert check.main(["encoder=vitl14", "decoder=kandinsky21"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("dsl: error: 2 of the weights this run needs are not in the Hugging Face cache")
    assert "dsl check downloads nothing" in err[0]
    assert [line.split(": ", 1)[1] for line in err[1:3]] == [
        "hf download timm/vit_large_patch14_clip_224.openai open_clip_pytorch_model.bin",
        "hf download kandinsky-community/kandinsky-2-1 --exclude '*.bin'"]


def test_random_and_tiny_models_have_nothing_to_check(capsys) -> None:
    assert check.main(["debug=tiny"]) == 0
    assert capsys.readouterr().out.strip() == "nothing to check: this run uses no pretrained weights (random or tiny models)"


class FakeManifest:
    def __init__(self, data: dict | None = None):
        self.data = dict(data or {})

    def update(self, **values):
        self.data.update(values)


def test_a_run_records_whether_its_weights_passed_and_says_once_how_to_check(saved, caplog, capsys) -> None:
    args = [*encoder_args(saved), "decode.enabled=false"]
    cfg = check.compose(args)
    manifest = FakeManifest({"status": "running"})
    with caplog.at_level(logging.WARNING, logger="dsl_cli.check"):
        assert check.note_run(cfg, manifest) == {"encoder": "unchecked"}
    assert manifest.data["weights_check"] == {"encoder": "unchecked"}
    said = [r.getMessage() for r in caplog.records if r.name == "dsl_cli.check"]
    assert len(said) == 1 and "run `dsl check` with this run's overrides" in said[0]
    assert check.main(args) == 0
    caplog.clear()
    assert check.note_run(cfg, manifest) == {"encoder": "passed"} and not caplog.records
    assert check.note_run(check.compose(["debug=tiny"]), manifest) == {}  # random and tiny: nothing recorded
    # other weights (the file changed) are unchecked again
    torch.save(perturb_(build_tiny_clip(), seed=1).state_dict(), saved["clip"])
    try:
        assert check.recorded(cfg) == {"encoder": "unchecked"}
    finally:
        torch.save(perturb_(build_tiny_clip()).state_dict(), saved["clip"])


def test_a_broken_cache_file_never_stops_a_run(saved, tmp_path) -> None:
    check.cache_file().parent.mkdir(parents=True, exist_ok=True)
    check.cache_file().write_text("not json")
    manifest = FakeManifest()
    assert check.note_run(check.compose([*encoder_args(saved), "decode.enabled=false"]), manifest) == {
        "encoder": "unchecked"}


def test_a_runs_manifest_records_weights_check(tmp_path, monkeypatch, capsys) -> None:
    """A real run writes the field (empty for the tiny models, which have no upstream copy)."""
    from dsl_cli import cli

    monkeypatch.chdir(tmp_path)
    assert cli.main(["run", "debug=tiny", "decode.enabled=false", "layer=0", f"hydra.run.dir={tmp_path / 'run'}"]) == 0
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["weights_check"] == {} and manifest["status"] == "complete"


def test_the_prior_encoder_is_checked_against_transformers(tmp_path, capsys, monkeypatch) -> None:
    """encoder=kandinsky_prior from a folder saved by transformers (CLIPVisionModelWithProjection): equal to
    transformers' own model and the prior's processor; a changed preprocessing mean fails in the pixels."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    model = perturb_(CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
        patch_size=8, projection_dim=16, hidden_act="gelu")))
    model.save_pretrained(tmp_path / "image_encoder")
    args = ["encoder=kandinsky_prior", f"encoder.checkpoint={tmp_path / 'image_encoder'}", "decode.enabled=false",
            "device=cpu"]
    assert check.main(args) == 0, capsys.readouterr()
    assert capsys.readouterr().out.splitlines()[-1].startswith("PASS")

    def shifted_mean(encoder, preprocess):
        return encoder, type(preprocess)(preprocess.size, tuple(m + 0.01 for m in preprocess.mean), preprocess.std)

    _plant_in_encoder(monkeypatch, shifted_mean)
    assert check.main(args) == 1
    assert capsys.readouterr().out.splitlines()[-1].startswith("MISMATCH in encoder (pixels)")


@pytest.mark.parametrize("family", ["kandinsky21", "unclip_h14"])
def test_the_other_decoder_families_are_checked_against_diffusers(family, tmp_path, capsys) -> None:
    """Kandinsky 2.1 and Stable unCLIP pipelines saved with save_pretrained (diffusers' dummy components) pass."""
    from dsl_cli.decoder import get_family

    cls = get_family(family)
    try:
        cls.build(False, "cpu").save_pretrained(tmp_path / family)
    except Exception as err:  # noqa: BLE001 - a tokenizer built here without vocabulary files may not save
        pytest.skip(f"the tiny {family} pipeline cannot be saved here: {err}")
    args = [f"decoder={family}", f"decoder.path={tmp_path / family}", "encoder=bigg14", f"encoder.name={NAME}",
            "encoder.pretrained=null", "device=cpu"]
    assert check.main(args) == 0, capsys.readouterr()
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == "PASS: dsl's decoder equal the upstream libraries' own", out
