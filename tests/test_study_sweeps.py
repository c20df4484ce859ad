"""A sweep of a study (`dsl run -m study=...`): its merge merges each study's table over the jobs and, for head
importance, computes the correlations again over every job's rows (dsl_cli.sweeps.merge_studies)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from dsl_cli.outputs import CORRELATIONS, IMPORTANCE, RunFolder, is_dsl_png, read_csv
from dsl_cli.study_registry import checked_correlations, get_study
from dsl_cli.sweeps import Job, pooling_refusal
from helpers import dsl_here, dsl_in_process

TINY = ["debug=tiny", "decode.enabled=false", "images.limit=2", "--multirun"]


def job_rows(folder: Path) -> list[dict]:
    return read_csv(folder / IMPORTANCE.name, IMPORTANCE)


def merged_table(sweep: Path, name: str) -> list[dict]:
    import csv

    with open(sweep / name, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def importance_sweep(tmp_path_factory) -> Path:
    """Head importance split by layer over two jobs, merged when the sweep ended."""
    root = tmp_path_factory.mktemp("hi")
    args = ["run", *TINY, "study=head_importance", "layer=0,1", "study.bootstrap=20", "hydra.sweep.dir=sw"]
    assert dsl_here(args, root) == 0
    return root / "sw"


def test_a_head_importance_sweep_merges_its_table_and_pools_the_correlations(importance_sweep: Path) -> None:
    sweep = importance_sweep
    rows = {job: job_rows(sweep / str(job)) for job in (0, 1)}
    merged = merged_table(sweep, IMPORTANCE.name)
    # every job's rows once, in job order, with the job and its overrides in front
    assert len(merged) == len(rows[0]) + len(rows[1]) == 16
    assert [(int(r["job"]), r["override.layer"], r["component"]) for r in merged] == \
        [(job, str(job), r["component"]) for job in (0, 1) for r in rows[job]]
    # pooled over all heads of all jobs, computed as one run computes its own, and checked as one run's is
    pooled = [r for r in read_csv(sweep / CORRELATIONS.name, CORRELATIONS) if r["image"] == "pooled"]
    assert {r["lens"]: r["n"] for r in pooled} == {"dsl": 16, "direct": 16, "direct_importance": 16}
    checked_correlations(sweep, rows[0] + rows[1])
    from dsl_cli.correlation import importance_correlations

    again = importance_correlations(rows[0] + rows[1], ["dsl", "direct", "direct_importance"], 20, 0)
    for key in ("spearman", "spearman_low", "pearson", "pearson_high"):  # the CSV keeps 6 decimals
        assert [r[key] for r in pooled] == pytest.approx([r[key] for r in again if r["image"] == "pooled"], abs=1e-5)
    manifest = json.loads((sweep / "manifest.json").read_text())
    assert [(j["rows"], j["study"]) for j in manifest["jobs"]] == [(8, "head_importance")] * 2
    assert manifest["rows"] == 0  # similarity.csv's, which a study fills none of
    assert manifest["studies"] == {"head_importance": {"table": IMPORTANCE.name, "rows": 16, "jobs": [0, 1],
                                                       "pooled": ["correlations.csv", "plots/head_importance.png"],
                                                       "not_pooled": None}}
    page = (sweep / "index.html").read_text()
    assert 'href="correlations.csv"' in page and 'href="study_head_importance.csv"' in page
    assert 'href="plots/head_importance.png"' in page and is_dsl_png(sweep / "plots" / "head_importance.png")


def test_a_pooled_sweep_gives_the_correlations_and_intervals_of_one_run_over_the_same_heads(
        importance_sweep: Path, tmp_path: Path) -> None:
    """The docs promise what one run would give: the point estimates were equal, but the bootstrap resampled
    rows in the order given (a sweep's layer by layer, a run's image by image), so the intervals differed."""
    args = ["run", *TINY[:-1], "study=head_importance", "layer=[0,1]", "study.bootstrap=20", "hydra.run.dir=one"]
    assert dsl_here(args, tmp_path) == 0
    one, pooled = (read_csv(folder / CORRELATIONS.name, CORRELATIONS) for folder in (tmp_path / "one", importance_sweep))
    assert len(one) == len(pooled) > 0
    for mine, theirs in zip(one, pooled):  # the run's from its own values, the merge's from the CSVs' 6 decimals
        assert {k: v for k, v in mine.items() if isinstance(v, str)} == \
            {k: v for k, v in theirs.items() if isinstance(v, str)}
        assert {k: v for k, v in mine.items() if not isinstance(v, str)} == pytest.approx(
            {k: v for k, v in theirs.items() if not isinstance(v, str)}, abs=2e-3, nan_ok=True), mine["image"]


def test_a_sweep_with_a_job_not_complete_merges_its_rows_and_pools_nothing(importance_sweep: Path, tmp_path,
                                                                          monkeypatch, capsys) -> None:
    sweep = tmp_path / "sw"
    shutil.copytree(importance_sweep, sweep)
    manifest = RunFolder(sweep / "1").manifest_json
    manifest.write_text(manifest.read_text().replace('"status": "complete"', '"status": "failed"'))
    code, out, err = dsl_in_process(["merge", str(sweep)], tmp_path, monkeypatch, capsys, out=True)
    assert code == 0, err
    assert "merged 8 rows of 1 of 2 jobs into" in out
    assert "not pooled: job 1 is failed: pooled over every job once all are complete" in out
    assert len(merged_table(sweep, IMPORTANCE.name)) == 8
    assert not (sweep / CORRELATIONS.name).exists()  # the earlier merge's pooled numbers are gone
    assert not (sweep / "plots" / "head_importance.png").exists()  # and their figure
    assert "not pooled: job 1 is failed" in (sweep / "index.html").read_text()


def test_jobs_differing_in_a_setting_or_overlapping_do_not_pool(importance_sweep: Path) -> None:
    study = get_study("head_importance")
    rows = job_rows(importance_sweep / "0")

    def jobs(*overrides: list[str], same: bool = True) -> list[Job]:
        return [Job(n, o, str(n), "complete", study=study, study_rows=rows if same or not n else
                    [{**r, "component": r["component"].replace("L00", "L01")} for r in rows])
                for n, o in enumerate(overrides)]

    split = jobs(["layer=0", "study.ablation=zero"], ["layer=1", "study.ablation=zero"], same=False)
    assert pooling_refusal(study, split, split, [r for j in split for r in j.study_rows]) is None
    alpha = jobs(["layer=0", "lens.alpha=1"], ["layer=1", "lens.alpha=4"], same=False)
    assert pooling_refusal(study, alpha, alpha, []) == ("the jobs differ in lens.alpha, which pooling would mix: "
                                                        "each job's own folder holds its statistics")
    twice = jobs(["layer=0"], ["layer=0,1"])  # the same heads in two jobs
    assert pooling_refusal(study, twice, twice, rows + rows).startswith(
        "their rows overlap or leave gaps (zero astronaut L00H00 has 2 rows)")


def test_an_overlay_removal_sweep_merges_its_rows_without_pooling(tmp_path, monkeypatch, capsys) -> None:
    args = ["run", *TINY, "study=overlay_removal", "layer=0,1", "study.steps=2", "study.random_orders=1",
            "study.greedy_pool=2", "hydra.sweep.dir=sw"]
    code, err = dsl_in_process(args, tmp_path, monkeypatch, capsys)
    assert code == 0, err
    sweep = tmp_path / "sw"
    merged = merged_table(sweep, "study_overlay_removal.csv")
    assert len(merged) == sum(len(merged_table(sweep / str(j), "study_overlay_removal.csv")) for j in (0, 1)) > 0
    assert {r["override.layer"] for r in merged} == {"0", "1"}
    studies = json.loads((sweep / "manifest.json").read_text())["studies"]
    assert studies["overlay_removal"]["pooled"] == [] and studies["overlay_removal"]["not_pooled"] is None
    assert not (sweep / CORRELATIONS.name).exists()
