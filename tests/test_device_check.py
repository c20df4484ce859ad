"""The device check: `scripts/device_check.sh --dry-run OUT_DIR` end to end on the CPU (every step, every
field of the JSON and the table), the goals computed from hand-made rows, and the time budget (a step that
does not fit is skipped; one that overruns is stopped and keeps what it measured)."""

from __future__ import annotations

import getpass
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))

import device_check  # noqa: E402  (a script beside the benchmarks, not a package)
from device_check_report import GOALS, compiled_vs_eager, markdown, summarise  # noqa: E402

HAS_CXX = bool(shutil.which(os.environ.get("CXX", "g++")))


def inductor_cache() -> str:
    """Where torch's inductor keeps its compiled kernels by default (torch/_inductor/runtime/cache_dir_utils.py):
    the user's folder in the temporary folder."""
    return os.path.join(tempfile.gettempdir(), "torchinductor_" + re.sub(r'[\\/:*?"<>|]', "_", getpass.getuser()))


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple[Path, dict]:
    """As documented (no `--work`): the steps' JSON in a temporary folder, removed at the end. The dry run's
    steps are forks of the check's process and once ran the exit functions they inherited, the folder's
    clean-up among them, so every step's results were gone before they were read."""
    root = tmp_path_factory.mktemp("device_check")
    (root / "tmp").mkdir()
    # inductor's cache stays where it was (it defaults to TMPDIR): the compile step then finds the graph
    # test_speed_paths compiled, or leaves it for it, instead of a minute of C++ compiling each time
    env = {**os.environ, "PYTHON": sys.executable, "TMPDIR": str(root / "tmp"),
           "TORCHINDUCTOR_CACHE_DIR": os.environ.get("TORCHINDUCTOR_CACHE_DIR") or inductor_cache()}
    result = subprocess.run([str(REPO / "scripts" / "device_check.sh"), "--dry-run", str(root / "out")],
                            env=env, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert not [p for p in (root / "tmp").iterdir() if p.name.startswith("dsl-device-check-")]
    return root / "out", json.loads((root / "out" / "device_check.json").read_text())


def test_dry_run_runs_every_step(dry_run) -> None:
    out, data = dry_run
    expected = {name: "ok" for name, _, _ in device_check.STEPS}
    if not HAS_CXX:
        expected["compile"] = "skipped"  # inductor needs a C++ compiler on the CPU
    assert {name: step["status"] for name, step in data["steps"].items()} == expected
    # five files at most: what comes back from the GPU machine is limited to eight
    assert sorted(p.name for p in out.iterdir()) == ["device_check.json", "device_check.log", "device_check.md",
                                                    "e2e_manifest.json", "gpu_tests.xml"]


def test_dry_run_fills_every_field(dry_run) -> None:
    out, data = dry_run
    env = data["environment"]
    assert env["mode"].startswith("dry-run") and env["torch"] and env["diffusers"] and env["open_clip_torch"]
    decoder = data["decoder"]
    for key in ("tflop_per_picture", "matmul_peak_tflops", "naive_pictures_per_s", "size", "steps"):
        assert decoder[key] > 0, key
    compiled = {("fp32", False, True)} if HAS_CXX else set()  # the compile step needs a C++ compiler here
    assert {r["step"] for r in decoder["rows"]} == {"decoder_main", "decode_only", "decoder_fp16", "channels_last",
                                                    *(["compile"] if HAS_CXX else [])}
    assert {(r["dtype"], r["channels_last"], r["compile"]) for r in decoder["rows"]} >= {
        ("bf16", False, False), ("fp16", False, False), ("fp32", True, False), *compiled}
    assert {r["dtype"] for r in data["encoder"]["rows"]} == {"fp32", "bf16"}
    run = data["end_to_end"]
    assert run["status"] == "complete" and run["decoded"] == run["pictures"] == 8
    assert {"encoder", "lens", "decoder", "decode", "write"} <= set(run["stage_seconds"])
    assert 0 <= run["decode_fit_s"] <= run["stage_seconds"]["decode"]  # on the CPU, nothing to probe
    assert data["decode_only"]["pictures"] == 8
    tests = data["gpu_tests"]
    assert tests["failed"] == 0 and tests["skipped"] >= 10  # no CUDA here: every gpu test collected, then skipped
    memory = data["memory"]["rows"]
    assert [(r["case"], r["exit"]) for r in memory] == [("logit_built", 0)]
    assert memory[0]["classifier"] == "built"
    for case in memory:  # each measured in its own process: python, torch and the libraries, tiny models
        assert 0.3 * 2**30 < case["host_peak_bytes"] < 4 * 2**30
        assert {"images", "encoder", "lens", "write"} <= set(case["stage_seconds"])
    assert "classifier" in memory[0]["stage_seconds"]
    figures = data["summary"]["figures"]
    assert all(figures.get(name) is not None for name in GOALS), figures
    table = (out / "device_check.md").read_text()
    for heading in ("## Goals", "## Decoder", "## Encoder", "## End to end", "## GPU tests", "## Memory", "## Steps"):
        assert heading in table
    assert "| logit_built | logit lens, classifier built" in table.split("## Memory")[1]
    goals = table.split("## Goals")[1].split("## Decoder")[0]
    assert "not measured" not in goals
    assert json.loads((out / "e2e_manifest.json").read_text())["status"] == "complete"
    assert "| fitting the batch: the probes, within decode (s) | " in table.split("## End to end")[1]
    assert "| wall less the stages: the page, the exit (s) | not measured |" not in table


def test_goals_are_computed_from_the_rows() -> None:
    """Hand-computed: 1.2 pictures/s x 173.2 TFLOP = 207.84 TFLOP/s = 25.98 % of 800; 6x the naive 0.2/s;
    a run of 100 s against 70 s of decoding for 80 pictures (35 s for 40 measured) = 1.4286, 4.2 s of it
    start-up; the compiled batch of 16 at 1.5 pictures/s against its eager 1.2 = 1.25."""
    row = dict(dtype="bf16", batch=16, pictures=16, pictures_per_s=1.2, channels_last=True, compile=False,
               warmup_s=1.0, peak_gib=30.0, step="channels_last", seconds=16 / 1.2)
    data = {
        "decoder": {"tflop_per_picture": 173.2, "matmul_peak_tflops": 800.0, "naive_pictures_per_s": 0.2,
                    "rows": [dict(row, pictures_per_s=0.5, channels_last=False, step="decoder_main"), row]},
        "decode_only": dict(row, pictures=40, seconds=35.0),
        "end_to_end": {"wall_s": 100.0, "pictures": 80, "status": "complete", "decode_fit_s": 0.42,
                       "stage_seconds": {"startup": 4.2, "encoder": 20.0, "decode": 72.0}},
        "encoder": {"rows": [{"dtype": "fp32", "cache_vs_plain": 1.04}, {"dtype": "bf16", "cache_vs_plain": 1.12,
                                                                         "cos_vs_fp32_min": 0.9993}]},
        "gpu_tests": {"passed": 12, "failed": 1, "skipped": 0},
        "memory": {"rows": [dict(case="steering", what="DSL", device="GPU", host_peak_bytes=2**30, exit=0, seconds=9,
                                 cuda_max_reserved=2**34, cuda_context=2**29, gpu_limit_gb=24),
                            dict(case="direct", what="direct lens", device="GPU", host_peak_bytes=2**30, exit=1,
                                 seconds=9, cuda_max_reserved=2**34, cuda_context=2**29, gpu_limit_gb=24),
                            dict(case="diffusion", what="diffusion lens", device="GPU", host_peak_bytes=2**30, exit=2,
                                 seconds=9, cuda_max_reserved=2**34, cuda_context=2**29, gpu_limit_gb=24)]},
    }
    summary = summarise(data)
    figures, met = summary["figures"], summary["goals_met"]
    assert "against eager at the same dtype, batch and memory format: not measured." in markdown(data)
    compiled = [dict(row, pictures_per_s=1.5, compile=True, step="compile"),
                dict(row, pictures_per_s=9.0, compile=True, batch=4, step="compile")]  # batch 4: no eager row
    with_compiled = {**data, "decoder": {**data["decoder"], "rows": data["decoder"]["rows"] + compiled}}
    assert "memory format: 1.25x the pictures/s." in markdown(with_compiled)
    assert figures["decoder_pct_of_matmul_peak"] == pytest.approx(25.98)
    assert figures["decoder_vs_naive"] == pytest.approx(6.0) and figures["decoder_best"] == "bf16, batch 16, channels_last"
    assert figures["run_wall_vs_decode_only"] == pytest.approx(100 / 70) and figures["run_startup_s"] == 4.2
    assert met == {"decoder_pct_of_matmul_peak": False, "decoder_vs_naive": False, "run_wall_vs_decode_only": False,
                   "run_startup_s": True, "encoder_cache_vs_plain_fp32": True, "encoder_cache_vs_plain_bf16": False,
                   "encoder_bf16_cosine_min": True, "gpu_tests_failed": False, "memory_cases_failed": False}
    assert figures["memory_cases_failed"] == 2  # of 3
    table = markdown({**data, "summary": summary})
    assert "| **no** |" in table and "| steering | DSL | GPU, capped at 24 GB | 1.00 GiB | 16.50 GiB | 24 GB | 0 | 9 |" in table
    assert "| wall less the stages: the page, the exit (s) | 3.8 |" in table  # 100 - (4.2 + 20 + 72)
    assert "| fitting the batch: the probes, within decode (s) | 0.42 |" in table


def test_nothing_measured_is_not_a_goal_met() -> None:
    summary = summarise({})
    assert set(summary["goals_met"].values()) == {None}
    assert "not measured" in markdown({"summary": summary})


def test_budget_skips_what_does_not_fit_and_stops_what_overruns(tmp_path: Path, monkeypatch) -> None:
    """A step over its time keeps the row it wrote before it was stopped; a step estimated beyond what is
    left does not start."""
    row = dict(dtype="bf16", batch=1, pictures=1, pictures_per_s=0.5, channels_last=False, compile=False,
               warmup_s=0.1, peak_gib=1.0, seconds=2.0)
    writes_then_hangs = ("import json, sys, time; json.dump({'rows': [%r]}, open(sys.argv[1], 'w')); "
                         "time.sleep(60)" % row)
    steps = [("decoder_main", 1, lambda check, name: [sys.executable, "-c", writes_then_hangs,
                                                      str(check.work / f"{name}.json")]),
             ("compile", 1000, lambda check, name: [sys.executable, "-c", "pass"])]
    monkeypatch.setattr(device_check, "STEPS", steps)
    out, work = tmp_path / "out", tmp_path / "work"
    out.mkdir(), work.mkdir()
    check = device_check.Check(out=out, work=work, dry=False, budget=4, log=out / "device_check.log")
    device_check.run_steps(check, None)
    assert check.data["steps"]["decoder_main"]["status"] == "timeout"
    assert check.data["steps"]["compile"]["status"] == "skipped"
    assert check.data["decoder"]["rows"] == [{**row, "step": "decoder_main"}]
    saved = json.loads((out / "device_check.json").read_text())
    assert saved["decoder"]["rows"][0]["pictures_per_s"] == 0.5 and saved["steps"]["compile"]["status"] == "skipped"


def test_the_goals_steps_come_first_and_compile_runs_at_the_decode_only_batch(tmp_path: Path) -> None:
    """The budget skips the last steps, so the figures the GPU issue still lacks come first. The compiled
    UNet runs at the batch the decode-only step found (the batch `dsl run` decodes at: the eager figure to
    set against it, and the configuration whose default it decides), in the faster memory format; 16 and
    NCHW before those are known."""
    order = [name for name, _, _ in device_check.STEPS]
    assert order[:6] == ["decoder_main", "decode_only", "compile", "end_to_end", "encoder", "gpu_tests"]
    check = device_check.Check(out=tmp_path, work=tmp_path, dry=False, budget=480, log=tmp_path / "log")

    def option(argv: list[str], name: str) -> str | None:
        return argv[argv.index(name) + 1] if name in argv else None

    argv = device_check.compile_argv(check, "compile")
    assert option(argv, "--batch-sizes") == "16" and "--channels-last" not in argv and "--compile" in argv
    row = dict(dtype="bf16", compile=False, warmup_s=1.0, peak_gib=50.0, seconds=48.0)
    check.data["decoder"] = {"rows": [{**row, "step": "decoder_main", "batch": 16, "pictures": 16,
                                       "channels_last": False, "pictures_per_s": 1.45},
                                      {**row, "step": "decode_only", "batch": 80, "pictures": 80,
                                       "channels_last": False, "pictures_per_s": 1.66}]}
    argv = device_check.compile_argv(check, "compile")
    assert option(argv, "--batch-sizes") == "80" and option(argv, "--dtypes") == "bf16"
    assert "--channels-last" not in argv
    check.data["decoder"]["rows"].append({**row, "step": "channels_last", "batch": 72, "pictures": 80,
                                          "channels_last": True, "pictures_per_s": 1.9})
    assert "--channels-last" in device_check.compile_argv(check, "compile")
    compiled = {**row, "step": "compile", "batch": 80, "pictures": 80, "channels_last": False, "compile": True,
                "pictures_per_s": 2.49}
    assert compiled_vs_eager(check.data["decoder"]["rows"] + [compiled]) == pytest.approx(1.5)


def test_unknown_steps_are_refused(tmp_path: Path, capsys) -> None:
    assert device_check.main([str(tmp_path), "--steps", "decoder_main,warp_drive"]) == 2
    assert "warp_drive" in capsys.readouterr().err


def test_missing_packages_without_wheels_are_one_line_and_status_2(tmp_path: Path) -> None:
    """An interpreter that lacks the libraries (here: without its site-packages) and no .whl/ to install
    them from: the check says what to run, before importing anything."""
    if list((REPO / ".whl").glob("*.whl")):
        pytest.skip(".whl/ holds wheels here: the check would install them")
    bare = tmp_path / "python"
    bare.write_text(f'#!/bin/sh\nexec "{sys.executable}" -I -S "$@"\n')
    bare.chmod(0o755)
    result = subprocess.run([str(REPO / "scripts" / "device_check.sh"), "--dry-run", str(tmp_path / "out")],
                            env={**os.environ, "PYTHON": str(bare)}, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("device_check: one of diffusers open_clip hydra omegaconf") and \
        "run scripts/fetch_wheels.sh" in result.stderr and len(result.stderr.splitlines()) == 1


def test_each_call_s_steps_keep_dsl_s_cache_in_its_working_folder(tmp_path: Path) -> None:
    """The decoder's recorded memory (and classifiers) of an earlier call on the same warm machine, kept in
    ~/.cache/dsl, would spare this call's probes: its steps get a cache folder of their own."""
    check = device_check.Check(out=tmp_path, work=tmp_path / "work", dry=True, budget=60, log=tmp_path / "log")
    assert device_check.step_env(check)["DSL_CACHE"] == str(tmp_path / "work" / "dsl_cache")
