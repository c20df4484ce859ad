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
from dsl_cli.encoder.hooked import EncoderCache, HookedEncoder, _layer_scale, _out_weight


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


def frozen_scale(encoder: HookedEncoder, final: Tensor) -> Tensor:
    """ln_post's scale at the clean final residual: final [B, D] -> sigma [B, 1] (float32)."""
    return (final.float().var(-1, unbiased=False, keepdim=True) + encoder.visual.ln_post.eps).sqrt()


def linear_readout(encoder: HookedEncoder, v: Tensor, sigma: Tensor) -> Tensor:
    """The readout with ln_post's scale frozen: v [B, ..., D], sigma [B, 1] -> [B, ..., E] (float32), with
    no bias (it is a term of its own)."""
    ln = encoder.visual.ln_post
    v = v.float()
    scale = sigma.view(sigma.shape[0], *([1] * (v.dim() - 1)))
    normed = (v - v.mean(-1, keepdim=True)) / scale * ln.weight.float()
    proj = encoder.visual.proj
    return normed if proj is None else normed @ proj.float()


@torch.inference_mode()
def direct_attribution(encoder: HookedEncoder, cache: EncoderCache) -> Attribution:
    """Every head's and MLP's direct attribution, and the embedding and bias terms (module docstring)."""
    sigma = frozen_scale(encoder, cache.resid[:, -1])
    ln, proj = encoder.visual.ln_post, encoder.visual.proj
    bias = ln.bias.float() if proj is None else ln.bias.float() @ proj.float()
    return Attribution(
        heads=linear_readout(encoder, cache.head_writes, sigma),
        mlps=linear_readout(encoder, cache.mlp_writes, sigma),
        embed=linear_readout(encoder, cache.resid[:, 0], sigma),
        bias=bias + linear_readout(encoder, cache.attn_bias.sum(1), sigma),
    )


@torch.inference_mode()
def head_sources(encoder: HookedEncoder, pixels: Tensor, heads: Sequence[Component]) -> Tensor:
    """Where each head looks: its CLS write decomposed over source tokens -> [B, K, T, D] (float32).

    Token t's part is the head's attention weight from CLS to t times t's value, through the head's columns
    of the output matrix (LayerScale included): the parts sum over t to the head's write `a_{l,h}`. One
    clean pass records the input of every chosen head's block. pixels [B, 3, S, S].
    """
    normed = _block_inputs(encoder, pixels, heads)
    return torch.stack([_sources(encoder.blocks[c.layer], normed[c.layer], c.head) for c in heads], 1)


@torch.inference_mode()
def source_shares(encoder: HookedEncoder, pixels: Tensor, heads: Sequence[Component]) -> Tensor:
    """Each source token's share of each head's CLS write: part_t . a / |a|^2 -> [B, K, T], summing to 1
    over t (CLS first, then the patches in rows). Reduced head by head: all heads' parts at once would be
    [B, K, T, D] (3.5 GB for 512 bigG heads of 16 images)."""
    normed = _block_inputs(encoder, pixels, heads)
    shares = []
    for c in heads:
        parts = _sources(encoder.blocks[c.layer], normed[c.layer], c.head)  # [B, T, D]
        write = parts.sum(1, keepdim=True)  # [B, 1, D]
        size = (write * write).sum(-1).clamp_min(torch.finfo(torch.float32).tiny)  # a zero write gives zeros
        shares.append((parts * write).sum(-1) / size)
    return torch.stack(shares, 1)


def _block_inputs(encoder: HookedEncoder, pixels: Tensor, heads: Sequence[Component]) -> dict[int, Tensor]:
    """ln_1 output [B, T, D] of each chosen head's block, from one clean open_clip pass."""
    inputs: dict[int, Tensor] = {}

    def keep(x: Tensor, point) -> None:
        inputs[point.layer] = encoder.blocks[point.layer].ln_1(x)

    encoder.run_with_hooks(pixels, [(f"blocks.{l}.hook_resid_pre", keep) for l in sorted({c.layer for c in heads})])
    return inputs


def _sources(block: nn.Module, normed: Tensor, head: int) -> Tensor:
    """One head's CLS write by source token: normed [B, T, D] (ln_1 output) -> [B, T, D]. Only the head's
    rows of the input projection are applied (its query at CLS alone), not all heads' to pick one."""
    attn = block.attn
    d = attn.embed_dim // attn.num_heads
    rows = [slice(part * attn.embed_dim + head * d, part * attn.embed_dim + (head + 1) * d) for part in range(3)]
    w, b = attn.in_proj_weight, attn.in_proj_bias
    q = nn.functional.linear(normed[:, :1], w[rows[0]], b[rows[0]]).float()  # [B, 1, d]
    k, v = (nn.functional.linear(normed, w[r], b[r]).float() for r in rows[1:])  # [B, T, d] each
    weights = torch.softmax(q @ k.transpose(1, 2) / d ** 0.5, -1)  # [B, 1, T]
    values = v @ _out_weight(attn)[:, head].float().T  # [B, T, D]: each token's value through W_O
    return _layer_scale(block.ls_1, weights.transpose(1, 2) * values).float()
