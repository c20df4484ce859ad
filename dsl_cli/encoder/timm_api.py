"""The only place dsl calls timm's private API (names that start with `_`, which a release may change).

`tests/test_vit_families.py` checks that these calls still compose to timm's own forward: `tokens`, the blocks in
order, then `model.norm` and `model.forward_head`, equal `model.forward_head(model.forward_features(pixels))`.
Shapes: B images, T tokens (class and register tokens, then patches), D residual width.
"""

from __future__ import annotations

from torch import Tensor, nn


def tokens(model: nn.Module, pixels: Tensor) -> Tensor:
    """pixels [B, 3, S, S] -> x_0 [B, T, D], as timm's `VisionTransformer.forward_features` builds it before the
    blocks: patch embedding, class/register tokens and positions (`_pos_embed`), patch dropout, `norm_pre`."""
    x = model.patch_embed(pixels)
    x = model._pos_embed(x)
    x = model.patch_drop(x)
    return model.norm_pre(x)
