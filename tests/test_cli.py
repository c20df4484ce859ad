"""The `dsl` console script: runs from any folder, Hydra's flags work, the schema rejects misspelt keys."""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import zygote
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from dsl_cli.config import register_configs
from helpers import dsl_in_process

DSL = str(Path(sys.executable).parent / "dsl")
CONFIGS = Path(__file__).parents[1] / "dsl_cli" / "configs"


def dsl(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """The installed console script, as a user runs it, in a process of its own (forked after the model
    libraries' imports: tests/zygote.py; test_imports.py checks what a fresh one imports)."""
    return zygote.run([DSL, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def run_folders(root: Path) -> list[Path]:
    return sorted(p.parent.parent for p in (root / "outputs" / "debug").glob("*/*/.hydra/config.yaml"))


def test_version_and_help_answer_without_a_model(tmp_path: Path) -> None:
    version = dsl("--version", cwd=tmp_path, timeout=60)
    assert version.returncode == 0 and version.stdout.startswith("dsl ")
    usage = dsl("--help", cwd=tmp_path, timeout=60)
    assert usage.returncode == 0 and "dsl run" in usage.stdout and "dsl plot" in usage.stdout
    hydra_help = dsl("run", "--help", cwd=tmp_path, timeout=60)
    assert hydra_help.returncode == 0 and "lens: " in hydra_help.stdout and "steering" in hydra_help.stdout
    plot_help = dsl("plot", "--help", cwd=tmp_path, timeout=60)
    assert plot_help.returncode == 0 and plot_help.stdout.startswith("usage: dsl plot RUN_FOLDER")
    assert plot_help.stderr == ""
    assert not (tmp_path / "outputs").exists()


def test_version_and_help_import_no_model_library() -> None:
    code = ("import sys; from dsl_cli.cli import main; main(['--version']); main(['--help']); "
            "print(sorted({'torch', 'open_clip', 'diffusers'} & set(sys.modules)))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip().endswith("[]"), result.stdout + result.stderr


def test_unknown_command_is_one_line_and_status_2(tmp_path: Path) -> None:
    result = dsl("frobnicate", cwd=tmp_path, timeout=60)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_run_tiny_from_outside_the_repository(tmp_path: Path) -> None:
    """The console script, from a folder outside the repository (the configs ship in the package); one
    sample photo is enough to show every stage ran (decoded pictures included)."""
    result = dsl("run", "debug=tiny", "images.limit=1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    (folder,) = run_folders(tmp_path)
    saved = OmegaConf.load(folder / ".hydra" / "config.yaml")
    assert saved.encoder.source == "tiny" and saved.decode.steps == 2
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    # debug=tiny keeps the default layer 30 and clamps it to the tiny ViT's last layer, with a warning
    assert manifest["config"]["layer"] == 30 and manifest["config"]["clamp_to_model"] is True
    assert "layer=30 is outside this model" in result.stdout + result.stderr
    components = {line.split(",")[2] for line in (folder / "similarity.csv").read_text().splitlines()[1:]}
    assert components == {"L03H00", "L03H01", "L03H02", "L03H03"}


def test_multirun_leaves_one_folder_per_job(tmp_path: Path, monkeypatch, capsys) -> None:
    """Hydra's line for each job is indented with a tab, which the terminal's escaping showed as `\\t`."""
    code, out, err = dsl_in_process(["run", "debug=tiny", "decode.enabled=false", "--multirun", "seed=0,1"],
                                    tmp_path, monkeypatch, capsys, out=True)
    assert code == 0, err
    assert "[HYDRA] \t#1 : debug=tiny decode.enabled=False seed=1\n" in out + err and "\\t" not in out + err
    jobs = sorted((tmp_path / "outputs" / "debug" / "multirun").glob("*/*/*/.hydra/config.yaml"))
    assert len(jobs) == 2
    assert sorted(OmegaConf.load(j).seed for j in jobs) == [0, 1]
    for job in jobs:
        assert json.loads((job.parent.parent / "manifest.json").read_text())["status"] == "complete"


def test_misspelt_key_fails_at_compose_time(tmp_path: Path) -> None:
    start = time.perf_counter()
    result = dsl("run", "debug=tiny", "lens.no_such_key=1", cwd=tmp_path, timeout=60)
    elapsed = time.perf_counter() - start
    assert result.returncode == 2
    assert result.stderr == "dsl: error: lens.no_such_key: no such setting (misspelt? `dsl run --cfg job` prints " \
        "every setting)\n"
    assert elapsed < 30  # loose: proves nothing heavy ran, not a timing goal
    assert not list(tmp_path.glob("outputs/**/manifest.json")), "a model was loaded or a run started"


def test_wrong_type_fails_at_compose_time(tmp_path: Path, monkeypatch, capsys) -> None:
    code, err = dsl_in_process(["run", "debug=tiny", "decode.steps=many"], tmp_path, monkeypatch, capsys)
    assert code == 2 and "could not be converted to Integer" in err


def _choices() -> list[tuple[str, str]]:
    return sorted((p.parent.name, p.stem) for p in CONFIGS.glob("*/*.yaml"))


def test_every_group_has_configs() -> None:
    groups = {group for group, _ in _choices()}
    assert {"encoder", "decoder", "lens", "images", "decode", "study", "launcher", "sweep", "experiment",
            "debug"} <= groups


@pytest.mark.parametrize(("group", "choice"), _choices())
def test_every_config_composes(group: str, choice: str) -> None:
    register_configs()
    with initialize_config_module(config_module="dsl_cli.configs", version_base="1.3"):
        cfg = compose(config_name="run", overrides=[f"{group}={choice}"])
    assert set(cfg) >= {"encoder", "decoder", "lens", "images", "decode", "layer", "head", "component", "seed"}
    if group not in ("experiment", "debug", "launcher", "sweep"):  # those set keys anywhere (@package _global_)
        # every key the file sets made it into the composed config with the file's value
        # (as written: decode's defaults are interpolations of the decoder's, `${decoder.steps}`)
        expected = OmegaConf.to_container(OmegaConf.load(CONFIGS / group / f"{choice}.yaml"))
        got = OmegaConf.to_container(cfg[group])
        for key, value in expected.items():
            if key != "defaults" and value != "???":
                assert got[key] == value, (group, choice, key)


def test_help_piped_into_a_reader_that_leaves_early_is_quiet(tmp_path: Path) -> None:
    """`dsl run --help | head -1`: no BrokenPipeError traceback when the reader stops reading."""
    import shlex

    command = f"{shlex.quote(str(Path(sys.executable).with_name('dsl')))} run --help | head -1"
    result = subprocess.run(["bash", "-o", "pipefail", "-c", command], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.startswith("dsl run"), result
    assert "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr, result.stderr


@pytest.mark.own_process
def test_a_stop_signal_once_the_command_is_done_ends_it_quietly_with_its_status() -> None:
    """Ctrl-C just after a command's work, during Python's shutdown (torch's atexit code, tenths of a second
    after a run), was a traceback with exit status 0. The console script's call, `sys.exit(main())`, with
    Ctrl-C sent as main returns and a SIGTERM from an atexit hook: nothing printed, the command's status.
    In this process (argv given), main puts the handlers it replaced back."""
    import signal

    from dsl_cli import cli

    script = ("import atexit, os, signal, sys\nfrom dsl_cli.cli import main\nstatus = main()\n"
              "atexit.register(os.kill, os.getpid(), signal.SIGTERM)\nos.kill(os.getpid(), signal.SIGINT)\n"
              "sys.exit(status)\n")
    result = subprocess.run([sys.executable, "-c", script, "--version"], capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout, result.stderr) == (0, f"{cli.VERSION}\n", ""), result
    handlers = [signal.getsignal(signum) for signum in cli.STOP_SIGNALS]
    assert cli.main(["--version"]) == 0 and [signal.getsignal(signum) for signum in cli.STOP_SIGNALS] == handlers


@pytest.mark.parametrize("args, said", [
    (["--frob"], "unknown flag --frob"),
    (["debug=tiny", "--cfg", "bogus"], "argument --cfg/-c: invalid choice: 'bogus'"),
    (["debug=tiny", "--cfg"], "argument --cfg/-c: expected one argument"),
    (["--resolve=1", "--cfg", "job"], "argument --resolve: ignored explicit argument '1'"),
])
def test_a_bad_flag_of_run_is_one_line_naming_the_flags(args: list[str], said: str, tmp_path: Path, monkeypatch,
                                                        capsys) -> None:
    """Hydra's argparse refusal was its usage (6 lines) and `dsl run: error: ...`."""
    code, err = dsl_in_process(["run", *args], tmp_path, monkeypatch, capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith(f"dsl: error: dsl run: {said}"), err
    assert "--multirun/-m" in err and "--cfg/-c" in err, err


def test_info_without_a_value_leaves_the_setting_after_it_alone(tmp_path: Path, monkeypatch, capsys) -> None:
    """`dsl run --info debug=tiny`: Hydra's parser took `debug=tiny` for the value of --info (its usage and
    "invalid choice"); and a bad setting after it was Hydra's traceback, unchecked."""
    code, out, err = dsl_in_process(["run", "--info", "debug=tiny"], tmp_path, monkeypatch, capsys, out=True)
    assert code == 0 and "Installed Hydra Plugins" in out and "outputs_root: outputs/debug" in out, out + err
    code, err = dsl_in_process(["run", "--info", "bogus"], tmp_path, monkeypatch, capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith("dsl: error: bogus: missing EQUAL"), err


def test_run_version_is_dsl_s(tmp_path: Path, monkeypatch, capsys) -> None:
    """`dsl run --version` printed `Hydra 1.3.8`."""
    from dsl_cli import cli

    for flag in ("--version", "--vers"):  # argparse takes an abbreviation too
        code, out, err = dsl_in_process(["run", "debug=tiny", flag], tmp_path, monkeypatch, capsys, out=True)
        assert (code, out, err) == (0, f"{cli.VERSION}\n", "")


CPU_JOB = OmegaConf.create({"device": "cpu", "resume": None})


@pytest.mark.parametrize("device, resume, begun", [("auto", None, True), ("cuda", None, True), ("cpu", None, False),
                                                   ("auto", "outputs/x", False)])
def test_a_job_begins_its_cuda_context_while_dsl_is_imported(monkeypatch, device, resume, begun) -> None:
    """job._load_run starts the CUDA context in a thread (devices.begin_device) once torch is imported and
    before dsl_cli.run is, for a job that may run on CUDA and is not a resumed run (whose saved config names
    its device); devices.start_device waits for that thread before the first stage."""
    import dsl_cli
    from dsl_cli import devices, job

    seen: list[tuple[str, bool]] = []
    release = threading.Event()

    def making() -> None:  # stands for the driver's start: still busy while dsl_cli.run is imported
        seen.append((threading.current_thread().name, "dsl_cli.run" in sys.modules))
        release.wait(5)

    monkeypatch.setattr(devices, "_STARTING", None)
    monkeypatch.setattr(devices, "_make_context", making)
    monkeypatch.delitem(sys.modules, "dsl_cli.run", raising=False)
    monkeypatch.delattr(dsl_cli, "run", raising=False)
    job._load_run(OmegaConf.create({"device": device, "resume": resume}))
    thread = devices._STARTING
    assert (thread is not None) == begun
    if begun:
        assert thread.is_alive() and seen == [("dsl-cuda-start", False)]
        release.set()
        devices.start_device(torch.device("cpu"))
        assert not thread.is_alive()
        job._load_run(OmegaConf.create({"device": device, "resume": resume}))
        assert devices._STARTING is thread  # a local sweep's next job starts none


def test_a_failed_cuda_start_in_the_thread_is_left_to_the_run(monkeypatch) -> None:
    """An error met making the context in the thread is swallowed there: `start_device` makes it again on
    the job's thread, where the error is reported as any other."""
    from dsl_cli import devices

    def broken() -> bool:
        raise RuntimeError("CUDA driver initialization failed")

    monkeypatch.setattr(torch.cuda, "is_available", broken)
    devices._make_context()


def test_a_jobs_first_import_runs_without_the_collector_then_freezes_what_it_made(monkeypatch) -> None:
    """job._load_run: the model libraries' objects are made with the garbage collector off, the garbage
    collected once (a full collection), and what is left frozen (no collection walks it again,
    in the run or in its forks); a second job's call changes neither, and a collector that was off stays off."""
    import dsl_cli
    from dsl_cli import job

    ran: list[tuple[str, int]] = []

    def noted(phase: str, info: dict) -> None:  # this thread's: a thread an earlier test left may collect too
        if threading.current_thread() is threading.main_thread():
            ran.append((phase, info["generation"]))

    def as_in_a_fresh_process() -> None:  # dsl_cli.run not imported yet; the module comes back after the test
        monkeypatch.delitem(sys.modules, "dsl_cli.run", raising=False)
        monkeypatch.delattr(dsl_cli, "run", raising=False)

    as_in_a_fresh_process()
    frozen = gc.get_freeze_count()
    gc.callbacks.append(noted)
    try:
        first = job._load_run(CPU_JOB)
        during, after_first = list(ran), gc.get_freeze_count()
        a_jobs_objects = [[n] for n in range(100)]  # a second job's call must not freeze these
        second = job._load_run(CPU_JOB)
    finally:
        gc.callbacks.remove(noted)
    assert during == [("start", 2), ("stop", 2)] and gc.isenabled(), (during, gc.isenabled())
    assert after_first > frozen
    assert second is first and gc.get_freeze_count() == after_first and len(a_jobs_objects) == 100
    as_in_a_fresh_process()
    gc.disable()
    try:
        job._load_run(CPU_JOB)
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_a_stop_during_the_collection_after_an_import_leaves_the_collector_on(tmp_path, monkeypatch) -> None:
    """A stop signal raises where it lands, here in the collection of a first import's garbage (0.1 to 0.3 s
    for a model library): the collector must be on again afterwards, in a process that lives on (a notebook's
    next cell, the next test)."""
    from dsl_cli import libraries

    (tmp_path / "dsl_test_fresh_module.py").write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(libraries, "_OWN_PROCESS", True)

    def stopped(generation: int = 2) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(gc, "collect", stopped)
    with pytest.raises(KeyboardInterrupt):
        libraries.import_frozen("dsl_test_fresh_module")
    assert gc.isenabled()
    monkeypatch.delitem(sys.modules, "dsl_test_fresh_module")


def test_garbage_older_than_a_frozen_import_is_collected_not_frozen(tmp_path, monkeypatch) -> None:
    """A run's garbage from before a library's import (here a cycle that a full collection had moved to the
    oldest generation while it was still in use) is collected by the import's freeze, not frozen for good."""
    import weakref

    from dsl_cli import libraries

    class Node:
        pass

    (tmp_path / "dsl_test_later_module.py").write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(libraries, "_OWN_PROCESS", True)
    node = Node()
    node.self = node  # a cycle: only the collector frees it
    gc.collect()  # in use: it survives into the oldest generation
    old = weakref.ref(node)
    del node
    libraries.import_frozen("dsl_test_later_module")
    monkeypatch.delitem(sys.modules, "dsl_test_later_module")
    assert old() is None


def test_a_library_imported_after_the_logs_were_routed_is_routed_too(monkeypatch) -> None:
    """diffusers is imported when the first decoder is built, after the job routed the libraries' logs; as
    it is imported it adds its own handler to stderr (and stops propagating): `import_frozen` routes it
    again, and only in a job (a notebook's logging is left alone)."""
    import logging

    from dsl_cli import libraries, logs

    library = logging.getLogger("diffusers")
    monkeypatch.setattr(library, "handlers", [])
    monkeypatch.setattr(library, "propagate", True)

    real_import = libraries.importlib.import_module  # the importlib module itself: other names pass through

    def imported_anew(name: str, package=None):  # what diffusers' import does to its logger
        if not name.startswith("not_imported_yet"):
            return real_import(name, package)
        library.addHandler(logging.StreamHandler())
        library.propagate = False
        return sys.modules["json"]

    monkeypatch.setattr(libraries.importlib, "import_module", imported_anew)
    monkeypatch.setattr(logs, "_routing", False)
    libraries.import_frozen("not_imported_yet_a")
    assert len(library.handlers) == 1 and not library.propagate  # not in a job: left as the library set it
    monkeypatch.setattr(library, "handlers", [])
    monkeypatch.setattr(logs, "_routing", True)
    libraries.import_frozen("not_imported_yet_b")
    assert library.handlers == [] and library.propagate


def test_what_report_and_plot_did_is_printed_with_control_characters_escaped(tmp_path: Path, monkeypatch,
                                                                              capsys) -> None:
    """A run folder named with an escape sequence and a newline: `wrote ...` and `redrew ...` printed both
    raw (the terminal turned red, a line was forged), where the error lines escape them; so did the run's own
    log lines (`.../esc^[[31mRED: loading the tiny encoder`, `run complete: ...`)."""
    odd = tmp_path / "esc\x1b[31mRED\nnl"
    code, out, err = dsl_in_process(["run", "debug=tiny", "decode.enabled=false", "layer=1", "images.limit=1",
                                     f"hydra.run.dir='{odd}'"], tmp_path, monkeypatch, capsys, out=True)
    assert code == 0, err
    logged = [line for line in (out + err).splitlines() if "esc" in line]
    assert len(logged) >= 2 and "\x1b" not in out + err, out + err
    assert all("esc\\x1b[31mRED\\nnl" in line for line in logged), logged
    from dsl_cli import cli

    for command, done in (("report", "wrote "), ("plot", "redrew ")):
        assert cli.main([command, str(odd)]) == 0  # from tmp_path still (dsl_in_process keeps no stdout)
        out = capsys.readouterr().out
        assert "\x1b" not in out and out.count("\n") == 1 and out.startswith(done), out
        assert "esc\\x1b[31mRED\\nnl" in out, out


def test_messages_point_to_guide_sections_that_exist_and_name_every_command(tmp_path: Path, monkeypatch,
                                                                            capsys) -> None:
    """`dsl --help`, a run's `dsl check` advice and the missing-weights message sent readers to "README: Check
    your weights" and "README, Weights", sections of the user guide; `dsl bogus` named 4 of the 7 commands."""
    import re

    from dsl_cli import cli
    from dsl_cli.check import advice
    from dsl_cli.weights import HubWeights, _message

    guide = (Path(__file__).parents[1] / "docs" / "user-guide.md").read_text()
    headings = {line.lstrip("#").strip() for line in guide.splitlines() if line.startswith("#")}
    missing = _message([HubWeights("decoder", "org/repo", (("model.safetensors",),))], [], "offline")
    for text in (cli.USAGE, advice({"encoder": "unchecked"}), missing):
        flat = " ".join(text.split())  # the help wraps its lines
        cited = re.findall(r'docs/user-guide\.md, "([^"]+)"', flat)
        assert cited and set(cited) <= headings and "README" not in flat, flat
    code, err = dsl_in_process(["bogus"], tmp_path, monkeypatch, capsys)
    assert code == 2 and err.count("\n") == 1 and all(command in err for command in cli.COMMANDS), err
