"""Which folder a job continues instead of starting afresh: `dsl run resume=FOLDER`, a job of a resumed sweep, or
a SLURM job that SLURM requeued (preemption, node failure, a time limit turned into a requeue) and that finds
its own earlier attempt. Below the runner, the job wrapper and the sweeps, which all ask it."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from omegaconf import DictConfig

from dsl_cli.errors import Refused
from dsl_cli.outputs import Manifest, damaged, is_sweep_folder, read_manifest

log = logging.getLogger("dsl_cli.resumption")


def current_slurm_job() -> str | None:
    """This process's SLURM job as `cluster/job id` (kept by SLURM across requeues), or None outside SLURM."""
    job = os.environ.get("SLURM_JOB_ID")
    return f"{os.environ.get('SLURM_CLUSTER_NAME', '')}/{job}" if job else None


def requeued_run(folder: Path) -> bool:
    """True when `folder` holds a run that this very SLURM job started before SLURM requeued it (preemption,
    node failure, or a time limit that submitit turned into a requeue)."""
    manifest = read_manifest(folder)
    restarts = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
    return bool(manifest and restarts > 0 and manifest.get("slurm_job") == current_slurm_job())


def continues_in_place(cfg: DictConfig, run_dir: Path) -> bool:
    """True when `run_dir` holds this job's own earlier attempt, to be continued rather than refused: SLURM
    requeued the job, or `dsl run resume=SWEEP_DIR` relaunched the sweep that the folder belongs to."""
    if read_manifest(run_dir) is None:
        return False
    sweep = Path(cfg.resume) if cfg.resume else None
    in_resumed_sweep = (sweep is not None and is_sweep_folder(sweep)
                        and run_dir.resolve().is_relative_to(sweep.resolve()))
    return in_resumed_sweep or requeued_run(run_dir)


def resumes(cfg: DictConfig, run_dir: Path) -> bool:
    """Whether a job continues what is in `run_dir` (`resume=`, a requeue, a resumed sweep) rather than
    starting afresh, where a folder that holds a run is refused."""
    return bool(cfg.resume) or continues_in_place(cfg, run_dir)


def recorded_images(manifest: Manifest) -> dict[str, str] | None:
    """The fingerprints of the input images (name -> `dsl_cli.images.fingerprint`) the run's first attempt
    recorded; None where none were (a fresh run, or one an older dsl started); a record that is not an object
    of texts is refused as damage."""
    known = manifest.data.get("fingerprints")
    earlier = known.get("images") if isinstance(known, dict) else None
    if earlier is not None and not (isinstance(earlier, dict) and all(isinstance(v, str) for v in earlier.values())):
        raise damaged(manifest.path, "fingerprints.images is not an object of texts")
    return earlier


def same_images(manifest: Manifest, fingerprints: dict[str, str]) -> None:
    """Record this attempt's input images' fingerprints in the manifest, beside the weights' (kept across
    attempts), once they were found the same as those of the run's first attempt (`refuse_changed_images`,
    before this attempt's record started). A run started by a dsl that recorded none is not checked."""
    if recorded_images(manifest) is None and manifest.data.get("resumed_rows"):
        log.info("%s: its manifest holds no fingerprints of the input images (an older dsl started the run): "
                 "not checked that they are the ones it started with", manifest.path.parent)
    manifest.update(fingerprints={**manifest.data.get("fingerprints", {}), "images": fingerprints})


def refuse_changed_images(run_dir: Path, earlier: dict[str, str], now: dict[str, str]) -> None:
    """One line naming the images that differ from those the run started with, if any: its input.png, pictures
    and rows belong to the images it started with, so an image changed, added or removed since would pair one
    photo's input with another's results."""
    changes = {"changed": sorted(n for n in earlier.keys() & now.keys() if earlier[n] != now[n]),
               "added": sorted(now.keys() - earlier.keys()), "removed": sorted(earlier.keys() - now.keys())}
    found = [f"{how}: {_some(names)}" for how, names in changes.items() if names]
    if found:
        raise Refused(f"{run_dir}: input images differ from those the run started with ({'; '.join(found)}); "
                        "a continued run keeps its images: put them back as they were, or start a new run")


def _some(names: list[str], shown: int = 5) -> str:
    """The first `shown` names, and how many more: a folder of 10,000 photos replaced stays one short line."""
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more
