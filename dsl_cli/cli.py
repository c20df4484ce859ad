"""The `dsl` command. It parses and dispatches; the work happens in `dsl_cli.run`, `dsl_cli.outputs` and
`dsl_cli.report`.

    dsl run [hydra overrides and flags...]    run the Hydra app (configs ship inside the package)
    dsl plot RUN_FOLDER                      redraw grids and heatmaps from a finished run's files
    dsl report FOLDER                        write the HTML pages of runs, studies and sweeps
    dsl --version | --help | run --help | plot --help | report --help
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from dsl_cli import __version__
from dsl_cli.errors import UserError
from dsl_cli.outputs import refuse_existing_run

USAGE = f"""dsl {__version__}: Diffusion Steering Lens for CLIP vision transformers, decoded with Kandinsky 2.2

usage:
  dsl run [OVERRIDES...]     run a lens; Hydra overrides and flags, e.g.
                             dsl run lens=steering layer=30
                             dsl run lens=diffusion layer=all
                             dsl run --multirun lens=steering layer=0,12,24,36 lens.alpha=1,4
                             dsl run debug=tiny              (tiny random models on the CPU, seconds)
                             dsl run resume=outputs/DATE/TIME  (complete an interrupted run)
                             dsl run --help                  (config groups and their choices)
                             dsl run --cfg job               (print the composed config)
  dsl plot RUN_FOLDER        redraw grids, heatmaps, study plots and pages from a run folder (or
                             every run below a folder, e.g. a sweep), without any model
  dsl report FOLDER          write or refresh the HTML page (index.html) of a run, study or sweep
                             folder, or of every one below a folder; they open from file://
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
page its jobs and their heatmaps. Pages open from file:// with no server and no network.
"""


def _fail(message: str) -> int:
    print(f"dsl: error: {message}", file=sys.stderr)
    return 2


_failed_jobs: list[str] = []  # sweep jobs refused for bad input (the sweep goes on; the exit status says so)


def _hydra_app(cfg) -> None:
    """The Hydra task: one job of `dsl run`. UserError becomes one line and exit status 2; in a sweep the
    other jobs still run (in this process's launcher) and the status is 2 at the end."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from dsl_cli.logs import route_library_logs
    from dsl_cli.run import run

    route_library_logs()  # after importing run: the libraries set up their loggers when imported
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    try:
        run(cfg, run_dir)
    except UserError as err:
        if hydra_cfg.verbose:
            raise
        if hydra_cfg.mode != RunMode.MULTIRUN:
            sys.exit(_fail(str(err)))
        _fail(f"job {hydra_cfg.job.num} ({run_dir}): {err}")
        _failed_jobs.append(str(run_dir))
    except KeyboardInterrupt:
        print(f"\ndsl: interrupted; finished pictures are kept: `dsl run resume={run_dir}` completes the run",
              file=sys.stderr)
        sys.exit(130)


# Hydra flags that take a value; `--info` takes one only when it is one of its choices.
_VALUE_FLAGS = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
                "--config-dir", "-cd", "--experimental-rerun"}
_INFO_CHOICES = {"all", "config", "defaults", "defaults-tree", "plugins", "searchpath"}


def _flags_first(args: list[str]) -> list[str]:
    """Hydra's argparse wants flags before overrides; users write `dsl run debug=tiny --multirun seed=0,1`."""
    flags, overrides, i = [], [], 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("-"):
            overrides.append(arg)
        else:
            flags.append(arg)
            takes_value = arg in _VALUE_FLAGS or (arg in ("--info", "-i") and i + 1 < len(args)
                                                   and args[i + 1] in _INFO_CHOICES)
            if takes_value and "=" not in arg and i + 1 < len(args):
                i += 1
                flags.append(args[i])
        i += 1
    return flags + overrides


# Overrides whose values are paths. `~` is expanded, as a shell does in `VAR=~/x` (but not in `a.b=~/x`), and a
# value that Hydra's override grammar refuses unquoted (a space, parentheses, `~` inside) is passed quoted.
PATH_KEYS = {"images.path", "encoder.checkpoint", "encoder.text_pretrained", "decoder.path", "resume",
             "hydra.run.dir", "hydra.sweep.dir"}


def _path_override(arg: str) -> str:
    """`images.path=~/my photos` -> `images.path='/home/me/my photos'`; other arguments as they are."""
    key, sep, value = arg.partition("=")
    if not sep or key.lstrip("+") not in PATH_KEYS or value[:1] in ("'", '"'):
        return arg
    value = os.path.expanduser(value)
    if _parses(f"{key}={value}") or ("'" in value and '"' in value):
        return f"{key}={value}"
    quote = '"' if "'" in value else "'"
    return f"{key}={quote}{value}{quote}"


def _parses(override: str) -> bool:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        OverridesParser.create().parse_override(override)
    except HydraException:  # the grammar's error
        return False
    return True


def _resume_overrides(args: list[str]) -> list[str]:
    """`resume=FOLDER` runs the job inside that folder and keeps its saved Hydra config untouched."""
    for arg in args:
        if arg.startswith("resume="):
            folder = Path(arg.split("=", 1)[1]).expanduser()
            if not (folder / ".hydra" / "config.yaml").is_file():
                raise UserError(f"resume={folder}: not a dsl run folder (no .hydra/config.yaml in it)")
            others = [a for a in args if a != arg and not a.startswith(("-", "hydra."))]
            if others:
                raise UserError(f"resume= completes a run with its saved config; drop the other overrides {others}")
            return [f"hydra.run.dir={folder.resolve()}", "hydra.output_subdir=null"]
    return []


def _check_output_root(args: list[str]) -> None:
    """Refuse, before Hydra writes its config there, an output folder that cannot be created (Hydra would
    print a traceback) or a hydra.run.dir that already holds a run (unless resuming it)."""
    target = Path("outputs")
    for arg in args:
        if arg.startswith(("hydra.run.dir=", "hydra.sweep.dir=")):
            target = Path(arg.split("=", 1)[1]).expanduser()
        if arg.startswith("hydra.run.dir=") and not any(a.startswith("resume=") for a in args):
            refuse_existing_run(target)
    existing = target
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise UserError(
            f"cannot write the output folder {target} ({existing} is not a writable folder); "
            "choose another with hydra.run.dir=..."
        )


def _run(args: list[str]) -> int:
    import hydra

    from dsl_cli.config import register_configs

    register_configs()
    try:
        extra = _resume_overrides(args)
        _check_output_root([*args, *extra])
    except UserError as err:
        return _fail(str(err))
    app = hydra.main(config_path="configs", config_name="run", version_base="1.3")(_hydra_app)
    saved_argv = sys.argv
    sys.argv = ["dsl run", *_flags_first([_path_override(arg) for arg in [*args, *extra]])]
    _failed_jobs.clear()
    try:
        app()
    finally:
        sys.argv = saved_argv
    return 2 if _failed_jobs else 0


def _plot(args: list[str]) -> int:
    if args in (["-h"], ["--help"]):
        print(PLOT_USAGE)
        return 0
    if len(args) != 1 or args[0].startswith("-"):
        return _fail("usage: dsl plot RUN_FOLDER (a run, or a folder of runs such as a --multirun sweep)")
    from dsl_cli.report import redraw_folder

    try:
        drawn = redraw_folder(Path(args[0]))
    except UserError as err:
        return _fail(str(err))
    for folder, count in drawn.items():
        print(f"redrew {count} figures in {folder}")
    return 0


def _report(args: list[str]) -> int:
    if args in (["-h"], ["--help"]):
        print(REPORT_USAGE)
        return 0
    if len(args) != 1 or args[0].startswith("-"):
        return _fail("usage: dsl report FOLDER (a run, study or sweep folder, or a folder of them)")
    from dsl_cli.report import write_pages

    try:
        pages = write_pages(Path(args[0]))
    except UserError as err:
        return _fail(str(err))
    for page in pages:
        print(f"wrote {page}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    if args[0] in ("-V", "--version"):
        print(f"dsl {__version__}")
        return 0
    if args[0] == "run":
        return _run(args[1:])
    if args[0] == "plot":
        return _plot(args[1:])
    if args[0] == "report":
        return _report(args[1:])
    return _fail(f"unknown command {args[0]!r}: use `dsl run ...`, `dsl plot RUN_FOLDER` or `dsl report FOLDER` "
                 "(see dsl --help)")


if __name__ == "__main__":
    sys.exit(main())
