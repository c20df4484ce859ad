"""The device check: every figure the GPU issue asks for, from one command, within a time budget.

    scripts/device_check.sh OUT_DIR              # on the GPU machine (about 8 minutes on an H100)
    scripts/device_check.sh OUT_DIR --steps gpu_tests --tests "batch_invariant or out_of_memory"   # a rerun
    scripts/device_check.sh --dry-run OUT_DIR    # on the CPU with tiny sizes: the same steps, every field

Steps run in this order, each in its own process with its own time limit, most important first (in the dry
run, each a fork of this process after the libraries' imports); a step
that would not fit in what is left of `--budget` is skipped and says so, and one that overruns is stopped
and keeps the rows it has measured. After every step OUT_DIR/device_check.json and OUT_DIR/device_check.md
are rewritten, so a check cut short keeps what it measured. OUT_DIR receives at most five files (the JSON,
the table, the full log, the GPU tests' JUnit XML and the end-to-end run's manifest); the run folder and the
benchmarks' own JSON files go to a working folder (`--work`, default a temporary one).

    decoder_main     naive fp32 pipeline per picture; ours in bf16 at batch 1, 4, 8, 16; bf16 matmul peak
    decode_only      80 pictures in bf16 at `batch_size: auto`, as `dsl run` decodes them
    compile          bf16 with the UNet compiled, at decode_only's batch, in the better memory format
    end_to_end       dsl run encoder=bigg14_random decoder=kandinsky22_random lens=steering layer=30
    encoder          bigG, 32 images: plain forward vs cache + DSL vs hooked, fp32 and bf16; bf16 cosine
    gpu_tests        pytest -m gpu
    decoder_fp16     fp16 at batch 1, 4, 8, 16
    channels_last    the decode-only pictures again, with channels_last
    memory           bench_memory.py: every lens and study at bigG with the GPU capped at 24 GiB (`--steps memory`:
                     about 5 minutes, more than the default budget leaves after the steps above)
"""

from __future__ import annotations

import argparse
import atexit
import datetime
import gc
import importlib
import json
import os
import platform
import runpy
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Callable, Optional

from device_check_report import markdown, summarise

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "scripts"
E2E_PICTURES = 80  # 16 heads of layer 30 x 5 sample photos
DRY_E2E_PICTURES = 8  # debug=tiny: 4 heads of layer 1 x 2 photos


@dataclass
class Check:
    """What a step needs: where to write, how much time is left, and whether this is the CPU dry run."""

    out: Path
    work: Path
    dry: bool
    budget: float
    log: Path
    tests: Optional[str] = None  # pytest -k expression: rerun some GPU tests only
    started: float = field(default_factory=time.monotonic)
    data: dict = field(default_factory=dict)

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.started)

    def save(self) -> None:
        """Rewrite the JSON and the table (atomically: a reader never sees half a file)."""
        self.data["elapsed_s"] = round(time.monotonic() - self.started, 1)
        self.data["summary"] = summarise(self.data)
        for name, text in (("device_check.json", json.dumps(self.data, indent=2, default=str) + "\n"),
                           ("device_check.md", markdown(self.data))):
            tmp = self.out / f".{name}.tmp"
            tmp.write_text(text)
            os.replace(tmp, self.out / name)


def say(check: Check, line: str) -> None:
    """Progress on the terminal and in the log."""
    stamp = f"[{time.monotonic() - check.started:5.0f} s] {line}"
    print(stamp, flush=True)
    with open(check.log, "a") as log:
        log.write(stamp + "\n")


def step_env(check: Check) -> dict[str, str]:
    # dsl's cache folder in the working folder: what each call measures is its own, never a record of the
    # decoder's memory (or a classifier) that an earlier call on the same warm machine left in ~/.cache/dsl
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "DSL_CACHE": str(check.work / "dsl_cache")}
    if check.dry:
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return env


def run_process(check: Check, name: str, argv: list[str], limit: float) -> tuple[str, float]:
    """Run one step's process (its output into the log) for at most `limit` seconds; its whole process
    group is stopped at the limit. -> (status, seconds)."""
    start = time.monotonic()
    with open(check.log, "a") as log:
        log.write(f"\n===== {name}: {' '.join(argv)}\n")
        log.flush()
        if check.dry:
            pid = fork_step(argv, log.fileno())
        else:
            pid = subprocess.Popen(argv, cwd=REPO, env=step_env(check), stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True).pid
        code = wait_for(pid, start + max(limit, 1))
    if code is None:
        return "timeout", time.monotonic() - start
    return ("ok" if code == 0 else f"failed (exit {code})"), time.monotonic() - start


def wait_for(pid: int, deadline: float) -> Optional[int]:
    """The exit code of step process `pid`, or None when it ran past the deadline (its group then killed)."""
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.killpg(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return None
        time.sleep(0.05)


# dsl_cli.run last: the pipelines, tokenizers and the rest of the libraries that a run imports beyond these
PRELOADED = ("torch", "diffusers", "open_clip", "transformers", "timm", "hydra", "matplotlib.pyplot", "pytest",
             "dsl_cli.run")


def preload_for_dry_run(check: Check) -> None:
    """The dry run's steps are forks of this process (each a process of its own, in a session of its own,
    as on the GPU, where each is a fresh interpreter: CUDA does not survive a fork). The libraries every step
    imports are imported here once, with the steps' environment set first, since some read it when imported;
    on 2 CPU cores that is seconds saved per step."""
    os.environ.update(step_env(check))
    gc.disable()
    for library in PRELOADED:
        importlib.import_module(library)
    gc.freeze()  # no collection in a step walks the libraries' objects (as `dsl run` does after its imports)
    gc.enable()


def fork_step(argv: list[str], log_fd: int) -> int:
    """`python SCRIPT ARGS` or `python -m MODULE ARGS` (argv[0] is the interpreter) in a forked child that
    writes to the log; -> its pid."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        os.setsid()
        null = os.open(os.devnull, os.O_RDONLY)
        for target, fd in ((0, null), (1, log_fd), (2, log_fd)):
            os.dup2(fd, target)
        os.chdir(REPO)
        if argv[1] == "-m":
            sys.argv = [argv[2], *argv[3:]]
            runpy.run_module(argv[2], run_name="__main__", alter_sys=True)
        else:
            sys.argv = argv[1:]
            sys.path.insert(0, str(Path(argv[1]).parent))
            runpy.run_path(argv[1], run_name="__main__")
        code = 0
    except SystemExit as end:
        code = end.code if isinstance(end.code, int) else (0 if end.code is None else 1)
        if not isinstance(end.code, (int, type(None))):
            print(end.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - the step's traceback goes to the log, as a process's would
        traceback.print_exc()
    finally:
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


# ---------------------------------------------------------------- the steps


def bench_decoder_argv(check: Check, json_path: Path, real: list[str], dry: list[str]) -> list[str]:
    base = [sys.executable, str(BENCH / "bench_decoder.py"), "--json", str(json_path)]
    if check.dry:
        return base + ["--decoder", "tiny", "--device", "cpu", "--size", "64", "--steps", "2", "--threads", "1"] + dry
    return base + ["--decoder", "random", "--device", "cuda", "--size", "512", "--steps", "100"] + real


def decoder_step(real: list[str], dry: list[str]) -> Callable[[Check, str], list[str]]:
    def argv(check: Check, name: str) -> list[str]:
        return bench_decoder_argv(check, check.work / f"{name}.json", real, dry)

    return argv


def encoder_argv(check: Check, name: str) -> list[str]:
    base = [sys.executable, str(BENCH / "bench_encoder.py"), "--json", str(check.work / f"{name}.json"),
            "--dtypes", "fp32,bf16"]
    if check.dry:
        return base + ["--device", "cpu", "--sizes", "tiny", "--images", "4", "--repeats", "2", "--sample", "4",
                       "--threads", "1"]
    return base + ["--device", "cuda", "--sizes", "ViT-bigG-14", "--images", "32", "--repeats", "5", "--sample", "16"]


def gpu_tests_argv(check: Check, name: str) -> list[str]:
    only = ["-k", check.tests] if check.tests else []
    return [sys.executable, "-m", "pytest", "tests/test_gpu.py", "-m", "gpu", "-q", "-rA", "-p", "no:cacheprovider",
            f"--junitxml={check.out / 'gpu_tests.xml'}", *only]


def end_to_end_argv(check: Check, name: str) -> list[str]:
    base = [sys.executable, "-m", "dsl_cli.cli", "run", f"hydra.run.dir={check.work / 'run'}"]
    if check.dry:
        return base + ["debug=tiny", "lens=steering", "layer=1", "images.limit=2", "decode.batch_size=auto"]
    return base + ["encoder=bigg14_random", "decoder=kandinsky22_random", "lens=steering", "layer=30", "device=cuda"]


def compile_argv(check: Check, name: str) -> list[str]:
    """The compiled UNet at the batch the decode-only step found (the one `dsl run` decodes at, so that the
    compiled/eager pair is the configuration that decides `decode.compile`'s default; 16 if not measured), in
    the memory format that was faster without compiling (NCHW if unknown)."""
    rows = check.data.get("decoder", {}).get("rows", [])
    layout = ["--channels-last"] if channels_last_was_faster(rows) else []
    batch = next((r["batch"] for r in rows if r.get("step") == "decode_only"), 16)
    return bench_decoder_argv(check, check.work / f"{name}.json",
                              ["--dtypes", "bf16", "--batch-sizes", str(batch), "--compile", "--naive-pictures", "0",
                               "--matmul-size", "0", *layout],
                              # the shapes of the CPU compile test, so that inductor's cache serves both
                              ["--dtypes", "fp32", "--batch-sizes", "2", "--compile", "--naive-pictures", "0"])


def channels_last_was_faster(rows: list[dict]) -> bool:
    """Whether the decode-only pictures went faster in channels_last than in the default layout."""
    rate = {r["channels_last"]: r["pictures_per_s"] for r in rows if r.get("step") in ("decode_only", "channels_last")}
    return rate.get(True, 0) > rate.get(False, float("inf"))


def memory_argv(check: Check, name: str) -> list[str]:
    base = [sys.executable, str(BENCH / "bench_memory.py"), "--json", str(check.work / f"{name}.json"),
            "--folder", str(check.work / name)]
    if check.dry:
        # one case, in a process of its own, is what the dry run checks (the script, its JSON and table): the
        # logit lens's, with the classifier's stage; the end_to_end step has already run DSL with decoding
        return base + ["--dry-run", "--only", "logit_built", "--markdown", str(check.work / f"{name}.md")]
    return base + ["--device", "cuda", "--gpu-limit-gb", "24"]


NO_BASELINE = ["--naive-pictures", "0", "--matmul-size", "0"]
STEPS: list[tuple[str, float, Callable[[Check, str], list[str]]]] = [
    # name, estimated seconds on an H100, command; in the order of what the GPU issue still lacks, since the
    # budget skips the last: the decoder eager and compiled, the run against its decoding, the encoder, the
    # GPU tests; then what the first round measured already (fp16, channels_last: 22 % slower on the H100)
    ("decoder_main", 75, decoder_step(["--dtypes", "bf16", "--batch-sizes", "1,4,8,16", "--naive-pictures", "2",
                                       "--profile", "5"],
                                      ["--dtypes", "bf16", "--batch-sizes", "1,2", "--naive-pictures", "1",
                                       "--matmul-size", "256", "--profile", "1"])),
    ("decode_only", 90, decoder_step(["--dtypes", "bf16", "--batch-sizes", "auto", "--pictures", str(E2E_PICTURES),
                                      *NO_BASELINE],
                                     ["--dtypes", "fp32", "--batch-sizes", "auto", "--pictures",
                                      str(DRY_E2E_PICTURES), *NO_BASELINE])),
    ("compile", 150, compile_argv),
    ("end_to_end", 120, end_to_end_argv),
    ("encoder", 50, encoder_argv),
    ("gpu_tests", 120, gpu_tests_argv),
    ("decoder_fp16", 50, decoder_step(["--dtypes", "fp16", "--batch-sizes", "1,4,8,16", *NO_BASELINE],
                                      ["--dtypes", "fp16", "--batch-sizes", "1", *NO_BASELINE])),
    # the decode-only pictures again, channels_last: whether the layout lifts the best configuration
    ("channels_last", 70, decoder_step(["--dtypes", "bf16", "--batch-sizes", "auto", "--pictures", str(E2E_PICTURES),
                                        "--channels-last", *NO_BASELINE],
                                       ["--dtypes", "fp32", "--batch-sizes", "auto", "--pictures",
                                        str(DRY_E2E_PICTURES), "--channels-last", *NO_BASELINE])),
    ("memory", 300, memory_argv),
]


# ---------------------------------------------------------------- collecting the results


def collect(check: Check, name: str, seconds: float) -> None:
    """Fold what a step wrote (even a step stopped half-way) into the check's data."""
    data = check.data
    if name == "gpu_tests":
        data["gpu_tests"] = read_junit(check.out / "gpu_tests.xml")
    elif name == "end_to_end":
        data["end_to_end"] = read_run(check, seconds)
    elif name == "encoder":
        data["encoder"] = read_json(check.work / f"{name}.json")
    elif name == "memory":  # bench_memory.py's results: a list, one entry per case
        rows = read_json(check.work / f"{name}.json")
        data["memory"] = {"rows": rows if isinstance(rows, list) else []}
    else:
        bench = read_json(check.work / f"{name}.json")
        decoder = data.setdefault("decoder", {"rows": []})
        for key in ("tflop_per_picture", "matmul_peak_tflops", "naive_pictures_per_s", "size", "steps", "guidance",
                    "naive_pictures", "profile"):
            if bench.get(key) is not None:
                decoder[key] = bench[key]
        decoder["rows"] += [{**row, "step": name} for row in bench.get("rows", [])]
        if name == "decode_only" and bench.get("rows"):
            data["decode_only"] = bench["rows"][0]


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def read_junit(path: Path) -> dict:
    """Counts, failures and the properties the GPU tests recorded (measured differences and tolerances)."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return {}
    result: dict = {"passed": 0, "failed": 0, "skipped": 0, "failures": [], "properties": {}}
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        if case.find("failure") is not None or case.find("error") is not None:
            result["failed"] += 1
            problem = case.find("failure") if case.find("failure") is not None else case.find("error")
            result["failures"].append(f"{name}: {(problem.get('message') or '')[:300]}")
        elif case.find("skipped") is not None:
            result["skipped"] += 1
        else:
            result["passed"] += 1
        for prop in case.iter("property"):
            result["properties"][f"{case.get('name')}.{prop.get('name')}"] = prop.get("value")
    return result


def read_run(check: Check, seconds: float) -> dict:
    """Wall time of the whole `dsl run` process (start to exit, after `run complete`) and its manifest."""
    manifest_path = check.work / "run" / "manifest.json"
    manifest = read_json(manifest_path)
    if manifest_path.exists():
        shutil.copyfile(manifest_path, check.out / "e2e_manifest.json")
    return {"wall_s": seconds, "status": manifest.get("status"), "decoded": manifest.get("decoded"),
            "stage_seconds": manifest.get("seconds", {}), "decode_batch_size": manifest.get("decode_batch_size"),
            "decode_fit_s": manifest.get("decode_fit_seconds"),
            "encoder_offloaded": manifest.get("encoder_offloaded"), "encoder_dtype": manifest.get("encoder_dtype"),
            "decoder_dtype": manifest.get("decoder_dtype"), "pictures": DRY_E2E_PICTURES if check.dry else E2E_PICTURES}


def environment(dry: bool) -> dict:
    """Versions, the device and its driver, read without importing torch: this process never initialises
    CUDA, so that each step has the whole GPU to itself."""
    env = {"mode": "dry-run (CPU, tiny sizes)" if dry else "GPU", "date": datetime.datetime.now().isoformat(" ", "seconds"),
           "python": platform.python_version(), "host": platform.node()}
    for name in ("torch", "diffusers", "open_clip_torch", "hydra-core", "omegaconf", "transformers"):
        try:
            env[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            env[name] = None
    smi = shutil.which("nvidia-smi")
    if smi:
        query = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                               capture_output=True, text=True)
        env["gpu"] = query.stdout.strip() or query.stderr.strip()
    else:
        env["gpu"] = "none (no nvidia-smi)"
    return env


# ---------------------------------------------------------------- the check


def run_steps(check: Check, only: Optional[set[str]]) -> None:
    statuses = check.data.setdefault("steps", {})
    for name, estimate, argv_of in STEPS:
        if only and name not in only:
            continue
        left = check.left()
        if not check.dry and left < estimate:
            statuses[name] = {"status": "skipped", "reason": f"{left:.0f} s left, needs about {estimate:.0f} s"}
            say(check, f"{name}: skipped ({statuses[name]['reason']})")
            check.save()
            continue
        missing = missing_requirement(check, name)
        if missing:
            statuses[name] = {"status": "skipped", "reason": missing}
            say(check, f"{name}: skipped ({missing})")
            check.save()
            continue
        argv = argv_of(check, name)
        say(check, f"{name}: start (about {estimate:.0f} s on an H100; {left:.0f} s left)")
        status, seconds = run_process(check, name, argv, left if not check.dry else 1800)
        statuses[name] = {"status": status, "seconds": round(seconds, 1), "command": "python " + " ".join(argv[1:])}
        collect(check, name, seconds)
        check.save()
        say(check, f"{name}: {status} in {seconds:.0f} s")


def missing_requirement(check: Check, name: str) -> Optional[str]:
    """Why a step cannot run here, if it cannot: inductor compiles C++ for the CPU (Triton on the GPU)."""
    if name == "compile" and check.dry and not shutil.which(os.environ.get("CXX", "g++")):
        return "no C++ compiler for inductor on the CPU (install g++)"
    return None


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="folder for device_check.json, device_check.md and the log")
    p.add_argument("--dry-run", action="store_true", help="on the CPU with tiny sizes (CI): every step, every field")
    p.add_argument("--budget", type=float, default=480, help="seconds for all steps (default 480: 8 minutes)")
    p.add_argument("--steps", default=None, help="comma-separated subset of the steps (default: all), e.g. for a rerun")
    p.add_argument("--tests", default=None, help="pytest -k expression: run only these GPU tests (a rerun)")
    p.add_argument("--work", type=Path, default=None, help="folder for the run and the benchmarks' JSON (default: temporary)")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    known = [name for name, _, _ in STEPS]
    only = set(args.steps.split(",")) if args.steps else None
    if only and not only <= set(known):
        print(f"device_check: unknown steps {sorted(only - set(known))}; choose from {', '.join(known)}", file=sys.stderr)
        return 2
    if not args.dry_run and not shutil.which("nvidia-smi"):
        print("device_check: no NVIDIA GPU here (no nvidia-smi); use --dry-run for the CPU check", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    if args.work is not None:
        args.work.mkdir(parents=True, exist_ok=True)
        return check_in(args, args.work, only)
    # not TemporaryDirectory: it also registers its removal to run at exit, and the dry run's steps, forks of
    # this process, run the exit functions they inherit: each step removed the folder with its results
    work = Path(tempfile.mkdtemp(prefix="dsl-device-check-"))
    try:
        return check_in(args, work, only)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def check_in(args: argparse.Namespace, work: Path, only: Optional[set[str]]) -> int:
    """The device check's steps, with `work` for the runs and the benchmarks' JSON files."""
    check = Check(out=args.out, work=work, dry=args.dry_run, budget=args.budget, log=args.out / "device_check.log",
                  tests=args.tests)
    check.log.write_text("")
    if check.dry:
        preload_for_dry_run(check)
    check.data.update(budget_s=args.budget, environment=environment(args.dry_run))
    check.save()
    say(check, f"device check ({check.data['environment']['mode']}): {check.data['environment'].get('gpu')}; "
               f"budget {args.budget:.0f} s; results in {args.out}")
    run_steps(check, only)
    check.save()
    say(check, f"done: {args.out / 'device_check.md'}")
    print(markdown(check.data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
