"""Reading a head from every side: exact direct attribution through the final LayerNorm, and where a head
looks (its CLS write decomposed over source tokens).

Shapes: B images, T tokens (CLS + patches), L blocks, H heads, D residual width, d = D / H head width,
E embedding width, K components.

Direct attribution (the TransformerLens `apply_ln_to_stack` / CLIP text-span decomposition): the image
embedding is `ln_post(x_L) @ proj`, with `x_L = x_0 + sum_l (sum_h a_{l,h} + b_l + m_l)` at the CLS position.
Freezing ln_post's scale at the clean run's, `sigma = sqrt(var(x_L) + eps)`, makes the readout linear:
`A(v) = ((v - mean(v)) / sigma * w) @ proj`. Every head's and MLP's attribution is A of its write; the
embedding term is A(x_0); the bias term is `bias @ proj` plus A of the attention output biases (b_l, constant
writes no head owns). Together they sum to the embedding exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

from dsl_cli.components import Component
from dsl_cli.encoder.hooked import EncoderCache, HookedEncoder


@dataclass
class Attribution:
    """The embedding split into parts that sum to it exactly (float32).

    heads  [B, L, H, E]  each head's direct attribution
    mlps   [B, L, E]     each MLP's
    embed  [B, E]        the embedding term: x_0 (patch and class embeddings, positions, ln_pre)
    bias   [B, E]        the bias term: ln_post's bias and every attention output bias
    """

    heads: Tensor
    mlps: Tensor
    embed: Tensor
    bias: Tensor

    def total(self) -> Tensor:
        """[B, E]: the sum of every part (equals the image embedding)."""
        return self.heads.sum((1, 2)) + self.mlps.sum(1) + self.embed + self.bias

    def pick(self, components: Sequence[Component]) -> Tensor:
        """[B, K]: the attributions of heads and MLPs (`embed` names the embedding term)."""
        parts = {"head": lambda c: self.heads[:, c.layer, c.head], "mlp": lambda c: self.mlps[:, c.layer],
                 "embed": lambda c: self.embed}
        return torch.stack([parts[c.kind](c) for c in components], 1)


def final_norm(encoder: HookedEncoder) -> nn.LayerNorm:
    """The readout's LayerNorm (open_clip's ln_post; another family's final norm or fc_norm); a readout that is
    not a LayerNorm and a linear map of the readout position (attention pooling) cannot be attributed."""
    norm = encoder.family.final_norm()
    if norm is None:
        raise NotImplementedError(f"the {encoder.readout_kind} readout of this {encoder.family.name} ViT is not a "
                                  "LayerNorm and a linear map: no exact direct attribution")
    return norm


def frozen_scale(encoder: HookedEncoder, final: Tensor) -> Tensor:
    """ln_post's scale at the clean final residual: final [B, D] -> sigma [B, 1] (float32)."""
    return (final.float().var(-1, unbiased=False, keepdim=True) + final_norm(encoder).eps).sqrt()


def linear_readout(encoder: HookedEncoder, v: Tensor, sigma: Tensor) -> Tensor:
    """The readout with ln_post's scale frozen: v [B, ..., D], sigma [B, 1] -> [B, ..., E] (float32), with
    no bias (it is a term of its own)."""
    ln = final_norm(encoder)
    v = v.float()
    scale = sigma.view(sigma.shape[0], *([1] * (v.dim() - 1)))
    normed = (v - v.mean(-1, keepdim=True)) / scale * ln.weight.float()
    return _projected(encoder, normed)


def _projected(encoder: HookedEncoder, v: Tensor) -> Tensor:
    """v [..., D] (float32) through the readout's projection after the norm -> [..., E] (float32): open_clip's
    `proj` in float32; another family's own (bias-free) projection module, or none."""
    if encoder.family.name != "open_clip":
        return encoder.family.project(v.to(encoder.dtype)).float()
    proj = encoder.visual.proj
    return v if proj is None else v @ proj.float()


@torch.no_grad()
def direct_attribution(encoder: HookedEncoder, cache: EncoderCache) -> Attribution:
    """Every head's and MLP's direct attribution, and the embedding and bias terms (module docstring)."""
    sigma = frozen_scale(encoder, cache.resid[:, -1])
    ln = final_norm(encoder)
    bias = _projected(encoder, ln.bias.float())
    return Attribution(
        heads=linear_readout(encoder, cache.head_writes, sigma),
        mlps=linear_readout(encoder, cache.mlp_writes, sigma),
        embed=linear_readout(encoder, cache.resid[:, 0], sigma),
        bias=bias + linear_readout(encoder, cache.attn_bias.sum(1), sigma),
    )


@torch.no_grad()
def head_sources(encoder: HookedEncoder, pixels: Tensor, heads: Sequence[Component]) -> Tensor:
    """Where each head looks: its CLS write decomposed over source tokens -> [B, K, T, D] (float32).

    Token t's part is the head's attention weight from CLS to t times t's value, through the head's columns
    of the output matrix (LayerScale included): the parts sum over t to the head's write `a_{l,h}`. One
    clean pass records the input of every chosen head's block. pixels [B, 3, S, S].
    """
    normed = _block_inputs(encoder, pixels, heads)
    return torch.stack([_sources(encoder, c.layer, normed[c.layer], c.head) for c in heads], 1)


@torch.no_grad()
def source_shares(encoder: HookedEncoder, pixels: Tensor, heads: Sequence[Component]) -> Tensor:
    """Each source token's share of each head's CLS write: part_t . a / |a|^2 -> [B, K, T], summing to 1
    over t (CLS first, then the patches in rows). Reduced head by head: all heads' parts at once would be
    [B, K, T, D] (3.5 GB for 512 bigG heads of 16 images)."""
    normed = _block_inputs(encoder, pixels, heads)
    shares = []
    for c in heads:
        parts = _sources(encoder, c.layer, normed[c.layer], c.head)  # [B, T, D]
        write = parts.sum(1, keepdim=True)  # [B, 1, D]
        size = (write * write).sum(-1).clamp_min(torch.finfo(torch.float32).tiny)  # a zero write gives zeros
        shares.append((parts * write).sum(-1) / size)
    return torch.stack(shares, 1)


def _block_inputs(encoder: HookedEncoder, pixels: Tensor, heads: Sequence[Component]) -> dict[int, Tensor]:
    """ln_1 output [B, T, D] of each chosen head's block, from one clean open_clip pass."""
    inputs: dict[int, Tensor] = {}

    def keep(x: Tensor, point) -> None:
        inputs[point.layer] = encoder.block_parts(point.layer).norm1(x)

    encoder.run_with_hooks(pixels, [(f"blocks.{l}.hook_resid_pre", keep) for l in sorted({c.layer for c in heads})])
    return inputs


def _sources(encoder: HookedEncoder, layer: int, normed: Tensor, head: int) -> Tensor:
    """One head's write at the readout position by source token: normed [B, T, D] (norm1 output) -> [B, T, D].
    Only the head's rows of the input projection are applied (its query at the readout position alone, not
    all heads' to pick one). With a pooled readout the queries are the pooled tokens, and each source's part is
    its mean over them, so that the parts still sum to the cached (mean) write."""
    parts = encoder.block_parts(layer)
    width, d = parts.qkv_weight.shape[0] // 3, parts.d_head
    rows = [slice(part * width + head * d, part * width + (head + 1) * d) for part in range(3)]
    w, b = parts.qkv_weight, parts.qkv_bias
    queries = normed[:, :1] if encoder.readout_kind == "cls" else normed[:, encoder.family.n_prefix:]
    q = nn.functional.linear(queries, w[rows[0]], None if b is None else b[rows[0]]).float()  # [B, Q, d]
    k, v = (nn.functional.linear(normed, w[r], None if b is None else b[r]).float() for r in rows[1:])  # [B, T, d]
    weights = torch.softmax(q @ k.transpose(1, 2) / d ** 0.5, -1).mean(1, keepdim=True)  # [B, 1, T]
    values = v @ parts.out_by_head()[:, head].float().T  # [B, T, D]: each token's value through W_O
    out = weights.transpose(1, 2) * values
    return (out if parts.gamma1 is None else out * parts.gamma1.float()).float()
