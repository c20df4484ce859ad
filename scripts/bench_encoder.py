"""Benchmark: DSL embeddings of every head and MLP for one image, closed form vs the hooked reference.

Closed form = `run_with_cache` + one `steer` over all components; hooked = `steer_hooked` per component
(a clean and a steered forward pass each). Where the hooked path would take too long, a sample of
components spread over all layers is timed and the total extrapolated (the output says so).
Random weights, no downloads.

    .venv/bin/python scripts/bench_encoder.py --sizes tiny,ViT-B-16,ViT-bigG-14 --sample 4
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import resource
import threading
import time
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Callable, Iterator

import torch

from dsl_cli.devices import DTYPES
from dsl_cli.encoder import HookedEncoder, load_encoder



def rss_bytes() -> int:
    """Resident set size of this process now (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def cpu_name() -> str:
    with open("/proc/cpuinfo") as f:
        names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    return f"{names[0] if names else 'unknown CPU'}, {len(names)} cores"


@contextmanager
def peak_extra_memory(device: torch.device) -> Iterator[dict]:
    """Peak memory above the level at entry, in bytes, in result["peak"]. CUDA: the allocator's peak;
    CPU (Linux, glibc): RSS sampled every 5 ms (ru_maxrss is a lifetime peak, useless once a model has been
    built)."""
    result: dict = {}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        yield result
        torch.cuda.synchronize(device)
        result["peak"] = torch.cuda.max_memory_allocated(device) - base
        return
    # hand freed heap pages back first, so that RSS at entry counts live memory only
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    base, peak, done = rss_bytes(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_bytes())
            time.sleep(0.005)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield result
    finally:
        done.set()
        thread.join()
        result["peak"] = max(peak[0], rss_bytes()) - base


def timed(fn: Callable[[], object], device: torch.device) -> tuple[object, float]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - start


def build(size: str, device: str, dtype: torch.dtype) -> HookedEncoder:
    if size == "tiny":
        cfg = SimpleNamespace(source="tiny", name="tiny")
    else:
        cfg = SimpleNamespace(source="open_clip", name=size, pretrained=None, checkpoint=None)
    return load_encoder(cfg, device=device, dtype=dtype)[0]


def bench(size: str, device: str, dtype: torch.dtype, sample: int) -> dict:
    start = time.perf_counter()
    enc = build(size, device, dtype)
    built = time.perf_counter() - start
    dev = enc.device
    components = [f"L{l}H{h}" for l in range(enc.n_layers) for h in range(enc.n_heads)]
    components += [f"L{l}MLP" for l in range(enc.n_layers)]
    pixels = torch.randn(1, 3, enc.image_size, enc.image_size, generator=torch.Generator().manual_seed(0))

    enc.run_with_cache(pixels)  # warm-up (allocator, kernels)
    steered, t_closed = timed(lambda: enc.steer(enc.run_with_cache(pixels), components), dev)

    # a sample spread evenly over the list (early, middle and late layers; heads and MLPs)
    n = min(sample, len(components))
    picked = [components[round(i * (len(components) - 1) / max(n - 1, 1))] for i in range(n)]
    t_hooked_sample, max_diff = 0.0, 0.0
    for comp in picked:
        hooked, t = timed(lambda: enc.steer_hooked(pixels, comp), dev)
        t_hooked_sample += t
        max_diff = max(max_diff, (hooked.float() - steered[:, components.index(comp)].float()).abs().max().item())

    # memory in separate runs: the CPU sampler thread would slow down the timed ones
    with peak_extra_memory(dev) as mem_closed:
        enc.steer(enc.run_with_cache(pixels), components)
    with peak_extra_memory(dev) as mem_hooked:
        enc.steer_hooked(pixels, picked[0])
    t_hooked = t_hooked_sample / n * len(components)
    return dict(
        size=size, params=sum(p.numel() for p in enc.parameters()), built_s=built, components=len(components),
        closed_s=t_closed, hooked_s=t_hooked, sampled=n, ratio=t_hooked / t_closed,
        closed_mem=mem_closed["peak"], hooked_mem=mem_hooked["peak"], max_diff=max_diff,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="tiny,ViT-B-16,ViT-bigG-14", help="comma-separated: tiny or open_clip names")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--sample", type=int, default=16,
                        help="hooked passes timed per size; the total is extrapolated when there are more components")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    where = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else cpu_name()
    print(f"# device {args.device} ({where}), dtype {args.dtype}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} CPU threads; one image; DSL mode norm, alpha 2")
    print("| size | params | components | closed form (s) | hooked (s) | hooked / closed | "
          "peak extra mem closed (MB) | peak extra mem hooked (MB) | max abs diff |")
    print("|---|---|---|---|---|---|---|---|---|")
    for size in args.sizes.split(","):
        r = bench(size.strip(), args.device, DTYPES[args.dtype], args.sample)
        hooked = f"{r['hooked_s']:.3g}" + ("" if r["sampled"] == r["components"] else
                                            f" (extrapolated from {r['sampled']} of {r['components']})")
        print(f"| {r['size']} | {r['params'] / 1e6:.1f} M | {r['components']} | {r['closed_s']:.3g} | {hooked} | "
              f"{r['ratio']:.0f}x | {r['closed_mem'] / 2**20:.0f} | {r['hooked_mem'] / 2**20:.0f} | "
              f"{r['max_diff']:.1e} |", flush=True)


if __name__ == "__main__":
    main()
