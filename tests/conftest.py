"""Shared fixtures for the encoder: tiny open_clip vision towers with random weights (no downloads)."""

from __future__ import annotations

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


def pytest_collection_modifyitems(config, items) -> None:
    """Tests marked `gpu` are skipped where CUDA is not available."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
