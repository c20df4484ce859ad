"""Decoder: batched, seeded decoding equals the diffusers pipeline called one item at a time."""

from __future__ import annotations

import io
import logging

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, KandinskyV22Pipeline

from dsl_cli.config import DecoderConfig
from dsl_cli.decoder import KandinskyDecoder, load_decoder, to_pil, to_uint8
from dsl_cli.devices import resolve_dtype
from dsl_cli.errors import UserError

SIZE, STEPS, GUIDANCE = 64, 2, 4.0
KW = dict(height=SIZE, width=SIZE, steps=STEPS, guidance=GUIDANCE, progress=False)


@pytest.fixture(scope="module")
def dec() -> KandinskyDecoder:
    return load_decoder(DecoderConfig(source="tiny"))


def _inputs(n: int, dim: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    return torch.randn(n, dim, generator=g), torch.randn(1, dim, generator=g)


def _reference(pipe: KandinskyV22Pipeline, embed: torch.Tensor, negative: torch.Tensor, seed: int) -> np.ndarray:
    """The pipeline itself, one embedding per call, as diffusers' docs use it."""
    return pipe(
        image_embeds=embed[None],
        negative_image_embeds=negative,
        generator=torch.Generator().manual_seed(seed),
        height=SIZE,
        width=SIZE,
        num_inference_steps=STEPS,
        guidance_scale=GUIDANCE,
        output_type="np",
    ).images[0]


def test_tiny_decoder_is_the_stochastic_ddpm_pipeline(dec: KandinskyDecoder) -> None:
    # DDPM adds fresh noise at every step: the case where per-item generators matter most.
    assert type(dec.pipe.scheduler).__name__ == "DDPMScheduler"
    assert dec.embed_dim == 32 and dec.pipe.movq_scale_factor == 8  # the real MoVQ's latents, an eighth


def test_decode_equals_pipeline_one_item_at_a_time(dec: KandinskyDecoder) -> None:
    embeds, negative = _inputs(4)
    seeds = [0, 1, 2, 0]
    got = dec.decode(embeds, negative, seeds, batch_size=4, **KW)
    assert got.shape == (4, SIZE, SIZE, 3) and got.dtype == np.float32
    assert 0.0 <= got.min() and got.max() <= 1.0 and got.std() > 0.01
    for i, seed in enumerate(seeds):
        np.testing.assert_allclose(got[i], _reference(dec.pipe, embeds[i], negative, seed), atol=1e-3)


@pytest.mark.parametrize("scheduler", ["ddpm", "ddim"])
def test_batch_size_does_not_change_pictures(scheduler: str) -> None:
    dec = load_decoder(DecoderConfig(source="tiny"), scheduler=scheduler)
    embeds, negative = _inputs(7)
    seeds = [5, 6, 7, 8, 9, 5, 5]
    runs = [dec.decode(embeds, negative, seeds, batch_size=b, **KW) for b in (1, 3, 8)]
    for run in runs[1:]:
        np.testing.assert_allclose(run, runs[0], atol=1e-3)
    # Seeds, not positions, set the noise: items 5 and 6 share item 0's seed but not its embedding.
    assert np.abs(runs[0][5] - runs[0][6]).max() > 1e-2


def test_the_named_scheduler_runs_whatever_the_saved_pipeline_ships(dec: KandinskyDecoder, tmp_path) -> None:
    """A decoder saved with DDIM, run with decode.scheduler=ddpm, is the pipeline given a DDPM scheduler made
    from the same config; the checkpoint's betas and prediction type are kept."""
    ddim = DDIMScheduler.from_config({**dec.pipe.scheduler.config, "beta_end": 0.02, "prediction_type": "epsilon"})
    KandinskyV22Pipeline(unet=dec.pipe.unet, movq=dec.pipe.movq, scheduler=ddim).save_pretrained(tmp_path)
    loaded = load_decoder(DecoderConfig(source="pretrained", path=str(tmp_path)), scheduler="ddpm")
    assert type(loaded.pipe.scheduler) is DDPMScheduler
    assert loaded.pipe.scheduler.config.beta_end == 0.02
    torch.testing.assert_close(loaded.pipe.scheduler.betas, ddim.betas)

    reference = KandinskyV22Pipeline.from_pretrained(tmp_path)
    reference.set_progress_bar_config(disable=True)
    as_saved = reference.scheduler.config
    embeds, negative = _inputs(2)
    got = loaded.decode(embeds, negative, [3, 4], batch_size=2, **KW)
    as_shipped = [_reference(reference, embeds[i], negative, seed) for i, seed in enumerate([3, 4])]
    reference.scheduler = DDPMScheduler.from_config(as_saved)
    for i, seed in enumerate([3, 4]):
        np.testing.assert_allclose(got[i], _reference(reference, embeds[i], negative, seed), atol=1e-3)
        assert np.abs(got[i] - as_shipped[i]).max() > 1e-2  # DDIM would have given other pictures


def test_same_seed_gives_identical_png_bytes(dec: KandinskyDecoder) -> None:
    embeds, negative = _inputs(2)

    def pngs() -> list[bytes]:
        out = []
        for image in dec.decode(embeds, negative, 42, batch_size=2, **KW):
            buf = io.BytesIO()
            to_pil(image).save(buf, format="PNG")
            out.append(buf.getvalue())
        return out

    assert pngs() == pngs()


def _fail_above(limit: int, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Make the pipeline raise CUDA out-of-memory for batches above `limit`; return the batch sizes tried."""
    original = KandinskyV22Pipeline.__call__
    tried: list[int] = []

    def call(self, *args, **kwargs):
        tried.append(len(kwargs["image_embeds"]))
        if tried[-1] > limit:
            raise torch.cuda.OutOfMemoryError("injected")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(KandinskyV22Pipeline, "__call__", call)
    return tried


def test_out_of_memory_halves_the_batch_and_loses_nothing(
    dec: KandinskyDecoder, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    embeds, negative = _inputs(7)
    seeds = list(range(7))
    expected = dec.decode(embeds, negative, seeds, batch_size=1, **KW)
    tried = _fail_above(2, monkeypatch)
    with caplog.at_level(logging.WARNING, logger="dsl_cli.decoder"):
        batches = list(dec.iter_decode(embeds, negative, seeds, batch_size=8, **KW))
    assert tried == [7, 4, 2, 2, 2, 1]
    assert [i for indices, _ in batches for i in indices] == list(range(7))
    np.testing.assert_allclose(np.concatenate([images for _, images in batches]), expected, atol=1e-3)
    assert [r.getMessage() for r in caplog.records] == [
        "CUDA out of memory: decoding in batches of 4 from item 0 on",
        "CUDA out of memory: decoding in batches of 2 from item 0 on"]


def test_out_of_memory_at_batch_one_is_raised(dec: KandinskyDecoder, monkeypatch: pytest.MonkeyPatch) -> None:
    embeds, negative = _inputs(2)
    tried = _fail_above(0, monkeypatch)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        dec.decode(embeds, negative, 0, batch_size=2, **KW)
    assert tried == [2, 1]


def test_wrong_sizes_and_seed_counts_are_refused(dec: KandinskyDecoder) -> None:
    embeds, negative = _inputs(2)
    with pytest.raises(UserError, match="multiples of 64"):
        dec.decode(embeds, negative, 0, **{**KW, "height": 96})
    with pytest.raises(ValueError, match="3 seeds for 2"):
        dec.decode(embeds, negative, [0, 1, 2], **KW)


def test_missing_weights_become_one_line_user_errors(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    def offline(*args, **kwargs):
        raise OSError("the model is not fully cached locally")

    # Stand-in for an offline hub cache miss: tests never reach the network.
    monkeypatch.setattr(KandinskyV22Pipeline, "from_pretrained", offline)
    with pytest.raises(UserError) as err:
        load_decoder(DecoderConfig(source="pretrained"))
    message = str(err.value)
    assert "\n" not in message
    assert "`hf download kandinsky-community/kandinsky-2-2-decoder --exclude" in message
    assert "decoder.path=" in message
    with pytest.raises(UserError, match="no such folder"):
        load_decoder(DecoderConfig(source="pretrained", path=str(tmp_path / "absent")))


def test_dtype_and_source_names() -> None:
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("auto", "cuda") == torch.bfloat16
    assert resolve_dtype("fp16", "cuda") == torch.float16
    with pytest.raises(UserError):
        resolve_dtype("fp64", "cpu")
    with pytest.raises(UserError):
        load_decoder(DecoderConfig(source="tiny"), scheduler="euler")


def test_to_uint8_rounds_and_clips() -> None:
    image = np.array([-0.1, 0.0, 0.4 / 255, 0.6 / 255, 0.5, 0.6, 1.0, 1.2], dtype=np.float32)
    assert to_uint8(image).tolist() == [0, 0, 0, 1, 128, 153, 255, 255]  # 0.6 * 255 = 153


@pytest.mark.slow
def test_real_architecture_with_random_weights_builds_and_decodes() -> None:
    dec = load_decoder(DecoderConfig(source="random"))
    unet = sum(p.numel() for p in dec.pipe.unet.parameters())
    movq = sum(p.numel() for p in dec.pipe.movq.parameters())
    assert unet == pytest.approx(1.253e9, rel=5e-3)  # DESIGN.md section 2
    assert movq == pytest.approx(67.8e6, rel=5e-3)
    assert dec.embed_dim == 1280 and dec.size_multiple == 64
    embeds, negative = _inputs(1, dim=1280)
    image = dec.decode(embeds, negative, 0, height=64, width=64, steps=2, guidance=4.0, progress=False)
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()


# ---- requests, placement and options (mutation testing: docs/testing.md) ----------------------------

def test_picture_sizes_and_names_are_checked_before_any_model() -> None:
    from dsl_cli.decoder import check_request

    check_request("tiny", "ddpm", 128, 64)
    check_request("pretrained", "dpm", 512, None)
    for args, message in [
        (("tiny", "ddpm", 80, 64), "decode.height=80: must be a multiple of 64 for this decoder (e.g. 64)"),
        (("tiny", "dpm", 64, 3), "decode.width=3: must be a multiple of 64 for this decoder (e.g. 64)"),
        (("random", "ddim", 512, 600), "decode.width=600: must be a multiple of 64 for this decoder (e.g. 576)"),
        (("pretrained", "ddpm", 100, 512), "decode.height=100: must be a multiple of 64 for this decoder (e.g. 128)"),
        (("hub", "ddpm"), "decoder.source='hub': choose one of pretrained, random, tiny"),
        (("tiny", "euler"), "decode.scheduler='euler': choose one of ddpm, ddim, dpm"),
        (("tiny", "unipc"), "decode.scheduler='unipc': choose one of ddpm, ddim, dpm"),
    ]:
        with pytest.raises(UserError) as err:
            check_request(*args)
        assert str(err.value) == message


@pytest.mark.parametrize("scheduler", ["dpm", "ddim"])
def test_scheduler_precision_and_memory_layout_options(scheduler: str) -> None:
    state = torch.random.get_rng_state()
    dec = load_decoder(DecoderConfig(source="tiny"), dtype=torch.float64, scheduler=scheduler, channels_last=True)
    assert torch.equal(state, torch.random.get_rng_state())  # the seeded build leaves the caller's RNG alone
    assert type(dec.pipe.scheduler).__name__ == {"dpm": "DPMSolverMultistepScheduler",
                                                 "ddim": "DDIMScheduler"}[scheduler]
    assert dec.pipe.scheduler.config.beta_end == 0.012 and dec.pipe.scheduler.config.steps_offset == 1
    assert dec.dtype == torch.float64 and dec.pipe.movq.dtype == torch.float64 and dec.device == torch.device("cpu")
    for model in (dec.pipe.unet, dec.pipe.movq):
        conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1))
        assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    plain = load_decoder(DecoderConfig(source="tiny"))
    for a, b in zip(plain.pipe.unet.parameters(), dec.pipe.unet.parameters()):
        torch.testing.assert_close(a.double(), b)  # the same seeded weights, only cast
    embeds, negative = _inputs(1)
    image = dec.decode(embeds, negative, 0, batch_size=0, **KW)  # a batch size below 1 decodes one at a time
    assert image.shape == (1, SIZE, SIZE, 3) and np.isfinite(image).all()


def test_pretrained_decoder_is_loaded_from_the_folder_or_the_hub(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    calls = []

    def record(source, **kwargs):
        calls.append((source, kwargs))
        raise OSError("not cached")

    monkeypatch.setattr(KandinskyV22Pipeline, "from_pretrained", record)
    with pytest.raises(UserError) as err:
        load_decoder(DecoderConfig(source="pretrained"), dtype=torch.float16)
    assert str(err.value).startswith(
        "cannot load the Kandinsky 2.2 decoder 'kandinsky-community/kandinsky-2-2-decoder' (OSError): run `")
    with pytest.raises(UserError, match=f"decoder '{tmp_path}' \\(OSError\\)"):
        load_decoder(DecoderConfig(source="pretrained", path=str(tmp_path)))
    assert calls == [("kandinsky-community/kandinsky-2-2-decoder", {"torch_dtype": torch.float16}),
                     (str(tmp_path), {"torch_dtype": torch.float32})]


@pytest.mark.parametrize("dtype, fix", [("bf16", "lower decode.guidance or use decode.dtype=fp32"),
                                        ("fp32", "lower decode.guidance")])
def test_the_first_picture_that_is_not_finite_is_named_with_the_settings_that_made_it(dtype: str, fix: str) -> None:
    """Pictures [N, H, W, 3]: the first holding NaN or inf (one value is enough) is named by its label; in
    fp32 the fix is the guidance alone. Finite pictures pass, whatever their range."""
    from omegaconf import OmegaConf

    from dsl_cli.decoder import check_finite_pictures

    cfg = OmegaConf.create({"guidance": 7.5, "dtype": dtype})
    pictures = np.random.default_rng(0).normal(0.5, 2.0, (4, 3, 5, 3)).astype(np.float32)
    check_finite_pictures(pictures, list("abcd"), cfg)
    for bad, value in ((2, np.nan), (1, -np.inf)):
        pictures[bad, 2, 4, 1] = value
        with pytest.raises(UserError) as refused:
            check_finite_pictures(pictures, list("abcd"), cfg)
        assert str(refused.value) == (f"{'abcd'[bad]}: the decoded picture is not finite (NaN or inf) with "
                                      f"decode.guidance=7.5, decode.dtype={dtype}; {fix}")


def test_only_dsls_own_bar_shows_while_decoding(dec: KandinskyDecoder, capfd: pytest.CaptureFixture) -> None:
    """One bar over the pictures (ours, counted in img), none per pipeline call (diffusers', in it/s)."""
    embeds, negative = _inputs(2)
    quiet = {k: v for k, v in KW.items() if k != "progress"}
    dec.decode(embeds, negative, 0, batch_size=1, progress=False, **quiet)
    assert capfd.readouterr().err == ""
    dec.decode(embeds, negative, 0, batch_size=1, **quiet)  # progress by default
    err = capfd.readouterr().err
    assert "decode: 100%" in err and "2/2" in err and "img/s" in err and "it/s" not in err


def test_random_components_are_drawn_after_seed_0_as_in_diffusers_tests() -> None:
    from dsl_cli.decoder import _seeded

    torch.manual_seed(0)
    expected = torch.randn(5)
    torch.manual_seed(7)
    assert torch.equal(_seeded(torch.randn, 5), expected)


def test_the_python_api_decodes_with_the_defaults_of_dsl_run(dec: KandinskyDecoder, monkeypatch) -> None:
    """A notebook calling `decode` or `iter_decode` without settings gets what `dsl run` does by default
    (DecodeConfig): 512 x 512 pictures, 100 steps, guidance 4 (the pipeline call itself stubbed: the settings it
    is given are the point)."""
    from dsl_cli.config import DecodeConfig

    calls = []

    def pipeline_call(embeds, negative, seeds, height, width, steps, guidance):
        calls.append((height, width, steps, guidance))
        return np.zeros((len(embeds), height, width, 3), dtype=np.float32)

    monkeypatch.setattr(dec, "_run", pipeline_call)
    fits = []  # batch_size "auto" (the default) sizes the batch for the pictures asked for
    monkeypatch.setattr(dec, "fit_batch_size", lambda *args: fits.append(args) or 8)
    embeds, negative = torch.randn(2, dec.embed_dim), torch.zeros(1, dec.embed_dim)
    assert dec.decode(embeds, negative, 0, progress=False).shape == (2, 512, 512, 3)
    assert [batch.shape for _, batch in dec.iter_decode(embeds, negative, 0, progress=False)] == [(2, 512, 512, 3)]
    run_defaults = DecodeConfig()
    assert calls == [(run_defaults.height, run_defaults.width, run_defaults.steps, run_defaults.guidance)] * 2
    assert fits == [(2, run_defaults.height, run_defaults.width, run_defaults.guidance)] * 2
