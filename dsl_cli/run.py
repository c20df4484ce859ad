"""One `dsl run` job: images -> encoder cache -> lens embeddings -> scores -> decoder -> writers.

Each stage is a plain function of the previous stage's tensors and records. A run can be resumed: pictures
already listed in `similarity.csv` (with their file whole on disk) are not decoded again. How a job ends
(exit status, manifest status, messages, signals) is decided in one place, `dsl_cli.job`.
"""

from __future__ import annotations

import logging
import math
import os
import platform
import subprocess
import time
from collections import Counter
from contextlib import closing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Iterator

import torch
import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from PIL import Image, ImageOps
from tqdm.auto import tqdm

from dsl_cli import __version__
from dsl_cli.adapters import adapt_encoder, check_steerable, manifest_entry, run_adapter, target_space
from dsl_cli.baselines import (Extra, baseline_extras, order_extras, score_extras, seed_extras, seed_spread,
                               start_extras, whole_batches)
from dsl_cli.components import Component
from dsl_cli.config import encoder_text, group_schema, images_source, run_schema
from dsl_cli.decoder import (NOISE_LEVELS, check_finite_pictures, check_pairing, check_request, decoder_bytes,
                             load_decoder, to_pil)
from dsl_cli.devices import dtype_name, resolve_device, resolve_dtype, start_device
from dsl_cli.encoder import embedding_space, load_encoder, model_shape
from dsl_cli.errors import Refused, UserError, printable
from dsl_cli.images import ImageSet, load_images
from dsl_cli.lenses import (LENSES, Lens, ScoredImages, SteeringLens, TextReader, check_finite, check_output,
                            check_row, describe, get_lens, n_labels, prepare_text, rank, refuse_unread_settings, score,
                            where_heads_look)
from dsl_cli.memory import decode_need, give_freed_blocks_back, park_if_short, release_memory, visiting
from dsl_cli.figures import DEFAULT_LENSES, EarlyFigures, redraw, refuse_foreign, refuse_foreign_pictures
from dsl_cli.outputs import (BASELINES, PATCHES, SEEDS, SIMILARITY, CsvLog, Manifest, RunFolder, group_rows,
                             is_picture, is_sweep_folder, read_manifest, rows_problem, save_png, writing_pngs)
from dsl_cli.preflight import preflight
from dsl_cli.sae_run import feature_picks, feature_stage, feature_values, sae_config, validate_sae
from dsl_cli.report import write_page
from dsl_cli.resumption import (current_slurm_job, recorded_images, refuse_changed_images, resumes,
                                same_images)
from dsl_cli.study_registry import STUDIES, run_study, validate_study
from dsl_cli import studies  # noqa: F401  (the built-in studies' stages register themselves: @study_stage)

log = logging.getLogger("dsl_cli.run")


# ---------------------------------------------------------------- set-up


SEED_MAX = 2**64 - 1  # torch's generators take 64-bit seeds


def validate(cfg: DictConfig) -> None:
    """Checks that need no model: fail before anything slow starts (enumerations are the schema's, checked
    when the config is composed)."""
    decode = cfg.decode
    for key, value, low in (("decode.steps", decode.steps, 1), ("encoder.batch_size", cfg.encoder.batch_size, 1),
                            ("decode.height", decode.height, 1), ("decode.width", decode.width, 1),
                            ("lens.top_labels", cfg.lens.top_labels, 1)):
        if value < low:
            raise UserError(f"{key}={value}: must be at least {low}")
    if decode.batch_size != "auto" and (type(decode.batch_size) is not int or decode.batch_size < 1):
        raise UserError(f"decode.batch_size={decode.batch_size}: must be auto or a whole number, at least 1")
    if decode.seeds < 1:
        raise UserError(f"decode.seeds={decode.seeds}: must be at least 1")
    if decode.top_k is not None and decode.top_k < 1:
        raise UserError(f"decode.top_k={decode.top_k}: must be at least 1 (or null to decode everything)")
    if not 0 <= cfg.seed <= SEED_MAX:
        raise UserError(f"seed={cfg.seed}: must be between 0 and {SEED_MAX} (64 bits)")
    if cfg.study.name is not None:
        validate_study(cfg.study, cfg.seed)
    _validate_lens(cfg)
    refuse_unread_settings(cfg.lens, [cfg.lens.name] if cfg.study.name is None
                           else list(cfg.study.get("lenses") or DEFAULT_LENSES))  # a study: the lenses it compares
    lens = get_lens(cfg.lens)
    if cfg.study.name is None:
        check_row(lens)
    adapter = run_adapter(cfg)  # read once (None without one): the SAE, pairing and steering checks below use it
    shape = model_shape(cfg.encoder)
    validate_sae(cfg, None if shape is None else shape[0], None if adapter is None else adapter.readout)
    if not math.isfinite(decode.guidance):
        raise UserError(f"decode.guidance={decode.guidance}: must be a finite number")
    check_request(cfg.decoder.source, decode.scheduler, decode.height, decode.width, cfg.decoder.family)
    if not 0 <= cfg.decoder.noise_level < NOISE_LEVELS:
        raise UserError(f"decoder.noise_level={cfg.decoder.noise_level}: must be between 0 and {NOISE_LEVELS - 1}")
    if cfg.study.name is None and decode.enabled:  # an adapter's target space is what the decoder must decode
        check_pairing(embedding_space(cfg.encoder) if adapter is None else target_space(adapter), cfg.decoder)
    if sae_config(cfg) is None:  # an SAE's features replace layer/head
        components = _checked_components(cfg, lens, shape)
        if shape is not None and not cfg.clamp_to_model and cfg.lens.name == SteeringLens.name and adapter is not None:
            check_steerable(adapter.readout, components)


def _checked_components(cfg: DictConfig, lens: Lens, shape: tuple[int, int] | None) -> list[Component]:
    """`layer`, `head` and `component` refused before any download: a layer outside the model where its shape
    is known from configs; a value of the wrong form (`layer=foo`, `head=1.5`) always, even where layers are
    clamped (`clamp_to_model`) or the shape is known only once the model is built (checked then against a
    one-layer, one-head stand-in, clamped). The clamping warnings come once, when the run picks its components."""
    clamp = cfg.clamp_to_model or shape is None
    quiet = logging.getLogger("dsl_cli.lenses")
    was, quiet.disabled = quiet.disabled, clamp
    try:
        return lens.components(cfg.layer, cfg.head, cfg.component, *(shape or (1, 1)), mid=cfg.lens.mid,
                               clamp=clamp)
    finally:
        quiet.disabled = was


def _validate_lens(cfg: DictConfig) -> None:
    lens = cfg.lens
    if not math.isfinite(lens.alpha):
        raise UserError(f"lens.alpha={lens.alpha}: must be a finite number")
    if lens.rank_by == "sim_decoded" and not cfg.decode.enabled and cfg.study.name is None:
        raise UserError("lens.rank_by=sim_decoded ranks by decoded pictures, but decode.enabled=false decodes "
                        "none: use lens.rank_by=sim_embed, or decode")
    if lens.span_texts < 1:
        raise UserError(f"lens.span_texts={lens.span_texts}: must be at least 1")
    if lens.text_pool is not None and not Path(lens.text_pool).expanduser().is_file():
        raise UserError(f"lens.text_pool={lens.text_pool}: no such file (give a text file, one phrase a line)")
    if lens.top_labels > n_labels():
        raise UserError(f"lens.top_labels={lens.top_labels}: there are only {n_labels()} ImageNet labels")


def saved_config(run_dir: Path) -> DictConfig:
    """The config a run was started with (`.hydra/config.yaml`), checked against the schema as Hydra
    checked it then: a file that was edited into bad YAML or a wrong type is refused with one line."""
    path = RunFolder(run_dir).config_yaml
    try:
        saved = OmegaConf.load(path)
        _drop_unread_plugin_settings(saved, path, (read_manifest(run_dir) or {}).get("config"))
        return OmegaConf.merge(OmegaConf.structured(run_schema()), saved)
    except (OSError, UnicodeDecodeError, yaml.YAMLError, OmegaConfBaseException) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{path}: not a config this run can be resumed from ({reason})") from err


def _drop_unread_plugin_settings(saved: DictConfig, path: Path, recorded: object) -> None:
    """A run made from a script that registered a plugin lens or study holds that plugin's settings (`lens.scale`,
    at their defaults) whatever its lens: those its own lens and study do not read are dropped where the plugin
    is not registered (plain `dsl run resume=`), if the manifest's config (`recorded`) holds them too (a key
    edited into the file alone stays, and is refused). A run of a plugin lens or study not registered here is
    refused, saying so (its settings were called a damaged file)."""
    for group, registry, schema in (("lens", LENSES, group_schema("lens")), ("study", STUDIES, group_schema("study"))):
        section = saved.get(group)
        if not isinstance(section, DictConfig):
            continue
        name, known = section.get("name"), {f.name for f in fields(schema)}
        unknown = [key for key in section if key not in known]
        if unknown and name is not None and name not in registry:
            raise UserError(f"{path}: a run of {group}={printable(str(name))}, which is not registered here: import "
                            "the module that registers it and resume from there, as the run was started "
                            "(docs/extending.md)")
        started = recorded.get(group) if isinstance(recorded, dict) else None
        for key in unknown:
            if isinstance(started, dict) and key in started:
                section.pop(key)


def check_settings_kept(cfg: DictConfig, run_dir: Path) -> None:
    """A run continued (resume=, a requeue, a resumed sweep's job) runs with the settings of the attempt
    that started it, as its manifest recorded them: one that differs (an edited `.hydra/config.yaml` or
    sweep) would mix rows of two settings in one table, so it is refused. Settings the manifest lacks (added
    to dsl since) and `resume` itself are not compared."""
    earlier = (read_manifest(run_dir) or {}).get("config")
    if not isinstance(earlier, dict):
        return  # a fresh run, or one stopped before its first attempt recorded its config
    if isinstance(earlier.get("images"), dict):  # a run started before its source was recorded as read
        earlier = {**earlier, "images": {**earlier["images"], "source": images_source(earlier["images"])}}
    try:
        now = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as err:
        raise UserError(f"{run_dir}: its config cannot be resolved ({str(err).splitlines()[0]})") from None
    for key, then, value in _changed(earlier, now):
        if key != "resume":
            raise Refused(f"{run_dir}: {key} is {printable(repr(value))} now, but the run started with "
                            f"{printable(repr(then))} (was {RunFolder(run_dir).config_yaml} edited?): a continued "
                            "run keeps its settings; put that one back, or start a new run with the new value")


def images_kept(cfg: DictConfig, manifest: Manifest) -> ImageSet | None:
    """A continued run's images, listed and checked against the fingerprints its first attempt recorded, before
    this attempt's record starts: changed, added or removed ones are refused (`Refused`), and its manifest,
    complete or interrupted, stays as it was. None where none were recorded (a fresh run, an older dsl's)."""
    earlier = recorded_images(manifest)
    if earlier is None:
        return None
    image_set = load_images(cfg.images)
    refuse_changed_images(manifest.path.parent, earlier, image_set.fingerprints)
    return image_set


def _changed(then: dict, now: dict, prefix: str = "") -> Iterator[tuple[str, object, object]]:
    """(dotted key, earlier value, value now) of every setting both configs hold and give different values."""
    for key in sorted(then.keys() & now.keys()):
        if isinstance(then[key], dict) and isinstance(now[key], dict):
            yield from _changed(then[key], now[key], f"{prefix}{key}.")
        elif then[key] != now[key]:
            yield f"{prefix}{key}", then[key], now[key]


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _versions() -> dict:
    """The versions of what the run used, as installed (diffusers is imported only when a decoder loads)."""
    from importlib.metadata import version

    return {"dsl": __version__, "torch": torch.__version__, "diffusers": version("diffusers"),
            "open_clip": version("open_clip_torch"), "python": platform.python_version()}


def startup_seconds() -> float | None:
    """Seconds from this process's start to now, for the first job a process runs (later jobs of a local
    --multirun share its start); None for those, and where /proc cannot say (not Linux)."""
    global _STARTED_A_JOB
    if _STARTED_A_JOB:
        return None
    _STARTED_A_JOB = True
    try:
        with open("/proc/self/stat", "rb") as stat:  # field 22: the start, in clock ticks after boot
            ticks = int(stat.read().rsplit(b")", 1)[1].split()[19])
        return round(time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK"), 3)
    except (OSError, ValueError, IndexError, AttributeError):
        return None


_STARTED_A_JOB = False


# ---------------------------------------------------------------- stages


@dataclass
class Scored:
    """Everything known about one image before decoding."""

    name: str
    embeds: torch.Tensor  # [component, d_embed] lens embeddings (CPU)
    clean: torch.Tensor  # [d_embed] the input's own embedding (CPU)
    rows: list[dict]  # one CSV row per component, in component order
    patches: list[dict]  # patches.csv rows: where each chosen head looks


def _base_row(cfg: DictConfig, lens: Lens, image: str, comp: Component) -> dict:
    return {
        "image": image, "lens": lens.name, "component": comp.label, "kind": comp.kind, "layer": comp.layer,
        "head": comp.head, "mode": None, "alpha": None, **lens.row(), "seed": cfg.seed, "steps": cfg.decode.steps,
        "guidance": float(cfg.decode.guidance), "sim_decoded": None, "file": "",
    }


def encode_batches(cfg, folder: RunFolder, preprocess, image_set: ImageSet) -> Iterator[tuple[list[str], torch.Tensor]]:
    """The inputs in batches of `batch_size`: (names, pixels [B, 3, S, S] on the CPU). Each picture is read,
    saved as `input.png` at the decode size (unless a whole one is there), preprocessed and released, so a
    run holds one picture at a time however many there are."""
    size = (cfg.decode.width, cfg.decode.height)
    images = image_set.images
    for start in range(0, len(images), cfg.encoder.batch_size):
        names, pixels = [], []
        for item, picture in image_set.stream(images[start:start + cfg.encoder.batch_size]):
            path = folder.input_picture(item.name)
            if not finished_picture(path):
                save_png(path, ImageOps.fit(picture, size, Image.Resampling.BICUBIC))
            names.append(item.name)
            pixels.append(preprocess(picture))
            del picture  # the full-size picture goes now, not when the next one replaces it
        if names:
            yield names, torch.stack(pixels)


def refuse_foreign_results(folder: RunFolder, previous: list[dict]) -> None:
    """A continued run's earlier results (the pictures its similarity.csv, seeds.csv and baselines.csv rows
    name, its inputs) that are not dsl's, refused before any model loads and before this attempt's record
    starts (`Refused`): nothing was touched, so a complete run stays complete. The pictures still to be made
    are checked once the plan is known (`start_csv`, `plan_extras`)."""
    refuse_foreign_pictures(folder, [*previous, *folder.read(SEEDS), *folder.read(BASELINES)], refusal=Refused)


def finished_picture(path: Path) -> bool:
    """Whether an earlier attempt left a whole picture of dsl's at `path`, to be kept (nothing there, or one
    cut short: to be made)."""
    refuse_foreign(path)
    return is_picture(path)


def score_images(cfg, lens: Lens, folder: RunFolder, encoder, preprocess, image_set: ImageSet,
                 components: list[Component]) -> list[Scored]:
    """Encoder cache, lens embeddings and scores of every image, batch by batch; a value that is not finite
    stops the run, naming the setting that caused it."""
    scored = []
    with tqdm(total=len(image_set.images), desc="encode", unit="img") as bar:  # closed on an error too
        for names, pixels in encode_batches(cfg, folder, preprocess, image_set):
            scored += _score_batch(cfg, lens, encoder, components, names, pixels)
            bar.update(len(names))
    if not scored:
        raise UserError(f"no readable image; skipped: {image_set.skipped[:3]}")
    return scored


def _score_batch(cfg, lens: Lens, encoder, components: list[Component], names: list[str],
                 pixels: torch.Tensor) -> list[Scored]:
    pixels = pixels.to(encoder.device, encoder.dtype)  # one transfer, read by both passes below
    cache = encoder.run_with_cache(pixels)
    embeds = lens.embeddings(encoder, cache, components)
    values = lens.values(encoder, cache, components, embeds)
    check_output(lens, embeds, values, len(names), len(components), cache.embeds.shape[-1])
    scores = score(encoder, cache, components, embeds)
    check_finite(lens, cfg.encoder.dtype, names, components, cache.embeds, embeds, scores, encoder)
    # a component that writes nothing into an image (an SAE feature that is off there) leaves its embedding the
    # clean one: a cosine of 1 that ranked it first, and decode.top_k decoded the input instead of active
    # features; it ranks last
    ranks = rank(scores.sim_embed.masked_fill(scores.norm == 0, -math.inf))
    # one transfer per batch, not one per value (each .item() would wait for the GPU)
    sims, norms, ranks = (t.cpu().tolist() for t in (scores.sim_embed, scores.norm, ranks))
    extra = {column: value.cpu().tolist() for column, value in values.items()}
    extra.update(feature_values(encoder, cache, components))  # SAE features: their activations
    looks = where_heads_look(encoder, pixels, components)
    if looks is not None:
        extra["top_patches"] = looks.top_patches(len(components))
    lens_cpu, clean_cpu = embeds.float().cpu(), cache.embeds.float().cpu()
    scored = []
    for i, name in enumerate(names):
        rows = []
        for k, comp in enumerate(components):
            row = _base_row(cfg, lens, name, comp)
            row.update(sim_embed=sims[i][k], norm=norms[i][k], rank=ranks[i][k],
                       **{column: values[i][k] for column, values in extra.items()})
            rows.append(row)
        patches = [] if looks is None else looks.rows(i, name, lens.name, components)
        scored.append(Scored(name, lens_cpu[i], clean_cpu[i], rows, patches))
    return scored


def _scored_images(cfg, encoder, preprocess, image_set: ImageSet, components: list[Component],
                   scored: list[Scored], folder: RunFolder) -> ScoredImages:
    items = {item.name: item for item in image_set.images}

    def pixels(name: str) -> torch.Tensor:
        return preprocess(items[name].load()).unsqueeze(0).to(encoder.device, encoder.dtype)

    return ScoredImages(encoder, cfg.encoder, components, [(s.name, s.embeds) for s in scored], pixels,
                        folder.path)


def plan_decoding(cfg, scored: list[Scored]) -> list[tuple[int, int]]:
    """(image index, component index) pairs to decode: all, or the `decode.top_k` best-ranked per image."""
    if not cfg.decode.enabled:
        return []
    plan = []
    for i, result in enumerate(scored):
        picks = [k for k, row in enumerate(result.rows) if cfg.decode.top_k is None or row["rank"] <= cfg.decode.top_k]
        picks = feature_picks(cfg, result.rows, picks)  # sae.features=top: each image's own top features
        plan.extend((i, k) for k in picks)
    return plan


def build_decoder(cfg, encoder, device: torch.device, manifest: Manifest):
    """The decoder in `decode.dtype` with the `decode` speed switches; its scheduler class, dtype and switches
    recorded in the manifest. Where the GPU cannot hold it beside the encoder with room to decode a batch,
    the encoder first waits on the CPU (it visits the GPU for each re-encoding)."""
    dtype = resolve_dtype(cfg.decode.dtype, device)
    batch = 1 if cfg.decode.batch_size == "auto" else int(cfg.decode.batch_size)
    with manifest.stage("decoder"):  # from its library's import (diffusers comes with the first decoder) on
        need = decode_need(decoder_bytes(cfg.decoder.source, dtype, cfg.decoder.family), batch, cfg.decode.height,
                           cfg.decode.width, dtype)
        park_if_short(encoder, device, need)
        decoder = load_decoder(cfg.decoder, device=device, dtype=dtype,
                               scheduler=cfg.decode.scheduler, channels_last=cfg.decode.channels_last,
                               compile_unet=cfg.decode.compile)
    manifest.update(scheduler=type(decoder.pipe.scheduler).__name__, decoder_dtype=dtype_name(decoder.dtype),
                    channels_last=cfg.decode.channels_last, compile_unet=cfg.decode.compile)
    return decoder


def decode_and_write(cfg, encoder, preprocess, decoder, folder: RunFolder, scored: list[Scored],
                     plan: list[tuple[int, int]], csv_log: CsvLog, manifest: Manifest,
                     early: EarlyFigures | None = None) -> None:
    """Decode the planned items; write each picture, then its CSV row (with sim_decoded), batch by batch;
    the manifest counts the pictures finished so far. With `early`, an image's figures start drawing once its
    last picture is written."""
    if not plan:
        return
    embeds = torch.stack([scored[i].embeds[k] for i, k in plan])
    left = Counter(i for i, _ in plan)  # pictures still to decode, per image index

    def write(indices: list[int], pictures) -> None:
        _write_batch(cfg, encoder, decoder, preprocess, folder, scored, [plan[i] for i in indices], pictures,
                     csv_log)
        finished = Counter(plan[i][0] for i in indices)
        left.subtract(finished)
        if early is not None:
            draw_early(cfg, folder, scored, [i for i in finished if left[i] == 0], early)

    decode_pictures(cfg, encoder, decoder, embeds, [cfg.seed] * len(plan), manifest, write, "decoded")


def decode_pictures(cfg, encoder, decoder, embeds: torch.Tensor, seeds: list[int], manifest: Manifest, write,
                    count: str) -> None:
    """Decode embeds [N, E] with one seed each, guided away from the decoder's negative embedding, and
    hand each batch to `write(indices, pictures [B, H, W, 3])`; manifest[count] counts the pictures done."""
    negative = decoder.negative_embed(encoder).float().cpu()
    fitting = time.perf_counter()
    batch_size, offloaded = fit_decoding(cfg, encoder, decoder, len(embeds))
    # the probes' time (on a GPU), summed over the run's decoding calls; out of `seconds`, whose stages add up
    fit = manifest.data.get("decode_fit_seconds", 0) + time.perf_counter() - fitting
    manifest.update(decode_batch_size=batch_size, encoder_offloaded=offloaded, decode_fit_seconds=round(fit, 3))
    batches = decoder.iter_decode(embeds, negative, seeds, cfg.decode.height, cfg.decode.width,
                                  cfg.decode.steps, float(cfg.decode.guidance), batch_size)
    with closing(batches):  # on an error, the decoder's progress bar ends its line before the message
        for indices, pictures in batches:
            with visiting(encoder, decoder.device, idle=decoder.pipe):  # a parked encoder re-encodes on the GPU
                write(indices, pictures)
            manifest.update(**{count: manifest.data.get(count, 0) + len(indices)})


def draws_while_decoding(cfg, device: torch.device) -> bool:
    """Whether each image's figures are drawn while the next images decode (`decode.draw_early`; null: where
    the decoding runs on a GPU, whose host cores are free for them). On the CPU, torch's threads use every
    core already: drawing beside them made a 2-core tiny run's decode stage twice as long (6.8 s to 13 s) to
    save 2 s of figures; a machine with cores to spare, or torch held to fewer threads, may gain."""
    return device.type != "cpu" if cfg.decode.draw_early is None else bool(cfg.decode.draw_early)


def draw_early(cfg, folder: RunFolder, scored: list[Scored], images: list[int], early: EarlyFigures) -> None:
    """Start drawing the figures of `images` (indices), whose every picture is decoded: their rows are
    final, as the write stage will write them (ranks are per image)."""
    names = {scored[i].name for i in images}
    if not names:
        return
    rows = [r for r in folder.read(SIMILARITY) if r["image"] in names]
    for (image,), group in group_rows(_finish_rows(cfg, sorted_rows(rows, scored)), ("image",)).items():
        early.draw(image, group)


def plan_extras(cfg, folder: RunFolder, lens: Lens, scored: list[Scored]) -> list[Extra]:
    """Every extra seed's and baseline's picture of the run, in decoding order (none unless decode.seeds > 1
    or decode.baselines)."""
    if not cfg.decode.enabled:
        return []
    extras = seed_extras(cfg, folder, lens.name, scored, plan_decoding(cfg, scored))
    if cfg.decode.baselines or cfg.decode.seeds > 1:
        extras += baseline_extras(cfg, folder, lens.name, scored)
    for extra in extras:  # kept or to be decoded: either way, a file there must be dsl's
        refuse_foreign(folder.file(extra.file))
    return extras


def decode_extras(cfg, encoder, preprocess, decoder, folder: RunFolder, extras: list[Extra],
                  manifest: Manifest) -> None:
    """Decode the extra seeds and baselines; save each picture, then its rows with sim_decoded."""
    if not extras:
        return

    def write(indices: list[int], pictures) -> None:
        done = [extras[i] for i in indices]
        check_finite_pictures(pictures, [extra.file for extra in done], cfg.decode, decoder)
        saved = [to_pil(picture) for picture in pictures]
        with writing_pngs([(folder.file(extra.file), picture) for extra, picture in zip(done, saved)]):
            again = reencode(encoder, preprocess, saved, cfg.encoder.batch_size)
        score_extras(folder, done, again)

    negative = decoder.negative_embed(encoder).float().cpu().reshape(-1)
    embeds = torch.stack([negative if extra.embed is None else extra.embed for extra in extras])
    decode_pictures(cfg, encoder, decoder, embeds, [extra.seed for extra in extras], manifest, write,
                    "extra_decoded")


def _write_batch(cfg, encoder, decoder, preprocess, folder: RunFolder, scored: list[Scored],
                 items: list[tuple[int, int]], pictures, csv_log: CsvLog) -> None:
    """One decoded batch (items: (image, component) indices; pictures [B, H, W, 3] in [0, 1]): the PNGs,
    then their CSV rows with sim_decoded."""
    rows = [dict(scored[i].rows[k]) for i, k in items]
    check_finite_pictures(pictures, [f"{row['image']} {row['component']}" for row in rows], cfg.decode, decoder)
    saved = [to_pil(picture) for picture in pictures]
    for row in rows:
        row["file"] = folder.picture(row["image"], row["lens"], row["component"])
    # written while the encoder re-encodes them; sim_decoded from the 8-bit picture as saved, so that a resumed
    # run scores exactly what is on disk; the rows only once every file is whole
    with writing_pngs([(folder.file(row["file"]), picture) for row, picture in zip(rows, saved)]):
        again = reencode(encoder, preprocess, saved, cfg.encoder.batch_size)
    clean = torch.stack([scored[i].clean for i, _ in items])
    sims = torch.nn.functional.cosine_similarity(again, clean, dim=-1)
    for row, sim in zip(rows, sims):
        row["sim_decoded"] = sim.item()
    csv_log.append(rows)


def fit_decoding(cfg, encoder, decoder, n: int) -> tuple[int, bool]:
    """The decode batch size (`decode.batch_size`, or fitted to the free GPU memory when `auto`) and whether
    the encoder was moved to the CPU to make room: it is when, left on the GPU, fewer than min(n, 4)
    pictures would fit in a batch (it then visits the GPU only to re-encode each decoded batch)."""
    parked = encoder.device != decoder.device  # by `build_decoder`, on a GPU too short for both
    if cfg.decode.batch_size != "auto":
        return int(cfg.decode.batch_size), parked
    shape = (n, cfg.decode.height, cfg.decode.width, float(cfg.decode.guidance))
    batch = decoder.fit_batch_size(*shape)
    if decoder.device.type != "cuda" or parked or batch >= min(n, 4):
        return batch, parked
    encoder.to("cpu")
    torch.cuda.empty_cache()
    log.info("decoding: encoder moved to the CPU while decoding, to fit more than %d pictures per batch", batch)
    return decoder.fit_batch_size(*shape), True


def reencode(encoder, preprocess, pictures: list[Image.Image], batch_size: int) -> torch.Tensor:
    """[N, E] float32 (CPU): the encoder's embeddings of decoded pictures, `batch_size` pictures per pass."""
    out = []
    for start in range(0, len(pictures), batch_size):
        pixels = torch.stack([preprocess(p) for p in pictures[start:start + batch_size]])
        out.append(encoder.embed(pixels).float().cpu())
    return torch.cat(out)


def start_csv(cfg, folder: RunFolder, scored: list[Scored], previous: list[dict],
              csv_log: CsvLog) -> list[tuple[int, int]]:
    """Keep the rows of an earlier attempt whose picture is whole on disk, write the rows that need no
    picture, and return what is left to decode. For a fresh run, `previous` is empty and this writes the
    rows of the components that are not decoded (`decode.top_k`, `decode.enabled=false`)."""
    done = {(r["image"], r["component"]) for r in previous
            if not r["file"] or finished_picture(folder.file(r["file"]))}
    done -= batches_to_redo(cfg, scored, done)
    plan = [(i, k) for i, k in plan_decoding(cfg, scored) if (scored[i].name, scored[i].rows[k]["component"]) not in done]
    for i, k in plan:  # before anything is written, not when its batch would write over the file
        row = scored[i].rows[k]
        refuse_foreign(folder.file(folder.picture(row["image"], row["lens"], row["component"])))
    kept = {}  # a row repeated by an edit is kept once
    for row in previous:
        kept.setdefault((row["image"], row["component"]), row)
    csv_log.rewrite([row for key, row in kept.items() if key in done])
    planned = set(plan)
    csv_log.append(row for i, result in enumerate(scored) for k, row in enumerate(result.rows)
                   if (i, k) not in planned and (row["image"], row["component"]) not in done)
    return plan


def batches_to_redo(cfg, scored: list[Scored], done: set[tuple[str, str]]) -> set[tuple[str, str]]:
    """(image, component) of every picture in a decode batch of the uninterrupted run that is not all done
    (`baselines.whole_batches`)."""
    plan = [(scored[i].name, scored[i].rows[k]["component"]) for i, k in plan_decoding(cfg, scored)]
    return whole_batches(cfg.decode.batch_size, plan, done)


def sorted_rows(rows: list[dict], scored: list[Scored]) -> list[dict]:
    """Rows in one order whatever order they were written in: by image, then in component order."""
    order = {(s.name, row["component"]): (i, k) for i, s in enumerate(scored) for k, row in enumerate(s.rows)}
    return sorted(rows, key=lambda r: order.get((r["image"], r["component"]), (len(scored), 0)))


def _finish_rows(cfg, rows: list[dict]) -> list[dict]:
    """Final ranks (by the configured similarity) and a stable order: image, then component order. By
    `sim_decoded`, the decoded rows come first in its order; the rows `decode.top_k` left undecoded follow in
    the order of `sim_embed`, which chose what to decode (a picture is needed to score it)."""
    if cfg.lens.rank_by == "sim_decoded":
        for (image,), group in group_rows(rows, ("image",)).items():
            order = sorted(range(len(group)), key=lambda k: _decoded_first(group[k], k))
            for position, k in enumerate(order, start=1):
                group[k]["rank"] = position
    return rows


def _decoded_first(row: dict, k: int) -> tuple:
    """A row's place under `rank_by=sim_decoded`: decoded rows by their score, then the others by `sim_embed`
    (ties in component order, `k`)."""
    decoded, embed = row["sim_decoded"], row["sim_embed"]
    if decoded is not None and not math.isnan(decoded):
        return 0, -decoded, k
    return 1, math.inf if embed is None or math.isnan(embed) else -embed, k  # no score: last


def best_components(rows: list[dict], by: str, count: int = 3) -> list[str]:
    """One line per image naming its best-ranked components, for the terminal."""
    lines = []
    for (image,), group in group_rows(rows, ("image",)).items():
        best = sorted(group, key=lambda r: r["rank"])[:count]
        scores = [(r["component"], math.nan if r[by] is None else r[by]) for r in best]
        lines.append(f"{image}: best by {by}: " + ", ".join(f"{name} {score:.3f}" for name, score in scores))
    return lines


# ---------------------------------------------------------------- the job


def run(cfg: DictConfig, run_dir: Path) -> None:
    """Run one job into `run_dir`: a fresh folder, or the folder of the run to complete (`cfg.resume`, or a
    requeued cluster job's own folder). The folder is claimed for the job (`RunFolder.claim`) unless this
    process holds it already."""
    folder = RunFolder(run_dir)
    claimed = folder.claim(resume=resumes(cfg, run_dir))
    try:
        if cfg.resume and not is_sweep_folder(Path(cfg.resume)):
            cfg = saved_config(run_dir)
            cfg.images.source = images_source(cfg.images)  # as `dsl_cli.job.task` records it (an older run's)
        elif _complete_already(run_dir):  # a requeued job or a job of a resumed sweep that finished before
            return
        check_settings_kept(cfg, run_dir)
        validate(cfg)
        preflight(cfg)
        folder.remove_temporaries()
        give_freed_blocks_back()
        device = resolve_device(cfg.device)
        start_device(device)
        _run_stages(cfg, folder, device, Manifest(folder.manifest_json))
    finally:
        if claimed:
            folder.release()


def _complete_already(run_dir: Path) -> bool:
    """A job continuing its own folder that finished before, its rows whole: nothing left to do (rows cut
    short or repeated since are written again)."""
    manifest = read_manifest(run_dir) or {}
    if manifest.get("status") != "complete" or rows_problem(manifest, RunFolder(run_dir).read(SIMILARITY)):
        return False
    log.info("%s: this job completed before; nothing to do", run_dir)
    return True


def run_study_job(cfg, run_dir: Path, encoder, preprocess, image_set: ImageSet, components: list[Component],
                  manifest: Manifest) -> None:
    """An interventional study (DESIGN.md section 3) on the chosen heads, instead of decoding."""
    heads = [c for c in components if c.kind == "head"]  # the heads it ablates (figure titles, its page)
    manifest.update(components=len(heads), layers=sorted({c.layer for c in heads}),
                    heads=sorted({c.head for c in heads}))
    with manifest.stage("study"):
        summary = run_study(cfg, run_dir, encoder, preprocess, image_set.images, components)
    manifest.complete(study=summary)
    log.info("study complete: %s (page: %s)", run_dir, write_page("study", run_dir))


def _start_attempt(cfg: DictConfig, folder: RunFolder, device: torch.device,
                   manifest: Manifest) -> tuple[list[dict], ImageSet]:
    """The rows of the run's earlier attempts and this attempt's images. Its record starts only once the
    refusals that need no model have passed (an earlier result that is not dsl's, images changed since):
    those are `Refused`, and a continued run's manifest stays as it was."""
    previous = folder.read(SIMILARITY)
    refuse_foreign_results(folder, previous)
    kept = images_kept(cfg, manifest)
    _start_manifest(cfg, device, manifest, resumed_rows=len(previous))
    with manifest.stage("images"):
        image_set = kept if kept is not None else load_images(cfg.images)
        same_images(manifest, image_set.fingerprints)
        manifest.update(images=[i.name for i in image_set.images], skipped=image_set.skipped)
    return previous, image_set


def _run_stages(cfg: DictConfig, folder: RunFolder, device: torch.device, manifest: Manifest) -> None:
    previous, image_set = _start_attempt(cfg, folder, device, manifest)
    lens = get_lens(cfg.lens)
    reader = _prepare(cfg, lens, device, manifest)
    with manifest.stage("encoder"):
        log.info("%s: loading the %s on %s", folder.path, encoder_text(cfg.encoder), device)
        encoder, preprocess = load_encoder(cfg.encoder, device=device, dtype=resolve_dtype(cfg.encoder.dtype, device))
        adapter = run_adapter(cfg)
        if adapter is not None:  # every lens decodes through it (dsl_cli.adapters)
            encoder = adapt_encoder(encoder, adapter, f"adapter={cfg.adapter}")
            manifest.same_weights("adapter", [adapter.W, adapter.b, adapter.negative], f"adapter={cfg.adapter}")
            manifest.update(adapter=manifest_entry(adapter, cfg.adapter))
            log.info("decoding through %s", adapter.describe())
    manifest.update(encoder_dtype=dtype_name(encoder.dtype))
    lens.check_encoder(encoder, cfg.encoder)
    if sae_config(cfg) is not None:  # an SAE's features instead of heads (dsl_cli.sae_run): layer/head unused
        encoder, components = feature_stage(cfg, folder.path, encoder, preprocess, image_set, manifest)
    else:
        components = lens.components(cfg.layer, cfg.head, cfg.component, encoder.n_layers, encoder.n_heads,
                                     mid=cfg.lens.mid, clamp=cfg.clamp_to_model)
    if cfg.study.name:
        run_study_job(cfg, folder.path, encoder, preprocess, image_set, components, manifest)
        return
    with manifest.stage("lens"):
        scored = _lens_stage(cfg, lens, folder, encoder, preprocess, image_set, components, manifest, reader)

    csv_log = folder.log(SIMILARITY)
    plan = start_csv(cfg, folder, scored, previous, csv_log)
    extras = plan_extras(cfg, folder, lens, scored)
    extras_to_decode = start_extras(folder, extras, cfg.decode.batch_size)
    manifest.update(components=len(components), layers=sorted({c.layer for c in components}),
                    rows=len(components) * len(scored), to_decode=len(plan),
                    extra_to_decode=len(extras_to_decode))
    decoder = None
    with EarlyFigures(folder.path) as early:  # extra seeds' and baselines' figures need the extras decoded
        if plan or extras_to_decode:
            decoder = build_decoder(cfg, encoder, device, manifest)
            with manifest.stage("decode"):
                decode_and_write(cfg, encoder, preprocess, decoder, folder, scored, plan, csv_log, manifest,
                                 early if draws_while_decoding(cfg, device) and not extras else None)
                decode_extras(cfg, encoder, preprocess, decoder, folder, extras_to_decode, manifest)
                if len(extras_to_decode) < len(extras):  # resumed: the pictures decoded again came last
                    order_extras(folder, extras)
        del encoder, decoder  # the writers need no model: the memory goes back before the figures are drawn
        release_memory(device)
        _write_stage(cfg, folder, scored, csv_log, manifest, early)


def _start_manifest(cfg: DictConfig, device: torch.device, manifest: Manifest, resumed_rows: int) -> None:
    """This attempt's record: what runs where, and the seconds of start-up (to here: Python, the config
    checked, torch imported, the device ready; the model libraries come with the models)."""
    startup = startup_seconds()
    manifest.start(status="running", started=time.strftime("%Y-%m-%dT%H:%M:%S"), device=str(device),
                   seed=cfg.seed, versions=_versions(), git_commit=_git_commit(), slurm_job=current_slurm_job(),
                   config=OmegaConf.to_container(cfg, resolve=True), resumed_rows=resumed_rows,
                   # the settings of its own its lens declared (a plugin's): its page shows them, not other plugins'
                   lens_settings=sorted(getattr(LENSES.get(cfg.lens.name), "new_settings", {})),
                   **({"seconds": {"startup": startup}} if startup is not None else {}))
    from dsl_cli.check import note_run

    note_run(cfg, manifest)  # whether `dsl check` passed these weights here (manifest `weights_check`)


def _prepare(cfg, lens: Lens, device: torch.device, manifest: Manifest) -> TextReader | None:
    """Before the encoder loads, so that no other model ever shares its memory: the lens's own work
    (`Lens.prepare_stage`) and, with `lens.text`, the classifier and text pool that name components."""
    if cfg.study.name:
        return None
    if lens.prepare_stage:
        with manifest.stage(lens.prepare_stage):
            lens.prepare(cfg.encoder, device)
    if not cfg.lens.text:
        return None
    with manifest.stage("text"):
        # the logit lens's classifier, when it has one: the same text tower and templates, built once
        return prepare_text(cfg.lens, cfg.encoder, device, getattr(lens, "classifier", None))


def _lens_stage(cfg, lens: Lens, folder: RunFolder, encoder, preprocess, image_set: ImageSet,
                components: list[Component], manifest: Manifest, reader: TextReader | None) -> list[Scored]:
    scored = score_images(cfg, lens, folder, encoder, preprocess, image_set, components)
    manifest.update(images=[s.name for s in scored], skipped=image_set.skipped)
    if any(s.patches for s in scored):  # rewritten whole: a resumed run scores every image again
        folder.write(PATCHES, [r for s in scored for r in s.patches])
    images = _scored_images(cfg, encoder, preprocess, image_set, components, scored, folder)
    if reader is not None:
        labels, descriptions = describe(images, reader, cfg.lens)
        for result, image_labels, image_descriptions in zip(scored, labels, descriptions):
            for row, text, description in zip(result.rows, image_labels, image_descriptions):
                row.update(labels=text, description=description)
    manifest.update(**lens.after_scoring(images))
    return scored


def _write_stage(cfg, folder: RunFolder, scored: list[Scored], csv_log: CsvLog, manifest: Manifest,
                 early: EarlyFigures) -> None:
    """Final ranks and order of the CSV, every figure (but those `early` drew), and the manifest's last word."""
    with manifest.stage("write"):
        rows = seed_spread(folder.path, _finish_rows(cfg, sorted_rows(folder.read(SIMILARITY), scored)))
        csv_log.rewrite(rows)
        figures = redraw(folder.path, early=early) if early.futures else redraw(folder.path)
    manifest.complete(figures=len(figures))
    for line in best_components(rows, cfg.lens.rank_by):
        log.info("%s", line)
    if manifest.data.get("skipped"):
        log.warning("%d image(s) skipped as unreadable (images.skip_bad=true): listed in manifest.json",
                    len(manifest.data["skipped"]))
    log.info("run complete: %s (page: %s)", folder.path, write_page("run", folder.path))
