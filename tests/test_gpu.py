"""On CUDA: the same numbers as on the CPU, in fp32 and to bf16 tolerance, and the GPU-only paths (real
out-of-memory, no host synchronisation in the denoising loop); skipped without CUDA.

Each test records what it measured (`record_property`, in the JUnit XML that `device_check.sh` reads). The
picture tolerances are set from the first GPU run (H100, torch 2.11, 2026-11-26, docs/benchmarks.md): on
CUDA, batch size, memory format and out-of-memory halving change which cuDNN kernels run, fp32 convolutions
use TF32 (PyTorch's default), and the tiny random decoder saturates, so a few pixels flip and the bound is on
the mean difference. Pictures decoded from other seeds differ by about 0.37 on average (measured in
`test_decoding_is_batch_invariant_on_cuda`), so these bounds still catch a picture given the wrong noise.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import KandinskyV22Pipeline

from dsl_cli.config import DecoderConfig
from dsl_cli.decoder import load_decoder, to_uint8
from dsl_cli.encoder import HookedEncoder, build_tiny_visual

pytestmark = pytest.mark.gpu
COMPONENTS = ["L1H00", "L2H03", "L3MLP", "L0MLP"]
KW = dict(height=64, width=64, steps=2, guidance=4.0, progress=False)
# mean |difference| of two decodings that should give the same pictures; measured on an H100: fp32 9.5e-4
# (batch 1 against 5), 1.2e-3 (channels_last), 1.9e-3 (out-of-memory halving); bf16 0.015 (batch 1 against 5)
SAME_PICTURES = {torch.float32: 0.01, torch.bfloat16: 0.05}


def _inputs(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 32, generator=g), torch.randn(1, 32, generator=g)


def _dsl_run(tmp_path: Path, *overrides: str) -> dict:
    """`dsl run debug=tiny device=cuda ...` (through `python -m`: the GPU machine has no `dsl` script) -> manifest."""
    result = subprocess.run([sys.executable, "-m", "dsl_cli.cli", "run", "debug=tiny", "device=cuda",
                             "hydra.run.dir=run", *overrides], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads((tmp_path / "run" / "manifest.json").read_text())


def test_cache_and_steering_match_the_cpu(tiny_pixels: torch.Tensor) -> None:
    cpu = HookedEncoder(build_tiny_visual())
    gpu = HookedEncoder(build_tiny_visual()).to("cuda")
    cache_cpu, cache_gpu = cpu.run_with_cache(tiny_pixels), gpu.run_with_cache(tiny_pixels.cuda())
    torch.testing.assert_close(cache_gpu.embeds.cpu(), cache_cpu.embeds, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gpu.steer(cache_gpu, COMPONENTS).cpu(), cpu.steer(cache_cpu, COMPONENTS),
                               atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gpu.steer_hooked(tiny_pixels.cuda(), "L1H00").cpu(),
                               gpu.steer(cache_gpu, ["L1H00"])[:, 0].cpu(), atol=1e-4, rtol=1e-4)


def test_bf16_steering_stays_within_0_999_of_fp32(tiny_pixels: torch.Tensor, record_property) -> None:
    fp32 = HookedEncoder(build_tiny_visual()).to("cuda")
    bf16 = HookedEncoder(build_tiny_visual()).to("cuda", torch.bfloat16)
    a = fp32.steer(fp32.run_with_cache(tiny_pixels.cuda()), COMPONENTS).float()
    b = bf16.steer(bf16.run_with_cache(tiny_pixels.cuda()), COMPONENTS).float()
    cosine = torch.nn.functional.cosine_similarity(a, b, dim=-1).min().item()
    record_property("cos_bf16_vs_fp32_min", cosine)
    assert cosine >= 0.999  # CPU: 0.99994


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decoding_is_batch_invariant_on_cuda(dtype: torch.dtype, record_property) -> None:
    decoder = load_decoder(DecoderConfig(source="tiny"), device="cuda", dtype=dtype)
    embeds, negative = _inputs(5)
    one = decoder.decode(embeds, negative, seeds=0, batch_size=1, **KW)
    many = decoder.decode(embeds, negative, seeds=0, batch_size=5, **KW)
    other_seed = decoder.decode(embeds, negative, seeds=100, batch_size=5, **KW)
    diff, apart = np.abs(one - many), np.abs(one - other_seed).mean()
    record_property("max_abs_diff", float(diff.max()))
    record_property("mean_abs_diff", float(diff.mean()))
    record_property("mean_abs_diff_other_seed", float(apart))
    assert diff.mean() < SAME_PICTURES[dtype] < apart / 5


def test_same_seed_gives_the_same_pictures_on_cuda(record_property) -> None:
    decoder = load_decoder(DecoderConfig(source="tiny"), device="cuda", dtype=torch.bfloat16)
    embeds, negative = _inputs(3)
    first = decoder.decode(embeds, negative, [7, 8, 9], batch_size=3, **KW)
    again = decoder.decode(embeds, negative, [7, 8, 9], batch_size=3, **KW)
    record_property("max_abs_diff", float(np.abs(first - again).max()))
    assert np.array_equal(to_uint8(first), to_uint8(again))
    other = decoder.decode(embeds, negative, [1, 2, 3], batch_size=3, **KW)
    assert np.abs(first - other).mean() > 0.01  # the seed matters, so the equality above is not vacuous


def test_channels_last_gives_the_same_pictures_on_cuda(record_property) -> None:
    embeds, negative = _inputs(4)
    plain = load_decoder(DecoderConfig(source="tiny"), device="cuda").decode(embeds, negative, 0, batch_size=4, **KW)
    nhwc = load_decoder(DecoderConfig(source="tiny"), device="cuda", channels_last=True)
    got = nhwc.decode(embeds, negative, 0, batch_size=4, **KW)
    diff = np.abs(got - plain)
    record_property("max_abs_diff", float(diff.max()))
    record_property("mean_abs_diff", float(diff.mean()))
    assert diff.mean() < SAME_PICTURES[torch.float32]  # CPU: max 1.6e-4; cuDNN picks other kernels per layout


def test_real_out_of_memory_halves_the_batch(caplog: pytest.LogCaptureFixture, record_property) -> None:
    """The allocator is capped (`set_per_process_memory_fraction`) so that about three pictures fit: a batch
    of 16 then fails for real and is halved until it fits; every picture still comes out, as at batch 1."""
    decoder = load_decoder(DecoderConfig(source="tiny"), device="cuda")
    shape = dict(KW, height=256, width=256)
    embeds, negative = _inputs(16)
    expected = decoder.decode(embeds, negative, 0, batch_size=1, **shape)
    one, two = (decoder._probe_peak(b, 256, 256, 4.0) for b in (1, 2))
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(0).total_memory
    allowed = torch.cuda.memory_allocated() + one + 2 * (two - one)
    record_property("bytes_per_picture", two - one)
    torch.cuda.set_per_process_memory_fraction(allowed / total)
    try:
        with caplog.at_level(logging.WARNING, logger="dsl_cli.decoder"):
            got = decoder.decode(embeds, negative, 0, batch_size=16, **shape)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
    assert any("out of memory" in r.getMessage() for r in caplog.records)
    diff = np.abs(got - expected)
    record_property("mean_abs_diff_vs_batch_1", float(diff.mean()))
    assert diff.mean() < SAME_PICTURES[torch.float32]  # the same pictures in the same order


@pytest.mark.parametrize("scheduler", ["ddpm", "ddim", "dpm"])
def test_no_host_sync_inside_the_denoising_loop(scheduler: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """`torch.cuda.set_sync_debug_mode("error")` from the end of the first step to the end of the last:
    every step after the first (UNet, guidance, scheduler, noise) must run without waiting for the GPU."""
    steps = 4
    original = KandinskyV22Pipeline.__call__

    def watch(pipe, i, t, kwargs):
        torch.cuda.set_sync_debug_mode("error" if i < steps - 1 else "default")
        return kwargs

    def call(self, *args, **kwargs):
        return original(self, *args, callback_on_step_end=watch, **kwargs)

    monkeypatch.setattr(KandinskyV22Pipeline, "__call__", call)
    decoder = load_decoder(DecoderConfig(source="tiny"), device="cuda", dtype=torch.bfloat16, scheduler=scheduler)
    embeds, negative = _inputs(2)
    try:
        pictures = decoder.decode(embeds, negative, [0, 1], batch_size=2, **{**KW, "steps": steps})
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert np.isfinite(pictures).all()


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_verify_on_the_gpu(tmp_path: Path, dtype: str, record_property) -> None:
    manifest = _dsl_run(tmp_path, "lens=steering", "component=all", "lens.verify=true", f"encoder.dtype={dtype}",
                        f"decode.dtype={dtype}")
    record_property("verify_max_abs_diff", manifest["verify_max_abs_diff"])
    record_property("verify_max_rel_diff", manifest["verify_max_rel_diff"])
    assert manifest["verify_ok"] is True and manifest["status"] == "complete"
    assert manifest["encoder_dtype"] == dtype and manifest["decoder_dtype"] == dtype


def test_tiny_run_on_cuda_with_auto_batch(tmp_path: Path, record_property) -> None:
    manifest = _dsl_run(tmp_path, "decode.batch_size=auto", "decode.dtype=auto")
    record_property("decode_batch_size", manifest["decode_batch_size"])
    record_property("startup_s", manifest["seconds"]["startup"])  # process start to the first GPU work
    assert manifest["status"] == "complete" and manifest["device"].startswith("cuda")
    assert manifest["decoder_dtype"] == "bf16"  # decode.dtype=auto is bf16 on CUDA
    assert manifest["decode_batch_size"] == manifest["to_decode"]  # 8 tiny pictures fit at once
    assert (tmp_path / "run" / "similarity.csv").is_file()


def test_the_run_makes_its_cuda_context_before_the_first_stage() -> None:
    """`devices.start_device`: CUDA is initialised (its context made) when it returns, in a fresh process where
    nothing touched CUDA before; on the CPU it does nothing."""
    code = ("import torch\nfrom dsl_cli.devices import start_device\nbefore = torch.cuda.is_initialized()\n"
            "start_device(torch.device('cpu'))\ncpu = torch.cuda.is_initialized()\n"
            "start_device(torch.device('cuda'))\nprint(before, cpu, torch.cuda.is_initialized())\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.stdout.split() == ["False", "False", "True"], done.stderr[-2000:]


def test_a_context_begun_in_a_thread_is_the_one_the_run_uses() -> None:
    """`devices.begin_device`: the context is made in its thread, and `start_device` waits for that thread
    (CUDA initialised by then, once: its thread is gone), in a fresh process."""
    code = ("import torch\nfrom dsl_cli import devices\ndevices.begin_device()\n"
            "devices.start_device(torch.device('cuda'))\n"
            "print(torch.cuda.is_initialized(), devices._STARTING.is_alive())\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.stdout.split() == ["True", "False"], done.stderr[-2000:]


def test_free_memory_stays_within_a_per_process_cap(record_property) -> None:
    """With the process capped at a quarter of the card (a shared GPU, or bench_memory.py's --gpu-limit-gb),
    dsl sizes work from the cap, not from what the driver has free."""
    from dsl_cli.memory import free_bytes

    total = torch.cuda.get_device_properties(0).total_memory
    uncapped = free_bytes("cuda")
    torch.cuda.set_per_process_memory_fraction(0.25)
    try:
        capped = free_bytes("cuda")
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    record_property("free_gib_uncapped_and_capped", f"{uncapped / 2**30:.2f}, {capped / 2**30:.2f}")
    assert capped <= 0.25 * total < uncapped
