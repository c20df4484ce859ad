"""What several test modules share (tests/ is on the path: pytest's default import mode)."""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path

import torch
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf
from open_clip.transformer import LayerScale, QuickGELU, VisionTransformer

from dsl_cli import cli
from dsl_cli.components import parse_component
from dsl_cli.encoder import MeanWrites


def dsl_in_process(args: list[str], folder: Path, monkeypatch, capsys, out: bool = False):
    """`dsl ARGS` in this process, from `folder` (saves the seconds of a fresh interpreter per case): (exit
    status, stderr), or with `out` (exit status, stdout, stderr)."""
    monkeypatch.chdir(folder)
    code = _main(args)
    printed = capsys.readouterr()
    return (code, printed.out, printed.err) if out else (code, printed.err)


def dsl_here(args: list[str], folder: Path) -> int:
    """`dsl ARGS` in this process, from `folder`, for module fixtures (which have no monkeypatch or capsys):
    the working directory is put back afterwards. Returns the exit status; what dsl printed is in pytest's
    captured output of the first test that uses the fixture."""
    before = os.getcwd()
    os.chdir(folder)
    try:
        return _main(args)
    finally:
        os.chdir(before)


def _main(args: list[str]) -> int:
    """`cli.main`, as a process would end it: Hydra's global state cleared before (a test that failed
    inside Hydra's compose API may leave it set); after, the root logger as it was before Hydra configured it,
    the run's handlers closed (a process's exit would close them; left in place, whatever this process logs
    next would go into that run's dsl.log, or to a test's captured stream pytest has closed since)."""
    GlobalHydra.instance().clear()
    handlers, level = logging.root.handlers[:], logging.root.level
    try:
        return cli.main(args)
    except SystemExit as exit_:
        return exit_.code
    finally:
        for handler in logging.root.handlers[:]:
            if handler not in handlers:
                logging.root.removeHandler(handler)
                handler.close()
        logging.root.handlers[:] = handlers
        logging.root.setLevel(level)


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


# ---- interventional studies (test_studies.py, test_paper.py)

TINY_HEADS = [f"L{l}H{h}" for l in range(4) for h in range(4)]


def ablated_copy(visual: VisionTransformer, components: list[str],
                 means: MeanWrites | None = None) -> VisionTransformer:
    """A deep copy whose weights ablate `components`: a head's W_O columns and an MLP's c_proj zeroed;
    with `means`, the mean write (LayerScale divided out) added to the output bias instead."""
    copied = copy.deepcopy(visual)
    with torch.no_grad():
        for comp in map(parse_component, components):
            block = copied.transformer.resblocks[comp.layer]
            if comp.kind == "head":
                d = block.attn.head_dim
                block.attn.out_proj.weight[:, comp.head * d:(comp.head + 1) * d] = 0
                if means is not None:
                    block.attn.out_proj.bias += means.heads[comp.layer, comp.head] / _gamma(block.ls_1)
            else:
                block.mlp.c_proj.weight.zero_()
                block.mlp.c_proj.bias.zero_()
                if means is not None:
                    block.mlp.c_proj.bias += means.mlps[comp.layer] / _gamma(block.ls_2)
    return copied


def _gamma(module) -> torch.Tensor | float:
    return module.gamma if isinstance(module, LayerScale) else 1.0


def forward(visual: VisionTransformer, pixels: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return visual(pixels)


def cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a, b, dim=-1)


def study_cfg(study_name: str, **study) -> OmegaConf:
    """The config keys the study stage reads, small settings, `study` overriding them."""
    fields = dict(name=study_name, ablation="zero", steps=3, greedy_pool=4, random_orders=2, overlay_scale=0.45,
                  overlay_position="center", decode_steps=[0, 2], bootstrap=200)
    return OmegaConf.create({"study": {**fields, **study}, "lens": {"mode": "norm", "alpha": 2.0}, "seed": 0,
                             "encoder": {"batch_size": 8}})


REPO = Path(__file__).resolve().parents[1]
# the README and the guides it links: every shell command and example in them is tested (tests/test_readme.py)
DOCS = [REPO / "README.md", *(REPO / "docs" / name for name in (
    "user-guide.md", "reading-a-head.md", "cluster.md", "studies.md", "python-api.md", "extending.md",
    "benchmarks.md", "testing.md"))]


def docs_text() -> str:
    """The README and its guides as one text (each section keeps its heading)."""
    return "\n".join(path.read_text() for path in DOCS)
