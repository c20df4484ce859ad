"""Same outputs before and after a refactor: every lens and study on the tiny models, run from two commits
(or a commit and the working tree), their CSVs and pictures compared file by file.

    python scripts/compare_commits.py dede459                 # that commit against the working tree
    python scripts/compare_commits.py dede459 HEAD --keep /tmp/compared

Each side is the commit's tree (`git archive`) put first on PYTHONPATH, run as `python -m dsl_cli.cli run
debug=tiny layer=1 images.limit=2 decode.top_k=2` with each lens (`lens=NAME`) and each study (`study=NAME`)
that both sides have. Then, per run folder:
- every CSV both sides wrote must hold the same rows on the columns both have (a column added on purpose is
  listed, not a difference);
- every decoded picture and `input.png` must be the same bytes;
- figures (plots, grids, heatmaps, looks) and pages are listed as same or changed: a figure may change on purpose.
Prints a table; exits 1 when a CSV or a picture differs, or a run fails on either side.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["debug=tiny", "layer=1", "images.limit=2", "decode.top_k=2"]
FIGURE_FOLDERS = ("plots", "grids", "heatmaps", "looks")


def tree_of(rev: str, into: Path) -> Path:
    """The files of commit `rev` (or the working tree for "worktree") in a folder: -> the folder."""
    if rev == "worktree":
        return ROOT
    archive = subprocess.run(["git", "archive", "--format=tar", rev, "dsl_cli"], cwd=ROOT, capture_output=True,
                             check=True).stdout
    into.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into


def names(tree: Path, group: str) -> set[str]:
    return {p.stem for p in (tree / "dsl_cli" / "configs" / group).glob("*.yaml")}


def run_case(tree: Path, case: str, out: Path) -> str:
    """One `dsl run` of the tree's code into `out`; -> "" or the end of its error output."""
    env = {**os.environ, "PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "dsl_cli.cli", "run", *COMMON, case, f"hydra.run.dir={out}"],
                          cwd=out.parent, env=env, capture_output=True, text=True, timeout=900)
    return "" if done.returncode == 0 else done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"


def read_rows(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames or []), list(reader)


def compare_csv(before: Path, after: Path) -> tuple[bool, str]:
    """(same on the shared columns, what differs or was added)."""
    if before.read_bytes() == after.read_bytes():
        return True, "same bytes"
    (old_columns, old), (new_columns, new) = read_rows(before), read_rows(after)
    shared = [c for c in old_columns if c in new_columns]
    same = len(old) == len(new) and all([o[c] for c in shared] == [n[c] for c in shared] for o, n in zip(old, new))
    added, removed = [c for c in new_columns if c not in old_columns], [c for c in old_columns if c not in new_columns]
    notes = ([f"added {', '.join(added)}"] if added else []) + ([f"REMOVED {', '.join(removed)}"] if removed else [])
    return same and not removed, ("same rows on the shared columns" if same else f"ROWS DIFFER ({len(old)} vs {len(new)})") + (
        "; " + "; ".join(notes) if notes else "")


def compare_run(before: Path, after: Path) -> tuple[list[tuple[str, str, bool]], bool]:
    """Rows (file, verdict, must match) for one run folder pair; -> (rows, all that must match does)."""
    rows, ok = [], True
    old = {p.relative_to(before).as_posix() for p in before.rglob("*") if p.is_file()}
    new = {p.relative_to(after).as_posix() for p in after.rglob("*") if p.is_file()}
    for name in sorted(old | new):
        if not name.endswith((".csv", ".png")):
            continue
        figure = name.split("/")[0] in FIGURE_FOLDERS
        if name not in old or name not in new:
            rows.append((name, "only after" if name not in old else "only before", not figure and name in old))
            ok &= figure or name not in old
            continue
        if name.endswith(".csv"):
            same, note = compare_csv(before / name, after / name)
        else:
            same = (before / name).read_bytes() == (after / name).read_bytes()
            note = "same bytes" if same else ("changed" if figure else "PICTURE DIFFERS")
        rows.append((name, note, not figure))
        ok &= same or figure
    return rows, ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("before", help="a commit (the outputs before the change)")
    parser.add_argument("after", nargs="?", default="worktree", help="a commit, or the working tree (default)")
    parser.add_argument("--keep", type=Path, default=None, help="keep both sides' run folders here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dsl-compare-") as scratch:
        work = args.keep or Path(scratch)
        trees = {side: tree_of(rev, work / "trees" / side) for side, rev in (("before", args.before),
                                                                            ("after", args.after))}
        cases = [f"lens={n}" for n in sorted(names(trees["before"], "lens") & names(trees["after"], "lens"))]
        cases += [f"study={n}" for n in sorted(names(trees["before"], "study") & names(trees["after"], "study"))]
        print(f"# {args.before} vs {args.after}: {' '.join(COMMON)}, {len(cases)} cases\n")
        print("| case | file | verdict |\n|---|---|---|")
        all_ok = True
        for case in cases:
            folders = {side: work / "runs" / side / case.replace("=", "_") for side in trees}
            errors = {}
            for side, tree in trees.items():
                folders[side].parent.mkdir(parents=True, exist_ok=True)
                errors[side] = run_case(tree, case, folders[side])
            if any(errors.values()):
                print(f"| {case} | (run) | FAILED: {errors} |")
                all_ok = False
                continue
            rows, ok = compare_run(folders["before"], folders["after"])
            all_ok &= ok
            for name, verdict, _ in rows:
                print(f"| {case} | {name} | {verdict} |")
        print(f"\n{'same outputs' if all_ok else 'OUTPUTS DIFFER'}: every CSV on its shared columns and every "
              "decoded picture and input.png; figures may change on purpose")
        return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
