"""`dsl check`: are dsl's copies of the models a run would use the upstream libraries' own, on this machine?

For each pretrained model of the run (`dsl check` takes the same overrides as `dsl run`), dsl's loader and the
upstream library's own loader load the same weights, one after the other (the first dropped before the second
loads, so that memory peaks near one model), and are compared on the bundled sample photos:

| stage | dsl | upstream |
|---|---|---|
| encoder (open_clip) | `load_encoder` | `open_clip.create_model_and_transforms(name, tag, force_quick_gelu=<the tag's>)` |
| encoder (kandinsky_prior) | `load_encoder` | transformers `CLIPVisionModelWithProjection` + `CLIPImageProcessor` |
| text | `load_text_model` | the same open_clip CLIP's `encode_text` |
| decoder | `load_decoder` | the diffusers pipeline's `from_pretrained` |

Compared: the pixels after preprocessing, the photos' embeddings (relative difference), the zero image's
embedding, text features, every decoder tensor, the scheduler, and one short decoding (same embedding, seed,
steps). Everything runs in float32. Exit status 0: all equal within the limits; 1: a mismatch, named by its
stage; 2: bad input. A pass (or fail) is kept in `checks.json` of dsl's cache folder (`DSL_CACHE`, else
~/.cache/dsl), keyed by the weight files' hashes; a run records in its manifest whether its weights passed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from dsl_cli.config import path_override
from dsl_cli.errors import UserError
from dsl_cli.libraries import Library, import_frozen
from dsl_cli.weights import cache_folder, refuse_damaged_weights

torch = Library("torch")  # imported when the check starts: `dsl check --help` answers without it

log = logging.getLogger("dsl_cli.check")

PROMPTS = ["a photo of a dog.", "an astronaut", "", "a cup of coffee on a table"]
CHECK_STEPS = 2  # denoising steps of the one decoding compared
CHECK_SEED = 0
CHECK_SIZE = 64  # pixels per side of that decoding (rounded up to the decoder's size multiple)
# limits: pixels and pictures in absolute units ([0, 1] pictures, normalised pixels), embeddings relative
LIMITS = {"pixels": 1e-5, "embeddings": 1e-4, "zero image": 1e-4, "text features": 1e-4, "tensors": 0,
          "scheduler": 0, "picture": 2e-3}
STATUS_PASSED, STATUS_FAILED, STATUS_UNCHECKED = "passed", "failed", "unchecked"

CHECK_USAGE = """usage: dsl check [OVERRIDES...]

Load each pretrained model a run with these overrides would use (image encoder; text tower where the lens
needs it; decoder where the run decodes) both with dsl's loader and with the upstream library's own
(open_clip, transformers, diffusers), one after the other, and compare them on the sample photos: pixels
after preprocessing, embeddings, the zero image's embedding, text features, every decoder tensor, the
scheduler and one short decoding with the same seed. Prints one table and one verdict.
Exit status 0: equal; 1: a mismatch (the stage is named); 2: bad input (e.g. weights not on this machine).
Examples: dsl check | dsl check encoder=vitl14 decoder=kandinsky21 | dsl check encoder=vith14 decoder=unclip_h14
"""


@dataclass
class Row:
    """One comparison: `stage` (encoder, text, decoder), what was compared, the difference found, its limit."""

    stage: str
    measure: str
    value: float
    limit: float
    detail: str = ""

    @property
    def passed(self) -> bool:
        return not math.isnan(self.value) and self.value <= self.limit


# ---------------------------------------------------------------- what a run would use


def compose(overrides: list[str]) -> Any:
    """The run config `dsl run OVERRIDES` composes (refused in one line as `dsl run` refuses it)."""
    from dsl_cli.config import check_overrides, compose_run, single_values

    single_values(overrides)  # dsl check compares one run's models: a sweep is not one
    check_overrides(overrides)
    # Hydra's own settings are not the run's, but for `hydra.searchpath`: the config folders of plugins
    return compose_run([o for o in overrides if not o.startswith("hydra.") or o.startswith("hydra.searchpath")])


def uses_text(cfg: Any) -> bool:
    """Whether a run of `cfg` loads the text tower (labels, logit lens, attribution target)."""
    lens = cfg.lens
    return cfg.study.name is None and (lens.name == "logit" or bool(lens.text) or lens.get("target") is not None)


def roles(cfg: Any) -> list[str]:
    """The pretrained models a run of `cfg` loads, of encoder, text and decoder (random and tiny ones have no
    upstream copy to compare with)."""
    from dsl_cli.encoder.loading import text_model_id

    enc, found = cfg.encoder, []
    if enc.source == "kandinsky_prior" or (enc.source == "open_clip" and (enc.checkpoint or enc.pretrained)):
        found.append("encoder")
    if enc.source != "tiny" and uses_text(cfg) and text_model_id(enc)[1] is not None:
        found.append("text")
    if cfg.study.name is None and cfg.decode.enabled and cfg.decoder.source == "pretrained":
        found.append("decoder")
    return found


def uncompared(cfg: Any) -> Optional[str]:
    """The pretrained encoder a run of `cfg` loads that `dsl check` has no upstream loader for (a transformers
    or timm ViT, from the hub or a checkpoint), in a few words; None where there is none."""
    enc = cfg.encoder
    if enc.source not in ("hf", "timm") or not (enc.checkpoint or enc.pretrained):
        return None  # pretrained: null is a random model
    return f"encoder={enc.source} ({enc.checkpoint or (enc.repo_id if enc.source == 'hf' else enc.name)})"


def label(cfg: Any, role: str) -> str:
    """What the model of `role` is, in a few words (for the table and the cache)."""
    from dsl_cli.encoder.loading import text_model_id

    enc = cfg.encoder
    if role == "decoder":
        return f"{cfg.decoder.family} {cfg.decoder.path or cfg.decoder.repo_id}"
    if role == "text":
        return "{} {}".format(*text_model_id(enc))
    if enc.source == "kandinsky_prior":
        return f"kandinsky_prior {enc.checkpoint or enc.repo_id + '/' + enc.subfolder}"
    tag = f" (as {enc.pretrained})" if enc.checkpoint and enc.pretrained else ""
    return f"{enc.name} {enc.checkpoint or enc.pretrained}{tag}"


# ---------------------------------------------------------------- the weight files, and the results kept


def cache_file() -> Path:
    """checks.json in dsl's cache folder ($DSL_CACHE, else ~/.cache/dsl)."""
    return cache_folder() / "checks.json"


def _read_cache() -> dict:
    try:
        data = json.loads(cache_file().read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {**data, **{key: value if isinstance(value, dict) else {} for key in ("files", "models")
                       for value in [data.get(key, {})]}}


def _write_cache(data: dict) -> None:
    path = cache_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(f".{path.name}.{os.getpid()}")
    part.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(part, path)


def _cached_hub_files(weights: Any) -> Optional[list[Path]]:
    """The cached files of a `dsl_cli.weights.HubWeights` (every alternative cached), None if one is missing."""
    from huggingface_hub import try_to_load_from_cache

    files = []
    for names in weights.needs:
        found = [Path(p) for p in (try_to_load_from_cache(weights.repo, name) for name in names) if isinstance(p, str)]
        if not found:
            return None
        files += found
    return files


def _folder_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in (".json", ".safetensors", ".bin",
                                                                                ".txt", ".model", ".pt", ".pth"))


def weight_files(cfg: Any, role: str) -> Optional[list[Path]]:
    """The files on this machine that hold the model of `role`, found without loading or downloading
    anything; None where they are not all here (or come from a plain URL, not the Hugging Face cache)."""
    local = local_weights(cfg, role)
    if local is not None:
        if local.is_dir():
            return _folder_files(local)
        return [local] if local.is_file() else None
    hub = hub_weights(cfg, role)
    return _cached_hub_files(hub) if hub is not None else None


def local_weights(cfg: Any, role: str) -> Optional[Path]:
    """The file or folder the config names for the model of `role` (None where it comes from the hub)."""
    from dsl_cli.encoder.loading import text_model_id

    enc = cfg.encoder
    if role == "decoder":
        return Path(cfg.decoder.path).expanduser() if cfg.decoder.path else None
    if role == "encoder" and enc.source == "kandinsky_prior":
        return Path(enc.checkpoint).expanduser() if enc.checkpoint else None
    weights = text_model_id(enc)[1] if role == "text" else enc.checkpoint or enc.pretrained
    return Path(weights).expanduser() if weights and Path(weights).expanduser().is_file() else None


def hub_weights(cfg: Any, role: str) -> Any:
    """The `HubWeights` of the model of `role` where it comes from the Hugging Face hub, else None."""
    from dsl_cli.encoder.loading import text_model_id
    from dsl_cli.weights import open_clip_weights, prior_encoder_weights

    enc = cfg.encoder
    if role == "decoder":
        return None if cfg.decoder.path else _decoder_hub(cfg.decoder)
    if role == "encoder" and enc.source == "kandinsky_prior":
        return None if enc.checkpoint else prior_encoder_weights(enc.repo_id, enc.subfolder)
    name, weights = text_model_id(enc) if role == "text" else (enc.name, enc.checkpoint or enc.pretrained)
    return open_clip_weights(role, name, weights) if weights is not None else None


def damaged_files_advice(cfg: Any, role: str) -> str:
    """What to do about weight files of the model of `role` that hold NaN or inf: check the file or folder
    the config names, or fetch the hub's copy again (the cached one would be kept without --force-download)."""
    local = local_weights(cfg, role)
    if local is not None:
        return f"check {local} (or copy it again from where it came)"
    hub = hub_weights(cfg, role)
    return f"fetch them again: {hub.command} --force-download" if hub is not None else "fetch them again"


def _decoder_hub(dec: Any) -> Any:
    """The `HubWeights` of a pretrained decoder config (the family's files in its repository)."""
    from dsl_cli.decoder import get_family

    family = get_family(dec.family)
    if hasattr(family, "hub_weights"):
        return family.hub_weights(dec.repo_id)
    from dsl_cli import weights

    return weights.decoder_weights(dec.repo_id, dec.family)


_BLOB = re.compile(r"[0-9a-f]{64}")


def file_key(path: Path, known: dict) -> str:
    """The SHA-256 of a file's content: a Hugging Face cache blob is named by it (large files); any other file
    is hashed once and remembered in `known` by its path, size and modification time."""
    real = path.resolve()
    if real.parent.name == "blobs" and _BLOB.fullmatch(real.name):
        return real.name
    stat = real.stat()
    where = f"{real}|{stat.st_size}|{stat.st_mtime_ns}"
    if where not in known:
        digest = hashlib.sha256()
        with open(real, "rb") as file:
            for block in iter(lambda: file.read(1 << 24), b""):
                digest.update(block)
        known[where] = digest.hexdigest()
    return known[where]


def model_key(cfg: Any, role: str, known: dict) -> Optional[str]:
    """One key for the model of `role`: what it is and the hashes of its files (None when they are not here)."""
    files = weight_files(cfg, role)
    if not files:
        return None
    parts = sorted(f"{path.name}={file_key(path, known)}" for path in files)
    return hashlib.sha256("\n".join([role, label(cfg, role), *parts]).encode()).hexdigest()


def recorded(cfg: Any) -> dict[str, str]:
    """For each pretrained model a run of `cfg` loads: passed, failed or unchecked (by `dsl check` on this
    machine, for these very weight files). Reads the files' hashes, never their tensors."""
    data = _read_cache()
    known, results = data.get("files", {}), data.get("models", {})
    if not isinstance(results, dict) or not results:  # nothing was ever checked here: no file is hashed
        return {role: STATUS_UNCHECKED for role in roles(cfg)}
    status = {}
    for role in roles(cfg):
        try:
            key = model_key(cfg, role, known)
        except OSError:
            key = None
        entry = results.get(key) if key else None
        status[role] = STATUS_UNCHECKED if not isinstance(entry, dict) else (
            STATUS_PASSED if entry.get("passed") else STATUS_FAILED)
    if known != data.get("files", {}):
        _save_quietly({**data, "files": known})
    return status


def _save_quietly(data: dict) -> None:
    try:
        _write_cache(data)
    except OSError as err:  # a read-only cache folder: the check still ran
        log.warning("could not write %s: %s", cache_file(), err)


def remember(cfg: Any, rows: list[Row]) -> None:
    """Keep the verdict of each checked model in checks.json, keyed by its weight files' hashes."""
    from dsl_cli import __version__

    data = _read_cache()
    known, results = dict(data.get("files", {})), dict(data.get("models", {}))
    for role in {row.stage for row in rows}:
        try:
            key = model_key(cfg, role, known)
        except OSError:
            key = None
        if key is None:
            continue
        results[key] = {"role": role, "model": label(cfg, role), "dsl": __version__,
                        "passed": all(row.passed for row in rows if row.stage == role),
                        "checked": time.strftime("%Y-%m-%dT%H:%M:%S")}
    _save_quietly({**data, "files": known, "models": results})


def advice(status: dict[str, str]) -> Optional[str]:
    """The one line a run prints when some of its weights have not passed `dsl check` here (None if all did)."""
    left = [role for role, value in status.items() if value != STATUS_PASSED]
    if not left:
        return None
    failed = [role for role in left if status[role] == STATUS_FAILED]
    what = "failed" if failed and len(failed) == len(left) else "not passed"
    return (f"the weights of the {', '.join(left)} have {what} `dsl check` on this machine: run `dsl check` with "
            "this run's overrides to compare dsl's models with the libraries' own (docs/user-guide.md, "
            '"Check your weights")')


def note_run(cfg: Any, manifest: Any) -> dict[str, str]:
    """Record in a run's manifest, as `weights_check` ({role: passed | failed | unchecked}, empty for random and
    tiny models; manifests from before it lack the key), whether `dsl check` passed its weights on this
    machine, and say once how to check them where it has not. Never stops a run."""
    try:
        status = recorded(cfg)
    except Exception as err:  # noqa: BLE001 - a broken cache file or config must not stop the run
        log.debug("weights check status unknown: %s", err)
        status = {}
    manifest.update(weights_check=status)
    line = advice(status)
    if line:
        log.warning(line)
    return status


# ---------------------------------------------------------------- comparing


def relative(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    """max over rows of |ours - theirs| / |theirs| (inf for a shape mismatch)."""
    ours, theirs = ours.detach().double().cpu(), theirs.detach().double().cpu()
    if ours.shape != theirs.shape:
        return math.inf
    scale = theirs.flatten(1).norm(dim=1).clamp_min(1e-12)
    return float(((ours - theirs).flatten(1).norm(dim=1) / scale).max())


def absolute(ours: Any, theirs: Any) -> float:
    ours, theirs = torch.as_tensor(ours).double(), torch.as_tensor(theirs).double()
    if ours.shape != theirs.shape:
        return math.inf
    return float((ours - theirs).abs().max()) if ours.numel() else 0.0


def sample_photos() -> list:
    """The bundled sample photos (PIL, RGB)."""
    from dsl_cli.config import ImagesConfig
    from dsl_cli.images import load_images

    return [item.load() for item in load_images(ImagesConfig()).images]


def _drop(device: torch.device) -> None:
    from dsl_cli.memory import release_memory

    release_memory(device)


@dataclass
class Upstream:
    """An upstream image encoder: preprocess (PIL -> [3, S, S]), embed ([B, 3, S, S] -> [B, E]), image_size."""

    preprocess: Callable
    embed: Callable
    image_size: tuple[int, int]


def upstream_open_clip(name: str, weights: str, tag: Optional[str], device: torch.device) -> tuple[Any, Callable]:
    """open_clip's own CLIP and evaluation transform for these weights, with the tag's activation (open_clip 3.x
    builds `ViT-L-14` with GELU for the `openai` tag and only warns) and, for a local file, the tag's
    preprocessing (open_clip applies a tag's only when the tag itself is loaded)."""
    import open_clip

    pretrained = open_clip.get_pretrained_cfg(name, tag) if tag else {}
    given = pretrained if weights != tag else {}  # the tag's own are applied by open_clip where it loads the tag
    model, _, preprocess = open_clip.create_model_and_transforms(
        name, pretrained=weights, force_quick_gelu=bool(pretrained.get("quick_gelu", False)), device=device,
        image_mean=given.get("mean"), image_std=given.get("std"), image_interpolation=given.get("interpolation"),
        image_resize_mode=given.get("resize_mode"))
    return model.eval(), preprocess


def upstream_encoder(enc: Any, device: torch.device) -> Upstream:
    if enc.source == "kandinsky_prior":
        return _upstream_prior(enc, device)
    from dsl_cli.encoder.loading import _expand, is_tag

    tag = enc.pretrained if is_tag(enc.name, enc.pretrained) else None
    model, preprocess = upstream_open_clip(enc.name, _expand(enc.checkpoint) or enc.pretrained, tag, device)
    size = model.visual.image_size
    return Upstream(preprocess, model.encode_image, tuple(size) if isinstance(size, (tuple, list)) else (size, size))


def _upstream_prior(enc: Any, device: torch.device) -> Upstream:
    """transformers' CLIPVisionModelWithProjection from the prior's image_encoder/ folder, with the prior's
    CLIPImageProcessor (its image_processor/ config where that is here, else transformers' defaults, which
    are the prior's: shortest edge and crop at the model's size, bicubic, OpenAI mean and std). The PIL one,
    which the prior was released with: transformers 5's default `CLIPImageProcessor` is a torchvision port
    whose resizing differs by a grey level or two in some pixels."""
    CLIPVisionModelWithProjection = import_frozen("transformers").CLIPVisionModelWithProjection  # bars off
    CLIPImageProcessor = pil_clip_image_processor()

    from dsl_cli.encoder.loading import _cached_subfolder, _expand

    folder = Path(_expand(enc.checkpoint)) if enc.checkpoint else _cached_subfolder(enc.repo_id, enc.subfolder)
    model = CLIPVisionModelWithProjection.from_pretrained(folder, torch_dtype=torch.float32).eval().to(device)
    size = model.config.image_size
    processor_folder = folder.parent / "image_processor"
    if (processor_folder / "preprocessor_config.json").is_file():
        processor = CLIPImageProcessor.from_pretrained(processor_folder)
    else:
        processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})

    def preprocess(image):
        return processor(images=image, return_tensors="pt")["pixel_values"][0]

    def embed(pixels):
        return model(pixel_values=pixels.to(device, torch.float32)).image_embeds

    return Upstream(preprocess, embed, (size, size))


def pil_clip_image_processor() -> type:
    """transformers' PIL CLIPImageProcessor, whichever name this transformers gives it."""
    try:
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as cls
    except ImportError:  # transformers 4: CLIPImageProcessor is the PIL one
        from transformers import CLIPImageProcessor as cls
    return cls


def encoder_rows(cfg: Any, photos: list, device: torch.device) -> tuple[list[Row], dict]:
    """dsl's encoder, then the upstream one: pixels, embeddings, zero image. Returns the rows and the
    upstream's embeddings (`embeds` [N, E], `zero` [1, E]) for the decoder's comparison."""
    from dsl_cli.encoder import loading

    encoder, preprocess = loading.load_encoder(cfg.encoder, device=device, dtype=torch.float32)
    pixels = torch.stack([preprocess(photo) for photo in photos])
    with torch.no_grad():
        ours = encoder.embed(pixels).float().cpu()
        ours_zero = encoder.zero_embed().float().cpu()
    refuse_nonfinite(cfg, "encoder", encoder, ours, ours_zero)
    del encoder, preprocess
    _drop(device)
    upstream = upstream_encoder(cfg.encoder, device)
    their_pixels = torch.stack([upstream.preprocess(photo) for photo in photos])
    with torch.no_grad():
        theirs = upstream.embed(pixels.to(device)).float().cpu() if pixels.shape == their_pixels.shape else None
        theirs_own = upstream.embed(their_pixels.to(device)).float().cpu()
        theirs_zero = upstream.embed(torch.zeros(1, 3, *upstream.image_size, device=device)).float().cpu()
    del upstream
    _drop(device)
    photos_note = f"{len(photos)} sample photos"
    rows = [
        Row("encoder", "pixels", absolute(pixels, their_pixels), LIMITS["pixels"], photos_note + ", max abs"),
        Row("encoder", "embeddings", relative(ours, theirs) if theirs is not None else math.inf,
            LIMITS["embeddings"], photos_note + ", same pixels, max relative"),
        Row("encoder", "zero image", relative(ours_zero, theirs_zero), LIMITS["zero image"], "max relative"),
    ]
    return rows, {"embeds": theirs_own, "zero": theirs_zero}


def text_rows(cfg: Any, device: torch.device) -> list[Row]:
    """dsl's text tower, then open_clip's whole CLIP for the same weights: text features of a few prompts."""
    from dsl_cli.encoder import loading

    tower, tokenizer = loading.load_text_model(cfg.encoder, device=device, dtype=torch.float32)
    tokens = tokenizer(PROMPTS).to(device)
    with torch.no_grad():
        ours = tower.encode_text(tokens).float().cpu()
    refuse_nonfinite(cfg, "text", tower, ours)
    del tower
    _drop(device)
    name, weights = loading.text_model_id(cfg.encoder)
    model, _ = upstream_open_clip(name, weights, loading.text_settings_tag(cfg.encoder), device)
    with torch.no_grad():
        theirs = model.encode_text(tokens).float().cpu()
    del model
    _drop(device)
    return [Row("text", "text features", relative(ours, theirs), LIMITS["text features"],
                f"{len(PROMPTS)} prompts, max relative")]


WHO = {"encoder": "encoder", "text": "text tower", "decoder": "decoder"}  # the role, as messages name it


def refuse_nonfinite(cfg: Any, role: str, model: Any, *results: torch.Tensor) -> None:
    """Where dsl's own model of `role` gave a result holding NaN or inf, refuse (exit status 2) weights that
    hold them: both copies are then NaN, which is no mismatch between dsl and upstream, and no verdict is
    kept. Only on that failure path are the weights looked at."""
    if all(bool(torch.isfinite(result).all()) for result in results):
        return
    refuse_damaged_weights(WHO[role], model, damaged_files_advice(cfg, role))


def tensor_sums(pipe: Any) -> dict[str, tuple[float, float]]:
    """Every tensor of a pipeline's models, by `component.name`: (sum, sum of squares) in float64, computed
    where the tensor is (a changed value changes them; the tensors themselves need not be held twice)."""
    sums = {}
    for component, module in pipe.components.items():
        if isinstance(module, torch.nn.Module):
            for name, tensor in module.state_dict().items():
                if tensor.is_floating_point():
                    value = tensor.detach().double()
                    sums[f"{component}.{name}"] = (float(value.sum()), float((value * value).sum()))
    return sums


def _differing(ours: dict, theirs: dict) -> list[str]:
    names = sorted(set(ours) | set(theirs))
    return [name for name in names if name not in ours or name not in theirs
            or any(not math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12) for a, b in zip(ours[name], theirs[name]))]


def _scheduler_config(scheduler: Any) -> dict:
    return {key: value for key, value in dict(scheduler.config).items() if not key.startswith("_")}


class _Negative:
    """Stands in for the encoder where a decoder asks for the unconditional embedding (`zero_embed`)."""

    def __init__(self, zero: torch.Tensor):
        self.zero = zero

    def zero_embed(self) -> torch.Tensor:
        return self.zero


def decoder_rows(cfg: Any, upstream: Optional[dict], device: torch.device) -> list[Row]:
    """dsl's decoder, then the pipeline's own `from_pretrained`: every tensor, the scheduler, and one short
    decoding of the same embedding (the upstream encoder's of the first photo where the widths agree, else a
    seeded random one) with the same seed."""
    from dsl_cli import decoder as decoders

    cls = decoders.get_family(cfg.decoder.family)
    dsl = decoders.load_decoder(cfg.decoder, device=device, dtype=torch.float32, scheduler=cfg.decode.scheduler)
    width = dsl.embed_dim
    if upstream is not None and upstream["embeds"].shape[-1] == width:
        embed, zero = upstream["embeds"][:1], upstream["zero"]
    else:
        g = torch.Generator().manual_seed(CHECK_SEED)
        embed, zero = torch.randn(1, width, generator=g), torch.randn(1, width, generator=g)
    negative = dsl.negative_embed(_Negative(zero)).float().cpu()
    multiple = dsl.size_multiple
    size = -(-CHECK_SIZE // multiple) * multiple
    guidance = float(cfg.decode.guidance)
    ours_sums, ours_scheduler = tensor_sums(dsl.pipe), dsl.pipe.scheduler
    ours_picture = dsl.decode(embed, negative, [CHECK_SEED], size, size, steps=CHECK_STEPS, guidance=guidance,
                              batch_size=1, progress=False)
    inputs = dsl._inputs(embed.to(device), negative.to(device))
    refuse_nonfinite(cfg, "decoder", dsl, torch.as_tensor(ours_picture), torch.tensor(list(ours_sums.values())))
    del dsl
    _drop(device)
    path = os.path.expanduser(cfg.decoder.path) if cfg.decoder.path else cfg.decoder.repo_id
    try:
        pipe = cls.pipeline.from_pretrained(path, torch_dtype=torch.float32).to(device)
    except OSError as err:
        raise UserError(f"diffusers cannot load {path} ({type(err).__name__}: {err})") from err
    pipe.set_progress_bar_config(disable=True)
    theirs_sums = tensor_sums(pipe)
    theirs_scheduler = pipe.scheduler
    their_picture = pipe(**inputs, generator=[torch.Generator(device).manual_seed(CHECK_SEED)], height=size,
                         width=size, num_inference_steps=CHECK_STEPS, guidance_scale=guidance,
                         output_type="np").images
    del pipe
    _drop(device)
    differ = _differing(ours_sums, theirs_sums)
    scheduler_differ = scheduler_differences(ours_scheduler, theirs_scheduler)
    return [
        Row("decoder", "tensors", len(differ), LIMITS["tensors"],
            f"{len(theirs_sums)} tensors" + (f"; differing: {', '.join(differ[:3])}" if differ else "")),
        Row("decoder", "scheduler", len(scheduler_differ), LIMITS["scheduler"],
            type(theirs_scheduler).__name__ + (f"; differing: {', '.join(map(str, scheduler_differ[:3]))}"
                                               if scheduler_differ else "")),
        Row("decoder", "picture", absolute(ours_picture, their_picture), LIMITS["picture"],
            f"{CHECK_STEPS} steps at {size}x{size}, seed {CHECK_SEED}, max abs"),
    ]


def scheduler_differences(ours: Any, theirs: Any) -> list[str]:
    """What differs between dsl's scheduler and the pipeline's own: its class, then each config value."""
    ours_cfg, theirs_cfg = _scheduler_config(ours), _scheduler_config(theirs)
    differ = [key for key in sorted(set(ours_cfg) & set(theirs_cfg)) if ours_cfg[key] != theirs_cfg[key]]
    if type(ours).__name__ != type(theirs).__name__:
        differ.insert(0, f"class {type(ours).__name__} (the repository's: {type(theirs).__name__}; "
                         "decode.scheduler picks it)")
    return differ


# ---------------------------------------------------------------- the command


def run_check(cfg: Any, device: Optional[torch.device] = None) -> list[Row]:
    """Every comparison for the pretrained models a run of `cfg` loads, model after model."""
    from dsl_cli.devices import resolve_device

    device = device or resolve_device(cfg.device)
    todo = roles(cfg)
    rows, upstream = [], None
    if uncompared(cfg):
        uncompared_weights_sound(cfg, device)
    if "encoder" in todo:
        encoder, upstream = encoder_rows(cfg, sample_photos(), device)
        rows += encoder
    if "text" in todo:
        rows += text_rows(cfg, device)
    if "decoder" in todo:
        rows += decoder_rows(cfg, upstream, device)
    return rows


def uncompared_weights_sound(cfg: Any, device: torch.device) -> None:
    """A transformers or timm ViT has no loader of dsl's to compare with its library's (dsl loads it with that
    library), but its weights can still be damaged: it is loaded as a run loads it, and weights that hold NaN
    or inf are refused (exit status 2) where the verdict said `nothing compared` and exit status 0."""
    from dsl_cli.encoder import load_encoder

    encoder, _ = load_encoder(cfg.encoder, device=device)
    where = cfg.encoder.checkpoint or (cfg.encoder.repo_id if cfg.encoder.source == "hf" else cfg.encoder.name)
    refuse_damaged_weights(WHO["encoder"], encoder, f"check {where} (or fetch it again with --force-download)")
    del encoder
    _drop(device)


def require_local(cfg: Any) -> None:
    """Refuse, before any model loads, weights the run needs that are not on this machine (one message, with
    the command that fetches each, as `dsl run` gives it): `dsl check` checks what is here, it downloads
    nothing."""
    from dsl_cli import weights
    from dsl_cli.preflight import needed

    hub, problems = needed(cfg)
    missing = [w for w in hub if not w.cached()]
    if missing or problems:
        first, *details = weights._message(missing, problems, "dsl check downloads nothing").split("\n")
        raise UserError(first, details=details)


def _number(value: float) -> str:
    if not math.isfinite(value):
        return str(value)
    return str(int(value)) if float(value).is_integer() else f"{value:.3g}"


def table(cfg: Any, rows: list[Row]) -> str:
    """The comparisons as one text table: stage, model, what, difference, limit, ok/MISMATCH, how measured."""
    lines = [("stage", "model", "compared", "difference", "limit", "result", "how")]
    for row in rows:
        lines.append((row.stage, label(cfg, row.stage), row.measure, _number(row.value), _number(row.limit),
                      "ok" if row.passed else "MISMATCH", row.detail))
    widths = [max(len(line[i]) for line in lines) for i in range(6)]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line[:6], widths)) + "  " + line[6]
                     for line in lines).rstrip()


NOT_COMPARED = ("{}: dsl check compares open_clip and kandinsky_prior encoders, text towers and decoders with "
                "their upstream loaders, not transformers or timm ViTs (loaded by their own library; its weights "
                "load and hold no NaN or inf)")


def verdict(rows: list[Row], skipped: Optional[str] = None) -> tuple[int, str]:
    """(exit status, the verdict line); `skipped` the pretrained encoder that was not compared (`uncompared`)."""
    if not rows:
        if skipped:
            return 0, "nothing compared: " + NOT_COMPARED.format(skipped)
        return 0, "nothing to check: this run uses no pretrained weights (random or tiny models)"
    status, line = _verdict(rows)
    return status, line + ("; not compared: " + NOT_COMPARED.format(skipped) if skipped else "")


def _verdict(rows: list[Row]) -> tuple[int, str]:
    bad = [row for row in rows if not row.passed]
    if not bad:
        stages = sorted({row.stage for row in rows}, key=["encoder", "text", "decoder"].index)
        return 0, f"PASS: dsl's {', '.join(stages)} equal the upstream libraries' own"
    named = ", ".join(dict.fromkeys(f"{row.stage} ({row.measure})" for row in bad))
    return 1, f"MISMATCH in {named}: dsl's copy differs from the upstream library's own"


def main(args: list[str]) -> int:
    """`dsl check OVERRIDES...` -> exit status."""
    from dsl_cli.errors import bug_message, report

    if args in (["-h"], ["--help"]):
        print(CHECK_USAGE)
        return 0
    if any(arg.startswith("-") for arg in args):
        report(f"dsl check takes overrides only (as `dsl run`), not {next(a for a in args if a.startswith('-'))}")
        return 2
    try:
        cfg = compose([path_override(arg) for arg in args])
        from dsl_cli.decoder import check_request
        from dsl_cli.logs import own_lines_only

        check_request(cfg.decoder.source, cfg.decode.scheduler, family=cfg.decoder.family)
        require_local(cfg)
        with own_lines_only():  # the libraries' notices and bars, as a run's terminal: not before the table
            rows = run_check(cfg)
    except UserError as err:
        report(err)
        return 2
    except Exception as err:  # noqa: BLE001 - a bug, or a library refusing the weights: one line
        report(bug_message(err))
        return 1
    remember(cfg, rows)
    status, line = verdict(rows, uncompared(cfg))
    if rows:
        print(table(cfg, rows))
    print(line)
    return status
