"""The `dsl` command. It parses and dispatches; the work happens in `dsl_cli.run` and `dsl_cli.outputs`.

    dsl run [hydra overrides and flags...]    run the Hydra app (configs ship inside the package)
    dsl plot RUN_FOLDER                      redraw grids and heatmaps from a finished run's files
    dsl --version | --help
"""

from __future__ import annotations

import sys
from pathlib import Path

from dsl_cli import __version__
from dsl_cli.errors import UserError, bug_message, report

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
  dsl plot RUN_FOLDER        redraw grids and heatmaps from a run folder (or every run below a
                             folder, e.g. a sweep), without any model
  dsl --version
"""

def _fail(message: str) -> int:
    report(message)
    return 2


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
            return [f"hydra.run.dir={folder.resolve()}"]
    return []


def _run(args: list[str]) -> int:
    import hydra

    from dsl_cli import job
    from dsl_cli.config import register_configs
    from dsl_cli.outputs import release_all

    register_configs()
    try:
        extra = _resume_overrides(args)
    except UserError as err:
        return _fail(str(err))
    app = hydra.main(config_path="configs", config_name="run", version_base="1.3")(job.task)
    saved_argv = sys.argv
    sys.argv = ["dsl run", *_flags_first([*args, *extra])]
    try:
        app()
    finally:
        sys.argv = saved_argv
        release_all()
    return job.sweep_status()


def _plot(args: list[str]) -> int:
    if len(args) != 1 or args[0].startswith("-"):
        return _fail("usage: dsl plot RUN_FOLDER (a run, or a folder of runs such as a --multirun sweep)")
    from dsl_cli.outputs import redraw_folder, release_all

    try:
        drawn = redraw_folder(Path(args[0]))
    except UserError as err:
        return _fail(str(err))
    except Exception as err:  # noqa: BLE001 - a bug: one line, status 1
        report(bug_message(err))
        return 1
    finally:
        release_all()
    for folder, count in drawn.items():
        print(f"redrew {count} figures in {folder}")
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
    return _fail(f"unknown command {args[0]!r}: use `dsl run ...` or `dsl plot RUN_FOLDER` (see dsl --help)")


if __name__ == "__main__":
    sys.exit(main())
