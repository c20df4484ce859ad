"""Benchmark the encoder: the cache plus closed-form DSL against one plain forward pass, and against the
hooked reference; in bf16 also how close the DSL embeddings stay to fp32.

For each size and dtype, on the same batch of `--images` preprocessed sample photos:
- plain: `HookedEncoder.embed` (open_clip's own forward, nothing hooked), the cost of seeing the images at all;
- cache + DSL: `run_with_cache` + one `steer` over every head and MLP (the closed form); the goal is at most
  1.1x plain. The two take turns `--repeats` times and the median of the per-round ratios is reported (on a
  shared CPU, in process CPU seconds with one thread: other jobs' load then cannot tip the ratio);
- hooked: `steer_hooked` per component on one image (a clean and a steered forward pass each), against the
  closed form on that image; where timing every component would take too long, a sample spread over all
  layers is timed and the total extrapolated (the output says so);
- dtypes other than fp32: the cosine between the DSL embeddings of that dtype and of fp32 (same weights,
  cast), lowest and mean over images and components; the goal is at least 0.999.
Random weights, no downloads.

    python scripts/bench_encoder.py --sizes tiny,ViT-B-16 --images 4 --threads 1
    flock /tmp/dsl-heavy.lock python scripts/bench_encoder.py --sizes ViT-bigG-14 --images 2 --dtypes fp32,bf16
    python scripts/bench_encoder.py --device cuda --sizes ViT-bigG-14 --images 32 --dtypes fp32,bf16 --json enc.json
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import resource
import statistics
import threading
import time
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Iterator


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="tiny,ViT-B-16,ViT-bigG-14", help="comma-separated: tiny or open_clip names")
    parser.add_argument("--device", default="auto", help="auto (cuda if there is one, else cpu) | cuda | cpu")
    parser.add_argument("--dtypes", default="fp32", help="comma-separated fp32,bf16,fp16 (fp32 is built first anyway)")
    parser.add_argument("--images", type=int, default=None, help="batch for cache vs plain (default 32 on CUDA, 2 on CPU)")
    parser.add_argument("--repeats", type=int, default=5, help="rounds of plain and cache + DSL, taking turns")
    parser.add_argument("--sample", type=int, default=16,
                        help="hooked passes timed per size; the total is extrapolated when there are more components")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default=None,
                        help="cache vs plain timed in wall or process CPU seconds (default: wall on CUDA; on the "
                             "CPU, cpu with --threads 1, where other jobs' load would distort wall times)")
    parser.add_argument("--json", default=None, help="also write every row to this JSON file, row by row")
    return parser.parse_args()


if __name__ == "__main__":
    parse_args()  # first: `--help` and a mistyped option answer before torch and open_clip load (seconds)

# the model libraries, after the early parse above
import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from benchlib import JsonRecord, describe_device, interleaved, median_ratio, timed  # noqa: E402
from dsl_cli.config import ImagesConfig  # noqa: E402
from dsl_cli.devices import DTYPES  # noqa: E402
from dsl_cli.encoder import HookedEncoder, load_encoder  # noqa: E402
from dsl_cli.images import load_images  # noqa: E402
from dsl_cli.lenses import verify_gap  # noqa: E402


def rss_bytes() -> int:
    """Resident set size of this process now (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


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


def build(size: str, device: str) -> tuple[HookedEncoder, object]:
    """The encoder in fp32 (random weights) and its preprocess."""
    if size == "tiny":
        cfg = SimpleNamespace(source="tiny", name="tiny")
    else:
        cfg = SimpleNamespace(source="open_clip", name=size, pretrained=None, checkpoint=None)
    return load_encoder(cfg, device=device, dtype=torch.float32)


def sample_pixels(preprocess, count: int) -> torch.Tensor:
    """[count, 3, S, S]: the bundled sample photos, preprocessed, repeated to fill `count`."""
    photos = [preprocess(item.load()) for item in load_images(OmegaConf.structured(ImagesConfig())).images]
    return torch.stack([photos[i % len(photos)] for i in range(count)])


def all_components(enc: HookedEncoder) -> list[str]:
    heads = [f"L{l}H{h}" for l in range(enc.n_layers) for h in range(enc.n_heads)]
    return heads + [f"L{l}MLP" for l in range(enc.n_layers)]


def cache_vs_forward(enc: HookedEncoder, pixels: torch.Tensor, components: list[str], repeats: int,
                     clock: str) -> dict:
    """Seconds of one plain forward and of cache + closed-form DSL over every component, same batch."""
    pixels = pixels.to(enc.device, enc.dtype)
    times = interleaved({"plain": lambda: enc.embed(pixels),
                         "cache_dsl": lambda: enc.steer(enc.run_with_cache(pixels), components)},
                        enc.device, repeats, clock)
    return dict(plain_s=statistics.median(times["plain"]), cache_dsl_s=statistics.median(times["cache_dsl"]),
                cache_vs_plain=median_ratio(times["cache_dsl"], times["plain"]),
                cache_vs_plain_rounds=[c / p for c, p in zip(times["cache_dsl"], times["plain"])])


def closed_vs_hooked(enc: HookedEncoder, pixels: torch.Tensor, components: list[str], sample: int) -> dict:
    """Closed form against the hooked reference on one image (a sample of components, extrapolated)."""
    one = pixels[:1].to(enc.device, enc.dtype)
    enc.run_with_cache(one)  # warm-up (allocator, kernels)
    steered, t_closed = timed(lambda: enc.steer(enc.run_with_cache(one), components), enc.device)
    n = min(sample, len(components))
    picked = [components[round(i * (len(components) - 1) / max(n - 1, 1))] for i in range(n)]
    t_sample, max_diff, max_rel = 0.0, 0.0, 0.0
    for comp in picked:
        hooked, t = timed(lambda: enc.steer_hooked(one, comp), enc.device)
        t_sample += t
        gap_abs, gap_rel = verify_gap(hooked[0], steered[0, components.index(comp)])  # as lens.verify measures
        max_diff, max_rel = max(max_diff, gap_abs), max(max_rel, gap_rel)
    # memory in separate runs: the CPU sampler thread would slow down the timed ones
    with peak_extra_memory(enc.device) as mem_closed:
        enc.steer(enc.run_with_cache(one), components)
    with peak_extra_memory(enc.device) as mem_hooked:
        enc.steer_hooked(one, picked[0])
    t_hooked = t_sample / n * len(components)
    return dict(closed_1img_s=t_closed, hooked_1img_s=t_hooked, hooked_sampled=n, hooked_vs_closed=t_hooked / t_closed,
                closed_mem_mb=mem_closed["peak"] / 2**20, hooked_mem_mb=mem_hooked["peak"] / 2**20,
                max_abs_diff=max_diff, max_rel_diff=max_rel)


def cosine_vs_fp32(fp32: HookedEncoder, enc: HookedEncoder, pixels: torch.Tensor, components: list[str]) -> dict:
    """Cosine between the DSL embeddings of `enc` and of the fp32 encoder it was cast from, per (image,
    component), one image at a time (the fp32 pass at bigG is large)."""
    cosines = []
    for image in pixels.split(1):
        ref = fp32.steer(fp32.run_with_cache(image), components).float()
        got = enc.steer(enc.run_with_cache(image), components).float().to(ref.device)
        cosines.append(torch.nn.functional.cosine_similarity(got, ref, dim=-1).flatten())
    cos = torch.cat(cosines)
    return dict(cos_vs_fp32_min=cos.min().item(), cos_vs_fp32_mean=cos.mean().item())


def bench(size: str, device: str, dtypes: list[str], images: int, repeats: int, sample: int, clock: str,
          record: JsonRecord):
    """Every measurement of one size, a row per dtype (added to `record` as soon as it is measured)."""
    start = time.perf_counter()
    fp32, preprocess = build(size, device)
    built = time.perf_counter() - start
    components = all_components(fp32)
    pixels = sample_pixels(preprocess, images)
    for name in dtypes:
        enc = fp32 if name == "fp32" else copy.deepcopy(fp32).to(dtype=DTYPES[name])
        row = dict(size=size, dtype=name, params=sum(p.numel() for p in enc.parameters()), built_s=built,
                   images=images, components=len(components))
        row.update(cache_vs_forward(enc, pixels, components, repeats, clock))
        row.update(closed_vs_hooked(enc, pixels, components, sample))
        if name != "fp32":
            row.update(cosine_vs_fp32(fp32, enc, pixels[: min(images, 5)], components))
        record.add_row(row)
        print_row(row)
        del enc


def print_row(r: dict) -> None:
    hooked = f"{r['hooked_1img_s']:.3g}" + ("" if r["hooked_sampled"] == r["components"] else
                                           f" (extrapolated from {r['hooked_sampled']})")
    cosine = f"{r['cos_vs_fp32_min']:.5f}" if "cos_vs_fp32_min" in r else "-"
    print(f"| {r['size']} | {r['dtype']} | {r['params'] / 1e6:.1f} M | {r['images']} | {r['components']} | "
          f"{r['plain_s']:.3g} | {r['cache_dsl_s']:.3g} | {r['cache_vs_plain']:.3f}x | {r['closed_1img_s']:.3g} | "
          f"{hooked} | {r['hooked_vs_closed']:.0f}x | {r['closed_mem_mb']:.0f} / {r['hooked_mem_mb']:.0f} | "
          f"{r['max_abs_diff']:.1e} | {r['max_rel_diff']:.1e} | {cosine} |", flush=True)


def main() -> None:
    args = parse_args()
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    images = args.images or (32 if device.type == "cuda" else 2)
    dtypes = args.dtypes.split(",")
    clock = args.clock or ("cpu" if device.type == "cpu" and torch.get_num_threads() == 1 else "wall")
    where = describe_device(device)
    record = JsonRecord(args.json, device=where, torch=torch.__version__, mode="norm", alpha=2.0, clock=clock)
    print(f"# device {args.device} ({where}), torch {torch.__version__}; DSL mode norm, alpha 2; "
          f"cache vs plain on {images} images, median of {args.repeats} rounds, {clock} clock; hooked on one image")
    print("| size | dtype | params | images | components | plain forward (s) | cache + DSL (s) | cache+DSL / plain | "
          "closed form, 1 image (s) | hooked, 1 image (s) | hooked / closed | peak extra mem closed / hooked (MB) | "
          "max abs diff | max rel diff (lens.verify) | cos vs fp32 (min) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for size in args.sizes.split(","):
        bench(size.strip(), args.device, dtypes, images, args.repeats, args.sample, clock, record)


if __name__ == "__main__":
    main()
