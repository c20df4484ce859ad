"""Loading timm and transformers vision transformers (`encoder.source: timm | hf`) with their libraries' own
preprocessing for those weights, from the Hugging Face cache only (or a local path); tiny random ones
(`encoder.name: tiny`) for tests and the `debug=tiny_timm` / `debug=tiny_dinov2` presets.

- timm: `encoder.name` is a timm model name with its pretrained tag (`vit_base_patch16_224.augreg_in21k_ft_in1k`);
  `encoder.pretrained: null` gives its architecture with random weights (seeded), anything else loads the
  weights of its timm hub repository from the cache (`encoder.checkpoint`: a local file instead). Preprocessing:
  `timm.data.resolve_data_config` + `create_transform` for that model's pretrained config.
- hf: `encoder.repo_id` (and `encoder.subfolder`, empty for none) names a transformers repository in the cache
  (`encoder.checkpoint`: a local folder instead): CLIP (its vision tower with the projection), SigLIP (vision
  tower), DINOv2 (with registers too), ViT and DeiT (their image classifier when the repository is one).
  Preprocessing: the repository's `AutoImageProcessor`.

No decoder was trained on these ViTs' embeddings: a run decodes them through a fitted adapter (`dsl adapter fit`,
then `adapter=FOLDER`; dsl_cli.adapters), and without one only the lenses that do not decode run.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from dsl_cli.errors import UserError
from dsl_cli.libraries import import_frozen
from dsl_cli.weights import extra_layers, load_errors, missing_tensors, reason

log = logging.getLogger("dsl_cli.encoder")
Preprocess = Callable[[Any], Tensor]  # PIL image -> [3, S, S]

SOURCES = ("timm", "hf")
HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                   "pytorch_model.bin.index.json")
TINY_SEED = 0
# Tiny random ViTs: 4 layers of 4 heads, 64-pixel images, LayerScale and two register tokens; the timm one pools
# the mean of its patch tokens through fc_norm and has a 1000-class head (the logit lens reads it), the DINOv2
# one reads its class token.
TINY_TIMM = dict(img_size=64, patch_size=16, embed_dim=64, depth=4, num_heads=4, init_values=0.1, reg_tokens=2,
                 global_pool="avg", num_classes=1000)
TINY_DINOV2 = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, mlp_ratio=4, image_size=64,
                   patch_size=16, layerscale_value=0.1, num_register_tokens=2)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def no_decoder(cfg: Any) -> UserError:
    """The one-line refusal of a lens that decodes, for these ViTs."""
    return UserError(f"encoder {cfg.source}:{label(cfg)} has no decoder in dsl: fit an adapter into a decoder's "
                     "embedding space (`dsl adapter fit` with this encoder and decoder=...; see `dsl adapter --help`) "
                     "and run with adapter=FOLDER, or use decode.enabled=false")


def timm_quick_gelu(name: str) -> bool:
    """Whether timm builds model `name` with QuickGELU (built on the meta device: no memory, no weights)."""
    timm = import_frozen("timm")

    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False)
    return any(type(m).__name__ == "QuickGELU" for m in model.modules())


def label(cfg: Any) -> str:
    if cfg.source == "timm" or cfg.name == "tiny":
        return cfg.name
    return str(cfg.checkpoint) if cfg.checkpoint else cfg.repo_id


def model_shape(cfg: Any) -> Optional[tuple[int, int]]:
    """(layers, heads) from configs alone where they are known without reading anything (the tiny models)."""
    if cfg.name == "tiny":
        tiny = TINY_TIMM if cfg.source == "timm" else TINY_DINOV2
        return (tiny.get("depth") or tiny["num_hidden_layers"]), (tiny.get("num_heads") or tiny["num_attention_heads"])
    return None


def needs(cfg: Any):
    """The weights `load_vit` reads (`dsl_cli.weights.Needs`, for the preflight before anything loads): the timm
    hub repository's weights file, or the transformers repository's config, processor config and weights; a
    local `encoder.checkpoint` that must be there; none for random weights."""
    from dsl_cli.weights import HubWeights

    if cfg.name == "tiny" or (cfg.pretrained is None and not cfg.checkpoint and cfg.source == "timm"):
        return [], []
    if cfg.checkpoint:
        path = Path(cfg.checkpoint).expanduser()
        ok = path.is_file() if cfg.source == "timm" else (path / "config.json").is_file()
        what = "a timm weights file" if cfg.source == "timm" else "a folder with config.json (save_pretrained)"
        return [], [] if ok else [f"encoder.checkpoint={cfg.checkpoint}: not {what}"]
    if cfg.source == "timm":
        timm = import_frozen("timm")

        pretrained = timm.models.get_pretrained_cfg(cfg.name) if timm.is_model(cfg.name) else None
        repo = getattr(pretrained, "hf_hub_id", None) if pretrained is not None else None
        if not repo:
            return [], [f"encoder.name={cfg.name}: timm names no Hugging Face repository for these weights"]
        return [HubWeights("image encoder", repo, (("model.safetensors", "pytorch_model.bin"),),
                           fetch=lambda: _download(repo, ["model.safetensors", "config.json"]))], []
    folder = f"{cfg.subfolder}/" if cfg.subfolder else ""
    files = [f"{folder}config.json"] + ([] if cfg.pretrained is None else
                                        [f"{folder}preprocessor_config.json", f"{folder}model.safetensors"])
    # the weights in any layout transformers loads: one file or shards, safetensors or an older repository's .bin
    needs = tuple((f,) if not f.endswith(".safetensors") else tuple(folder + name for name in HF_WEIGHT_FILES)
                  for f in files)
    return [HubWeights("image encoder", cfg.repo_id, needs, fetch=lambda: _download(cfg.repo_id, files))], []


def _download(repo: str, files: list[str]) -> None:
    from huggingface_hub import hf_hub_download

    for name in files:
        hf_hub_download(repo, name)


def load_vit(cfg: Any) -> tuple[nn.Module, Preprocess]:
    """(the library's model in eval mode on the CPU, its preprocessing) for encoder config `cfg`."""
    if cfg.source == "timm":
        return _timm_model(cfg)
    if cfg.source == "hf":
        return _hf_model(cfg)
    raise UserError(f"encoder.source={cfg.source!r} is not timm or hf")


def _seeded(build: Callable[[], nn.Module]) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        return build()


# ---- timm ------------------------------------------------------------------------------------------------------


def _timm_model(cfg: Any) -> tuple[nn.Module, Preprocess]:
    timm = import_frozen("timm")
    from timm.data import resolve_data_config
    from timm.models.vision_transformer import VisionTransformer

    if cfg.name == "tiny":
        model = _seeded(lambda: VisionTransformer(**TINY_TIMM))
        side = TINY_TIMM["img_size"]
        data = resolve_data_config({"input_size": (3, side, side), "crop_pct": 1.0, "mean": IMAGENET_MEAN,
                                    "std": IMAGENET_STD}, model=model)
        return model.eval(), _timm_preprocess(data)
    if not timm.is_model(cfg.name):
        raise UserError(f"encoder.name={cfg.name!r}: not a timm model (timm.list_models() lists them)")
    overlay = None
    if cfg.pretrained is not None or cfg.checkpoint:
        overlay = dict(file=_timm_weights_file(cfg))
    try:
        model = _seeded(lambda: timm.create_model(cfg.name, pretrained=overlay is not None,
                                                  pretrained_cfg_overlay=overlay))
    except load_errors() as err:  # a damaged file, a missing tensor, a tensor of another shape: timm's strict load
        where = overlay["file"] if overlay else "timm"
        raise UserError(f"encoder timm:{cfg.name}: its weights could not be read from {where} ({reason(err)}); "
                        f"{_timm_fix(cfg)}") from err
    data = resolve_data_config({}, model=model)
    return model.eval(), _timm_preprocess(data)


def _timm_fix(cfg: Any) -> str:
    """What to do about timm weights that could not be read: a local file, or the cached hub one."""
    if cfg.checkpoint:
        return f"give encoder.checkpoint a timm weights file of {cfg.name} (.safetensors or .pth)"
    return f"fetch them again with `{_timm_fetch_command(cfg)} --force-download`"


def _timm_fetch_command(cfg: Any) -> str:
    timm = import_frozen("timm")

    repo = getattr(timm.models.get_pretrained_cfg(cfg.name), "hf_hub_id", None)
    return f"hf download {repo} model.safetensors config.json"


def _timm_weights_file(cfg: Any) -> str:
    """The weights file: `encoder.checkpoint`, or the model's timm hub repository's in the cache (never fetched)."""
    if cfg.checkpoint:
        path = Path(cfg.checkpoint).expanduser()
        if not path.is_file():
            raise UserError(f"encoder.checkpoint={cfg.checkpoint}: no such file (timm weights, .safetensors or .pth)")
        return str(path)
    timm = import_frozen("timm")
    from huggingface_hub import try_to_load_from_cache

    pretrained = timm.models.get_pretrained_cfg(cfg.name)
    repo = getattr(pretrained, "hf_hub_id", None) if pretrained is not None else None
    if not repo:
        raise UserError(f"encoder timm:{cfg.name}: timm names no Hugging Face repository for these weights; "
                        "give a local file as encoder.checkpoint")
    for name in ("model.safetensors", "pytorch_model.bin"):
        found = try_to_load_from_cache(repo, name)
        if isinstance(found, str):
            return found
    raise UserError(f"encoder timm:{cfg.name}: weights not in the Hugging Face cache; fetch them with: "
                    f"hf download {repo} model.safetensors config.json")


# ---- transformers ----------------------------------------------------------------------------------------------


def _hf_model(cfg: Any) -> tuple[nn.Module, Preprocess]:
    transformers = import_frozen("transformers")

    if cfg.name == "tiny":
        config = transformers.Dinov2WithRegistersConfig(**TINY_DINOV2)
        model = _seeded(lambda: transformers.Dinov2WithRegistersModel(config))
        side = TINY_DINOV2["image_size"]
        processor = transformers.BitImageProcessor(size={"shortest_edge": side},
                                                   crop_size={"height": side, "width": side},
                                                   image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD))
        return model.eval(), _hf_preprocess(processor)
    where = dict(pretrained_model_name_or_path=cfg.checkpoint and str(Path(cfg.checkpoint).expanduser())
                 or cfg.repo_id, local_files_only=True)
    if not cfg.checkpoint and cfg.subfolder:
        where["subfolder"] = cfg.subfolder
    source = where["pretrained_model_name_or_path"]
    try:
        config = transformers.AutoConfig.from_pretrained(**where)
        model_class, config, options = _hf_class(config)
        if cfg.pretrained is None and not cfg.checkpoint:
            model = _seeded(lambda: model_class(config, **options))
        else:
            # sizes that do not match are reported in `info` (and refused) instead of raised without their names
            model, info = model_class.from_pretrained(**where, config=config, **options, output_loading_info=True,
                                                      ignore_mismatched_sizes=True)
            missing, extra = missing_tensors(info), extra_layers(info, model)
            if missing:
                raise UserError(f"encoder hf:{source}: its weights lack {missing} (or hold them in another shape "
                                f"than config.json says), which would be left random; {_hf_fix(cfg)}")
            if extra:
                raise UserError(f"encoder hf:{source}: its weights hold blocks past the {config_layers(config)} "
                                f"that config.json says ({extra}), which would be dropped; {_hf_fix(cfg)}")
        processor = transformers.AutoImageProcessor.from_pretrained(**where)
    except UserError:
        raise
    except OSError as err:  # a file not there (not cached, or not in the folder)
        where = "not a transformers model folder" if cfg.checkpoint else \
            "not in the Hugging Face cache or not a transformers model folder"
        raise UserError(f"encoder hf:{source}: {where} ({reason(err)}); {_hf_fix(cfg)}") from err
    except load_errors() as err:  # a damaged file, a config.json of the wrong shape or size
        raise UserError(f"encoder hf:{source}: cannot load it ({reason(err)}); {_hf_fix(cfg)}") from err
    return model.eval(), _hf_preprocess(processor)


def config_layers(config: Any) -> str:
    """'12 layers' from a transformers config (its vision tower's, for a whole CLIP's)."""
    count = getattr(getattr(config, "vision_config", None) or config, "num_hidden_layers", "?")
    return f"{count} layer{'' if count == 1 else 's'}"


def _hf_fix(cfg: Any) -> str:
    """What to do about a transformers model that could not be loaded: a local folder, or the hub's."""
    if cfg.checkpoint:
        return "give encoder.checkpoint a folder written by save_pretrained (config.json, model.safetensors, " \
               "preprocessor_config.json)"
    return f"fetch it with: hf download {cfg.repo_id} (with --force-download over damaged files)"


def _hf_class(config: Any) -> tuple[type, Any, dict]:
    """The transformers class whose forward gives this repository's image embedding (or logits), the config
    to build it from and the options it takes."""
    transformers = import_frozen("transformers")

    kind = config.model_type
    architectures = getattr(config, "architectures", None) or []
    if kind == "clip":  # a whole CLIP: its vision tower, with the projection the whole model's config sizes
        vision = config.vision_config
        vision.projection_dim = config.projection_dim
        return transformers.CLIPVisionModelWithProjection, vision, {}
    if kind == "clip_vision_model":  # a tower saved without its projection embeds into its own width
        alone = architectures and all(a == "CLIPVisionModel" for a in architectures)
        return (transformers.CLIPVisionModel if alone else transformers.CLIPVisionModelWithProjection), config, {}
    if kind in ("siglip", "siglip_vision_model"):
        return transformers.SiglipVisionModel, config, {}
    if kind in ("dinov2", "dinov2_with_registers"):
        return transformers.AutoModel, config, {}
    if kind in ("vit", "deit"):
        if any(a.endswith("ForImageClassification") for a in architectures):
            return (transformers.ViTForImageClassification if kind == "vit"
                    else transformers.DeiTForImageClassification), config, {}
        # the embedding is the class token of last_hidden_state: the pooler, which weights may lack, is not read
        return (transformers.ViTModel if kind == "vit" else transformers.DeiTModel), config, {"add_pooling_layer": False}
    raise UserError(f"transformers model type {kind!r}: dsl opens up clip, siglip, dinov2, vit and deit")


class LibraryPreprocess:
    """The library's own preprocessing (PIL image -> [3, S, S]), with the side S it feeds where that is fixed
    (`image_size`; None where it follows the picture), which `HookedEncoder` takes as its image size."""

    def __init__(self, transform: Callable[[Any], Tensor], image_size: Optional[int]):
        self.transform, self.image_size = transform, image_size

    def __call__(self, image) -> Tensor:
        # a grey or RGBA picture as three channels, as open_clip's and transformers' own transforms take it
        # (timm's normalises three channels and fails on one)
        if getattr(image, "mode", "RGB") != "RGB":
            image = image.convert("RGB")
        return self.transform(image)


def fed_size(preprocess: Any) -> Optional[int]:
    """The side the preprocessing of `load_vit` feeds (None where it is not fixed)."""
    return getattr(preprocess, "image_size", None)


def _timm_preprocess(data: dict) -> LibraryPreprocess:
    from timm.data import create_transform

    side = data["input_size"][-1] if data["input_size"][-1] == data["input_size"][-2] else None
    return LibraryPreprocess(create_transform(**data), side)


def _hf_preprocess(processor) -> LibraryPreprocess:
    def preprocess(image) -> Tensor:
        return processor(images=image.convert("RGB"), return_tensors="pt")["pixel_values"][0]

    return LibraryPreprocess(preprocess, _hf_fed_size(processor))


def _hf_fed_size(processor) -> Optional[int]:
    """The side of the square a transformers image processor outputs: its crop where it crops, else its
    resize where that is to a fixed height and width (a `shortest_edge` resize keeps the picture's shape)."""
    def square(size: Any) -> Optional[int]:
        size = dict(size or {})
        height, width = size.get("height"), size.get("width")
        return int(height) if height is not None and height == width else None

    if getattr(processor, "do_center_crop", False):
        return square(getattr(processor, "crop_size", None))
    if getattr(processor, "do_resize", True):
        return square(getattr(processor, "size", None))
    return None
