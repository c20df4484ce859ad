"""Which folder a job continues instead of starting afresh: `dsl run resume=FOLDER`, a job of a resumed sweep, or
a SLURM job that SLURM requeued (preemption, node failure, a time limit turned into a requeue) and that finds
its own earlier attempt. Below the runner, the job wrapper and the sweeps, which all ask it."""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig

from dsl_cli.outputs import is_sweep_folder, read_manifest


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
