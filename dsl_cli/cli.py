"""The `dsl` command. It parses and dispatches; the work happens in `dsl_cli.run`, `dsl_cli.outputs` and
`dsl_cli.report`.

    dsl run [hydra overrides and flags...]    run the Hydra app (configs ship inside the package)
    dsl plot RUN_FOLDER                      redraw grids and heatmaps from a finished run's files
    dsl merge SWEEP_DIR                      merge the jobs of a --multirun sweep (dsl_cli.sweeps)
    dsl report FOLDER                        write the HTML pages of runs, studies and sweeps (dsl_cli.report)
    dsl --version | --help | run --help | plot --help | merge --help | report --help

Each command imports what it needs when it runs, not at the top: `dsl --help` and the commands on files
(plot, merge, report) start without Hydra's app, torch, diffusers or open_clip (tests/test_imports.py).
"""

from __future__ import annotations

import os
import signal
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, NoReturn

from dsl_cli import __version__
from dsl_cli.errors import (STOP_SIGNALS, Interrupted, PartlyDone, UserError, bug_message, catch_stop_signals,
                            clear_stops, deferred_stops, printable, raise_if_stopped, report, stop)
from dsl_cli.libraries import own_the_collector

VERSION = f"dsl {__version__}"
USAGE = f"""{VERSION}: Diffusion Steering Lens for CLIP vision transformers, decoded with Kandinsky or unCLIP

usage:
  dsl run [OVERRIDES...]     run a lens; Hydra overrides and flags, e.g.
                             dsl run lens=steering layer=30
                             dsl run lens=diffusion layer=all
                             dsl run --multirun lens=steering layer=0,12,24,36 lens.alpha=1,4
                             dsl run debug=tiny              (tiny random models on the CPU, seconds)
                             dsl run resume=outputs/DATE/TIME  (complete an interrupted run)
                             dsl run -m launcher=slurm layer='range(0,48)'  (a SLURM job per layer)
                             dsl run -m launcher=local_gpus layer='range(0,48)'  (a job per GPU here)
                             dsl run resume=outputs/multirun/DATE/TIME  (complete a sweep's jobs)
                             dsl run --help                  (config groups and their choices)
                             dsl run --cfg job               (print the composed config)
  dsl plot RUN_FOLDER        redraw grids, heatmaps, study plots and pages from a run folder (or
                             every run below a folder, e.g. a sweep), without any model
  dsl merge SWEEP_DIR        merge a --multirun sweep's jobs into SWEEP_DIR/similarity.csv with
                             each job's overrides as columns, heatmaps over all jobs, and a
                             manifest naming failed and unfinished jobs (done by itself when a
                             --multirun ends)
  dsl report FOLDER          write or refresh the HTML page (index.html) of a run, study or sweep
                             folder, or of every one below a folder; they open from file://
  dsl check [OVERRIDES...]   compare each pretrained model a run with these overrides would use, as
                             dsl loads it, with the upstream library's own (docs/user-guide.md,
                             "Check your weights")
  dsl adapter fit [OVERRIDES...]  fit a linear adapter from any encoder to a decoder's embedding space
                             (images.path=FOLDER); `dsl run adapter=FOLDER` decodes through it
  dsl adapter merge FOLDER   add the partial sums of a sharded fit and fit (dsl adapter --help)
  dsl sae train [OVERRIDES...]  train a TopK SAE on one layer's residuals (layer=N images.path=FOLDER);
                             `dsl run sae.path=FOLDER` reads its features (dsl sae --help)
  dsl --version
"""

PLOT_USAGE = """usage: dsl plot RUN_FOLDER

Redraw the grids, heatmaps and label plots of a finished run from its files alone (similarity.csv,
labels.csv, the pictures), or a study's plot from its CSVs, without a model or a GPU, and refresh the
pages (index.html). Given a folder of runs (a --multirun sweep, a date folder), redraw every run and study
below it.
"""

REPORT_USAGE = """usage: dsl report FOLDER

Write or refresh index.html in a run, study or sweep folder, and in every one below FOLDER, from the
files alone (no model, no figures redrawn: `dsl plot` does that). A run's page shows its settings, each
image's input, heatmaps (each cell a link to its picture) and best pictures, and a table of every component
that sorts on a click and filters by image, layer and kind; a study's page its plot and tables; a sweep's
page its jobs and their heatmaps. Given a folder that holds runs but is none itself (outputs/, a date
folder), also its own index.html: every run, study and sweep below it, with a link to its page and every
figure it drew. Pages open from file:// with no server and no network.
"""


def _fail(message: "str | UserError") -> int:
    """Report a refusal (exit status 2), unless a stop signal came first: a Ctrl-C while Hydra composes the
    config can come back as a composition error ("defaults: no such setting"), and the stop is what happened."""
    raise_if_stopped()
    report(message)
    return 2


# Hydra flags that take a value; `--info` takes one only when it is one of its choices.
_VALUE_FLAGS = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
                "--config-dir", "-cd", "--experimental-rerun"}
_INFO_CHOICES = {"all", "config", "defaults", "defaults-tree", "plugins", "searchpath"}
# Hydra's modes: one at a time (Hydra's own refusal is a traceback).
_MODES = {"--multirun": "--multirun", "-m": "--multirun", "--cfg": "--cfg", "-c": "--cfg", "--info": "--info",
          "-i": "--info", "--shell-completion": "--shell-completion", "-sc": "--shell-completion"}
# Flags after which the composed config is not dsl's own (another config) or nothing runs (help): no check.
_OWN_CONFIG_FLAGS = {"--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd", "--help", "-h",
                     "--hydra-help", "--shell-completion", "-sc", "--experimental-rerun"}


def _split_flags(args: list[str]) -> tuple[list[str], list[str]]:
    """(flags with their values, overrides): Hydra's argparse wants flags before overrides, and users write
    `dsl run debug=tiny --multirun seed=0,1`."""
    flags, overrides, i = [], [], 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("-"):
            overrides.append(arg)
        elif arg in ("--info", "-i"):  # its value is optional: given only as one of its choices
            given = i + 1 < len(args) and args[i + 1] in _INFO_CHOICES
            # without one, Hydra's default written out: its parser would take the override after it for one
            flags.append(f"{arg}={args[i + 1] if given else 'all'}")
            i += given
        else:
            flags.append(arg)
            if arg in _VALUE_FLAGS and i + 1 < len(args):
                i += 1
                flags.append(args[i])
        i += 1
    return flags, overrides


def _answered_by_flags(flags: list[str]) -> bool:
    """Check the flags of `dsl run` with Hydra's own parser, before Hydra runs: one it refuses is a UserError
    naming the flags there are (Hydra's refusal is its 7-line usage, then `dsl run: error: ...`). True where
    the flags answered by themselves: `--version` (or an abbreviation) printed dsl's version, not Hydra's."""
    import argparse

    from hydra._internal.utils import get_args_parser

    parser = get_args_parser()
    for action in parser._actions:
        if isinstance(action, argparse._VersionAction):
            action.version = VERSION

    def refuse(message: str) -> NoReturn:  # argparse's `error` would print its usage and exit
        names = ", ".join("/".join(a.option_strings) for a in parser._actions if a.option_strings)
        raise UserError(f"dsl run: {message}; its flags are {names} (`dsl run --hydra-help` says what each does; "
                        "settings are given as key=value)")

    parser.error = refuse
    try:
        _, unknown = parser.parse_known_args(flags)
    except SystemExit:  # the version action ends the parse once it has printed
        return True
    if unknown:
        refuse(f"unknown flag {unknown[0]}")
    return False


def _mode(names: set[str]) -> str | None:
    """The one Hydra mode that flags with these names ask for (`--multirun`, `--cfg`, ...), if any; UserError
    where they ask for several (Hydra's own refusal is a traceback)."""
    modes = {_MODES[name] for name in names if name in _MODES}
    if len(modes) > 1:
        raise UserError(f"{' and '.join(sorted(modes))} do not go together: --cfg job prints the config of one run "
                        "(give one value of each setting), --multirun runs a sweep")
    return next(iter(modes), None)


def _run(args: list[str]) -> int:
    import hydra

    from dsl_cli import job
    from dsl_cli.config import check_overrides, path_override, register_configs, single_values
    from dsl_cli.outputs import release_all
    from dsl_cli.sweeps import cluster_refusals_reported, merged_sweeps, resume_overrides

    register_configs()
    try:
        flags, given = _split_flags([*args, *resume_overrides(args)])
        if _answered_by_flags(flags):
            return 0
        names = {flag.split("=")[0] for flag in flags}  # `--cfg=job` is `--cfg`
        # one run: a stop signal during Hydra's own set-up is raised when the job starts (job.task), not inside
        # Hydra; a sweep's launcher waits for its jobs, which a signal must interrupt at once
        sweep = _mode(names) == "--multirun" or any(o.startswith("hydra.mode=") for o in given)
        overrides = [path_override(arg, sweep) for arg in given]
    except UserError as err:
        return _fail(err)
    with nullcontext() if sweep else deferred_stops(STOP_SIGNALS):
        if not names & _OWN_CONFIG_FLAGS:
            try:  # Hydra's own refusals would be several lines and exit status 1
                if not sweep:
                    single_values(overrides)
                check_overrides(overrides)
            except UserError as err:
                return _fail(err)
        app = hydra.main(config_path="configs", config_name="run", version_base="1.3")(job.task)
        saved_argv = sys.argv
        sys.argv = ["dsl run", *flags, *overrides]
        merged_sweeps.clear()
        try:
            with cluster_refusals_reported():
                app()
        except UserError as err:
            return _fail(err)
        finally:
            sys.argv = saved_argv
            release_all()
    raise_if_stopped()  # one that came after the job, while Hydra finished
    status = job.sweep_status()
    return status or (2 if any(sweep["status"] != "complete" for sweep in merged_sweeps) else 0)


def _on_folder(args: list[str], help_text: str, usage: str, work: Callable[[Path], list[str]]) -> int:
    """A command on one folder (`dsl plot`, `dsl report`): `work(folder)` gives the lines to print. Bad
    input is one line and status 2 (where some folders of several were refused, after the others' lines), a
    bug one line and status 1; folders held meanwhile are released."""
    if args in (["-h"], ["--help"]):
        print(help_text)
        return 0
    if len(args) != 1 or args[0].startswith("-"):
        return _fail(usage)
    from dsl_cli.outputs import release_all

    try:
        lines = work(Path(args[0]))
    except PartlyDone as err:
        _print_lines(err.done)
        return _fail(err)
    except UserError as err:
        return _fail(err)
    except Exception as err:  # noqa: BLE001 - a bug: one line, status 1
        report(bug_message(err))
        return 1
    finally:
        release_all()
    _print_lines(lines)
    return 0


def _print_lines(lines: list[str]) -> None:
    """What a command did, one line each, control characters escaped as error lines escape them: the paths
    in them are the user's, and a folder named with an escape sequence or a newline must not forge output."""
    print("\n".join(map(printable, lines)))


def _redraw(folder: Path) -> list[str]:
    from dsl_cli.report import redraw_folder
    from dsl_cli.sweeps import redraw_sweeps

    drawn, refused, total = {}, [], 0
    for redraw in (redraw_sweeps, redraw_folder):  # the pages last: they show the figures
        try:
            found = redraw(folder)
        except PartlyDone as err:
            found, refused, total = err.done, refused + list(err.refused), total + err.total
        else:
            total += len(found)
        drawn |= {where: count for where, count in found.items() if count is not None}
    lines = [f"redrew {count} figure{'' if count == 1 else 's'} in {where}" for where, count in drawn.items()]
    if refused:
        raise PartlyDone(refused, total, lines)
    if not drawn:  # runs stopped before their first row: their pages were written again, no figure
        return [f"no figures to draw in {folder}: no run there has rows yet"]
    return lines


def _plot(args: list[str]) -> int:
    return _on_folder(args, PLOT_USAGE, "usage: dsl plot RUN_FOLDER (a run, or a folder of runs such as a "
                      "--multirun sweep)", _redraw)


def _write_pages(folder: Path) -> list[str]:
    from dsl_cli.report import write_pages
    from dsl_cli.sweeps import listed_jobs

    try:  # a sweep's jobs listed as a merge lists them, its merged CSV checked (sweeps is above report)
        return [f"wrote {page}" for page in write_pages(folder, listed_jobs)]
    except PartlyDone as err:
        raise PartlyDone(err.refused, err.total, [f"wrote {page}" for page in err.done]) from None


def _report(args: list[str]) -> int:
    return _on_folder(args, REPORT_USAGE, "usage: dsl report FOLDER (a run, study or sweep folder, or a folder of "
                      "them)", _write_pages)


MERGE_USAGE = """usage: dsl merge SWEEP_DIR

Merge the jobs of a --multirun sweep (SWEEP_DIR: its hydra.sweep.dir, holding multirun.yaml) from their files
alone: the complete jobs' similarity.csv into SWEEP_DIR/similarity.csv, with each job's overrides as columns;
heatmaps over all jobs at once; a manifest naming the failed and unfinished jobs; the sweep's page. A
--multirun does this by itself when it ends; merging twice gives the same files.
"""


def _merge(args: list[str]) -> int:
    if args in (["-h"], ["--help"]):
        print(MERGE_USAGE)
        return 0
    if len(args) != 1 or args[0].startswith("-"):
        return _fail("usage: dsl merge SWEEP_DIR (the hydra.sweep.dir of a --multirun)")
    from dsl_cli.sweeps import merge_sweep, summary_lines

    folder = Path(args[0])
    try:
        manifest = merge_sweep(folder)
    except UserError as err:
        return _fail(err)
    _print_lines(summary_lines(folder, manifest))
    return 0


# each command: its function here, or the module whose `main` it is, imported only when the command runs
# (light commands start without the model libraries)
COMMANDS: dict[str, "Callable[[list[str]], int] | str"] = {
    "run": _run, "plot": _plot, "merge": _merge, "report": _report,
    "check": "dsl_cli.check", "adapter": "dsl_cli.adapter_cli", "sae": "dsl_cli.sae_train",
}


def _command(name: str) -> Callable[[list[str]], int]:
    """A command's function; a module of its own imported as the model libraries are (`import_frozen`: `dsl
    check` imports torch with it)."""
    from dsl_cli.libraries import import_frozen

    target = COMMANDS[name]
    return import_frozen(target).main if isinstance(target, str) else target


def main(argv: list[str] | None = None) -> int:
    """`dsl ARGV`, or without `argv` this process's own arguments (the console script's `sys.exit(main())`);
    returns the exit status. Stop signals interrupt the command while it runs (`_interrupt`). Then, where
    `argv` was given (a test's or a notebook's process, which goes on), the handlers found are put back;
    in dsl's own process, which only shuts down from here, stop signals are ignored: a Ctrl-C during the
    shutdown (torch's atexit code, tenths of a second after a run) was a traceback with exit status 0,
    although the work was done and recorded."""
    own_the_collector()  # a command's process is dsl's: its model libraries are imported frozen
    previous = catch_stop_signals(STOP_SIGNALS, _interrupt)
    after = previous if argv is not None else dict.fromkeys(previous, signal.SIG_IGN)
    try:
        status = _dispatch(sys.argv[1:] if argv is None else list(argv))
        _set_handlers(after)  # inside the try: a signal that lands first is caught below (one line), not raised
        return status
    except BrokenPipeError:  # `dsl run --help | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt as err:  # a signal outside a run's job (which records its own): one line
        return _interrupted(err)
    finally:
        clear_stops()  # handled: the next command in this process (a test's, a notebook's) starts with none
        _set_handlers(after)


def _set_handlers(handlers: dict[int, object]) -> None:
    for signum, handler in handlers.items():
        signal.signal(signum, handler)




def _interrupt(signum: int, frame) -> None:
    """From main's first instruction on, SIGTERM and SIGHUP stop dsl as Ctrl-C does (`Interrupted`)."""
    stop(signum)


def _interrupted(err: KeyboardInterrupt) -> int:
    """Release what this process holds (its locks), say so in one line, and give the signal's status."""
    for signum in STOP_SIGNALS:  # a second signal while the locks are released is not another traceback
        signal.signal(signum, signal.SIG_IGN)
    if "dsl_cli.outputs" in sys.modules:
        sys.modules["dsl_cli.outputs"].release_all()
    name = err.args[0] if isinstance(err, Interrupted) else "SIGINT"
    advice = getattr(err, "advice", None) or ("run the command again (a run or sweep that had started: "
                                              "`dsl run resume=FOLDER`)")
    print(f"\ndsl: interrupted ({name}); every file is whole: {printable(advice)}", file=sys.stderr)
    return err.exit_status if isinstance(err, Interrupted) else 130


def _dispatch(args: list[str]) -> int:
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    if args[0] in ("-V", "--version"):
        print(VERSION)
        return 0
    if args[0] in COMMANDS:
        from dsl_cli.outputs import settings_given

        try:
            with settings_given(args[1:]):
                return _command(args[0])(args[1:])
        except UserError as err:  # a command that let one through (`dsl sae`): one line, status 2
            return _fail(err)
        finally:  # the folders a command claimed (`dsl sae train`'s, `dsl adapter fit`'s) are given up
            if "dsl_cli.outputs" in sys.modules:
                sys.modules["dsl_cli.outputs"].release_all()
    return _fail(f"unknown command {args[0]!r}: the commands are {', '.join(COMMANDS)} (dsl --help says what each "
                 "does)")


if __name__ == "__main__":
    sys.exit(main())
