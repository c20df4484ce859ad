"""`HookedEncoder`: an open_clip `VisionTransformer` opened up at the CLS position (DESIGN.md section 3).

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
from typing import Callable, Iterator, Optional, Sequence, Union

import torch
from open_clip.transformer import LayerScale, ResidualAttentionBlock, VisionTransformer
from torch import Tensor, nn

from dsl_cli.components import Component, parse_component

ComponentLike = Union[str, Component]
STEER_MODES = ("add", "scale", "norm")
ABLATIONS = ("zero", "mean")


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
    """

    resid: Tensor
    resid_mid: Tensor
    head_writes: Tensor
    attn_bias: Tensor
    mlp_writes: Tensor
    embeds: Tensor

    def to(self, *args, **kwargs) -> "EncoderCache":
        """A copy with every tensor moved/cast like `Tensor.to` (e.g. `cache.to("cpu")`)."""
        return EncoderCache(**{f.name: getattr(self, f.name).to(*args, **kwargs) for f in fields(self)})

    def __getitem__(self, name: str) -> Tensor:
        """TransformerLens-style names: `hook_embed` [B,D], `blocks.{l}.attn.hook_result` [B,H,D],
        `blocks.{l}.hook_attn_bias`, `blocks.{l}.hook_resid_mid`, `blocks.{l}.hook_mlp_out`,
        `blocks.{l}.hook_resid_post` [B,D]; `embeds` [B,E]."""
        if name == "hook_embed":
            return self.resid[:, 0]
        if name == "embeds":
            return self.embeds
        parts = name.split(".")
        if len(parts) >= 3 and parts[0] == "blocks" and parts[1].isdigit():
            layer, rest = int(parts[1]), ".".join(parts[2:])
            by_name = {
                "attn.hook_result": lambda: self.head_writes[:, layer],
                "hook_attn_bias": lambda: self.attn_bias[:, layer],
                "hook_resid_mid": lambda: self.resid_mid[:, layer],
                "hook_mlp_out": lambda: self.mlp_writes[:, layer],
                "hook_resid_post": lambda: self.resid[:, layer + 1],
            }
            if rest in by_name and 0 <= layer < self.mlp_writes.shape[1]:
                return by_name[rest]()
        raise KeyError(f"no cached tensor named {name!r}")


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
    block: ResidualAttentionBlock, queries: Tensor, keys: Tensor, heads: Optional[Sequence[int]] = None
) -> Tensor:
    """Per-head attention writes, recomputed from the block's own weights (open_clip's fused attention
    never exposes them).

    queries [B, Tq, D] and keys [B, T, D] are ln_1 outputs (the query rows and all rows).
    Returns [B, Tq, H, D]: head h's share of `ls_1(attn(...))` without the output bias, so that
    the sum over h plus `attn_bias(block)` is the attention sub-block's output at those rows.
    `heads` (indices) keeps only those heads -> [B, Tq, len(heads), D]; the attention itself is then
    computed for them alone (all-token writes of every head are large: 0.9 GB per 32 bigG images).
    """
    attn = block.attn
    w_q, w_k, w_v = attn.in_proj_weight.chunk(3)
    b_q, b_k, b_v = attn.in_proj_bias.chunk(3)
    q, k, v = (_split_heads(attn, nn.functional.linear(x, w, b))
               for x, w, b in ((queries, w_q, b_q), (keys, w_k, b_k), (keys, w_v, b_v)))
    w_o = _out_weight(attn)
    if heads is not None:
        picked = torch.as_tensor(heads, dtype=torch.long, device=q.device)
        q, k, v, w_o = q[:, picked], k[:, picked], v[:, picked], w_o[:, picked]
    z = nn.functional.scaled_dot_product_attention(q, k, v)  # [B, H, Tq, d]
    writes = torch.einsum("bhqe,dhe->bqhd", z, w_o)
    return _layer_scale(block.ls_1, writes)


def attention_and_cls_head_writes(block: ResidualAttentionBlock, normed: Tensor) -> tuple[Tensor, Tensor]:
    """The attention sub-block computed once, from the block's own weights: normed [B, T, D] (ln_1 output)
    -> (its output `ls_1(attn(normed))` at every token [B, T, D], the per-head writes at the CLS query
    [B, H, D] as `head_writes` gives them). The same products as open_clip's fused attention, so the block
    output agrees with it to round-off and the cache pays for no second pass over the keys and values."""
    attn = block.attn
    q, k, v = (_split_heads(attn, x) for x in nn.functional.linear(normed, attn.in_proj_weight,
                                                                    attn.in_proj_bias).chunk(3, dim=-1))
    z = nn.functional.scaled_dot_product_attention(q, k, v)  # [B, H, T, d]
    out = nn.functional.linear(z.transpose(1, 2).flatten(2), attn.out_proj.weight, attn.out_proj.bias)
    cls_writes = torch.einsum("bhe,dhe->bhd", z[:, :, 0], _out_weight(attn))
    return _layer_scale(block.ls_1, out), _layer_scale(block.ls_1, cls_writes)


def _split_heads(attn: nn.MultiheadAttention, x: Tensor) -> Tensor:
    """[B, T, D] -> [B, H, T, d]."""
    return x.unflatten(-1, (attn.num_heads, attn.embed_dim // attn.num_heads)).transpose(1, 2)


def _out_weight(attn: nn.MultiheadAttention) -> Tensor:
    """The output projection split by head: [D, H, d]."""
    return attn.out_proj.weight.unflatten(1, (attn.num_heads, attn.embed_dim // attn.num_heads))


def attn_bias(block: ResidualAttentionBlock) -> Tensor:
    """[D]: the attention output bias as it reaches the residual stream (LayerScale included)."""
    return _layer_scale(block.ls_1, block.attn.out_proj.bias)


def _layer_scale(module: nn.Module, x: Tensor) -> Tensor:
    """Apply a LayerScale (or Identity) without calling the module, so that no forward hook fires."""
    return x * module.gamma if isinstance(module, LayerScale) else x


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


class HookedEncoder(nn.Module):
    """Wraps an open_clip `VisionTransformer` (pre-LN blocks, CLS pooling, LayerScale and any activation,
    width, depth or patch size). The wrapped module is used as it is and left unmodified."""

    def __init__(self, visual: VisionTransformer):
        super().__init__()
        _check_supported(visual)
        self.visual = visual.eval()

    # ---- shape and placement -------------------------------------------------------------------
    @property
    def blocks(self) -> nn.ModuleList:
        return self.visual.transformer.resblocks

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    @property
    def n_heads(self) -> int:
        return self.blocks[0].attn.num_heads

    @property
    def d_model(self) -> int:
        return self.visual.transformer.width

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads

    @property
    def d_embed(self) -> int:
        return self.d_model if self.visual.proj is None else self.visual.proj.shape[1]

    @property
    def image_size(self) -> int:
        """Side of the (square) input image in pixels."""
        return self.visual.image_size[0]

    @property
    def device(self) -> torch.device:
        return self.visual.class_embedding.device

    @property
    def dtype(self) -> torch.dtype:
        return self.visual.class_embedding.dtype

    # ---- the cache -----------------------------------------------------------------------------
    @torch.inference_mode()
    def run_with_cache(self, pixels: Tensor) -> EncoderCache:
        """pixels [B, 3, S, S] (preprocessed) -> EncoderCache, in one batched pass.

        Peak extra memory is one layer's all-token activations: only CLS rows are kept.
        """
        x = self.visual._embeds(pixels.to(self.device, self.dtype))  # [B, T, D]
        # CLS rows are cloned: a view would keep each layer's whole [B, T, D] tensor alive
        resid, resid_mid, heads, biases, mlps = [x[:, 0].clone()], [], [], [], []
        for block in self.blocks:
            attn_out, cls_writes = attention_and_cls_head_writes(block, block.ln_1(x))
            x = x + attn_out
            heads.append(cls_writes)
            biases.append(attn_bias(block).expand_as(x[:, 0]))
            resid_mid.append(x[:, 0].clone())
            mlp_out = block.ls_2(block.mlp(block.ln_2(x)))
            mlps.append(mlp_out[:, 0].clone())
            x = x + mlp_out
            resid.append(x[:, 0].clone())
        pooled, _ = self.visual._pool(x)
        return EncoderCache(
            resid=torch.stack(resid, 1),
            resid_mid=torch.stack(resid_mid, 1),
            head_writes=torch.stack(heads, 1),
            attn_bias=torch.stack(biases, 1),
            mlp_writes=torch.stack(mlps, 1),
            embeds=self._project(pooled),
        )

    # ---- lenses (closed form, batched) ---------------------------------------------------------
    @torch.inference_mode()
    def readout(self, v: Tensor) -> Tensor:
        """R(v) = ln_post(v) @ proj: [..., D] -> [..., E]."""
        return self._project(self.visual.ln_post(v.to(self.device, self.dtype)))

    def component_writes(self, cache: EncoderCache, components: Sequence[ComponentLike]) -> Tensor:
        """[B, K, D]: head writes a_{l,h}, MLP writes m_l, residuals x_{l+1} (label `L{l}`), x_{l,mid}
        (`L{l}mid`), x_0 (`embed`)."""
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
        if mid:
            return self.readout(cache.resid_mid[:, [c.layer for c in picked]])
        return self.readout(cache.resid[:, [c.layer + 1 for c in picked]])

    def direct(self, cache: EncoderCache, components: Sequence[ComponentLike]) -> Tensor:
        """The naive submodule lens R(write) -> [B, K, E]."""
        return self.readout(self.component_writes(cache, components))

    def steer(
        self, cache: EncoderCache, components: Sequence[ComponentLike], mode: str = "norm", alpha: float = 2.0
    ) -> Tensor:
        """DSL, closed form: R(x_L + delta(c)) for each head/MLP c -> [B, K, E] (one LayerNorm and matmul)."""
        parsed = [self._parse(c, steerable=True) for c in components]
        writes = self.component_writes(cache, parsed)  # [B, K, D]
        final = cache.resid[:, -1:]  # [B, 1, D]
        return self.readout(final + steering_delta(writes, final, mode, alpha))

    # ---- the hooked reference ------------------------------------------------------------------
    @torch.inference_mode()
    def steer_hooked(
        self, pixels: Tensor, component: ComponentLike, mode: str = "norm", alpha: float = 2.0, patch: bool = True
    ) -> Tensor:
        """Reference DSL in a real `visual(pixels)` pass -> [B, E].

        A clean pass records every `ls_1`/`ls_2` output and the final residual (all tokens). The steered
        pass adds delta to the target's write at every token; with patch=True every later sub-block output
        (the same layer's MLP when a head is steered, all later attention and MLP) is replaced by its clean
        value, so only the target's direct effect reaches the output. Hooks sit on `ls_1`/`ls_2`, which
        fire even as nn.Identity (hooks on `attn.out_proj` never fire: open_clip's attention is fused).
        """
        target = self._parse(component, steerable=True)
        _check_mode(mode)  # before any pass
        pixels = pixels.to(self.device, self.dtype)

        clean: dict[tuple[int, str], Tensor] = {}
        hooks = {(l, s): _recorder(clean, (l, s)) for l in range(self.n_layers) for s in ("ls_1", "ls_2")}
        hooks[(-1, "final")] = _recorder(clean, (-1, "final"))
        with self._hooks(hooks):
            self._forward(pixels)
        final = clean[(-1, "final")]

        def steer_write(write: Tensor, c: Tensor) -> Tensor:
            # The definitions of DESIGN.md section 3 written out again rather than through `steering_delta`:
            # a reference that shared the closed form's delta would agree with it even when that is wrong.
            if mode == "scale":  # the write c becomes alpha * c
                return write - c + alpha * c
            if mode == "add":
                return write + alpha * c
            unit = nn.functional.normalize(c.float(), dim=-1)  # a zero write stays zero
            return write + (alpha * final.float().norm(dim=-1, keepdim=True) * unit).to(write.dtype)

        steered: dict[tuple[int, str], Callable] = {}
        if target.kind == "head":
            block, normed = self.blocks[target.layer], {}
            steered[(target.layer, "ln_1")] = _recorder(normed, "x")
            steered[(target.layer, "ls_1")] = lambda m, i, out: steer_write(
                out, head_writes(block, normed["x"], normed["x"])[:, :, target.head]
            )
        else:
            steered[(target.layer, "ls_2")] = lambda m, i, out: steer_write(out, out)
        if patch:
            later = [(target.layer, "ls_2")] if target.kind == "head" else []
            later += [(l, s) for l in range(target.layer + 1, self.n_layers) for s in ("ls_1", "ls_2")]
            for key in later:
                steered[key] = lambda m, i, out, key=key: clean[key]
        with self._hooks(steered):
            return self._forward(pixels)

    # ---- ablation in a real forward pass (interventional studies) -------------------------------
    @torch.inference_mode()
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
        and all tokens). Hooks: ln_1 (records the block's normed input) and ls_1/ls_2 (edit the output).
        """
        _check_ablation(how)
        pixels = pixels.to(self.device, self.dtype)
        head_mask, mlp_mask = self._ablation_masks(components, len(pixels))
        if how == "mean" and means is None:
            means = self.mean_writes(pixels)
        with self._hooks(self._ablation_hooks(head_mask, mlp_mask, means)):
            return self._forward(pixels)

    @torch.inference_mode()
    def mean_writes(self, pixels: Tensor, batch_size: Optional[int] = None) -> MeanWrites:
        """Every head's and MLP's write averaged over the images and all token positions (float32), from
        clean passes in batches of `batch_size` images (default: all at once). pixels [B, 3, S, S]."""
        heads = torch.zeros(self.n_layers, self.n_heads, self.d_model, device=self.device)
        mlps = torch.zeros(self.n_layers, self.d_model, device=self.device)
        normed: dict[int, Tensor] = {}

        def add_heads(layer: int) -> Callable:
            def hook(module: nn.Module, inputs, output: Tensor) -> None:
                x = normed[layer]
                heads[layer] += head_writes(self.blocks[layer], x, x).float().sum((0, 1))

            return hook

        def add_mlp(layer: int) -> Callable:
            def hook(module: nn.Module, inputs, output: Tensor) -> None:
                mlps[layer] += output.float().sum((0, 1))

            return hook

        hooks: dict[tuple[int, str], Callable] = {}
        for layer in range(self.n_layers):
            hooks[(layer, "ln_1")] = _recorder(normed, layer)
            hooks[(layer, "ls_1")] = add_heads(layer)
            hooks[(layer, "ls_2")] = add_mlp(layer)
        tokens, step = 0, batch_size or len(pixels)
        with self._hooks(hooks):
            for start in range(0, len(pixels), step):
                chunk = pixels[start:start + step].to(self.device, self.dtype)
                self._forward(chunk)
                tokens += len(chunk) * normed[0].shape[1]
        return MeanWrites(heads=heads / tokens, mlps=mlps / tokens, tokens=tokens)

    # ---- plain embeddings and the negative embedding -------------------------------------------
    @torch.inference_mode()
    def embed(self, pixels: Tensor) -> Tensor:
        """pixels [B, 3, S, S] -> [B, E]: open_clip's own forward, nothing hooked."""
        return self._forward(pixels.to(self.device, self.dtype))

    @torch.inference_mode()
    def zero_embed(self) -> Tensor:
        """[1, E]: the encoder on an all-zeros image in normalised pixel space (the decoder's negative)."""
        side = self.visual.image_size
        return self._forward(torch.zeros(1, 3, *side, device=self.device, dtype=self.dtype))

    # ---- helpers -------------------------------------------------------------------------------
    def _forward(self, pixels: Tensor) -> Tensor:
        """open_clip's own forward -> [B, E] (the pooled embedding, also when the tower returns tokens)."""
        out = self.visual(pixels)
        return out[0] if isinstance(out, tuple) else out

    def _project(self, v: Tensor) -> Tensor:
        return v if self.visual.proj is None else v @ self.visual.proj

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
        """[B, D]: the cached CLS vector a component label names."""
        if c.kind == "head":
            return cache.head_writes[:, c.layer, c.head]
        if c.kind == "mlp":
            return cache.mlp_writes[:, c.layer]
        if c.kind == "resid_mid":
            return cache.resid_mid[:, c.layer]
        return cache.resid[:, c.layer + 1]  # resid L{l} is x_{l+1}; embed (layer -1) is x_0

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
    ) -> dict[tuple[int, str], Callable]:
        """Forward hooks that turn each ablated write w into its replacement r (0, or the mean write):
        output - mask * (w - r), per image. Images whose mask is 0 at a layer pass through unchanged."""
        hooks: dict[tuple[int, str], Callable] = {}
        for layer in range(self.n_layers):
            picked = head_mask[:, layer].any(0).nonzero().flatten().tolist()  # heads ablated in any image
            if picked:
                normed: dict = {}
                hooks[(layer, "ln_1")] = _recorder(normed, "x")
                hooks[(layer, "ls_1")] = self._remove_heads(layer, picked, head_mask[:, layer, picked], normed, means)
            if mlp_mask[:, layer].any():
                mask = mlp_mask[:, layer, None, None]  # [B, 1, 1]
                replacement = 0.0 if means is None else means.mlps[layer].to(self.dtype)
                hooks[(layer, "ls_2")] = lambda m, i, out, mask=mask, r=replacement: out - mask * (out - r)
        return hooks

    def _remove_heads(
        self, layer: int, heads: list[int], mask: Tensor, normed: dict, means: Optional[MeanWrites]
    ) -> Callable:
        """The ls_1 hook of one block: mask [B, len(heads)]; head writes at every token from the recorded
        ln_1 output."""
        block = self.blocks[layer]
        replacement = 0.0 if means is None else means.heads[layer, heads].to(self.dtype)  # [h, D]

        def hook(module: nn.Module, inputs, output: Tensor) -> Tensor:
            writes = head_writes(block, normed["x"], normed["x"], heads=heads)  # [B, T, h, D]
            return output - torch.einsum("bh,bthd->btd", mask, writes - replacement)

        return hook

    @contextmanager
    def _hooks(self, hooks: dict[tuple[int, str], Callable]) -> Iterator[None]:
        """Register forward hooks keyed (layer, submodule name); (-1, "final") hooks the transformer's
        output (the final residual, all tokens). All are removed on exit, even after an error."""
        handles = []
        try:
            for (layer, name), hook in hooks.items():
                module = self.visual.transformer if layer < 0 else getattr(self.blocks[layer], name)
                handles.append(module.register_forward_hook(hook))
            yield
        finally:
            for handle in handles:
                handle.remove()


def _recorder(store: dict, key) -> Callable:
    """A forward hook that stores the module's output under `key` and leaves it unchanged."""

    def hook(module: nn.Module, inputs, output: Tensor) -> None:
        store[key] = output

    return hook


def _check_supported(visual: nn.Module) -> None:
    """Raise NotImplementedError for towers the CLS decomposition does not describe exactly."""
    if not isinstance(visual, VisionTransformer):
        raise NotImplementedError(
            f"HookedEncoder needs an open_clip VisionTransformer, got {type(visual).__name__} "
            "(timm and ResNet towers are not decomposed)"
        )
    if visual.attn_pool is not None:
        raise NotImplementedError("attentional pooling is not covered by the CLS-token decomposition")
    if visual.pool_type != "tok":
        raise NotImplementedError(f"pool_type {visual.pool_type!r}: only CLS pooling ('tok') is decomposed")
    if not visual.transformer.batch_first:
        raise NotImplementedError("only batch-first transformers are supported")
    for block in visual.transformer.resblocks:
        if type(block) is not ResidualAttentionBlock or hasattr(block, "ln_1_kv"):
            raise NotImplementedError(
                f"{type(block).__name__}: qk_norm, scaled cosine attention, head/attention/fc scaling and "
                "cross-attention blocks are not covered by the per-head decomposition"
            )
