"""The Hydra side of `dsl run`: a job's folder is claimed before Hydra writes there, and every way a job
ends is mapped, in this one place, to a manifest status, one line on stderr and an exit status.

    complete                      exit 0
    UserError (bad input, disk)   manifest `failed` + reason, `dsl: error: ...`, exit 2
    any other exception (a bug)   manifest `failed` + reason, `dsl: error: internal error ...`, exit 1
    SIGINT / SIGTERM / SIGHUP     manifest `interrupted`, the `resume=` command, exit 130 / 143 / 129

In a --multirun sweep a failed job is recorded and the next one runs; the sweep exits 1 or 2 at the end.
An interruption stops the sweep. `hydra.verbose=true` shows the traceback instead of the one line.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Callable

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, read_write

from dsl_cli.config import images_source, path_override, sweep_overrides
from dsl_cli.errors import (STOP_SIGNALS, FolderTaken, Interrupted, Refused, UserError, bug_message, printable,
                            raise_if_stopped, report, stop, stop_handler)
from dsl_cli.logs import close_file_logs
from dsl_cli.outputs import Manifest, RunFolder, atomic_write_bytes, is_dsl_png, is_sweep_folder
from dsl_cli.resumption import requeued_run, resumes

SIBLINGS = 100  # the names a run folder named after the time may take: TIME, then TIME_1 .. TIME_99
_failures: list[int] = []  # exit statuses of the failed jobs of this process's sweep


def claim_or_exit(folder: Path, cfg: DictConfig, kind: str = "run") -> Path:
    """Claim a run's or sweep's folder for this process (`claim_fresh`), or end with one line and status 2
    (nothing is written there). Returns the folder claimed."""
    try:
        if kind == "sweep":
            refuse_shared_job_folders(cfg)
        return claim_fresh(folder, cfg, kind)
    except UserError as err:
        report(err)
        sys.exit(2)
    except Exception as err:  # Hydra turns a callback's exception into a warning and goes on, unclaimed
        report(bug_message(err))
        sys.exit(1)


def refuse_shared_job_folders(cfg: DictConfig) -> None:
    """A sweep's jobs go into folders of their own inside the sweep folder (`hydra.sweep.subdir`, the job's
    number by default): a subdir that leaves it (`../x`, an absolute path) or names no job (`same`: every job one
    folder) would write where the sweep's merge and resume do not look, or each job over the last."""
    subdir = str(OmegaConf.to_container(cfg.hydra.sweep, resolve=False).get("subdir"))
    parts = Path(subdir).parts
    if Path(subdir).is_absolute() or ".." in parts or not parts:
        raise UserError(f"hydra.sweep.subdir={subdir}: a job's folder must be inside the sweep folder; use a "
                        "relative name such as job_${hydra.job.num}")
    named = set(re.findall(r"\$\{([^}:]+)\}", subdir))  # `${seed}`; `${hydra:job.num}` is named below
    if not re.search(r"\$\{hydra[.:]job\.", subdir) and not named & _swept_keys(cfg):
        raise UserError(f"hydra.sweep.subdir={subdir}: jobs would share a folder (it names neither the job nor a "
                        "swept setting); name it after the job, e.g. job_${hydra.job.num}")


def _swept_keys(cfg: DictConfig) -> set[str]:
    """The settings a sweep's command line and its sweeper's params sweep (`seed=1,2`: seed)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return {o.key_or_group for o in OverridesParser.create().parse_overrides(sweep_overrides(cfg.hydra))
            if o.is_sweep_override()}


class ClaimFolder(Callback):
    """Registered in run.yaml (`hydra.callbacks`): claims the run folder, or a sweep's folder, as soon as
    Hydra has composed the config and before it writes anything there (its log, the sweep's multirun.yaml).
    Each sweep job's own folder is claimed by `task` (dsl writes `.hydra/` itself, after the claim).

    Hydra creates the run folder after this (`hydra.core.utils.run_job`, where it is there already), so the
    claim is what creates it, and knows whether it was there before (`RunFolder.made_here`)."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        given = Path(config.hydra.run.dir)
        folder = claim_or_exit(given, config)
        if folder != given:  # Hydra's run_job reads the run folder from this config, after this callback
            with read_write(config.hydra.run):
                config.hydra.run.dir = str(folder)

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        given = Path(config.hydra.sweep.dir)
        folder = claim_or_exit(given, config, "sweep")
        if folder != given:  # the launcher reads it from this config, and each job's config is composed again
            with read_write(config.hydra):  # from hydra.overrides.hydra (Hydra's load_sweep_config)
                config.hydra.sweep.dir = str(folder)
                config.hydra.overrides.hydra.append(path_override(f"hydra.sweep.dir={folder}", sweep=True))


def claim_fresh(folder: Path, cfg: DictConfig, kind: str = "run") -> Path:
    """Claim the folder of a run or sweep the command starts (`claim`), and return it. A fresh one inside a
    sweep's folder is refused: the sweep's merge and resume would take it for one of its jobs. A run folder
    named after the time (`hydra.run.dir` not given), which another run of the same second holds, gives way
    to a sibling, `TIME_1`, and so does a sweep's; a folder the user named is refused."""
    if not resumes(cfg, folder):
        _refuse_inside_a_sweep(folder, kind)
    names = [folder]
    if _named_after_the_time(cfg, kind):
        names += [folder.with_name(f"{folder.name}_{n}") for n in range(1, SIBLINGS)]
    for candidate in names[:-1]:
        try:
            claim(RunFolder(candidate), cfg, kind)
            return candidate
        except FolderTaken:  # a run started in the same second holds it: the next name
            continue
    claim(RunFolder(names[-1]), cfg, kind)  # the only name, or the last: its refusal is the one reported
    return names[-1]


def _refuse_inside_a_sweep(folder: Path, kind: str) -> None:
    """UserError where a folder above `folder` is a sweep's (the folders of its jobs are found at any depth)."""
    for above in folder.resolve().parents:
        if is_sweep_folder(above):
            setting = "hydra.sweep.dir" if kind == "sweep" else "hydra.run.dir"
            raise UserError(f"{folder} is inside the sweep folder {above}, whose jobs alone go there: choose "
                            f"another {setting} (`dsl run resume={above}` runs the sweep's unfinished jobs)")


def _named_after_the_time(cfg: DictConfig, kind: str) -> bool:
    """Whether the run's (or sweep's) folder is dsl's default, named after the time (`${now:...}` in run.yaml's
    `hydra.run.dir`, `hydra.sweep.dir`), rather than a folder given on the command line."""
    node = "run" if kind == "run" else "sweep"
    overrides = OmegaConf.to_container(cfg.hydra.overrides.hydra, resolve=False)  # `${hydra.job.num}` is unset here
    given = any(o.lstrip("+").split("=", 1)[0] == f"hydra.{node}.dir" for o in overrides)
    return not given and "${now:" in str(OmegaConf.to_container(cfg.hydra[node], resolve=False)["dir"])


def sweep_status() -> int:
    """The exit status of `dsl run` after its jobs: 0, or 1 if a job met a bug, else 2 if one was refused
    (and the record is cleared for the next `dsl run` in this process)."""
    status = 1 if 1 in _failures else 2 if _failures else 0
    _failures.clear()
    return status


def save_hydra_files(folder: Path, cfg: DictConfig) -> None:
    """What Hydra keeps in `.hydra/` (the job's config, Hydra's config, the overrides), written atomically
    by dsl once the folder is claimed (run.yaml sets `hydra.output_subdir: null`)."""
    hydra_cfg = HydraConfig.get()
    run = RunFolder(folder)
    files = {run.config_yaml: cfg, run.hydra_yaml: OmegaConf.create({"hydra": hydra_cfg}),
             run.overrides_yaml: hydra_cfg.overrides.task}
    for path, content in files.items():
        atomic_write_bytes(path, OmegaConf.to_yaml(content).encode())


def stop_signals_interrupt():
    """While the job runs, SIGTERM and SIGHUP stop it as Ctrl-C does (an `Interrupted` exception), so that
    finally-blocks run, temporaries go and the manifest says `interrupted`."""
    return stop_handler(STOP_SIGNALS, lambda signum, frame: stop(signum))


def _load_run(cfg: DictConfig) -> Callable[[DictConfig, Path], None]:
    """`dsl_cli.run.run`, imported only when a job runs: it brings in the model libraries, imported with the
    garbage collector off and then frozen (`dsl_cli.libraries.import_frozen`): a job's process is dsl's, also
    where a cluster started it without `dsl`'s command line. Once torch is in, the CUDA context is started in
    a thread (`devices.begin_device`) while the rest is imported and the config checked; not for a resumed
    run, whose device is the saved config's."""
    from dsl_cli.libraries import import_frozen, own_the_collector

    own_the_collector()
    if not cfg.resume and cfg.device in ("auto", "cuda"):  # on the CPU, one import (and collection) as before
        import_frozen("torch")
        from dsl_cli.devices import begin_device

        begin_device()
    return import_frozen("dsl_cli.run").run


def task(cfg: DictConfig) -> None:
    """The Hydra task function of `dsl run`: one job, with its ending recorded (see the module docstring)."""
    from dsl_cli.logs import route_library_logs

    with stop_signals_interrupt():
        hydra_cfg = HydraConfig.get()
        folder = RunFolder(Path(hydra_cfg.runtime.output_dir))
        sweep = hydra_cfg.mode == RunMode.MULTIRUN
        num = hydra_cfg.job.num if sweep else None
        try:
            raise_if_stopped()  # one that came while Hydra set the run up (dsl_cli.cli defers those to here)
            run = _load_run(cfg)
            route_library_logs()  # after importing run: the libraries set up their loggers when imported
            raise_if_stopped()  # a Ctrl-C during those seconds of imports that a library's `except:` swallowed
        except KeyboardInterrupt as err:  # a single run's folder, claimed by ClaimFolder, holds nothing yet
            if num is None and not cfg.resume and holds_no_result(folder):
                drop_bookkeeping(folder)
                _report(err, folder.path, None, kept=False)
            raise
        cfg.images.source = images_source(cfg.images)  # recorded as read: `images.path=X` is the folder source
        try:
            claim(folder, cfg)
        except UserError as err:  # not this job's folder: nothing is recorded there
            return _end(num, folder.path, err, 2)
        failed_early = False
        try:
            if not folder.config_yaml.exists():  # a fresh job, or one a sweep never started
                save_hydra_files(folder.path, cfg)
            run(cfg, folder.path)
        except BaseException as err:  # noqa: BLE001 - every ending is recorded, then reported or re-raised
            record_ending(folder, err)
            # a single run stopped or refused before its first result leaves no folder (a bug's log stays)
            failed_early = (num is None and not cfg.resume and isinstance(err, (UserError, KeyboardInterrupt))
                            and holds_no_result(folder))
            if hydra_cfg.verbose and not isinstance(err, KeyboardInterrupt):
                raise
            _report(err, folder.path, num, kept=not failed_early,
                    sweep_dir=Path(hydra_cfg.sweep.dir) if sweep else None)
        finally:
            if failed_early:  # while the folder is held: whether this run made it is known until its release
                drop_bookkeeping(folder)
            folder.release()


def _bookkeeping(folder: RunFolder) -> list[Path]:
    """What dsl writes in a run folder before any result: its manifest, log, saved configs and lock, and the
    input pictures (copies of the images as the encoder saw them, dsl's own PNGs), files before folders."""
    inputs = [p for p in folder.path.glob("images/*/input.png") if not p.is_symlink() and is_dsl_png(p)]
    return [folder.manifest_json, folder.log_file, folder.config_yaml, folder.hydra_yaml, folder.overrides_yaml,
            folder.lock_path, *inputs, folder.config_yaml.parent, *(p.parent for p in inputs),
            folder.path / "images"]


def holds_no_result(folder: RunFolder) -> bool:
    """Whether the folder holds nothing but dsl's bookkeeping (a run that failed before its first result)."""
    known = set(_bookkeeping(folder))
    try:
        found = [p for p in folder.path.rglob("*")]
    except OSError:
        return False
    return not folder.path.is_symlink() and all(p in known and not p.is_symlink() for p in found)


def drop_bookkeeping(folder: RunFolder) -> None:
    """A single run that failed before its first result leaves no folder: the same command, once its cause
    is fixed, runs again, and dated folders of failed attempts do not pile up. Only dsl's own files are
    deleted, and the run folder only if this process made it (a user's empty folder stays) and that empties
    it. Called while the folder is held."""
    if not holds_no_result(folder):  # checked again: something may have appeared since
        return
    close_file_logs(folder.log_file)
    for path in _bookkeeping(folder):
        try:
            path.rmdir() if path.is_dir() else path.unlink()
        except FileNotFoundError:  # never made (.hydra of a run stopped before it was written) or gone
            continue
        except OSError:  # a folder not empty (a file appeared): left as it is
            return
    if folder.made_here:  # with the dated folder above it where the claim made that too
        folder.remove_if_empty(folder.made_above)


def claim(folder: RunFolder, cfg: DictConfig, kind: str = "run") -> None:
    """Claim a run's (or sweep's) folder for this process; a fresh run refuses one that holds a run, while
    `resume=`, a requeued SLURM job and a job of a resumed sweep continue theirs. SLURM ended a requeued
    job's earlier instance, maybe on another node, so the lock that instance left is stale whatever its host."""
    if requeued_run(folder.path):
        folder.lock_path.unlink(missing_ok=True)
    folder.claim(resume=resumes(cfg, folder.path), kind=kind)


def record_ending(folder: RunFolder, err: BaseException) -> None:
    """The manifest's status and reason for a job that did not complete; on a full disk the space kept in
    the folder's lock is given back first, so that this last write fits. A continued run refused before its
    attempt began (`Refused`) keeps the status it had: a complete run is still whole."""
    if isinstance(err, Refused):
        return
    values = ({"status": "interrupted", "error": f"interrupted by {_signal_name(err)}"}
              if isinstance(err, KeyboardInterrupt) else {"status": "failed", "error": _reason(err)})
    manifest = Manifest(folder.manifest_json)
    try:
        manifest.update(**values)
    except UserError:
        folder.free_reserve()
        try:
            manifest.update(**values)
        except UserError as again:
            report(f"could not record the failure in {manifest.path}: {again}")


def _signal_name(err: KeyboardInterrupt) -> str:
    return err.args[0] if isinstance(err, Interrupted) else "SIGINT"


def _reason(err: BaseException) -> str:
    if isinstance(err, UserError):
        return str(err)
    return f"internal error: {type(err).__name__}: {err}"


def _report(err: BaseException, folder: Path, num: int | None, kept: bool = True,
            sweep_dir: Path | None = None) -> None:
    """One line for the user; the exit status (at once, or at the end of a sweep: `num` is the sweep job's).
    `kept`: False when the run failed before its first result and its folder is removed. A sweep's job names
    the sweep's resume (`sweep_dir`), which runs its unfinished jobs and merges it."""
    if sweep_dir is not None:
        resume = f"`dsl run resume={sweep_dir}` completes the sweep"
    else:
        resume = f"`dsl run resume={folder}` completes the run" if kept else "run the same command again"
    if isinstance(err, KeyboardInterrupt):
        removed = folder if RunFolder(folder).made_here else f"what dsl wrote in {folder}"  # dropped after this
        kept_text = "finished pictures are kept" if kept else f"nothing was written yet, and {removed} is removed"
        print("\n" + printable(f"dsl: interrupted ({_signal_name(err)}); {kept_text}: {resume}"), file=sys.stderr)
        sys.exit(err.exit_status if isinstance(err, Interrupted) else 130)
    if isinstance(err, UserError):
        message, status = (UserError(f"{err.args[0]}; once that is fixed, {resume}") if err.resumable else err), 2
    elif isinstance(err, Exception):
        message, status = bug_message(err), 1
    else:  # SystemExit and the like: not ours to translate
        raise err
    _end(num, folder, message, status)


def _end(num: int | None, folder: Path, message: "str | UserError", status: int) -> None:
    """Report; end a single run with `status`, or note it and let a sweep (`num`: the job) go on."""
    if num is None:
        report(message)
        sys.exit(status)
    report(message, prefix=f"job {num} ({folder}): ")
    _failures.append(status)
