"""Shared fixtures: tiny open_clip vision towers with random weights (no downloads), the study stage's set-up."""

from __future__ import annotations

import gc
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from dsl_cli.components import parse_component
from dsl_cli.config import EncoderConfig
from dsl_cli.encoder import HookedEncoder, build_tiny_visual, load_encoder
from dsl_cli.images import InputImage
from helpers import TINY_HEADS


def _share_the_cores() -> None:
    """Under pytest-xdist, each worker's torch, and every dsl process it starts (they inherit the environment),
    uses its share of the cores, not all of them: with two workers of two threads each on 2 cores, a tiny run
    took 3x as long as alone (OpenMP threads waiting for each other); with one thread each, 1.5x."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        threads = max(1, (os.cpu_count() or 1) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


_share_the_cores()


def _stop_signals_not_ignored() -> None:
    """The tests send Ctrl-C, SIGTERM and SIGHUP to dsl and expect it to stop. dsl leaves a signal that it
    starts with ignored as it is (`nohup dsl run ... &`), and a shell ignores SIGINT in what it starts in the
    background (`pytest ... &` in a script, as some CI runners do): the processes the tests start (which
    inherit what is ignored) get the signals' usual meaning back here."""
    import signal

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(signum) is signal.SIG_IGN:
            signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)


_stop_signals_not_ignored()


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
    """Tests marked `gpu` are skipped where CUDA is not available, those marked `slurm` where SLURM is not,
    those marked `own_process` under mutmut (MUTANT_UNDER_TEST set: scripts/mutation.py), where they would
    only spend minutes running unmutated code in another process.
    By marker, not `mark in item.keywords`: keywords also hold folder names (a checkout in .../gpu/)."""
    needs = {"gpu": None if torch.cuda.is_available() else "needs CUDA",
             "own_process": "mutation testing: the mutant is not in the process this test starts"
             if "MUTANT_UNDER_TEST" in os.environ else None}
    if any(item.get_closest_marker("slurm") for item in items):
        needs["slurm"] = slurm_missing()
    for mark, reason in needs.items():
        for item in items:
            if reason and item.get_closest_marker(mark):
                item.add_marker(pytest.mark.skip(reason=reason))
    items.sort(key=lambda item: LONGEST_FIRST.get(item.path.stem, len(LONGEST_FIRST)))  # stable: file order kept


def pytest_collection_finish(session) -> None:
    """Every test module is imported, and with them the model libraries: their objects live as long as this
    process, so no garbage collection should walk them again (as `dsl run` does after its imports,
    dsl_cli.job._load_run); the tests that run dsl in this process are faster for it."""
    gc.freeze()


# The modules that take longest (2026-12-06, 2-core machine, seconds on one of two workers), first: under
# `-n 2 --dist loadscope --no-loadscope-reorder` (pyproject.toml) a module runs on one worker, in this order,
# and a long module started last would leave the other worker idle at the end. The rest keep file order.
LONGEST_FIRST = {name: rank for rank, name in enumerate([
    "test_readme",  # 90 s
    "test_device_check",  # 76
    "test_slurm",  # 65
    "test_resume",  # 65
    "test_sweeps",  # 63
    "test_errors",  # 61
    "test_decoder_families",  # 59
    "test_run",  # 58
    "test_imports",  # 47
    "test_run_folder",  # 45
    "test_cli",  # 41
    "test_trust",  # 40
    "test_paper",  # 29
    "test_weights",  # 25
    "test_rows",  # 24
])}


@pytest.fixture(scope="module")
def tiny_run():
    """The tiny encoder and its preprocessing, three random pictures of different sizes, and 8 heads and an
    MLP of the tiny ViT (for the study stage)."""
    encoder, preprocess = load_encoder(EncoderConfig(source="tiny", name="tiny", pretrained=None))
    g = np.random.default_rng(0)
    images = [InputImage(f"img{i}", Image.fromarray(g.integers(0, 256, (70 + 10 * i, 90, 3), dtype=np.uint8)), "")
              for i in range(3)]
    components = [parse_component(c) for c in TINY_HEADS[4:12]] + [parse_component("L1MLP")]
    return encoder, preprocess, images, components


@pytest.fixture(autouse=True)
def _close_figures():
    """Figures a test drew to inspect (and did not save) are closed after it: pyplot keeps every open figure."""
    yield
    if "matplotlib.pyplot" in sys.modules:
        sys.modules["matplotlib.pyplot"].close("all")
