"""ViT families through one interface: a small adapter per library that shows `HookedEncoder` each block as
canonical parts, the token embedding, and the readout (DESIGN.md section 7).

Families: open_clip `VisionTransformer`; timm `VisionTransformer` (LayerScale, register tokens, global_pool
token/avg/map, fc_norm, classifier head); transformers `CLIPVisionModel(WithProjection)`, `Dinov2Model`,
`Dinov2WithRegistersModel`, `ViTModel`/`ViTForImageClassification`, `DeiTModel`/`DeiTForImageClassification`,
`SiglipVisionModel`. Every wrapped module is used as it is and left unmodified.

Every supported block is pre-norm: x_mid = x + g1 * Attn(N1(x)), x_out = x_mid + g2 * MLP(N2(x_mid)), with
LayerScale gammas g1, g2 (None where the block has none) folded into the writes.

Readouts (what the image embedding is, from the final residual x_L [B, T, D]):
- `cls`  e = R(x_L[:, 0]): the final norm (and projection / pooler) of the class token. Exact closed form.
- `mean` e = R(mean over patch tokens of x_L) with R the norm after pooling (timm `fc_norm`). Exact closed form
         where nothing acts on single tokens before the mean (timm's `norm` is Identity); else hooked.
- `map`  attention pooling (SigLIP's head, timm `global_pool='map'`): not a function of one vector; hooked.
Readouts that are not exact (`Family.exact` False) are computed from all tokens by the library's own head.
Register and distillation tokens are in the residual stream but in no readout.

Shapes: B images, T tokens, D residual width, H heads, d head width, E embedding width.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

READOUTS = ("cls", "mean", "map")


@dataclass
class BlockParts:
    """One pre-norm block as canonical parts (views of the library's own parameters, never copies where the
    library fuses q, k and v).

    block      the library's block module: its input is hook_resid_pre, its output hook_resid_post
    norm1      the pre-attention norm module
    qkv_weight [3 H d, D] query, key and value rows stacked; qkv_bias [3 H d] or None
    out_weight [D, H d] the attention output projection; out_bias [D] or None
    gamma1     [D] the attention LayerScale, or None
    norm2      the pre-MLP norm module; mlp the MLP module (applied to norm2's output); gamma2 [D] or None
    attn_out   the module whose output (first item of a tuple) is the attention sub-block's write, LayerScale
               included; mlp_out likewise for the MLP sub-block (forward hooks on them see the writes)
    scale      the attention logit scale, d ** -0.5
    """

    block: nn.Module
    norm1: nn.Module
    qkv_weight: Tensor
    qkv_bias: Optional[Tensor]
    out_weight: Tensor
    out_bias: Optional[Tensor]
    n_heads: int
    gamma1: Optional[Tensor]
    norm2: nn.Module
    mlp: nn.Module
    gamma2: Optional[Tensor]
    attn_out: nn.Module
    mlp_out: nn.Module

    @property
    def d_head(self) -> int:
        return self.out_weight.shape[1] // self.n_heads

    def qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x [B, T, D] (norm1 output) -> q, k, v [B, H, T, d] each."""
        q, k, v = nn.functional.linear(x, self.qkv_weight, self.qkv_bias).chunk(3, dim=-1)
        return tuple(t.unflatten(-1, (self.n_heads, self.d_head)).transpose(1, 2) for t in (q, k, v))

    def out_by_head(self) -> Tensor:
        """The output projection split by head: [D, H, d]."""
        return self.out_weight.unflatten(1, (self.n_heads, self.d_head))

    def attn_output(self, z: Tensor) -> Tensor:
        """z [B, H, T, d] (attention-weighted values) -> the attention sub-block's output [B, T, D], bias and
        LayerScale included."""
        out = nn.functional.linear(z.transpose(1, 2).flatten(2), self.out_weight, self.out_bias)
        return scaled(out, self.gamma1)

    def attn_bias(self) -> Tensor:
        """[D]: the attention output bias as it reaches the residual stream (zeros where there is none)."""
        bias = self.out_bias if self.out_bias is not None else self.out_weight.new_zeros(self.out_weight.shape[0])
        return scaled(bias, self.gamma1)

    def mlp_write(self, x_mid: Tensor) -> Tensor:
        """x_mid [B, T, D] -> the MLP sub-block's write, LayerScale included (no module hook of ours fires:
        the parts' modules are called, not the block)."""
        return scaled(self.mlp(self.norm2(x_mid)), self.gamma2)


def scaled(x: Tensor, gamma: Optional[Tensor]) -> Tensor:
    return x if gamma is None else x * gamma


class Family:
    """What `HookedEncoder` needs of one library's ViT. Subclasses set `name`, `readout` and `exact`."""

    name: str = ""
    readout: str = "cls"
    exact: bool = True
    n_prefix: int = 1  # tokens before the patches (class, register, distillation)
    # the side of the images the library's preprocessing for these weights feeds, set by the loader where it
    # is known (a transformers processor can crop to less than the config's `image_size`: DINOv2's 224 of 518)
    fed_size: Optional[int] = None

    def __init__(self, model: nn.Module):
        self.model = model

    @classmethod
    def handles(cls, model: nn.Module) -> bool:
        """Whether this family opens up `model` (`family_of` asks each registered family in turn)."""
        return False

    # ---- structure ---------------------------------------------------------------------------------------
    @property
    def blocks(self) -> nn.ModuleList:
        raise NotImplementedError

    def parts(self, layer: int) -> BlockParts:
        raise NotImplementedError

    @property
    def d_model(self) -> int:
        return self.parts(0).out_weight.shape[0]

    @property
    def n_heads(self) -> int:
        return self.parts(0).n_heads

    @property
    def d_embed(self) -> int:
        return self.d_model

    @property
    def image_size(self) -> int:
        raise NotImplementedError

    @property
    def placement(self) -> Tensor:
        """A parameter whose device and dtype are the model's."""
        return next(self.model.parameters())

    @property
    def n_tokens(self) -> int:
        """T: the tokens of the residual stream (class, register and distillation tokens, then the patches)."""
        raise NotImplementedError

    @property
    def d_mlp(self) -> int:
        """The MLP's hidden width (its widest linear layer's output)."""
        return max(m.out_features for m in self.parts(0).mlp.modules() if isinstance(m, nn.Linear))

    # ---- computation -------------------------------------------------------------------------------------
    def tokens(self, pixels: Tensor) -> Tensor:
        """pixels [B, 3, S, S] -> x_0 [B, T, D] (all tokens)."""
        raise NotImplementedError

    def pool(self, x: Tensor) -> Tensor:
        """[B, T, ...] -> [B, ...]: the readout position (the class token, or the mean over patch tokens)."""
        return x[:, 0] if self.readout == "cls" else x[:, self.n_prefix:].mean(1)

    def readout_vector(self, v: Tensor) -> Tensor:
        """R(v): [..., D] -> [..., E] for an exact readout (the embedding is R(pool(x_L)))."""
        raise NotImplementedError(f"the {self.readout} readout of {self.name} is not a function of one vector")

    def readout_tokens(self, x: Tensor) -> Tensor:
        """The library's own path from the final residual x_L [B, T, D] to the embedding [B, E]."""
        return self.readout_vector(self.pool(x))

    def forward(self, pixels: Tensor) -> Tensor:
        """The library's own forward: pixels -> the embedding [B, E]."""
        raise NotImplementedError

    # ---- for direct attribution and the logit lens ---------------------------------------------------------
    def final_norm(self) -> Optional[nn.LayerNorm]:
        """The LayerNorm the exact readout applies first, when R(v) = linear(final_norm(v)); else None."""
        return None

    def project(self, v: Tensor) -> Tensor:
        """The linear map after `final_norm` (identity by default)."""
        return v

    @property
    def classifier(self) -> Optional[nn.Module]:
        """The model's own classifier head on the embedding (logits = classifier(embedding)), or None."""
        return None

    def class_names(self) -> Optional[list[str]]:
        return None


# ---------------------------------------------------------------------------------------- open_clip


def open_clip_parts(block: nn.Module) -> BlockParts:
    """An open_clip `ResidualAttentionBlock` as canonical parts (its own parameters, as views)."""
    from open_clip.transformer import LayerScale  # the family is only ever asked for with open_clip imported

    attn = block.attn
    return BlockParts(
        block=block, norm1=block.ln_1, qkv_weight=attn.in_proj_weight, qkv_bias=attn.in_proj_bias,
        out_weight=attn.out_proj.weight, out_bias=attn.out_proj.bias, n_heads=attn.num_heads,
        gamma1=block.ls_1.gamma if isinstance(block.ls_1, LayerScale) else None,
        norm2=block.ln_2, mlp=block.mlp, gamma2=block.ls_2.gamma if isinstance(block.ls_2, LayerScale) else None,
        attn_out=block.ls_1, mlp_out=block.ls_2)


class OpenClipFamily(Family):
    """open_clip `VisionTransformer`: CLS pooling, `ln_post` then `proj` (today's encoder, unchanged)."""

    name = "open_clip"

    def __init__(self, model: nn.Module):
        _check_supported(model)
        super().__init__(model)

    @classmethod
    def handles(cls, model: nn.Module) -> bool:
        return type(model).__module__.startswith("open_clip")

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.transformer.resblocks

    def parts(self, layer: int) -> BlockParts:
        return open_clip_parts(self.blocks[layer])

    @property
    def d_model(self) -> int:
        return self.model.transformer.width

    @property
    def n_heads(self) -> int:
        return self.blocks[0].attn.num_heads

    @property
    def d_embed(self) -> int:
        return self.d_model if self.model.proj is None else self.model.proj.shape[1]

    @property
    def image_size(self) -> int:
        return self.model.image_size[0]

    @property
    def placement(self) -> Tensor:
        return self.model.class_embedding

    @property
    def n_tokens(self) -> int:
        return self.model.grid_size[0] * self.model.grid_size[1] + 1

    def tokens(self, pixels: Tensor) -> Tensor:
        from dsl_cli.encoder import openclip_api

        return openclip_api.tokens(self.model, pixels)

    def readout_vector(self, v: Tensor) -> Tensor:
        return self.project(self.model.ln_post(v))

    def readout_tokens(self, x: Tensor) -> Tensor:
        from dsl_cli.encoder import openclip_api

        return self.project(openclip_api.pool_cls(self.model, x))

    def forward(self, pixels: Tensor) -> Tensor:
        out = self.model(pixels)
        return out[0] if isinstance(out, tuple) else out

    def final_norm(self) -> nn.LayerNorm:
        return self.model.ln_post

    def project(self, v: Tensor) -> Tensor:
        return v if self.model.proj is None else v @ self.model.proj


# ---------------------------------------------------------------------------------------- timm


def timm_clip_tower(model: nn.Module) -> bool:
    """Whether a timm ViT is a CLIP image tower, whose `head` is CLIP's projection and not a classifier.

    timm's `_convert_openai_clip` stores CLIP's `proj` [D, E] transposed as `head.weight` [E, D] with a zero
    `head.bias` (num_classes = E, the CLIP embedding width): `model(pixels)` is CLIP's image embedding. The rule
    reads timm's own pretrained config: the architecture is one of timm's CLIP towers (the `*_clip_*`
    entrypoints, "CLIP image tower"), or the tag names CLIP weights in another ViT (MobileCLIP-B's
    `vit_base_mci_224.apple_mclip*`, whose `_convert_mobileclip` stores its projection the same way), and the
    tag is not a fine-tune (timm tags those `<pretraining>_ft_<data>`,
    e.g. `openai_ft_in1k`, `laion2b_ft_in12k`: there `head` is a real 1000 / 11821-class classifier). A model
    built without a pretrained config (a plain `VisionTransformer(...)`) is not one; nor is a head with a
    non-zero bias (not a converted projection)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    head = getattr(model, "head", None)
    return is_clip_tower(cfg.get("architecture"), cfg.get("tag")) and isinstance(head, nn.Linear) and \
        (head.bias is None or not bool(head.bias.detach().any()))


def is_clip_tower(architecture: Optional[str], tag: Optional[str]) -> bool:
    """Whether timm's pretrained config (architecture, tag) is a CLIP image tower's (`timm_clip_tower`)."""
    tag = tag or ""
    return ("_clip_" in (architecture or "") or "clip" in tag) and "ft_" not in tag


class TimmFamily(Family):
    """timm `VisionTransformer` with its plain pre-norm `Block`s: class and register tokens, LayerScale
    (`ls1`, `ls2`), `global_pool` token / avg / map (and the other poolings, hooked), `norm` before pooling or
    `fc_norm` after it, and its classifier `head`. The embedding is the head's input (`pre_logits`), except
    for a CLIP image tower (`timm_clip_tower`): there `head` is CLIP's projection, the embedding its output
    (`model(pixels)`, CLIP's image embedding) and there is no classifier."""

    name = "timm"

    @classmethod
    def handles(cls, model: nn.Module) -> bool:
        return type(model).__module__.startswith("timm.models.vision_transformer") and \
            type(model).__name__ == "VisionTransformer"

    def __init__(self, model: nn.Module):
        super().__init__(model)
        from timm.layers import Attention, LayerScale
        from timm.models.vision_transformer import Block

        self._layer_scale = LayerScale
        pool = model.global_pool
        if pool == "":
            raise NotImplementedError("timm global_pool='' returns every token: choose token, avg or map")
        for block in model.blocks:
            attn = getattr(block, "attn", None)
            if type(block) is not Block or type(attn) is not Attention:
                what = type(block).__name__ + ("" if attn is None else f" with {type(attn).__name__}")
                raise NotImplementedError(
                    f"timm {what}: only the plain pre-norm Block with the standard Attention is covered by the "
                    "per-head decomposition")
            attn = block.attn
            if not all(isinstance(m, nn.Identity) for m in (attn.q_norm, attn.k_norm, attn.norm)) or \
                    getattr(attn, "gate", None) is not None:
                raise NotImplementedError("timm attention with qk_norm, scale_norm or a gate is not decomposed per head")
        self.n_prefix = model.num_prefix_tokens
        self.clip = timm_clip_tower(model)
        if pool == "token":
            self.readout, self.exact = "cls", True
        elif pool == "avg" and not model.pool_include_prefix:
            # the mean of the residuals is the readout's input only where no per-token norm comes first
            self.readout, self.exact = "mean", isinstance(model.norm, nn.Identity)
        else:  # map, avgmax, max, prr, avg over the prefix tokens too: hooked
            self.readout, self.exact = ("map" if pool in ("map", "prr") else "mean"), False

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.blocks

    def parts(self, layer: int) -> BlockParts:
        block = self.blocks[layer]
        attn = block.attn

        def gamma(ls: nn.Module) -> Optional[Tensor]:
            return ls.gamma if isinstance(ls, self._layer_scale) else None

        return BlockParts(
            block=block, norm1=block.norm1, qkv_weight=attn.qkv.weight, qkv_bias=attn.qkv.bias,
            out_weight=attn.proj.weight, out_bias=attn.proj.bias, n_heads=attn.num_heads, gamma1=gamma(block.ls1),
            norm2=block.norm2, mlp=block.mlp, gamma2=gamma(block.ls2), attn_out=block.ls1, mlp_out=block.ls2)

    @property
    def d_model(self) -> int:
        return self.model.embed_dim

    @property
    def d_embed(self) -> int:
        return self.model.head.out_features if self.clip else self.d_model

    @property
    def image_size(self) -> int:
        # timm feeds what its pretrained config says (`resolve_data_config`), and its patch embedding refuses
        # any other size: the architecture's img_size (518 for its DINOv2s, which do take 518)
        return self.fed_size or self.model.patch_embed.img_size[0]

    @property
    def n_tokens(self) -> int:
        return self.model.patch_embed.num_patches + self.n_prefix

    def tokens(self, pixels: Tensor) -> Tensor:
        from dsl_cli.encoder import timm_api

        return timm_api.tokens(self.model, pixels)

    def readout_vector(self, v: Tensor) -> Tensor:
        if not self.exact:
            return super().readout_vector(v)
        return self.project(self.model.fc_norm(self.model.norm(v)))  # one of the two norms is Identity

    def readout_tokens(self, x: Tensor) -> Tensor:
        return self.model.forward_head(self.model.norm(x), pre_logits=not self.clip)

    def forward(self, pixels: Tensor) -> Tensor:
        return self.model.forward_head(self.model.forward_features(pixels), pre_logits=not self.clip)

    def project(self, v: Tensor) -> Tensor:
        """A CLIP tower's projection (`head`, bias-free: `timm_clip_tower`); identity for a classifier's input."""
        return nn.functional.linear(v, self.model.head.weight) if self.clip else v

    def final_norm(self) -> Optional[nn.LayerNorm]:
        if not self.exact:
            return None
        norm = self.model.fc_norm if isinstance(self.model.norm, nn.Identity) else self.model.norm
        return norm if isinstance(norm, nn.LayerNorm) else None

    @property
    def classifier(self) -> Optional[nn.Module]:
        head = self.model.head
        return None if isinstance(head, nn.Identity) or self.clip else head

    def class_names(self) -> Optional[list[str]]:
        if self.classifier is None:
            return None
        n = self.model.num_classes
        if n != 1000:  # timm names the ImageNet-12k / 22k heads of its weights; open_clip's names the 1k one
            from timm.data import ImageNetInfo, infer_imagenet_subset

            subset = infer_imagenet_subset(self.model)
            if subset is not None:
                return list(ImageNetInfo(subset).label_descriptions(as_dict=False))
        return _imagenet_names(n)


# ---------------------------------------------------------------------------------------- transformers


def _hf_attention_parts(attn: nn.Module) -> tuple[Tensor, Optional[Tensor], Tensor, Optional[Tensor], int]:
    """q/k/v/out weights of a transformers attention module (q_proj, k_proj, v_proj, o_proj or out_proj)."""
    out = attn.o_proj if hasattr(attn, "o_proj") else attn.out_proj
    q, k, v = attn.q_proj, attn.k_proj, attn.v_proj
    weight = torch.cat([q.weight, k.weight, v.weight])
    biases = [p.bias for p in (q, k, v)]
    bias = None if all(b is None for b in biases) else torch.cat(
        [b if b is not None else torch.zeros_like(p.weight[:, 0]) for b, p in zip(biases, (q, k, v))])
    heads = getattr(attn, "num_heads", None) or getattr(attn, "num_attention_heads", None)
    if heads is None:
        heads = q.weight.shape[0] // attn.head_dim
    return weight, bias, out.weight, out.bias, heads


class HFFamily(Family):
    """transformers vision towers: CLIP (+ projection), DINOv2 (LayerScale; registers), ViT / DeiT (class and
    distillation tokens; their image classifiers), SigLIP (attention-pooling head, hooked)."""

    name = "transformers"

    @classmethod
    def handles(cls, model: nn.Module) -> bool:
        return type(model).__module__.startswith("transformers.")

    def __init__(self, model: nn.Module):
        super().__init__(model)
        kind = type(model).__name__
        self.kind = kind
        self.base, self.head_module, self.projection = model, None, None
        if kind == "CLIPVisionModelWithProjection":
            self.base, self.projection = model.vision_model, model.visual_projection
        elif kind in ("ViTForImageClassification", "DeiTForImageClassification"):
            self.base = model.vit if kind.startswith("ViT") else model.deit
            self.head_module = model.classifier
        base = type(self.base).__name__
        if base in ("CLIPVisionModel", "CLIPVisionTransformer"):
            self.family, self.readout = "clip", "cls"
        elif base in ("Dinov2Model", "Dinov2WithRegistersModel"):
            self.family, self.readout = "dinov2", "cls"
            self.n_prefix = 1 + getattr(self.base.config, "num_register_tokens", 0)
        elif base in ("ViTModel", "DeiTModel"):
            self.family, self.readout = "vit", "cls"
            self.n_prefix = 2 if base == "DeiTModel" else 1
        elif base in ("SiglipVisionModel", "SiglipVisionTransformer"):
            if getattr(self.base, "head", None) is None:
                raise NotImplementedError("SigLIP without its attention-pooling head has no pooled output")
            self.family, self.readout, self.exact, self.n_prefix = "siglip", "map", False, 0
        else:
            raise NotImplementedError(f"transformers {kind} is not a supported vision transformer")
        for layer in range(len(self.blocks)):
            self._check(self.blocks[layer])

    def _check(self, layer: nn.Module) -> None:
        attn = self._attention(layer)
        d = attn.q_proj.weight.shape[0] // _hf_attention_parts(attn)[4]
        scale = getattr(attn, "scaling", getattr(attn, "scale", d ** -0.5))
        if abs(scale - d ** -0.5) > 1e-12 * d:
            raise NotImplementedError(f"{type(attn).__name__}: attention scale {scale} is not head_dim ** -0.5")
        if getattr(attn, "is_causal", False):
            raise NotImplementedError(f"{type(attn).__name__}: causal attention is not a vision tower's")

    @staticmethod
    def _attention(layer: nn.Module) -> nn.Module:
        for name in ("self_attn", "attention"):
            if hasattr(layer, name):
                return getattr(layer, name)
        raise NotImplementedError(f"{type(layer).__name__}: no attention module found")

    @property
    def blocks(self) -> nn.ModuleList:
        base = self.base
        if hasattr(base, "layers"):
            return base.layers
        encoder = base.encoder
        return encoder.layers if hasattr(encoder, "layers") else encoder.layer

    def parts(self, layer: int) -> BlockParts:
        block = self.blocks[layer]
        attn = self._attention(block)
        w, b, w_o, b_o, heads = _hf_attention_parts(attn)
        if self.family == "dinov2":
            return BlockParts(block, block.norm1, w, b, w_o, b_o, heads, block.layer_scale1.lambda1, block.norm2,
                              block.mlp, block.layer_scale2.lambda1, block.layer_scale1, block.layer_scale2)
        if self.family == "vit":
            return BlockParts(block, block.layernorm_before, w, b, w_o, b_o, heads, None, block.layernorm_after,
                              block.mlp, None, attn, block.mlp)
        return BlockParts(block, block.layer_norm1, w, b, w_o, b_o, heads, None, block.layer_norm2, block.mlp,
                          None, attn, block.mlp)

    @property
    def d_model(self) -> int:
        return self.base.config.hidden_size

    @property
    def d_embed(self) -> int:
        return self.projection.out_features if self.projection is not None else self.d_model

    @property
    def image_size(self) -> int:
        """What the processor feeds where the loader knows it (`fed_size`: DINOv2's processor crops to 224
        although its config says 518, its position embeddings being interpolated), else the config's."""
        if self.fed_size:
            return self.fed_size
        size = self.base.config.image_size
        return size[0] if isinstance(size, (tuple, list)) else size

    @property
    def n_tokens(self) -> int:
        patch = self.base.config.patch_size
        patch = patch[0] if isinstance(patch, (tuple, list)) else patch
        return (self.image_size // patch) ** 2 + self.n_prefix

    def _final(self) -> nn.LayerNorm:
        return self.base.post_layernorm if self.family in ("clip", "siglip") else self.base.layernorm

    def tokens(self, pixels: Tensor) -> Tensor:
        x = self.base.embeddings(pixels)
        return self.base.pre_layrnorm(x) if self.family == "clip" else x

    def readout_vector(self, v: Tensor) -> Tensor:
        if not self.exact:
            return super().readout_vector(v)
        return self.project(self._final()(v))

    def readout_tokens(self, x: Tensor) -> Tensor:
        if self.family == "siglip":
            return self.base.head(self.base.post_layernorm(x))
        return super().readout_tokens(x)

    def forward(self, pixels: Tensor) -> Tensor:
        out = self.base(pixel_values=pixels)
        if self.family in ("vit", "dinov2"):  # the class token of last_hidden_state (after the final norm)
            pooled = out.last_hidden_state[:, 0]
        else:
            pooled = out.pooler_output
        return self.project(pooled)

    def final_norm(self) -> Optional[nn.LayerNorm]:
        return self._final() if self.exact else None

    def project(self, v: Tensor) -> Tensor:
        return v if self.projection is None else self.projection(v)

    @property
    def classifier(self) -> Optional[nn.Module]:
        return self.head_module

    def class_names(self) -> Optional[list[str]]:
        if self.head_module is None:
            return None
        labels = getattr(self.model.config, "id2label", None) or {}
        n = self.head_module.out_features
        if len(labels) == n and not all(str(labels[i]) == f"LABEL_{i}" for i in range(n)):
            return [str(labels[i]) for i in range(n)]
        return _imagenet_names(n)


def _imagenet_names(n: int) -> Optional[list[str]]:
    """ImageNet-1k class names for a 1000-way head (open_clip ships them); generic names otherwise."""
    if n <= 0:
        return None
    if n == 1000:
        import open_clip

        return list(open_clip.IMAGENET_CLASSNAMES)
    return [f"class {i}" for i in range(n)]


# ---------------------------------------------------------------------------------------- dispatch


FAMILIES: list[type[Family]] = []  # asked in order by `family_of`; a family registered later comes first


def register_family(cls: type[Family]) -> type[Family]:
    """Add an encoder family (a `Family` subclass with a `name`, `handles` and the structure `HookedEncoder`
    reads), asked before every family registered before it, so that a user's family can take a model a
    built-in one would (a family of the same name is replaced). Usable as a class decorator."""
    if not (isinstance(cls, type) and issubclass(cls, Family)) or not cls.name:
        raise TypeError(f"{cls!r}: an encoder family is a Family subclass with a name")
    FAMILIES[:] = [cls, *(family for family in FAMILIES if family.name != cls.name)]
    return cls


for _builtin in (HFFamily, TimmFamily, OpenClipFamily):
    register_family(_builtin)


def family_of(model: nn.Module) -> Family:
    """The adapter for `model`: the first registered family that `handles` it; NotImplementedError saying why
    for a module no family covers."""
    for family in FAMILIES:
        if family.handles(model):
            return family(model)
    _check_supported(model)  # raises, naming what is supported
    raise AssertionError("unreachable")


def _check_supported(visual: nn.Module) -> None:
    """Raise NotImplementedError for open_clip towers the CLS decomposition does not describe exactly (and for
    a module of no supported family)."""
    from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

    if not isinstance(visual, VisionTransformer):
        names = [family.name for family in FAMILIES]
        raise NotImplementedError(
            f"HookedEncoder needs a vision transformer of {', '.join(names[:-1])} or {names[-1]}, got "
            f"{type(visual).__name__} (ResNet and other towers are not decomposed; `register_family` adds one"
            + ("; a timm tower inside open_clip: load it with encoder=timm" if type(visual).__name__ == "TimmModel"
               else "") + ")"
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
