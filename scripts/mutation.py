"""Mutation testing of dsl's core with mutmut: does the test suite fail when the method is wrong?

    nice -n 15 python scripts/mutation.py                  # every module below (hours on 2 cores)
    nice -n 15 python scripts/mutation.py encoder studies  # some of them
    nice -n 15 python scripts/mutation.py --minutes 60     # an hour's worth; then `--again` goes on
    python scripts/mutation.py --named                     # only the named planted bugs (docs/testing.md)

Scope (docs/testing.md): dsl_cli/encoder/, lenses, decoder, studies, and the functions of dsl_cli/run.py that
build the CSV rows, plan the decoding and resume. mutmut (a `dev` extra) mutates one function at a time and
runs only the tests that call it (it records which tests call which function in one traced pass first).
The work happens in a copy of the tree (default /tmp/dsl-mutation), never in the checkout: mutmut writes
a `mutants/` folder where it runs.

mutmut leaves decorated functions alone; in the copy, each `@torch.inference_mode()` is therefore moved
from the `def` to a re-wrap at the end of its module (`Cls.f = torch.inference_mode()(Cls.f)`), which
behaves the same, so that those functions are mutated too.

The score is (killed + timeout) / (mutants - equivalent), per module and overall; equivalent mutants are
listed, with the reason, in scripts/mutation_equivalent.txt. Survivors are printed with their diffs and
written to <workdir>/survivors.txt. Not part of CI.
"""

from __future__ import annotations

import argparse
import ast
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EQUIVALENT = ROOT / "scripts" / "mutation_equivalent.txt"
ENCODER_FILES = ("hooked", "loading", "reading", "preprocess", "openclip_api")  # dsl_cli/encoder/, less __init__
# What is mutated, per module: files, and which of their functions (None: all, less EXCLUDED).
# run.py: only the row bookkeeping (rows, decoding plan, resume); the rest is set-up, logging and manifest.
MODULES = {
    "encoder": ([f"dsl_cli/encoder/{name}.py" for name in ENCODER_FILES], None),
    "lenses": (["dsl_cli/lenses.py"], None),
    "decoder": (["dsl_cli/decoder.py"], None),
    "studies": (["dsl_cli/studies.py"], None),
    "run": (["dsl_cli/run.py"], ["_base_row", "score_images", "_score_batch", "plan_decoding", "decode_and_write",
                                 "_write_batch", "plan_extras", "start_csv", "sorted_rows", "_finish_rows"]),
}
EXCLUDED = {  # function -> why it is not mutated (docs/testing.md)
    "plot_head_importance": "drawing only (sizes, colours, labels); the figure tests check that it is drawn",
    "plot_overlay_removal": "drawing only (sizes, colours, labels); the figure tests check that it is drawn",
}
DETECTED = {"killed", "timeout", "segfault"}  # segfault: mutmut's name for a worker killed by a signal
UNDETECTED = {"survived", "no tests", "suspicious"}
REWRAPPED = ("torch.inference_mode()", "torch.no_grad()")
# The wrong methods that once went unnoticed (issue 11), planted one at a time by `--named`: (what, file,
# original text, planted text, the tests that must fail).
NAMED = [
    ("norm-mode delta without |x_L|", "dsl_cli/encoder/hooked.py",
     "return (alpha * size * unit).to(write.dtype)", "return (alpha * unit).to(write.dtype)",
     ["tests/test_formulas.py::test_steering_delta_hand_worked",
      "tests/test_formulas.py::test_closed_form_is_the_readout_of_x_final_plus_delta_computed_here",
      "tests/test_encoder.py::test_closed_form_steering_equals_hooked_pass_for_every_tiny_component"]),
    ("norm-mode delta with alpha - 1 for alpha", "dsl_cli/encoder/hooked.py",
     "return (alpha * size * unit).to(write.dtype)", "return ((alpha - 1.0) * size * unit).to(write.dtype)",
     ["tests/test_formulas.py::test_steering_delta_hand_worked",
      "tests/test_formulas.py::test_closed_form_is_the_readout_of_x_final_plus_delta_computed_here",
      "tests/test_encoder.py::test_closed_form_steering_equals_hooked_pass_for_every_tiny_component"]),
    ("guidance scale hard-coded to 4.0", "dsl_cli/decoder.py",
     "guidance_scale=guidance,", "guidance_scale=4.0,",
     ["tests/test_formulas.py::test_decode_equals_the_pipeline_at_the_same_guidance"]),
    ("Spearman computed as Pearson", "dsl_cli/studies.py",
     "rho, rho_p = stats.spearmanr(x, y)", "rho, rho_p = stats.pearsonr(x, y)",
     ["tests/test_formulas.py::test_spearman_is_one_on_monotone_non_linear_data",
      "tests/test_formulas.py::test_correlations_on_random_data_match_the_definitions_and_scipy"]),
    ("lens score as a dot product, not a cosine", "dsl_cli/lenses.py",
     "sim = torch.nn.functional.cosine_similarity(embeds.float(), clean, dim=-1)",
     "sim = (embeds.float() * clean).sum(-1)",
     ["tests/test_formulas.py::test_lens_score_is_the_cosine_written_here"]),
]


def patterns(module: str) -> list[str]:
    """mutmut name patterns for the module's functions: `pkg.mod.x_f__mutmut_*`, `pkg.mod.xǁClsǁf__mutmut_*`."""
    files, only = MODULES[module]
    out = []
    for name in files:
        dotted = name.removesuffix(".py").replace("/", ".")
        for owner, function in functions(ROOT / name):
            if function in EXCLUDED or (only is not None and function not in only):
                continue
            mangled = f"x\u01c1{owner}\u01c1{function}" if owner else f"x_{function}"
            out.append(f"{dotted}.{mangled}__mutmut_*")
    return out


def functions(path: Path) -> list[tuple[str, str]]:
    """(class or "", name) of the module's functions and methods (what mutmut mutates)."""
    out = []
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            out.append(("", node.name))
        elif isinstance(node, ast.ClassDef):
            out += [(node.name, f.name) for f in node.body if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))]
    return out


def copy_tree(workdir: Path) -> None:
    """The package, the tests, the scripts (a test runs one) and pyproject.toml (mutmut's configuration) into a
    fresh `workdir`."""
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache")
    for name in ("dsl_cli", "tests", "scripts"):
        shutil.copytree(ROOT / name, workdir / name, ignore=ignore)
    shutil.copy2(ROOT / "pyproject.toml", workdir / "pyproject.toml")
    for path in (workdir / "dsl_cli").rglob("*.py"):
        rewrap_decorators(path)


def sync_sources(workdir: Path) -> None:
    """Bring changed package files into `workdir`; mutmut makes the mutants of their changed functions afresh
    (`generate`): the results of the functions that did not change stay."""
    for source in (ROOT / "dsl_cli").rglob("*"):
        if source.is_dir() or "__pycache__" in source.parts:
            continue
        relative = source.relative_to(ROOT)
        copy = workdir / relative
        staged = workdir / "staged.tmp"
        shutil.copy2(source, staged)
        if source.suffix == ".py":
            rewrap_decorators(staged)
        if copy.exists() and copy.read_bytes() == staged.read_bytes():
            staged.unlink()
            continue
        print(f"changed since the last run: {relative}")
        staged.replace(copy)


def generate(workdir: Path) -> None:
    """Make the mutants of what changed in `workdir` (mutmut does this at the start of `mutmut run`; done here
    first so that the new mutants can be named)."""
    steps = ("from mutmut.__main__ import create_mutants; from mutmut.utils.file_utils import copy_src_dir, "
             "copy_also_copy_files, setup_source_paths; copy_src_dir(); copy_also_copy_files(); "
             "setup_source_paths(); create_mutants(1)")
    subprocess.run([sys.executable, "-c", steps], cwd=workdir, env=_env(), check=True, capture_output=True)


def rewrap_decorators(path: Path) -> None:
    """Move `@torch.inference_mode()` (and `@torch.no_grad()`) from each def to the end of the module."""
    source = path.read_text()
    tree = ast.parse(source)
    drop, wraps = set(), []

    def visit(body: list[ast.stmt], owner: str) -> None:
        for node in body:
            if isinstance(node, ast.ClassDef):
                visit(node.body, f"{owner}{node.name}.")
            elif isinstance(node, ast.FunctionDef) and len(node.decorator_list) == 1:
                decorator = node.decorator_list[0]
                text = ast.unparse(decorator)
                if text in REWRAPPED and decorator.lineno == decorator.end_lineno:
                    drop.add(decorator.lineno)
                    wraps.append(f"{owner}{node.name} = {text}({owner}{node.name})")

    visit(tree.body, "")
    if not wraps:
        return
    lines = [line for n, line in enumerate(source.splitlines(), 1) if n not in drop]
    path.write_text("\n".join(lines + ["", "", *wraps]) + "\n")


def named(workdir: Path) -> int:
    """Plant each NAMED bug in a copy of the tree and check that every test listed for it fails."""
    copy_tree(workdir)
    env = {**os.environ, "PYTHONPATH": str(workdir), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    missed = 0
    for what, name, original, planted, tests in NAMED:
        path = workdir / name
        source = path.read_text()
        if source.count(original) != 1:
            print(f"{what}: `{original}` is not (once) in {name}; update NAMED in scripts/mutation.py")
            missed += 1
            continue
        path.write_text(source.replace(original, planted))
        for test in tests:
            done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test],
                                  cwd=workdir, env=env, capture_output=True, text=True)
            caught = done.returncode == 1
            missed += not caught
            print(f"{'caught' if caught else 'MISSED'}: {what}: {test} (pytest status {done.returncode})")
        path.write_text(source)
    return 1 if missed else 0


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the mutated copy, not the checkout
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONHASHSEED="0")
    return env


def mutmut(workdir: Path, *args: str, capture: bool = False) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "mutmut", *args]
    return subprocess.run(command, cwd=workdir, env=_env(), text=True, capture_output=capture)


def run_for(workdir: Path, minutes: float | None, *args: str) -> int:
    """`mutmut run ARGS`, stopped (with its workers) after `minutes` if given: every mutant tested so far keeps
    its result, and `--again` goes on from there. Its exit status, or 0 when it was stopped."""
    with subprocess.Popen([sys.executable, "-m", "mutmut", "run", *args], cwd=workdir, env=_env(),
                          start_new_session=True) as process:
        try:
            return process.wait(timeout=None if minutes is None else 60 * minutes)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait()
            print("\nstopped at the time limit (--minutes): `--again` tests the mutants not reached", file=sys.stderr)
            return 0


def load_equivalent() -> dict[str, str]:
    """Mutant name -> why it is equivalent (lines `NAME  # reason`; blank lines and `#` lines skipped)."""
    out = {}
    for line in EQUIVALENT.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, reason = line.partition("#")
            out[name.strip()] = reason.strip()
    return out


def results(workdir: Path) -> dict[str, str]:
    """Mutant name -> mutmut's status, from its `.meta` files."""
    sys.path.insert(0, str(workdir))
    from mutmut.stats import status_by_exit_code

    out = {}
    for meta in (workdir / "mutants").rglob("*.meta"):
        for name, code in json.loads(meta.read_text())["exit_code_by_key"].items():
            out[name] = status_by_exit_code[code]
    return out


def undetected(workdir: Path, modules: list[str], also: set[str] = frozenset()) -> list[str]:
    """Names of the mutants of `modules` that the last run in `workdir` left undetected (or in `also`), less
    the survivors listed as equivalent: retesting them cannot change their result (mutmut makes a changed
    function's mutants afresh, untested, so those are chosen again)."""
    equivalent = load_equivalent()
    return sorted(name for name, state in results(workdir).items()
                  if state in UNDETECTED | also and module_of(name, modules) is not None
                  and not (name in equivalent and state in UNDETECTED))


def module_of(name: str, modules: list[str]) -> str | None:
    from fnmatch import fnmatch

    for module in modules:
        if any(fnmatch(name, pattern) for pattern in patterns(module)):
            return module
    return None


def report(workdir: Path, modules: list[str], command: str) -> float:
    """Print the score per module and overall; write the survivors' diffs to <workdir>/survivors.txt."""
    status = results(workdir)
    equivalent = load_equivalent()
    counts: dict[str, dict[str, int]] = {m: {} for m in modules}
    survivors = []
    for name, state in sorted(status.items()):
        module = module_of(name, modules)
        if module is None:
            continue
        if name in equivalent:
            state = "equivalent" if state not in DETECTED else "killed (listed as equivalent)"
        counts[module][state] = counts[module].get(state, 0) + 1
        if state in UNDETECTED:
            survivors.append((name, state))
    print(f"\nmutation score, {datetime.date.today()}, `{command}`")
    total_detected = total_scored = 0
    for module, by_state in counts.items():
        detected = sum(n for s, n in by_state.items() if s in DETECTED or s.startswith("killed"))
        scored = detected + sum(n for s, n in by_state.items() if s in UNDETECTED)  # not run: not scored
        total_detected, total_scored = total_detected + detected, total_scored + scored
        score = 100.0 * detected / scored if scored else float("nan")
        timeouts = by_state.get("timeout", 0)
        low = 100.0 * (detected - timeouts) / scored if scored else float("nan")
        print(f"  {module:8s} {score:6.2f} %  ({detected}/{scored}; {low:.2f} % if every timeout were a survivor)  "
              + ", ".join(f"{s}: {n}" for s, n in sorted(by_state.items())))
    overall = 100.0 * total_detected / total_scored if total_scored else float("nan")
    print(f"  {'all':8s} {overall:6.2f} %  ({total_detected}/{total_scored})")
    with open(workdir / "survivors.txt", "w") as out:
        for name, state in survivors:
            diff = mutmut(workdir, "show", name, capture=True).stdout
            out.write(f"## {name} ({state})\n{diff}\n")
    print(f"  {len(survivors)} undetected mutants (diffs in {workdir / 'survivors.txt'})")
    for name, state in survivors:
        print(f"    {state}: {name}")
    return overall


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("modules", nargs="*", help=f"some of {', '.join(MODULES)} (default: all)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/dsl-mutation"))
    parser.add_argument("--jobs", type=int, default=3, help="mutants tested at once (default 3)")
    parser.add_argument("--named", action="store_true", help="only plant the named bugs and run their tests")
    parser.add_argument("--again", action="store_true",
                        help="test the last run's undetected mutants again with the checkout's current tests")
    parser.add_argument("--survivors", action="store_true",
                        help="with --again: only the undetected mutants and timeouts, not those never tested")
    parser.add_argument("--report-only", action="store_true", help="score the last run in --workdir again")
    parser.add_argument("--minutes", type=float, help="stop testing after this many minutes and score what was "
                        "tested (the rest is listed as not checked; `--again` goes on)")
    args = parser.parse_args(argv)
    modules = args.modules or list(MODULES)
    unknown = sorted(set(modules) - set(MODULES))
    if unknown:
        parser.error(f"unknown module {', '.join(unknown)}: choose from {', '.join(MODULES)}")
    if args.named:
        return named(args.workdir)
    command = "python scripts/mutation.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.again:  # the last run's survivors, timeouts, the mutants it did not reach and those of changed
        sync_sources(args.workdir)  # functions, with today's tests
        for target in (args.workdir, args.workdir / "mutants"):
            for name in ("tests", "scripts"):  # the tests, and the scripts some of them run or import
                shutil.rmtree(target / name, ignore_errors=True)
                shutil.copytree(ROOT / name, target / name, ignore=shutil.ignore_patterns("__pycache__"))
            shutil.copy2(ROOT / "pyproject.toml", target / "pyproject.toml")
        generate(args.workdir)
        # Two passes: timeouts count as detected already, and mutmut tests in its own order (the source's), so
        # the undetected and untested go first, and a short retest spends its minutes on what can change.
        first = undetected(args.workdir, modules, also=set() if args.survivors else {"not checked"})
        passes = [first, [n for n in undetected(args.workdir, modules, also={"timeout"}) if n not in first]]
    elif not args.report_only:
        copy_tree(args.workdir)
        passes = [[p for m in modules for p in patterns(m)]]
    if not args.report_only:
        deadline = None if args.minutes is None else time.monotonic() + 60 * args.minutes
        for chosen in passes:
            left = None if deadline is None else (deadline - time.monotonic()) / 60
            if not chosen or (left is not None and left <= 0):
                continue
            status = run_for(args.workdir, left, "--max-children", str(args.jobs), *chosen)
            if status:
                print(f"mutmut stopped with status {status}", file=sys.stderr)
                return status
    score = report(args.workdir, modules, command.strip())
    return 0 if score >= 95.0 else 1


if __name__ == "__main__":
    sys.exit(main())
