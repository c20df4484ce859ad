"""What the benchmark scripts and the device check share: timing with device synchronisation, the name of
the device, and a JSON record rewritten after every measurement (so a run cut short keeps what it measured)."""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Optional

import torch

from dsl_cli.outputs import write_json


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (timings would otherwise measure only the launches)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def timed(fn: Callable[[], Any], device: torch.device, clock: str = "wall") -> tuple[Any, float]:
    """(fn's result, seconds), with the device synchronised before and after. clock: `wall`, or `cpu` (this
    process's CPU time: on a CPU shared with other jobs, a single-threaded run's CPU time does not grow
    with their load, where its wall time does)."""
    now = CLOCKS[clock]
    sync(device)
    start = now()
    out = fn()
    sync(device)
    return out, now() - start


def interleaved(fns: dict[str, Callable[[], Any]], device: torch.device, repeats: int,
                clock: str = "wall") -> dict[str, list[float]]:
    """Seconds of each fn over `repeats` rounds, the fns taking turns within each round, so that load from
    other jobs on a shared machine falls on all of them alike. Each fn runs once untimed first (warm-up)."""
    for fn in fns.values():
        timed(fn, device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(timed(fn, device, clock)[1])
    return times


def median_ratio(numerator: Sequence[float], denominator: Sequence[float]) -> float:
    """Median of the per-round ratios (robust to a round slowed down as a whole)."""
    return statistics.median(n / d for n, d in zip(numerator, denominator))


def cpu_name() -> str:
    with open("/proc/cpuinfo") as f:
        names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    return f"{names[0] if names else platform.processor() or 'unknown CPU'}, {len(names)} cores"


def describe_device(device: torch.device) -> str:
    """`NVIDIA H100 80GB HBM3` or `AMD EPYC, 2 cores, 2 torch threads`."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()}, {torch.get_num_threads()} torch threads"


class JsonRecord:
    """A JSON file holding `fields` and a list of `rows`, rewritten atomically after every change."""

    def __init__(self, path: Optional[Path], **fields: Any):
        self.path = Path(path) if path else None
        self.data: dict[str, Any] = {**fields, "rows": []}
        self._write()

    def update(self, **fields: Any) -> None:
        self.data.update(fields)
        self._write()

    def add_row(self, row: dict[str, Any]) -> None:
        self.data["rows"].append(row)
        self._write()

    def _write(self) -> None:
        if self.path is not None:
            write_json(self.path, self.data)
