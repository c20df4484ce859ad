"""Sweeps: what ties the jobs of a `--multirun` together, on one machine or on a SLURM cluster.

A sweep folder (Hydra's `hydra.sweep.dir`) holds `multirun.yaml` and one ordinary run folder per job (`0/`,
`1/`, ...; `.submitit/` holds the cluster jobs' logs). This module

- merges the jobs' `similarity.csv` into one in the sweep folder, each job's overrides as columns, and draws
  the sweep's heatmaps from it (`merge_sweep`: the Hydra callback `SweepResults` calls it when a multirun
  ends, `dsl merge SWEEP_DIR` on demand); failed and unfinished jobs are listed, not merged;
- lets a job continue its own run folder when SLURM requeues it or `dsl run resume=SWEEP_DIR` relaunches
  its sweep (`resumption.continues_in_place`, `resume_sweep_args`);
- keeps one GPU per job under `launcher=local_gpus` (`SweepResults.on_job_start`).
- turns a cluster's refusal of the jobs (sbatch's error), a job lost on the cluster and a stop of the wait into
  one line each (`cluster_refusals_reported`).

What a merge writes into the sweep folder (from the job folders' files alone, so merging twice gives the
same bytes):
    similarity.csv     the rows of every complete job, in job order: `job`, one `override.<key>` column per
                       override, then the run columns; `file` is relative to the sweep folder
    study_<name>.csv   a study's table (`study=`): the rows of every complete job of that study, in job order,
                       `job` and the `override.<key>` columns first (`merge_studies`)
    correlations.csv   head importance: the correlations computed again over every job's rows, as one run
                       computes its own (pooled over all heads), where the jobs pool (`pooling_refusal`)
    manifest.json      every job with its folder, overrides and status; the failed and unfinished ones listed
    heatmaps/<image>_<lens>[_<key>=<value>...].png    layers x components over all jobs at once (values cut
                       short and hashed where long or not file-name-safe: `heatmap_tags`)
    index.html         the sweep's page (dsl_cli.report): the jobs with their status and pages, the heatmaps
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import traceback
from collections import Counter
from contextlib import contextmanager, redirect_stderr
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, ListConfig, OmegaConf

from dsl_cli.config import parses, sweep_overrides
from dsl_cli.errors import Interrupted, UserError, printable, report
from dsl_cli.figures import draw_heatmaps, draw_lens_comparison, shared_limits
from dsl_cli.outputs import (MADE_BY, SIMILARITY, CsvLog, Manifest, RunFolder, check_merged_row, claimed,
                             group_rows, is_dsl_png, is_sweep_folder, read_bytes_nofollow, read_manifest,
                             rewrite_advice, run_rows, type_row, write_json)
from dsl_cli.report import each_folder, merged_manifest, merged_studies, write_page
from dsl_cli.study_registry import STUDIES, Study, find_study, get_study, refuse_unregistered

log = logging.getLogger("dsl_cli.sweeps")

# overrides that only share the work out (which layers, heads or images a job computes), or whose rows the
# heatmaps tell apart anyway (one per lens): jobs differing in these draw into the same heatmaps; any other
# override that varies (lens.alpha, seed) gets heatmaps of its own
SAME_HEATMAP_KEYS = {"layer", "head", "component", "images.shard", "images.num_shards", "lens"}
OVERRIDE = "override."  # prefix of the merged CSV's override columns
# overrides that only share a study's work out (which heads, which images a job computes): jobs differing in
# these alone pool into one study as one run would have computed it; any other (lens.alpha, seed, study.lenses)
# gives rows no single run holds together, and pooling them would mix settings
SPLIT_KEYS = {"layer", "head", "component", "images.shard", "images.num_shards"}


def resume_overrides(args: list[str]) -> list[str]:
    """The overrides `dsl run` adds for `resume=` in its arguments (the command line): `resume=FOLDER` runs
    the job inside that folder and keeps its saved Hydra config untouched; `resume=SWEEP_DIR` relaunches the
    sweep's jobs into their folders. (How the job then continues its folder: `resumes`, `run.run`.)"""
    for arg in args:
        if arg.startswith("resume="):
            if not arg.split("=", 1)[1].strip():
                raise UserError("resume= needs the folder of the run or sweep to complete: resume=FOLDER")
            folder = Path(arg.split("=", 1)[1]).expanduser()
            others = [a for a in args if a != arg and not a.startswith(("-", "hydra."))]
            if others:
                raise UserError(f"resume= completes a run with its saved config; drop the other overrides {others}")
            if folder.is_symlink():  # as a run folder given by hydra.run.dir: dsl writes through no link
                raise UserError(f"resume={folder} is a symbolic link: give the folder it points to, "
                                f"resume={os.path.realpath(folder)}")
            if not folder.is_dir():
                what = "not a folder" if os.path.lexists(folder) else "no such folder"
                raise UserError(f"resume={folder}: {what}; give the folder of the run or sweep to complete (`dsl run` "
                                "printed it, and a stop names it)")
            if is_sweep_folder(folder):
                return resume_sweep_args(folder, args)
            if RunFolder(folder).only_claimed():
                raise UserError(f"resume={folder}: that run was stopped before it started; start it afresh into the "
                                f"same folder with hydra.run.dir={folder} and its settings")
            if not RunFolder(folder).config_yaml.is_file():
                raise UserError(f"resume={folder}: not a dsl run folder (no .hydra/config.yaml in it) nor a sweep "
                                "folder (no multirun.yaml)")
            return [f"hydra.run.dir={folder.resolve()}"]
    return []


def resume_sweep_args(folder: Path, args: list[str]) -> list[str]:
    """`dsl run resume=SWEEP_DIR`: the sweep's saved command line again, into its own folder, where complete
    jobs are skipped and the others continue (or start). Hydra overrides in `args` (a partition, a time
    limit) replace saved ones with the same key."""
    path = RunFolder(folder).multirun_yaml
    saved = sweep_file(path, SWEEP_FIX)
    if str(OmegaConf.select(saved, "hydra.launcher._target_", default="")).endswith(".SlurmLauncher"):
        refuse_jobs_still_queued(folder)  # (submitit's local jobs are named by process ids, not SLURM's)
    with damage(path, SWEEP_FIX):
        task, hydra = (_texts(saved.hydra.overrides[k]) for k in ("task", "hydra"))
        shuffled = _shuffled(sweep_overrides(saved.hydra))
    if shuffled is not None:  # Hydra numbers its jobs afresh, in another order: a missing job would run another value
        raise UserError(f"resume={folder}: its jobs were swept in a shuffled order ({shuffled}), which Hydra draws "
                        "again on each launch, so a resumed job could run another job's values into its folder; "
                        "`dsl merge` merges the jobs that are done, and a new sweep of the values still missing "
                        "completes it")
    given = {_key(a) for a in args if a.startswith("hydra")} | {"hydra.mode", "hydra.sweep.dir"}
    task = [o for o in task if _key(o) != "resume"]
    hydra = [o for o in hydra if _key(o) not in given]
    # the jobs find their sweep by this path, whatever their working folder
    return ["--multirun", *task, *hydra, f"hydra.sweep.dir={folder.resolve()}", f"resume={folder.resolve()}"]


def refuse_jobs_still_queued(sweep: Path) -> None:
    """A sweep whose SLURM jobs are still queued or running (its `dsl run` stopped waiting for them) is not
    resumed: that would submit its unfinished jobs a second time, two jobs at once in a folder. Its jobs are
    named by submitit's folders (`45_0` for task 0 of array 45, `46` for a job alone); where SLURM's commands
    are not here (the folder copied off the cluster), there is nothing to ask and nothing is refused."""
    ids = {p.name.split("_")[0] for p in (sweep / ".submitit").glob("*")
           if p.is_dir() and re.fullmatch(r"\d+(_\d+)?", p.name)}
    if not ids or shutil.which("squeue") is None:
        return
    try:  # every job of the user's, by its array's id (a job alone's own), rather than ids SLURM may have purged
        answer = subprocess.run(["squeue", "--me", "--noheader", "--format=%F"], capture_output=True, text=True,
                                timeout=60)
    except (OSError, subprocess.SubprocessError):
        return
    queued = sorted(ids & set(answer.stdout.split()), key=int)
    if queued:
        jobs, many = " ".join(queued), len(queued) > 1
        raise UserError(f"resume={sweep}: this sweep's SLURM job{'s' * many} {jobs} {'are' if many else 'is'} still "
                        f"queued or running, into its folders; resuming now would run {'them' if many else 'it'} "
                        f"twice at once. Once `squeue --me` no longer lists {'them' if many else 'it'} (or after "
                        f"`scancel {jobs}`), `dsl run resume={sweep}` runs what is left and merges the sweep "
                        f"(`dsl merge {sweep}` merges what is done so far)")


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


SWEEP_FIX = "restore it: without it the sweep can be neither resumed nor merged"
JOB_FIX = ("restore it, or move the job's folder out of the sweep: `dsl run resume=SWEEP_DIR` then runs the job "
           "again")


def sweep_file(path: Path, fix: str):
    """A YAML file of a sweep (multirun.yaml, a job's .hydra/ files), loaded (a DictConfig or a ListConfig);
    UserError naming it, and saying `fix`, where it is a link or not YAML."""
    try:
        text = read_bytes_nofollow(path).decode("utf-8")
    except (OSError, UnicodeDecodeError) as err:
        reason = "a symbolic link" if path.is_symlink() else getattr(err, "strerror", None) or err
        raise UserError(f"{path}: cannot be read ({reason}); {fix}") from None
    with damage(path, fix):
        loaded = OmegaConf.create(text)
    if loaded is None or not hasattr(loaded, "keys") and not isinstance(loaded, ListConfig):
        raise UserError(f"{path}: not a file Hydra wrote for dsl; {fix}")
    return loaded


@contextmanager
def damage(path: Path, fix: str) -> Iterator[None]:
    """What reading a sweep file's values meets where the file was edited or cut short (a missing key, a
    value of the wrong type) as one UserError naming the file."""
    import yaml
    from omegaconf.errors import OmegaConfBaseException

    try:
        yield
    except (OmegaConfBaseException, yaml.YAMLError, AttributeError, KeyError, TypeError, ValueError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{path}: not a file Hydra wrote for dsl ({printable(reason)}); {fix}") from None


def _texts(values) -> list[str]:
    """A list of override strings from a sweep file; TypeError for anything else, ValueError for a text
    Hydra cannot read as an override (`- layer=[` was merged as the value `[`) (see `damage`)."""
    if isinstance(values, ListConfig):  # as written: `hydra.sweep.subdir=job_${hydra.job.num}` is no value to resolve
        values = OmegaConf.to_container(values, resolve=False)
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise TypeError("a list of overrides was expected")
    unreadable = next((v for v in values if not parses(v)), None)
    if unreadable is not None:
        raise ValueError(f"{unreadable!r} is not an override")
    return list(values)


# ---------------------------------------------------------------- the jobs of a sweep


@dataclass
class Job:
    """One job of a sweep, as its folder shows it."""

    job: int
    overrides: list[str]
    folder: str | None = None  # relative to the sweep folder; None: never started
    status: str = "not started"  # complete | failed | interrupted | running | started | not started
    error: str | None = None
    rows: list[dict] = field(default_factory=list, repr=False)
    study: Study | None = field(default=None, repr=False)  # a complete job's study, where it ran one
    study_rows: list[dict] = field(default_factory=list, repr=False)  # its first table's, checked


def expected_overrides(sweep_dir: Path) -> dict[int, list[str]]:
    """Job number -> overrides, expanded from the saved command line as Hydra's basic sweeper does (the
    last key's values vary fastest). Empty for other sweepers and for glob() sweeps, which need Hydra's
    config loader: their jobs are known from their folders only."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    path = RunFolder(sweep_dir).multirun_yaml
    saved = sweep_file(path, SWEEP_FIX)
    with damage(path, SWEEP_FIX):
        if not str(saved.hydra.sweeper.get("_target_", "")).endswith("BasicSweeper"):
            return {}
        _texts(saved.hydra.overrides.task)  # its command line as a sweep file holds it
        given = [o for o in sweep_overrides(saved.hydra) if _key(o) != "resume"]
    if _shuffled(given):  # another order each time it is expanded
        return {}
    choices: dict[str, list[str]] = {}
    try:
        for override in OverridesParser.create().parse_overrides(given):
            key = override.get_key_element()
            values = (override.sweep_string_iterator() if override.is_sweep_override()
                      else [override.get_value_element_as_str()])
            choices[key] = [f"{key}={v}" for v in values]
    except HydraException:
        return {}
    return {num: list(combo) for num, combo in enumerate(itertools.product(*choices.values()))}


def _shuffled(given: list[str]) -> str | None:
    """The first of a sweep's overrides `given` that sweeps in a shuffled order (`seed=shuffle(1,2,3)`, an order
    Hydra draws again each time it expands it); None where there is none (or Hydra cannot read them)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(given)
    except HydraException:
        return None
    return next((o.input_line for o in parsed if o.is_sweep_override() and getattr(o.value(), "shuffle", False)),
                None)


def _job_folders(sweep_dir: Path) -> dict[int, Path]:
    """Job number -> run folder, for every job that started (Hydra saved its config there)."""
    found = {}
    for saved in sweep_dir.rglob(".hydra/hydra.yaml"):
        if ".submitit" not in saved.parts:
            with damage(saved, JOB_FIX):
                num = sweep_file(saved, JOB_FIX).hydra.job.num
                if type(num) is not int or num < 0:
                    raise ValueError(f"hydra.job.num {num!r} is not a job number")
            found[num] = saved.parent.parent
    return found


def sweep_jobs(sweep_dir: Path) -> list[Job]:
    """Every job of the sweep with its status; a complete job carries its rows."""
    folders = _job_folders(sweep_dir)
    expected = expected_overrides(sweep_dir)
    jobs = []
    for num in sorted(set(expected) | set(folders)):
        job = Job(num, [o for o in expected.get(num, []) if _key(o) != "resume"])
        if num in folders:
            _read_job(job, sweep_dir, folders[num])
        jobs.append(job)
    return jobs


def _read_job(job: Job, sweep_dir: Path, folder: Path) -> None:
    job.folder = folder.relative_to(sweep_dir).as_posix()
    path = RunFolder(folder).overrides_yaml
    with damage(path, JOB_FIX):
        found = [o for o in _texts(sweep_file(path, JOB_FIX)) if _key(o) != "resume"]
        if job.overrides and sorted(found) != sorted(job.overrides):  # its rows would be labelled with these
            raise ValueError(f"job {job.job} says it ran {' '.join(found)}, not {' '.join(job.overrides)} as "
                             "multirun.yaml gives it")
        job.overrides = found
    manifest = read_manifest(folder) or {}
    job.status, job.error = manifest.get("status", "started"), manifest.get("error")
    if job.status == "complete":
        refuse_unregistered(folder, "merge")  # a plugin's study: its table would be merged as no rows at all
        job.rows = run_rows(folder, resume=sweep_dir)
        job.study = find_study(folder)
        if job.study is not None:
            job.study_rows = job.study.rows(folder)


# ---------------------------------------------------------------- merge


def override_keys(jobs: list[Job]) -> list[str]:
    """Every override key of the jobs, in first-seen order."""
    return list(dict.fromkeys(_key(o) for job in jobs for o in job.overrides))


def merged_rows(jobs: list[Job], keys: list[str]) -> list[dict]:
    """The complete jobs' rows in job order, with the job's number and overrides; `file` made relative to
    the sweep folder."""
    merged = []
    for job in jobs:
        for row in job.rows:
            file = f"{job.folder}/{row['file']}" if row["file"] else ""
            merged.append({**_job_columns(job, keys), **row, "file": file})
    return merged


def _job_columns(job: Job, keys: list[str]) -> dict:
    """A merged row's first columns: the job's number and its value of each override key."""
    values = {_key(o): o.split("=", 1)[1] if "=" in o else "" for o in job.overrides}
    return {"job": job.job, **{OVERRIDE + k: values.get(k, "") for k in keys}}


def study_groups(jobs: list[Job]) -> dict[str, list[Job]]:
    """The complete jobs that ran a study, by study name, in job order: each study's table is merged apart
    (its own file), so a sweep over `study=` keeps its studies apart."""
    groups: dict[str, list[Job]] = {}
    for job in jobs:
        if job.study is not None:
            groups.setdefault(job.study.name, []).append(job)
    return groups


def merge_studies(sweep_dir: Path, jobs: list[Job]) -> dict[str, dict]:
    """Each study's table over its jobs (`job`, the override columns, then the study's), and what the study
    computes again over all their rows where they pool (`Study.pool`); returns the manifest's `studies`:
    name -> the table, its rows and jobs, the pooled files or why there are none."""
    _remove_stale_studies(sweep_dir)
    merged = {}
    for name, group in study_groups(jobs).items():
        study, keys = get_study(name), override_keys(group)
        extra = [c for c in dict.fromkeys(c for j in group for r in j.study_rows for c in r)
                 if c not in study.tables[0].columns]  # further lenses' scores (`IMPORTANCE.with_columns`)
        table = study.tables[0].with_columns(extra)
        rows = [{**_job_columns(job, keys), **row} for job in group for row in job.study_rows]
        CsvLog(RunFolder(sweep_dir).csv(table), ["job", *(OVERRIDE + k for k in keys), *table.columns]).rewrite(rows)
        pooled, reason = pool_study(sweep_dir, study, jobs, group)
        merged[name] = {"table": table.name, "rows": len(rows), "jobs": [j.job for j in group],
                        "pooled": [p.relative_to(sweep_dir).as_posix() for p in pooled], "not_pooled": reason}
    return merged


def _remove_stale_studies(sweep_dir: Path) -> None:
    """An earlier merge's study files, as its manifest lists them, which this merge may not write again (a
    pooling refused now: its correlations.csv would still show the old numbers); only names a study's table
    has, never a user's file that an edited manifest names."""
    listed = (read_manifest(sweep_dir) or {}).get("studies")
    names = {table.name for cls in STUDIES.values() for table in cls.tables}
    drawn = {figure for cls in STUDIES.values() for figure in cls.figures}
    for entry in listed.values() if isinstance(listed, dict) else []:
        files = [entry.get("table"), *(entry.get("pooled") or [])] if isinstance(entry, dict) else []
        for name in (f for f in files if isinstance(f, str)):
            path = RunFolder(sweep_dir).file(name)
            if name in names or (name in drawn and is_dsl_png(path)):  # a figure: only one dsl drew
                path.unlink(missing_ok=True)


def pool_study(sweep_dir: Path, study: Study, jobs: list[Job], group: list[Job]) -> tuple[list[Path], str | None]:
    """What `study` computes again over its jobs' rows (`group`), written into the sweep folder; or nothing,
    and why (`pooling_refusal`)."""
    if not study.pools:
        return [], None
    rows = [row for job in group for row in job.study_rows]
    reason = pooling_refusal(study, jobs, group, rows)
    if reason is not None:
        return [], reason
    path = RunFolder(sweep_dir / group[0].folder).config_yaml
    config = sweep_file(path, JOB_FIX)
    with damage(path, JOB_FIX):  # a config.yaml edited: a setting the study reads missing or not a number
        return study.pool(sweep_dir, rows, config), None


def pooling_refusal(study: Study, jobs: list[Job], group: list[Job], rows: list[dict]) -> str | None:
    """Why a study's jobs do not pool, one line; None where they do. Pooled, they must be what one run over
    all their heads and images would have computed: every job of the sweep complete (else the pooled numbers
    miss the heads of the others), differing only in overrides that split the work (`SPLIT_KEYS`, and those
    the study keeps apart itself: `Study.apart`), their rows as one run's (`Study.pooling_problem`)."""
    waiting = [j for j in jobs if j.status != "complete"]
    if waiting:
        return (f"job {waiting[0].job} is {waiting[0].status}: pooled over every job once all are complete "
                "(`dsl run resume=SWEEP_DIR`)")
    keys = override_keys(group)
    varying = [k for k in keys if len({_override_value(j, k) for j in group}) > 1]
    mixed = [k for k in varying if k not in SPLIT_KEYS and k not in study.apart]
    if mixed:
        return (f"the jobs differ in {', '.join(mixed)}, which pooling would mix: each job's own folder holds its "
                "statistics")
    found = study.pooling_problem(rows, varying)
    return f"{found}: each job's own folder holds its statistics" if found else None


def _override_value(job: Job, key: str) -> str | None:
    """The job's value of an override key (None where it sets none)."""
    return next((o.split("=", 1)[1] if "=" in o else "" for o in job.overrides if _key(o) == key), None)


def merge_sweep(sweep_dir: Path) -> dict:
    """Merge a sweep folder's jobs (see the module docstring); returns what manifest.json says."""
    if not is_sweep_folder(sweep_dir):
        raise UserError(f"{sweep_dir}: not a sweep folder (no multirun.yaml); give the hydra.sweep.dir of a "
                        "--multirun, e.g. outputs/multirun/DATE/TIME")
    if not RunFolder(sweep_dir).is_own():
        raise UserError(f"{sweep_dir}: the --multirun folder of another program (neither its manifest.json nor its "
                        "multirun.yaml is dsl's): dsl merges only its own sweeps")
    with claimed(sweep_dir):  # `dsl merge` of a sweep still running is refused (the sweep merges itself)
        jobs = sweep_jobs(sweep_dir)
        keys = override_keys(jobs)
        columns = ["job", *(OVERRIDE + k for k in keys), *SIMILARITY.columns]
        CsvLog(RunFolder(sweep_dir).csv(SIMILARITY), columns).rewrite(merged_rows(jobs, keys))
        manifest = sweep_manifest(jobs, merge_studies(sweep_dir, jobs))
        figures = draw_sweep(sweep_dir, manifest["rows"])
        manifest["figures"] = [p.relative_to(sweep_dir).as_posix() for p in figures]
        write_json(RunFolder(sweep_dir).manifest_json, manifest)
        write_page("sweep", sweep_dir)
    return manifest


def sweep_manifest(jobs: list[Job], studies: dict[str, dict] | None = None) -> dict:
    """The sweep's manifest: every job with the rows it gave (similarity.csv's, or its study table's), and
    the failed and unfinished ones listed apart; `rows`: the merged similarity.csv's (`merged_count` checks
    that file by it); `studies`: each study's merged table (`merge_studies`)."""
    listed = [{"job": j.job, "folder": j.folder, "overrides": j.overrides, "status": j.status, "error": j.error,
               "rows": len(j.rows) + len(j.study_rows), **({"study": j.study.name} if j.study else {})}
              for j in jobs]
    failed = [entry for entry in listed if entry["status"] == "failed"]
    unfinished = [entry for entry in listed if entry["status"] not in ("complete", "failed")]
    return {"made_by": MADE_BY, "kind": "sweep",
            "status": "complete" if not failed and not unfinished else "incomplete",
            "jobs": listed, "complete": len(jobs) - len(failed) - len(unfinished), "failed": failed,
            "unfinished": unfinished, "rows": sum(len(j.rows) for j in jobs), "studies": studies or {}}


def listed_jobs(sweep_dir: Path) -> list[dict]:
    """The jobs of a sweep for its page (`dsl report` hands this to `report.write_pages`). Merged: as its
    manifest lists them, once its similarity.csv holds the rows that merge wrote, each once (the page showed
    a CSV cut short as whole, which `dsl plot` refuses to draw). Not merged yet (stopped, or still running): as
    a merge lists them, every job its command line asks for (multirun.yaml), with its overrides and status,
    those never started too (the page of an interrupted sweep said "0 of 1 jobs", without overrides)."""
    manifest = merged_manifest(sweep_dir)
    if manifest is None:
        return sweep_manifest(sweep_jobs(sweep_dir))["jobs"]
    check_merged_count(sweep_dir, read_merged(sweep_dir), merged_count(sweep_dir))
    return manifest["jobs"]


def _pooled_text(sweep_dir: Path, entry: dict | None) -> str:
    """What a study's merge computed again over all its jobs, or why not, for its summary line."""
    if entry is None or not (entry["pooled"] or entry["not_pooled"]):
        return ""
    if entry["pooled"]:
        return f", pooled over all its jobs into {', '.join(str(sweep_dir / p) for p in entry['pooled'])}"
    return f"; not pooled: {entry['not_pooled']}"


def summary_lines(sweep_dir: Path, manifest: dict) -> list[str]:
    """What a merge did, for the terminal: one line, then one per failed or unfinished job (named by the
    overrides that tell the jobs apart)."""
    studies = merged_studies(manifest)
    merged = [(manifest["rows"], SIMILARITY.name, None)] if manifest["rows"] or not studies else []
    merged += [(entry["rows"], entry["table"], entry) for entry in studies.values()]
    lines = [f"merged {rows} rows of {manifest['complete']} of {len(manifest['jobs'])} jobs into {sweep_dir / name}"
             + _pooled_text(sweep_dir, entry) for rows, name, entry in merged]
    lines[-1] += f" (figures: {RunFolder(sweep_dir).page})"
    shared = set.intersection(*(set(j["overrides"]) for j in manifest["jobs"])) if len(manifest["jobs"]) > 1 else set()
    for entry in manifest["failed"] + manifest["unfinished"]:
        why = f": {entry['error']}" if entry.get("error") else ""
        named = " ".join(o for o in entry["overrides"] if o not in shared)
        lines.append(f"job {entry['job']} ({named}) {entry['status']}{why}")
    return lines


# ---------------------------------------------------------------- figures


TAG_LIMIT = 64  # characters of a heatmap tag kept before its hash: a figure's file name (image, lens, tag and
# a temporary's 18 characters) stays short of the 255 bytes a file system allows, whatever the swept values


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)


def heatmap_tags(keys: list[str], combos: list[tuple[str, ...]]) -> dict[tuple[str, ...], str]:
    """The file-name tag of each combination of swept values (`lens.alpha=4_seed=1`), distinct, also ignoring
    case. A tag is the values as they are where each is a safe, short name; else, as image names
    (`images.unique_names`), cut short, made safe and followed by a hash of the values: `images.path=/a/b`
    and `images.path=/a_b` both sanitise to `_a_b` and overwrote each other's heatmaps, and a long path made a
    file name no file system takes. Values never hold `=` unhashed, so a plain tag reads back one way."""
    plain = {combo: "_".join(f"{k}={v}" for k, v in zip(keys, combo)) for combo in combos}
    tags = {combo: _tag(keys, combo, plain[combo], hashed=False) for combo in combos}
    taken = Counter(tag.casefold() for tag in tags.values())
    return {combo: _tag(keys, combo, plain[combo], hashed=True) if taken[tag.casefold()] > 1 else tag
            for combo, tag in tags.items()}


def _tag(keys: list[str], combo: tuple[str, ...], plain: str, hashed: bool) -> str:
    safe = "_".join(f"{_safe(k)}={_safe(v)}" for k, v in zip(keys, combo))
    if not hashed and safe == plain and len(safe) <= TAG_LIMIT:
        return safe
    # a hash of the pairs, not of the joined text, which two combinations can share: a=`x_b=y`, b=`z` and
    # a=`x`, b=`y_b=z` both join to `a=x_b=y_b=z`
    digest = hashlib.sha256(json.dumps([keys, list(combo)]).encode()).hexdigest()[:8]
    return f"{safe[:TAG_LIMIT]}-{digest}"


def draw_sweep(sweep_dir: Path, expected: int | None = None) -> list[Path]:
    """Heatmaps of the merged CSV (one set per combination of the overrides that vary and do not just split
    the work), and, where jobs decoded the same components through different lenses, grids of them side by
    side (`draw_lens_comparison`). `expected`: the rows the merge wrote (default: as the manifest counts them;
    a merge passes its own count, its manifest is written after the figures)."""
    rows = read_merged(sweep_dir)
    check_merged_count(sweep_dir, rows, expected if expected is not None else merged_count(sweep_dir))
    keys = [c for c in (rows[0] if rows else {}) if c.startswith(OVERRIDE) and c[len(OVERRIDE):] not in SAME_HEATMAP_KEYS]
    varying = [k for k in keys if len({row[k] for row in rows}) > 1]
    listed = (read_manifest(sweep_dir) or {}).get("figures")
    for stale in listed if isinstance(listed, list) else []:  # an earlier merge's, as its manifest lists them
        if is_dsl_png(sweep_dir / stale):  # never a user's file that an edited manifest names
            (sweep_dir / stale).unlink()
    figures, limits = [], shared_limits(rows)  # one colour scale over every job: colours compare across them
    groups = group_rows(rows, tuple(varying))
    names = [k[len(OVERRIDE):] for k in varying]
    tags = heatmap_tags(names, list(groups))
    folders = _job_folders(sweep_dir)  # their manifests name the models (the sweep's does not)
    for values, group in groups.items():
        typed = " ".join(f"{name}={value}" for name, value in zip(names, values))
        jobs = [folders[num] for num in sorted({int(row["job"]) for row in group}) if num in folders]
        figures += draw_heatmaps(sweep_dir, group, tag=tags[values], limits=limits, values=typed, model_dirs=jobs)
    return figures + draw_lens_comparison(sweep_dir, rows)


def merged_count(sweep_dir: Path) -> int | None:
    """The rows the sweep's manifest says its merge wrote; None where it counts none (a merge still to come)."""
    manifest = read_manifest(sweep_dir) or {}
    rows = manifest.get("rows")
    return rows if manifest.get("kind") == "sweep" and isinstance(rows, int) else None


def check_merged_count(sweep_dir: Path, rows: list[dict], expected: int | None) -> None:
    """Refuse a merged CSV cut short, or with a row repeated, as `run_rows` refuses a run's: drawn as whole,
    its heatmaps showed a blank cell where a row was missing."""
    keys = Counter((row["job"], row["image"], row["lens"], row["component"], row["seed"]) for row in rows)
    repeated = next((key for key, count in keys.items() if count > 1), None)
    problem = (f"job {repeated[0]} {' '.join(map(printable, map(str, repeated[1:4])))} has {keys[repeated]} rows"
               if repeated is not None else None)
    if problem is None and expected is not None and len(rows) != expected:
        problem = f"{len(rows)} rows where the merge wrote {expected}"
    if problem is not None:
        raise UserError(f"{RunFolder(sweep_dir).csv(SIMILARITY)}: {problem}; the file was cut short or edited: "
                        f"`dsl merge {sweep_dir}` writes it again from the jobs")


def read_merged(sweep_dir: Path) -> list[dict]:
    """The merged similarity.csv's rows, typed, each checked as a run's own rows are (`check_merged_row`):
    a name that is not a plain name, or a `file` that is not a picture in a job folder, is one UserError."""
    path = RunFolder(sweep_dir).csv(SIMILARITY)
    try:
        text = read_bytes_nofollow(path).decode("utf-8")
        reader = csv.DictReader(text.splitlines(keepends=True))
        header = reader.fieldnames or []
        if header[-len(SIMILARITY.columns):] != SIMILARITY.columns or header[:1] != ["job"]:
            raise UserError(f"{path}: not a merged CSV of dsl's (columns {printable(str(header))}); `dsl merge "
                            f"{sweep_dir}` writes it again")
        rows = [row for row in reader if len(row) == len(header) and None not in row.values()]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise UserError(f"{path}: not readable as a merged CSV ({err}); `dsl merge {sweep_dir}` writes it "
                        "again") from None
    try:
        return [check_merged_row(type_row(row, SIMILARITY, f"{path} row {n}:"), f"{path} row {n}:")
                for n, row in enumerate(rows, start=2)]
    except UserError as err:  # a value edited: the merge writes the table again from the jobs
        raise UserError(f"{err}: {rewrite_advice(path)}") from None


def redraw_sweeps(folder: Path) -> dict[Path, int]:
    """`draw_sweep` for every merged sweep at or below `folder`: {sweep folder: figures drawn} (a refused one
    among several: `report.each_folder`)."""
    found = [folder] if is_sweep_folder(folder) else [p.parent for p in folder.rglob("multirun.yaml")]
    merged = [("sweep", sweep) for sweep in sorted(found)
              if RunFolder(sweep).csv(SIMILARITY).is_file() and RunFolder(sweep).is_own()]
    return each_folder(merged, lambda kind, sweep: len(draw_sweep(sweep)))


# ---------------------------------------------------------------- Hydra callback


def pin_gpu(job_num: int) -> None:
    """submitit's local executor shows every GPU to every job; keep the job's own one. The sweeper starts at
    most one job per GPU at a time (launcher=local_gpus sets its batch size), in consecutive numbers, so
    `job number mod GPUs` never gives two running jobs the same GPU."""
    visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d]
    if len(visible) > 1:
        os.environ["CUDA_VISIBLE_DEVICES"] = visible[job_num % len(visible)]


merged_sweeps: list[dict] = []  # manifests of the sweeps merged in this process (the exit status reads them)
FULL_ERROR = "HYDRA_FULL_ERROR"  # set, Hydra raises what goes wrong instead of printing its traceback


@dataclass
class _Launch:
    """Inside `cluster_refusals_reported`: whether dsl may set HYDRA_FULL_ERROR, the sweep launched, whether
    its jobs are SLURM's (they go on when the waiting `dsl run` stops), and where submitit's local executor
    keeps its jobs' folders (launcher=local_gpus: they are stopped with it); what puts submitit's sbatch call
    back as it was (`sbatch_errors_unprinted`)."""

    active: bool = False
    sweep: Path | None = None
    on_slurm: bool = False
    local_jobs: Path | None = None
    restore_sbatch: Callable[[], None] | None = None


_launch = _Launch()


@contextmanager
def cluster_refusals_reported() -> Iterator[None]:
    """Around Hydra's multirun: a cluster that refuses the sweep's jobs (sbatch: a partition, account, QOS or
    GPU request it does not have) or a machine without SLURM's commands is bad input, raised as UserError (one
    line, status 2) and recorded in the sweep's manifest; so is a job that ended without a result (a sweep
    with a job not complete ends with status 2), and a stop names the jobs that go on. Hydra prints anything
    raised while it launches as a traceback with status 1, unless HYDRA_FULL_ERROR is set: `SweepResults` sets
    it for the launch alone (not for the config's composition, whose errors Hydra words well). Where the user
    set it, it stays, and so do the tracebacks."""
    _launch.active, _launch.sweep = FULL_ERROR not in os.environ, None
    try:
        yield
    except Exception as err:
        sweep = _launch.sweep
        refused, lost = (cluster_refusal(err), lost_job(err, sweep)) if _launch.active else (None, None)
        if refused is None and lost is None:
            raise
        _mark_sweep(sweep, status="failed", error=refused or lost)
        if lost is not None:
            raise UserError(lost) from None
        raise UserError(f"{refused}; nothing was submitted: fix the launcher's settings (docs/cluster.md), then "
                        f"`dsl run resume={sweep or 'SWEEP_DIR'}` with them") from None
    except Interrupted as err:  # stopping the wait stops no SLURM job: say what runs on, and how to finish
        if _launch.local_jobs is not None:
            stop_local_jobs(_launch.local_jobs)
        _mark_sweep(_launch.sweep, status="interrupted")
        if _launch.on_slurm and _launch.sweep is not None:
            err.advice = (f"the sweep's SLURM jobs go on (`squeue --me` lists them, `scancel` stops them); once "
                          f"none runs, `dsl run resume={_launch.sweep}` completes and merges the sweep "
                          f"(`dsl merge {_launch.sweep}` merges what is done so far)")
        elif _launch.sweep is not None:
            err.advice = (f"the sweep's running jobs stopped with it; `dsl run resume={_launch.sweep}` completes "
                          "and merges the sweep")
        raise
    except SystemExit as exit_:  # a job of a sweep run in this process (launcher=local) was stopped
        if isinstance(exit_.code, int) and exit_.code > 128:
            _mark_sweep(_launch.sweep, status="interrupted")
        raise
    finally:
        if _launch.active:
            os.environ.pop(FULL_ERROR, None)
        if _launch.restore_sbatch is not None:
            _launch.restore_sbatch()
        _launch.active, _launch.sweep, _launch.on_slurm, _launch.local_jobs = False, None, False, None
        _launch.restore_sbatch = None


def stop_local_jobs(jobs: Path, wait_s: float = 60.0) -> None:
    """launcher=local_gpus: submitit's local jobs are processes of this one that outlive it (submitit cancels
    them only where asked to), so a stopped sweep stops them too. Each job's controller is a child of this
    process whose pid names its folder in `jobs` (`.submitit`); SIGTERM to it is forwarded to the job, which
    ends as any stopped run does. Waits up to `wait_s` for them to end, so that their manifests say so."""
    running = [pid for pid in (int(p.name) for p in jobs.glob("*") if p.name.isdigit()) if _running_child(pid)]
    for pid in running:
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + wait_s
    while running and time.monotonic() < deadline:
        time.sleep(0.1)
        running = [pid for pid in running if _running_child(pid)]


def _running_child(pid: int) -> bool:
    """Whether `pid` is a process this one started that has not ended (one that ended is reaped)."""
    try:
        return os.waitpid(pid, os.WNOHANG) == (0, 0)
    except ChildProcessError:  # not a child of this process (another's, or long gone)
        return False


def _mark_sweep(sweep: Path | None, **values) -> None:
    """A sweep that ended before its merge (refused, a job lost, stopped): its manifest says how, where it is
    dsl's and not complete (the next merge writes its status again)."""
    if sweep is not None and RunFolder(sweep).is_own() and (read_manifest(sweep) or {}).get("status") != "complete":
        Manifest(RunFolder(sweep).manifest_json).update(**values)


def cluster_refusal(err: BaseException) -> str | None:
    """The one line for sbatch refusing the jobs, or for submitit finding no SLURM here; None for anything
    else (a job that ended without a result among them: `lost_job`)."""
    frames = [frame for frame, _ in traceback.walk_tb(err.__traceback__)]
    if not frames or f"{os.sep}submitit{os.sep}" not in frames[-1].f_code.co_filename:
        return None
    message = printable(" / ".join(line.strip() for line in str(err).splitlines() if line.strip()))
    if any(frame.f_code.co_name == "_submit_command" for frame in frames):  # sbatch said no
        gpus = (" (the jobs ask for GPUs: hydra.launcher.gpus_per_node or DSL_SLURM_GPUS, 1 by default; "
                "hydra.launcher.gpus_per_node=0 on a partition without GPUs)" if "gres" in message.lower() else "")
        return f"SLURM refused the sweep's jobs ({message}){gpus}"
    if type(err) is RuntimeError and 'detect "srun"' in message:
        return (f"launcher=slurm needs SLURM's commands here ({message}): run it on the cluster's login node, or "
                "use launcher=local_gpus on this machine")
    return None


def lost_job(err: BaseException, sweep: Path | None) -> str | None:
    """The one line for a job that ended on the cluster without a result (cancelled, killed for its memory or
    its time, its node lost: submitit's UncompletedJobError, where SLURM keeps accounting); None for anything
    else. The launcher stops waiting there; the sweep's other jobs go on."""
    from submitit.core.utils import UncompletedJobError  # the launcher has imported it already

    if not isinstance(err, UncompletedJobError):
        return None
    # submitit's wording: "Job 45_0 (task: 0) with path .../45_0_0_result.pkl\nhas not produced any output (state: X)"
    found = re.search(r"Job (\S+) \(task: (\d+)\) with path (.*)\n.*?\(state: (.*?)\)", str(err))
    if found is None:
        return None
    job, task, result, state = found.groups()
    log_file = Path(result).with_name(f"{job}_{task}_log.err")
    return (f"SLURM job {printable(job)} of the sweep ended without a result ({printable(state)}); its error stream "
            f"is {printable(str(log_file))}. The sweep's other jobs go on (`squeue --me`); once none runs, "
            f"`dsl run resume={sweep or 'SWEEP_DIR'}` runs the unfinished jobs again and merges the sweep")


SUBMITIT_LOG = "SUBMITIT_LOG_LEVEL"  # NOCONFIG: submitit adds no handler of its own when imported


def submitit_logs_through_hydra() -> None:
    """submitit prints each warning itself, twice (to stdout and to stderr) and once per status poll (its
    sacct warning, where the cluster keeps no accounting); without its handlers its records reach Hydra's
    console, whose filter (`logs.SweepTerminalFilter`) shows a library's warning once. The launcher imports
    submitit after this; where it is in already, its handlers are taken off."""
    os.environ.setdefault(SUBMITIT_LOG, "NOCONFIG")
    if "submitit" in sys.modules and os.environ[SUBMITIT_LOG] == "NOCONFIG":
        logger = logging.getLogger("submitit")
        for handler in [h for h in logger.handlers if type(h) is logging.StreamHandler]:
            logger.removeHandler(handler)


def sbatch_errors_unprinted() -> Callable[[], None]:
    """submitit prints what a failed sbatch wrote on stderr before it raises the same text (`CommandFunction`):
    a refusal came out twice, sbatch's raw line above dsl's, which quotes it (`cluster_refusal`). From here,
    that print goes nowhere; the function returned puts submitit's call back (a process that goes on)."""
    from submitit.core.utils import CommandFunction  # the launcher imports it anyway, after this

    call = CommandFunction.__call__

    def unprinted(self: CommandFunction, *args: Any, **kwargs: Any) -> str:
        with redirect_stderr(io.StringIO()):  # the exception it raises on a failure carries that text
            return call(self, *args, **kwargs)

    CommandFunction.__call__ = unprinted
    return lambda: setattr(CommandFunction, "__call__", call)


def refuse_clamped_repeats(config: DictConfig) -> None:
    """Two swept values of `layer` or `head` that read the same layers or heads (`layer=1,01`, `layer=1,1-1`;
    with `clamp_to_model`, as debug=tiny sets, a layer beyond the model is its last one) would run one job twice
    and merge its rows twice (a value swept twice is refused for that reason). Refused before any job starts,
    where the model's shape is known from configs and the encoder is not swept."""
    # imported here, as the preflight is: `dsl merge` and `dsl plot` import this module without the models
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from dsl_cli.encoder import model_shape
    from dsl_cli.lenses import parse_heads, parse_layers

    overrides = OverridesParser.create().parse_overrides(sweep_overrides(config.hydra))  # unresolved, as typed
    swept = {o.key_or_group: list(o.sweep_iterator()) for o in overrides if o.is_sweep_override()}
    shape = model_shape(config.encoder)
    if shape is None or any(key.startswith("encoder") or key == "clamp_to_model" for key in swept):
        return
    quiet = logging.getLogger("dsl_cli.lenses")  # each job warns of its own clamping
    was, quiet.disabled = quiet.disabled, True
    try:
        for key, parse, count in (("layer", parse_layers, shape[0]), ("head", parse_heads, shape[1])):
            seen: dict[tuple, Any] = {}
            for value in swept.get(key, []):
                try:
                    read = tuple(parse(value, count, clamp=bool(config.clamp_to_model)))
                except UserError:  # outside the model: that job refuses it, and the others run (a sweep goes on)
                    continue
                if read in seen:
                    clamped = ("; clamp_to_model=true moves one beyond them to its last" if config.clamp_to_model
                               else "")
                    raise UserError(f"{key}={seen[read]} and {key}={value} both read {key}{'s' * (len(read) > 1)} "
                                    f"{', '.join(map(str, read))} of this model (it has {count} {key}s{clamped}): "
                                    f"the sweep would run that job twice; "
                                    + (f"sweep {key}s 0 to {count - 1}" if config.clamp_to_model
                                       else f"give each {key} once"))
                seen[read] = value
    finally:
        quiet.disabled = was


class SweepResults(Callback):
    """Hydra callback (configs/run.yaml, hydra.callbacks): one GPU per local job, and the merge at the end."""

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if os.environ.get("SUBMITIT_EXECUTOR") == "local":  # a job of launcher=local_gpus
            pin_gpu(int(config.hydra.job.num))

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Weights are looked up once before any job is launched, so that a sweep of 48 SLURM jobs that would
        each stop at the preflight is refused at once (each job still checks its own, swept, config)."""
        # imported here for start-up speed, not for a circle: the preflight asks the models (torch, diffusers,
        # open_clip), which `dsl merge` and `dsl plot`, importing this module, never load
        from dsl_cli.preflight import preflight

        submitit_logs_through_hydra()
        if not config.resume:
            try:
                refuse_clamped_repeats(config)
                preflight(config)
            except UserError as err:
                report(err)
                sys.exit(2)
        _launch.sweep = Path(config.hydra.sweep.dir)
        launcher = str(config.hydra.launcher.get("_target_", ""))
        _launch.on_slurm = launcher.endswith(".SlurmLauncher")
        if _launch.on_slurm and _launch.active:  # dsl reports sbatch's refusal itself, in one line
            _launch.restore_sbatch = sbatch_errors_unprinted()
        if launcher.endswith(".LocalLauncher"):  # submitit's: each job's folder is submitit_folder with its id
            _launch.local_jobs = Path(config.hydra.launcher.submitit_folder).parent
        if _launch.active:  # what goes wrong from here on is raised to `cluster_refusals_reported`
            os.environ[FULL_ERROR] = "1"

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            manifest = merge_sweep(sweep_dir)
        except UserError as err:  # a damaged file of a job: one line, and the sweep ends with status 2
            report(err, prefix="merge: ")
            merged_sweeps.append({"status": "failed"})
            return
        for line in summary_lines(sweep_dir, manifest):
            log.info("%s", printable(line))  # the sweep folder and the jobs' errors may hold any character
        merged_sweeps.append(manifest)
