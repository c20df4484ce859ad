"""Image sets: the first stage. Turns `images.*` config into a list of upright RGB PIL images with names.

`samples` are natural photos that ship inside scikit-image (CC0 / public domain), so runs work offline;
`folder` takes a folder, a glob or one file. Odd formats (grayscale, palette, RGBA, CMYK, 16-bit) are
converted; EXIF-rotated JPEGs are turned upright; unreadable files are refused with one clear line, or
skipped and listed when `images.skip_bad=true`. `images.shard=i images.num_shards=n` keeps every n-th image
from the i-th on (names are given over the whole set first), so the n jobs of a sweep split it without
overlap or gap.
"""

from __future__ import annotations

import glob
import re
import warnings
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from dsl_cli.errors import UserError

# name -> file inside the installed scikit-image package (skimage/data)
SAMPLES = {
    "astronaut": "astronaut.png",
    "chelsea": "chelsea.png",
    "coffee": "coffee.png",
    "rocket": "rocket.jpg",
    "motorcycle": "motorcycle_left.png",
}
SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm", ".jfif"}


@dataclass
class InputImage:
    name: str  # file-system-safe, unique within the set
    image: Image.Image  # RGB, upright
    source: str  # where it came from


@dataclass
class ImageSet:
    images: list[InputImage]
    skipped: list[dict] = field(default_factory=list)  # [{"path": ..., "reason": ...}]


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


def read_image(path: Path) -> Image.Image:
    """Open, fully decode and convert one file; any failure becomes UserError naming the file."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as opened:
                opened.load()
                return to_rgb(opened)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise UserError(
            f"{path}: image too large ({err}); downscale it or raise PIL.Image.MAX_IMAGE_PIXELS if you trust it"
        ) from None
    except (OSError, ValueError, SyntaxError) as err:
        raise UserError(f"{path}: not a readable image ({err}); remove it or set images.skip_bad=true") from None


def _safe_name(stem: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", stem).strip("._") or "image"


def _folder_files(spec: str) -> list[Path]:
    """Files named by a folder, a glob or a single path, sorted."""
    path = Path(spec).expanduser()
    if any(ch in spec for ch in "*?["):
        files = [Path(p) for p in glob.glob(str(path), recursive=True)]
        if not files:
            raise UserError(f"images.path={spec}: the pattern matches no file")
        return sorted(p for p in files if p.is_file())
    if not path.exists():
        raise UserError(f"images.path={spec}: no such file or folder")
    if path.is_file():
        return [path]
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in SUFFIXES)
    if not files:
        raise UserError(
            f"images.path={spec}: no images in this folder (looked for {', '.join(sorted(SUFFIXES))})"
        )
    return files


def _sample_files(names: list[str] | None) -> list[tuple[str, Path]]:
    chosen = list(SAMPLES) if not names else list(names)
    unknown = [n for n in chosen if n not in SAMPLES]
    if unknown:
        raise UserError(f"images.names: unknown sample(s) {unknown}; choose from {sorted(SAMPLES)}")
    root = resources.files("skimage") / "data"
    return [(name, Path(str(root / SAMPLES[name]))) for name in chosen]


def unique_names(named: list[tuple[str, Path]]) -> list[tuple[str, Path]]:
    """A repeated name gets a suffix by order of appearance (`a`, `a_2`): names stay file-system-safe and unique."""
    seen: dict[str, int] = {}
    unique = []
    for name, path in named:
        seen[name] = seen.get(name, 0) + 1
        unique.append((name if seen[name] == 1 else f"{name}_{seen[name]}", path))
    return unique


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
    """All images of the configured set (`cfg` has the ImagesConfig fields), or its shard, in a stable order. A path
    given is used: `images.path=X` alone means the folder source (`images=folder`)."""
    if cfg.source == "samples" and cfg.path and cfg.names:
        raise UserError("images.names picks sample photos and images.path a folder of your own: give one of them")
    if cfg.source == "samples" and not cfg.path:
        named = _sample_files(cfg.names)
    elif cfg.source in ("folder", "samples"):
        if not cfg.path:
            raise UserError("images=folder needs images.path=/a/folder, a glob or a file")
        named = [(_safe_name(p.stem), p) for p in _folder_files(str(cfg.path))]
    else:
        raise UserError(f"images.source={cfg.source!r}: use samples or folder")
    if cfg.limit is not None:
        if cfg.limit < 1:
            raise UserError(f"images.limit={cfg.limit}: must be at least 1")
        named = named[: cfg.limit]
    named = shard(unique_names(named), cfg.shard, cfg.num_shards)

    result = ImageSet(images=[])
    for name, path in named:
        try:
            image = read_image(path)
        except UserError as err:
            if not cfg.skip_bad:
                raise
            result.skipped.append({"path": str(path), "reason": str(err)})
            continue
        result.images.append(InputImage(name, image, str(path)))
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
