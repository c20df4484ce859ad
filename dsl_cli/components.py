"""Component labels, as in TransformerLens: `L30H05` (head), `L30MLP` (MLP), `L30` (residual after block 30),
`L30mid` (residual after block 30's attention, before its MLP), `embed` (the residual stream before block 0);
with a sparse autoencoder (`dsl_cli.sae`) at block 12, `L12F01234` (its feature 1234) and `L12Ferr` (its error term).

Labels are written with two-digit layer and head numbers so that they sort; parsing also takes `L3H1`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

_LABEL = re.compile(r"^L(?P<layer>\d+)(?:H(?P<head>\d+)|(?P<mlp>MLP)|(?P<mid>mid)|F(?P<feature>\d+)|(?P<err>Ferr))?$",
                    re.IGNORECASE)
FEATURE_KINDS = ("feature", "feature_error")  # an SAE's feature write, and its reconstruction error (dsl_cli.sae)


@dataclass(frozen=True)
class Read:
    """Where a component kind is read: the hook point in its block (TransformerLens name), the `EncoderCache`
    field that holds it at the CLS position, and the offset from the hook's block to the field's layer axis."""

    point: str
    field: str
    offset: int


# The one table from component kind to hook point and cached tensor (`EncoderCache` field[:, block + offset]).
READS = {
    "head": Read("attn.hook_result", "head_writes", 0),  # [B, L, H, D], then the head
    "mlp": Read("hook_mlp_out", "mlp_writes", 0),
    "resid_mid": Read("hook_resid_mid", "resid_mid", 0),
    "resid": Read("hook_resid_post", "resid", 1),  # x_{l+1}: resid holds x_0 .. x_L
    "embed": Read("hook_resid_pre", "resid", 0),  # x_0, read at block 0
}


@dataclass(frozen=True)
class Component:
    """One place in the model. kind: `head`, `mlp`, `resid` (after block `layer`), `resid_mid` (between
    block `layer`'s attention and MLP) or `embed` (layer -1); `feature` (an SAE feature's write at the SAE's
    hook point in block `layer`) or `feature_error` (that SAE's reconstruction error)."""

    kind: str
    layer: int
    head: Optional[int] = None
    feature: Optional[int] = None  # kind `feature`: the SAE feature's index

    @property
    def label(self) -> str:
        if self.kind == "embed":
            return "embed"
        if self.kind == "head":
            return f"L{self.layer:02d}H{self.head:02d}"
        if self.kind == "mlp":
            return f"L{self.layer:02d}MLP"
        if self.kind == "resid_mid":
            return f"L{self.layer:02d}mid"
        if self.kind == "feature":
            return f"L{self.layer:02d}F{self.feature:05d}"
        if self.kind == "feature_error":
            return f"L{self.layer:02d}Ferr"
        return f"L{self.layer:02d}"

    @property
    def hook_name(self) -> str:
        """The TransformerLens hook name of the tensor this component reads (`blocks.30.attn.hook_result`)."""
        if self.kind in FEATURE_KINDS:
            raise ValueError(f"{self.label}: an SAE feature is read at its SAE's hook point (`Sae.hook_name`)")
        return f"blocks.{max(self.layer, 0)}.{READS[self.kind].point}"

    def __str__(self) -> str:
        return self.label


def parse_component(label: "str | Component") -> Component:
    """`"L30H05"` -> Component("head", 30, 5); `"L2MLP"`, `"L7"`, `"embed"` likewise.

    Raises ValueError naming the accepted forms for anything else.
    """
    if isinstance(label, Component):
        return label
    text = str(label).strip()
    if text.lower() == "embed":
        return Component("embed", -1)
    match = _LABEL.match(text)
    if match is None:
        raise ValueError(
            f"unknown component label {label!r}: use L<layer>H<head> (L30H05), L<layer>MLP (L30MLP), "
            "L<layer> (residual stream), L<layer>mid (between attention and MLP), embed, or with an SAE "
            "L<layer>F<feature> (L12F01234) and L<layer>Ferr"
        )
    layer = int(match["layer"])
    if match["head"] is not None:
        return Component("head", layer, int(match["head"]))
    if match["mlp"] is not None:
        return Component("mlp", layer)
    if match["mid"] is not None:
        return Component("resid_mid", layer)
    if match["feature"] is not None:
        return Component("feature", layer, feature=int(match["feature"]))
    if match["err"] is not None:
        return Component("feature_error", layer)
    return Component("resid", layer)
