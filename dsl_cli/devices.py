"""Where and in which precision models run: `device` and `dtype` config values -> torch objects."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from dsl_cli.errors import UserError

log = logging.getLogger("dsl_cli")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@contextmanager
def seeded_on(device: str | torch.device) -> Iterator[None]:
    """Build modules with random weights, without disturbing the caller's random state; on `device`, because
    a billion parameters take tens of seconds to initialise on a CPU (the caller seeds, inside)."""
    device = torch.device(device)
    cuda = [torch.cuda.current_device() if device.index is None else device.index] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda), device:
        yield


def resolve_device(name: str) -> torch.device:
    """`auto` takes CUDA when present and otherwise warns and uses the CPU; `cuda` without CUDA is an error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        log.warning("no CUDA device found: running on the CPU (slow for real-size models)")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device=cuda but no CUDA device is available; use device=cpu or device=auto")
    if name not in ("cuda", "cpu"):
        raise UserError(f"device={name!r}: use auto, cuda or cpu")
    return torch.device(name)


_STARTING: threading.Thread | None = None  # `begin_device`'s thread, joined by `start_device`


def begin_device() -> None:
    """Start making the CUDA context in a thread, for a job whose device may be CUDA (its caller decides):
    the driver's start and the context take a second or more on a large GPU, and the rest of the job's
    start-up (importing dsl's stages, checking the config, preflight) runs meanwhile. `start_device` waits
    for it; a second call (the next job of a local sweep) starts none."""
    global _STARTING
    if _STARTING is None:
        # not a daemon: a process that ends early (a bad config) waits for it rather than exit mid-start
        _STARTING = threading.Thread(target=_make_context, name="dsl-cuda-start")
        _STARTING.start()


def _make_context() -> None:
    try:
        if torch.cuda.is_available():
            torch.zeros(1, device="cuda")
    except Exception:  # noqa: BLE001 - `start_device` makes it again on the job's own thread, which reports
        pass


def start_device(device: torch.device) -> None:
    """Make the CUDA context now (a second or so), before the first stage, rather than inside the encoder's
    load: a run's start-up (manifest `seconds.startup`) then ends at its first GPU work. Where `begin_device`
    started it, this waits for that thread; an error it met is raised here. Nothing on the CPU."""
    if _STARTING is not None:
        _STARTING.join()
    if device.type == "cuda":
        torch.zeros(1, device=device)


def resolve_dtype(name: str, device: str | torch.device) -> torch.dtype:
    """`auto` is bf16 on CUDA (tensor cores, no fp16 overflow) and fp32 elsewhere (CPU half kernels are slow)."""
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if name not in DTYPES:
        raise UserError(f"dtype={name!r}: choose one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    """The config's name of a dtype (`bf16`), as the manifest records it."""
    return next(name for name, value in DTYPES.items() if value == dtype)


class Placed:
    """`device` and `dtype` of a model wrapper: those of the tensor its `placement` property names (one of its
    weights: where the model is and in which precision it computes)."""

    @property
    def placement(self) -> torch.Tensor:
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return self.placement.device

    @property
    def dtype(self) -> torch.dtype:
        return self.placement.dtype
