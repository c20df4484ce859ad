"""Writing a batch of decoded pictures as a run writes them: how long 80 pictures of 512 px take (the GPU
issue's `dsl run`: 16 heads x 5 photos), each saved whole (temporary file, fsync, rename).

Rows: one after another at PIL's default zlib level 6 (what dsl did until 2026-12-06); `writing_pngs` on one
thread; on every core this process may use (what a run does now, while the encoder re-encodes the batch).
The pictures are the sample photos resized to the decode size (a decoder's pictures compress like photos,
not like noise).

    python scripts/bench_writer.py --pictures 80 --size 512
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pictures", type=int, default=80, help="pictures in the batch (default 80)")
    parser.add_argument("--size", type=int, default=512, help="their width and height in pixels (default 512)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each row; the median is printed (default 3)")
    return parser.parse_args()


def photos(count: int, size: int) -> list:
    from PIL import Image

    from dsl_cli.config import ImagesConfig
    from dsl_cli.images import load_images

    items = load_images(ImagesConfig()).images
    samples = [item.load().resize((size, size), Image.Resampling.BICUBIC) for item in items]
    return [samples[i % len(samples)] for i in range(count)]


def one_by_one_at_level_6(files: list) -> None:
    from dsl_cli.outputs import atomic_write_bytes

    for path, picture in files:
        buffer = io.BytesIO()
        picture.save(buffer, format="PNG")
        atomic_write_bytes(path, buffer.getvalue())


def on_threads(files: list, workers: int | None) -> None:
    from dsl_cli.outputs import writing_pngs

    with writing_pngs(files, workers):
        pass


def main() -> None:
    args = parse_args()
    from dsl_cli.outputs import usable_cores

    pictures = photos(args.pictures, args.size)
    rows = [("one after another, zlib level 6 (before)", one_by_one_at_level_6),
            ("writing_pngs, 1 thread, level 1", lambda files: on_threads(files, 1)),
            (f"writing_pngs, {usable_cores()} threads (every core), level 1", lambda files: on_threads(files, None))]
    print(f"# {args.pictures} pictures of {args.size} px, median of {args.repeats}")
    print("| how | seconds | MiB written |\n|---|---|---|")
    for name, write in rows:
        seconds, written = [], 0
        for _ in range(args.repeats):
            with tempfile.TemporaryDirectory() as folder:
                files = [(Path(folder) / f"{i}.png", picture) for i, picture in enumerate(pictures)]
                start = time.perf_counter()
                write(files)
                seconds.append(time.perf_counter() - start)
                written = sum(path.stat().st_size for path, _ in files)
        print(f"| {name} | {sorted(seconds)[len(seconds) // 2]:.2f} | {written / 2**20:.1f} |", flush=True)


if __name__ == "__main__":
    main()
