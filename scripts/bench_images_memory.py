"""Peak memory of `dsl run` against the number of input photos: images are streamed, so 100 large photos
should cost about what 2 do.

Writes N synthetic photos (smooth random colour fields, JPEG, default 2000 x 1500) into a temporary folder,
then runs `dsl run debug=tiny images=folder ...` over the first 2 and over all N, each in a fresh Python
process, and prints each run's peak resident memory (`ru_maxrss`) and the difference. The tiny models keep
the model weights out of the figure; `decode.top_k=1` decodes one picture per photo, so the run also writes
inputs, pictures, grids and heatmaps for every photo.

    python scripts/bench_images_memory.py                       # 2 vs 100 photos of 2000 x 1500
    python scripts/bench_images_memory.py --photos 40 --size 4000x3000
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


CHILD = """
import json, resource, sys, time
if sys.argv[1] != "-":  # torch's threads, for a figure that does not depend on the machine's cores
    import torch
    torch.set_num_threads(int(sys.argv[1]))
from dsl_cli.cli import main
start = time.perf_counter()
status = main(sys.argv[2:])
print(json.dumps({"status": status, "seconds": time.perf_counter() - start,
                  "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def write_photos(folder: Path, count: int, width: int, height: int) -> None:
    """`count` JPEGs: a 6 x 8 grid of random colours, upsampled smoothly (photo-like, compressible)."""
    import numpy as np  # here, so that `--help` (and the scripts importing `measured`) answer at once
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(count):
        coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
        coarse.resize((width, height), Image.Resampling.BICUBIC).save(folder / f"photo_{i:03d}.jpg", quality=90)


def measured(args: list[str], what: str, threads: int | None = None) -> dict:
    """`dsl ARGS` in a fresh interpreter (torch on `threads` threads, or its default): its status, seconds and
    peak resident memory in MB (`ru_maxrss`). A failure ends the benchmark with its stderr, naming `what`."""
    result = subprocess.run([sys.executable, "-c", CHILD, str(threads or "-"), *args], capture_output=True,
                            text=True, check=False)
    if result.returncode != 0:
        sys.exit(f"{what} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def peak_of_run(photos: Path, count: int, out: Path, extra: list[str]) -> dict:
    """One `dsl run` over the first `count` photos in a fresh interpreter: its status, seconds, peak MB."""
    args = ["run", "debug=tiny", "images=folder", f"images.path={photos}", f"images.limit={count}",
            "decode.top_k=1", f"hydra.run.dir={out / f'run_{count}'}", *extra]
    return measured(args, f"run over {count} photos")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=int, default=100, help="photos in the large run (default 100)")
    parser.add_argument("--size", default="2000x1500", help="photo size WIDTHxHEIGHT (default 2000x1500)")
    parser.add_argument("overrides", nargs="*", help="more `dsl run` overrides, e.g. decode.enabled=false")
    options = parser.parse_args()
    width, height = (int(v) for v in options.size.split("x"))
    with tempfile.TemporaryDirectory(prefix="dsl-bench-") as tmp:
        photos = Path(tmp) / "photos"
        photos.mkdir()
        start = time.perf_counter()
        write_photos(photos, options.photos, width, height)
        print(f"{options.photos} photos of {width} x {height} written in {time.perf_counter() - start:.1f} s")
        small = peak_of_run(photos, 2, Path(tmp), options.overrides)
        large = peak_of_run(photos, options.photos, Path(tmp), options.overrides)
    print(f"{'photos':>7} {'peak RSS (MB)':>14} {'seconds':>8}")
    for count, result in ((2, small), (options.photos, large)):
        print(f"{count:>7} {result['peak_mb']:>14.0f} {result['seconds']:>8.1f}")
    print(f"difference: {large['peak_mb'] - small['peak_mb']:.0f} MB (goal: within 300 MB)")


if __name__ == "__main__":
    main()
