"""Peak memory of `dsl adapter fit` against the number of images: the fit keeps running sums (p^2 + pq
numbers) and the held-out rows only, so 2,000 images should cost about what 200 do.

Writes N synthetic pictures (smooth random colour fields, PNG) into a temporary folder, then runs
`dsl adapter fit debug=tiny images.path=... images.limit=K` over the first `--small` and over all N, each in a
fresh Python process, and prints each fit's peak resident memory (`ru_maxrss`), its seconds and the
difference. The tiny models keep the model weights out of the figure. By default the fit maps the tiny
encoder's residual after block 3 (p = 64) to the tiny Kandinsky 2.2 space (q = 32), with one augmented view
per training image and no decoded examples.

    python scripts/bench_adapter_memory.py                      # 200 vs 2000 pictures of 160 x 120
    python scripts/bench_adapter_memory.py --images 5000 --small 500 adapter.augment=0
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from bench_images_memory import measured  # a script beside this one (scripts/ is on the path)

DEFAULTS = ["adapter.readout=resid", "adapter.layer=3", "adapter.augment=1", "adapter.examples=0"]


def write_pictures(folder: Path, count: int, width: int, height: int) -> None:
    """`count` PNGs: a 5 x 6 grid of random colours, upsampled smoothly."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(count):
        coarse = Image.fromarray(rng.integers(0, 256, (5, 6, 3), dtype=np.uint8))
        coarse.resize((width, height), Image.Resampling.BICUBIC).save(folder / f"picture_{i:05d}.png")


def peak_of_fit(pictures: Path, count: int, out: Path, extra: list[str]) -> dict:
    """One `dsl adapter fit` over the first `count` pictures in a fresh interpreter: status, seconds, peak MB,
    and the adapter's held-out metrics."""
    folder = out / f"adapter_{count}"
    args = ["adapter", "fit", "debug=tiny", f"images.path={pictures}", f"images.limit={count}",
            f"adapter.out={folder}", *DEFAULTS, *extra]
    result = measured(args, f"fit over {count} pictures", threads=1)
    result["metrics"] = json.loads((folder / "adapter.json").read_text())["metrics"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000, help="pictures in the large fit (default 2000)")
    parser.add_argument("--small", type=int, default=200, help="pictures in the small fit (default 200)")
    parser.add_argument("--size", default="160x120", help="picture size WIDTHxHEIGHT (default 160x120)")
    parser.add_argument("overrides", nargs="*", help="more `dsl adapter fit` overrides, e.g. adapter.augment=0")
    options = parser.parse_args()
    width, height = (int(v) for v in options.size.split("x"))
    with tempfile.TemporaryDirectory(prefix="dsl-bench-adapter-") as tmp:
        pictures = Path(tmp) / "pictures"
        pictures.mkdir()
        start = time.perf_counter()
        write_pictures(pictures, options.images, width, height)
        print(f"{options.images} pictures of {width} x {height} written in {time.perf_counter() - start:.1f} s")
        small = peak_of_fit(pictures, options.small, Path(tmp), options.overrides)
        large = peak_of_fit(pictures, options.images, Path(tmp), options.overrides)
    print(f"{'images':>7} {'peak RSS (MB)':>14} {'seconds':>8} {'held-out cos':>13}")
    for count, result in ((options.small, small), (options.images, large)):
        print(f"{count:>7} {result['peak_mb']:>14.0f} {result['seconds']:>8.1f} "
              f"{result['metrics'].get('cosine_mean', float('nan')):>13.4f}")
    print(f"difference: {large['peak_mb'] - small['peak_mb']:.0f} MB (goal: within 100 MB)")


if __name__ == "__main__":
    main()
