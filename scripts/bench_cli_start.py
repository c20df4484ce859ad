"""Start-up of the light commands: how long `dsl --help`, `dsl COMMAND --help`, `dsl report`, `dsl plot`,
`dsl merge` and the scripts' `--help` take, each started afresh as a user starts it (the installed `dsl`, or
`python scripts/NAME.py`), the median of `--runs` runs; also the CPU seconds they spent (user + system, on a
loaded machine the steadier figure) and whether a model library (torch, diffusers, open_clip) was imported
(`-X importtime`, once per command). The goal (issue 31): under 1 s each.

Then the start-up of `dsl run debug=tiny` (issue 36: under 3 s to the first model load): the manifest's
`seconds.startup`, from the process's start to the run's first stage (Python, the config checked, torch
imported, the device ready; open_clip comes with the encoder), and the whole run's wall time.

    python scripts/bench_cli_start.py                     # makes a tiny one-job sweep first (tens of seconds)
    python scripts/bench_cli_start.py --sweep outputs/multirun/DATE/TIME --runs 7

The commands on files run on a finished sweep (`--sweep`; its job `0/` as the run), or on a tiny one made
in a temporary folder with `dsl run -m debug=tiny`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DSL = str(Path(sys.executable).with_name("dsl"))
MODEL_LIBRARIES = ("torch", "diffusers", "open_clip")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5, help="runs per command; the median is reported (default 5)")
    parser.add_argument("--sweep", type=Path, default=None,
                        help="a finished --multirun folder to run report, plot and merge on (default: a tiny one)")
    return parser.parse_args()


def commands(sweep: Path) -> list[tuple[str, list[str]]]:
    """(what the table calls it, argv) for every light command."""
    dsl = [(f"dsl {' '.join(args)}", [DSL, *args]) for args in
           (["--help"], ["run", "--help"], ["plot", "--help"], ["merge", "--help"], ["report", "--help"],
            ["check", "--help"], ["adapter", "--help"], ["sae", "--help"])]
    on_files = [("dsl report RUN", [DSL, "report", str(sweep / "0")]), ("dsl plot RUN", [DSL, "plot", str(sweep / "0")]),
                ("dsl merge SWEEP", [DSL, "merge", str(sweep)]), ("dsl report SWEEP", [DSL, "report", str(sweep)])]
    scripts = [(f"scripts/{p.name} --help", [sys.executable, str(p), "--help"])
               for p in sorted((ROOT / "scripts").glob("*.py")) if 'if __name__ == "__main__"' in p.read_text()]
    return dsl + on_files + scripts


def timed(argv: list[str]) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds of the child, exit status) of one run."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), done.returncode


def model_libraries(argv: list[str]) -> list[str]:
    """The model libraries the command imports (from `-X importtime`'s list of every import)."""
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPROFILEIMPORTTIME": "1"})
    names = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    return [name for name in MODEL_LIBRARIES if name in names]


def make_sweep(folder: Path) -> Path:
    sweep = folder / "sweep"
    print(f"making a tiny one-job sweep in {sweep} ...", flush=True)
    subprocess.run([DSL, "run", "--multirun", "debug=tiny", "images.limit=2", "decode.top_k=2",
                    f"hydra.sweep.dir={sweep}"], cwd=folder, check=True, capture_output=True, timeout=900)
    return sweep


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        sweep = args.sweep or make_sweep(Path(scratch))
        print(f"# {args.runs} runs each; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
        print("| command | median wall (s) | min wall (s) | median CPU (s) | model libraries imported |")
        print("|---|---|---|---|---|")
        for name, argv in commands(sweep):
            times = [timed(argv) for _ in range(args.runs)]
            walls, cpus = [t[0] for t in times], [t[1] for t in times]
            libraries = ", ".join(model_libraries(argv)) or "none"
            failed = {t[2] for t in times} - {0}
            libraries += f"; FAILS (exit {', '.join(map(str, sorted(failed)))})" if failed else ""
            print(f"| {name} | {statistics.median(walls):.2f} | {min(walls):.2f} | {statistics.median(cpus):.2f} | "
                  f"{libraries} |", flush=True)
        run_startup(Path(scratch), args.runs)


def run_startup(folder: Path, runs: int) -> None:
    """`dsl run debug=tiny`, `runs` times: its manifest's start-up seconds and its wall time."""
    startups, walls = [], []
    for i in range(runs):
        wall, _, code = timed([DSL, "run", "debug=tiny", f"hydra.run.dir={folder / f'run{i}'}"])
        if code != 0:
            raise SystemExit(f"dsl run debug=tiny failed (exit {code})")
        startups.append(json.loads((folder / f"run{i}" / "manifest.json").read_text())["seconds"]["startup"])
        walls.append(wall)
    print("\n| `dsl run debug=tiny` | median (s) | min (s) | max (s) |\n|---|---|---|---|")
    for name, values in (("start-up to the first stage (manifest seconds.startup)", startups),
                         ("wall, start to exit", walls)):
        print(f"| {name} | {statistics.median(values):.2f} | {min(values):.2f} | {max(values):.2f} |", flush=True)


if __name__ == "__main__":
    main()
