"""Structured-config schema: the dataclasses Hydra checks every composed config against.

Registered in Hydra's ConfigStore as `run_schema`; `configs/run.yaml` lists it first in its defaults, so a
misspelt key (`lens.alpah=3`) or a wrong type (`seed=abc`) fails at compose time with Hydra's own message,
before any model is built. Values whose *range* depends on the loaded model (layer, head) are checked later,
by the lens (`dsl_cli.lenses.Lens.components`) once the encoder is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf


@dataclass
class EncoderConfig:
    """Which CLIP image encoder to open up.

    source: `open_clip` (any open_clip ViT by `name` and `pretrained` tag; `pretrained: null` gives random
    weights), `kandinsky_prior` (the HF-format `image_encoder` of the Kandinsky 2.2 prior, mapped onto the
    open_clip module) or `tiny` (random, embed_dim 32, for tests).
    """

    source: str = "open_clip"
    name: str = "ViT-bigG-14"
    pretrained: Optional[str] = "laion2b_s39b_b160k"
    checkpoint: Optional[str] = None  # local weights: a file (open_clip) or a folder (kandinsky_prior)
    repo_id: str = "kandinsky-community/kandinsky-2-2-prior"
    subfolder: str = "image_encoder"
    # open_clip model whose text tower the logit lens uses (same CLIP as the encoder unless said otherwise)
    text_name: Optional[str] = None
    text_pretrained: Optional[str] = None


@dataclass
class DecoderConfig:
    """Which Kandinsky 2.2 decoder: `pretrained` (hub id or local `path`), `random` (real architecture,
    random weights, no download) or `tiny` (diffusers' dummy test components)."""

    source: str = "pretrained"
    repo_id: str = "kandinsky-community/kandinsky-2-2-decoder"
    path: Optional[str] = None


@dataclass
class DecodeConfig:
    """How pictures are decoded."""

    height: int = 512
    width: int = 512
    steps: int = 100
    guidance: float = 4.0
    scheduler: str = "ddpm"  # ddpm | ddim | dpm
    batch_size: Any = "auto"  # pictures per pipeline call: auto (fitted to free GPU memory; 8 on the CPU) or a number
    dtype: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | fp16 | bf16
    channels_last: bool = False  # NHWC UNet and MoVQ (cuDNN's channels-last kernels)
    compile: bool = False  # torch.compile the UNet (a minute or more of compilation per new batch shape)
    top_k: Optional[int] = None  # decode only the k components most similar to the input, per image
    enabled: bool = True  # false: score embeddings only, write no pictures


@dataclass
class LensConfig:
    """Which lens: `diffusion` (residual stream), `direct` (naive submodule readout), `steering` (DSL) or
    `logit` (classic logit lens over ImageNet labels)."""

    name: str = "steering"
    mode: str = "norm"  # steering: add | scale | norm
    alpha: float = 2.0
    verify: bool = False  # steering: check the closed form against the hooked reference pass
    rank_by: str = "sim_embed"  # sim_embed | sim_decoded
    mid: bool = False  # diffusion and logit lenses: also read the stream between each attention and MLP
    top_labels: int = 5  # logit lens: labels kept per component
    templates: str = "openai"  # logit lens: openai (80 prompts per class) | simple (7)


@dataclass
class ImagesConfig:
    """Input images: `samples` (photos bundled with scikit-image) or `folder` (`path`: folder, glob or file)."""

    source: str = "samples"
    path: Optional[str] = None
    names: Optional[list[str]] = None  # samples: which ones (default: all)
    limit: Optional[int] = None  # use at most this many images
    skip_bad: bool = False  # go on without unreadable images (listed in the manifest) instead of stopping
    shard: Optional[int] = None  # with num_shards: this job's share of the images (0 .. num_shards-1)
    num_shards: int = 1  # split the images into this many disjoint shards (one per job of a sweep)


@dataclass
class StudyConfig:
    """An interventional study instead of a decoding run (`study=head_importance` or `study=overlay_removal`);
    `name: null` (the default) runs the lens and decodes."""

    name: Optional[str] = None
    ablation: Any = "zero"  # zero | mean; head importance also takes both: [zero, mean]
    bootstrap: int = 1000  # head importance: resamples for the 95 % intervals of the correlations
    steps: int = 20  # overlay removal: cumulative ablation steps
    greedy_pool: Optional[int] = 32  # overlay removal: greedy candidates per step; null = all remaining
    random_orders: int = 5  # overlay removal: random baseline orders
    overlay_scale: float = 0.45  # overlay removal: pasted image size relative to the background
    overlay_position: str = "center"  # overlay removal: center | top-left | top-right | bottom-left | bottom-right
    decode_steps: list[int] = field(default_factory=lambda: [0, 5, 10, 20])  # overlay removal: steps decoded


@dataclass
class RunConfig:
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    lens: LensConfig = field(default_factory=LensConfig)
    images: ImagesConfig = field(default_factory=ImagesConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    study: StudyConfig = field(default_factory=StudyConfig)
    layer: Any = 30  # int, list of ints, "all" or a range "10-20"
    head: Any = "all"  # "all", int or list of ints
    component: Any = "heads"  # heads | mlp | all, or explicit labels [L30H05, L12MLP] (then layer/head are unused)
    seed: int = 0
    device: str = "auto"  # auto | cuda | cpu
    dtype: str = "fp32"  # encoder dtype: fp32 | fp16 | bf16
    batch_size: int = 16  # images per encoder batch
    resume: Optional[str] = None  # a run folder to complete
    clamp_to_model: bool = False  # layers/heads beyond the model: nearest one with a warning, not an error


def gpu_count(at_least: int = 0) -> int:
    """`${dsl_gpus:}` in a config: the GPUs this process sees (`${dsl_gpus:1}`: at least 1)."""
    import torch  # here, not at the top: `dsl --help` imports no model library

    return max(int(at_least), torch.cuda.device_count())


def register_configs() -> None:
    """Make the schema available to Hydra as the `run_schema` config, and `${dsl_gpus:}` to every config."""
    ConfigStore.instance().store(name="run_schema", node=RunConfig)
    OmegaConf.register_new_resolver("dsl_gpus", gpu_count, replace=True)
