"""The device check's figures: the goals of the GPU issue computed from the measured rows, and the markdown
table written beside the JSON. Pure functions of the check's data (no torch), so a report can be redrawn
from a device_check.json alone:

    python scripts/device_check_report.py OUT_DIR/device_check.json
"""

from __future__ import annotations

import json
import sys
from typing import Any, Optional

from bench_memory import markdown as memory_markdown

GOALS = {  # figure -> (comparison, target); from the GPU issues (the second round's where it set one)
    "decoder_pct_of_matmul_peak": (">=", 50.0),
    "decoder_vs_naive": (">=", 8.0),
    "run_wall_vs_decode_only": ("<=", 1.2),
    "run_startup_s": ("<=", 5.0),
    "encoder_cache_vs_plain_fp32": ("<=", 1.1),
    "encoder_cache_vs_plain_bf16": ("<=", 1.03),
    "encoder_bf16_cosine_min": (">=", 0.999),
    "gpu_tests_failed": ("==", 0),
    "memory_cases_failed": ("==", 0),
}
FIGURES = {
    "decoder_pct_of_matmul_peak": "decoder, best configuration: % of the bf16 matmul peak measured in the same run",
    "decoder_vs_naive": "decoder, best configuration vs the naive fp32 pipeline per picture",
    "run_wall_vs_decode_only": "`dsl run` wall time (start to exit) / decode-only time of the same pictures",
    "run_startup_s": "`dsl run` start-up: process start to the first stage, CUDA context made (manifest, s)",
    "encoder_cache_vs_plain_fp32": "encoder fp32: cache + DSL for every component / one plain forward, same batch",
    "encoder_cache_vs_plain_bf16": "encoder bf16: cache + DSL for every component / one plain forward, same batch",
    "encoder_bf16_cosine_min": "encoder: lowest cosine of bf16 DSL embeddings against fp32",
    "gpu_tests_failed": "`pytest -m gpu`: tests failed",
    "memory_cases_failed": "`dsl run` of each lens and study at bigG, GPU capped at 24 GiB: runs that failed",
}


def best_decoder_row(data: dict) -> Optional[dict]:
    rows = data.get("decoder", {}).get("rows", [])
    return max(rows, key=lambda r: r["pictures_per_s"]) if rows else None


def summarise(data: dict) -> dict[str, Any]:
    """Headline figures (None where not measured) and whether each goal is met."""
    decoder, figures = data.get("decoder", {}), {}
    best, peak, naive = best_decoder_row(data), decoder.get("matmul_peak_tflops"), decoder.get("naive_pictures_per_s")
    if best:
        tflops = best["pictures_per_s"] * decoder.get("tflop_per_picture", 0)
        figures.update(decoder_best=describe_row(best), decoder_pictures_per_s=best["pictures_per_s"],
                       decoder_tflops=tflops)
        figures["decoder_pct_of_matmul_peak"] = 100 * tflops / peak if peak else None
        figures["decoder_vs_naive"] = best["pictures_per_s"] / naive if naive else None
    figures.update(matmul_peak_tflops=peak, naive_pictures_per_s=naive)
    run, only = data.get("end_to_end", {}), data.get("decode_only")
    figures["run_startup_s"] = run.get("stage_seconds", {}).get("startup")
    if run.get("wall_s") and only and run.get("status") == "complete":
        figures["decode_only_s"] = only["seconds"] * run["pictures"] / only["pictures"]
        figures["run_wall_vs_decode_only"] = run["wall_s"] / figures["decode_only_s"]
    for row in data.get("encoder", {}).get("rows", []):
        figures[f"encoder_cache_vs_plain_{row['dtype']}"] = row["cache_vs_plain"]
        if "cos_vs_fp32_min" in row:
            figures[f"encoder_{row['dtype']}_cosine_min"] = row["cos_vs_fp32_min"]
    tests = data.get("gpu_tests", {})
    if tests:
        figures["gpu_tests_failed"] = tests["failed"]
        figures["gpu_tests_passed"] = tests["passed"]
    memory = data.get("memory", {}).get("rows")
    if memory:
        figures["memory_cases_failed"] = sum(row["exit"] != 0 for row in memory)
    goals = {name: goal_met(figures.get(name), *GOALS[name]) for name in GOALS}
    return {"figures": figures, "goals_met": goals}


def compiled_vs_eager(rows: list[dict]) -> Optional[float]:
    """pictures/s of the compiled UNet over the eager one at the same dtype, batch and memory format (the best
    such pair); None until both were measured."""
    eager = {(r["dtype"], r["batch"], r["channels_last"]): r["pictures_per_s"] for r in rows if not r["compile"]}
    ratios = [r["pictures_per_s"] / eager[key] for r in rows if r["compile"]
              and (key := (r["dtype"], r["batch"], r["channels_last"])) in eager]
    return max(ratios, default=None)


def goal_met(value: Optional[float], comparison: str, target: float) -> Optional[bool]:
    if value is None:
        return None
    return {">=": value >= target, "<=": value <= target, "==": value == target}[comparison]


def describe_row(row: dict) -> str:
    switches = [s for s in ("channels_last", "compile") if row.get(s)]
    return f"{row['dtype']}, batch {row['batch']}" + "".join(f", {s}" for s in switches)


def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "not measured"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def markdown(data: dict) -> str:
    """The table of the check: goals first, then every row measured, the steps and their status."""
    env, summary = data.get("environment", {}), data.get("summary") or summarise(data)
    lines = ["# Device check", "",
             f"{env.get('mode')}, {env.get('date')}: GPU {env.get('gpu')}; torch {env.get('torch')}, diffusers "
             f"{env.get('diffusers')}, open_clip {env.get('open_clip_torch')}, hydra {env.get('hydra-core')}, "
             f"Python {env.get('python')}; {data.get('elapsed_s')} s of a {data.get('budget_s')} s budget.", ""]
    lines += goals_table(summary)
    lines += decoder_table(data)
    lines += profile_table(data.get("decoder", {}).get("profile"))
    lines += encoder_table(data.get("encoder", {}))
    lines += run_table(data, summary)
    lines += tests_table(data.get("gpu_tests", {}))
    lines += ["## Memory (`bench_memory.py`)", "", memory_markdown(data.get("memory", {}).get("rows", []))]
    lines += ["## Steps", "", "| step | status | seconds | command or reason |", "|---|---|---|---|"]
    for name, step in data.get("steps", {}).items():
        lines.append(f"| {name} | {step['status']} | {fmt(step.get('seconds'))} | "
                     f"`{step.get('command', step.get('reason', ''))}` |")
    return "\n".join(lines) + "\n"


def goals_table(summary: dict) -> list[str]:
    figures, met = summary["figures"], summary["goals_met"]
    lines = ["## Goals", "", "| figure | measured | goal | met |", "|---|---|---|---|"]
    for name, (comparison, target) in GOALS.items():
        verdict = {True: "yes", False: "**no**", None: "-"}[met[name]]
        lines.append(f"| {FIGURES[name]} | {fmt(figures.get(name), 4)} | {comparison} {target} | {verdict} |")
    extra = [("best decoder configuration", figures.get("decoder_best")),
             ("its pictures/s", figures.get("decoder_pictures_per_s")), ("its TFLOP/s", figures.get("decoder_tflops")),
             ("bf16 matmul peak (TFLOP/s)", figures.get("matmul_peak_tflops")),
             ("naive fp32 pipeline (pictures/s)", figures.get("naive_pictures_per_s"))]
    lines += [f"| {label} | {fmt(value, 4)} | | |" for label, value in extra]
    return lines + [""]


def decoder_table(data: dict) -> list[str]:
    decoder = data.get("decoder", {})
    per_picture, peak, naive = (decoder.get(k) for k in ("tflop_per_picture", "matmul_peak_tflops",
                                                         "naive_pictures_per_s"))
    lines = [f"## Decoder ({decoder.get('size')} px, {decoder.get('steps')} steps, guidance {decoder.get('guidance')}; "
             f"{fmt(per_picture, 4)} TFLOP per picture)", "",
             "| step | dtype | channels_last | compile | batch | pictures | pictures/s | vs naive | TFLOP/s | "
             "% of matmul peak | peak memory (GiB) | warm-up (s) |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in decoder.get("rows", []):
        tflops = r["pictures_per_s"] * per_picture if per_picture else None
        lines.append(f"| {r['step']} | {r['dtype']} | {r['channels_last']} | {r['compile']} | {r['batch']} | "
                     f"{r['pictures']} | {fmt(r['pictures_per_s'])} | {fmt(r['pictures_per_s'] / naive if naive else None)} | "
                     f"{fmt(tflops)} | {fmt(100 * tflops / peak if peak and tflops else None)} | {fmt(r['peak_gib'])} | "
                     f"{fmt(r['warmup_s'])} |")
    ratio = compiled_vs_eager(decoder.get("rows", []))
    return lines + ["", f"Compiled UNet against eager at the same dtype, batch and memory format: {fmt(ratio, 4)}"
                        f"{'x the pictures/s' if ratio else ''}.", ""]


def profile_table(profile: Optional[dict]) -> list[str]:
    """The kernels that take the decoder's device time (bench_decoder.py --profile)."""
    if not profile:
        return []
    lines = [f"## Where the decoder's time goes ({profile['dtype']}, batch {profile['batch']}, {profile['steps']} "
             "steps, profiled)", "", "| share | ms | calls | kernel |", "|---|---|---|---|"]
    lines += [f"| {100 * k['share']:.1f} % | {k['ms']:.2f} | {k['calls']} | `{k['name'].replace('|', '/')}` |"
              for k in profile["kernels"]]
    return lines + [""]


def encoder_table(encoder: dict) -> list[str]:
    lines = [f"## Encoder ({encoder.get('device')}; clock {encoder.get('clock')})", "",
             "| size | dtype | images | components | plain (s) | cache + DSL (s) | cache+DSL / plain | "
             "hooked / closed (1 image) | max abs diff | cos vs fp32 (min / mean) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in encoder.get("rows", []):
        cosine = f"{fmt(r.get('cos_vs_fp32_min'), 5)} / {fmt(r.get('cos_vs_fp32_mean'), 5)}" if "cos_vs_fp32_min" in r else "-"
        cells = [fmt(r.get(k)) for k in ("size", "dtype", "images", "components", "plain_s", "cache_dsl_s")]
        cells += [fmt(r.get("cache_vs_plain"), 4), fmt(r.get("hooked_vs_closed")), fmt(r.get("max_abs_diff"), 2), cosine]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def run_table(data: dict, summary: dict) -> list[str]:
    run, only = data.get("end_to_end", {}), data.get("decode_only") or {}
    stages = ", ".join(f"{k} {v:.1f}" for k, v in run.get("stage_seconds", {}).items())
    # what no stage holds: Hydra's job set-up after the start-up, the page, the process's exit (CUDA's teardown)
    outside = (run["wall_s"] - sum(run["stage_seconds"].values())
               if run.get("wall_s") is not None and run.get("stage_seconds") else None)
    return ["## End to end (`dsl run`)", "", "| figure | value |", "|---|---|",
            f"| status | {run.get('status')} |", f"| pictures decoded | {run.get('decoded')} of {run.get('pictures')} |",
            f"| wall, process start to exit (s) | {fmt(run.get('wall_s'), 4)} |",
            f"| seconds per stage (manifest) | {stages or 'not measured'} |",
            f"| wall less the stages: the page, the exit (s) | {fmt(outside, 3)} |",
            f"| decode batch size (auto) / encoder moved off the GPU | {run.get('decode_batch_size')} / "
            f"{run.get('encoder_offloaded')} |",
            f"| fitting the batch: the probes, within decode (s) | {fmt(run.get('decode_fit_s'), 3)} |",
            f"| dtypes: encoder / decoder | {run.get('encoder_dtype')} / {run.get('decoder_dtype')} |",
            f"| decode-only, same pictures and settings (s) | {fmt(summary['figures'].get('decode_only_s'), 4)} "
            f"(batch {only.get('batch')}) |", ""]


def tests_table(tests: dict) -> list[str]:
    lines = ["## GPU tests (`pytest -m gpu`)", "",
             f"passed {tests.get('passed')}, failed {tests.get('failed')}, skipped {tests.get('skipped')}", ""]
    lines += [f"- failed: {failure}" for failure in tests.get("failures", [])]
    lines += [f"- measured: {name} = {value}" for name, value in tests.get("properties", {}).items()]
    return lines + [""]


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] in ("-h", "--help"):
        print(__doc__)
        sys.exit(0 if sys.argv[1:] in (["-h"], ["--help"]) else 2)
    print(markdown(json.loads(open(sys.argv[1]).read())))
