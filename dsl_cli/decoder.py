"""Batched, seeded decoding of CLIP image embeddings into pictures, one family of decoder per class.

A family is a `Decoder` subclass over one unmodified diffusers pipeline, registered in `FAMILIES` under the
name `decoder.family` gives it, plus one config in configs/decoder/:

| family | pipeline | decodes the image embeddings of (open_clip) |
|---|---|---|
| `kandinsky22` | `KandinskyV22Pipeline` | ViT-bigG-14 `laion2b_s39b_b160k` (1280 wide) |
| `kandinsky21` | `KandinskyPipeline` (+ the empty prompt) | ViT-L-14 `openai` (768 wide) |
| `unclip_h14` | `StableUnCLIPImg2ImgPipeline` (`image_embeds=`, `noise_level`) | ViT-H-14 `laion2b_s32b_b79k` (1024) |

This module only chooses what goes into a pipeline. Every item gets its own `torch.Generator`, and diffusers'
`randn_tensor` draws a list of generators item by item, for the initial latents, for the noise DDPM (and DDIM
with eta > 0, SDE-DPM) adds at each step, and for Stable unCLIP's noise augmentation of the image embeddings.
So a picture depends on its embedding, its seed and the device, not on the batch it was decoded in, up to the
float round-off of batched kernels (~1e-4 in float32; after rounding to 8 bits, at most one grey level in
0.03% of the values, measured on the CPU with the tiny models).

Keeping the GPU busy: `batch_size="auto"` fits the batch to the free device memory (two one-step probe
decodings measure what a picture costs, recorded for later runs of the same models), out-of-memory halves it, and during each pipeline call the scheduler
keeps its timesteps on the host (`HostTimesteps`), so that no step of the denoising loop waits for the GPU.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from functools import partial, wraps
from pathlib import Path
from typing import Any, ClassVar, Optional

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from dsl_cli.config import DecoderConfig
from dsl_cli.devices import Placed, seeded_on
from dsl_cli.errors import UserError
from dsl_cli.libraries import Library
from dsl_cli.memory import decode_memory_file, free_bytes, halving_batches, record_peaks, recorded_peaks
from dsl_cli.weights import HubWeights, Needs, load_errors, missing_tensors, reason, refuse_damaged_weights

log = logging.getLogger("dsl_cli.decoder")

diffusers = Library("diffusers")  # imported when a decoder is first built (1.5 to 3 s)
transformers = Library("transformers")  # its Stable unCLIP and Kandinsky 2.1 parts, likewise
kandinsky_text = Library("diffusers.pipelines.kandinsky.text_encoder")
unclip_normalizer = Library("diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer")

SCHEDULERS = {  # decode.scheduler -> the diffusers scheduler class
    "ddpm": "DDPMScheduler",
    "ddim": "DDIMScheduler",
    "dpm": "DPMSolverMultistepScheduler",
}  # not UniPC: diffusers' Kandinsky pipelines pass `generator` to `step()`, which UniPC does not take

# The Kandinsky 2.2 decoder's architecture (DESIGN.md section 2): UNet 1.253 B and MoVQ 67.8 M parameters.
REAL_UNET = dict(
    in_channels=4,
    out_channels=8,  # mean and variance; the pipeline keeps the mean
    down_block_types=("ResnetDownsampleBlock2D",) + ("SimpleCrossAttnDownBlock2D",) * 3,
    mid_block_type="UNetMidBlock2DSimpleCrossAttn",
    up_block_types=("SimpleCrossAttnUpBlock2D",) * 3 + ("ResnetUpsampleBlock2D",),
    block_out_channels=(384, 768, 1152, 1536),
    layers_per_block=3,
    cross_attention_dim=768,
    attention_head_dim=64,
    encoder_hid_dim=1280,
    encoder_hid_dim_type="image_proj",
    addition_embed_type="image",
    addition_embed_type_num_heads=64,
    resnet_time_scale_shift="scale_shift",
    class_embed_type=None,
    norm_num_groups=32,
    act_fn="silu",
    flip_sin_to_cos=True,
    sample_size=64,
)
REAL_MOVQ = dict(
    in_channels=3,
    out_channels=3,
    act_fn="silu",
    block_out_channels=(128, 256, 256, 512),
    down_block_types=("DownEncoderBlock2D",) * 3 + ("AttnDownEncoderBlock2D",),
    up_block_types=("AttnUpDecoderBlock2D",) + ("UpDecoderBlock2D",) * 3,
    latent_channels=4,
    vq_embed_dim=4,
    num_vq_embeddings=16384,
    layers_per_block=2,
    norm_num_groups=32,
    norm_type="spatial",
    sample_size=256,
)
# The dummy components of diffusers' own Kandinsky 2.2 decoder tests: embedding width 32 (the MoVQ below). One
# change: heads of 16 channels, not 4 (4 heads at the 64-channel level, the real decoder's 64-wide heads being
# out of reach): the CPU's attention kernel on 16 heads of 4 took 45 % of the tiny UNet's time, and the tiny
# decoding runs in most of the tests.
TINY_UNET = dict(
    REAL_UNET,
    down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
    up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
    block_out_channels=(32, 64),
    layers_per_block=1,
    cross_attention_dim=32,
    attention_head_dim=16,
    encoder_hid_dim=32,
    sample_size=32,
)
# The MoVQ has the real one's four levels (diffusers' dummy has two): latents an eighth of the picture's size,
# as in the real decoder, so that sizes a tiny decoder accepts are those a real one accepts (multiples of 64),
# and a tiny run's decoding took a quarter of the time it took on latents half the picture's size.
TINY_MOVQ = dict(
    REAL_MOVQ,
    block_out_channels=(32, 32, 32, 64),
    num_vq_embeddings=12,
    layers_per_block=1,
    norm_num_groups=8,
    sample_size=32,
)
# The released decoder's scheduler_config.json; DDPMScheduler's defaults supply the rest (fixed_small variance).
SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_schedule="linear",
    beta_start=0.00085,
    beta_end=0.012,
    clip_sample=False,
    prediction_type="epsilon",
    steps_offset=1,
)


# Kandinsky 2.1 (`kandinsky-community/kandinsky-2-1`): the 2.2 UNet conditioned on the image embedding (ViT-L/14,
# 768) and a text embedding (MultilingualCLIP: XLM-RoBERTa-large, 1024 wide, projected to 768); the same MoVQ.
REAL_UNET_21 = dict(REAL_UNET, encoder_hid_dim=1024, encoder_hid_dim_type="text_image_proj",
                    addition_embed_type="text_image")
REAL_TEXT_21 = dict(transformerDimSize=1024, imageDimSize=768, hidden_size=1024, num_hidden_layers=24,
                    num_attention_heads=16, intermediate_size=4096, vocab_size=250002, max_position_embeddings=514,
                    type_vocab_size=1, layer_norm_eps=1e-5)
# The dummy components of diffusers' own Kandinsky 2.1 tests (tests/pipelines/kandinsky/test_kandinsky.py).
TINY_UNET_21 = dict(TINY_UNET, encoder_hid_dim=32, encoder_hid_dim_type="text_image_proj",
                    addition_embed_type="text_image")
TINY_TEXT_21 = dict(transformerDimSize=32, imageDimSize=32, hidden_size=32, num_hidden_layers=5, num_attention_heads=4,
                    intermediate_size=37, vocab_size=1005)
SCHEDULER_21 = dict(SCHEDULER, set_alpha_to_one=False)  # the DDIM scheduler the Kandinsky 2.1 repository ships

# Stable unCLIP (`stabilityai/stable-diffusion-2-1-unclip`): the SD 2.1 UNet with the noise-augmented ViT-H/14
# image embedding (1024) and its noise level embedding as class labels; the SD VAE; the OpenCLIP ViT-H text tower.
REAL_UNET_UNCLIP = dict(
    sample_size=96, in_channels=4, out_channels=4,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, attention_head_dim=(5, 10, 20, 20),
    cross_attention_dim=1024, use_linear_projection=True, class_embed_type="projection",
    projection_class_embeddings_input_dim=2048,
)
REAL_VAE = dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2, sample_size=768)
REAL_TEXT_UNCLIP = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                        hidden_act="gelu", projection_dim=512, vocab_size=49408)
REAL_IMAGE_UNCLIP = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                         patch_size=14, image_size=224, projection_dim=1024, hidden_act="gelu")
# The dummy components of diffusers' own Stable unCLIP img2img tests (embedding width 32, VAE scale 1).
TINY_UNET_UNCLIP = dict(
    REAL_UNET_UNCLIP, sample_size=32, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), block_out_channels=(32, 64), layers_per_block=1,
    attention_head_dim=(2, 4), cross_attention_dim=32, projection_class_embeddings_input_dim=64, upcast_attention=True,
)
# two blocks (diffusers' own Stable Diffusion tests): latents half the picture's size; with AutoencoderKL's
# default of one block they were its full size, and the tiny UNet's attention on 4,096 positions took most
# of a tiny Stable unCLIP run
TINY_VAE = dict(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2)
TINY_TEXT_UNCLIP = dict(bos_token_id=0, eos_token_id=2, pad_token_id=1, hidden_size=32, projection_dim=32,
                        intermediate_size=37, num_attention_heads=4, num_hidden_layers=5, vocab_size=1000)
TINY_IMAGE_UNCLIP = dict(hidden_size=32, projection_dim=32, num_hidden_layers=5, num_attention_heads=4, image_size=32,
                         intermediate_size=37, patch_size=1)
SCHEDULER_UNCLIP = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                        prediction_type="v_prediction", set_alpha_to_one=False, steps_offset=1, clip_sample=False)
NOISING_UNCLIP = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")  # image_noising_scheduler
NOISE_LEVELS = NOISING_UNCLIP["num_train_timesteps"]  # decoder.noise_level: 0 to NOISE_LEVELS - 1
UNCLIP_SIZE_MULTIPLE = 8  # the pipeline refuses other sizes (check_inputs), whatever its VAE
TINY_WIDTH = 32  # the embedding width of every family's dummy components (and of the tiny encoder)


SOURCES = ("pretrained", "random", "tiny")
CPU_BATCH = 8  # `batch_size="auto"` off CUDA, where memory is not what limits a batch
AUTO_MARGIN = 0.15  # share of the free device memory that `auto` leaves unused (fragmentation, cuDNN workspaces)


def check_request(source: str, scheduler: str, height: int | None = None, width: int | None = None,
                  family: str = "kandinsky22") -> None:
    """Refuse, before any model is built, an unknown family, source or scheduler, or a picture size that the
    pipeline would silently round or refuse (a multiple of `Decoder.size_multiple_for`)."""
    cls = get_family(family)
    if source not in SOURCES:
        raise UserError(f"decoder.source={source!r}: choose one of {', '.join(SOURCES)}")
    if scheduler not in SCHEDULERS:
        raise UserError(f"decode.scheduler={scheduler!r}: choose one of {', '.join(SCHEDULERS)}")
    multiple = cls.size_multiple_for(source)
    for key, value in (("decode.height", height), ("decode.width", width)):
        if value is not None and value % multiple:
            raise UserError(f"{key}={value}: must be a multiple of {multiple} for this decoder (e.g. "
                            f"{max(multiple, round(value / multiple) * multiple)})")


def check_pairing(space: Any, cfg: DecoderConfig, key: str = "encoder") -> None:
    """Refuse, before any model is built, an encoder whose image embeddings the decoder `cfg` cannot decode:
    `space` (a `dsl_cli.encoder.EmbeddingSpace`) of another width, or, for a pretrained decoder, of another
    CLIP than the one it was trained on (a random-weight or local-file encoder is judged by its model). `key`
    is the setting that chose the encoder (`adapter.target` for an adapter's target space)."""
    cls = get_family(cfg.family)
    width, (model, tag) = cls.width_of(cfg), cls.clip
    fits = [f"decoder={other.name}" for other in FAMILIES.values() if other.clip == (space.model, space.weights)]
    fix = f"use {key}={'tiny' if cfg.source == 'tiny' else cls.encoder_preset}" + "".join(
        f" or {f}" for f in fits)
    if space.width != width:
        raise UserError(f"encoder {space.label} gives {space.width}-wide image embeddings but decoder {cfg.family} "
                        f"({cfg.source}) decodes {width}-wide ones: {fix}")
    if cfg.source == "pretrained" and (space.model != model or space.weights not in (None, tag)):
        raise UserError(f"encoder {space.label} embeds images in another space than the one decoder {cfg.family} "
                        f"was trained on ({model} {tag}): {fix}")


def get_family(name: str) -> type["Decoder"]:
    """The `Decoder` class registered as `decoder.family=name`."""
    if name not in FAMILIES:
        raise UserError(f"decoder.family={name!r}: choose one of {', '.join(FAMILIES)} "
                        "(one of your own: import the module that registers it, then call dsl_cli.cli.main; "
                        "docs/extending.md)")
    return FAMILIES[name]


def decoder_bytes(source: str, dtype: torch.dtype, family: str = "kandinsky22") -> int:
    """Bytes the weights of the decoder of `family` that `source` names take in `dtype` (a pretrained one has
    the real architecture), counted on the meta device: nothing is built or read."""
    pipe = get_family(family).build(source != "tiny", "meta")
    modules = [module for module in pipe.components.values() if isinstance(module, torch.nn.Module)]
    return sum(p.numel() for module in modules for p in module.parameters()) * torch.finfo(dtype).bits // 8


def load_decoder(
    cfg: DecoderConfig,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    scheduler: Optional[str] = None,
    channels_last: bool = False,
    compile_unet: bool = False,
) -> "Decoder":
    """Build the decoder of family `cfg.family` that `cfg.source` names (pretrained | random | tiny) on `device`
    in `dtype`, with `scheduler` (None: the config's, `cfg.scheduler`: an API caller's
    DecoderConfig(scheduler="ddim") was built with DDPM).

    channels_last and compile_unet are GPU speed-ups (NHWC convolutions; torch.compile of the UNet, which costs
    a minute of compilation per new shape); neither changes what is computed beyond round-off.
    """
    scheduler = str(scheduler or cfg.scheduler)
    check_request(cfg.source, scheduler, family=cfg.family)
    cls = get_family(cfg.family)
    pipe = cls.load_pretrained(cfg, dtype) if cfg.source == "pretrained" else cls.build(cfg.source == "random", device)
    pipe.to(device)
    if pipe.dtype != dtype:  # diffusers warns on every cast with a dtype, even a no-op one
        pipe.to(dtype=dtype)
    pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config)
    if channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
        getattr(pipe, cls.autoencoder).to(memory_format=torch.channels_last)
    if compile_unet:
        pipe.unet = torch.compile(pipe.unet)
    return cls.from_config(pipe, cfg)


def make_scheduler(name: str, config: dict):
    """The scheduler `decode.scheduler` names, built from the checkpoint's scheduler config (its betas,
    prediction type and timestep spacing kept). Always rebuilt: a saved pipeline may ship any scheduler
    class, and the one named is the one that must run."""
    return scheduler_class(name).from_config(config)


def scheduler_class(name: str) -> type:
    """The diffusers scheduler class `decode.scheduler` names (ddpm, ddim, dpm)."""
    return getattr(diffusers, SCHEDULERS[name])


def _seeded(build: Any, *args, **kwargs) -> Any:
    """`build(*args, **kwargs)` after torch.manual_seed(0), as each dummy component of diffusers' tests."""
    torch.manual_seed(0)
    return build(*args, **kwargs)


class Decoder(Placed, ABC):
    """Decodes CLIP image embeddings with one unmodified diffusers pipeline, in seeded batches.

    A family (subclass) says which pipeline, how to build its components (pretrained, random, tiny), which
    CLIP image embeddings it decodes (`clip`, `width`), what it takes as the unconditional embedding
    (`negative_embed`) and what goes into one pipeline call (`_inputs`). Batching, per-item seeds,
    out-of-memory halving and batch-size fitting are the same for every family.
    """

    name: ClassVar[str]  # decoder.family
    title: ClassVar[str]  # for messages: "the Kandinsky 2.2 decoder"
    pipeline: ClassVar[type]  # the diffusers pipeline class (or `Library.attribute`: imported when read)
    autoencoder: ClassVar[str]  # the pipeline's latents-to-pixels module
    clip: ClassVar[tuple[str, str]]  # the open_clip (model, pretrained tag) whose image embeddings it decodes
    encoder_preset: ClassVar[str]  # the encoder config that gives those embeddings
    width: ClassVar[int]  # their width (a tiny decoder takes the tiny encoder's TINY_WIDTH)
    hub_files: ClassVar[tuple[tuple[str, ...], ...]]  # what from_pretrained reads (alternatives per file)
    hub_args: ClassVar[str] = "--exclude '*.bin'"  # `hf download REPO ...`: its files but the duplicates
    width_key: ClassVar[tuple[str, str]]  # (model folder, config key) that give a saved pipeline's width

    def __init__(self, pipe: Any):
        self.pipe = pipe
        # (height, width, guidance) -> the probes' peaks of one and two pictures: a run that fits its batch
        # again (for its extra seeds and baselines, or after parking the encoder) probes each shape once
        self.probed: dict[tuple[int, int, float], tuple[int, int]] = {}
        pipe.set_progress_bar_config(disable=True)  # one bar over items (ours) instead of one per batch

    @classmethod
    def from_config(cls, pipe: Any, cfg: DecoderConfig) -> "Decoder":
        """The decoder over `pipe` with the family's settings from `cfg` (none, unless the family has some)."""
        return cls(pipe)

    @classmethod
    @abstractmethod
    def build(cls, real: bool, device: str | torch.device) -> Any:
        """The pipeline with random weights: the released architecture (`real`) or diffusers' dummy one."""

    @classmethod
    @abstractmethod
    def size_multiple_for(cls, source: str) -> int:
        """What height and width must be multiples of, for a decoder of `source` (before it is built)."""

    @classmethod
    def width_for(cls, source: str) -> int:
        """The image-embedding width a decoder of `source` takes (before it is built)."""
        return TINY_WIDTH if source == "tiny" else cls.width

    @classmethod
    def load_pretrained(cls, cfg: DecoderConfig, dtype: torch.dtype) -> Any:
        """From a local folder or the Hugging Face cache (HF_HUB_OFFLINE is honoured by diffusers itself).
        Each model of the pipeline is loaded first on its own, so that one whose weights file lacks tensors
        (which diffusers and transformers would fill with random ones, with a warning) is refused."""
        path = os.path.expanduser(cfg.path) if cfg.path else None
        if path is not None and not os.path.isdir(path):
            raise UserError(f"decoder.path={cfg.path}: no such folder (give the folder of a saved "
                            f"{cls.pipeline.__name__})")
        where = path or cfg.repo_id
        index_file = _index_file(path, cfg.repo_id)
        models = {}
        if index_file is not None:  # not there: from_pretrained says so below, in its own words
            index = _read_json(index_file)
            cls.check_index(index, str(index_file), cfg)
            models = {name: cls._load_model(where, name, entry, dtype, cfg)
                      for name, entry in index.items() if not name.startswith("_")}
        try:
            return cls.pipeline.from_pretrained(where, torch_dtype=dtype,
                                                **{k: model for k, model in models.items() if model is not None})
        except OSError as err:  # not cached while offline, no network, or an incomplete folder
            fix = (_refetch(cls, cfg) if path else
                   f"run `{cls.hub_weights(cfg.repo_id).command}` once online, or set decoder.path=/local/folder")
            raise UserError(f"cannot load {cls.title} {cfg.path or cfg.repo_id!r} ({type(err).__name__}): "
                            f"{fix}") from err
        except load_errors() as err:
            raise UserError(f"cannot load {cls.title} from {where} ({reason(err)}): {_refetch(cls, cfg)}") from err

    @classmethod
    def check_index(cls, index: Any, file: str, cfg: DecoderConfig) -> None:
        """Refuse a pipeline index (model_index.json) that is not this family's pipeline, naming the
        `decoder=` that loads it where it is another family's, or that lacks one of its components."""
        expected = cls.pipeline.__name__
        if not isinstance(index, dict) or not isinstance(index.get("_class_name"), str):
            raise UserError(f"{file} is not the index of a saved {expected} (a JSON object naming its "
                            f"_class_name and components): {_refetch(cls, cfg)}")
        saved = index["_class_name"]
        if saved != expected:
            other = [name for name, family in FAMILIES.items() if family.pipeline.__name__ == saved]
            fix = f"use decoder={other[0]}" if other else f"give the folder of a saved {expected}"
            raise UserError(f"{file} is a saved {saved}, but decoder {cfg.family} loads a {expected}: {fix}")
        required = [name for name, parameter in inspect.signature(cls.pipeline.__init__).parameters.items()
                    if name != "self" and parameter.default is inspect.Parameter.empty]
        missing = [name for name in required if not _is_component(index.get(name))]
        if missing:
            raise UserError(f"{file} lists no {', '.join(missing)} (a {expected} needs {', '.join(required)}): "
                            f"{_refetch(cls, cfg)}")

    @classmethod
    def _load_model(cls, where: str, name: str, entry: Any, dtype: torch.dtype, cfg: DecoderConfig) -> Any:
        """Component `name` of the pipeline when it is a model (None otherwise: a scheduler, a tokenizer),
        loaded by its own library's `from_pretrained`; refused where its weights lack a tensor or hold one of
        another shape than its config.json builds."""
        model_class = _component_class(entry)
        if model_class is None:
            return None
        library_dtype = {"dtype": dtype} if issubclass(model_class, transformers.PreTrainedModel) else {
            "torch_dtype": dtype}
        with _loading_errors(cls, f"{where}/{name}", cfg):
            model, info = model_class.from_pretrained(where, subfolder=name, output_loading_info=True,
                                                      **library_dtype)
        missing = missing_tensors(info)
        if missing:
            raise UserError(f"{where}/{name}: its weights lack {missing} (or hold them in another shape than "
                            f"its config.json says), which would be left random: {_refetch(cls, cfg)}")
        # transformers before 4.56 takes `torch_dtype` and would keep `dtype` as a config entry: the pipeline
        # does not convert the models it is given, so they are in the run's precision here whatever the version
        return model if model.dtype == dtype else model.to(dtype=dtype)

    @classmethod
    def hub_weights(cls, repo: str) -> HubWeights:
        """This family's pipeline in hub repository `repo`: the files its `from_pretrained` reads (`hub_files`:
        .safetensors preferred, .bin accepted), fetched by the pipeline's own `download`."""
        return HubWeights("decoder", repo, cls.hub_files, args=cls.hub_args, fetch=lambda: cls.pipeline.download(repo))

    @classmethod
    def needs(cls, cfg: DecoderConfig) -> Needs:
        """The weights `load_pretrained` reads for `cfg` (for the preflight, before anything loads): the
        pipeline from the hub, or a local folder that must hold a saved pipeline; none for random weights."""
        if cfg.source != "pretrained":
            return [], []
        if cfg.path is None:
            return [cls.hub_weights(cfg.repo_id)], []
        index = Path(cfg.path).expanduser() / "model_index.json"
        if not index.is_file():
            return [], [f"decoder.path={cfg.path}: not the folder of a saved {cls.pipeline.__name__} "
                        "(no model_index.json)"]
        try:  # another family's pipeline, or a damaged index, is told before any model loads
            cls.check_index(_read_json(index), str(index), cfg)
        except UserError as err:
            return [], [str(err)]
        return [], []

    @classmethod
    def width_of(cls, cfg: DecoderConfig) -> int:
        """The image-embedding width the decoder `cfg` takes, before it is built: a saved pipeline's
        (`decoder.path`) as its config says (`width_key`), the family's otherwise."""
        folder, key = cls.width_key
        if cfg.source != "pretrained" or not cfg.path:
            return cls.width_for(cfg.source)
        root = Path(cfg.path).expanduser()
        file = root / folder / "config.json"
        if not (root / "model_index.json").is_file() or not file.is_file():
            return cls.width_for(cfg.source)  # the weights preflight says what the folder lacks
        cls.check_index(_read_json(root / "model_index.json"), str(root / "model_index.json"), cfg)
        config = _read_json(file)
        width = config.get(key) if isinstance(config, dict) else None
        if type(width) is not int or width < 1:
            raise UserError(f"{file}: {key}={width!r}: must be a positive integer (the image-embedding width); "
                            f"{_refetch(cls, cfg)}")
        return width

    @property
    def placement(self) -> torch.Tensor:
        return next(self.pipe.unet.parameters())

    @property
    @abstractmethod
    def embed_dim(self) -> int:
        """The width E of the image embeddings it decodes."""

    @property
    @abstractmethod
    def size_multiple(self) -> int:
        """Height and width must be multiples of this; the pipeline rounds or refuses other sizes."""

    def negative_embed(self, encoder: Any) -> torch.Tensor:
        """[1, E]: the unconditional image embedding, as the family's prior makes it: the encoder's embedding
        of an all-zeros image in normalised pixel space (both Kandinsky priors' `get_zero_embed`)."""
        return encoder.zero_embed()

    @abstractmethod
    def _inputs(self, embeds: torch.Tensor, negative: torch.Tensor) -> dict:
        """The pipeline's conditioning arguments for one batch: embeds [B, E], negative [1, E]."""

    def decode(self, embeds: torch.Tensor, negative: torch.Tensor, seeds: Sequence[int] | int, height: int = 512,
               width: int = 512, **options: Any) -> np.ndarray:
        """Decode embeddings [N,E] -> float32 images [N,H,W,3] in [0,1], all at once; `options` (steps,
        guidance, batch_size, progress) and their defaults as for `iter_decode`, which streams the batches."""
        out = np.empty((len(embeds), height, width, 3), dtype=np.float32)
        batches = self.iter_decode(embeds, negative, seeds, height, width, **options)
        for indices, images in batches:
            out[indices] = images
        return out

    def iter_decode(
        self,
        embeds: torch.Tensor,
        negative: torch.Tensor,
        seeds: Sequence[int] | int,
        height: int = 512,
        width: int = 512,
        steps: int = 100,
        guidance: float = 4.0,
        batch_size: int | str = "auto",
        progress: bool = True,
    ) -> Iterator[tuple[list[int], np.ndarray]]:
        """Yield (indices, images [B,H,W,3] float32 in [0,1]) batch by batch, in order, as each finishes.

        embeds [N,E]; negative [1,E] or [E] (the unconditional embedding, shared by all items); seeds one
        per item or one for all. guidance <= 1 switches classifier-free guidance off (negative unused).
        batch_size: pictures per pipeline call, or "auto" (`fit_batch_size`). On CUDA out-of-memory the batch
        is halved (for the rest of the call) and the same items are retried.
        """
        n = len(embeds)
        seed_list = [seeds] * n if isinstance(seeds, int) else list(seeds)
        if len(seed_list) != n:
            raise ValueError(f"{len(seed_list)} seeds for {n} embeddings")
        m = self.size_multiple
        if height % m or width % m:
            raise UserError(f"decode height/width {height}x{width}: must be multiples of {m}")
        # The pipeline casts embeddings only when it applies guidance, so do it here for both cases.
        embeds = embeds.to(self.device, self.dtype)
        negative = negative.reshape(1, -1).to(self.device, self.dtype)
        if batch_size == "auto":
            batch_size = self.fit_batch_size(n, height, width, guidance)

        def run(start: int, stop: int) -> np.ndarray:
            return self._run(embeds[start:stop], negative, seed_list[start:stop], height, width, steps, guidance)

        with tqdm(total=n, desc="decode", unit="img", disable=not progress) as bar:
            for start, stop, images in halving_batches(n, batch_size, run, self.device, "decoding", log):
                bar.update(stop - start)
                yield list(range(start, stop)), images

    def _run(
        self,
        embeds: torch.Tensor,
        negative: torch.Tensor,
        seeds: list[int],
        height: int,
        width: int,
        steps: int,
        guidance: float,
    ) -> np.ndarray:
        """One pipeline call on one batch, with one generator per item."""
        # Fresh generators per call: a failed (out-of-memory) attempt may already have drawn from them.
        generators = [torch.Generator(self.device).manual_seed(s) for s in seeds]
        with host_timesteps(self.pipe):
            return self.pipe(
                **self._inputs(embeds, negative),
                generator=generators,
                height=height,
                width=width,
                num_inference_steps=steps,
                guidance_scale=guidance,
                output_type="np",
            ).images

    def fit_batch_size(self, n: int, height: int, width: int, guidance: float) -> int:
        """`batch_size="auto"`: the largest batch (at most n) whose decoding fits in the free device memory
        with AUTO_MARGIN of it to spare. Two one-step probe decodings (batch 1 and 2) give the memory of one
        picture and the fixed part, once per shape and decoder; off CUDA, CPU_BATCH (memory is not the limit
        there)."""
        if self.device.type != "cuda":
            return max(1, min(n, CPU_BATCH))
        shape = (height, width, guidance)
        if shape not in self.probed:  # peaks above the memory in use before: the same whatever else is there
            self.probed[shape] = self._peaks(height, width, guidance)
        one, two = self.probed[shape]
        batch = batch_that_fits(n, one, two, free_bytes(self.device))
        log.info("decode batch size auto: %d (%.2f GiB per picture)", batch, max(two - one, 1) / 2**30)
        return batch

    def _peaks(self, height: int, width: int, guidance: float) -> tuple[int, int]:
        """The probes' peaks of one and two pictures at this shape, as an earlier run on the same kind of GPU with
        the same libraries, models and precision recorded them (`memory.recorded_peaks`: no probe decoding),
        else measured and recorded. A record gone stale (a new driver) is caught by out-of-memory halving."""
        key = self._memory_key(height, width, guidance)
        peaks = recorded_peaks(key)
        if peaks is None:
            peaks = self._probe_peak(1, height, width, guidance), self._probe_peak(2, height, width, guidance)
            record_peaks(key, peaks)
        else:
            log.info("decode memory at %dx%d from an earlier run's probes (%s)", height, width, decode_memory_file())
        return peaks

    def _memory_key(self, height: int, width: int, guidance: float) -> str:
        """What the probes' peaks depend on: the GPU, torch and diffusers, the allocator's settings, the
        pipeline's models (class, architecture, memory layout; not their weights or where they came from),
        the precision and the shape. A digest of it, and the shape in words."""
        gpu = torch.cuda.get_device_properties(self.device)
        models = {name: _architecture(module) for name, module in self.pipe.components.items()
                  if isinstance(module, torch.nn.Module)}
        what = [gpu.name, gpu.total_memory, torch.__version__, torch.version.cuda, diffusers.__version__,
                os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""), str(self.dtype), models]
        digest = hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]
        return f"{digest} {height}x{width} guidance {guidance:g}"

    def _probe_peak(self, batch: int, height: int, width: int, guidance: float) -> int:
        """Peak device memory, in bytes above the level before, of decoding `batch` pictures in one step.
        A compiled UNet runs eagerly here: probing must not compile it for shapes it will never decode."""
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        base = torch.cuda.memory_allocated(self.device)
        embeds = torch.zeros(batch, self.embed_dim, device=self.device, dtype=self.dtype)
        eager = getattr(torch.compiler, "set_stance", None)  # torch >= 2.6
        with eager("force_eager") if eager else nullcontext():
            self._run(embeds, embeds[:1], [0] * batch, height, width, 1, guidance)
        return torch.cuda.max_memory_allocated(self.device) - base


def _architecture(module: torch.nn.Module) -> tuple[str, dict, bool]:
    """A model's class, its config without the entries that say where and by what it was saved
    (`_name_or_path`, `transformers_version`, ...), and whether its convolutions are channels-last: what its
    memory depends on."""
    module = getattr(module, "_orig_mod", module)  # torch.compile's wrapper: probes run the model eagerly
    config = getattr(module, "config", {})
    config = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    convs = [p for p in module.parameters() if p.dim() == 4 and p.shape[-1] > 1]  # 1x1 kernels are both layouts
    nhwc = bool(convs) and convs[0].is_contiguous(memory_format=torch.channels_last)
    kept = {k: v for k, v in config.items() if not k.startswith("_") and not k.endswith("_version")}
    return type(module).__name__, kept, nhwc


def model_files(folder: str, stem: str = "diffusion_pytorch_model") -> tuple[tuple[str, ...], ...]:
    """The hub files of one diffusers model of a pipeline: its config, and its weights (.safetensors, or .bin)."""
    return (f"{folder}/config.json",), (f"{folder}/{stem}.safetensors", f"{folder}/{stem}.bin")


# transformers' SAFE_WEIGHTS_NAME and WEIGHTS_NAME, written down so that listing a family's files imports
# nothing (tests/test_weights.py compares them with transformers.utils)
TRANSFORMERS_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


def transformers_files(folder: str) -> tuple[tuple[str, ...], ...]:
    """The hub files of one transformers model of a pipeline: its config, and its weights under transformers'
    own names (`TRANSFORMERS_WEIGHTS`)."""
    return (f"{folder}/config.json",), tuple(f"{folder}/{name}" for name in TRANSFORMERS_WEIGHTS)


class _Kandinsky(Decoder):
    """What the Kandinsky decoders share: a MoVQ whose scale factor, squared, their sizes must be multiples of."""

    autoencoder = "movq"

    @classmethod
    def size_multiple_for(cls, source: str) -> int:
        movq = TINY_MOVQ if source == "tiny" else REAL_MOVQ  # a pretrained decoder has the real architecture
        return (2 ** (len(movq["block_out_channels"]) - 1)) ** 2

    @property
    def size_multiple(self) -> int:
        return self.pipe.movq_scale_factor**2


class KandinskyDecoder(_Kandinsky):
    """Kandinsky 2.2 (`KandinskyV22Pipeline`): the image embedding and the unconditional one, nothing else."""

    name, title = "kandinsky22", "the Kandinsky 2.2 decoder"
    pipeline = Library.attribute(diffusers, "KandinskyV22Pipeline")
    clip, encoder_preset, width = ("ViT-bigG-14", "laion2b_s39b_b160k"), "kandinsky_prior", 1280
    width_key = ("unet", "encoder_hid_dim")  # what `embed_dim` reads
    hub_files = (("model_index.json",), ("scheduler/scheduler_config.json",), *model_files("unet"),
                 *model_files("movq"))

    @classmethod
    def build(cls, real: bool, device: str | torch.device) -> diffusers.KandinskyV22Pipeline:
        with seeded_on(device):
            unet = _seeded(diffusers.UNet2DConditionModel, **(REAL_UNET if real else TINY_UNET))
            movq = _seeded(diffusers.VQModel, **(REAL_MOVQ if real else TINY_MOVQ))
        return diffusers.KandinskyV22Pipeline(unet=unet, scheduler=diffusers.DDPMScheduler(**SCHEDULER), movq=movq)

    @property
    def embed_dim(self) -> int:
        return self.pipe.unet.config.encoder_hid_dim

    def _inputs(self, embeds: torch.Tensor, negative: torch.Tensor) -> dict:
        return dict(image_embeds=embeds, negative_image_embeds=negative.expand(len(embeds), -1))  # paired by row


class Kandinsky21Decoder(_Kandinsky):
    """Kandinsky 2.1 (`KandinskyPipeline`): the image embedding and the unconditional one, plus a text prompt,
    which is the empty one (as for an image variation), through the pipeline's own MultilingualCLIP."""

    name, title = "kandinsky21", "the Kandinsky 2.1 decoder"
    pipeline = Library.attribute(diffusers, "KandinskyPipeline")
    clip, encoder_preset, width = ("ViT-L-14", "openai"), "vitl14", 768
    width_key = ("unet", "cross_attention_dim")  # what `embed_dim` reads
    hub_files = (*KandinskyDecoder.hub_files, *transformers_files("text_encoder"),
                 ("tokenizer/tokenizer_config.json",),
                 ("tokenizer/tokenizer.json", "tokenizer/sentencepiece.bpe.model"))

    @classmethod
    def build(cls, real: bool, device: str | torch.device) -> diffusers.KandinskyPipeline:
        with seeded_on(device):
            text = _seeded(kandinsky_text.MultilingualCLIP,
                           kandinsky_text.MCLIPConfig(**(REAL_TEXT_21 if real else TINY_TEXT_21))).eval()
            unet = _seeded(diffusers.UNet2DConditionModel, **(REAL_UNET_21 if real else TINY_UNET_21))
            movq = _seeded(diffusers.VQModel, **(REAL_MOVQ if real else TINY_MOVQ))
        return diffusers.KandinskyPipeline(text_encoder=text, tokenizer=local_xlm_tokenizer(), unet=unet,
                                           scheduler=diffusers.DDIMScheduler(**SCHEDULER_21), movq=movq)

    @property
    def embed_dim(self) -> int:
        return self.pipe.unet.config.cross_attention_dim  # TextImageProjection's image_embed_dim

    def _inputs(self, embeds: torch.Tensor, negative: torch.Tensor) -> dict:
        return dict(prompt=[""] * len(embeds), image_embeds=embeds,
                    negative_image_embeds=negative.expand(len(embeds), -1))


class UnclipDecoder(Decoder):
    """Stable unCLIP (`StableUnCLIPImg2ImgPipeline` given `image_embeds=`): the image embedding, noised to
    `noise_level` (0 to 999) by the pipeline, and the empty prompt. Its unconditional image embedding is fixed
    by the pipeline itself (zeros, after the noise augmentation); `negative_embed` returns those zeros."""

    name, title = "unclip_h14", "the Stable unCLIP decoder"
    pipeline = Library.attribute(diffusers, "StableUnCLIPImg2ImgPipeline")
    clip, encoder_preset, width = ("ViT-H-14", "laion2b_s32b_b79k"), "vith14", 1024
    width_key = ("image_normalizer", "embedding_dim")  # what `embed_dim` reads
    autoencoder = "vae"
    # the repository also holds the original checkpoints; the installed `hf` takes one pattern per --exclude
    hub_args = "--exclude '*.bin' --exclude '*.ckpt' --exclude '*fp16*'"
    hub_files = (
        ("model_index.json",), ("scheduler/scheduler_config.json",), ("image_noising_scheduler/scheduler_config.json",),
        ("feature_extractor/preprocessor_config.json",), ("tokenizer/tokenizer_config.json",),
        ("tokenizer/vocab.json",), ("tokenizer/merges.txt",), *model_files("unet"), *model_files("vae"),
        *model_files("image_normalizer"), *transformers_files("text_encoder"), *transformers_files("image_encoder"),
    )

    def __init__(self, pipe: diffusers.StableUnCLIPImg2ImgPipeline, noise_level: int = 0):
        super().__init__(pipe)
        self.noise_level = noise_level

    @classmethod
    def from_config(cls, pipe: diffusers.StableUnCLIPImg2ImgPipeline, cfg: DecoderConfig) -> "UnclipDecoder":
        return cls(pipe, cfg.noise_level)

    @classmethod
    def build(cls, real: bool, device: str | torch.device) -> diffusers.StableUnCLIPImg2ImgPipeline:
        with seeded_on(device):
            image = _seeded(transformers.CLIPVisionModelWithProjection, transformers.CLIPVisionConfig(
                **(REAL_IMAGE_UNCLIP if real else TINY_IMAGE_UNCLIP))).eval()
            normalizer = _seeded(unclip_normalizer.StableUnCLIPImageNormalizer,
                                 embedding_dim=image.config.projection_dim).eval()
            text = _seeded(transformers.CLIPTextModel,
                           transformers.CLIPTextConfig(**(REAL_TEXT_UNCLIP if real else TINY_TEXT_UNCLIP))).eval()
            unet = _seeded(diffusers.UNet2DConditionModel, **(REAL_UNET_UNCLIP if real else TINY_UNET_UNCLIP)).eval()
            vae = _seeded(diffusers.AutoencoderKL, **(REAL_VAE if real else TINY_VAE)).eval()
        size = image.config.image_size
        return diffusers.StableUnCLIPImg2ImgPipeline(
            feature_extractor=transformers.CLIPImageProcessor(crop_size=size, size=size), image_encoder=image,
            image_normalizer=normalizer, image_noising_scheduler=diffusers.DDPMScheduler(**NOISING_UNCLIP),
            tokenizer=transformers.CLIPTokenizer(model_max_length=77), text_encoder=text, unet=unet,
            scheduler=diffusers.DDIMScheduler(**SCHEDULER_UNCLIP), vae=vae)

    @classmethod
    def size_multiple_for(cls, source: str) -> int:
        return UNCLIP_SIZE_MULTIPLE

    @property
    def embed_dim(self) -> int:
        return self.pipe.image_normalizer.config.embedding_dim

    @property
    def size_multiple(self) -> int:
        return UNCLIP_SIZE_MULTIPLE

    def negative_embed(self, encoder: Any) -> torch.Tensor:
        return torch.zeros(1, self.embed_dim)

    def _inputs(self, embeds: torch.Tensor, negative: torch.Tensor) -> dict:
        # `negative` is not an input of this pipeline: it uses zeros, as `negative_embed` says.
        return dict(prompt=[""] * len(embeds), image_embeds=embeds, noise_level=self.noise_level)


FAMILIES: dict[str, type[Decoder]] = {cls.name: cls for cls in (KandinskyDecoder, Kandinsky21Decoder, UnclipDecoder)}


def _refetch(cls: type[Decoder], cfg: DecoderConfig) -> str:
    """What to do about a damaged decoder: save a local folder again, or fetch the hub's files again (over
    the damaged ones: without --force-download, `hf download` keeps a cached file as it is)."""
    if cfg.path:
        return f"save the {cls.pipeline.__name__} again with save_pretrained into decoder.path"
    return f"fetch it again with `{cls.hub_weights(cfg.repo_id).command} --force-download`"


@contextmanager
def _loading_errors(cls: type[Decoder], where: str, cfg: DecoderConfig) -> Iterator[None]:
    """A library's failure to load `where` (a pipeline or one of its model folders) -> one line naming it."""
    try:
        yield
    except UserError:
        raise
    except load_errors() as err:
        raise UserError(f"cannot load {cls.title} from {where} ({reason(err)}): "
                        f"{_refetch(cls, cfg)}") from err


def _index_file(path: str | None, repo: str) -> Path | None:
    """The model_index.json a pipeline would be loaded from: in the folder `path`, or in the Hugging Face
    cache of `repo` (looked up there only: the preflight has fetched what a run needs); None where absent."""
    if path is not None:
        file = Path(path) / "model_index.json"
        return file if file.is_file() else None
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(repo, "model_index.json")
    return Path(cached) if isinstance(cached, str) else None


def _read_json(file: Path) -> Any:
    """A JSON file of a saved pipeline, or a one-line UserError naming it."""
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{file}: cannot read it ({reason(err)})") from err


def _is_component(entry: Any) -> bool:
    """Whether a model_index.json entry names a component: [library, class name]."""
    return isinstance(entry, list) and len(entry) == 2 and all(isinstance(part, str) for part in entry)


def _component_class(entry: Any) -> type | None:
    """The class a model_index.json entry names, where it is a model (a torch module with `from_pretrained`):
    looked up where diffusers looks it up (diffusers, transformers, or a pipeline module of diffusers)."""
    import importlib

    if not _is_component(entry):
        return None
    library, name = entry
    module_name = library if library in ("diffusers", "transformers") else f"diffusers.pipelines.{library}"
    try:
        found = getattr(importlib.import_module(module_name), name, None)
    except ImportError:
        return None  # diffusers itself reports a library it cannot import
    is_model = isinstance(found, type) and issubclass(found, torch.nn.Module) and hasattr(found, "from_pretrained")
    return found if is_model else None


def local_xlm_tokenizer() -> transformers.XLMRobertaTokenizer:
    """An XLM-RoBERTa tokenizer built here, without a download, for random and tiny Kandinsky 2.1 decoders: only
    the special tokens, with the ids of the released one (<s> 0, <pad> 1, </s> 2, <unk> 3), so that it gives the
    empty prompt (all that dsl feeds) exactly the ids the released tokenizer gives it."""
    return transformers.XLMRobertaTokenizer(model_max_length=77)


def batch_that_fits(n: int, peak_one: int, peak_two: int, free: int, margin: float = AUTO_MARGIN) -> int:
    """The largest batch, 1 to n, whose peak memory fits in `free` bytes less `margin` of them, from the
    peaks of batches of one and two pictures (a fixed part plus a part per picture)."""
    per_picture = max(peak_two - peak_one, 1)
    usable = free * (1 - margin) - (peak_one - per_picture)
    return max(1, min(n, int(usable // per_picture)))


class HostTimesteps:
    """A scheduler whose timesteps stay on the host while the pipeline loops on the device.

    The pipeline asks its scheduler for timesteps on the device, and DDPM's `step` then reads them back
    (`t > 0`, `nonzero`, a CPU table indexed by t): each is a host synchronisation, at every step. Wrapped,
    the scheduler computes on the CPU; the pipeline (and the UNet) gets one device copy, made before the
    loop, and the i-th `step` call is given the i-th host timestep (pipelines call `step` once per
    timestep, in order, as DPM-Solver's own `step_index` assumes). Everything else is the scheduler's own.
    """

    def __init__(self, scheduler):
        self.inner, self.index, self.device_timesteps = scheduler, 0, None
        # `step` shows the scheduler's own signature: Stable Diffusion pipelines read it to decide whether
        # to pass `generator` (without which DDPM's noise would not be seeded per item) and `eta`.
        self.step = wraps(scheduler.step)(partial(HostTimesteps._host_step, self))

    def __getattr__(self, name: str):  # config, order, init_noise_sigma, ...
        return getattr(self.inner, name)

    @property
    def timesteps(self) -> torch.Tensor:
        return self.device_timesteps

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None, **kwargs) -> None:
        self.inner.set_timesteps(num_inference_steps, device="cpu", **kwargs)
        self.device_timesteps, self.index = self.inner.timesteps.to(device), 0  # None: stays on the host

    def _host_step(self, model_output: torch.Tensor, timestep: torch.Tensor, sample: torch.Tensor, *args, **kwargs):
        host = self.inner.timesteps[self.index]
        self.index += 1
        return self.inner.step(model_output, host, sample, *args, **kwargs)


@contextmanager
def host_timesteps(pipe: Any) -> Iterator[HostTimesteps]:
    """Give `pipe` a `HostTimesteps` view of its scheduler for the duration of one call."""
    scheduler = pipe.scheduler
    pipe.scheduler = HostTimesteps(scheduler)
    try:
        yield pipe.scheduler
    finally:
        pipe.scheduler = scheduler


def check_finite_pictures(pictures: np.ndarray, labels: list[str], decode_cfg, decoder: Any = None) -> None:
    """Stop at a decoded picture [H, W, 3] holding NaN or inf (it would be saved black), naming it and the
    settings that make it: `labels` one per picture, `decode_cfg` the run's `decode` config. With the
    `decoder` that made them, damaged weights are named first (no setting fixes those), and fp32 is advised
    only where the decoder does not already run in it (`decode.dtype=auto` is fp32 on the CPU)."""
    bad = ~np.isfinite(pictures.reshape(len(pictures), -1)).all(axis=1)
    if not bad.any():
        return
    if decoder is not None:
        refuse_damaged_weights("decoder", decoder, "fetch them again, or check the folder decoder.path names")
    in_fp32 = decoder.dtype == torch.float32 if decoder is not None else decode_cfg.dtype == "fp32"
    fix = "lower decode.guidance" + ("" if in_fp32 else " or use decode.dtype=fp32")
    raise UserError(f"{labels[int(np.argmax(bad))]}: the decoded picture is not finite (NaN or inf) with "
                    f"decode.guidance={decode_cfg.guidance}, decode.dtype={decode_cfg.dtype}; {fix}")


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Float image in [0,1] -> uint8, rounded (not truncated) so that equal floats give equal bytes."""
    return np.clip(np.round(image * 255.0), 0, 255).astype(np.uint8)


def to_pil(image: np.ndarray) -> Image.Image:
    """Float image [H,W,3] in [0,1] -> PIL RGB image."""
    return Image.fromarray(to_uint8(image))
