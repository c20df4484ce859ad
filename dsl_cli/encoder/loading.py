"""Building the image encoder (and the text tower the logit lens needs) from an `EncoderConfig`.

Sources: `open_clip` (the vision tower alone, its tensors read one by one from the CLIP checkpoint, or through
open_clip's own loader where the file needs converting; `pretrained: null` gives it random weights, seeded),
`kandinsky_prior` (the HF `CLIPVisionModelWithProjection` of the Kandinsky 2.2 prior, mapped
key by key onto an open_clip `VisionTransformer`) and `tiny` (seeded random weights, for tests).
Weights come from the Hugging Face cache or a local path; a missing one becomes a one-line `UserError`.

Each tower is built alone: for ViT-bigG-14 the vision tower is 1.8 B parameters (7.4 GB in fp32) and the text
tower (`TextTower`, for the logit lens) 0.7 B (2.8 GB); each reads only its own tensors from the checkpoint
(safetensors opened lazily, torch files memory-mapped), so neither the other tower nor a second copy of the
weights is ever held (open_clip's loader holds the whole CLIP and the whole checkpoint at once: 20 GB for bigG).
"""

from __future__ import annotations

import json
import logging
import os
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, TypeVar

import torch
from safetensors import safe_open
from torch import Tensor, nn

from dsl_cli.encoder import vit_loading
from dsl_cli.encoder.hooked import HookedEncoder
from dsl_cli.encoder.preprocess import ClipImageProcessor
from dsl_cli.encoder.openclip_api import build_text_tower, build_vision_tower
from dsl_cli.devices import resolve_dtype, seeded_on
from dsl_cli.errors import UserError, printable
from dsl_cli.libraries import Library, import_frozen
from dsl_cli.weights import Needs, hub_download_command, load_errors, open_clip_needs, prior_encoder_weights, reason

Preprocess = Callable[[Any], Tensor]  # PIL image -> [3, S, S]

# The Kandinsky 2.2 prior was trained on this open_clip model's image embeddings: its text tower is the
# matching one for the logit lens.
PRIOR_TEXT_MODEL = ("ViT-bigG-14", "laion2b_s39b_b160k")

TINY_EMBED_DIM = 32
TINY_VISION_CFG = dict(image_size=64, patch_size=16, width=64, layers=4, head_width=16, mlp_ratio=4.0)
TINY_TEXT_CFG = dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=1)

RANDOM_SEED = 0  # random weights (tiny, `pretrained: null`) are drawn from this seed: the same on every run
T = TypeVar("T")
open_clip = Library("open_clip")  # imported when the first model is built, not when a run starts
log = logging.getLogger("dsl_cli.encoder")


def load_encoder(
    cfg: Any, device: "str | torch.device" = "cpu", dtype: Optional[torch.dtype] = None
) -> tuple[HookedEncoder, Preprocess]:
    """cfg: an `EncoderConfig` (or anything with its attributes) -> (encoder in eval mode on device/dtype,
    preprocess: PIL image -> [3, S, S] normalised tensor). `dtype` None: the config's `dtype` (`auto`: bf16 on
    CUDA, fp32 elsewhere)."""
    if dtype is None:  # an API caller's EncoderConfig(dtype="bf16") was built in float32
        dtype = resolve_dtype(str(getattr(cfg, "dtype", "fp32")), device)
    if cfg.source == "tiny":
        visual, preprocess = build_tiny_visual(), open_clip.image_transform(TINY_VISION_CFG["image_size"], False)
    elif cfg.source == "open_clip":
        visual, preprocess = _load_open_clip_visual(cfg.name, cfg.pretrained, _expand(cfg.checkpoint), device)
    elif cfg.source == "kandinsky_prior":
        visual, preprocess = _load_prior_visual(cfg.repo_id, cfg.subfolder, _expand(cfg.checkpoint))
    elif cfg.source in vit_loading.SOURCES:  # timm and transformers ViTs (dsl_cli.encoder.families)
        visual, preprocess = vit_loading.load_vit(cfg)
    else:
        raise UserError(f"unknown encoder.source {cfg.source!r}: use open_clip, kandinsky_prior, tiny, timm or hf")
    try:
        encoder = HookedEncoder(visual)
    except NotImplementedError as err:
        name = vit_loading.label(cfg) if cfg.source in vit_loading.SOURCES else cfg.name  # hf: its repo or folder
        raise UserError(f"encoder {cfg.source}:{name} cannot be opened up: {err}") from err
    if cfg.source in vit_loading.SOURCES:  # the size the processor feeds, not the config's (DINOv2: 224, not 518)
        encoder.family.fed_size = vit_loading.fed_size(preprocess)
    encoder.requires_grad_(False)
    return encoder.to(device=device, dtype=dtype), preprocess


class TextTower(nn.Module):
    """An open_clip text tower on its own, with CLIP's `encode_text` (what open_clip's zero-shot classifier
    calls). `text`: the module `open_clip.CLIP` builds its text side from (a `TextTransformer`, or a Hugging
    Face text encoder for the models that use one)."""

    def __init__(self, text: nn.Module):
        super().__init__()
        self.text = text

    @property
    def trims(self) -> bool:
        """Whether padding can be cut off the tokens: a causal tower pooled at the end-of-text token (the
        highest id) computes that token from the tokens before it alone."""
        text = self.text
        return (isinstance(text, open_clip.transformer.TextTransformer) and text.attn_mask is not None and text.cls_emb is None
                and text.pool_type == "argmax")

    def encode_text(self, tokens: Tensor, normalize: bool = False) -> Tensor:
        """tokens [N, context length] -> text embeddings [N, d_embed], as `open_clip.CLIP.encode_text`.

        Prompts are short (under 20 of 77 tokens for ImageNet's): where `trims`, only the columns up to the
        last end-of-text token are computed, with the causal mask cut to match (equal up to round-off)."""
        if not self.trims:
            features = self.text(tokens)
        else:
            length = int(tokens.argmax(dim=-1).max()) + 1
            full = self.text.attn_mask
            self.text.attn_mask = full[:length, :length]
            try:
                features = self.text(tokens[:, :length])
            finally:
                self.text.attn_mask = full
        return nn.functional.normalize(features, dim=-1) if normalize else features


def load_text_model(
    cfg: Any, device: "str | torch.device" = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[TextTower, Callable]:
    """The text tower (alone, with `encode_text`) and tokenizer whose text space matches the encoder's images.

    tiny: the tiny CLIP's text side; kandinsky_prior: ViT-bigG-14 laion2b_s39b_b160k unless
    `text_name`/`text_pretrained` say otherwise; open_clip: the encoder's model (random weights, seeded,
    when `pretrained` is null). The vision tower is never built.
    """
    if cfg.source == "tiny":
        tower, tokenizer = build_tiny_text(), open_clip.get_tokenizer("ViT-B-32")
    else:
        name, weights = text_model_id(cfg)
        tower = _open_clip_text(name, weights, text_settings_tag(cfg))
        tokenizer = open_clip.get_tokenizer(name)
    tower.requires_grad_(False)
    return tower.to(device=device, dtype=dtype).eval(), tokenizer


def _open_clip_text(name: str, weights: Optional[str], tag: Optional[str] = None) -> TextTower:
    """`tag`: the pretrained tag whose settings (QuickGELU) the weights were trained with (default: `weights`,
    where it is a tag)."""
    model_cfg = _model_config(name)
    text_cfg = open_clip.CLIPTextCfg(**model_cfg["text_cfg"])
    text_cfg.hf_model_pretrained = False  # as create_model does: the CLIP checkpoint holds the text weights
    quick_gelu = tag_settings(name, tag or weights).quick_gelu
    tower = TextTower(seeded(lambda: build_text_tower(model_cfg["embed_dim"], text_cfg, quick_gelu)))
    if weights is not None:
        # a CLIP checkpoint keeps the text tower's tensors at the top level; a CustomTextCLIP one under `text.`
        try:
            copy_tower_weights(tower.text, checkpoint_file(name, weights), ("", "text."), f"{name} text tower")
        except UnreadableWeights as err:
            raise _refetch(err, name, weights) from err
    return tower


def text_model_id(cfg: Any) -> tuple[str, Optional[str]]:
    """(open_clip model name, pretrained tag or file) of the text tower `load_text_model` loads for `cfg`
    (`("tiny", None)` for the tiny model)."""
    if cfg.source in vit_loading.SOURCES and not cfg.text_name:
        raise UserError(f"encoder {cfg.source}:{vit_loading.label(cfg)} has no CLIP text tower: labels and text "
                        "targets need one (its classifier head, where it has one, names the logit lens's labels)")
    if cfg.source == "tiny":
        return "tiny", None
    default_name, default_tag = PRIOR_TEXT_MODEL if cfg.source == "kandinsky_prior" else (cfg.name, cfg.pretrained)
    return cfg.text_name or default_name, _expand(cfg.text_pretrained or default_tag)


def needs(cfg: Any) -> Needs:
    """The weights `load_encoder` reads for encoder config `cfg` (for the preflight, before anything loads):
    the prior's image encoder or open_clip's weights from the hub, or a local path that must be right."""
    if cfg.source in vit_loading.SOURCES:
        return vit_loading.needs(cfg)
    if cfg.source == "kandinsky_prior" and cfg.checkpoint:
        folder = Path(cfg.checkpoint).expanduser()
        if (folder / "config.json").is_file() and any(folder.glob("*.safetensors")):
            return [], []
        return [], [f"encoder.checkpoint={cfg.checkpoint}: not a folder with config.json and model.safetensors "
                    "(a saved CLIPVisionModelWithProjection)"]
    if cfg.source == "kandinsky_prior":
        return [prior_encoder_weights(cfg.repo_id, cfg.subfolder)], []
    if cfg.source == "open_clip":
        key = "encoder.checkpoint" if cfg.checkpoint else "encoder.pretrained"
        return open_clip_needs("image encoder", cfg.name, cfg.checkpoint or cfg.pretrained, key)
    return [], []


def text_tower_needs(cfg: Any) -> Needs:
    """The weights `load_text_model` reads for encoder config `cfg` (none for the tiny model)."""
    name, tag = text_model_id(cfg)
    if name == "tiny":
        return [], []
    return open_clip_needs("text tower (labels, logit lens)", name, tag, "encoder.text_pretrained")


def text_settings_tag(cfg: Any) -> Optional[str]:
    """The pretrained tag whose settings the text tower of `cfg` is built with: its weights' tag, or, for
    weights in a local file of the encoder's own model, the encoder's `pretrained` tag."""
    name, weights = text_model_id(cfg)
    if weights is None or is_tag(name, weights):
        return weights
    if cfg.source == "open_clip" and name == cfg.name and is_tag(name, cfg.pretrained):
        return cfg.pretrained
    return None


def is_tag(name: str, weights: Optional[str]) -> bool:
    """Whether `weights` is one of open_clip's pretrained tags of model `name` (not a file, not None)."""
    return bool(weights) and not Path(weights).is_file() and bool(open_clip.get_pretrained_cfg(name, weights))


@dataclass(frozen=True)
class TagSettings:
    """What open_clip's own loader builds model `name` with for pretrained tag `tag`: the activation (the
    model config's `quick_gelu`, or the tag's: OpenAI's tags set it where the plain model config does not)
    and the evaluation preprocessing (`PreprocessCfg` fields: open_clip's defaults, overridden by the tag's
    mean, std, interpolation, resize mode and fill)."""

    quick_gelu: bool
    preprocess: dict

    def transform(self, image_size: Any) -> Preprocess:
        """open_clip's evaluation transform for these settings at `image_size` (the tower's own size, as
        `create_model` sets it)."""
        from open_clip.transform import PreprocessCfg, image_transform_v2

        return image_transform_v2(PreprocessCfg(**{**self.preprocess, "size": image_size}), is_train=False)


def tag_settings(name: str, tag: Optional[str]) -> TagSettings:
    """The `TagSettings` of open_clip model `name` with pretrained tag `tag` (None, a file or an unknown tag:
    the model config's alone), from open_clip's own `get_model_config` and `get_pretrained_cfg`."""
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    model_cfg = _model_config(name)
    pretrained = open_clip.get_pretrained_cfg(name, tag) if is_tag(name, tag) else {}
    quick_gelu = bool(model_cfg.get("quick_gelu", False) or pretrained.get("quick_gelu", False))
    return TagSettings(quick_gelu, merge_preprocess_dict(PreprocessCfg(), pretrained))


@dataclass(frozen=True)
class EmbeddingSpace:
    """Whose image embeddings an encoder config gives, known without loading it: the open_clip model,
    its pretrained tag (None when the weights are random or a local file) and the embedding width."""

    model: str
    weights: Optional[str]
    width: int
    origin: Optional[str] = None  # the file the width was read from (a local folder's config.json)

    @property
    def label(self) -> str:
        name = f"{self.model} {self.weights}" if self.weights else self.model
        return f"{name} ({self.origin})" if self.origin else name


def timm_clip_space(cfg: Any) -> tuple[str, Optional[str], int]:
    """(open_clip model, pretrained tag, embedding width) of the CLIP whose image embeddings encoder config `cfg`
    computes (`dsl_cli.encoder.loading.embedding_space`), or the `no_decoder` refusal.

    Only a timm CLIP image tower (`families.is_clip_tower`) has one: open_clip's own registry names the timm
    hub repository it loads that CLIP from (`hf_hub='timm/vit_large_patch14_clip_224.openai/'` for ViT-L-14
    openai), and the tower's activation must be the one open_clip builds that CLIP with (OpenAI's are
    QuickGELU: timm's `*_clip_quickgelu_*` towers, not the GELU ones of the same weights). The tag is None for
    random weights or a local file (judged by its model, as an open_clip one is)."""
    match = _open_clip_match(cfg) if cfg.source == "timm" and cfg.name != "tiny" else None
    if match is None:
        raise vit_loading.no_decoder(cfg)
    if isinstance(match, str):
        raise UserError(match)
    model, tag, width = match
    return model, (tag if cfg.pretrained is not None and not cfg.checkpoint else None), width


def _open_clip_match(cfg: Any) -> "tuple[str, str, int] | str | None":
    """The open_clip (model, tag, width) of a timm CLIP tower's weights and activation; a one-line refusal where
    only the activation differs; None where open_clip names no CLIP for them."""
    timm = import_frozen("timm")

    from dsl_cli.encoder.families import is_clip_tower

    pretrained = timm.models.get_pretrained_cfg(cfg.name) if timm.is_model(cfg.name) else None
    if pretrained is None or not is_clip_tower(pretrained.architecture, pretrained.tag):
        return None
    candidates = _open_clip_by_hub().get(pretrained.hf_hub_id or "", [])
    if not candidates:
        return None
    quick = vit_loading.timm_quick_gelu(cfg.name)
    for model, tag, width in candidates:
        if tag_settings(model, tag).quick_gelu == quick and width == pretrained.num_classes:
            return model, tag, width
    model, tag, _ = candidates[0]
    ours, theirs = ("QuickGELU", "GELU") if quick else ("GELU", "QuickGELU")
    twins = [name for name in timm.list_pretrained(f"*.{pretrained.tag}") if name != cfg.name and
             timm.models.get_pretrained_cfg(name).hf_hub_id == pretrained.hf_hub_id]
    fix = f"use encoder.name={twins[0]}" if twins else f"use encoder=open_clip {model} {tag}"
    return (f"encoder timm:{cfg.name} runs {model} {tag}'s weights with {ours} where that CLIP uses {theirs}, so "
            f"its embeddings are not the ones decoders of {model} {tag} decode: {fix}, or fit an adapter")


def _open_clip_by_hub() -> dict[str, list[tuple[str, str, int]]]:
    """timm hub repository -> the open_clip (model, tag, embedding width) entries that load their CLIP from it."""
    found: dict[str, list[tuple[str, str, int]]] = {}
    for model, tag in open_clip.list_pretrained():
        hub = (open_clip.get_pretrained_cfg(model, tag).get("hf_hub") or "").rstrip("/")
        model_cfg = open_clip.get_model_config(model) or {}
        if hub.startswith("timm/") and "embed_dim" in model_cfg:
            found.setdefault(hub, []).append((model, tag, model_cfg["embed_dim"]))
    return found


def embedding_space(cfg: Any) -> EmbeddingSpace:
    """The `EmbeddingSpace` of encoder config `cfg`, from open_clip's model configs (no weights read)."""
    if cfg.source in vit_loading.SOURCES:  # a timm CLIP tower's is its CLIP's; any other has none
        return EmbeddingSpace(*timm_clip_space(cfg))
    if cfg.source == "tiny":
        return EmbeddingSpace("tiny", None, TINY_EMBED_DIM)
    model_cfg = open_clip.get_model_config(cfg.name)
    if model_cfg is None:
        raise UserError(f"unknown open_clip model {cfg.name!r} (open_clip.list_models() lists the known ones)")
    if cfg.source == "kandinsky_prior" and cfg.checkpoint:
        # a local folder says its own width: a saved encoder of another width must not pass by its name
        config = _prior_folder_config(cfg)
        if config is not None:
            return EmbeddingSpace(cfg.name, None, config["projection_dim"], str(_prior_config_file(cfg)))
    if cfg.source == "kandinsky_prior":  # the prior's HF image encoder is open_clip's bigG, converted
        tag = PRIOR_TEXT_MODEL[1] if cfg.name == PRIOR_TEXT_MODEL[0] else None
    else:
        tag = None if cfg.checkpoint else cfg.pretrained
    return EmbeddingSpace(cfg.name, tag, model_cfg["embed_dim"])


def model_shape(cfg: Any) -> Optional[tuple[int, int]]:
    """(layers, heads) of the vision tower encoder config `cfg` builds, from configs alone (open_clip's model
    config, or the prior folder's config.json): layer and head settings are checked against it before any
    weight is looked up. None where no config tells (a folder not there yet, a tower that is not a ViT)."""
    if cfg.source in vit_loading.SOURCES:
        return vit_loading.model_shape(cfg)
    if cfg.source == "tiny":
        return TINY_VISION_CFG["layers"], TINY_VISION_CFG["width"] // TINY_VISION_CFG["head_width"]
    if cfg.source == "kandinsky_prior" and cfg.checkpoint:
        config = _prior_folder_config(cfg)
        return None if config is None else (config["num_hidden_layers"], config["num_attention_heads"])
    vision = open_clip.CLIPVisionCfg(**(open_clip.get_model_config(cfg.name) or {}).get("vision_cfg", {}))
    if not isinstance(vision.layers, int) or vision.timm_model_name:
        return None
    return vision.layers, vision.width // vision.head_width  # as open_clip's _build_vision_tower counts heads


# what vision_transformer_from_hf_config builds the tower from: each must be a positive integer
PRIOR_CONFIG_SIZES = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
                      "patch_size", "projection_dim")


def _prior_config_file(cfg: Any) -> Path:
    return Path(_expand(cfg.checkpoint)) / "config.json"


def _prior_folder_config(cfg: Any) -> Optional[dict]:
    """The checked config.json of a local prior folder (`read_prior_config`), or None where the folder has
    none yet (the weights preflight reports that, with the rest of what is missing)."""
    file = _prior_config_file(cfg)
    return read_prior_config(file) if file.is_file() else None


def read_prior_config(file: Path) -> dict:
    """A saved CLIPVisionModelWithProjection's config.json, checked before any model is built: a JSON object
    whose sizes are positive integers. Anything else is a one-line UserError naming the file."""
    fix = "save the encoder again with save_pretrained, or fetch the prior's image_encoder/"
    try:
        config = json.loads(file.read_text())
    except (OSError, ValueError) as err:  # unreadable, not UTF-8, not JSON
        raise UserError(f"{file.parent}: cannot read the image encoder weights from it ({reason(err)} in "
                        f"{file.name}); {fix}") from err
    if not isinstance(config, dict):
        kind = {list: "array", str: "string", type(None): "null"}.get(type(config), type(config).__name__)
        raise UserError(f"{file} holds a JSON {kind}, not the config of a "
                        f"CLIPVisionModelWithProjection; {fix}")
    bad = [key for key in PRIOR_CONFIG_SIZES if type(config.get(key)) is not int or config[key] < 1]
    if bad:
        shown = ", ".join(f"{key}={config.get(key)!r}" for key in bad[:3])
        raise UserError(f"{file}: {shown}: each must be a positive integer (a CLIPVisionConfig); {fix}")
    eps = config.get("layer_norm_eps", 1e-5)
    if type(eps) not in (int, float) or not 0 < eps < 1:
        raise UserError(f"{file}: layer_norm_eps={eps!r}: must be a small positive number; {fix}")
    return config


def _expand(path: Optional[str]) -> Optional[str]:
    """`~/weights` -> `/home/me/weights` (a pretrained tag never starts with `~`, so it is left as it is)."""
    return os.path.expanduser(path) if path else path


def seeded(build: Callable[[], T], device: "str | torch.device" = "cpu") -> T:
    """`build()` on `device` with torch's generators seeded with RANDOM_SEED, the caller's random state
    untouched: random weights that are the same on every run (for a given device, torch and open_clip)."""
    with seeded_on(device):
        torch.manual_seed(RANDOM_SEED)
        return build()


def unfilled(build: Callable[[], T]) -> T:
    """`build()` on the CPU without drawing its random weights, for a module whose every tensor is copied in
    next (`copy_tower_weights`): drawing bigG's vision tower takes about 10 s on a CPU. Built on the meta
    device, then given memory that is not initialised; a module with a buffer that no checkpoint holds (a
    non-persistent one, such as a text tower's causal mask) is built as usual instead."""
    with torch.device("meta"):
        module = build()
    if len(module.state_dict()) < len(list(module.parameters())) + len(list(module.buffers())):
        return seeded(build)
    return module.to_empty(device="cpu")


def build_tiny_clip() -> open_clip.CLIP:
    """A tiny open_clip CLIP (embed_dim 32; vision: image 64, patch 16, width 64, 4 layers, 4 heads, exact
    GELU; text: width 32, 2 heads, 1 layer), random weights seeded with 0 (the caller's RNG is untouched)."""
    return seeded(lambda: open_clip.CLIP(
        embed_dim=TINY_EMBED_DIM,
        vision_cfg=open_clip.CLIPVisionCfg(**TINY_VISION_CFG),
        text_cfg=open_clip.CLIPTextCfg(**TINY_TEXT_CFG),
    )).eval()


def build_tiny_visual() -> "open_clip.transformer.VisionTransformer":
    """The tiny CLIP's vision tower: the same weights as `build_tiny_clip().visual`."""
    return build_tiny_clip().visual


def build_tiny_text() -> TextTower:
    """The tiny CLIP's text side as a `TextTower`: the same weights as `build_tiny_clip()`'s."""
    tower = TextTower(build_text_tower(TINY_EMBED_DIM, open_clip.CLIPTextCfg(**TINY_TEXT_CFG)))
    clip = build_tiny_clip().state_dict()
    tower.text.load_state_dict({key: clip[key] for key in tower.text.state_dict()})
    return tower.eval()


def _model_config(name: str) -> dict:
    model_cfg = open_clip.get_model_config(name)
    if model_cfg is None:
        raise UserError(f"unknown open_clip model {name!r} (open_clip.list_models() lists the known ones)")
    return model_cfg


def checkpoint_file(name: str, weights: str) -> str:
    """The local file of open_clip weights `weights` (a file, or a pretrained tag of model `name`, fetched into
    the Hugging Face cache by open_clip's own download where it is not there yet)."""
    if Path(weights).is_file():
        return weights
    pretrained = open_clip.get_pretrained_cfg(name, weights)
    if not pretrained:
        raise UserError(f"{weights!r} is neither a file nor a pretrained tag of open_clip's {name} "
                        "(open_clip.list_pretrained() lists the tags): set encoder.checkpoint=/path/to/weights")
    with _user_errors(name, weights):
        return open_clip.download_pretrained(pretrained)


@contextmanager
def _open_checkpoint(path: str) -> Iterator[tuple[set[str], Callable[[str], Tensor]]]:
    """(the tensor names of a checkpoint file, a function reading one tensor), reading no tensor before it is
    asked for: safetensors lazily, torch files memory-mapped (older, non-zip ones are read whole)."""
    if path.endswith(".safetensors"):
        with safe_open(path, framework="pt", device="cpu") as file:
            yield set(file.keys()), file.get_tensor
        return
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # mmap needs the zip format that torch.save has written since 1.6
        state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict):
        state = state.get("state_dict", state)  # a training checkpoint wraps the weights
    if not isinstance(state, dict) or not all(isinstance(key, str) for key in state):
        raise UnreadableWeights(f"{path} is not a file of open_clip weights (it holds a {type(state).__name__}, "
                                "not named tensors)")
    state = {key.removeprefix("module."): value for key, value in state.items()}  # saved from DataParallel
    yield set(state), state.__getitem__


def copy_tower_weights(tower: nn.Module, path: str, prefixes: tuple[str, ...], what: str) -> None:
    """Copy into `tower`, tensor by tensor, its weights from a whole-CLIP checkpoint file, where they sit
    under one of `prefixes`; the checkpoint's other tensors are never read. Holds one tensor beyond the
    tower at a time. Raises UserError where the file lacks a tensor of the tower or has another shape."""
    own = tower.state_dict()  # shares storage with the tower's parameters
    with _user_errors_reading(path, what), _open_checkpoint(path) as (names, read):
        prefix = next((p for p in prefixes if all(p + key in names for key in own)), None)
        if prefix is None:
            missing = [key for key in own if prefixes[0] + key not in names]
            raise UserError(f"{path} holds no {what} weights (it lacks {', '.join(missing[:3])})")
        with torch.no_grad():
            for key, target in own.items():
                value = read(prefix + key)
                if value.shape != target.shape:
                    raise UserError(f"{path}: {prefix + key} has shape {tuple(value.shape)}, the {what} "
                                    f"needs {tuple(target.shape)}")
                target.copy_(value)


class UnreadableWeights(UserError):
    """A weights file that cannot be read at all (empty, truncated, not a weights file): no other loader is
    tried on it, since open_clip's would build the whole CLIP (10 GB for bigG) only to fail on it too."""


@contextmanager
def _user_errors_reading(path: str, what: str) -> Iterator[None]:
    """A checkpoint that cannot be read (not a weights file, truncated) -> a one-line UnreadableWeights."""
    try:
        yield
    except UserError:
        raise
    except load_errors() as err:
        if type(err) is KeyError:  # a tensor the config builds that the file lacks (a config of more layers)
            raise UnreadableWeights(f"{path}: cannot read the {what} weights from it (they lack "
                                    f"{printable(str(err.args[0] if err.args else err))}, which its config asks "
                                    "for: the config and the weights are not of one model)") from err
        raise UnreadableWeights(f"{path}: cannot read the {what} weights from it ({reason(err)})") from err


def _refetch(err: UserError, name: str, weights: str) -> UserError:
    """`err` about a damaged weights file, with the command that fetches it again where it came from the hub
    (`hf download` keeps a damaged cached file unless told --force-download)."""
    command = hub_download_command(name, weights)
    return UserError(f"{err}; fetch it again with `{command} --force-download`") if command else err


def _is_torchscript(path: str) -> bool:
    """Whether `path` is a TorchScript archive (OpenAI's CLIP checkpoints are): a zip file with the `code/`
    folder that torch.jit.save writes. dsl's reader refuses it; open_clip's loader converts it."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.split("/")[1:2] == ["code"] for name in archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def _load_open_clip_visual(
    name: str, pretrained: Optional[str], checkpoint: Optional[str], device: "str | torch.device"
) -> tuple[nn.Module, Preprocess]:
    model_cfg = _model_config(name)
    weights = checkpoint or pretrained
    # the tag's settings also where the weights are a local file: encoder.pretrained names what they are
    settings = tag_settings(name, pretrained)

    def build() -> nn.Module:
        return build_vision_tower(model_cfg["embed_dim"], model_cfg["vision_cfg"], settings.quick_gelu)

    if weights is None:
        # random weights, drawn where they will run (bigG's 1.8 B parameters take about 10 s to draw on a CPU,
        # a fraction of a second on a GPU)
        visual = seeded(build, device)
        return visual, settings.transform(visual.image_size)  # open_clip's own for random weights
    path = checkpoint_file(name, weights)
    visual = unfilled(build)
    try:
        copy_tower_weights(visual, path, ("visual.",), f"{name} vision tower")
    except UserError as ours:
        if isinstance(ours, UnreadableWeights) and not _is_torchscript(path):
            raise _refetch(ours, name, weights) from ours  # damaged: the first error is final
        # a file open_clip converts as it loads it: OpenAI's TorchScript archives, other projects' layouts,
        # positions saved for another image size
        log.info("%s: trying open_clip's own loader (%s)", path, ours)
        del visual  # the tower half filled: open_clip's loader builds its own, beside the whole file
        try:
            # with the tag's activation: open_clip 3.x builds `ViT-L-14` with GELU for `openai` and only warns
            model = open_clip.create_model(name, pretrained=weights, force_quick_gelu=settings.quick_gelu)
        except load_errors() as theirs:  # not a file open_clip reads either: the reason it is not ours is clearer
            raise ours from theirs
        visual = model.visual
    return visual, settings.transform(visual.image_size)


def _load_prior_visual(repo_id: str, subfolder: str, checkpoint: Optional[str]) -> tuple[nn.Module, Preprocess]:
    folder = Path(checkpoint) if checkpoint else _cached_subfolder(repo_id, subfolder)
    config_file, weight_files = folder / "config.json", sorted(folder.glob("*.safetensors"))
    if not config_file.is_file() or not weight_files:
        raise UserError(
            f"{folder} must hold config.json and model.safetensors (a CLIPVisionModelWithProjection); "
            f"fetch them with `{prior_encoder_weights(repo_id, subfolder).command}`"
        )
    config = read_prior_config(config_file)
    with _user_errors_reading(str(folder), "image encoder"):  # a broken file, key or shape: one line
        visual = unfilled(partial(vision_transformer_from_hf_config, config))  # every tensor is loaded next
        state = hf_to_open_clip_state_dict(_read_safetensors(weight_files), config["num_hidden_layers"])
        visual.load_state_dict(state)  # strict: a tensor the file lacks is refused, none is left unfilled
    return visual, ClipImageProcessor(config["image_size"])  # the prior's own preprocessing, not open_clip's


def _cached_subfolder(repo_id: str, subfolder: str) -> Path:
    """The cached snapshot's `subfolder` (fetched only if downloads are allowed)."""
    weights = prior_encoder_weights(repo_id, subfolder)
    try:
        root = weights.fetch()
    except (OSError, ValueError) as err:  # LocalEntryNotFoundError is an OSError
        raise UserError(
            f"the image encoder of {repo_id} ({subfolder}/) is not in the Hugging Face cache and could not be "
            f"downloaded: run `{weights.command}` or set encoder.checkpoint=/path/to/folder (config.json + "
            "model.safetensors)"
        ) from err
    return Path(root) / subfolder


def _read_safetensors(files: list[Path]) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    state: dict[str, Tensor] = {}
    for file in files:
        state.update(load_file(file))
    return state


def vision_transformer_from_hf_config(config: dict) -> "open_clip.transformer.VisionTransformer":
    """An open_clip VisionTransformer with the architecture of an HF CLIPVisionConfig (as a dict)."""
    parts = open_clip.transformer
    activations = {"gelu": nn.GELU, "quick_gelu": parts.QuickGELU}
    act = config.get("hidden_act", "quick_gelu")
    if act not in activations:
        raise UserError(f"hidden_act {act!r} of the image encoder is not supported (use gelu or quick_gelu)")
    width, hidden = config["hidden_size"], config["intermediate_size"]
    return parts.VisionTransformer(
        image_size=config["image_size"],
        patch_size=config["patch_size"],
        width=width,
        layers=config["num_hidden_layers"],
        heads=config["num_attention_heads"],
        # open_clip takes int(width * mlp_ratio); the half keeps float rounding from losing a unit (8192/1664)
        mlp_ratio=(hidden + 0.5) / width,
        output_dim=config["projection_dim"],
        act_layer=activations[act],
        norm_layer=partial(parts.LayerNorm, eps=config.get("layer_norm_eps", 1e-5)),
    )


def hf_to_open_clip_state_dict(hf: dict[str, Tensor], n_layers: int) -> dict[str, Tensor]:
    """Map CLIPVisionModelWithProjection keys onto open_clip VisionTransformer keys (1:1, q/k/v concatenated
    into in_proj, the projection transposed). Raises UserError on keys it does not account for."""
    rest = dict(hf)  # every key is popped once it is mapped, so that leftovers can be reported
    take = lambda key: rest.pop("vision_model." + key)  # noqa: E731
    out = {
        "class_embedding": take("embeddings.class_embedding"),
        "conv1.weight": take("embeddings.patch_embedding.weight"),
        "positional_embedding": take("embeddings.position_embedding.weight"),
        "proj": rest.pop("visual_projection.weight").T.contiguous(),
    }
    for p in ("weight", "bias"):
        out[f"ln_pre.{p}"] = take(f"pre_layrnorm.{p}")
        out[f"ln_post.{p}"] = take(f"post_layernorm.{p}")
        for i in range(n_layers):
            src, dst = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
            out[f"{dst}attn.in_proj_{p}"] = torch.cat([take(f"{src}self_attn.{x}_proj.{p}") for x in "qkv"])
            for hf_name, ours in (
                ("self_attn.out_proj", "attn.out_proj"),
                ("layer_norm1", "ln_1"),
                ("layer_norm2", "ln_2"),
                ("mlp.fc1", "mlp.c_fc"),
                ("mlp.fc2", "mlp.c_proj"),
            ):
                out[f"{dst}{ours}.{p}"] = take(f"{src}{hf_name}.{p}")
    unexpected = sorted(k for k in rest if not k.endswith("position_ids"))  # a buffer older files carry
    if unexpected:
        raise UserError(f"image encoder weights hold keys that are not mapped: {', '.join(unexpected[:5])}")
    return out


@contextmanager
def _user_errors(name: str, weights: Optional[str]) -> Iterator[None]:
    """Turn open_clip's and huggingface_hub's failures to find weights into a one-line UserError."""
    try:
        yield
    except (RuntimeError, OSError, ValueError) as err:
        command = hub_download_command(name, weights)
        fix = f"`{command}`" if command else "a download"
        reason = " ".join(str(err).split())
        raise UserError(
            f"open_clip weights {name}/{weights} could not be loaded ({reason}): fetch them with {fix} "
            "or set encoder.checkpoint=/path/to/weights"
        ) from err
