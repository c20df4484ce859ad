"""Image sets: the first stage. Turns `images.*` config into named inputs whose pixels are read on demand.

`samples` are natural photos that ship inside scikit-image (CC0 / public domain), so runs work offline;
`folder` takes a folder, a glob or one file. Every file is checked from its header when the set is listed
(format, pixel count, aspect ratio: a decompression bomb is refused before it is decoded); its pixels are
read only when a batch needs them (`InputImage.load`) and released after, so memory does not grow with the
number of images. Odd formats (grayscale, palette, RGBA, CMYK, 16-bit) are converted; EXIF-rotated JPEGs
are turned upright; unreadable files are refused with one clear line, or skipped and listed when
`images.skip_bad=true`.
`images.shard=i images.num_shards=n` keeps every n-th image from the i-th on (names are given over the whole
set first), so the n jobs of a sweep split it without overlap or gap.
"""

from __future__ import annotations

import hashlib
import logging
import re
import unicodedata
import warnings
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
from PIL import Image, ImageOps

from dsl_cli.errors import UserError

log = logging.getLogger("dsl_cli.images")

# name -> file inside the installed scikit-image package (skimage/data)
SAMPLES = {
    "astronaut": "astronaut.png",
    "chelsea": "chelsea.png",
    "coffee": "coffee.png",
    "rocket": "rocket.jpg",
    "motorcycle": "motorcycle_left.png",
}
SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm", ".jfif"}
# Longest side at most this many times the shortest: the encoder resizes the shortest side to its input
# size, so a 30000 x 1 strip would become a 6.7 M x 224 image (1.5 G pixels) before it is cropped.
MAX_ASPECT = 20


@dataclass
class InputImage:
    """One input: its name in the run folder and where its pixels come from."""

    name: str  # file-system-safe, unique within the set (also ignoring case)
    image: Optional[Image.Image]  # pixels given in memory (RGB, upright), or None: read from `source`
    source: str  # where it came from

    def load(self) -> Image.Image:
        """The picture as upright RGB: the one given, or read from `source` now (not kept)."""
        return self.image if self.image is not None else read_image(Path(self.source))


@dataclass
class ImageSet:
    images: list[InputImage]
    skipped: list[dict] = field(default_factory=list)  # [{"path": ..., "reason": ...}]
    skip_bad: bool = False  # go on without an image that fails to load, listing it in `skipped`

    @cached_property
    def fingerprints(self) -> dict[str, str]:
        """name -> `fingerprint` of each image's file, read when first asked for, once: only a run, which may be
        continued, needs them (an adapter fit or an SAE training over a large folder reads each file once, to
        decode it)."""
        return {item.name: fingerprint(Path(item.source)) for item in self.images if item.image is None}

    def stream(self, items: list[InputImage]) -> Iterator[tuple[InputImage, Image.Image]]:
        """Each item with its picture, read one at a time; one that fails to read is skipped and listed
        (`skip_bad`) or stops the run."""
        for item in items:
            try:
                picture = item.load()
            except UserError as err:
                if not self.skip_bad:
                    raise
                self.skip(item.source, err)
                continue
            yield item, picture

    def skip(self, path: str, err: UserError) -> None:
        """List an unreadable image and say so, on the terminal and in dsl.log (`skip_bad`), without the advice
        to set skip_bad that ends the error's line when it stops a run."""
        reason, sep, advice = str(err).rpartition("; ")
        reason = reason if sep and "images.skip_bad=true" in advice else str(err)
        self.skipped.append({"path": path, "reason": reason})
        log.warning("skipped (images.skip_bad=true): %s", reason)


def to_rgb(image: Image.Image) -> Image.Image:
    """Upright 8-bit RGB from whatever Pillow opened (EXIF rotation, palette, alpha, CMYK, 16-bit, grey)."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit and float greyscale: rescale to 8 bits by the value range, not by clipping
        values = np.asarray(image, dtype=np.float64)
        low, high = float(values.min()), float(values.max())
        scaled = (values - low) / (high - low) * 255.0 if high > low else np.zeros_like(values)
        image = Image.fromarray(np.round(scaled).astype(np.uint8), mode="L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # composite on white, as a viewer would show it
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


@contextmanager
def _opened(path: Path) -> Iterator[Image.Image]:
    """Image.open with the guards (pixel count, aspect ratio) applied to the header, before any decoding;
    any failure, here or in the caller's block, becomes UserError naming the file."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as opened:
                width, height = opened.size
                if max(width, height) > MAX_ASPECT * max(1, min(width, height)):
                    raise UserError(f"{path}: {width} x {height} pixels, longer than {MAX_ASPECT}:1; crop it, "
                                    "or set images.skip_bad=true to go on without it")
                yield opened
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise UserError(
            f"{path}: image too large ({err}); downscale it, or set images.skip_bad=true to go on without it "
            "(from Python: raise PIL.Image.MAX_IMAGE_PIXELS if you trust it)"
        ) from None
    except (OSError, ValueError, SyntaxError) as err:
        raise UserError(f"{path}: not a readable image ({err}); remove it or set images.skip_bad=true") from None


def check_image(path: Path) -> None:
    """Refuse a file that is not an image or whose size is absurd, from its header (a PNG's chunks are
    checked too, which finds most truncated files), without decoding its pixels."""
    with _opened(path) as opened:
        if opened.format == "PNG":
            opened.verify()


def fingerprint(path: Path) -> str:
    """A hash of the file's bytes: a run continued later finds out whether an input changed since it started
    (`dsl_cli.resumption.same_images`). The bytes, not the pixels: known before any picture is decoded."""
    try:
        with open(path, "rb") as handle:
            return hashlib.file_digest(handle, "sha256").hexdigest()[:16]
    except OSError as err:
        raise UserError(f"{path}: cannot be read ({err.strerror or err}); remove it or set "
                        "images.skip_bad=true") from None


def read_image(path: Path) -> Image.Image:
    """Open, fully decode and convert one file; any failure becomes UserError naming the file."""
    with _opened(path) as opened:
        opened.load()
        return to_rgb(opened)


STEM_LIMIT = 100  # characters of a file's stem kept in its image's name (then a hash): names stay valid
# (outputs.NAME, 200) and the figures' file names named after them short of the 255 bytes a file system allows


def _safe_name(stem: str) -> str:
    plain = unicodedata.normalize("NFKD", stem).encode("ascii", "ignore").decode()  # `café` -> `cafe`, not `caf`
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", plain).strip("._-")[:STEM_LIMIT].rstrip("._-") or "image"


def unique_names(files: list[Path], root: Path) -> list[str]:
    """A name per file, usable as a folder name and distinct from the others (also ignoring case).

    A file is named by its stem when the stem is already safe and no other file has the same stem; else by
    the cleaned stem and a hash of its path below `root` (`a b.png` -> `a_b-47c1591e`). So names do not
    depend on the order of the files, and a file keeps its name when others are added or removed.
    """
    counts = Counter(p.stem.casefold() for p in files)
    names = []
    for path in files:
        safe = _safe_name(path.stem)
        if safe == path.stem and counts[safe.casefold()] == 1:  # a stem cut short is not equal: hashed
            names.append(safe)
        else:
            names.append(f"{safe}-{hashlib.sha256(_relative(path, root).encode()).hexdigest()[:8]}")
    taken = Counter(name.casefold() for name in names)
    for i, path in enumerate(files):  # a hashed name equal to another file's stem: lengthen the hash
        if taken[names[i].casefold()] > 1 and names[i] != path.stem:
            names[i] = f"{_safe_name(path.stem)}-{hashlib.sha256(_relative(path, root).encode()).hexdigest()}"
    return names


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


def _visible(path: Path, root: Path) -> bool:
    """Not hidden (no part of its path below `root` starts with a dot), as a shell's `*` sees files."""
    return not any(part.startswith(".") for part in Path(_relative(path, root)).parts)


def _glob(spec: str) -> tuple[list[Path], Path]:
    """Files matching a glob, and the folder the pattern starts from. pathlib's `**` does not follow links
    to folders, so two links to `.` cannot make the listing endless."""
    parts = Path(spec).expanduser().parts
    first = next(i for i, part in enumerate(parts) if any(ch in part for ch in "*?["))
    root = Path(*parts[:first]) if first else Path(".")
    pattern = "/".join(parts[first:])
    files = sorted(p for p in root.glob(pattern) if p.is_file() and _visible(p, root))
    if not files:
        raise UserError(f"images.path={spec}: the pattern matches no file")
    return files, root


def _folder_files(spec: str) -> tuple[list[Path], Path]:
    """Files named by a folder, a glob or a single path, sorted, and the folder their names are taken
    below. A path that exists is taken as it is, even if its name holds `[`, `?` or `*`."""
    path = Path(spec).expanduser()
    if not path.exists():
        if any(ch in spec for ch in "*?["):
            return _glob(spec)
        raise UserError(f"images.path={spec}: no such file or folder")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in SUFFIXES
                       and _visible(p, path))
        if not files:
            raise UserError(
                f"images.path={spec}: no images in this folder (looked for {', '.join(sorted(SUFFIXES))})"
            )
        return files, path
    if not path.is_file():
        raise UserError(f"images.path={spec}: not a regular file or a folder (a pipe or a device?)")
    return [path], path.parent


def _sample_files(names: list[str] | None) -> list[tuple[str, Path]]:
    if names is not None and len(names) == 0:  # as component=[] is: an empty list naming nothing is a slip
        raise UserError(f"images.names=[] names no image: list some of {sorted(SAMPLES)}, or leave it out for all")
    chosen = list(SAMPLES) if names is None else list(names)
    unknown = [n for n in chosen if n not in SAMPLES]
    if unknown:
        raise UserError(f"images.names: unknown sample(s) {unknown}; choose from {sorted(SAMPLES)}")
    root = resources.files("skimage") / "data"
    return [(name, Path(str(root / SAMPLES[name]))) for name in chosen]


def _check_distinct(named: list[tuple[str, Path]]) -> None:
    """Refuse two inputs of one name (also ignoring case, as a file system may): an image's pictures, rows and
    input.png are filed under its name, so the second would overwrite the first's and repeat its rows."""
    seen: set[str] = set()
    for name, path in named:
        if name.casefold() in seen:
            raise UserError(f"images: two inputs are named {name} (the second: {path}); "
                            "give each image once")
        seen.add(name.casefold())


def shard(items: list, index: int | None, count: int) -> list:
    """The `index`-th of `count` disjoint shards that together hold every item once: every `count`-th item
    from the `index`-th on. The same list always gives the same shards (a requeued job sees its own)."""
    if count < 1:
        raise UserError(f"images.num_shards={count}: must be at least 1")
    if index is None:
        if count > 1:
            raise UserError(f"images.num_shards={count} needs images.shard (0 to {count - 1}), e.g. "
                            f"--multirun images.shard=range(0,{count})")
        return list(items)
    if not 0 <= index < count:
        raise UserError(f"images.shard={index}: must be between 0 and images.num_shards-1={count - 1}")
    picked = items[index::count]
    if not picked:
        raise UserError(f"images.shard={index} of images.num_shards={count} holds no image (the set has "
                        f"{len(items)}): use at most {len(items)} shards")
    return picked


def load_images(cfg) -> ImageSet:
    """The configured set (`cfg` has the ImagesConfig fields), or its shard, in a stable order, each file
    checked from its header; pixels are read later, batch by batch (`ImageSet.stream`). A path given is
    used: `images.path=X` alone means the folder source (`images=folder`)."""
    if cfg.path is not None and not str(cfg.path).strip():  # `images.path=$PHOTOS` with the variable unset
        raise UserError("images.path is empty (an unset shell variable?): give a folder, a glob or a file, or leave "
                        "images.path out for the sample photos")
    if cfg.source == "samples" and cfg.path and cfg.names:
        raise UserError("images.names picks sample photos and images.path a folder of your own: give one of them")
    if cfg.source == "samples" and not cfg.path:
        named = _sample_files(cfg.names)
    elif cfg.source in ("folder", "samples"):
        if not cfg.path:
            raise UserError("images=folder needs images.path=/a/folder, a glob or a file")
        files, root = _folder_files(str(cfg.path))
        named = list(zip(unique_names(files, root), files))
    else:
        raise UserError(f"images.source={cfg.source!r}: use samples or folder")
    _check_distinct(named)
    if cfg.limit is not None:
        if cfg.limit < 1:
            raise UserError(f"images.limit={cfg.limit}: must be at least 1")
        named = named[: cfg.limit]
    named = shard(named, cfg.shard, cfg.num_shards)

    result = ImageSet(images=[], skip_bad=cfg.skip_bad)
    for name, path in named:
        try:
            check_image(path)
        except UserError as err:
            if not cfg.skip_bad:
                raise
            result.skip(str(path), err)
            continue
        result.images.append(InputImage(name, None, str(path)))
    if not result.images:
        raise UserError(f"no readable image among {len(named)} file(s); skipped: {result.skipped[:3]}")
    return result


# where `overlay` pastes the foreground: fractions (x, y) of the free space left/above it
OVERLAY_POSITIONS = {
    "center": (0.5, 0.5), "top-left": (0.0, 0.0), "top-right": (1.0, 0.0),
    "bottom-left": (0.0, 1.0), "bottom-right": (1.0, 1.0),
}


def overlay(background: Image.Image, foreground: Image.Image, scale: float = 0.45,
            position: str = "center") -> Image.Image:
    """A composite for the overlay-removal study: the background's centre-cropped square, with the
    foreground's centre-cropped square resized (bicubic) to `scale` of that side pasted at `position`
    (center, top-left, top-right, bottom-left, bottom-right). Both squares are what the encoder's
    preprocessing (shortest-edge resize, centre crop) would see of each image. Returns RGB."""
    if not 0 < scale <= 1:
        raise UserError(f"overlay scale={scale}: must be in (0, 1]")
    if position not in OVERLAY_POSITIONS:
        raise UserError(f"overlay position={position!r}: use one of {', '.join(OVERLAY_POSITIONS)}")
    side = min(background.size)
    canvas = ImageOps.fit(background.convert("RGB"), (side, side), Image.Resampling.BICUBIC)
    small = max(1, round(scale * side))
    patch = ImageOps.fit(foreground.convert("RGB"), (small, small), Image.Resampling.BICUBIC)
    fx, fy = OVERLAY_POSITIONS[position]
    canvas.paste(patch, (round(fx * (side - small)), round(fy * (side - small))))
    return canvas
