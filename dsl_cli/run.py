"""One `dsl run` job: images -> encoder cache -> lens embeddings -> scores -> decoder -> writers.

Each stage is a plain function of the previous stage's tensors and records. A run can be resumed: pictures
already listed in `similarity.csv` (with their file on disk) are not decoded again.
"""

from __future__ import annotations

import logging
import math
import platform
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image, ImageOps
from tqdm.auto import tqdm

from dsl_cli import __version__
from dsl_cli.components import Component
from dsl_cli.decoder import KandinskyDecoder, check_request, decoder_bytes, load_decoder, to_pil
from dsl_cli.devices import resolve_device, resolve_dtype
from dsl_cli.encoder import load_encoder
from dsl_cli.errors import UserError
from dsl_cli.images import ImageSet, load_images
from dsl_cli.lenses import MODES, imagenet_classifier, lens_embeddings, rank, score, select_components, top_labels
from dsl_cli.memory import decode_need, park_if_short, visiting
from dsl_cli.outputs import (COLUMNS, LABEL_COLUMNS, CsvLog, Manifest, check_writable, group_rows,
                             refuse_existing_run, read_csv,
                             redraw, save_png)
from dsl_cli.studies import run_study, validate_study
from dsl_cli.weights import preflight

log = logging.getLogger("dsl_cli.run")


# ---------------------------------------------------------------- set-up


def validate(cfg: DictConfig) -> None:
    """Checks that need no model: fail before anything slow starts."""
    decode = cfg.decode
    for key, value, low in (("decode.steps", decode.steps, 1), ("decode.batch_size", decode.batch_size, 1),
                            ("batch_size", cfg.batch_size, 1), ("decode.height", decode.height, 1),
                            ("decode.width", decode.width, 1)):
        if value < low:
            raise UserError(f"{key}={value}: must be at least {low}")
    if decode.top_k is not None and decode.top_k < 1:
        raise UserError(f"decode.top_k={decode.top_k}: must be at least 1 (or null to decode everything)")
    if cfg.study.name is not None:
        validate_study(cfg.study)
    if cfg.lens.mode not in MODES:
        raise UserError(f"lens.mode={cfg.lens.mode!r}: use {', '.join(MODES)}")
    if not math.isfinite(cfg.lens.alpha):
        raise UserError(f"lens.alpha={cfg.lens.alpha}: must be a finite number")
    if not math.isfinite(decode.guidance):
        raise UserError(f"decode.guidance={decode.guidance}: must be a finite number")
    if cfg.lens.rank_by not in ("sim_embed", "sim_decoded"):
        raise UserError(f"lens.rank_by={cfg.lens.rank_by!r}: use sim_embed or sim_decoded")
    resolve_dtype(cfg.dtype, "cpu")  # raises on an unknown name
    resolve_dtype(cfg.decode.dtype, "cpu")
    check_request(cfg.decoder.source, decode.scheduler, decode.height, decode.width)


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _versions() -> dict:
    import diffusers
    import open_clip

    return {"dsl": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "open_clip": open_clip.__version__, "python": platform.python_version()}


# ---------------------------------------------------------------- stages


@dataclass
class Scored:
    """Everything known about one image before decoding."""

    name: str
    embeds: torch.Tensor  # [component, d_embed] lens embeddings (CPU)
    clean: torch.Tensor  # [d_embed] the input's own embedding (CPU)
    rows: list[dict]  # one CSV row per component, in component order


def _base_row(cfg: DictConfig, image: str, comp: Component) -> dict:
    steering = cfg.lens.name == "steering"
    return {
        "image": image, "lens": cfg.lens.name, "component": comp.label, "kind": comp.kind, "layer": comp.layer,
        "head": comp.head, "mode": cfg.lens.mode if steering else None,
        "alpha": float(cfg.lens.alpha) if steering else None, "seed": cfg.seed, "steps": cfg.decode.steps,
        "guidance": float(cfg.decode.guidance), "sim_decoded": None, "file": "",
    }


def score_images(cfg, encoder, preprocess, image_set: ImageSet, components: list[Component]) -> list[Scored]:
    """Encoder cache and lens embeddings for every image, in batches of `batch_size` images."""
    scored = []
    images = image_set.images
    bar = tqdm(total=len(images), desc="encode", unit="img")
    for start in range(0, len(images), cfg.batch_size):
        batch = images[start:start + cfg.batch_size]
        pixels = torch.stack([preprocess(item.image) for item in batch]).to(encoder.device, encoder.dtype)
        cache = encoder.run_with_cache(pixels)
        embeds = lens_embeddings(encoder, cache, components, cfg.lens)
        scores = score(encoder, cache, components, embeds)
        # one transfer per batch, not one per value (each .item() would wait for the GPU)
        sims, norms, ranks = (t.cpu().tolist() for t in (scores.sim_embed, scores.norm, rank(scores.sim_embed)))
        lens_cpu, clean_cpu = embeds.float().cpu(), cache.embeds.float().cpu()
        for i, item in enumerate(batch):
            rows = []
            for k, comp in enumerate(components):
                row = _base_row(cfg, item.name, comp)
                row.update(sim_embed=sims[i][k], norm=norms[i][k], rank=ranks[i][k])
                rows.append(row)
            scored.append(Scored(item.name, lens_cpu[i], clean_cpu[i], rows))
        bar.update(len(batch))
    bar.close()
    return scored


def verify_steering(cfg, encoder, preprocess, image_set: ImageSet, components: list[Component],
                    scored: list[Scored]) -> float:
    """Largest |closed form - hooked reference| over all images and components (`lens.verify=true`)."""
    worst = 0.0
    for item, result in zip(tqdm(image_set.images, desc="verify", unit="img"), scored):
        pixels = preprocess(item.image).unsqueeze(0).to(encoder.device, encoder.dtype)
        for k, comp in enumerate(components):
            hooked = encoder.steer_hooked(pixels, comp, mode=cfg.lens.mode, alpha=float(cfg.lens.alpha))
            worst = max(worst, (hooked[0].float().cpu() - result.embeds[k]).abs().max().item())
    return worst


def write_labels(cfg, classifier: tuple[torch.Tensor, list[str]], run_dir: Path, scored: list[Scored],
                 components: list[Component]) -> None:
    """Logit lens: the top ImageNet labels of every component's embedding, into labels.csv. classifier:
    (class embeddings [d_embed, 1000], class names) from `imagenet_classifier`."""
    weights, names = classifier
    rows = []
    for result in scored:
        values, indices = top_labels(result.embeds, weights, cfg.lens.top_labels)
        for k, comp in enumerate(components):
            for r in range(values.shape[-1]):
                rows.append({"image": result.name, "lens": cfg.lens.name, "component": comp.label,
                             "layer": comp.layer, "head": comp.head, "rank": r + 1,
                             "label": names[int(indices[k, r])], "score": values[k, r].item()})
    CsvLog(run_dir / "labels.csv", LABEL_COLUMNS).rewrite(rows)


def plan_decoding(cfg, scored: list[Scored]) -> list[tuple[int, int]]:
    """(image index, component index) pairs to decode: all, or the `decode.top_k` best-ranked per image."""
    if not cfg.decode.enabled:
        return []
    plan = []
    for i, result in enumerate(scored):
        picks = [k for k, row in enumerate(result.rows) if cfg.decode.top_k is None or row["rank"] <= cfg.decode.top_k]
        plan.extend((i, k) for k in picks)
    return plan


def decode_and_write(cfg, encoder, preprocess, decoder, run_dir: Path, scored: list[Scored],
                     plan: list[tuple[int, int]], csv_log: CsvLog, manifest: Manifest) -> int:
    """Decode the planned items; write each picture, then its CSV row (with sim_decoded), batch by batch;
    the manifest counts the pictures finished so far."""
    if not plan:
        return 0
    embeds = torch.stack([scored[i].embeds[k] for i, k in plan])
    negative = encoder.zero_embed().float().cpu()
    batches = decoder.iter_decode(embeds, negative, [cfg.seed] * len(plan), cfg.decode.height, cfg.decode.width,
                                  cfg.decode.steps, float(cfg.decode.guidance), cfg.decode.batch_size)
    for indices, pictures in batches:
        saved = [to_pil(picture) for picture in pictures]
        rows = []
        for index, picture in zip(indices, saved):
            i, k = plan[index]
            row = dict(scored[i].rows[k])
            row["file"] = f"images/{row['image']}/{row['lens']}/{row['component']}.png"
            save_png(run_dir / row["file"], picture)
            rows.append(row)
        # sim_decoded from the 8-bit picture as saved, so a resumed run scores exactly what is on disk
        with visiting(encoder, decoder.device, idle=decoder.pipe):  # a parked encoder comes back for it
            pixels = torch.stack([preprocess(p) for p in saved]).to(encoder.device, encoder.dtype)
            again = encoder.embed(pixels).float().cpu()
        clean = torch.stack([scored[plan[index][0]].clean for index in indices])
        sims = torch.nn.functional.cosine_similarity(again, clean, dim=-1)
        for row, sim in zip(rows, sims):
            row["sim_decoded"] = sim.item()
        csv_log.append(rows)
        manifest.update(decoded=manifest.data.get("decoded", 0) + len(rows))
    return len(plan)


def start_csv(cfg, run_dir: Path, scored: list[Scored], previous: list[dict], csv_log: CsvLog) -> list[tuple[int, int]]:
    """Keep the rows of an earlier attempt whose picture is on disk, write the rows that need no picture,
    and return what is left to decode. For a fresh run, `previous` is empty and this writes the rows of
    the components that are not decoded (`decode.top_k`, `decode.enabled=false`)."""
    done = {(r["image"], r["component"]) for r in previous if not r["file"] or (run_dir / r["file"]).exists()}
    csv_log.rewrite([r for r in previous if (r["image"], r["component"]) in done])
    plan = [(i, k) for i, k in plan_decoding(cfg, scored) if (scored[i].name, scored[i].rows[k]["component"]) not in done]
    planned = set(plan)
    csv_log.append(row for i, result in enumerate(scored) for k, row in enumerate(result.rows)
                   if (i, k) not in planned and (row["image"], row["component"]) not in done)
    return plan


def _finish_rows(cfg, rows: list[dict]) -> list[dict]:
    """Final ranks (by the configured similarity) and a stable order: image, then component order."""
    if cfg.lens.rank_by == "sim_decoded":
        for (image,), group in group_rows(rows, ("image",)).items():
            values = torch.tensor([float(r["sim_decoded"] or "nan") for r in group]).nan_to_num(-math.inf)
            for row, r in zip(group, rank(values)):
                row["rank"] = int(r)
    return rows


def best_components(rows: list[dict], by: str, count: int = 3) -> list[str]:
    """One line per image naming its best-ranked components, for the terminal."""
    lines = []
    for (image,), group in group_rows(rows, ("image",)).items():
        best = sorted(group, key=lambda r: int(r["rank"]))[:count]
        lines.append(f"{image}: best by {by}: " + ", ".join(f"{r['component']} {float(r[by] or 'nan'):.3f}"
                                                          for r in best))
    return lines


def _save_inputs(cfg, run_dir: Path, image_set: ImageSet) -> None:
    size = (cfg.decode.width, cfg.decode.height)
    for item in image_set.images:
        path = run_dir / "images" / item.name / "input.png"
        if not path.exists():
            save_png(path, ImageOps.fit(item.image, size, Image.Resampling.BICUBIC))


# ---------------------------------------------------------------- the job


def run(cfg: DictConfig, run_dir: Path) -> None:
    """Run one job into `run_dir` (a fresh Hydra run folder, or the folder of a run being resumed)."""
    if cfg.resume:
        cfg = OmegaConf.load(Path(cfg.resume).expanduser() / ".hydra" / "config.yaml")
    else:
        refuse_existing_run(run_dir)  # two runs started within the same second share a default folder
    validate(cfg)
    preflight(cfg)
    check_writable(run_dir)
    for leftover in run_dir.rglob(".*.tmp"):  # a file a killed run was writing: never part of the results
        leftover.unlink()
    device = resolve_device(cfg.device)
    manifest = Manifest(run_dir / "manifest.json")
    try:
        _run_stages(cfg, run_dir, device, manifest)
    except UserError as err:
        manifest.update(status="failed", error=str(err))
        raise
    except KeyboardInterrupt:
        manifest.update(status="interrupted")
        raise


def run_study_job(cfg, run_dir: Path, encoder, preprocess, image_set: ImageSet, components: list[Component],
                  manifest: Manifest) -> None:
    """An interventional study (DESIGN.md section 3) on the chosen heads, instead of decoding."""
    with manifest.stage("study"):
        summary = run_study(cfg, run_dir, encoder, preprocess, image_set.images, components)
    manifest.update(study=summary, status="complete", finished=time.strftime("%Y-%m-%dT%H:%M:%S"))
    log.info("study complete: %s", run_dir)


def _classifier_stage(cfg, device: torch.device, manifest: Manifest) -> tuple[torch.Tensor, list[str]] | None:
    """The logit lens's ImageNet classifier, first of all: its text tower is built, used and released
    before the encoder loads (kept classifiers build none). None for the other lenses and the studies."""
    if cfg.lens.name != "logit" or cfg.study.name:
        return None
    with manifest.stage("classifier"):
        return imagenet_classifier(cfg.encoder, cfg.lens.templates, device)


def decoder_beside(cfg, encoder, device: torch.device) -> KandinskyDecoder:
    """The decoder on `device`, the encoder first moved to the CPU where the device cannot hold both with
    room to decode a batch (`dsl_cli.memory.park_if_short`; it comes back for each re-encoding)."""
    dtype = resolve_dtype(cfg.decode.dtype, device)
    need = decode_need(decoder_bytes(cfg.decoder.source, dtype), cfg.decode.batch_size, cfg.decode.height,
                       cfg.decode.width, dtype)
    park_if_short(encoder, device, need)
    return load_decoder(cfg.decoder, device=device, dtype=dtype, scheduler=cfg.decode.scheduler)


def _run_stages(cfg: DictConfig, run_dir: Path, device: torch.device, manifest: Manifest) -> None:
    previous = read_csv(run_dir / "similarity.csv")
    manifest.update(status="running", started=time.strftime("%Y-%m-%dT%H:%M:%S"), device=str(device),
                    seed=cfg.seed, versions=_versions(), git_commit=_git_commit(),
                    config=OmegaConf.to_container(cfg, resolve=True), resumed_rows=len(previous))

    with manifest.stage("images"):
        image_set = load_images(cfg.images)
        manifest.update(images=[i.name for i in image_set.images], skipped=image_set.skipped)
    classifier = _classifier_stage(cfg, device, manifest)
    with manifest.stage("encoder"):
        encoder, preprocess = load_encoder(cfg.encoder, device=device, dtype=resolve_dtype(cfg.dtype, device))
    components = select_components(cfg.lens.name, cfg.layer, cfg.head, cfg.component, encoder.n_layers,
                                   encoder.n_heads, mid=cfg.lens.mid, clamp=cfg.clamp_to_model)
    if cfg.study.name:
        run_study_job(cfg, run_dir, encoder, preprocess, image_set, components, manifest)
        return
    with manifest.stage("lens"):
        scored = score_images(cfg, encoder, preprocess, image_set, components)
        if cfg.lens.name == "steering" and cfg.lens.verify:
            worst = verify_steering(cfg, encoder, preprocess, image_set, components, scored)
            tolerance = 1e-4 if encoder.dtype == torch.float32 else 5e-2
            if worst > tolerance:
                log.warning("lens.verify: closed form and hooked reference differ by %.3g (> %g)", worst, tolerance)
            manifest.update(verify_max_abs_diff=worst, verify_ok=worst <= tolerance)
        if cfg.lens.name == "logit":
            write_labels(cfg, classifier, run_dir, scored, components)
    _save_inputs(cfg, run_dir, image_set)

    csv_log = CsvLog(run_dir / "similarity.csv", COLUMNS)
    plan = start_csv(cfg, run_dir, scored, previous, csv_log)
    manifest.update(components=len(components), rows=len(components) * len(scored), to_decode=len(plan))

    if plan:
        with manifest.stage("decoder"):
            decoder = decoder_beside(cfg, encoder, device)
            manifest.update(scheduler=type(decoder.pipe.scheduler).__name__)
        with manifest.stage("decode"):
            decode_and_write(cfg, encoder, preprocess, decoder, run_dir, scored, plan, csv_log, manifest)

    with manifest.stage("write"):
        order = {(s.name, row["component"]): n for n, s in enumerate(scored) for row in s.rows}
        rows = sorted(read_csv(csv_log.path), key=lambda r: order.get((r["image"], r["component"]), len(order)))
        csv_log.rewrite(_finish_rows(cfg, rows))
        figures = redraw(run_dir)
    manifest.update(status="complete", figures=len(figures), finished=time.strftime("%Y-%m-%dT%H:%M:%S"))
    for line in best_components(rows, cfg.lens.rank_by):
        log.info("%s", line)
    log.info("run complete: %s (figures on one page: %s)", run_dir, run_dir / "index.html")
