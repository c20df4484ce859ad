"""Memory: what is free on a device, giving back what a stage no longer needs, and sizing work to fit.

A run's stages need different models: the logit lens's text tower (built alone, before the encoder, and
released before anything else runs), the encoder, the decoder. On a GPU too small to hold the encoder and
the decoder with room to decode, the encoder waits on the CPU while the decoder works (`park_if_short`) and
comes back for the re-encoding of each decoded batch (`visiting`). Work is sized from what the device has free
(`free_bytes`, within a per-process cap if one is set); on the host, freed activations go straight back to the
system (`give_freed_blocks_back`). Figures: docs/benchmarks.md, "Memory".
"""

from __future__ import annotations

import ctypes
import gc
import json
import logging
import os
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, TypeVar

import torch
from torch import nn

from dsl_cli.weights import cache_folder

log = logging.getLogger("dsl_cli.memory")

GB = 1024**3
HEADROOM = 0.8  # of the free memory, the share work is sized to: the allocator fragments, kernels need scratch
# Kandinsky 2.2 decoding, beyond its weights, per picture in a batch at 512 x 512 (two UNet rows with guidance,
# the MoVQ's full-size activations), in bytes per weight byte of the precision: measured on the CPU in float32
# (scripts/bench_memory.py --decode-probe) and taken as it is for other precisions (activations scale with it).
DECODE_BYTES_PER_PICTURE_512 = 1.5 * GB / 4


# glibc's mallopt parameters (malloc.h): blocks of 1 MiB and more in mappings of their own, given back when freed;
# the heap's free top kept up to 8 MiB. Setting the first turns glibc's dynamic thresholds off, which left the
# trim threshold at 128 KiB: the heap then shrank and grew again around small tensors, and a tiny decoding run
# took 0.4 to 0.8 s longer in page faults (900,000 against 540,000), more where libraries were imported late.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MALLOC_SETTINGS = ((M_MMAP_THRESHOLD, 2**20), (M_TRIM_THRESHOLD, 8 * 2**20))


def give_freed_blocks_back() -> bool:
    """Have the C library serve blocks of 1 MiB and more from their own mappings, returned to the system when
    freed. Its default threshold grows as a forward pass frees activations, after which they come from a heap
    that fragments and is never given back: bigG's forward on the CPU then peaks 0.2 to 0.4 GiB higher,
    unpredictably (docs/benchmarks.md). Costs about 10 % of a bigG forward on the CPU (fresh pages for each
    layer's activations). Left to the user when MALLOC_MMAP_THRESHOLD_ or MALLOC_TRIM_THRESHOLD_ is set;
    False where the C library has no mallopt (macOS)."""
    if {"MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"} & set(os.environ):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return all([bool(mallopt(parameter, value)) for parameter, value in MALLOC_SETTINGS])


def release_memory(device: "str | torch.device") -> None:
    """Collect what was just dropped, and on CUDA hand the allocator's unused cache back to the driver, so
    that the next stage (or another process) can have it."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


T = TypeVar("T")


def halving_batches(total: int, batch: int, run: Callable[[int, int], T], device: "str | torch.device",
                    what: str, logger: logging.Logger = log) -> Iterator[tuple[int, int, T]]:
    """`run(start, stop)` over items [0, total) in batches of `batch`, yielding (start, stop, result) in order.
    On CUDA out-of-memory the batch is halved, for the rest of the call, and the same items are retried (a
    batch of one that does not fit raises); `what` names the work in the warning (`decoding`)."""
    start, size = 0, max(1, batch)
    while start < total:
        stop = min(start + size, total)
        try:
            result = run(start, stop)
        except torch.cuda.OutOfMemoryError:
            if size == 1:
                raise
            result = _OUT_OF_MEMORY  # handled below, once the traceback holding the batch's tensors is freed
        if result is _OUT_OF_MEMORY:
            size //= 2
            logger.warning("CUDA out of memory: %s in batches of %d from item %d on", what, size, start)
            release_memory(device)
            continue
        yield start, stop, result
        start = stop


_OUT_OF_MEMORY: Any = object()


def free_bytes(device: "str | torch.device") -> Optional[int]:
    """Bytes that new tensors on a CUDA `device` can take: the driver's free memory plus what torch's caching
    allocator holds unused. None for the CPU, whose memory dsl does not size work by."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    reserved = torch.cuda.memory_reserved(device)
    # A process capped with torch.cuda.set_per_process_memory_fraction (a shared GPU, or a 24 GB card
    # emulated on a bigger one) gets no more than its cap, whatever the driver has free.
    index = device.index if device.index is not None else torch.cuda.current_device()  # it takes no bare "cuda"
    cap = int(torch.cuda.get_per_process_memory_fraction(index) * total) - reserved
    return min(free, max(0, cap)) + reserved - torch.cuda.memory_allocated(device)


def decode_memory_file() -> Path:
    """decode_memory.json in dsl's cache folder: the auto batch's probe peaks, kept for the next run."""
    return cache_folder() / "decode_memory.json"


def recorded_peaks(key: str) -> Optional[tuple[int, int]]:
    """The probe peaks (bytes, of one and of two pictures) an earlier run recorded under `key`; None when there
    are none, or the record cannot be read (it is then measured again and rewritten)."""
    peaks = _read_record().get(key)
    if isinstance(peaks, list) and len(peaks) == 2 and all(type(p) is int and p > 0 for p in peaks):
        return peaks[0], peaks[1]
    return None


def record_peaks(key: str, peaks: tuple[int, int]) -> None:
    """Keep the probe peaks measured under `key`. Runs started together may each write; the last one's record
    stands (another's entry lost is measured again), and none ever reads a half-written file. Where the cache
    folder cannot be written (a read-only home), the next run measures again."""
    record = {**_read_record(), key: list(peaks)}
    path = decode_memory_file()
    part = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        part.write_text(json.dumps(record, indent=1, sort_keys=True))
        os.replace(part, path)
    except OSError as err:
        with suppress(OSError):  # a folder that is a file cannot hold the part either
            part.unlink(missing_ok=True)
        log.info("the decoder's measured memory is not kept for the next run (%s)", err)


def _read_record() -> dict:
    try:
        record = json.loads(decode_memory_file().read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def host_available() -> Optional[int]:
    """Bytes of host memory available to new work (Linux's MemAvailable); None where /proc cannot say."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def module_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers."""
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def rows_that_fit(device: "str | torch.device", row_bytes: int, cap: int) -> int:
    """How many rows of `row_bytes` working memory each to run at once on `device`: as many as HEADROOM of its
    free memory holds, between 1 and `cap`; `cap` on the CPU."""
    free = free_bytes(device)
    if free is None:
        return cap
    return max(1, min(cap, int(free * HEADROOM) // max(1, row_bytes)))


def decode_need(weight_bytes: int, batch: int, height: int, width: int, dtype: torch.dtype) -> int:
    """Bytes decoding needs on the device: the decoder's weights and `batch` pictures' working memory."""
    per_picture = DECODE_BYTES_PER_PICTURE_512 * torch.finfo(dtype).bits / 8 * height * width / 512**2
    return int(weight_bytes + batch * per_picture)


def park_if_short(model: nn.Module, device: "str | torch.device", need: int) -> bool:
    """Move `model` to the CPU when CUDA `device` has less than `need` bytes free (what the next stage needs);
    True when it was moved. Nothing moves on the CPU or when there is room."""
    free = free_bytes(device)
    if free is None or free >= need:
        return False
    log.info("the GPU has %.1f GB free and decoding needs %.1f GB: the encoder waits on the CPU while the "
             "decoder works", free / GB, need / GB)
    model.to("cpu")
    release_memory(device)
    return True


@contextmanager
def visiting(model: nn.Module, device: torch.device, idle=None) -> Iterator[None]:
    """Run a block with `model` on `device` and put it back where it was afterwards. Where `device` is short
    of room for it, `idle` (a model or pipeline working on `device` but not needed in the block) waits on
    the CPU meanwhile. Nothing moves when `model` is on `device` already."""
    home = next(model.parameters()).device
    if home == torch.device(device):
        yield
        return
    free = free_bytes(device)
    idle_moves = idle is not None and free is not None and free * HEADROOM < module_bytes(model)
    if idle_moves:
        idle.to("cpu")
        release_memory(device)
    model.to(device)
    try:
        yield
    finally:
        model.to(home)
        if idle_moves:
            release_memory(device)
            idle.to(device)
