"""Batched, seeded Kandinsky 2.2 decoding: CLIP image embeddings -> pictures.

The diffusers `KandinskyV22Pipeline` is used as it is; this module only chooses what goes into it. Every
item gets its own `torch.Generator`, and diffusers' `randn_tensor` draws a list of generators item by item,
both for the initial latents and for the noise DDPM (and DDIM with eta > 0, SDE-DPM) adds at each step. So
a picture depends on its embedding, its seed and the device, not on the batch it was decoded in, up to the
float round-off of batched kernels (~1e-4 in float32; after rounding to 8 bits, at most one grey level in
0.03% of the values, measured on the CPU with the tiny models).

Keeping the GPU busy: `batch_size="auto"` fits the batch to the free device memory (two one-step probe
decodings measure what a picture costs), out-of-memory halves it, and during each pipeline call the scheduler
keeps its timesteps on the host (`HostTimesteps`), so that no step of the denoising loop waits for the GPU.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext

import numpy as np
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    KandinskyV22Pipeline,
    UNet2DConditionModel,
    VQModel,
)
from PIL import Image
from tqdm.auto import tqdm

from dsl_cli.config import DecoderConfig
from dsl_cli.devices import free_memory
from dsl_cli.errors import UserError
from dsl_cli.weights import decoder_weights

log = logging.getLogger("dsl_cli.decoder")

SCHEDULERS = {
    "ddpm": DDPMScheduler,
    "ddim": DDIMScheduler,
    "dpm": DPMSolverMultistepScheduler,
}  # not UniPC: diffusers' Kandinsky 2.2 pipeline passes `generator` to `step()`, which UniPC does not take

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
# The dummy components of diffusers' own Kandinsky 2.2 decoder tests: embedding width 32, MoVQ scale 2.
TINY_UNET = dict(
    REAL_UNET,
    down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
    up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
    block_out_channels=(32, 64),
    layers_per_block=1,
    cross_attention_dim=32,
    attention_head_dim=4,
    encoder_hid_dim=32,
    sample_size=32,
)
TINY_MOVQ = dict(
    REAL_MOVQ,
    block_out_channels=(32, 64),
    down_block_types=("DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
    up_block_types=("AttnUpDecoderBlock2D", "UpDecoderBlock2D"),
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


SOURCES = ("pretrained", "random", "tiny")
CPU_BATCH = 8  # `batch_size="auto"` off CUDA, where memory is not what limits a batch
AUTO_MARGIN = 0.15  # share of the free device memory that `auto` leaves unused (fragmentation, cuDNN workspaces)


def check_request(source: str, scheduler: str, height: int | None = None, width: int | None = None) -> None:
    """Refuse, before any model is built, an unknown source or scheduler, or a picture size that the
    pipeline would silently round (it must be a multiple of the MoVQ's scale factor squared)."""
    if source not in SOURCES:
        raise UserError(f"decoder.source={source!r}: choose one of {', '.join(SOURCES)}")
    if scheduler not in SCHEDULERS:
        raise UserError(f"decode.scheduler={scheduler!r}: choose one of {', '.join(SCHEDULERS)}")
    movq = TINY_MOVQ if source == "tiny" else REAL_MOVQ  # a pretrained decoder has the real architecture
    multiple = (2 ** (len(movq["block_out_channels"]) - 1)) ** 2
    for key, value in (("decode.height", height), ("decode.width", width)):
        if value is not None and value % multiple:
            raise UserError(f"{key}={value}: must be a multiple of {multiple} for this decoder (e.g. "
                            f"{max(multiple, round(value / multiple) * multiple)})")


def decoder_bytes(source: str, dtype: torch.dtype) -> int:
    """Bytes the weights of the decoder `source` names take in `dtype` (a pretrained one has the real
    architecture), counted on the meta device: nothing is built or read."""
    real = source != "tiny"
    with torch.device("meta"):
        unet = UNet2DConditionModel(**(REAL_UNET if real else TINY_UNET))
        movq = VQModel(**(REAL_MOVQ if real else TINY_MOVQ))
    count = sum(p.numel() for model in (unet, movq) for p in model.parameters())
    return count * torch.finfo(dtype).bits // 8


def load_decoder(
    cfg: DecoderConfig,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    scheduler: str = "ddpm",
    channels_last: bool = False,
    compile_unet: bool = False,
) -> "KandinskyDecoder":
    """Build the decoder that `cfg.source` names (pretrained | random | tiny) on `device` in `dtype`.

    channels_last and compile_unet are GPU speed-ups (NHWC convolutions; torch.compile of the UNet, which costs
    a minute of compilation per new shape); neither changes what is computed beyond round-off.
    """
    check_request(cfg.source, scheduler)
    if cfg.source == "pretrained":
        pipe = _load_pretrained(cfg, dtype)
    else:
        real = cfg.source == "random"
        pipe = _build_random(REAL_UNET if real else TINY_UNET, REAL_MOVQ if real else TINY_MOVQ, device)
    pipe.to(device)
    if pipe.dtype != dtype:  # diffusers warns on every cast with a dtype, even a no-op one
        pipe.to(dtype=dtype)
    pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config)
    if channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.movq.to(memory_format=torch.channels_last)
    if compile_unet:
        pipe.unet = torch.compile(pipe.unet)
    return KandinskyDecoder(pipe)


def make_scheduler(name: str, config: dict):
    """The scheduler `decode.scheduler` names, built from the checkpoint's scheduler config (its betas,
    prediction type and timestep spacing kept). Always rebuilt: a saved pipeline may ship any scheduler
    class, and the one named is the one that must run."""
    return SCHEDULERS[name].from_config(config)


def _load_pretrained(cfg: DecoderConfig, dtype: torch.dtype) -> KandinskyV22Pipeline:
    """Load from a local folder or the Hugging Face cache (HF_HUB_OFFLINE is honoured by diffusers itself)."""
    path = os.path.expanduser(cfg.path) if cfg.path else None
    if path is not None and not os.path.isdir(path):
        raise UserError(f"decoder.path={cfg.path}: no such folder (give the folder of a saved KandinskyV22Pipeline)")
    try:
        return KandinskyV22Pipeline.from_pretrained(path or cfg.repo_id, torch_dtype=dtype)
    except OSError as err:  # not cached while offline, no network, or an incomplete folder
        raise UserError(
            f"cannot load the Kandinsky 2.2 decoder {cfg.path or cfg.repo_id!r} ({type(err).__name__}): "
            f"run `{decoder_weights(cfg.repo_id).command}` once online, or set decoder.path=/local/folder"
        ) from err


def _build_random(unet_kwargs: dict, movq_kwargs: dict, device: str | torch.device) -> KandinskyV22Pipeline:
    """Random weights, seeded like diffusers' tests (without disturbing the caller's random state);
    initialised on `device` because 1.3 B parameters take tens of seconds to initialise on a CPU."""
    device = torch.device(device)
    cuda = [torch.cuda.current_device() if device.index is None else device.index] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda), device:
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**unet_kwargs)
        torch.manual_seed(0)
        movq = VQModel(**movq_kwargs)
    return KandinskyV22Pipeline(unet=unet, scheduler=DDPMScheduler(**SCHEDULER), movq=movq)


class KandinskyDecoder:
    """Decodes CLIP image embeddings with an unmodified diffusers `KandinskyV22Pipeline`, in seeded batches."""

    def __init__(self, pipe: KandinskyV22Pipeline):
        self.pipe = pipe
        pipe.set_progress_bar_config(disable=True)  # one bar over items (ours) instead of one per batch

    @property
    def device(self) -> torch.device:
        return self.pipe.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.pipe.unet.dtype

    @property
    def embed_dim(self) -> int:
        return self.pipe.unet.config.encoder_hid_dim

    @property
    def size_multiple(self) -> int:
        """Height and width must be multiples of this; the pipeline silently rounds other sizes up."""
        return self.pipe.movq_scale_factor**2

    def decode(
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
    ) -> np.ndarray:
        """Decode embeddings [N,E] -> float32 images [N,H,W,3] in [0,1]; see `iter_decode`."""
        out = np.empty((len(embeds), height, width, 3), dtype=np.float32)
        batches = self.iter_decode(embeds, negative, seeds, height, width, steps, guidance, batch_size, progress)
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
        start, batch = 0, max(1, batch_size)
        with tqdm(total=n, desc="decode", unit="img", disable=not progress) as bar:
            while start < n:
                indices = list(range(start, min(start + batch, n)))
                try:
                    images = self._run(embeds[indices], negative, [seed_list[i] for i in indices],
                                       height, width, steps, guidance)
                except torch.cuda.OutOfMemoryError:
                    if batch == 1:
                        raise
                    images = None  # handled below, once the traceback holding the batch's tensors is freed
                if images is None:  # retry the same items, in batches half as large from here on
                    batch //= 2
                    log.warning("CUDA out of memory: decoding in batches of %d from item %d on", batch, start)
                    torch.cuda.empty_cache()
                    continue
                bar.update(len(indices))
                yield indices, images
                start += len(indices)

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
                image_embeds=embeds,
                negative_image_embeds=negative.expand(len(embeds), -1),  # the pipeline pairs them row by row
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
        picture and the fixed part; off CUDA, CPU_BATCH (memory is not the limit there)."""
        if self.device.type != "cuda":
            return max(1, min(n, CPU_BATCH))
        one, two = (self._probe_peak(batch, height, width, guidance) for batch in (1, 2))
        batch = batch_that_fits(n, one, two, free_memory(self.device))
        log.info("decode batch size auto: %d (%.2f GiB per picture)", batch, max(two - one, 1) / 2**30)
        return batch

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

    def __getattr__(self, name: str):  # config, order, init_noise_sigma, ...
        return getattr(self.inner, name)

    @property
    def timesteps(self) -> torch.Tensor:
        return self.device_timesteps

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None, **kwargs) -> None:
        self.inner.set_timesteps(num_inference_steps, device="cpu", **kwargs)
        self.device_timesteps, self.index = self.inner.timesteps.to(device or "cpu"), 0

    def step(self, model_output: torch.Tensor, timestep: torch.Tensor, sample: torch.Tensor, *args, **kwargs):
        host = self.inner.timesteps[self.index]
        self.index += 1
        return self.inner.step(model_output, host, sample, *args, **kwargs)


@contextmanager
def host_timesteps(pipe: KandinskyV22Pipeline) -> Iterator[HostTimesteps]:
    """Give `pipe` a `HostTimesteps` view of its scheduler for the duration of one call."""
    scheduler = pipe.scheduler
    pipe.scheduler = HostTimesteps(scheduler)
    try:
        yield pipe.scheduler
    finally:
        pipe.scheduler = scheduler


def check_finite_pictures(pictures: np.ndarray, labels: list[str], decode_cfg) -> None:
    """Stop at a decoded picture [H, W, 3] holding NaN or inf (it would be saved black), naming it and the
    settings that make it: `labels` one per picture, `decode_cfg` the run's `decode` config."""
    bad = ~np.isfinite(pictures.reshape(len(pictures), -1)).all(axis=1)
    if bad.any():
        fix = "lower decode.guidance" + (" or use decode.dtype=fp32" if decode_cfg.dtype != "fp32" else "")
        raise UserError(f"{labels[int(np.argmax(bad))]}: the decoded picture is not finite (NaN or inf) with "
                        f"decode.guidance={decode_cfg.guidance}, decode.dtype={decode_cfg.dtype}; {fix}")


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Float image in [0,1] -> uint8, rounded (not truncated) so that equal floats give equal bytes."""
    return np.clip(np.round(image * 255.0), 0, 255).astype(np.uint8)


def to_pil(image: np.ndarray) -> Image.Image:
    """Float image [H,W,3] in [0,1] -> PIL RGB image."""
    return Image.fromarray(to_uint8(image))
