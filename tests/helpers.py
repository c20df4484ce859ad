"""What several test modules share (tests/ is on the path: pytest's default import mode)."""

from __future__ import annotations

from pathlib import Path

import torch
from open_clip.transformer import QuickGELU, VisionTransformer

from dsl_cli import cli


def dsl_in_process(args: list[str], folder: Path, monkeypatch, capsys) -> tuple[int, str]:
    """`dsl ARGS` in this process, from `folder` (saves the seconds of a fresh interpreter per case)."""
    monkeypatch.chdir(folder)
    try:
        code = cli.main(args)
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err


def perturb_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give biases, LayerNorm affines and LayerScale gammas random values: open_clip and transformers
    initialise them to 0/1/constant, which would hide a bias or scale applied in the wrong place."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("gamma"):
                p.copy_(0.05 + 0.4 * noise.abs())
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            elif p.ndim == 1 and name.endswith("weight"):  # LayerNorm scale
                p.copy_(1 + 0.2 * noise)
    return module


def mid_visual() -> VisionTransformer:
    """A LayerScale, QuickGELU tower unlike the tiny one: width 128, 6 layers, 8 heads, embed 48."""
    torch.manual_seed(3)
    visual = VisionTransformer(image_size=64, patch_size=16, width=128, layers=6, heads=8, mlp_ratio=4.0,
                               ls_init_value=0.1, output_dim=48, act_layer=QuickGELU)
    return perturb_(visual).eval()


def fake_cache(hub: Path, repo: str, files: list[str]) -> None:
    """Lay `files` of `repo` out in the Hugging Face cache folder `hub`, as huggingface_hub does."""
    folder = hub / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text("0" * 40)
    for name in files:
        path = folder / "snapshots" / ("0" * 40) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("{}")
