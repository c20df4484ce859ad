"""The only place dsl calls open_clip's private API (names that start with `_`, which a release may change).

`tests/test_encoder.py::test_openclip_adapter_pins_the_private_calls` checks that these calls still compose to
open_clip's own forward: `tokens`, the blocks in order, `pool_cls`, then the projection, equal `visual(pixels)`.
Shapes: B images, T tokens (CLS + patches), D residual width.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor, nn

from dsl_cli.libraries import Library

if TYPE_CHECKING:
    from open_clip.transformer import VisionTransformer

open_clip_model = Library("open_clip.model")  # imported when the first model is built, not when a run starts


def build_vision_tower(embed_dim: int, vision_cfg: dict, quick_gelu: bool) -> nn.Module:
    """The image tower alone, as `open_clip.create_model` builds it (no text tower is made)."""
    return open_clip_model._build_vision_tower(embed_dim, vision_cfg, quick_gelu)


def build_text_tower(embed_dim: int, text_cfg, quick_gelu: bool = False) -> nn.Module:
    """The text tower alone, as `open_clip.create_model` builds it (no image tower is made)."""
    return open_clip_model._build_text_tower(embed_dim, text_cfg, quick_gelu)


def tokens(visual: VisionTransformer, pixels: Tensor) -> Tensor:
    """pixels [B, 3, S, S] -> x_0 [B, T, D]: patch and class embeddings, positions, `ln_pre`."""
    return visual._embeds(pixels)


def pool_cls(visual: VisionTransformer, x: Tensor) -> Tensor:
    """The last residual stream [B, T, D] -> `ln_post` of its CLS row [B, D] (before the projection)."""
    pooled, _ = visual._pool(x)
    return pooled
