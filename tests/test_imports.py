"""Imports: what each command loads, and how the modules of dsl_cli import one another.

- The light commands (`dsl --help`, `dsl COMMAND --help`, `dsl report`, `dsl plot`, `dsl merge`, and every
  script's `--help`) work in a process where the model libraries cannot be imported at all: a `sys.meta_path`
  finder, installed before anything else, refuses torch, torchvision, diffusers, open_clip and transformers.
  They read files and draw with matplotlib; a model library there costs seconds of start-up (issue 31).
- Every module of dsl_cli imports alone (an import that works only after another module has been imported
  first is a hidden circle or a missing import): the light ones in a fresh interpreter, where they import no
  model library; the others in a child forked from an interpreter that has imported the third-party
  libraries and no module of dsl_cli.
- The import graph of dsl_cli, read with `ast` (imports inside functions included), has no circle (issue 32).
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import zygote  # dsl processes forked after the model libraries' imports (tests/zygote.py)

pytestmark = pytest.mark.own_process

ROOT = Path(__file__).parents[1]
PACKAGE = ROOT / "dsl_cli"
SCRIPTS = sorted(p for p in (ROOT / "scripts").glob("*.py") if 'if __name__ == "__main__"' in p.read_text())
MODEL_LIBRARIES = ("torch", "torchvision", "diffusers", "open_clip", "transformers")

# Run first in every light process: any import of a model library fails, wherever it comes from.
NO_MODEL_LIBRARIES = f"""
import sys

class NoModelLibraries:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {MODEL_LIBRARIES!r}:
            raise ImportError(f"{{name}}: a light command imported a model library")
        return None

sys.meta_path.insert(0, NoModelLibraries())
"""
DSL_MAIN = NO_MODEL_LIBRARIES + "from dsl_cli.cli import main\nsys.exit(main(sys.argv[1:]))\n"
SCRIPT_MAIN = NO_MODEL_LIBRARIES + ("import runpy\nscript = sys.argv[1]\nsys.argv = sys.argv[1:]\n"
                                   "sys.path.insert(0, str(__import__('pathlib').Path(script).parent))\n"
                                   "runpy.run_path(script, run_name='__main__')\n")
# modules that the light commands import: none of them may import a model library, even alone
LIGHT_MODULES = {"dsl_cli", "dsl_cli.cli", "dsl_cli.config", "dsl_cli.errors", "dsl_cli.components", "dsl_cli.logs",
                 "dsl_cli.outputs", "dsl_cli.figures", "dsl_cli.report", "dsl_cli.sweeps", "dsl_cli.job",
                 "dsl_cli.weights", "dsl_cli.images", "dsl_cli.study_registry", "dsl_cli.libraries"}


STARTUP_LIBRARIES = ("open_clip", "torchvision", "transformers", "diffusers", "scipy.stats", "matplotlib", "timm")


def test_a_run_imports_each_model_library_with_its_model(tmp_path: Path) -> None:
    """Start-up (manifest `seconds.startup`, the GPU issue's "to the first model load") is Python, Hydra and
    torch: when the first stage begins, none of the model libraries or the slower helpers is imported; each
    comes with the model or stage that needs it (open_clip with the encoder). diffusers (1.5 to 3 s) comes with
    the first decoder: two jobs without decoding run to the end with any import of it refused (the first
    records its start-up, the second, which started with the process, does not), leaving no model alive; one
    that decodes imports it (and frees its decoder as well)."""
    guard = NO_MODEL_LIBRARIES.replace(repr(MODEL_LIBRARIES), repr(("diffusers",)))
    code = guard + ("import gc, json, weakref\nimport torch\nfrom dsl_cli import run\nseen, made = [], []\n"
                    "original, build = run._run_stages, torch.nn.Module.__init__\n"
                    "def stages(*args, **kwargs):\n"
                    f"    seen.append([m for m in {STARTUP_LIBRARIES!r} if m in sys.modules])\n"
                    "    return original(*args, **kwargs)\n"
                    "def noted(self, *args, **kwargs):\n    build(self, *args, **kwargs)\n"
                    "    made.append(weakref.ref(self))\n"
                    "run._run_stages, torch.nn.Module.__init__ = stages, noted\n"
                    "from dsl_cli.cli import main\ncode = main(sys.argv[1:])\ngc.collect()\n"
                    "kept = sorted({type(m()).__name__ for m in made if m() is not None and list(m().parameters())})\n"
                    "print(json.dumps([code, seen, 'open_clip' in sys.modules, len(made), kept]))\n")
    args = ["run", "debug=tiny", "lens=direct", "images.limit=1", "layer=1"]
    quiet = subprocess.run([sys.executable, "-c", code, *args, "--multirun", "decode.enabled=false", "seed=1,2",
                            "hydra.sweep.dir=a"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    status, seen, encoder_library, made, kept = json.loads(quiet.stdout.splitlines()[-1])
    assert status == 0 and len(seen) == 2 and seen[0] == [] and encoder_library, quiet.stderr[-3000:]
    # every model the jobs built is freed: open_clip's import, frozen inside job 0's encoder build, once kept
    # that build's frames alive, and that encoder with them (the import's garbage is collected before the freeze)
    assert made > 50 and kept == []
    assert f"{tmp_path / 'a' / '0'}: loading the tiny encoder on cpu" in quiet.stdout + quiet.stderr
    first, second = (json.loads((tmp_path / "a" / job / "manifest.json").read_text()) for job in "01")
    assert first["status"] == second["status"] == "complete"
    assert 0 < first["seconds"]["startup"] < 300 and list(first["seconds"])[0] == "startup"
    assert "startup" not in second["seconds"] and {"encoder", "lens"} <= set(second["seconds"])
    # a run that decodes imports diffusers with its decoder, and frees the decoder's models too
    unguarded = code.replace(guard, "import sys\n").replace("'open_clip' in sys.modules", "'diffusers' in sys.modules")
    assert "'diffusers' in sys.modules" in unguarded and "NoModelLibraries" not in unguarded
    decoding = subprocess.run([sys.executable, "-c", unguarded, *args, "decode.top_k=1", "decode.steps=1",
                               "hydra.run.dir=b"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    status, seen, decoder_library, made, kept = json.loads(decoding.stdout.splitlines()[-1])
    assert status == 0 and seen == [[]] and decoder_library, decoding.stderr[-3000:]
    assert made > 50 and kept == []
    assert json.loads((tmp_path / "b" / "manifest.json").read_text())["seconds"]["decode"] > 0


def test_only_dsl_s_own_processes_freeze_the_collector() -> None:
    """As a library (`import dsl_cli as dsl`, a notebook), dsl imports what it needs plainly: no `gc.freeze()`,
    which would keep the caller's objects from every later collection, and the collector left on. Its commands
    and jobs own their process (`own_the_collector`) and freeze what they import."""
    code = ("import gc, json\nimport dsl_cli\nfrom dsl_cli.libraries import import_frozen, own_the_collector\n"
            "import_frozen('fractions')\nlibrary = [gc.get_freeze_count(), gc.isenabled()]\n"
            "own_the_collector()\nimport_frozen('wave')\n"
            "print(json.dumps([library, gc.get_freeze_count() > 0, gc.isenabled()]))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.splitlines()[-1]) == [[0, True], True, True]


@pytest.mark.parametrize("command", [
    ["sae", "train", "debug=tiny", "layer=1", "train.epochs=1", "train.d_sae=64", "train.k=4", "train.out=out"],
    ["adapter", "fit", "debug=tiny", "adapter.readout=resid", "adapter.layer=3", "adapter.augment=1",
     "adapter.examples=0", "adapter.out=out"]], ids=["sae train", "adapter fit"])
def test_the_model_commands_import_their_libraries_frozen(command: list[str], tmp_path: Path) -> None:
    """`dsl sae train` and `dsl adapter fit` import the encoder's libraries as `dsl run` does (the collector
    off, then frozen: 1.5 to 2 s of each start): after the command, its hundreds of thousands of objects are
    frozen (without it, only the few of the command's own module)."""
    code = ("import gc, sys\nfrom dsl_cli.cli import main\ncode = main(sys.argv[1:])\n"
            "print(code, gc.get_freeze_count())\n")
    done = subprocess.run([sys.executable, "-c", code, *command], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    status, frozen = done.stdout.split()[-2:]
    assert status == "0" and int(frozen) > 400_000, done.stderr[-3000:]


def light(*args: str, cwd: Path, script: bool = False) -> subprocess.CompletedProcess:
    code = SCRIPT_MAIN if script else DSL_MAIN
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """A finished one-job --multirun of the tiny models (its job, `0/`, is an ordinary run folder), made by a
    `dsl` process of its own (forked after the libraries' imports: tests/zygote.py), not this one."""
    folder = tmp_path_factory.mktemp("light") / "sweep"
    made = zygote.run([zygote.DSL, "run", "--multirun", "debug=tiny", "images.limit=2", "decode.top_k=2",
                       f"hydra.sweep.dir={folder}"], cwd=folder.parent, capture_output=True, text=True, timeout=600)
    assert made.returncode == 0, made.stderr[-3000:]
    assert (folder / "0" / "similarity.csv").is_file() and (folder / "multirun.yaml").is_file()
    return folder


def test_the_guard_refuses_the_model_libraries(tmp_path: Path) -> None:
    """The finder works: `import torch` behind it fails, so the light tests below would see one."""
    result = subprocess.run([sys.executable, "-c", NO_MODEL_LIBRARIES + "import torch"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "torch: a light command imported a model library" in result.stderr


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["run", "--help"], ["plot", "--help"],
                                  ["merge", "--help"], ["report", "--help"], ["check", "--help"],
                                  ["adapter", "--help"], ["adapter", "fit", "--help"], ["sae", "--help"],
                                  ["sae", "train", "--help"]], ids=" ".join)
def test_help_needs_no_model_library(args: list[str], tmp_path: Path) -> None:
    result = light(*args, cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.strip() and result.stderr == "", result.stderr[-3000:]
    assert not (tmp_path / "outputs").exists()


@pytest.mark.parametrize("command,where", [("report", "0"), ("plot", "0"), ("merge", "."), ("report", "."),
                                           ("plot", ".")])
def test_commands_on_files_need_no_model_library(command: str, where: str, sweep: Path) -> None:
    """`dsl report`, `dsl plot` and `dsl merge` on a finished run and sweep, from their files alone."""
    result = light(command, str(sweep / where), cwd=sweep.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "imported a model library" not in result.stdout + result.stderr
    assert (sweep / where / "index.html").is_file()


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_help_needs_no_model_library(script: Path, tmp_path: Path) -> None:
    result = light(str(script), "--help", cwd=tmp_path, script=True)
    assert result.returncode == 0 and result.stdout.strip(), result.stderr[-3000:]


# ---------------------------------------------------------------- each module alone


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = sorted(module_name(p) for p in PACKAGE.rglob("*.py") if "configs" not in p.parts)
ALONE = "import importlib, sys; importlib.import_module(sys.argv[1]); print(sorted({m.split('.')[0] for m in sys.modules} & set(sys.argv[2:])))"
# The third-party libraries the other modules load (seconds each), imported once; then each dsl_cli module
# alone in a child forked from that interpreter, before which no dsl_cli module was imported: whether it
# imports alone depends on dsl_cli's own modules only. Prints {module: traceback or ""} as JSON.
FORKED_ALONE = """
import gc, importlib, json, os, sys, traceback
gc.disable()
for library in sys.argv[2:]:
    importlib.import_module(library)
gc.freeze()  # as dsl run does after its imports: no collection in a child walks the libraries' objects
gc.enable()
assert not any(m.split(".")[0] == "dsl_cli" for m in sys.modules)
found = {}
for name in sys.argv[1].split(","):
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        try:
            importlib.import_module(name)
            message = ""
        except BaseException:
            message = traceback.format_exc() or "failed"
        os.write(write, message.encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        message = pipe.read().decode()
    _, status = os.waitpid(pid, 0)
    found[name] = message if status == 0 else message + f"\\nthe child ended with status {status}"
print(json.dumps(found))
"""
PRELOADED = (*MODEL_LIBRARIES, "timm", "hydra", "omegaconf", "matplotlib.pyplot", "scipy.stats", "PIL.Image")


@pytest.fixture(scope="module")
def imported_alone(request) -> dict[str, subprocess.CompletedProcess]:
    """Each module that a selected test asks for, imported alone: the light ones each in a fresh interpreter
    of its own (they must not import a model library), the others forked from one interpreter that has
    imported only the third-party libraries (a fresh interpreter each would spend seconds importing torch)."""
    def fresh(name: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", ALONE, name, *MODEL_LIBRARIES], cwd=ROOT, capture_output=True,
                              text=True, timeout=300)

    wanted = sorted({item.callspec.params["name"] for item in request.session.items
                     if getattr(item, "originalname", "") == "test_each_module_imports_alone"})
    light_ones, heavy = [n for n in wanted if n in LIGHT_MODULES], [n for n in wanted if n not in LIGHT_MODULES]
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 1)) as pool:
        found = dict(zip(light_ones, pool.map(fresh, light_ones)))
    if heavy:
        forked = subprocess.run([sys.executable, "-c", FORKED_ALONE, ",".join(heavy), *PRELOADED], cwd=ROOT,
                                capture_output=True, text=True, timeout=600)
        assert forked.returncode == 0, forked.stderr[-3000:]
        found |= {name: subprocess.CompletedProcess([name], 1 if message else 0, "", message)
                  for name, message in json.loads(forked.stdout).items()}
    return found


def test_the_light_modules_are_modules() -> None:
    assert LIGHT_MODULES <= set(MODULES), LIGHT_MODULES - set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_each_module_imports_alone(name: str, imported_alone) -> None:
    result = imported_alone[name]
    assert result.returncode == 0, f"`import {name}` in a fresh interpreter fails:\n{result.stderr[-3000:]}"
    if name in LIGHT_MODULES:
        assert result.stdout.strip() == "[]", f"{name} imports {result.stdout.strip()}"


# ---------------------------------------------------------------- the import graph


def imports_of(path: Path) -> list[tuple[str, int]]:
    name = module_name(path)
    return imports_in(path.read_text(), name, name if path.name == "__init__.py" else name.rpartition(".")[0])


def imports_in(source: str, name: str, package: str) -> list[tuple[str, int]]:
    """(dsl_cli module, line) for every import in the source of module `name` (in `package`), at the top or
    inside a function: a module imported by name, or the module a `from X import name` takes `name` from
    (X.name itself where that is a module)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x, from .x import y
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                whole = f"{base}.{alias.name}"
                found.append((whole if whole in MODULES else base, node.lineno))
    return [(module, line) for module, line in found if module in MODULES and module != name]


def import_graph() -> dict[str, dict[str, int]]:
    """module -> {module it imports: the first line that does}."""
    graph: dict[str, dict[str, int]] = {}
    for path in PACKAGE.rglob("*.py"):
        if "configs" in path.parts:
            continue
        edges = graph.setdefault(module_name(path), {})
        for module, line in imports_of(path):
            edges.setdefault(module, line)
    return graph


def circles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in graph.get(node, {}):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                other = stack.pop()
                component.append(other)
                if other == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_graph_reader_sees_imports_inside_functions_and_circles() -> None:
    """The reader itself: a circle closed by an import inside a function is one."""
    graph = {"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 9}, "d": {"a": 1}}
    assert circles(graph) == [["a", "b", "c"]]
    source = ("from dsl_cli.encoder import loading\nfrom dsl_cli.encoder import HookedEncoder\nfrom . import errors\n"
              "from .figures import POOLED\nimport numpy\n\n\ndef late():\n    import dsl_cli.report as report\n")
    assert sorted(imports_in(source, "dsl_cli.studies", "dsl_cli")) == [
        ("dsl_cli.encoder", 2), ("dsl_cli.encoder.loading", 1), ("dsl_cli.errors", 3), ("dsl_cli.figures", 4),
        ("dsl_cli.report", 9)]


def test_the_modules_of_dsl_cli_import_one_another_without_a_circle() -> None:
    graph = import_graph()
    found = circles(graph)
    ties = ["; ".join(f"{a} -> {b} (line {graph[a][b]})" for a in circle for b in circle if b in graph[a])
            for circle in found]
    assert not found, "import circles:\n" + "\n".join(ties)

