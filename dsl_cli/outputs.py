"""Outputs: the last stage. Everything a run writes, and `dsl plot`, which redraws figures from files alone.

Run folder layout:
    similarity.csv                         one tidy row per (image, lens, component, seed)
    labels.csv                             logit lens: top labels per component
    patches.csv                            per chosen head: each source token's share of its CLS write
    seeds.csv, baselines.csv               decode.seeds > 1: extra seeds, baseline pictures (dsl_cli.baselines)
    images/<image>/input.png               the input, centre-cropped to the decode size
    images/<image>/<lens>/<component>.png  decoded pictures
    grids/<image>_<lens>_L<layer>.png      input first, then each component of the layer, labelled
    grids/<image>_<lens>_top.png           the best-ranked decoded components of the image
    grids/<image>_<lens>_layers.png        diffusion and logit lenses: the residual stream, layer by layer
    grids/<image>_<lens>_seeds.png         decode.seeds > 1: the best components per seed, and the baselines
    heatmaps/<image>_<lens>.png            layers x (heads, MLP, residual) similarity
    plots/<image>_logit.png                logit lens: top label per layer
    looks/<image>_<lens>.png               per head: where it looks (patch shares over the input), its picture
    manifest.json                          config, versions, device, timings, counts, status
    index.html                             the run's page (dsl_cli.report)

Every file is written under a temporary name and renamed, so a killed run never leaves half a file.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import io
import json
import os
import math
import logging
import re
import secrets
import socket
import time
from collections import Counter
from itertools import takewhile
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence, TypedDict, get_args, get_type_hints

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from dsl_cli.components import parse_component
from dsl_cli.errors import FolderTaken, UserError, printable, raise_if_stopped

log = logging.getLogger("dsl_cli.outputs")

BASELINE_IMAGE = "_baselines"  # the image folder of the baseline pictures (dsl_cli.baselines)
BASELINE_NAMES = ("uncond", "mean")  # the `component` of a baselines.csv row (dsl_cli.baselines)


# ---------------------------------------------------------------- the CSVs: one row type each
# A row is a dict (csv's DictWriter/DictReader, the figures and the page index it by column name); its
# TypedDict below is its schema: the columns in file order, each with its type. `read_csv` gives a number
# column back as int or float (None where empty), so that no reader of a CSV parses a number from a string.


class SimilarityRow(TypedDict, total=False):
    """similarity.csv: one row per (image, lens, component, seed)."""

    image: str
    lens: str
    component: str
    kind: str
    layer: int | None
    head: int | None
    mode: str
    alpha: float | None
    seed: int | None
    steps: int | None
    guidance: float | None
    sim_embed: float | None
    sim_decoded: float | None
    norm: float | None
    rank: int | None
    file: str
    # added later, at the end, so that a run folder of an earlier version still reads (`read_csv`)
    attribution: float | None
    top_patches: str
    sim_decoded_mean: float | None
    sim_decoded_std: float | None
    labels: str
    description: str
    activation: float | None  # an SAE feature's activation f_i at the readout position (dsl_cli.sae)


class LabelRow(TypedDict, total=False):
    """labels.csv (logit lens): the top labels of each component."""

    image: str
    lens: str
    component: str
    layer: int | None
    head: int | None
    rank: int | None
    label: str
    score: float | None


class PatchRow(TypedDict, total=False):
    """patches.csv: where each chosen head looks: the CLS token's share of its CLS write and each patch's
    (`;`-joined, row by row, in a grid x grid of patches)."""

    image: str
    lens: str
    component: str
    grid: int | None
    cls_share: float | None
    shares: str


class ExtraRow(TypedDict, total=False):
    """seeds.csv and baselines.csv (dsl_cli.baselines): a picture decoded with another seed, or a baseline
    picture (component `uncond` or `mean`) scored against an image."""

    image: str
    lens: str
    component: str
    seed: int | None
    sim_decoded: float | None
    file: str


class ImportanceRow(TypedDict, total=False):
    """study_head_importance.csv: a head's importance (the drop of the image's similarity when it is
    ablated) beside the scores it is correlated with (dsl_cli.figures.SCORES for the default lenses, steering and
    direct; then a column per further lens of `study.lenses`, named after it: `IMPORTANCE.with_columns`)."""

    image: str
    component: str
    layer: int | None
    head: int | None
    ablation: str
    mode: str
    alpha: float | None
    importance: float | None
    dsl: float | None
    direct: float | None
    direct_importance: float | None


class CorrelationRow(TypedDict, total=False):
    """correlations.csv: Spearman and Pearson correlations of importance with a score, with bootstrap
    intervals, per image and pooled."""

    ablation: str
    image: str
    lens: str
    n: int | None
    spearman: float | None
    spearman_low: float | None
    spearman_high: float | None
    spearman_p: float | None
    pearson: float | None
    pearson_low: float | None
    pearson_high: float | None
    pearson_p: float | None


class OverlayRow(TypedDict, total=False):
    """study_overlay_removal.csv: a composite's similarity to its overlay as heads are ablated in an order."""

    image: str
    background: str
    foreground: str
    ablation: str
    order: str
    seed: int | None
    step: int | None
    component: str
    dsl_score: float | None
    overlay_sim: float | None
    auc: float | None


@dataclass(frozen=True)
class Table:
    """One CSV of a run folder: its file name and its row type. An `open` table may hold number columns after
    its row type's, named by whoever wrote it (a study's further lenses' scores): `with_columns` gives the
    table with them (`extra`), and `read_csv` reads them back as the file's header names them."""

    name: str
    row: type  # a TypedDict above
    open: bool = False
    extra: tuple[str, ...] = ()  # float columns after the row type's
    # whether every number dsl writes in it is finite: a `nan` or `inf` there was typed in by hand, while a
    # table of statistics (correlations of constant scores) holds a nan dsl wrote; an empty cell is None
    finite: bool = True

    @cached_property
    def kinds(self) -> dict[str, type]:
        """Column -> int, float or str (the type of its values; a number may also be None), in file order."""
        hints = get_type_hints(self.row).items()
        kinds = {name: next(k for k in get_args(hint) or (hint,) if k is not type(None)) for name, hint in hints}
        return {**kinds, **{name: float for name in self.extra if name not in kinds}}

    def with_columns(self, extra) -> "Table":
        """The table with these float columns after its own (none: the table itself)."""
        if not self.open and extra:
            raise ValueError(f"{self.name} takes no columns beyond its own")
        return replace(self, extra=tuple(extra)) if tuple(extra) != self.extra else self

    @property
    def columns(self) -> list[str]:
        return list(self.kinds)


SIMILARITY = Table("similarity.csv", SimilarityRow)
LABELS = Table("labels.csv", LabelRow)
PATCHES = Table("patches.csv", PatchRow)
SEEDS = Table("seeds.csv", ExtraRow)
BASELINES = Table("baselines.csv", ExtraRow)
IMPORTANCE = Table("study_head_importance.csv", ImportanceRow, open=True)  # + a column per further lens
CORRELATIONS = Table("correlations.csv", CorrelationRow, finite=False)
OVERLAY = Table("study_overlay_removal.csv", OverlayRow)


# ---------------------------------------------------------------- atomic files

TEMP_SUFFIX = ".dsl-tmp"  # every temporary file dsl writes ends so (and starts with a dot); no user file does
NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,199}")  # an image, lens or component name: one path part
COLUMN = re.compile(r"[A-Za-z0-9_]{1,100}")  # a column an open table's writer added (a lens name)


def write_error(path: Path, err: OSError) -> UserError:
    """An OSError met while writing `path`, as the one line a user reads (a full disk, a read-only folder)."""
    return UserError(f"cannot write {path}: {err.strerror or err}", resumable=True)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same folder and an atomic rename. The file
    gets the mode any new file gets (0644 under umask 022): the kernel applies the umask to 0o666."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}{TEMP_SUFFIX}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as err:
        raise write_error(path, err) from err
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise write_error(path, err) from err
        raise


# zlib's level for every PNG dsl writes: lossless like any other; 80 decoded pictures of 512 px took 1.5 s
# at level 1 against 6.3 s at PIL's default 6 on one core of the reference machine, for files 10 % larger
PNG_LEVEL = 1


PNG_SOFTWARE = "dsl"  # the Software text of every PNG dsl writes: what a later merge may replace is dsl's


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    info = PngInfo()
    info.add_text("Software", PNG_SOFTWARE)
    image.save(buffer, format="PNG", compress_level=PNG_LEVEL, pnginfo=info)
    return buffer.getvalue()


def is_dsl_png(path: Path) -> bool:
    """Whether `path` is a PNG that dsl wrote (its Software text), not a file of the user's by that name."""
    try:
        with Image.open(path) as image:
            return image.format == "PNG" and image.info.get("Software") == PNG_SOFTWARE
    except (OSError, ValueError, Image.DecompressionBombError):
        return False


def save_png(path: Path, image: Image.Image) -> None:
    atomic_write_bytes(path, png_bytes(image))


def usable_cores() -> int:
    """The cores this process may use: under SLURM its share, not the node's."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1


@contextmanager
def writing_pngs(files: Sequence[tuple[Path, Image.Image]], workers: int | None = None) -> Iterator[None]:
    """Save (path, picture) pairs on threads, one per core (`workers`), while the block runs: zlib and fsync
    let go of the interpreter lock, so a batch of decoded pictures is written on every core while the encoder
    re-encodes it. When the block ends every file is whole (or the first failed save is raised)."""
    with ThreadPoolExecutor(max(1, min(len(files), workers or usable_cores()))) as pool:
        saves = [pool.submit(save_png, path, picture) for path, picture in files]
        yield
        for save in saves:
            save.result()


def write_json(path: Path, data: dict) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=2, default=str) + "\n").encode())


def is_picture(path: Path) -> bool:
    """Whether `path` is a whole image file (a PNG's chunks are checked, its pixels not decoded)."""
    try:
        with Image.open(path) as image:
            image.verify()
    except (OSError, ValueError, SyntaxError):
        return False
    return True


def open_picture(path: Path, run_dir: Path) -> Image.Image:
    """A picture a run wrote, loaded; a missing or damaged one, or a file of the user's in its place (no
    tag of dsl's: it would be shown as the run's result), is an error that says how to redo it."""
    try:
        with Image.open(path) as image:
            image.load()
            if image.format != "PNG" or image.info.get("Software") != PNG_SOFTWARE:
                raise UserError(f"{path} is not a picture dsl made; move it away, then `dsl run resume={run_dir}` "
                                "makes it again")
            return image.copy()
    except (OSError, ValueError, SyntaxError) as err:
        raise UserError(f"{path}: not a readable picture ({err}); `dsl run resume={run_dir}` makes it again") from err


class Manifest:
    """manifest.json: what the run is, and how far it got; rewritten (atomically) after every change.
    An earlier attempt's record is read back, so that a failure before this attempt starts keeps it.
    It always says `made_by: dsl`: that is how dsl knows a folder as its own (`is_own_manifest`)."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.data = json.loads(read_bytes_nofollow(path))
        except (OSError, ValueError):
            self.data = {}
        if not isinstance(self.data, dict):
            self.data = {}

    def start(self, **values) -> None:
        """Begin this attempt's record: what an earlier attempt recorded is replaced, but for the fingerprints
        of the weights it read, which every attempt must match (`same_weights`), and a summary of it (when it
        started and ended, how, where, its seconds per stage), appended to `earlier_attempts`."""
        fingerprints, earlier = self.data.get("fingerprints"), self.data.get("earlier_attempts")
        earlier = [{k: a[k] for k in ATTEMPT_KEYS if k in a} for a in earlier if isinstance(a, dict)] \
            if isinstance(earlier, list) else []  # dsl's keys only: a record it carries, never reads
        if isinstance(self.data.get("started"), str):  # an attempt that began its record (not a claim's stamp)
            earlier.append({k: self.data[k] for k in ATTEMPT_KEYS if k in self.data})
        earlier = earlier[-MAX_ATTEMPTS:]  # a job requeued without end: the latest
        self.data = {"made_by": MADE_BY, **({"fingerprints": fingerprints} if isinstance(fingerprints, dict) else {}),
                     **({"earlier_attempts": earlier} if earlier else {})}
        self.update(**values)

    def complete(self, **values) -> None:
        """The run (or training, or fit) ended with all its work done: status `complete`, and when."""
        self.update(status="complete", finished=time.strftime("%Y-%m-%dT%H:%M:%S"), **values)

    def same_weights(self, key: str, tensors: Sequence, setting: str) -> None:
        """Record a fingerprint (a hash of the values) of the SAE's or adapter's (`key`) weights this attempt
        reads; an earlier attempt's that differs (trained or fitted again into the same folder since) is
        refused: a continued run would mix two models' rows in one table."""
        digest = hashlib.sha256()
        for tensor in tensors:
            if tensor is not None:
                digest.update(tensor.detach().float().cpu().contiguous().numpy())
        fingerprint = digest.hexdigest()[:16]
        known = self.data.get("fingerprints") if isinstance(self.data.get("fingerprints"), dict) else {}
        if known.get(key) not in (None, fingerprint):
            raise UserError(f"{self.path.parent}: the weights of {setting} changed since the run started (trained "
                            "or fitted again?): a continued run keeps the model it started with; give it back, "
                            "or start a new run")
        self.update(fingerprints={**known, key: fingerprint})

    def update(self, **values) -> None:
        self.data.update(values, made_by=MADE_BY)
        write_json(self.path, self.data)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time a stage; record it as done (with its seconds) when it finishes. A stop signal that something
        swallowed is raised again before a stage starts."""
        raise_if_stopped()
        start = time.perf_counter()
        yield
        self.data.setdefault("seconds", {})[name] = round(time.perf_counter() - start, 3)
        self.update(stages_done=[*self.data.get("stages_done", []), name])


MADE_BY = "dsl"  # manifest.json's `made_by`: the folder is dsl's
# what `earlier_attempts` keeps of each attempt a resume, requeue or resumed sweep replaced
ATTEMPT_KEYS = ("started", "finished", "status", "error", "device", "slurm_job", "git_commit", "seconds",
                "resumed_rows", "decoded")
MAX_ATTEMPTS = 100
STAMP_KEYS = {"made_by", "kind", "status"}  # a manifest written when a folder was claimed, before anything ran
_OPT_STR, _NUM = (str, type(None)), (int, float)
# The manifest keys that dsl reads back, with their types (others are kept, unread); `_JOB` a sweep's job.
MANIFEST_TYPES: dict[str, type | tuple] = {
    "made_by": str, "kind": str, "status": str, "error": _OPT_STR, "config": dict, "versions": dict,
    "seconds": dict, "images": list, "skipped": list, "figures": (list, int), "jobs": list, "failed": list,
    "fingerprints": dict, "unfinished": list, "rows": int, "complete": int, "decoded": int, "components": int,
    "started": str, "finished": str, "device": str, "seed": int, "slurm_job": _OPT_STR, "git_commit": _OPT_STR,
    "encoder_dtype": str, "scheduler": str, "resumed_rows": int, "stages_done": list, "study": dict,
    "layers": list, "decode_batch_size": int, "decode_fit_seconds": _NUM, "heads": list, "lens_settings": list,
}
_JOB = {"job": int, "folder": _OPT_STR, "overrides": list, "status": str, "error": _OPT_STR, "rows": int}
FIGURE_PATH = re.compile(r"(grids|heatmaps|plots|looks)/[A-Za-z0-9_][A-Za-z0-9_.=-]{0,239}\.png")


def read_bytes_nofollow(path: Path) -> bytes:
    """A file's bytes, never through a symbolic link (OSError ELOOP where `path` is one)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as handle:
        return handle.read()


def is_own_manifest(data: dict) -> bool:
    """Whether a manifest is dsl's: it says `made_by: dsl` (or, written before that key, names dsl's version,
    or is a merged sweep's)."""
    versions = data.get("versions")
    return (data.get("made_by") == MADE_BY or (isinstance(versions, dict) and "dsl" in versions)
            or (data.get("kind") == "sweep" and isinstance(data.get("jobs"), list)))


def load_manifest(folder: Path) -> dict | None:
    """The manifest.json of a folder as a JSON object, dsl's or not; None where there is none. UserError
    where it is a link, unreadable, not JSON or not an object (the one line says what to do)."""
    path = RunFolder(folder).manifest_json
    if not os.path.lexists(path):
        return None
    try:
        data = json.loads(read_bytes_nofollow(path))
    except (OSError, ValueError) as err:
        reason = "a link" if path.is_symlink() else getattr(err, "strerror", None) or f"not JSON: {err}"
        raise damaged(path, reason) from None
    if not isinstance(data, dict):
        raise damaged(path, f"a JSON {type(data).__name__}, not an object")
    return data


def damaged(path: Path, reason: str) -> UserError:
    """The refusal of a manifest dsl cannot read: a sweep's is written anew by a merge; a run's says what the
    run was, and without it the folder is no longer known to be dsl's, so it is restored or the run redone."""
    if RunFolder(path.parent).is_own_sweep():
        fix = f"delete it and `dsl merge {path.parent}` writes it anew"
    elif RunFolder(path.parent.parent).is_own_sweep():  # a job's: the sweep runs a job whose folder is gone again
        fix = (f"restore it, or move the job's folder out of the sweep: `dsl run resume={path.parent.parent}` "
               "then runs the job again")
    else:
        fix = "restore it from a copy, or run the run again into another folder"
    return UserError(f"{path}: not a manifest dsl can read ({reason}); {fix}; a folder that is not dsl's is never "
                     "written")


def read_manifest(folder: Path) -> dict | None:
    """The manifest.json of a run or sweep folder, checked: None where there is none or it is not dsl's
    (`is_own_manifest`); UserError where it is damaged (not JSON, or a value of a type dsl never writes)."""
    data = load_manifest(folder)
    if data is None or not is_own_manifest(data):
        return None
    path = RunFolder(folder).manifest_json
    _check_types(data, MANIFEST_TYPES, path, "")
    for key in ("jobs", "failed", "unfinished"):
        for n, job in enumerate(data.get(key, [])):
            if not isinstance(job, dict):
                raise damaged(path, f"{key}[{n}] is not an object")
            _check_types(job, _JOB, path, f"{key}[{n}].")
            if not set(_JOB) <= set(job):
                raise damaged(path, f"{key}[{n}] lacks {', '.join(sorted(set(_JOB) - set(job)))}")
            if not all(isinstance(o, str) for o in job.get("overrides", [])):
                raise damaged(path, f"{key}[{n}].overrides holds a value that is not text")
            if job.get("folder") is not None and not all(NAME.fullmatch(p) for p in job["folder"].split("/")):
                raise damaged(path, f"{key}[{n}].folder {printable(repr(job['folder']))} is not a job folder")
    if not all(isinstance(v, _NUM) and not isinstance(v, bool) for v in data.get("seconds", {}).values()):
        raise damaged(path, "seconds holds a value that is not a number")
    if not all(isinstance(v, str) for v in [*data.get("versions", {}).values(), *data.get("images", [])]):
        raise damaged(path, "versions or images hold a value that is not text")
    config = data.get("config", {})
    if not all(isinstance(config.get(k, {}), dict) for k in ("encoder", "decoder", "lens", "decode", "study",
                                                             "images")):
        raise damaged(path, "config holds a group that is not an object")
    figures = data.get("figures", [])
    if isinstance(figures, list) and not all(isinstance(f, str) and FIGURE_PATH.fullmatch(f) for f in figures):
        raise damaged(path, "figures names a file that is not one of dsl's figures")
    return data


def _check_types(data: dict, types: dict, path: Path, prefix: str) -> None:
    for key, kind in types.items():
        if key in data and not isinstance(data[key], kind):
            kind = type(data[key]).__name__
            raise damaged(path, f"{prefix}{key} is {'an' if kind[0] in 'aeiou' else 'a'} {kind}")


def is_sweep_folder(folder: Path) -> bool:
    """A --multirun sweep folder: Hydra saved the sweep's config there; its jobs are run folders below."""
    return RunFolder(folder).multirun_yaml.is_file()


def check_name(value: str, what: str) -> str:
    """`value` if it is safe as one part of a path in a run folder (no separator, no `..`, no dot first,
    no control character), else UserError: names read from files are data, never paths."""
    if not NAME.fullmatch(value):
        raise UserError(f"{what} {printable(repr(value))} is not a valid name (letters, digits, _ . - only, "
                        "not starting with a dot or dash); the file was not written by dsl or was edited")
    return value


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def process_started(pid: int) -> str | None:
    """When the process started, in clock ticks after boot (field 22 of /proc/PID/stat): with its PID it names
    one process, as a PID alone does not once the kernel reuses it. None where /proc does not say (not Linux,
    or no such process)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    # field 2, the command in parentheses, may itself hold spaces and `)`: count the fields after its last `)`
    fields = stat[stat.rfind(b")") + 1:].split()
    return fields[19].decode() if len(fields) > 19 else None


def _runs_python(pid: int) -> bool:
    """Whether the process could be dsl: its program is a Python interpreter or the `dsl` script (a script's
    command line starts with its interpreter). True where /proc does not say: a lock is never broken on a guess."""
    try:
        program = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
    except OSError:
        return True
    return os.path.basename(program).startswith((b"python", b"dsl"))


@dataclass(frozen=True)
class LockOwner:
    """Who holds a run folder: a process on a host; `token` tells two holders with one PID apart, `started`
    (the process's start time, where /proc gives it) a live holder from a later process given its PID."""

    pid: int
    host: str
    token: str
    started: str | None = None

    @staticmethod
    def me() -> "LockOwner":
        return LockOwner(os.getpid(), socket.gethostname(), secrets.token_hex(8), process_started(os.getpid()))

    @staticmethod
    def parse(line: str) -> "LockOwner | None":
        """The owner a lock's first line names: `PID HOST TOKEN [STARTED]` (an earlier dsl wrote no STARTED)."""
        parts = line.split()
        if len(parts) not in (3, 4) or not parts[0].isdigit() or not all(p.isdigit() for p in parts[3:]):
            return None
        return LockOwner(int(parts[0]), parts[1], parts[2], *parts[3:])

    @property
    def line(self) -> str:
        return " ".join([str(self.pid), self.host, self.token, *([self.started] if self.started else [])])

    def is_stale(self) -> bool:
        """A lock of a process on this host that no longer runs (a run killed with SIGKILL, a crash), even where
        its PID was given to another process since: one that started at another time, or (a lock without a
        start time) one that is not Python's."""
        if self.host != socket.gethostname():
            return False
        if self.pid == os.getpid() or not _alive(self.pid):
            return True
        started = process_started(self.pid)
        if self.started is not None and started is not None:
            return started != self.started
        return not _runs_python(self.pid)


_HELD: dict[Path, LockOwner] = {}  # the folders this process holds (resolved paths), with its lock line
# of those, the ones its claim created (not there before), each with the folders above it that the claim
# created too (innermost first): only such folders are removed
_MADE: dict[Path, list[Path]] = {}


_GIVEN: set[str] = set()  # the settings on the running command's command line (`settings_given`)


@contextmanager
def settings_given(args: Sequence[str]) -> Iterator[None]:
    """While a command runs (dsl_cli.cli): the settings its command line gives (`key=value`), so that advice
    on a folder names the one the user gave (`_setting_named`)."""
    _GIVEN.update(arg.lstrip("+~").split("=", 1)[0] for arg in args if "=" in arg and not arg.startswith("-"))
    try:
        yield
    finally:
        _GIVEN.clear()


def _setting_named(setting: str) -> str:
    """`outputs_root` where the command line gave it and not `setting` (hydra.run.dir, train.out, ...): the
    folder is then its default below outputs_root (`outputs_root=/a/file` was answered with hydra.run.dir)."""
    return "outputs_root" if "outputs_root" in _GIVEN and setting not in _GIVEN else setting


def _file(name: str) -> property:
    """A RunFolder attribute: the path of one of its files."""
    return property(lambda self: self.path / name, doc=f"`{name}` in the folder")


class RunFolder:
    """The folder of one run (or of a sweep): its paths, and the lock that makes one process its only writer.

    `claim` takes the lock before anything is written there; a fresh run also refuses a folder that holds a
    run (`dsl run resume=FOLDER` claims with resume=True, which skips that check). The lock file is
    `.dsl.lock` (PID, host, token); a lock whose process is gone is taken over with a warning. The file is
    padded to RESERVE bytes: space kept back so that a run stopped by a full disk can still record why.
    """

    LOCK = ".dsl.lock"
    RESERVE = 128 * 1024
    # the setting that names a folder of each kind (`claim`'s refusals say which to change)
    OUT_SETTINGS = {"sweep": "hydra.sweep.dir", "sae": "train.out", "adapter": "adapter.out"}
    MARKERS = ("manifest.json", ".hydra/config.yaml", "multirun.yaml", "similarity.csv")
    FIGURES = ("grids", "heatmaps", "plots", "looks")  # the folders of the figures, `figure()`

    def __init__(self, path: Path):
        self.path = Path(path)

    # the folder's files: its layout is known here alone (the module's docstring draws it)
    manifest_json = _file("manifest.json")
    log_file = _file("dsl.log")  # Hydra's job log (configs/hydra/job_logging)
    page = _file("index.html")  # dsl_cli.report
    hydra_yaml = _file(".hydra/hydra.yaml")
    config_yaml = _file(".hydra/config.yaml")
    overrides_yaml = _file(".hydra/overrides.yaml")
    multirun_yaml = _file("multirun.yaml")

    def csv(self, table: Table) -> Path:
        return self.path / table.name

    def read(self, table: Table) -> list[dict]:
        """The table's rows, typed (`read_csv`); none where the file does not exist."""
        return read_csv(self.csv(table), table)

    def write(self, table: Table, rows: list[dict]) -> None:
        """The table's file, replaced at once by `rows`."""
        self.log(table).rewrite(rows)

    def log(self, table: Table) -> "CsvLog":
        """The table's file, to append rows to as they come (created with its header where missing)."""
        return CsvLog(self.csv(table), table.columns)

    def file(self, relative: str) -> Path:
        """A path the folder's CSVs give relative to it (their `file` column)."""
        return self.path / relative

    def listing(self) -> list[str]:
        """What the folder holds for a reader, relative: its CSVs, manifest, log and saved configs, then its
        folders of pictures and figures (`name/`)."""
        names = [p.name for p in sorted(self.path.glob("*.csv"))]
        names += [p.relative_to(self.path).as_posix() for p in (self.manifest_json, self.log_file, self.config_yaml,
                                                                self.overrides_yaml, self.multirun_yaml) if p.is_file()]
        return names + [f"{d}/" for d in ("images", *self.FIGURES) if (self.path / d).is_dir()]

    def figure(self, folder: str, name: str) -> Path:
        """A figure: `<folder>/<name>.png`, folder one of FIGURES."""
        if folder not in self.FIGURES:
            raise ValueError(f"no figure folder {folder!r} in a run folder")
        return self.path / folder / f"{name}.png"

    def figures(self, *folders: str) -> list[Path]:
        """The figures in the given folders (default: every one of FIGURES), in path order."""
        return sorted(p for name in folders or self.FIGURES for p in (self.path / name).glob("*.png"))

    def holds_study(self) -> bool:
        """A study's own CSV is here: `study_<name>.csv` (`dsl_cli.study_registry.Study.tables`)."""
        return any(p.is_file() for p in self.path.glob("study_*.csv"))

    def overlay_picture(self, composite: str) -> Path:
        """Overlay removal: a composite as the study made it."""
        return self.path / "images" / "overlays" / f"{check_name(composite, 'composite')}.png"

    def overlay_step(self, composite: str, order: str, step: int) -> Path:
        """Overlay removal: a composite decoded after `step` heads of `order` were ablated."""
        return self.path / "images" / "overlay_steps" / check_name(composite, "composite") / f"{order}_{step:03d}.png"

    @property
    def lock_path(self) -> Path:
        return self.path / self.LOCK

    @property
    def owner(self) -> LockOwner | None:
        """This process's lock on the folder, if it holds it (through this object or another)."""
        return _HELD.get(self._key())

    def picture(self, image: str, lens: str, component: str, seed: int | None = None) -> str:
        """A decoded picture's path relative to the folder (as the CSV's `file` column holds it); an extra
        seed's picture (`decode.seeds`) is in a folder of its own, `seed<seed>`."""
        parts = (check_name(image, "image"), check_name(lens, "lens"), check_name(component, "component"))
        seed_folder = "" if seed is None else f"seed{int(seed)}/"
        return "images/{}/{}/{}{}.png".format(*parts[:2], seed_folder, parts[2])

    def input_picture(self, image: str) -> Path:
        return self.path / "images" / check_name(image, "image") / "input.png"

    def holds_run(self) -> bool:
        """Whether a run or a sweep was ever started here (finished or not); a manifest that dsl wrote when
        it claimed the folder, before anything ran (`only_claimed`), is none."""
        if self.only_claimed():
            return False
        if any(os.path.lexists(self.path / marker) for marker in self.MARKERS):
            return True
        return any(self.path.glob("*/manifest.json"))  # a sweep's job folders

    def only_claimed(self) -> bool:
        """dsl claimed the folder, and was stopped before it started anything there (its manifest is the
        stamp `claim` writes, and nothing else marks a run)."""
        try:
            data = load_manifest(self.path)
        except UserError:
            return False
        return (data is not None and data.get("made_by") == MADE_BY and set(data) <= STAMP_KEYS
                and not any(os.path.lexists(self.path / m) for m in self.MARKERS if m != "manifest.json"))

    def is_own(self) -> bool:
        """Whether dsl may write here: its manifest is dsl's, or there is none and the folder is empty but
        for what dsl itself leaves (its lock, temporaries, Hydra's log). UserError for a damaged manifest."""
        data = load_manifest(self.path)
        if data is not None:
            return is_own_manifest(data)
        return not self.foreign_entries() or self.is_own_sweep()

    def is_own_sweep(self) -> bool:
        """A sweep folder whose multirun.yaml is of `dsl run` (it names dsl's Hydra callback)."""
        try:
            return b"dsl_cli.sweeps.SweepResults" in read_bytes_nofollow(self.multirun_yaml)
        except OSError:
            return False

    def foreign_entries(self) -> list[str]:
        """The folder's entries that no claim of dsl's would leave (all but the lock, dsl's temporaries and
        dsl.log), sorted; none where the folder does not exist."""
        try:
            names = os.listdir(self.path)
        except FileNotFoundError:
            return []
        own = {self.LOCK, self.LOCK + ".takeover", self.log_file.name}
        return sorted(n for n in names if n not in own and not (n.startswith(".") and n.endswith(TEMP_SUFFIX)))

    def refuse_links(self) -> None:
        """UserError naming the first symbolic link at or below the folder (its files, its folders of
        pictures and figures, its lock): dsl never reads or writes through one. `.submitit/` (the launcher's
        logs) is not dsl's and is not looked into."""
        if self.path.is_symlink():
            raise UserError(f"{self.path} is a symbolic link: give the folder it points to, dsl does not write "
                            "through links")
        stack = [self.path]
        while stack:
            try:
                entries = list(os.scandir(stack.pop()))
            except (FileNotFoundError, NotADirectoryError):
                continue
            except OSError as err:
                raise UserError(f"cannot read the folder {self.path} ({err.strerror or err})") from err
            for entry in entries:
                if entry.is_symlink():
                    raise UserError(f"{entry.path} is a symbolic link, which dsl does not follow in its folders: "
                                    "remove it (or replace it by the file or folder itself)")
                if entry.is_dir(follow_symlinks=False) and entry.name != ".submitit":
                    stack.append(Path(entry.path))

    def claim(self, resume: bool = False, kind: str = "run") -> bool:
        """Make this process the only writer of the folder (created if needed). A folder that holds a link
        is refused; without `resume`, so is one that holds a run, or anything that is not dsl's; a fresh
        claim writes the manifest's stamp (`made_by: dsl`): from then on the folder is dsl's. With `resume`,
        a folder whose manifest is another program's is refused. UserError when refused; False when this
        process holds it already."""
        if self.owner is not None:
            return False
        # what the user changes to go elsewhere; none for a folder given (resume=, plot, report, merge)
        setting = None if resume else self.OUT_SETTINGS.get(kind, "hydra.run.dir")
        if self._foreign_at_a_glance():  # before looking for links: a link in /etc or a user's folder is theirs
            raise self._foreign(setting)
        self.refuse_links()
        made = self._make(setting)
        try:
            _HELD[self._key()] = self._lock(setting)
            if made is not None:
                _MADE[self._key()] = made
            if not resume:
                self._check_fresh(setting, kind)
                write_json(self.manifest_json, {"made_by": MADE_BY, **({"kind": kind} if kind != "run" else {}),
                                                "status": "started"})
            elif not self.is_own():
                raise self._foreign(setting)
        except BaseException:
            self.release()
            if made is not None:  # a claim refused (a full disk, a live lock) leaves no folder it created behind
                self.remove_if_empty(made)
            raise
        return True

    @property
    def made_here(self) -> bool:
        """Whether this process created the folder when it claimed it, and holds it still: a folder that was
        there before (a user's empty folder) is theirs, and is never removed."""
        return self._key() in _MADE

    @property
    def made_above(self) -> list[Path]:
        """The folders above this one that its claim created (`outputs/2026-12-07` of a first run that day),
        innermost first: removed with it where it is removed, if they are empty then."""
        return _MADE.get(self._key(), [])

    def remove_if_empty(self, above: Sequence[Path] = ()) -> None:
        """Remove the folder if it is empty (anything found in it is left, with the folder), then each folder
        of `above` (innermost first) while they are empty."""
        for folder in [self.path, *above]:
            try:
                folder.rmdir()
            except OSError:
                return

    def _foreign_at_a_glance(self) -> bool:
        """A folder (not a link) that is plainly not dsl's: another program's manifest, or none and files that
        no claim of dsl's leaves. A damaged manifest is left to the checks after the lock."""
        if self.path.is_symlink() or not self.path.is_dir():
            return False
        try:
            return not self.is_own()
        except UserError:
            return False

    def _check_fresh(self, setting: str, kind: str = "run") -> None:
        if self.holds_run():
            held = (read_manifest(self.path) or {}).get("kind")  # an adapter's or an SAE's folder says so
            what = {"adapter": "an adapter", "sae": "an SAE"}.get(held, "a run")
            if self._status() == "complete":  # nothing to resume: say how to run it again
                raise FolderTaken(f"{self.path} already holds {what}, complete: to "
                                  f"{'run' if what == 'a run' else 'make'} it again, choose another {setting} or "
                                  "move that folder away")
            resume = f"`dsl run resume={self.path}`" if kind == "run" and what == "a run" else "the same command"
            raise FolderTaken(f"{self.path} already holds {what}: complete it with {resume} or choose another "
                              f"{setting}")
        if not self.only_claimed() and self.foreign_entries():
            raise self._foreign(setting)

    def _status(self) -> object:
        """The status its manifest records, where the manifest can be read."""
        try:
            return (load_manifest(self.path) or {}).get("status")
        except UserError:
            return None

    def _foreign(self, setting: str | None) -> UserError:
        found = self.foreign_entries()
        shown = ", ".join(printable(n) for n in found[:3]) + (", ..." if len(found) > 3 else "")
        advice = f"choose another {setting}" if setting else "give a folder that dsl made"
        return UserError(f"{self.path} is not a dsl folder (it holds {shown} and no manifest.json of dsl's): dsl "
                         f"writes only into a new or empty folder, or one it made; {advice}")

    def release(self) -> None:
        """Give the folder up (the lock file is removed if it is still this process's)."""
        _MADE.pop(self._key(), None)
        owner = _HELD.pop(self._key(), None)
        if owner is not None and self._read_owner(self.lock_path) == owner:
            self.lock_path.unlink(missing_ok=True)

    def free_reserve(self) -> None:
        """Give the space kept in the lock file back to the disk (to record a failure on a full disk)."""
        if self.owner is not None:
            os.truncate(self.lock_path, len(self.owner.line) + 1)

    def remove_temporaries(self) -> None:
        """Delete what a killed run of this folder was writing: dsl's own temporary names only, only in the
        folders a run writes (never a user's files below the folder)."""
        folders = [self.path, self.path / ".hydra", *(self.path / name for name in self.FIGURES),
                   *self.path.glob("images/*"), *self.path.glob("images/*/*"), *self.path.glob("images/*/*/*")]
        for folder in folders:
            if folder.is_dir() and not folder.is_symlink():
                for leftover in folder.glob(f".*{TEMP_SUFFIX}"):
                    leftover.unlink(missing_ok=True)

    def _key(self) -> Path:
        return self.path.resolve()

    def _make(self, setting: str | None) -> Optional[list[Path]]:
        """Create the folder (and the folders above it) where it is missing: None when it was there, else the
        folders above it this call created, innermost first. Atomic: of two processes that make it at once,
        one alone is told it did."""
        missing = list(takewhile(lambda above: not above.exists(), self.path.parents))
        for attempt in range(3):
            try:
                self.path.mkdir(parents=True)
                return missing
            except FileExistsError:
                return None
            except FileNotFoundError as err:  # a folder above removed at that moment by a run that failed
                if attempt == 2:
                    raise self._unwritable(err, setting) from err
            except OSError as err:
                raise self._unwritable(err, setting) from err
        return None

    def _unwritable(self, err: OSError, setting: str | None) -> UserError:
        advice = (f"choose another with {_setting_named(setting)}=..." if setting
                  else "make sure it can be written (free space, permissions)")
        return UserError(f"cannot write the output folder {self.path} ({err.strerror or err}); {advice}")

    def _lock(self, setting: str | None) -> LockOwner:
        me = LockOwner.me()
        try:
            for _ in range(100):  # a lock that vanishes between two looks is tried again, never forever
                if self._create(self.lock_path, me, self.RESERVE):
                    break
                if self.lock_path.is_symlink():
                    raise UserError(f"{self.lock_path} is a symbolic link, not dsl's lock: remove it and try again")
                owner = self._read_owner(self.lock_path)
                if owner is not None and owner.is_stale():
                    self._take_over(owner)
                elif owner is not None or self.lock_path.exists():
                    raise self._busy(owner, setting)
            else:
                raise self._busy(None, setting)
        except OSError as err:
            raise self._unwritable(err, setting) from err
        return me

    def _take_over(self, stale: LockOwner) -> None:
        """Remove a dead process's lock. Only the holder of `.dsl.lock.takeover` may, so that two runs
        taking over at once cannot each remove the lock the other has just made."""
        breaker = self.lock_path.with_name(self.LOCK + ".takeover")
        if not self._create(breaker, LockOwner.me(), 0):
            raise FolderTaken(f"{self.path}: another process is taking over the lock of process {stale.pid}, "
                            f"which no longer runs; if none is, remove {breaker} and try again")
        try:
            if self._read_owner(self.lock_path) == stale:
                self.lock_path.unlink()
                log.warning("%s: took over the lock of process %d, which no longer runs (killed?)",
                            self.path, stale.pid)
        finally:
            breaker.unlink(missing_ok=True)

    def _busy(self, owner: LockOwner | None, setting: str | None) -> UserError:
        if owner is None:
            holder = "another process (its lock file is unreadable)"
        else:
            holder = f"dsl process {owner.pid} on {printable(owner.host)}"
        elsewhere = f" or choose another {setting}" if setting else ""
        return FolderTaken(f"{self.path} is being written by {holder}; wait for it to end{elsewhere} (if no dsl "
                         f"process is using the folder, remove {self.lock_path})")

    @staticmethod
    def _create(path: Path, owner: LockOwner, reserve: int) -> bool:
        """Create `path` holding `owner` (and `reserve` incompressible bytes) unless it exists: atomic, and
        never seen empty: the content is written to a staged file first, then hard-linked into place (a
        second process reading the lock at that moment would otherwise find it unreadable)."""
        staged = path.with_name(f".{path.name}.{owner.token}{TEMP_SUFFIX}")
        content = f"{owner.line}\n".encode() + os.urandom(reserve)
        try:
            with open(staged, "xb") as handle:
                handle.write(content)
            os.link(staged, path)
        except FileExistsError:
            return False
        except OSError as err:
            if err.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
                raise
            return RunFolder._create_in_place(path, content)  # a file system without hard links
        finally:
            staged.unlink(missing_ok=True)
        return True

    @staticmethod
    def _create_in_place(path: Path, content: bytes) -> bool:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            return False
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(content)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return True

    @staticmethod
    def _read_owner(path: Path) -> LockOwner | None:
        try:
            with os.fdopen(os.open(path, os.O_RDONLY | os.O_NOFOLLOW), "rb") as handle:
                line = handle.readline(200)
        except FileNotFoundError:
            return None
        except OSError:  # a link, or a file this user may not read: nobody's lock dsl can tell
            return None
        return LockOwner.parse(line.decode(errors="replace"))


@contextmanager
def claimed(folder: Path) -> Iterator[None]:
    """Hold a folder while its figures or page are written, so that a run still writing there is not
    disturbed (UserError naming the process that writes there); a folder this process holds stays held."""
    run_folder = RunFolder(folder)
    mine = run_folder.claim(resume=True)
    try:
        yield
    finally:
        if mine:
            run_folder.release()


def release_all() -> None:
    """Release every folder this process holds (when `dsl run` ends, however it ends)."""
    for path in list(_HELD):
        RunFolder(path).release()


# ---------------------------------------------------------------- CSV


def csv_text(value) -> str:
    """CSV text of a value; floats at 6 decimals so that float noise below that never changes a file."""
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6f}"
    return str(value)


class CsvLog:
    """An append-only CSV whose rows are on disk as soon as `append` returns (flushed and fsynced)."""

    def __init__(self, path: Path, columns: list[str]):
        self.path, self.columns = path, columns
        if not path.exists():
            atomic_write_bytes(path, (",".join(columns) + "\n").encode())

    def append(self, rows: Iterable[dict]) -> None:
        buffer = io.StringIO()
        csv.DictWriter(buffer, self.columns, lineterminator="\n").writerows(map(self._cells, rows))
        data = buffer.getvalue().encode("utf-8")
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW)
        except OSError as err:
            raise write_error(self.path, err) from err
        try:
            start = os.lseek(fd, 0, os.SEEK_END)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            except BaseException:
                os.ftruncate(fd, start)  # never leave a torn row (a full disk, a signal between writes)
                raise
        except OSError as err:
            raise write_error(self.path, err) from err
        finally:
            os.close(fd)

    def rewrite(self, rows: list[dict]) -> None:
        """Replace the whole file at once (used to drop a torn last line and to store final ranks)."""
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, self.columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(map(self._cells, rows))
        atomic_write_bytes(self.path, buffer.getvalue().encode())

    def _cells(self, row: dict) -> dict:
        """The row's text per column (empty where it has no value); a key that names no column is refused,
        as a misspelt column would otherwise vanish from the file without a word."""
        unknown = sorted(set(row) - set(self.columns))
        if unknown:
            raise ValueError(f"{self.path.name} has no column {', '.join(map(repr, unknown))}")
        return {k: csv_text(row.get(k)) for k in self.columns}


def read_csv(path: Path, table: Table = SIMILARITY) -> list[dict]:
    """Rows of a CSV written by CsvLog (or by an earlier version, whose columns are the first of the table's:
    the later ones are empty), typed by the table's row type; a torn last line (a killed run) is dropped.
    The values that become parts of paths (image, lens, component, file) are checked: UserError for one
    that is not a plain name."""
    if not os.path.lexists(path):
        return []
    try:
        text = read_bytes_nofollow(path).decode("utf-8")
    except (OSError, UnicodeDecodeError) as err:
        reason = "a symbolic link" if path.is_symlink() else err
        raise UserError(f"{path}: not readable as a dsl CSV ({reason})") from err
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines = lines[:-1]
    reader = csv.DictReader(lines)
    try:
        header, columns = reader.fieldnames, table.columns
        if table.open and header is not None and len(header) > len(columns) and header[:len(columns)] == columns \
                and len(set(header)) == len(header) and all(COLUMN.fullmatch(n) for n in header[len(columns):]):
            table = table.with_columns(header[len(columns):])  # a study's further lenses' scores
            columns = table.columns
        if header is not None and (not header or header != columns[:len(header)]):
            raise UserError(f"{path}: not a CSV written by this version of dsl (columns {printable(str(header))}); "
                            + rewrite_advice(path))
        rows = [{**dict.fromkeys(columns, ""), **row} for row in reader  # an earlier version's: later columns empty
                if len(row) == len(header) and None not in row.values()]
    except csv.Error as err:
        raise UserError(f"{path}: not readable as a dsl CSV ({err}); the file was damaged or edited; "
                        + rewrite_advice(path)) from None
    try:
        for number, row in enumerate(rows, start=2):
            type_row(row, table, f"{path} row {number}:")
            _check_row(row, f"{path} row {number}:")
    except UserError as err:
        raise UserError(f"{err}: {rewrite_advice(path)}") from None
    return rows


def first_label(labels: str | None) -> tuple[str, float | None]:
    """The top label of a `labels` cell (`tabby 0.31; tiger cat 0.29`: `lens.text`'s zero-shot labels) and its
    score; ("", None) where the cell holds none."""
    name, _, score = (labels or "").split("; ")[0].rpartition(" ")
    try:
        return name, float(score)
    except ValueError:
        return "", None


def rewrite_advice(path: Path) -> str:
    """How a damaged CSV of dsl's is written again: a sweep's merged table by `dsl merge`, a run's (or a
    study's) by deleting it and resuming the run (which writes its tables again, keeping whole pictures)."""
    folder = path.parent
    if is_sweep_folder(folder):
        return f"`dsl merge {folder}` writes it again from the jobs"
    return f"delete it, and `dsl run resume={folder}` writes it again"


def run_rows(run_dir: Path, resume: Path | None = None) -> list[dict]:
    """A run's similarity.csv rows, for what reads a run's files (plot, report, a sweep's merge): a run that
    completed holds the rows its manifest counted, each (image, component) once, and a file cut short,
    deleted or with a row repeated is refused rather than drawn or merged as whole. `resume`: the folder
    whose `dsl run resume=` writes it again (the run's own, or a job's sweep)."""
    folder = RunFolder(run_dir)
    rows = folder.read(SIMILARITY)
    problem = rows_problem(read_manifest(run_dir) or {}, rows)
    if problem is not None:
        raise UserError(f"{folder.csv(SIMILARITY)}: {problem}; the file was cut short or edited: "
                        f"`dsl run resume={resume or run_dir}` writes it again")
    return rows


def rows_problem(manifest: dict, rows: list[dict]) -> str | None:
    """What is wrong with the rows of a run whose `manifest` says complete; None where nothing is (or the run
    is not complete, or its manifest counts no rows: a study)."""
    expected = manifest.get("rows")
    if manifest.get("status") != "complete" or not isinstance(expected, int):
        return None
    keys = Counter((row["image"], row["component"]) for row in rows)
    repeated = [key for key, count in keys.items() if count > 1]
    if repeated:
        return f"{' '.join(map(printable, repeated[0]))} has {keys[repeated[0]]} rows"
    if len(rows) != expected:
        return f"{len(rows)} rows where the complete run wrote {expected}"
    return None


def type_row(row: dict, table: Table, where: str) -> dict:
    """A row read from the table's CSV, its number columns made int or float (None where empty), in place."""
    for key, kind in table.kinds.items():
        if kind is not str and key in row:
            text = row[key]
            try:
                row[key] = kind(text) if text != "" else None
                if table.finite and kind is float and row[key] is not None and not math.isfinite(row[key]):
                    raise ValueError(text)  # refused as `abc` is: dsl writes an undefined value as an empty cell
            except ValueError:
                raise UserError(f"{where} {key} {printable(repr(text))} is not a number; the file was edited") from None
    return row


def _row_pictures(row: dict) -> list[str]:
    """Where dsl may put the picture of a CSV row: its component's, or (a row of seeds.csv or
    baselines.csv) its seed's, its own or the shared baseline's."""
    folder = RunFolder(Path())
    paths = [folder.picture(row["image"], row["lens"], row["component"])]
    if isinstance(row.get("seed"), int):
        paths += [folder.picture(image, row["lens"], row["component"], row["seed"])
                  for image in (row["image"], BASELINE_IMAGE)]
    return paths


def _check_row(row: dict, where: str) -> None:
    for key in ("image", "lens", "component"):
        if row.get(key):  # empty where a row names none (a study's step 0)
            check_name(row[key], f"{where} {key}")
    if "layer" in row:  # a table that gives the component's place beside its label: the two must agree
        _check_place(row, where)
    if row.get("file") and row["file"] not in _row_pictures(row):
        raise UserError(f"{where} file {printable(repr(row['file']))} is not where dsl puts the picture of "
                        f"{row['image']} {row['lens']} {row['component']}; the file was edited")


def _check_place(row: dict, where: str) -> None:
    """UserError where a row's layer, head or kind is not its component label's (`L03H03` on a row of layer
    7): the figures draw a row where those columns place it, and dsl writes them from the label."""
    label = row.get("component") or ""
    try:
        component = parse_component(label)
    except ValueError:
        raise UserError(f"{where} component {printable(repr(label))} is not a component label; the file was "
                        "edited") from None
    place = {"layer": component.layer, "head": component.head, "kind": component.kind}
    wrong = [key for key, value in place.items() if key in row and row[key] != value]
    if wrong:
        found = ", ".join(f"{key} {printable(repr(row[key]))}" for key in wrong)
        raise UserError(f"{where} {found} is not that of component {printable(label)}; the file was edited")


def check_merged_row(row: dict, where: str) -> dict:
    """A row of a merged sweep's similarity.csv checked as a run's own rows are (`_check_row`): its `file`
    is a job folder (plain names) and then where dsl puts the row's picture in that folder."""
    file = row.get("file") or ""
    parts = file.split("/")
    for i in range(1, len(parts)):
        if parts[i] == "images" and all(NAME.fullmatch(p) for p in parts[:i]):
            _check_row({**row, "file": "/".join(parts[i:])}, where)
            return row
    _check_row({**row, "file": ""}, where)
    if file:
        raise UserError(f"{where} file {printable(repr(file))} is not a picture in a job's folder; the file was "
                        "edited: `dsl merge` writes it again")
    return row


# ---------------------------------------------------------------- figures


def group_rows(rows: list[dict], keys: tuple[str, ...]) -> dict[tuple, list[dict]]:
    """Rows by the values of `keys`, in first-seen order."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in keys), []).append(row)
    return groups
