"""Benchmark: peak memory of `dsl run` for every lens and study at ViT-bigG-14 with the Kandinsky 2.2 decoder.

Each case is one `dsl run` as a user types it (`encoder=bigg14_random decoder=kandinsky22_random`: the real
architectures with random weights, no download), in a process of its own:

- host memory: the process's peak resident set (`ru_maxrss` of that process, from `os.wait4`);
- GPU memory: the CUDA caching allocator's peak reservation plus the CUDA context, reported by the process
  at its end (`torch.cuda.max_memory_reserved`; the context is what the driver counts beyond the allocator).

On the CPU (fp32) decoding is kept tiny (64 px, 1 step, one picture): the figure is the models' memory,
not that of 512-pixel activations. On CUDA (bf16: `encoder.dtype=bf16`, `decode.dtype=auto`) pictures are 512 px
with a full decode batch of 8 (2 steps: the step count does not change the peak), and `--gpu-limit-gb 24`
caps the process at 24 GiB, its CUDA context included (`torch.cuda.set_per_process_memory_fraction`, which dsl
sizes its work by), as on a 24 GB card: a case that finishes under the cap fits one. The logit lens runs twice: with its ImageNet classifier built (a fresh
classifier cache; on the CPU with `lens.templates=simple`, 7 prompts per class, since 80 take hours there)
and with it kept from that run.

    python scripts/bench_memory.py --device cpu --json mem.json --markdown mem.md          # one case at a time:
    flock /tmp/dsl-heavy.lock python scripts/bench_memory.py --device cpu --only steering --json mem.json
    python scripts/bench_memory.py --device cuda --gpu-limit-gb 24 --json mem.json --markdown mem.md
    python scripts/bench_memory.py --dry-run --json out.json --markdown out.md    # tiny models, to check the script

Results of earlier invocations in the same --json file are kept (a case run again replaces its entry), so
cases can be measured one at a time.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GB = 1024**3  # figures are in GiB (2**30 bytes), as card sizes are: a "24 GB" card holds 24 GiB (24564 MiB)
GPU_SIZES_GB = (8, 12, 16, 24, 32, 40, 48, 80, 94, 141)  # common cards, for "smallest GPU it fits"
BIGG = ["encoder=bigg14_random", "decoder=kandinsky22_random", "images.limit=1", "layer=47"]
MUST_SHOW = ["encoder=bigg14_random", "lens=logit", "layer=47", "images.limit=1", "decode.enabled=false"]

# name -> (what it runs, overrides on the CPU, overrides on CUDA), on top of the device's settings below
CASES: dict[str, tuple[str, list[str], list[str]]] = {
    "diffusion": ("diffusion lens, residual stream after layer 47, decoded",
                  [*BIGG, "lens=diffusion"], [*BIGG, "lens=diffusion", "layer=40-47"]),
    "diffusion_512": ("diffusion lens as above, one picture at 512 px (CPU: 1 step): the decode's own memory",
                      [*BIGG, "lens=diffusion", "decode.height=512", "decode.width=512"],
                      [*BIGG, "lens=diffusion", "decode.batch_size=1"]),
    "direct": ("direct lens, 16 heads + MLP of layer 47, best decoded",
               [*BIGG, "lens=direct", "component=all", "decode.top_k=1"],
               [*BIGG, "lens=direct", "component=all", "decode.top_k=8"]),
    "steering": ("DSL, 16 heads + MLP of layer 47, best decoded",
                 [*BIGG, "lens=steering", "component=all", "decode.top_k=1"],
                 [*BIGG, "lens=steering", "component=all", "decode.top_k=8"]),
    "logit_built": ("logit lens, classifier built (text tower), no decoding: the issue's command",
                    [*MUST_SHOW, "lens.templates=simple"], [*MUST_SHOW]),
    "logit_kept": ("logit lens, classifier kept from logit_built (no text tower), no decoding",
                   [*MUST_SHOW, "lens.templates=simple"], [*MUST_SHOW]),
    "logit_decoded": ("logit lens, classifier kept, residual + 16 heads of layer 47, best decoded",
                      [*BIGG, "lens=logit", "lens.templates=simple", "decode.top_k=1"],
                      [*BIGG, "lens=logit", "decode.top_k=8"]),
    "head_importance": ("head importance study, 16 heads of layer 47 (CPU: 1 image; CUDA: 4 images x 64 heads)",
                        [*BIGG, "study=head_importance"],
                        [*BIGG, "study=head_importance", "images.limit=4", "layer=44-47"]),
    "overlay_removal": ("overlay removal study, 16 heads of layer 47, 2 composites, 1 step, greedy pool 16",
                        [*BIGG, "study=overlay_removal", "images.limit=2", "study.steps=1",
                         "study.greedy_pool=16", "study.random_orders=0"],
                        [*BIGG, "study=overlay_removal", "images.limit=2", "study.steps=4", "study.greedy_pool=16",
                         "study.random_orders=1"]),
}
DEVICE_SETTINGS = {
    "cpu": ["device=cpu", "encoder.dtype=fp32", "decode.height=64", "decode.width=64", "decode.steps=1"],
    "cuda": ["device=cuda", "encoder.dtype=bf16", "decode.steps=2"],
}

# The child: `dsl run` in this process (so that it can read CUDA's allocator), then its peaks as JSON.
CHILD = r"""
import json, sys
limit = float(sys.argv[2])
import torch
if limit > 0 and torch.cuda.is_available():
    free, total = torch.cuda.mem_get_info()  # starts the CUDA context, which a card of `limit` GiB also holds
    torch.cuda.set_per_process_memory_fraction(min(1.0, (limit * 1024**3 - (total - free)) / total))
from dsl_cli.cli import main
try:
    code = main(["run", *sys.argv[3:]])
except SystemExit as stop:
    code = stop.code
out = {"exit": code}
if torch.cuda.is_available() and torch.cuda.is_initialized():
    free, total = torch.cuda.mem_get_info()
    out.update(cuda_max_reserved=torch.cuda.max_memory_reserved(), cuda_max_allocated=torch.cuda.max_memory_allocated(),
               cuda_context=max(0, total - free - torch.cuda.memory_reserved()), gpu=torch.cuda.get_device_name(0),
               gpu_total=total)
with open(sys.argv[1], "w") as handle:
    json.dump(out, handle)
"""


def measure(name: str, overrides: list[str], folder: Path, cache: Path, gpu_limit_gb: float) -> dict:
    """Run one case in a child process; its peaks, exit status, seconds and the stage times of its manifest."""
    run_dir = fresh_folder(folder / "runs", name)  # a case measured again gets a run of its own
    report, log_path = run_dir.with_suffix(".child.json"), run_dir.with_suffix(".log")
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "DSL_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-c", CHILD, str(report), str(gpu_limit_gb), *overrides, f"hydra.run.dir={run_dir}"]
    print(f"[{name}] dsl run {' '.join(overrides)}", flush=True)
    start = time.perf_counter()
    with open(log_path, "w") as log:
        child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(child.pid, 0)  # the rusage of this child alone
    result = {"case": name, "command": "dsl run " + " ".join(overrides), "host_peak_bytes": usage.ru_maxrss * 1024,
              "seconds": round(time.perf_counter() - start, 1), "exit": os.waitstatus_to_exitcode(status)}
    if report.is_file():
        result.update(json.loads(report.read_text()))
    if (run_dir / "manifest.json").is_file():
        manifest = json.loads((run_dir / "manifest.json").read_text())
        result.update(stage_seconds=manifest.get("seconds"), decode_batch_size=manifest.get("decode_batch_size"),
                      encoder_offloaded=manifest.get("encoder_offloaded"))
    run_log = (run_dir / "dsl.log").read_text() if (run_dir / "dsl.log").is_file() else ""
    if "ImageNet classifier" in run_log:  # the logit lens says which it did
        result["classifier"] = "kept" if "ImageNet classifier read from" in run_log else "built"
    if result["exit"] != 0:
        result["error"] = log_path.read_text()[-1500:]
    gpu = f", GPU peak {gpu_peak(result) / GB:.2f} GiB" if "cuda_max_reserved" in result else ""
    print(f"[{name}] exit {result['exit']}, {result['seconds']} s, host peak {result['host_peak_bytes'] / GB:.2f} GiB"
          f"{gpu}", flush=True)
    return result


def fresh_folder(parent: Path, name: str) -> Path:
    """parent/name, or parent/name-2, -3, ... when that is taken (dsl refuses to run into a finished run)."""
    candidates = (parent / (name if i == 1 else f"{name}-{i}") for i in itertools.count(1))
    return next(path for path in candidates if not path.exists() and not path.with_suffix(".log").exists())


def gpu_peak(result: dict) -> int:
    return result["cuda_max_reserved"] + result["cuda_context"]


def smallest_gpu(result: dict) -> str:
    """The smallest listed card the case fits: one its peak fits with 3 % to spare, or the cap it finished
    under (a study sizes its batches from free memory, so its peak grows with the card)."""
    fits = [size for size in GPU_SIZES_GB if gpu_peak(result) <= size * GB * 0.97]
    if result["exit"] == 0 and result.get("gpu_limit_gb"):
        fits.append(result["gpu_limit_gb"])
    return f"{min(fits):g} GB" if fits else "none listed"


def markdown(results: list[dict]) -> str:
    """The memory table: one row per case and device."""
    lines = ["| case | what runs | device | host peak (RSS) | GPU peak (allocator + context) | smallest GPU | "
             "exit | seconds |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        gpu = f"{gpu_peak(r) / GB:.2f} GiB" if "cuda_max_reserved" in r else "unmeasured"
        card = smallest_gpu(r) if "cuda_max_reserved" in r else "unmeasured"
        device = r.get("gpu", r.get("device", "cpu"))
        if r.get("gpu_limit_gb"):
            device += f", capped at {r['gpu_limit_gb']:g} GB"
        lines.append(f"| {r['case']} | {r['what']} | {device} | {r['host_peak_bytes'] / GB:.2f} GiB | {gpu} | {card} | "
                     f"{r['exit']} | {r['seconds']} |")
    return "\n".join(lines) + "\n"


def key(result: dict) -> str:
    """A result replaces an earlier one of the same case, device and cap."""
    return f"{result['case']}@{result['device']}@{result.get('gpu_limit_gb')}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--only", default=",".join(CASES), help=f"comma-separated cases: {', '.join(CASES)}")
    parser.add_argument("--gpu-limit-gb", type=float, default=0.0, help="cap the process's GPU memory (CUDA)")
    parser.add_argument("--dry-run", action="store_true", help="debug=tiny models: checks the script in seconds")
    parser.add_argument("--folder", type=Path, default=None, help="runs, logs and the classifier cache (default: temp)")
    parser.add_argument("--json", type=Path, required=True, help="results, merged with those already in the file")
    parser.add_argument("--markdown", type=Path, default=None, help="write the table here too")
    args = parser.parse_args()
    names = [n for n in args.only.split(",") if n]
    unknown = [n for n in names if n not in CASES]
    if unknown:
        parser.error(f"unknown cases {unknown}: choose from {', '.join(CASES)}")
    import torch  # here, not at the top: --help answers without it

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available here (no GPU, or a CPU build of torch); use --device cpu")
    if args.folder is not None:
        args.folder.mkdir(parents=True, exist_ok=True)
        return measure_all(args, names, args.folder)
    with tempfile.TemporaryDirectory(prefix="bench_memory.") as folder:  # removed at the end, whatever happens
        return measure_all(args, names, Path(folder))


def measure_all(args: argparse.Namespace, names: list[str], folder: Path) -> None:
    """Measure the cases `names`, with `folder` for the runs, logs and classifier cache; print the table."""
    earlier = json.loads(args.json.read_text()) if args.json.is_file() else []
    results = {key(r): r for r in earlier}
    for name in names:
        what, cpu, cuda = CASES[name]
        overrides = [*DEVICE_SETTINGS[args.device], *(cuda if args.device == "cuda" else cpu)]
        if args.dry_run:  # the tiny models instead of the real-size ones (a command-line choice would win)
            overrides = [o for o in overrides if not o.startswith(("encoder=", "decoder="))] + ["debug=tiny"]
        overrides = list({o.split("=", 1)[0]: o for o in overrides}.values())  # the case's values win
        result = measure(name, overrides, folder, folder / "classifier_cache", args.gpu_limit_gb)
        result.update(what=what, device=args.device + (" (dry run, tiny models)" if args.dry_run else ""),
                      gpu_limit_gb=args.gpu_limit_gb if args.device == "cuda" else None)
        results[key(result)] = result
        args.json.write_text(json.dumps(list(results.values()), indent=1))
    table = markdown(list(results.values()))
    if args.markdown:
        args.markdown.write_text(table)
    print(table)


if __name__ == "__main__":
    main()
