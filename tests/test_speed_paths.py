"""Every precision and speed path of the GPU, exercised on the CPU: bf16 encoder and decoder, channels_last,
compile_unet (inductor), `batch_size: auto`, the host-side scheduler that keeps the denoising loop free of
device reads, and moving the encoder off the GPU to make room. Oracles: the fp32 model, the uncompiled
and NCHW decoder, diffusers' pipeline called directly, the meta device (any read of a device value fails
there), and hand-computed memory sums. The same paths on real CUDA are in test_gpu.py."""

from __future__ import annotations

import json
import os
import shutil
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import KandinskyV22Pipeline
from PIL import Image

from dsl_cli import run
from dsl_cli.config import DecoderConfig, EncoderConfig
from dsl_cli.decoder import SCHEDULERS, HostTimesteps, batch_that_fits, host_timesteps, load_decoder, scheduler_class
from dsl_cli.devices import dtype_name
from dsl_cli.encoder import HookedEncoder, build_tiny_visual, load_encoder

KW = dict(height=64, width=64, steps=2, guidance=4.0, progress=False)
COMPONENTS = [f"L{l}H{h}" for l in range(4) for h in range(4)] + [f"L{l}MLP" for l in range(4)]


def _inputs(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    return torch.randn(n, 32, generator=g), torch.randn(1, 32, generator=g)


@pytest.fixture(scope="module")
def fp32_pictures() -> np.ndarray:
    """The reference: 4 pictures from the fp32, NCHW, uncompiled tiny decoder."""
    embeds, negative = _inputs(4)
    return load_decoder(DecoderConfig(source="tiny")).decode(embeds, negative, [0, 1, 2, 3], batch_size=4, **KW)


# ---- bf16 -------------------------------------------------------------------------------------------------

def test_bf16_encoder_matches_open_clip_and_its_dsl_embeddings_stay_within_0_999_of_fp32(tiny_pixels) -> None:
    fp32 = HookedEncoder(build_tiny_visual())
    bf16 = HookedEncoder(build_tiny_visual()).to(torch.bfloat16)
    cache = bf16.run_with_cache(tiny_pixels)
    assert cache.embeds.dtype == torch.bfloat16
    with torch.no_grad():  # open_clip's own forward in bf16: the same products, rounded alike
        torch.testing.assert_close(cache.embeds, bf16.visual(tiny_pixels.bfloat16()), atol=2e-2, rtol=2e-2)
    ours = bf16.steer(cache, COMPONENTS).float()
    reference = fp32.steer(fp32.run_with_cache(tiny_pixels), COMPONENTS)
    cosine = torch.nn.functional.cosine_similarity(ours, reference, dim=-1)
    assert cosine.min() >= 0.999  # measured: 0.99994 (tiny, CPU); bigG random: 0.99987 (docs/benchmarks.md)


def test_bf16_decoder_stays_close_to_fp32(fp32_pictures: np.ndarray) -> None:
    embeds, negative = _inputs(4)
    decoder = load_decoder(DecoderConfig(source="tiny"), dtype=torch.bfloat16)
    assert decoder.dtype == torch.bfloat16 and decoder.pipe.movq.dtype == torch.bfloat16
    got = decoder.decode(embeds, negative, [0, 1, 2, 3], batch_size=4, **KW)
    assert got.dtype == np.float32 and np.isfinite(got).all()
    # The tiny random decoder saturates, so single pixels can flip; measured: mean |diff| 0.022, corr 0.992.
    assert np.abs(got - fp32_pictures).mean() < 0.05
    assert np.corrcoef(got.ravel(), fp32_pictures.ravel())[0, 1] > 0.98


def test_a_bf16_decoder_takes_float32_embeddings_without_guidance_too() -> None:
    """The pipeline casts the embeddings to the UNet's precision only when it applies guidance."""
    embeds, negative = _inputs(2)
    decoder = load_decoder(DecoderConfig(source="tiny"), dtype=torch.bfloat16)
    unguided = {**KW, "guidance": 1.0}
    got = decoder.decode(embeds, negative, [0, 1], batch_size=2, **unguided)
    expected = decoder.decode(embeds.bfloat16(), negative.bfloat16(), [0, 1], batch_size=2, **unguided)
    np.testing.assert_array_equal(got, expected)


# ---- channels_last and compile ------------------------------------------------------------------------------

def test_by_default_the_unet_is_neither_channels_last_nor_compiled() -> None:
    """Both are GPU speed-ups a run asks for (`decode.channels_last`, `decode.compile`), never the default."""
    decoder = load_decoder(DecoderConfig(source="tiny"))
    assert type(decoder.pipe.unet).__name__ == "UNet2DConditionModel"
    assert decoder.pipe.unet.conv_in.weight.is_contiguous()
    assert decoder.pipe.movq.encoder.conv_in.weight.is_contiguous()


def test_channels_last_gives_the_same_pictures(fp32_pictures: np.ndarray) -> None:
    embeds, negative = _inputs(4)
    decoder = load_decoder(DecoderConfig(source="tiny"), channels_last=True)
    conv = decoder.pipe.unet.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    got = decoder.decode(embeds, negative, [0, 1, 2, 3], batch_size=4, **KW)
    np.testing.assert_allclose(got, fp32_pictures, atol=1e-3)  # measured: 1.6e-4


@pytest.mark.skipif(not shutil.which(os.environ.get("CXX", "g++")),
                    reason="torch.compile's inductor needs a C++ compiler on the CPU (install g++)")
def test_compiled_unet_gives_the_same_pictures(fp32_pictures: np.ndarray) -> None:
    """Inductor on the CPU (a C++ compiler builds its kernels: about a minute the first time, seconds once
    inductor's on-disk cache holds the graph; `device_check.sh --dry-run` compiles the same shapes)."""
    embeds, negative = _inputs(4)
    decoder = load_decoder(DecoderConfig(source="tiny"), compile_unet=True)
    assert type(decoder.pipe.unet).__name__ == "OptimizedModule"
    got = decoder.decode(embeds[:2], negative, [0, 1], batch_size=2, **KW)
    np.testing.assert_allclose(got, fp32_pictures[:2], atol=1e-3)  # measured: 7e-5


# ---- the denoising loop never reads the device ---------------------------------------------------------------

@pytest.mark.parametrize("scheduler", ["ddpm", "ddim", "dpm"])
def test_denoising_loop_never_reads_a_device_value(scheduler: str) -> None:
    """On the meta device every read of a tensor's value (`.item()`, `bool(t > 0)`, `nonzero`) raises: the
    CPU stand-in for `torch.cuda.set_sync_debug_mode("error")`. Unwrapped, diffusers' schedulers do read
    their device timesteps; with `host_timesteps` the whole loop runs."""
    pipe = load_decoder(DecoderConfig(source="tiny"), scheduler=scheduler).pipe.to("meta")
    embeds = torch.zeros(2, 32, device="meta")
    call = dict(image_embeds=embeds, negative_image_embeds=embeds, height=64, width=64, num_inference_steps=3,
                guidance_scale=4.0, output_type="latent")  # the MoVQ and `.cpu()` come after the loop
    with pytest.raises((RuntimeError, NotImplementedError)):
        pipe(generator=[torch.Generator().manual_seed(i) for i in range(2)], **call)
    with host_timesteps(pipe):
        latents = pipe(generator=[torch.Generator().manual_seed(i) for i in range(2)], **call).images
    assert latents.device.type == "meta" and latents.shape == (2, 4, 8, 8)  # latents an eighth of 64 pixels
    assert pipe.config.scheduler[1] == type(pipe.scheduler).__name__  # the pipeline's own scheduler is back


def test_host_timesteps_compute_on_the_host_and_hand_the_pipeline_its_device() -> None:
    """The wrapped scheduler's table stays on the CPU whatever device the pipeline asks for; the pipeline gets
    a copy on its device (none asked: the host), and the scheduler's own arguments (custom timesteps) pass."""
    inner = scheduler_class("ddpm")(num_train_timesteps=1000)
    with_device = HostTimesteps(inner)
    with_device.set_timesteps(None, device="meta", timesteps=[999, 500, 0])
    assert with_device.timesteps.device.type == "meta" and with_device.timesteps.shape == (3,)
    assert inner.timesteps.device.type == "cpu" and inner.timesteps.tolist() == [999, 500, 0]
    without = HostTimesteps(inner)
    without.set_timesteps(4)
    assert without.timesteps.device.type == "cpu" and without.timesteps.tolist() == inner.timesteps.tolist()
    assert len(inner.timesteps) == 4


def test_host_timesteps_step_with_the_next_host_timestep_and_the_schedulers_own_arguments() -> None:
    """The i-th `step` is given the i-th host timestep whatever the pipeline passes (here a meta tensor, which DDPM
    could not read), and the scheduler's own arguments, positional ones included (generator, return_dict)."""
    wrapped, reference = HostTimesteps(scheduler_class("ddpm")()), scheduler_class("ddpm")()
    wrapped.set_timesteps(3, device="meta")
    reference.set_timesteps(3)
    sample, noise = torch.ones(1, 4, 8, 8), torch.full((1, 4, 8, 8), 0.5)
    for t in reference.timesteps:
        got = wrapped.step(noise, torch.zeros((), device="meta"), sample, torch.Generator().manual_seed(1), False)
        want = reference.step(noise, t, sample, generator=torch.Generator().manual_seed(1), return_dict=False)
        assert isinstance(got, tuple)
        torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
        sample = want[0]


@pytest.mark.parametrize("scheduler", ["ddim", "dpm"])
def test_host_timesteps_change_no_picture(scheduler: str) -> None:
    """The pipeline called directly (device timesteps, as diffusers does it) against `decode` (host ones),
    one picture per call so that batching's round-off stays out. DDPM: test_decoder compares the same."""
    embeds, negative = _inputs(2)
    decoder = load_decoder(DecoderConfig(source="tiny"), scheduler=scheduler)
    got = decoder.decode(embeds, negative, [4, 5], batch_size=1, **KW)
    for i, seed in enumerate((4, 5)):
        direct = decoder.pipe(image_embeds=embeds[i:i + 1], negative_image_embeds=negative,
                              generator=torch.Generator().manual_seed(seed), height=64, width=64,
                              num_inference_steps=2, guidance_scale=4.0, output_type="np").images[0]
        np.testing.assert_allclose(got[i], direct, atol=1e-6)  # measured: identical
    assert set(SCHEDULERS) >= {"ddpm", "ddim", "dpm"}


# ---- batch_size: auto ----------------------------------------------------------------------------------------

def test_auto_batch_fits_free_memory_with_a_margin() -> None:
    gib = 2**30
    # probe peaks 3 GiB (one picture) and 4 GiB (two): 1 GiB per picture, 2 GiB fixed; 20 GiB free, 15 % kept
    assert batch_that_fits(100, 3 * gib, 4 * gib, 20 * gib, margin=0.15) == 15  # (17 - 2) / 1
    assert batch_that_fits(8, 3 * gib, 4 * gib, 20 * gib, margin=0.15) == 8  # never more than asked for
    assert batch_that_fits(100, 3 * gib, 4 * gib, 2 * gib, margin=0.15) == 1  # at least one: OOM halving is the net
    assert batch_that_fits(100, 5 * gib, 9 * gib, 40 * gib, margin=0.0) == 9  # 4 GiB per picture, 1 fixed: 39 / 4


def test_auto_batch_on_the_cpu_is_the_old_default() -> None:
    decoder = load_decoder(DecoderConfig(source="tiny"))
    assert decoder.fit_batch_size(100, 64, 64, 4.0) == 8
    assert decoder.fit_batch_size(3, 64, 64, 4.0) == 3


GIB = 2**30


def _on_fake_cuda(monkeypatch, tmp_path, gpu: str = "NVIDIA H100 80GB HBM3"):
    """Make decoders say they are on CUDA, with the GPU's name and 20 GiB free stubbed, and dsl's cache folder
    (where probe peaks are recorded) in tmp_path."""
    import dsl_cli.decoder as decoder_module
    from dsl_cli.decoder import Decoder

    monkeypatch.setenv("DSL_CACHE", str(tmp_path / "dsl"))
    monkeypatch.setattr(Decoder, "device", property(lambda self: torch.device("cuda")))
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device: SimpleNamespace(name=gpu, total_memory=80 * GIB))
    monkeypatch.setattr(decoder_module, "free_bytes", lambda device: 20 * GIB if device.type == "cuda" else 0)


def _stub_probes(monkeypatch, decoder, probes: list, peaks: dict = {1: 3 * GIB, 2: 4 * GIB}) -> None:
    """Each probe appends its arguments to `probes` and peaks at `peaks[batch]`."""
    monkeypatch.setattr(decoder, "_probe_peak", lambda *args: probes.append(args) or peaks[args[0]])


def test_auto_batch_on_cuda_probes_one_and_two_pictures_at_the_run_s_shape(monkeypatch, caplog, tmp_path) -> None:
    """The CUDA branch, on the CPU: the decoder says it is on CUDA, the probes and the free memory are
    stubbed; the batch is what `batch_that_fits` gives for the probes of batches 1 and 2, taken at the
    size and guidance asked for (test_gpu.py runs the real probes)."""
    probes: list = []
    _on_fake_cuda(monkeypatch, tmp_path)
    decoder = load_decoder(DecoderConfig(source="tiny"))
    _stub_probes(monkeypatch, decoder, probes)
    with caplog.at_level("INFO", logger="dsl_cli.decoder"):
        assert decoder.fit_batch_size(100, 64, 48, 7.5) == 15  # (20 x 0.85 - 2) / 1, as batch_that_fits works it out
    assert probes == [(1, 64, 48, 7.5), (2, 64, 48, 7.5)]
    assert caplog.messages == ["decode batch size auto: 15 (1.00 GiB per picture)"]
    assert decoder.fit_batch_size(9, 64, 48, 7.5) == 9
    assert len(probes) == 2  # the same shape again (a run's extra seeds, a parked encoder): probed once
    assert decoder.fit_batch_size(100, 48, 64, 7.5) == 15 and decoder.fit_batch_size(100, 64, 48, 1.0) == 15
    assert probes[2:] == [(1, 48, 64, 7.5), (2, 48, 64, 7.5), (1, 64, 48, 1.0), (2, 64, 48, 1.0)]


def test_probe_peaks_are_recorded_and_a_later_run_of_the_same_models_needs_no_probe(monkeypatch, caplog,
                                                                                      tmp_path) -> None:
    """Probe peaks are kept in dsl's cache folder: a decoder built again (the next run) with the same models,
    precision and GPU decodes at a recorded shape without probing and fits the same batch. A new shape, GPU,
    precision or memory layout probes again; so do a damaged record (then rewritten) and a cache folder that
    cannot be written (nothing kept, the run goes on)."""
    _on_fake_cuda(monkeypatch, tmp_path)
    probes: list = []
    first = load_decoder(DecoderConfig(source="tiny"))
    _stub_probes(monkeypatch, first, probes)
    assert first.fit_batch_size(100, 64, 48, 7.5) == 15 and len(probes) == 2
    record = tmp_path / "dsl" / "decode_memory.json"
    assert list(json.loads(record.read_text()).values()) == [[3 * GIB, 4 * GIB]]

    def probes_of(decoder, height=64, width=48, peaks={1: 5 * GIB, 2: 9 * GIB}) -> tuple[int, int]:
        """(the batch fitted, how many probes it took) for `decoder`, probing at other peaks than the first."""
        seen: list = []
        _stub_probes(monkeypatch, decoder, seen, peaks)
        return decoder.fit_batch_size(100, height, width, 7.5), len(seen)

    with caplog.at_level("INFO", logger="dsl_cli.decoder"):
        assert probes_of(load_decoder(DecoderConfig(source="tiny"))) == (15, 0)  # the recorded peaks, not 5 and 9
    assert f"decode memory at 64x48 from an earlier run's probes ({record})" in caplog.messages
    assert probes_of(load_decoder(DecoderConfig(source="tiny")), height=128) == (4, 2)  # (20 x 0.85 - 1) / 4
    assert probes_of(load_decoder(DecoderConfig(source="tiny"), dtype=torch.bfloat16)) == (4, 2)
    assert probes_of(load_decoder(DecoderConfig(source="tiny"), channels_last=True)) == (4, 2)
    _on_fake_cuda(monkeypatch, tmp_path, gpu="NVIDIA H200")
    assert probes_of(load_decoder(DecoderConfig(source="tiny"))) == (4, 2)
    assert len(json.loads(record.read_text())) == 5

    record.write_text('{"cut short')
    assert probes_of(load_decoder(DecoderConfig(source="tiny"))) == (4, 2)
    assert list(json.loads(record.read_text()).values()) == [[5 * GIB, 9 * GIB]]
    record.unlink()
    record.parent.chmod(0o500)
    try:
        if os.access(record.parent, os.W_OK):  # root writes anywhere: a file where the folder should be
            monkeypatch.setenv("DSL_CACHE", str(record.parent / "a file"))
            (record.parent / "a file").write_text("not a folder")
        assert probes_of(load_decoder(DecoderConfig(source="tiny"))) == (4, 2)
    finally:
        record.parent.chmod(0o700)


def test_the_memory_record_s_key_is_the_architecture_not_where_the_weights_came_from(monkeypatch, tmp_path) -> None:
    """The same architecture saved elsewhere or by another diffusers (`_name_or_path`, `_diffusers_version`)
    shares the record; another UNet width does not, and torch.compile's wrapper is looked through."""
    _on_fake_cuda(monkeypatch, tmp_path)
    decoder = load_decoder(DecoderConfig(source="tiny"))
    key = decoder._memory_key(64, 48, 7.5)
    assert key.endswith(" 64x48 guidance 7.5")
    unet = decoder.pipe.unet
    unet.register_to_config(_name_or_path="/elsewhere/unet", _diffusers_version="0.1")
    assert decoder._memory_key(64, 48, 7.5) == key
    decoder.pipe.unet = torch.compile(unet)
    assert decoder._memory_key(64, 48, 7.5) == key
    unet.register_to_config(block_out_channels=[c * 2 for c in unet.config.block_out_channels])
    assert decoder._memory_key(64, 48, 7.5) != key


def test_auto_batch_on_the_cpu_and_from_equal_probes() -> None:
    """Off CUDA: CPU_BATCH pictures at most, never fewer than one asked for. Probes of one and two pictures
    that peak the same (no measurable cost per picture) count one byte per picture: from 100 free bytes, no
    margin and a fixed part of 10 - 1 bytes, 91 pictures."""
    from dsl_cli.decoder import CPU_BATCH

    decoder = load_decoder(DecoderConfig(source="tiny"))
    assert [decoder.fit_batch_size(n, 64, 64, 4.0) for n in (1, 3, 10_000)] == [1, 3, CPU_BATCH]
    assert batch_that_fits(1000, 10, 10, 100, margin=0.0) == 91


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_probe_is_one_eager_step_of_the_batch_measured_above_the_memory_before(dtype, monkeypatch) -> None:
    """`_probe_peak` on the CPU with CUDA's memory counters stubbed: it resets the peak after a sync, decodes
    `batch` zero embeddings (the first as negative, seeds 0) for one step at the size and guidance asked,
    with torch.compile told to run eagerly, and returns the peak less the memory held before."""
    from contextlib import contextmanager

    decoder, calls, stances = load_decoder(DecoderConfig(source="tiny"), dtype=dtype), [], []
    for name, value in (("synchronize", None), ("reset_peak_memory_stats", None), ("memory_allocated", 1000),
                        ("max_memory_allocated", 5000)):
        monkeypatch.setattr(torch.cuda, name, lambda device=None, name=name, value=value:
                            calls.append((name, device)) or value)

    @contextmanager
    def set_stance(stance, **kwargs):
        stances.append(stance)
        yield
        stances.pop()

    def step(embeds, negative, seeds, height, width, steps, guidance):
        calls.append(("run", embeds.shape, embeds.dtype, embeds.abs().sum().item(), negative.shape, seeds, height,
                      width, steps, guidance, list(stances)))

    monkeypatch.setattr(torch.compiler, "set_stance", set_stance)
    monkeypatch.setattr(decoder, "_run", step)
    assert decoder._probe_peak(3, 64, 48, 7.5) == 4000
    device = decoder.device
    assert calls == [("synchronize", device), ("reset_peak_memory_stats", device), ("memory_allocated", device),
                     ("run", (3, 32), decoder.dtype, 0.0, (1, 32), [0, 0, 0], 64, 48, 1, 7.5, ["force_eager"]),
                     ("max_memory_allocated", device)]


def test_out_of_memory_halves_an_auto_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    embeds, negative = _inputs(5)
    decoder = load_decoder(DecoderConfig(source="tiny"))
    expected = decoder.decode(embeds, negative, list(range(5)), batch_size=1, **KW)
    original, tried = KandinskyV22Pipeline.__call__, []

    def call(self, *args, **kwargs):
        tried.append(len(kwargs["image_embeds"]))
        if tried[-1] > 2:
            raise torch.cuda.OutOfMemoryError("injected")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(KandinskyV22Pipeline, "__call__", call)
    got = decoder.decode(embeds, negative, list(range(5)), batch_size="auto", **KW)
    assert tried == [5, 2, 2, 1]  # auto gives 5 on the CPU; halved to 2 after the failure; 1 left at the end
    np.testing.assert_allclose(got, expected, atol=1e-3)


# ---- the encoder makes room on the GPU -------------------------------------------------------------------

class FakeGpu:
    """Stand-ins for an encoder and a decoder on a CUDA device whose memory fits `fits[encoder on GPU]`
    pictures per batch."""

    def __init__(self, fits: dict[bool, int]):
        self.fits, self.encoder_on_gpu = fits, True
        self.encoder = SimpleNamespace(device=torch.device("cuda"), to=self._move)
        self.decoder = SimpleNamespace(device=torch.device("cuda"), fit_batch_size=self._fit)

    def _move(self, device: str) -> None:
        self.encoder_on_gpu = device != "cpu"
        self.encoder.device = torch.device(device)

    def _fit(self, n: int, height: int, width: int, guidance: float) -> int:
        return min(n, self.fits[self.encoder_on_gpu])


def _decode_cfg(batch_size) -> SimpleNamespace:
    return SimpleNamespace(decode=SimpleNamespace(batch_size=batch_size, height=512, width=512, guidance=4.0))


def test_encoder_leaves_the_gpu_only_when_decoding_needs_the_room() -> None:
    roomy = FakeGpu({True: 12, False: 16})
    assert run.fit_decoding(_decode_cfg("auto"), roomy.encoder, roomy.decoder, 80) == (12, False)
    assert roomy.encoder_on_gpu
    tight = FakeGpu({True: 2, False: 9})
    assert run.fit_decoding(_decode_cfg("auto"), tight.encoder, tight.decoder, 80) == (9, True)
    assert not tight.encoder_on_gpu
    few = FakeGpu({True: 2, False: 9})  # two pictures to decode, two fit: nothing to gain
    assert run.fit_decoding(_decode_cfg("auto"), few.encoder, few.decoder, 2) == (2, False)
    fixed = FakeGpu({True: 1, False: 9})  # a batch size given by the user is used as it is
    assert run.fit_decoding(_decode_cfg(6), fixed.encoder, fixed.decoder, 80) == (6, False)
    parked = FakeGpu({True: 1, False: 9})  # an encoder build_decoder moved off a short GPU stays there
    parked.encoder.to("cpu")
    assert run.fit_decoding(_decode_cfg("auto"), parked.encoder, parked.decoder, 80) == (9, True)
    assert run.fit_decoding(_decode_cfg(6), parked.encoder, parked.decoder, 80) == (6, True)


def test_fitting_the_batch_is_counted_in_the_manifest_over_every_decoding_call(tmp_path, monkeypatch) -> None:
    """`decode_fit_seconds`: the time `fit_decoding` took (the probes, on a GPU), summed over a run's
    decoding calls (its components', then its extra seeds' and baselines')."""
    from dsl_cli.outputs import Manifest

    def slow_fit(cfg, encoder, decoder, n: int) -> tuple[int, bool]:
        time.sleep(0.2)
        return 4, False

    monkeypatch.setattr(run, "fit_decoding", slow_fit)
    def no_batches(*args):
        yield from ()

    decoder = SimpleNamespace(negative_embed=lambda encoder: torch.zeros(1, 8), iter_decode=no_batches)
    cfg = SimpleNamespace(decode=SimpleNamespace(height=64, width=64, steps=2, guidance=4.0))
    manifest = Manifest(tmp_path / "manifest.json")
    manifest.start(status="running")
    for count in ("decoded", "extra_decoded"):
        run.decode_pictures(cfg, None, decoder, torch.zeros(3, 8), [0, 0, 0], manifest, None, count)
    fit = json.loads((tmp_path / "manifest.json").read_text())["decode_fit_seconds"]
    assert 0.4 <= fit < 5.0 and manifest.data["decode_batch_size"] == 4


def test_decoded_pictures_are_re_encoded_in_encoder_batches() -> None:
    encoder, preprocess = load_encoder(EncoderConfig(source="tiny"))
    pictures = [Image.new("RGB", (64, 64), color) for color in ("red", "green", "blue", "white", "black")]
    passes: list[int] = []
    handle = encoder.visual.register_forward_pre_hook(lambda module, args: passes.append(len(args[0])))
    got = run.reencode(encoder, preprocess, pictures, batch_size=2)
    handle.remove()
    assert passes == [2, 2, 1] and got.dtype == torch.float32 and got.device.type == "cpu"
    torch.testing.assert_close(got, encoder.embed(torch.stack([preprocess(p) for p in pictures])), atol=1e-5, rtol=1e-5)


def test_dtype_names_are_the_configs() -> None:
    assert dtype_name(torch.bfloat16) == "bf16" and dtype_name(torch.float32) == "fp32"
