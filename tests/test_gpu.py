"""On CUDA: the same numbers as on the CPU, in fp32 and to bf16 tolerance; skipped without CUDA."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dsl_cli.config import DecoderConfig
from dsl_cli.decoder import load_decoder
from dsl_cli.encoder import HookedEncoder, build_tiny_visual

pytestmark = pytest.mark.gpu
COMPONENTS = ["L1H00", "L2H03", "L3MLP", "L0MLP"]


def test_cache_and_steering_match_the_cpu(tiny_pixels: torch.Tensor) -> None:
    cpu = HookedEncoder(build_tiny_visual())
    gpu = HookedEncoder(build_tiny_visual()).to("cuda")
    cache_cpu, cache_gpu = cpu.run_with_cache(tiny_pixels), gpu.run_with_cache(tiny_pixels.cuda())
    torch.testing.assert_close(cache_gpu.embeds.cpu(), cache_cpu.embeds, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gpu.steer(cache_gpu, COMPONENTS).cpu(), cpu.steer(cache_cpu, COMPONENTS),
                               atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gpu.steer_hooked(tiny_pixels.cuda(), "L1H00").cpu(),
                               gpu.steer(cache_gpu, ["L1H00"])[:, 0].cpu(), atol=1e-4, rtol=1e-4)


def test_bf16_steering_stays_close_to_fp32(tiny_pixels: torch.Tensor) -> None:
    fp32 = HookedEncoder(build_tiny_visual()).to("cuda")
    bf16 = HookedEncoder(build_tiny_visual()).to("cuda", torch.bfloat16)
    a = fp32.steer(fp32.run_with_cache(tiny_pixels.cuda()), COMPONENTS).float()
    b = bf16.steer(bf16.run_with_cache(tiny_pixels.cuda()), COMPONENTS).float()
    assert torch.nn.functional.cosine_similarity(a, b, dim=-1).min() > 0.99


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decoding_is_batch_invariant_on_cuda(dtype: torch.dtype) -> None:
    decoder = load_decoder(DecoderConfig(source="tiny"), device="cuda", dtype=dtype)
    embeds = torch.randn(5, 32, generator=torch.Generator().manual_seed(0))
    negative = torch.zeros(1, 32)
    kwargs = dict(height=64, width=64, steps=2, guidance=4.0, progress=False)
    one = decoder.decode(embeds, negative, seeds=0, batch_size=1, **kwargs)
    many = decoder.decode(embeds, negative, seeds=0, batch_size=5, **kwargs)
    assert abs(one - many).max() < (1e-3 if dtype == torch.float32 else 2e-2)


def test_tiny_run_on_cuda(tmp_path: Path) -> None:
    dsl = str(Path(sys.executable).parent / "dsl")
    result = subprocess.run([dsl, "run", "debug=tiny", "device=cuda", "hydra.run.dir=run"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "run" / "similarity.csv").is_file()
