"""Shared fixtures for the encoder: tiny open_clip vision towers with random weights (no downloads)."""

from __future__ import annotations

import subprocess

import pytest
import torch

from dsl_cli.encoder import HookedEncoder, build_tiny_visual


@pytest.fixture
def tiny_visual():
    """The tiny open_clip VisionTransformer (image 64, patch 16, width 64, 4 layers, 4 heads, embed 32),
    seeded random weights, eval mode."""
    return build_tiny_visual()


@pytest.fixture
def tiny_encoder(tiny_visual) -> HookedEncoder:
    return HookedEncoder(tiny_visual)


@pytest.fixture
def tiny_pixels() -> torch.Tensor:
    """[3, 3, 64, 64] normalised-pixel-space inputs for the tiny tower."""
    return torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def slurm_missing() -> str | None:
    """Why the tests marked `slurm` cannot run here, or None when a SLURM controller answers with a node up."""
    hint = "start a one-node SLURM with `sudo scripts/slurm_localhost.sh`"
    try:
        answer = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"needs SLURM: sinfo does not answer ({err}); {hint}"
    if answer.returncode != 0:
        return f"needs SLURM: sinfo failed ({answer.stderr.strip()}); {hint}"
    if not {"idle", "mix", "alloc"} & set(answer.stdout.split()):
        return f"needs SLURM: no node is up (sinfo: {answer.stdout.split()}); {hint}"
    return None


def pytest_collection_modifyitems(config, items) -> None:
    """Tests marked `gpu` are skipped where CUDA is not available, those marked `slurm` where SLURM is not."""
    needs = {"gpu": None if torch.cuda.is_available() else "needs CUDA"}
    if any("slurm" in item.keywords for item in items):
        needs["slurm"] = slurm_missing()
    for mark, reason in needs.items():
        for item in items:
            if reason and mark in item.keywords:
                item.add_marker(pytest.mark.skip(reason=reason))
