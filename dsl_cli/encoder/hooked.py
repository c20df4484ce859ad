"""`HookedEncoder`: a vision transformer opened up at its readout position (DESIGN.md sections 3 and 7).

Any ViT of open_clip, timm or transformers that `dsl_cli.encoder.families` covers: each family's adapter shows
the blocks as canonical parts (norms, q/k/v/out weights, LayerScale gammas, MLP), the token embedding and the
readout; everything here is computed over those parts. The readout position is the class token (CLS readout)
or the mean over patch tokens (mean readout); attention pooling is not a function of one position, so its
steering and Diffusion Lens take the hooked path (`EncoderCache.exact` says which).

Shapes: B images, T tokens (CLS + patches), L blocks, H heads, D residual width, d = D / H head width,
E embedding width, K components.

The cache is built in one batched pass through the blocks' own submodules and weights: each block's
attention is computed once, from `attn.in_proj_*` and `attn.out_proj`, and gives both the block's output at
every token and the per-head writes at the CLS position (so the cache costs one forward pass, not one and a
recomputation of every key and value). The DSL embeddings then follow in closed form,
`R(x_L + delta(c))`, for all components at once. `steer_hooked` is the slow reference: a real forward pass
with forward hooks, used as the test oracle and by `lens.verify`. `ablate_hooked` removes heads' and MLPs'
writes in a real forward pass (no patching: everything downstream recomputes), for the interventional
studies (`dsl_cli.studies`).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Callable, ClassVar, Iterator, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from dsl_cli.components import READS, Component, parse_component
from dsl_cli.devices import Placed
from dsl_cli.encoder.families import BlockParts, family_of, open_clip_parts

if TYPE_CHECKING:
    from open_clip.transformer import ResidualAttentionBlock

ComponentLike = Union[str, Component]
STEER_MODES = ("add", "scale", "norm")
ABLATIONS = ("zero", "mean")

# Hook points of every block, in the order their hooks fire within the block (TransformerLens names). Each sees
# all tokens: hook_resid_pre, hook_attn_out, hook_resid_mid, hook_mlp_out, hook_resid_post [B, T, D];
# attn.hook_result [B, T, H, D] (head h's write, LayerScale included, without the output bias).
HOOK_POINTS = ("hook_resid_pre", "attn.hook_result", "hook_attn_out", "hook_resid_mid", "hook_mlp_out",
               "hook_resid_post")
CACHE_ONLY_POINTS = ("hook_attn_bias",)  # in the cache, not a place to hook
# The order `hooks` attaches a block's points in (they still fire in HOOK_POINTS order): hook_mlp_out before
# hook_resid_mid, whose edit is carried on by a hook on the MLP's output that must run after a hook_mlp_out
# function, so that this one sees the MLP's own write.
_ATTACH_ORDER = ("hook_resid_pre", "attn.hook_result", "hook_attn_out", "hook_mlp_out", "hook_resid_mid",
                 "hook_resid_post")


@dataclass(frozen=True)
class HookPoint:
    """A named place in the forward pass: `blocks.{layer}.{point}`. Hook functions get it as their second
    argument (as TransformerLens passes its HookPoint), so one function can serve several points."""

    layer: int
    point: str

    @property
    def name(self) -> str:
        return f"blocks.{self.layer}.{self.point}"


HookFn = Callable[[Tensor, HookPoint], Optional[Tensor]]  # (activation, hook) -> replacement, or None to keep it


def parse_hook_name(name: str, n_layers: int, points: Sequence[str] = HOOK_POINTS + CACHE_ONLY_POINTS) -> HookPoint:
    """`blocks.3.hook_mlp_out` -> HookPoint(3, "hook_mlp_out"); a KeyError naming the valid forms otherwise."""
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blocks" and parts[1].isdigit() and parts[2] in points:
        if int(parts[1]) < n_layers:
            return HookPoint(int(parts[1]), parts[2])
    raise KeyError(f"no hook point {name!r}: use blocks.<layer 0..{n_layers - 1}>.<{' | '.join(points)}>")


class only_heads:  # noqa: N801 (used like a function: only_heads([1, 3], fn))
    """Wraps an `attn.hook_result` function so that only these heads' writes are computed and passed
    ([B, T, len(heads), D]): all heads at all tokens are large (0.9 GB per 32 bigG images)."""

    def __init__(self, heads: Sequence[int], fn: HookFn):
        self.heads, self.fn = list(heads), fn

    def __call__(self, activation: Tensor, hook: HookPoint) -> Optional[Tensor]:
        return self.fn(activation, hook)


@dataclass
class EncoderCache:
    """What one pass records, at the CLS position only (5 MB per image for bigG, not 1.3 GB).

    resid        [B, L+1, D]  x_0 .. x_L (residual stream before block 0, after each block)
    resid_mid    [B, L, D]    x_{l,mid}, after each attention sub-block
    head_writes  [B, L, H, D] a_{l,h}, LayerScale included
    attn_bias    [B, L, D]    the attention output bias (LayerScale included): sum_h a_{l,h} + attn_bias
                              is the attention sub-block's output
    mlp_writes   [B, L, D]    m_l, LayerScale included
    embeds       [B, E]       the image embedding; equals visual(pixels)

    With a mean readout every [B, ..., D] field holds the mean over patch tokens instead of the CLS row (the
    component's mean write, exact: the readout sees the mean). `readout` names the readout (cls, mean, map) and
    `exact` whether the lenses' closed form holds; where it does not (attention pooling), `pixels` keeps the
    batch for the hooked path and `stream_embeds` [B, L+1, E] / `mid_embeds` [B, L, E] hold the readout of
    the whole residual stream (all tokens) after each block, for the Diffusion Lens.
    """

    resid: Tensor
    resid_mid: Tensor
    head_writes: Tensor
    attn_bias: Tensor
    mlp_writes: Tensor
    embeds: Tensor
    # a CLS readout's cache holds the tensors above alone; `ReadoutCache` sets these for the other readouts
    readout = "cls"
    exact = True
    pixels: ClassVar[Optional[Tensor]] = None
    stream_embeds: ClassVar[Optional[Tensor]] = None
    mid_embeds: ClassVar[Optional[Tensor]] = None

    def to(self, *args, **kwargs) -> "EncoderCache":
        """A copy with every tensor moved/cast like `Tensor.to` (e.g. `cache.to("cpu")`)."""
        return type(self)(**{f.name: _moved(getattr(self, f.name), *args, **kwargs) for f in fields(self)})

    def __getitem__(self, name: str) -> Tensor:
        """TransformerLens names, at the CLS position: `blocks.{l}.hook_resid_pre`, `.hook_resid_mid`,
        `.hook_mlp_out`, `.hook_resid_post`, `.hook_attn_out` [B, D], `blocks.{l}.attn.hook_result` [B, H, D],
        `blocks.{l}.hook_attn_bias` [B, D]; `embeds` [B, E]. `hook_embed` is the old name of
        `blocks.0.hook_resid_pre`."""
        if name in ("embeds", "hook_embed"):
            return self.embeds if name == "embeds" else self.resid[:, 0]
        try:
            point = parse_hook_name(name, self.mlp_writes.shape[1])
        except KeyError:
            raise KeyError(f"no cached tensor named {name!r}") from None
        if point.point == "hook_attn_bias":
            return self.attn_bias[:, point.layer]
        if point.point == "hook_attn_out":  # the heads' writes and the output bias, summed
            return self.head_writes[:, point.layer].sum(1) + self.attn_bias[:, point.layer]
        read = next(r for r in READS.values() if r.point == point.point)
        return getattr(self, read.field)[:, point.layer + read.offset]


@dataclass
class ReadoutCache(EncoderCache):
    """The cache of a mean or attention-pooled readout (see `EncoderCache`)."""

    readout: str = "mean"
    exact: bool = True
    pixels: Optional[Tensor] = None
    stream_embeds: Optional[Tensor] = None
    mid_embeds: Optional[Tensor] = None


def _moved(value, *args, **kwargs):
    return value.to(*args, **kwargs) if isinstance(value, Tensor) else value


@dataclass
class MeanWrites:
    """Mean writes for mean ablation: every head's and MLP's write averaged over images AND token positions
    (one vector per component, so the replacement carries no information about the image or the position).

    heads  [L, H, D]  LayerScale included, without the attention output bias (as `head_writes`)
    mlps   [L, D]     LayerScale included
    tokens            how many (image, token) rows were averaged
    """

    heads: Tensor
    mlps: Tensor
    tokens: int


def head_writes(
    block: Union[ResidualAttentionBlock, BlockParts], queries: Tensor, keys: Tensor,
    heads: Optional[Sequence[int]] = None,
) -> Tensor:
    """Per-head attention writes, recomputed from the block's own weights (open_clip's fused attention
    never exposes them).

    queries [B, Tq, D] and keys [B, T, D] are ln_1 outputs (the query rows and all rows).
    Returns [B, Tq, H, D]: head h's share of `ls_1(attn(...))` without the output bias, so that
    the sum over h plus the (LayerScaled) output bias is the attention sub-block's output at those rows.
    `heads` (indices) keeps only those heads -> [B, Tq, len(heads), D]; the attention itself is then
    computed for them alone (all-token writes of every head are large: 0.9 GB per 32 bigG images).
    """
    parts = block if isinstance(block, BlockParts) else open_clip_parts(block)
    w_q, w_k, w_v = parts.qkv_weight.chunk(3)
    b_q, b_k, b_v = parts.qkv_bias.chunk(3) if parts.qkv_bias is not None else (None,) * 3
    q, k, v = (_split(parts, nn.functional.linear(x, w, b))
               for x, w, b in ((queries, w_q, b_q), (keys, w_k, b_k), (keys, w_v, b_v)))
    w_o = parts.out_by_head()
    if heads is not None:
        picked = torch.as_tensor(heads, dtype=torch.long, device=q.device)
        q, k, v, w_o = q[:, picked], k[:, picked], v[:, picked], w_o[:, picked]
    z = nn.functional.scaled_dot_product_attention(q, k, v)  # [B, H, Tq, d]
    writes = torch.einsum("bhqe,dhe->bqhd", z, w_o)
    return _gamma(writes, parts.gamma1)


def attention_and_pooled_head_writes(
    parts: BlockParts, normed: Tensor, pool: Callable[[Tensor], Tensor]
) -> tuple[Tensor, Tensor]:
    """The attention sub-block computed once, from the block's own weights: normed [B, T, D] (norm1 output)
    -> (its output `g1 * attn(normed)` at every token [B, T, D], the per-head writes at the readout position
    [B, H, D] as `head_writes` gives them: at the CLS query, or their mean over the pooled queries, which is
    the attention-weighted values' mean through W_O). The same products as the libraries' fused attention, so
    the block output agrees with theirs to round-off and the cache pays for no second pass over keys and values.
    `pool` maps [B, T, ...] to [B, ...] (the family's readout position)."""
    q, k, v = parts.qkv(normed)
    z = nn.functional.scaled_dot_product_attention(q, k, v)  # [B, H, T, d]
    out = parts.attn_output(z)
    pooled_writes = torch.einsum("bhe,dhe->bhd", pool(z.transpose(1, 2)), parts.out_by_head())
    return out, _gamma(pooled_writes, parts.gamma1)


def _split(parts: BlockParts, x: Tensor) -> Tensor:
    """[B, T, H d] -> [B, H, T, d]."""
    return x.unflatten(-1, (parts.n_heads, parts.d_head)).transpose(1, 2)


def _gamma(x: Tensor, gamma: Optional[Tensor]) -> Tensor:
    return x if gamma is None else x * gamma


def _split_heads(attn: nn.MultiheadAttention, x: Tensor) -> Tensor:
    """[B, T, D] -> [B, H, T, d]."""
    return x.unflatten(-1, (attn.num_heads, attn.embed_dim // attn.num_heads)).transpose(1, 2)


def _out_weight(attn: nn.MultiheadAttention) -> Tensor:
    """The output projection split by head: [D, H, d]."""
    return attn.out_proj.weight.unflatten(1, (attn.num_heads, attn.embed_dim // attn.num_heads))


def steering_delta(write: Tensor, final_resid: Tensor, mode: str, alpha: float) -> Tensor:
    """What steering adds to the residual stream: write [..., D], final_resid [..., D] (broadcastable)
    -> [..., D]. add: alpha*c; scale: (alpha-1)*c; norm: alpha*|x_L|*c/|c| (norms in fp32)."""
    _check_mode(mode)
    if mode == "add":
        return alpha * write
    if mode == "norm":
        c = write.float()
        size = final_resid.float().norm(dim=-1, keepdim=True)
        # a write of exactly zero stays zero instead of becoming NaN
        unit = c / c.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        return (alpha * size * unit).to(write.dtype)
    return (alpha - 1.0) * write  # scale


def _check_ablation(how: str) -> None:
    if how not in ABLATIONS:
        raise ValueError(f"unknown ablation {how!r}: use one of {', '.join(ABLATIONS)}")


def _check_mode(mode: str) -> None:
    if mode not in STEER_MODES:
        raise ValueError(f"unknown steering mode {mode!r}: use one of {', '.join(STEER_MODES)}")


def _family_property(name: str, doc: str) -> property:
    """A read-only attribute of the encoder that is its family's (`families.py`) attribute `name`."""
    return property(lambda self: getattr(self.family, name), doc=doc)


class HookedEncoder(Placed, nn.Module):
    """Wraps a vision transformer of open_clip, timm or transformers (`dsl_cli.encoder.families`): pre-norm
    blocks, LayerScale, register tokens, any activation, width, depth or patch size; a CLS, mean-pooled or
    attention-pooled readout. The wrapped module is used as it is and left unmodified."""

    def __init__(self, visual: nn.Module):
        super().__init__()
        family = family_of(visual)
        self.visual = visual.eval()
        self.__dict__["family"] = family  # not a submodule: it holds no parameters of its own

    # ---- shape and placement: the family's (`families.py`) -----------------------------------------
    blocks = _family_property("blocks", "the blocks, in order")
    n_heads = _family_property("n_heads", "H: heads per layer")
    d_model = _family_property("d_model", "D: the residual stream's width")
    d_embed = _family_property("d_embed", "E: the embedding's width (after the readout)")
    image_size = _family_property("image_size", "side of the (square) input image in pixels")
    placement = _family_property("placement", "a tensor on the encoder's device and dtype")
    n_tokens = _family_property("n_tokens", "T: the tokens of the residual stream (class, register and "
                                            "distillation tokens, then the patches)")
    d_mlp = _family_property("d_mlp", "the MLP's hidden width")
    readout_kind = _family_property("readout", "how the embedding is read from the final residual: cls, mean "
                                               "(over patch tokens) or map")
    exact = _family_property("exact", "whether the embedding is a function of the residual at the readout "
                                      "position (closed-form lenses); False for attention pooling, whose "
                                      "steering and Diffusion Lens take the hooked path")

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    @property
    def d_head(self) -> int:
        return self.family.parts(0).d_head

    @property
    def steering_path(self) -> str:
        return "closed form" if self.exact else "hooked"

    @property
    def classifier(self) -> Optional[nn.Module]:
        """The model's own classifier head on the embedding (logits = classifier(embedding)), or None."""
        return self.family.classifier

    def block_parts(self, layer: int) -> BlockParts:
        """Block `layer` as canonical parts (norms, q/k/v/out weights, LayerScale gammas, MLP)."""
        return self.family.parts(layer)

    # ---- the cache -----------------------------------------------------------------------------
    @torch.no_grad()
    def run_with_cache(self, pixels: Tensor) -> EncoderCache:
        """pixels [B, 3, S, S] (preprocessed) -> EncoderCache, in one batched pass.

        Peak extra memory is one layer's all-token activations: only the readout position's rows are kept.
        """
        family = self.family
        pixels = pixels.to(self.device, self.dtype)
        pool = family.pool
        x = family.tokens(pixels)  # [B, T, D]
        streams = [] if family.exact else [x]  # all-token residuals for a readout that needs them
        mids = []
        # pooled rows are cloned: a view would keep each layer's whole [B, T, D] tensor alive
        resid, resid_mid, heads, biases, mlps = [pool(x).clone()], [], [], [], []
        for layer in range(self.n_layers):
            parts = family.parts(layer)
            attn_out, pooled_writes = attention_and_pooled_head_writes(parts, parts.norm1(x), pool)
            x = x + attn_out
            heads.append(pooled_writes)
            biases.append(parts.attn_bias().expand_as(x[:, 0]))
            resid_mid.append(pool(x).clone())
            if not family.exact:
                mids.append(family.readout_tokens(x))
            mlp_out = parts.mlp_write(x)
            mlps.append(pool(mlp_out).clone())
            x = x + mlp_out
            resid.append(pool(x).clone())
            if not family.exact:
                streams.append(x)
        tensors = dict(
            resid=torch.stack(resid, 1),
            resid_mid=torch.stack(resid_mid, 1),
            head_writes=torch.stack(heads, 1),
            attn_bias=torch.stack(biases, 1),
            mlp_writes=torch.stack(mlps, 1),
            embeds=family.readout_tokens(x),
        )
        if family.readout == "cls" and family.exact:
            return EncoderCache(**tensors)
        if family.exact:
            return ReadoutCache(**tensors, readout=family.readout)
        return ReadoutCache(**tensors, readout=family.readout, exact=False, pixels=pixels,
                            stream_embeds=torch.stack([family.readout_tokens(t) for t in streams], 1),
                            mid_embeds=torch.stack(mids, 1))

    # ---- lenses (closed form, batched) ---------------------------------------------------------
    @torch.no_grad()
    def readout(self, v: Tensor) -> Tensor:
        """R(v), e.g. ln_post(v) @ proj: [..., D] -> [..., E]; the embedding is R(x_L at the readout position).
        An attention-pooled readout is not a function of one vector: NotImplementedError."""
        return self.family.readout_vector(v.to(self.device, self.dtype))

    def component_writes(self, cache: EncoderCache, components: Sequence[ComponentLike]) -> Tensor:
        """[B, K, D]: head writes a_{l,h}, MLP writes m_l, residuals x_{l+1} (label `L{l}`), x_{l,mid}
        (`L{l}mid`), x_0 (`embed`), at the readout position."""
        return torch.stack([self._vector(cache, self._parse(c)) for c in components], 1)

    def diffusion_lens(
        self, cache: EncoderCache, layers: Sequence[Union[int, ComponentLike]], mid: bool = False
    ) -> Tensor:
        """Diffusion Lens over the residual stream -> [B, K, E]: layer l (or `L{l}`) reads x_{l+1}, the
        residual after block l; `embed` reads x_0. mid=True reads x_{l,mid} instead (no `embed`)."""
        picked = [self._parse(f"L{l}" if isinstance(l, int) else l) for l in layers]
        for c in picked:
            if c.kind not in ("resid", "embed") or (mid and c.kind == "embed"):
                raise ValueError(f"the diffusion lens reads residual-stream labels (L<layer>, embed), not {c.label}")
        if not cache.exact:  # the readout of every token's residual, recorded by run_with_cache
            if mid:
                return cache.mid_embeds[:, [c.layer for c in picked]]
            return cache.stream_embeds[:, [c.layer + 1 for c in picked]]
        if mid:
            return self.readout(cache.resid_mid[:, [c.layer for c in picked]])
        return self.readout(cache.resid[:, [c.layer + 1 for c in picked]])

    def direct(self, cache: EncoderCache, components: Sequence[ComponentLike]) -> Tensor:
        """The naive submodule lens R(write) -> [B, K, E] (the residual stream's labels read as the Diffusion
        Lens does)."""
        parsed = [self._parse(c) for c in components]
        if not cache.exact:
            if any(c.kind in ("head", "mlp") for c in parsed):
                raise NotImplementedError(
                    f"the {cache.readout} readout pools every token: a write alone has no readout (use lens=steering)")
            return torch.stack([self.diffusion_lens(cache, [c], mid=c.kind == "resid_mid")[:, 0] for c in parsed], 1)
        return self.readout(self.component_writes(cache, parsed))

    def steer(
        self, cache: EncoderCache, components: Sequence[ComponentLike], mode: str = "norm", alpha: float = 2.0
    ) -> Tensor:
        """DSL, closed form: R(x_L + delta(c)) for each head/MLP c -> [B, K, E] (one norm and matmul). With a
        mean readout x_L and c are the means over patch tokens (norm mode: alpha |mean x_L| c / |c|, added at
        every token). Where the readout is not exact (attention pooling) the hooked path gives the same
        quantity from the batch's pixels kept in the cache (`steer_tokens`)."""
        parsed = [self._parse(c, steerable=True) for c in components]
        _check_mode(mode)
        if not cache.exact:
            return self.steer_tokens(cache.pixels, parsed, mode, alpha)
        writes = self.component_writes(cache, parsed)  # [B, K, D]
        final = cache.resid[:, -1:]  # [B, 1, D]
        return self.readout(final + steering_delta(writes, final, mode, alpha))

    @torch.no_grad()
    def steer_tokens(
        self, pixels: Tensor, components: Sequence[ComponentLike], mode: str = "norm", alpha: float = 2.0
    ) -> Tensor:
        """DSL through the hooked path, batched over components -> [B, K, E]: with every later sub-block patched
        to its clean output, the final residual at each token t is x_L[t] + delta(c_t), so one clean pass
        gives x_L at every token and a second (hooked, unmodified) pass reads each component's write at every
        token as it is computed and applies the library's own readout head to x_L + delta. Norm mode is
        per token (alpha |x_L[t]| c_t / |c_t|), or pooled for a mean readout as in `steer`."""
        parsed = [self._parse(c, steerable=True) for c in components]
        _check_mode(mode)
        pixels = pixels.to(self.device, self.dtype)
        final_name = f"blocks.{self.n_layers - 1}.hook_resid_post"
        clean: dict[str, Tensor] = {}
        self.run_with_hooks(pixels, {final_name: _recorder(clean)})
        final = clean[final_name]  # [B, T, D]
        out = torch.empty(len(pixels), len(parsed), self.d_embed, device=self.device, dtype=self.dtype)
        family = self.family

        def steered(write: Tensor) -> Tensor:  # write [B, T, D] -> [B, E]
            if mode == "norm" and family.readout == "mean":
                delta = steering_delta(family.pool(write)[:, None], family.pool(final)[:, None], mode, alpha)
            else:
                delta = steering_delta(write, final, mode, alpha)
            return family.readout_tokens(final + delta)

        hooks: list[tuple[str, HookFn]] = []
        for layer in sorted({c.layer for c in parsed}):
            heads = [(k, c.head) for k, c in enumerate(parsed) if c.layer == layer and c.kind == "head"]
            mlps = [k for k, c in enumerate(parsed) if c.layer == layer and c.kind == "mlp"]
            if heads:
                def at_heads(writes: Tensor, hook: HookPoint, heads=heads) -> None:
                    for j, (k, _) in enumerate(heads):
                        out[:, k] = steered(writes[:, :, j])

                hooks.append((f"blocks.{layer}.attn.hook_result", only_heads([h for _, h in heads], at_heads)))
            if mlps:
                def at_mlp(write: Tensor, hook: HookPoint, mlps=mlps) -> None:
                    for k in mlps:
                        out[:, k] = steered(write)

                hooks.append((f"blocks.{layer}.hook_mlp_out", at_mlp))
        self.run_with_hooks(pixels, hooks)
        return out

    # ---- named hook points -----------------------------------------------------------------------
    @contextmanager
    def hooks(self, fns: Union[dict[str, HookFn], Sequence[tuple[str, HookFn]]]) -> Iterator[None]:
        """Hook functions keyed by hook name (`blocks.1.hook_mlp_out`), active for the passes run inside
        the block and removed on exit, even after an error. A function gets (activation, HookPoint) and
        returns the activation's replacement, or None to leave it as it is. Hooks fire in block order and,
        within a block, in `HOOK_POINTS` order; several on one point fire in the order given."""
        pairs = list(fns.items()) if isinstance(fns, dict) else list(fns)
        points = [(parse_hook_name(name, self.n_layers, HOOK_POINTS), fn) for name, fn in pairs]
        points.sort(key=lambda pair: _ATTACH_ORDER.index(pair[0].point))  # stable: the given order within a point
        handles: list[RemovableHandle] = []
        try:
            for point, fn in points:
                handles += _attach(self.family.parts(point.layer), point.point, _bound(fn, point))
            yield
        finally:
            for handle in handles:
                handle.remove()

    @torch.no_grad()
    def run_with_hooks(self, pixels: Tensor, fns: Union[dict[str, HookFn], Sequence[tuple[str, HookFn]]]) -> Tensor:
        """The library's own forward with `hooks(fns)` active: pixels [B, 3, S, S] -> [B, E]."""
        with self.hooks(fns):
            return self._forward(pixels.to(self.device, self.dtype))

    # ---- the hooked reference ------------------------------------------------------------------
    @torch.no_grad()
    def steer_hooked(
        self, pixels: Tensor, component: ComponentLike, mode: str = "norm", alpha: float = 2.0, patch: bool = True
    ) -> Tensor:
        """Reference DSL in a real `visual(pixels)` pass -> [B, E].

        A clean pass records every `hook_attn_out`/`hook_mlp_out` and the final residual (all tokens). The
        steered pass adds delta to the target's write at every token; with patch=True every later sub-block
        output (the same layer's MLP when a head is steered, all later attention and MLP) is replaced by its
        clean value, so only the target's direct effect reaches the output.
        """
        target = self._parse(component, steerable=True)
        _check_mode(mode)  # before any pass
        pixels = pixels.to(self.device, self.dtype)
        outs = [f"blocks.{l}.{p}" for l in range(self.n_layers) for p in ("hook_attn_out", "hook_mlp_out")]
        final_name = f"blocks.{self.n_layers - 1}.hook_resid_post"
        clean: dict[str, Tensor] = {}
        self.run_with_hooks(pixels, {name: _recorder(clean) for name in outs + [final_name]})
        steered = dict(self._steering_hooks(target, clean[final_name], mode, alpha))
        if patch:
            first = outs.index(target.hook_name if target.kind == "mlp" else f"blocks.{target.layer}.hook_attn_out")
            steered.update({name: (lambda x, hook: clean[hook.name]) for name in outs[first + 1:]})
        return self.run_with_hooks(pixels, list(steered.items()))

    def _steering_hooks(self, target: Component, final: Tensor, mode: str, alpha: float) -> list[tuple[str, HookFn]]:
        """The hooks that steer the target's write c at every token (final [B, T, D])."""

        def steer_write(write: Tensor, c: Tensor) -> Tensor:
            # The definitions of DESIGN.md section 3 written out again rather than through `steering_delta`:
            # a reference that shared the closed form's delta would agree with it even when that is wrong.
            if mode == "scale":  # the write c becomes alpha * c
                return write - c + alpha * c
            if mode == "add":
                return write + alpha * c
            size = final.float().norm(dim=-1, keepdim=True)
            if self.family.readout == "mean":  # the readout sees the means over patch tokens
                first = self.family.n_prefix
                c = c[:, first:].mean(1, keepdim=True)
                size = final[:, first:].float().mean(1, keepdim=True).norm(dim=-1, keepdim=True)
            unit = nn.functional.normalize(c.float(), dim=-1)  # a zero write stays zero
            return write + (alpha * size * unit).to(write.dtype)

        if target.kind == "mlp":
            return [(target.hook_name, lambda out, hook: steer_write(out, out))]
        seen: dict[str, Tensor] = {}  # the head's write, read at attn.hook_result, steered at hook_attn_out
        return [(target.hook_name, lambda writes, hook: seen.__setitem__("c", writes[:, :, target.head])),
                (f"blocks.{target.layer}.hook_attn_out", lambda out, hook: steer_write(out, seen["c"]))]

    # ---- ablation in a real forward pass (interventional studies) -------------------------------
    @torch.no_grad()
    def ablate_hooked(
        self,
        pixels: Tensor,
        components: Union[Sequence[ComponentLike], Sequence[Sequence[ComponentLike]]],
        how: str = "zero",
        means: Optional[MeanWrites] = None,
    ) -> Tensor:
        """A real `visual(pixels)` pass with heads'/MLPs' writes removed -> [B, E]. No patching: every
        later sub-block recomputes from the ablated stream (this measures total, not direct, effect).

        pixels [B, 3, S, S]. components: labels ablated together in every image (`["L3H1", "L2MLP"]`), or
        one such list per image (len B), so one batch can hold different ablations (e.g. every prefix
        of an order). how: `zero` removes the write at every token (a head's attention output bias stays,
        as when its W_O columns are zeroed; an MLP's output becomes zero, bias included); `mean` replaces
        it with the component's `means` write (default: `mean_writes(pixels)`, the mean over these images
        and all tokens).
        """
        _check_ablation(how)
        pixels = pixels.to(self.device, self.dtype)
        head_mask, mlp_mask = self._ablation_masks(components, len(pixels))
        if how == "zero":
            means = None  # given for a mean ablation elsewhere in the same study: a zero ablation puts nothing back
        elif means is None:
            means = self.mean_writes(pixels)
        return self.run_with_hooks(pixels, self._ablation_hooks(head_mask, mlp_mask, means))

    @torch.no_grad()
    def mean_writes(self, pixels: Tensor, batch_size: Optional[int] = None) -> MeanWrites:
        """Every head's and MLP's write averaged over the images and all token positions (float32), from
        clean passes in batches of `batch_size` images (default: all at once). pixels [B, 3, S, S]."""
        heads = torch.zeros(self.n_layers, self.n_heads, self.d_model, device=self.device)
        mlps = torch.zeros(self.n_layers, self.d_model, device=self.device)
        seen = {"tokens": 0}

        def add_heads(writes: Tensor, hook: HookPoint) -> None:
            heads[hook.layer] += writes.float().sum((0, 1))
            seen["tokens"] += writes.shape[0] * writes.shape[1] if hook.layer == 0 else 0

        def add_mlp(out: Tensor, hook: HookPoint) -> None:
            mlps[hook.layer] += out.float().sum((0, 1))

        hooks = [(f"blocks.{l}.{p}", fn) for l in range(self.n_layers)
                 for p, fn in (("attn.hook_result", add_heads), ("hook_mlp_out", add_mlp))]
        step = batch_size or len(pixels)
        for start in range(0, len(pixels), step):
            self.run_with_hooks(pixels[start:start + step], hooks)
        tokens = seen["tokens"]
        return MeanWrites(heads=heads / tokens, mlps=mlps / tokens, tokens=tokens)

    # ---- plain embeddings and the negative embedding -------------------------------------------
    @torch.no_grad()
    def embed(self, pixels: Tensor) -> Tensor:
        """pixels [B, 3, S, S] -> [B, E]: open_clip's own forward, nothing hooked."""
        return self._forward(pixels.to(self.device, self.dtype))

    @torch.no_grad()
    def zero_embed(self) -> Tensor:
        """[1, E]: the encoder on an all-zeros image in normalised pixel space (the decoder's negative)."""
        side = self.image_size
        return self._forward(torch.zeros(1, 3, side, side, device=self.device, dtype=self.dtype))

    # ---- helpers -------------------------------------------------------------------------------
    def _forward(self, pixels: Tensor) -> Tensor:
        """The library's own forward -> [B, E] (the pooled embedding, also when the tower returns tokens)."""
        return self.family.forward(pixels)

    def _project(self, v: Tensor) -> Tensor:
        return self.family.project(v)

    def _parse(self, component: ComponentLike, steerable: bool = False) -> Component:
        c = parse_component(component)
        allowed = ("head", "mlp") if steerable else ("head", "mlp", "resid", "resid_mid", "embed")
        if c.kind not in allowed:
            raise ValueError(f"{c.label}: only heads and MLPs can be steered or ablated")
        if c.kind != "embed" and not 0 <= c.layer < self.n_layers:
            raise ValueError(f"{c.label}: layer out of range 0..{self.n_layers - 1}")
        if c.kind == "head" and not 0 <= c.head < self.n_heads:
            raise ValueError(f"{c.label}: head out of range 0..{self.n_heads - 1}")
        return c

    @staticmethod
    def _vector(cache: EncoderCache, c: Component) -> Tensor:
        """[B, D]: the cached CLS vector a component label names (the `READS` table)."""
        read = READS[c.kind]
        vector = getattr(cache, read.field)[:, max(c.layer, 0) + read.offset]
        return vector[:, c.head] if c.kind == "head" else vector

    def _ablation_masks(
        self, components: Union[Sequence[ComponentLike], Sequence[Sequence[ComponentLike]]], batch: int
    ) -> tuple[Tensor, Tensor]:
        """Which writes to remove in which image: head mask [B, L, H] and MLP mask [B, L] (1 = ablate)."""
        flat = len(components) == 0 or isinstance(components[0], (str, Component))
        per_image = [components] * batch if flat else components
        if len(per_image) != batch:
            raise ValueError(f"{len(per_image)} ablation sets for {batch} images: give one per image, or one list")
        head_mask = torch.zeros(batch, self.n_layers, self.n_heads, device=self.device, dtype=self.dtype)
        mlp_mask = torch.zeros(batch, self.n_layers, device=self.device, dtype=self.dtype)
        for b, chosen in enumerate(per_image):
            for c in (self._parse(label, steerable=True) for label in chosen):
                if c.kind == "head":
                    head_mask[b, c.layer, c.head] = 1
                else:
                    mlp_mask[b, c.layer] = 1
        return head_mask, mlp_mask

    def _ablation_hooks(
        self, head_mask: Tensor, mlp_mask: Tensor, means: Optional[MeanWrites]
    ) -> list[tuple[str, HookFn]]:
        """Hooks that turn each ablated write w into its replacement r (0, or the mean write):
        output - mask * (w - r), per image. Images whose mask is 0 at a layer pass through unchanged."""
        hooks: list[tuple[str, HookFn]] = []
        for layer in range(self.n_layers):
            picked = head_mask[:, layer].any(0).nonzero().flatten().tolist()  # heads ablated in any image
            if picked:
                hooks += self._remove_heads(layer, picked, head_mask[:, layer, picked], means)
            if mlp_mask[:, layer].any():
                mask = mlp_mask[:, layer, None, None]  # [B, 1, 1]
                replacement = 0.0 if means is None else means.mlps[layer].to(self.dtype)
                hooks.append((f"blocks.{layer}.hook_mlp_out",
                              lambda out, hook, mask=mask, r=replacement: out - mask * (out - r)))
        return hooks

    def _remove_heads(
        self, layer: int, heads: list[int], mask: Tensor, means: Optional[MeanWrites]
    ) -> list[tuple[str, HookFn]]:
        """One block's head ablation: mask [B, len(heads)]. The heads' writes at every token are read at
        attn.hook_result and subtracted (less their replacement) from the block's hook_attn_out."""
        replacement = 0.0 if means is None else means.heads[layer, heads].to(self.dtype)  # [h, D]
        seen: dict[str, Tensor] = {}
        return [(f"blocks.{layer}.attn.hook_result", only_heads(heads, lambda w, hook: seen.__setitem__("w", w))),
                (f"blocks.{layer}.hook_attn_out",
                 lambda out, hook: out - torch.einsum("bh,bthd->btd", mask, seen["w"] - replacement))]


def _attach(parts: BlockParts, point: str, call: Callable[[Tensor], Tensor]) -> list[RemovableHandle]:
    """Torch hooks on a block's public submodules that pass the activation at `point` through `call` (its value
    in, its replacement out). Every supported block computes x + g1 * attn(norm1(x)), then
    x + g2 * mlp(norm2(x)); `parts.attn_out` / `parts.mlp_out` are the modules whose output is each write
    (open_clip's and timm's LayerScales fire even as nn.Identity; a tuple output's first item is the write)."""
    if point == "hook_resid_pre":
        return [parts.block.register_forward_pre_hook(_replace_input(call), with_kwargs=True)]
    if point == "hook_resid_post":
        return [parts.block.register_forward_hook(lambda m, args, out: _replace_output(out, call))]
    if point in ("hook_attn_out", "hook_mlp_out"):
        module = parts.attn_out if point == "hook_attn_out" else parts.mlp_out
        return [module.register_forward_hook(lambda m, args, out: _replace_output(out, call))]
    if point == "hook_resid_mid":  # the MLP reads the new value, and the residual carries it on
        change: dict[str, Tensor] = {}

        def replace(m: nn.Module, args: tuple) -> tuple:
            new = call(args[0])
            change["d"] = new - args[0]
            return (new, *args[1:])

        return [parts.norm2.register_forward_pre_hook(replace),
                parts.mlp_out.register_forward_hook(
                    lambda m, args, out: _replace_output(out, lambda x: x + change.pop("d")))]
    normed: dict[str, Tensor] = {}  # attn.hook_result: per-head writes from the recorded norm1 output

    def edit(x: Tensor) -> Tensor:
        writes = head_writes(parts, normed["x"], normed["x"], heads=call.heads)
        new = call(writes)
        return x if new is writes else x + (new - writes).sum(2)

    return [parts.norm1.register_forward_hook(lambda m, args, out: normed.__setitem__("x", out)),
            parts.attn_out.register_forward_hook(lambda m, args, out: _replace_output(out, edit))]


def _replace_output(out, call: Callable[[Tensor], Tensor]):
    """A module's output with its tensor (the first item of a tuple) passed through `call`."""
    if isinstance(out, tuple):
        return (call(out[0]), *out[1:])
    return call(out)


def _replace_input(call: Callable[[Tensor], Tensor]):
    """A forward pre-hook (with kwargs) replacing a block's first input, given by position or as hidden_states."""

    def hook(module: nn.Module, args: tuple, kwargs: dict):
        if args:
            return (call(args[0]), *args[1:]), kwargs
        key = "hidden_states" if "hidden_states" in kwargs else next(iter(kwargs))
        return args, {**kwargs, key: call(kwargs[key])}

    return hook


def _recorder(store: dict) -> HookFn:
    """A hook function that stores the activation under its hook's name and leaves it unchanged."""

    def hook(activation: Tensor, point: HookPoint) -> None:
        store[point.name] = activation

    return hook


def _bound(fn: HookFn, point: HookPoint) -> Callable[[Tensor], Tensor]:
    """fn at `point` as a function of the activation alone, giving the activation back where fn gives None;
    `heads` tells the adapter which heads' writes to compute (None: all)."""

    def call(activation: Tensor) -> Tensor:
        out = fn(activation, point)
        return activation if out is None else out

    call.heads = getattr(fn, "heads", None)
    return call
