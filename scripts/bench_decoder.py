"""Decoder throughput: pictures per second and peak memory of `KandinskyDecoder` for several batch sizes,
dtypes and speed switches, against the naive baseline a user writes first (the pipeline called once per
embedding, fp32, defaults), in the same run; FLOPs per picture from torch's FlopCounterMode; on CUDA, the
fraction of a measured bf16 matmul peak that the decoder reaches.

    python scripts/bench_decoder.py                                    # CUDA: real architecture, 512 px, 100 steps
    python scripts/bench_decoder.py --device cpu --size 64 --steps 2   # CPU: same architecture, small pictures
    python scripts/bench_decoder.py --batch-sizes auto --pictures 80 --naive-pictures 0   # what `dsl run` decodes

Each row decodes `--pictures` pictures (default: one batch) after an untimed one-step warm-up at the same
batch (which is when a compiled UNet compiles: its seconds are reported apart). Random weights (no
download): speed does not depend on the weights' values.
"""

from __future__ import annotations

import argparse


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--decoder", choices=["random", "tiny"], default="random")
    p.add_argument("--device", default="auto", help="auto | cuda | cpu")
    p.add_argument("--size", type=int, default=None, help="pixels (default 512 on CUDA, 64 on CPU)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default 100 on CUDA, 2 on CPU)")
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--batch-sizes", default=None,
                   help="comma-separated numbers or auto (default 1,4,8,16 on CUDA, 1,4 on CPU)")
    p.add_argument("--dtypes", default=None, help="comma-separated fp32,fp16,bf16 (default bf16,fp16 on CUDA)")
    p.add_argument("--pictures", type=int, default=None, help="pictures per measurement (default: one batch)")
    p.add_argument("--naive-pictures", type=int, default=None,
                   help="pictures for the naive baseline (default 2 on CUDA, 1 on CPU; 0 skips it)")
    p.add_argument("--matmul-size", type=int, default=None,
                   help="side of the bf16 matmul that measures the peak (default 8192 on CUDA; 0 skips it)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet (compiles during warm-up)")
    p.add_argument("--json", default=None, help="also write the settings and every row to this JSON file, row by row")
    p.add_argument("--profile", type=int, default=0, metavar="STEPS",
                   help="after the rows, profile this many denoising steps at the last dtype and largest batch: "
                        "the kernels that take the time (printed, and in the JSON)")
    return p.parse_args()


if __name__ == "__main__":
    parse_args()  # first: `--help` and a mistyped option answer before torch and diffusers load (seconds)

# the model libraries, after the early parse above
import torch  # noqa: E402
from diffusers import UNet2DConditionModel, VQModel  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from benchlib import JsonRecord, describe_device, sync, timed  # noqa: E402
from dsl_cli.config import DecoderConfig  # noqa: E402
from dsl_cli.decoder import REAL_MOVQ, REAL_UNET, TINY_MOVQ, TINY_UNET, KandinskyDecoder, load_decoder  # noqa: E402
from dsl_cli.devices import resolve_dtype  # noqa: E402


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: torch.device) -> float:
    """CUDA: peak allocated since the last reset. CPU: the process's peak RSS so far (never resets)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def flops_per_picture(source: str, size: int, steps: int, guidance: float) -> float:
    """steps x one UNet call (batch 2 with classifier-free guidance) + one MoVQ decode, counted on a
    meta-device copy of the architecture: exact for any size, no memory, no time."""
    unet_config, movq_config = (REAL_UNET, REAL_MOVQ) if source == "random" else (TINY_UNET, TINY_MOVQ)
    latent = size // 2 ** (len(movq_config["block_out_channels"]) - 1)
    cfg_batch = 2 if guidance > 1 else 1
    with torch.device("meta"):
        unet, movq = UNet2DConditionModel(**unet_config), VQModel(**movq_config)
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
    _, seconds = timed(lambda: [a @ b for _ in range(reps)], device)
    return 2 * n**3 * reps / seconds / 1e12


def naive_rate(cfg: DecoderConfig, device: torch.device, embeds: torch.Tensor, shape: dict, count: int) -> float:
    """Pictures/s of the pipeline called once per embedding (one generator each), fp32, defaults."""
    pipe = load_decoder(cfg, device, torch.float32).pipe
    negative = torch.zeros(1, embeds.shape[1], device=device)
    call = dict(height=shape["height"], width=shape["width"], guidance_scale=shape["guidance"])
    pipe(image_embeds=embeds[:1].to(device), negative_image_embeds=negative, num_inference_steps=1, **call)  # warm-up

    def naive() -> None:
        for i in range(count):
            pipe(image_embeds=embeds[i : i + 1].to(device), negative_image_embeds=negative,
                 generator=torch.Generator(device).manual_seed(i), num_inference_steps=shape["steps"], **call)

    return count / timed(naive, device)[1]


def measure(dec: KandinskyDecoder, embeds: torch.Tensor, batch: int | str, pictures: int | None, shape: dict) -> dict:
    """One row: the batch (resolved when auto), warm-up seconds (compilation included), pictures/s, peak memory."""
    device, negative = dec.device, torch.zeros(1, embeds.shape[1])
    count = pictures or (len(embeds) if batch == "auto" else batch)
    if batch == "auto":
        batch = dec.fit_batch_size(count, shape["height"], shape["width"], shape["guidance"])
    inputs = embeds[torch.arange(count) % len(embeds)]
    reset_peak(device)
    _, warm = timed(lambda: dec.decode(inputs[:batch], negative, 0, batch_size=batch,
                                       **{**shape, "steps": 1}, progress=False), device)
    reset_peak(device)
    _, seconds = timed(lambda: dec.decode(inputs, negative, 0, batch_size=batch, **shape, progress=False), device)
    return dict(batch=batch, pictures=count, warmup_s=warm, seconds=seconds, pictures_per_s=count / seconds,
                peak_gib=peak_gib(device))


def kernel_profile(dec: KandinskyDecoder, embeds: torch.Tensor, batch: int, shape: dict, top: int = 25) -> list[dict]:
    """Where a decode's device time goes: the `top` kernels (or CPU ops, on the CPU) by self time over a
    decode of `shape["steps"]` steps at `batch`, after one untimed step. -> [{name, calls, ms, share}]."""
    from torch.profiler import ProfilerActivity, profile

    gpu = dec.device.type == "cuda"
    negative, inputs = torch.zeros(1, embeds.shape[1]), embeds[torch.arange(batch) % len(embeds)]
    run = lambda steps: dec.decode(inputs, negative, 0, batch_size=batch, **{**shape, "steps": steps}, progress=False)
    run(1)
    sync(dec.device)
    with profile(activities=[ProfilerActivity.CUDA] if gpu else [ProfilerActivity.CPU]) as prof:
        run(shape["steps"])
        sync(dec.device)
    attr = "self_device_time_total" if gpu else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, attr, 0) > 0]
    total = sum(getattr(e, attr) for e in events) or 1
    events.sort(key=lambda e: getattr(e, attr), reverse=True)
    return [dict(name=e.key[:160], calls=e.count, ms=getattr(e, attr) / 1e3, share=getattr(e, attr) / total)
            for e in events[:top]]


def settings(args: argparse.Namespace, device: torch.device) -> dict:
    gpu = device.type == "cuda"
    return dict(
        size=args.size or (512 if gpu else 64), steps=args.steps or (100 if gpu else 2), guidance=args.guidance,
        batches=[b if b == "auto" else int(b) for b in (args.batch_sizes or ("1,4,8,16" if gpu else "1,4")).split(",")],
        dtypes=(args.dtypes or ("bf16,fp16" if gpu else "fp32")).split(","),
        naive_pictures=args.naive_pictures if args.naive_pictures is not None else (2 if gpu else 1),
        matmul_size=args.matmul_size if args.matmul_size is not None else (8192 if gpu else 0),
    )


def main() -> None:
    args = parse_args()
    if args.threads:
        # On a shared CPU, OpenMP threads that spin-wait for descheduled peers can cost 10x or more.
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    s = settings(args, device)
    shape = dict(height=s["size"], width=s["size"], steps=s["steps"], guidance=s["guidance"])
    cfg = DecoderConfig(source=args.decoder)
    embeds = torch.randn(max(16, args.pictures or 0), 1280 if args.decoder == "random" else 32,
                         generator=torch.Generator().manual_seed(0))
    record = JsonRecord(args.json, device=describe_device(device), torch=torch.__version__, decoder=args.decoder,
                        channels_last=args.channels_last, compile=args.compile, **{k: s[k] for k in
                        ("size", "steps", "guidance", "naive_pictures", "matmul_size")})
    print(f"device: {device} ({record.data['device']}); decoder {args.decoder}; {s['size']}x{s['size']} px, "
          f"{s['steps']} steps, guidance {s['guidance']}; channels_last {args.channels_last}, compile {args.compile}")
    record.update(tflop_per_picture=flops_per_picture(args.decoder, s["size"], s["steps"], s["guidance"]) / 1e12)
    if s["matmul_size"]:
        record.update(matmul_peak_tflops=matmul_peak_tflops(device, s["matmul_size"]))
    if s["naive_pictures"]:
        record.update(naive_pictures_per_s=naive_rate(cfg, device, embeds, shape, s["naive_pictures"]))
    for name in s["dtypes"]:
        reset_peak(device)
        dec = load_decoder(cfg, device, resolve_dtype(name, device), channels_last=args.channels_last,
                           compile_unet=args.compile)
        for batch in s["batches"]:
            row = dict(dtype=name, channels_last=args.channels_last, compile=args.compile,
                       **measure(dec, embeds, batch, args.pictures, shape))
            record.add_row(row)
            print_row(record.data, row)
        if args.profile and name == s["dtypes"][-1]:
            batch = max(row["batch"] for row in record.data["rows"] if row["dtype"] == name)
            kernels = kernel_profile(dec, embeds, batch, {**shape, "steps": args.profile})
            record.update(profile=dict(dtype=name, batch=batch, steps=args.profile, kernels=kernels))
            print(f"profile: {name}, batch {batch}, {args.profile} steps; kernels by device time:")
            for k in kernels:
                print(f"  {100 * k['share']:5.1f} %  {k['ms']:9.2f} ms  {k['calls']:6d} calls  {k['name']}")
        del dec
        sync(device)


def print_row(data: dict, row: dict) -> None:
    """One line per measurement, as soon as it is measured."""
    tflops = row["pictures_per_s"] * data["tflop_per_picture"]
    peak = data.get("matmul_peak_tflops")
    naive = data.get("naive_pictures_per_s")
    print(f"{row['dtype']} batch {row['batch']} ({row['pictures']} pictures): {row['pictures_per_s']:.3g} pictures/s"
          + (f", {row['pictures_per_s'] / naive:.2f}x naive" if naive else "")
          + f", {tflops:.3g} TFLOP/s" + (f" = {100 * tflops / peak:.0f} % of the matmul peak" if peak else "")
          + f", peak memory {row['peak_gib']:.2f} GiB, warm-up {row['warmup_s']:.1f} s", flush=True)


if __name__ == "__main__":
    main()
