"""Decoder throughput: pictures per second and peak memory of `KandinskyDecoder` for several batch sizes and
dtypes, against the naive baseline a user writes first (the pipeline called once per embedding, fp32,
defaults), in the same run; FLOPs per picture from torch's FlopCounterMode; on CUDA, the fraction of a
measured bf16 matmul peak that the decoder reaches.

    python scripts/bench_decoder.py                                    # CUDA: real architecture, 512 px, 100 steps
    python scripts/bench_decoder.py --device cpu --size 64 --steps 2   # CPU: same architecture, small pictures

Random weights (no download): speed does not depend on the weights' values.
"""

from __future__ import annotations

import argparse
import platform
import resource
import time
from collections.abc import Callable

import torch
from diffusers import UNet2DConditionModel, VQModel
from torch.utils.flop_counter import FlopCounterMode

from dsl_cli.config import DecoderConfig
from dsl_cli.decoder import KandinskyDecoder, load_decoder
from dsl_cli.devices import resolve_dtype


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--decoder", choices=["random", "tiny"], default="random")
    p.add_argument("--device", default="auto", help="auto | cuda | cpu")
    p.add_argument("--size", type=int, default=None, help="pixels (default 512 on CUDA, 64 on CPU)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default 100 on CUDA, 2 on CPU)")
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--batch-sizes", default=None, help="comma-separated (default 1,4,8,16 on CUDA, 1,4 on CPU)")
    p.add_argument("--dtypes", default=None, help="comma-separated fp32,fp16,bf16 (default bf16,fp16 on CUDA)")
    p.add_argument("--pictures", type=int, default=None, help="pictures per measurement (default: largest batch)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet (compiles during warm-up)")
    return p.parse_args()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: torch.device) -> float:
    """CUDA: peak allocated since the last reset. CPU: the process's peak RSS so far (never resets)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def timed(fn: Callable[[], object], device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def flops_per_picture(dec: KandinskyDecoder, size: int, steps: int, guidance: float) -> float:
    """steps x one UNet call (batch 2 with classifier-free guidance) + one MoVQ decode, counted on a
    meta-device copy of the architecture: exact for any size, no memory, no time."""
    pipe = dec.pipe
    latent = size // pipe.movq_scale_factor
    cfg_batch = 2 if guidance > 1 else 1
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(pipe.unet.config)
        movq = VQModel.from_config(pipe.movq.config)
        sample = torch.empty(cfg_batch, unet.config.in_channels, latent, latent)
        embeds = torch.empty(cfg_batch, unet.config.encoder_hid_dim)
        with FlopCounterMode(display=False) as unet_count:
            unet(sample, torch.tensor(500), encoder_hidden_states=None, added_cond_kwargs={"image_embeds": embeds})
        with FlopCounterMode(display=False) as movq_count:
            movq.decode(sample[:1], force_not_quantize=True)
    return steps * unet_count.get_total_flops() + movq_count.get_total_flops()


def matmul_peak_tflops(device: torch.device, n: int = 8192, reps: int = 20) -> float:
    """Measured bf16 matrix-product throughput: the ceiling the decoder is compared with."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    a @ b
    seconds = timed(lambda: [a @ b for _ in range(reps)], device)
    return 2 * n**3 * reps / seconds / 1e12


def main() -> None:
    args = parse_args()
    if args.threads:
        # On a shared CPU, OpenMP threads that spin-wait for descheduled peers can cost 10x or more.
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    gpu = device.type == "cuda"
    size = args.size or (512 if gpu else 64)
    steps = args.steps or (100 if gpu else 2)
    batches = [int(b) for b in (args.batch_sizes or ("1,4,8,16" if gpu else "1,4")).split(",")]
    dtypes = (args.dtypes or ("bf16,fp16" if gpu else "fp32")).split(",")
    n = args.pictures or max(batches)
    where = torch.cuda.get_device_name() if gpu else f"{platform.processor() or 'CPU'}, {torch.get_num_threads()} threads"
    print(f"device: {device} ({where}); decoder {args.decoder}; {size}x{size} px, {steps} steps, "
          f"guidance {args.guidance}; {n} pictures per measurement")
    if not gpu:
        print("CPU only: small pictures and few steps, so the figures show relative costs, not GPU throughput")

    cfg = DecoderConfig(source=args.decoder)
    embeds = torch.randn(n, 1280 if args.decoder == "random" else 32, generator=torch.Generator().manual_seed(0))
    negative = torch.zeros(1, embeds.shape[1])
    shape = dict(height=size, width=size, steps=steps, guidance=args.guidance, progress=False)
    rows: list[tuple[str, float, float]] = []

    # The baseline: fp32, default settings, one pipeline call (one embedding, one generator) per picture.
    reset_peak(device)
    dec = load_decoder(cfg, device, torch.float32)
    flops = flops_per_picture(dec, size, steps, args.guidance)
    pipe = dec.pipe

    def naive() -> None:
        for i in range(n):
            pipe(image_embeds=embeds[i : i + 1].to(device), negative_image_embeds=negative.to(device),
                 generator=torch.Generator(device).manual_seed(i), height=size, width=size,
                 num_inference_steps=steps, guidance_scale=args.guidance)

    pipe(image_embeds=embeds[:1].to(device), negative_image_embeds=negative.to(device),
         height=size, width=size, num_inference_steps=1)  # warm-up
    baseline = n / timed(naive, device)
    rows.append(("naive: pipeline per picture, fp32", baseline, peak_gib(device)))
    del dec, pipe

    for name in dtypes:
        reset_peak(device)
        dec = load_decoder(cfg, device, resolve_dtype(name, device),
                           channels_last=args.channels_last, compile_unet=args.compile)
        for batch in batches:
            dec.decode(embeds[:batch], negative, 0, batch_size=batch, **{**shape, "steps": 1})  # warm-up
            reset_peak(device)
            rate = n / timed(lambda: dec.decode(embeds, negative, 0, batch_size=batch, **shape), device)
            rows.append((f"KandinskyDecoder {name}, batch {batch}", rate, peak_gib(device)))
        del dec

    peak = matmul_peak_tflops(device) if gpu else None
    print(f"\nFLOPs per picture: {flops / 1e12:.3f} TFLOP"
          + (f"; measured bf16 matmul peak {peak:.0f} TFLOP/s" if peak else ""))
    print("\n| configuration | pictures/s | vs naive | peak memory GiB | TFLOP/s | % of matmul peak |")
    print("|---|---|---|---|---|---|")
    for label, rate, mem in rows:
        tflops = rate * flops / 1e12
        share = f"{100 * tflops / peak:.0f}" if peak else "n/a"
        print(f"| {label} | {rate:.3g} | {rate / baseline:.2f}x | {mem:.2f} | {tflops:.3g} | {share} |")
    if not gpu:
        print("(CPU peak memory is the process's peak RSS so far: it only grows from row to row)")


if __name__ == "__main__":
    main()
