"""The pieces every page is written with: escaped text, relative links and pictures (`dsl_cli.report` builds
the pages of runs, studies and sweeps from them, `dsl_cli.sae_report` a run page's SAE features section)."""

from __future__ import annotations

import html
from pathlib import Path
from urllib.parse import quote


def esc(value) -> str:
    """Text for HTML (element content or a quoted attribute)."""
    return html.escape("" if value is None else str(value), quote=True)


def link(path: str, text: str | None = None) -> str:
    """An <a> to a path relative to the page (percent-encoded, so any file name works)."""
    return f'<a href="{esc(quote(path))}">{esc(path if text is None else text)}</a>'


def img(path: str, alt: str) -> str:
    """An <img> of a path relative to the page, loaded when scrolled to (a page may hold hundreds)."""
    return f'<img src="{esc(quote(path))}" alt="{esc(alt)}" loading="lazy">'


def linked_img(path: str, alt: str) -> str:
    """A picture that links to itself at full size."""
    return f'<a href="{esc(quote(path))}">{img(path, alt)}</a>'


def rel(path: Path, folder: Path) -> str:
    """`path` relative to `folder`, with forward slashes (a link's form)."""
    return path.relative_to(folder).as_posix()
