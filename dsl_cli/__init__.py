"""dsl: Diffusion Steering Lens and Diffusion Lens for vision transformers, decoded with Kandinsky or unCLIP.

The public API, one entry per stage (docs/python-api.md walks through it); plain dataclass configs
(`EncoderConfig`, `DecoderConfig`, `LensConfig`, `ImagesConfig`) or keyword arguments work everywhere:

    import dsl_cli as dsl
    encoder, preprocess = dsl.load_encoder(dsl.EncoderConfig(source="tiny"))
    cache = encoder.run_with_cache(pixels)                     # CLS-position cache [B, L, H, D] ...
    embeds = dsl.lens_embeddings("steering", encoder, cache, ["L3H01", "L2MLP"], alpha=4.0)   # [B, K, E]
    decoder = dsl.load_decoder(dsl.DecoderConfig(source="tiny"))
    pictures = decoder.decode(embeds[0], encoder.zero_embed(), seeds=0, height=64, width=64, steps=2)
    rows = dsl.RunFolder("outputs/DATE/TIME").read(dsl.SIMILARITY)

Names are imported on first use, so that `import dsl_cli` (and `dsl --help`) loads no model library.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_API = {
    "EncoderConfig": "dsl_cli.config", "DecoderConfig": "dsl_cli.config", "LensConfig": "dsl_cli.config",
    "ImagesConfig": "dsl_cli.config", "DecodeConfig": "dsl_cli.config", "RunConfig": "dsl_cli.config",
    "HookedEncoder": "dsl_cli.encoder", "EncoderCache": "dsl_cli.encoder", "load_encoder": "dsl_cli.encoder",
    "load_text_model": "dsl_cli.encoder", "register_family": "dsl_cli.encoder",
    "load_decoder": "dsl_cli.decoder", "KandinskyDecoder": "dsl_cli.decoder",
    "load_images": "dsl_cli.images",
    "Component": "dsl_cli.components", "parse_component": "dsl_cli.components",
    "get_lens": "dsl_cli.lenses", "lens_embeddings": "dsl_cli.lenses", "LENSES": "dsl_cli.lenses",
    "RunFolder": "dsl_cli.outputs", "SIMILARITY": "dsl_cli.outputs", "LABELS": "dsl_cli.outputs",
    "PATCHES": "dsl_cli.outputs", "IMPORTANCE": "dsl_cli.outputs", "OVERLAY": "dsl_cli.outputs",
    "redraw": "dsl_cli.figures", "write_pages": "dsl_cli.report",
    "UserError": "dsl_cli.errors",
}
__all__ = sorted(_API) + ["__version__"]

if TYPE_CHECKING:  # for editors and type checkers; at run time `__getattr__` imports on first use
    from dsl_cli.components import Component, parse_component
    from dsl_cli.config import DecodeConfig, DecoderConfig, EncoderConfig, ImagesConfig, LensConfig, RunConfig
    from dsl_cli.decoder import KandinskyDecoder, load_decoder
    from dsl_cli.encoder import EncoderCache, HookedEncoder, load_encoder, load_text_model, register_family
    from dsl_cli.errors import UserError
    from dsl_cli.figures import redraw
    from dsl_cli.images import load_images
    from dsl_cli.lenses import LENSES, get_lens, lens_embeddings
    from dsl_cli.outputs import IMPORTANCE, LABELS, OVERLAY, PATCHES, SIMILARITY, RunFolder
    from dsl_cli.report import write_pages


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'dsl_cli' has no attribute {name!r}")
    value = getattr(import_module(_API[name]), name)
    globals()[name] = value  # the next look-up is a plain attribute
    return value


def __dir__() -> list[str]:
    return __all__
