"""Weights that hold NaN or inf are named as damaged files, not blamed on a setting: by the run's finiteness
checks (encoder, adapter, decoder, `dsl adapter fit`) and by `dsl check`, which exits with status 2 and keeps
no verdict; advice that is already in effect (fp32) is not given. `dsl check` says which pretrained encoders
it does not compare, and its terminal carries none of the libraries' notices or loading bars. Tiny models
with fixed seeds, saved in the upstream layouts; nothing is downloaded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from omegaconf import OmegaConf

from dsl_cli import check
from dsl_cli.adapters import AdaptedEncoder, Adapter, raise_not_finite
from dsl_cli.components import Component
from dsl_cli.config import DecoderConfig, EncoderConfig
from dsl_cli.decoder import KandinskyDecoder, check_finite_pictures, load_decoder
from dsl_cli.encoder import load_encoder
from dsl_cli.encoder.loading import TINY_EMBED_DIM, TINY_TEXT_CFG, TINY_VISION_CFG, build_tiny_clip
from dsl_cli.errors import UserError
from dsl_cli.lenses import Scores, check_finite, get_lens
from dsl_cli.weights import nonfinite_weight
from helpers import dsl_in_process, perturb_
from test_check import offline  # noqa: F401 - autouse: offline, empty hub and dsl caches, 16 px decodings

NAME = "dsl-nonfinite-tiny"
DAMAGED = "the weight files are damaged"


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    """A tiny CLIP registered with open_clip, saved sound and with one NaN weight; the tiny Kandinsky 2.2
    pipeline saved sound and with one NaN in its UNet."""
    folder = tmp_path_factory.mktemp("upstream")
    (folder / f"{NAME}.json").write_text(json.dumps({"embed_dim": TINY_EMBED_DIM, "vision_cfg": TINY_VISION_CFG,
                                                     "text_cfg": TINY_TEXT_CFG}))
    open_clip.add_model_config(folder / f"{NAME}.json")
    torch.manual_seed(0)
    clip = perturb_(build_tiny_clip())
    torch.save(clip.state_dict(), folder / "clip.bin")
    with torch.no_grad():
        clip.visual.transformer.resblocks[1].mlp.c_fc.weight[0, 0] = float("nan")
    torch.save(clip.state_dict(), folder / "nan_clip.bin")
    pipe = KandinskyDecoder.build(False, "cpu")
    pipe.save_pretrained(folder / "decoder")
    with torch.no_grad():
        pipe.unet.conv_in.weight[0, 0, 0, 0] = float("inf")
    pipe.save_pretrained(folder / "nan_decoder")
    return {"clip": folder / "clip.bin", "nan_clip": folder / "nan_clip.bin", "decoder": folder / "decoder",
            "nan_decoder": folder / "nan_decoder"}


def encoder_args(clip: Path) -> list[str]:
    return ["encoder=bigg14", f"encoder.name={NAME}", "encoder.pretrained=null", f"encoder.checkpoint={clip}",
            "lens.text=false", "device=cpu"]


def decoder_only_args(decoder: Path) -> list[str]:  # a random encoder: the decoder alone is compared
    return ["encoder=bigg14", f"encoder.name={NAME}", "encoder.pretrained=null", f"decoder.path={decoder}",
            "device=cpu"]


# ---------------------------------------------------------------- dsl check


@pytest.mark.parametrize("which, who, file", [("encoder", "encoder", "nan_clip"),
                                              ("decoder", "decoder", "nan_decoder")])
def test_check_names_damaged_weights_exits_2_and_records_nothing(which, who, file, saved, tmp_path, monkeypatch,
                                                                 capsys) -> None:
    """Both copies of a NaN weight give NaN: that is no mismatch between dsl and upstream but damaged files
    (exit 2, the file named), and no verdict is kept for them."""
    args = ([*encoder_args(saved[file]), "decode.enabled=false"] if which == "encoder"
            else decoder_only_args(saved[file]))
    code, err = dsl_in_process(["check", *args], tmp_path, monkeypatch, capsys)
    assert code == 2, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"dsl: error: the {who}'s weights hold NaN or inf (e.g. "), last
    assert DAMAGED in last and str(saved[file]) in last and "MISMATCH" not in capsys.readouterr().out
    assert check.recorded(check.compose(args)) == {which: "unchecked"}


def test_check_says_a_timm_or_hf_encoder_is_not_compared_but_refuses_its_damaged_weights(tmp_path, capsys) -> None:
    """Pretrained weights that dsl check has no upstream loader for are not "no pretrained weights"; loaded by
    their own library, they are still checked for NaN and for being readable (a NaN passed with status 0)."""
    import timm
    from safetensors.torch import save_file

    weights = tmp_path / "vit.safetensors"
    args = ["encoder=timm", "encoder.name=vit_tiny_patch16_224", f"encoder.checkpoint={weights}",
            "decode.enabled=false", "device=cpu"]
    full = timm.create_model("vit_tiny_patch16_224", pretrained=False).state_dict()
    save_file(full, weights)
    assert check.main(args) == 0
    verdict = capsys.readouterr().out.strip().splitlines()[-1]
    assert verdict.startswith("nothing compared: encoder=timm") and "not transformers or timm ViTs" in verdict
    assert "no pretrained weights" not in verdict and "hold no NaN" in verdict
    full["blocks.1.mlp.fc1.weight"][0, 0] = float("nan")
    save_file(full, weights)
    assert check.main(args) == 2
    assert "the encoder's weights hold NaN or inf (e.g. visual.blocks.1.mlp.fc1.weight)" in capsys.readouterr().err
    weights.write_bytes(b"")
    assert check.main(args) == 2 and "could not be read" in capsys.readouterr().err


def test_check_prints_no_library_notices_or_bars(saved, tmp_path) -> None:
    """diffusers' FutureWarning and accelerate notice, its "Loading pipeline components" bar: none reach the
    terminal of `dsl check` (a fresh process, as a user's: libraries print as they are first imported)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "DSL_CACHE": str(tmp_path / "dsl")}
    code = ("import sys, open_clip; open_clip.add_model_config(sys.argv[1]); from dsl_cli import check; "
            "check.CHECK_SIZE = 16; sys.exit(check.main(sys.argv[2:]))")
    done = subprocess.run([sys.executable, "-c", code, str(saved["clip"].parent / f"{NAME}.json"),
                           *decoder_only_args(saved["decoder"])], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1].startswith("PASS")
    assert [line for line in done.stderr.splitlines() if not line.startswith("no CUDA device found")] == []


# ---------------------------------------------------------------- a run's finiteness checks


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return load_encoder(EncoderConfig(source="tiny"))[0]


def _not_finite(k: int = 1) -> tuple[torch.Tensor, torch.Tensor, Scores]:
    """A batch of one image whose clean embedding is NaN (and so every lens embedding and score)."""
    clean = torch.full((1, TINY_EMBED_DIM), float("nan"))
    return clean, clean.unsqueeze(1).expand(1, k, -1), Scores(torch.full((1, k), float("nan")), torch.ones(1, k))


def test_a_damaged_adapter_is_named_not_the_encoder_dtype(encoder) -> None:
    adapter = Adapter(torch.randn(8, encoder.d_embed), torch.zeros(8))
    adapter.W[3, 1] = float("nan")
    with pytest.raises(UserError) as refused:
        check_finite(get_lens("steering"), "fp32", ["a.png"], [Component("head", 0, 0)], *_not_finite(),
                     encoder=AdaptedEncoder(encoder, adapter))
    message = str(refused.value)
    assert message.startswith("the adapter's weights hold NaN or inf (e.g. adapter.W): " + DAMAGED), message
    assert "adapter=" in message and "dtype" not in message and "lens.alpha" not in message


def test_sound_fp32_weights_are_not_told_to_use_fp32(encoder) -> None:
    with pytest.raises(UserError) as refused:
        check_finite(get_lens("steering"), "fp32", ["a.png"], [Component("head", 0, 0)], *_not_finite(),
                     encoder=encoder)
    assert "with encoder.dtype=fp32" in str(refused.value) and "use encoder.dtype=fp32" not in str(refused.value)
    with pytest.raises(UserError, match="use encoder.dtype=fp32"):
        check_finite(get_lens("steering"), "bf16", ["a.png"], [Component("head", 0, 0)], *_not_finite())


def test_adapter_fitting_names_a_damaged_encoder_and_spares_fp32_advice(encoder) -> None:
    damaged = Adapter(torch.full((4, 4), float("inf")), torch.zeros(4))
    with pytest.raises(UserError, match=r"^the target encoder's weights hold NaN or inf \(e.g. W\)"):
        raise_not_finite("a.png", encoder, damaged)
    with pytest.raises(UserError) as refused:
        raise_not_finite("a.png", encoder, encoder)
    assert "use encoder.dtype=fp32" not in str(refused.value)


def test_a_damaged_decoder_is_named_and_auto_on_the_cpu_is_not_told_fp32() -> None:
    decoder = load_decoder(DecoderConfig(source="tiny"))
    pictures = np.full((1, 4, 4, 3), np.nan, np.float32)
    cfg = OmegaConf.create({"guidance": 4.0, "dtype": "auto"})
    with pytest.raises(UserError) as refused:
        check_finite_pictures(pictures, ["a L0H0"], cfg, decoder)
    assert str(refused.value).endswith("decode.dtype=auto; lower decode.guidance")  # auto is fp32 on the CPU
    with torch.no_grad():
        decoder.pipe.unet.conv_in.weight[0, 0, 0, 0] = float("nan")
    assert nonfinite_weight(decoder) == "pipe.unet.conv_in.weight"
    with pytest.raises(UserError, match=r"^the decoder's weights hold NaN or inf \(e\.g\. pipe\.unet\.conv_in\."):
        check_finite_pictures(pictures, ["a L0H0"], cfg, decoder)


@pytest.mark.parametrize("model", ["encoder", "decoder"])
def test_a_run_names_damaged_weights_not_a_setting(model: str, tmp_path, monkeypatch, capsys) -> None:
    """`dsl run` hands the encoder and the decoder to its finiteness checks: one NaN in either model's weights
    is named as damaged weights, not blamed on encoder.dtype or decode.guidance."""
    from dsl_cli import run

    loader = {"encoder": "load_encoder", "decoder": "load_decoder"}[model]
    real = getattr(run, loader)

    def damaged(*args, **kwargs):
        loaded = real(*args, **kwargs)
        target = loaded[0] if model == "encoder" else loaded.pipe.unet
        with torch.no_grad():
            next(p for p in target.parameters() if p.is_floating_point()).view(-1)[0] = float("nan")
        return loaded

    monkeypatch.setattr(run, loader, damaged)
    args = ["run", "debug=tiny", "images.limit=1", "layer=1", "decode.top_k=1", "hydra.run.dir=run",
            *(["decode.enabled=false"] if model == "encoder" else [])]
    code, err = dsl_in_process(args, tmp_path, monkeypatch, capsys)
    assert code == 2 and f"the {model}'s weights hold NaN or inf" in err, err[-2000:]
