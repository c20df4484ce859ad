"""What the pages say (`dsl report`, `dsl plot`, the adapter's page): each sentence true of the folder it
describes, and a damaged folder among several refused alone."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from dsl_cli import cli
from helpers import dsl_here

TARGET = "a photo of a cat"


@pytest.fixture(scope="module")
def attribution_run(tmp_path_factory) -> Path:
    """A tiny attribution run against a text target, no decoding (seconds): its page, heatmaps and looks/."""
    root = tmp_path_factory.mktemp("pages")
    assert dsl_here(["run", "debug=tiny", "images.limit=1", "lens=attribution", "layer=1",
                     f'lens.target="{TARGET}"', "decode.enabled=false", "hydra.run.dir=run"], root) == 0
    return root / "run"


def test_a_damaged_manifest_refuses_its_folder_alone(attribution_run: Path, tmp_path: Path, capsys) -> None:
    """Of three runs, one with a cut manifest.json and one with a cut similarity.csv: `dsl report` and
    `dsl plot` do the third and the folder's own page, then name both refused folders under one error line."""
    runs = tmp_path / "m"
    good, cut_manifest, cut_csv = (shutil.copytree(attribution_run, runs / name) for name in "abc")
    manifest = cut_manifest / "manifest.json"
    manifest.write_bytes(manifest.read_bytes()[:300])
    csv_lines = (cut_csv / "similarity.csv").read_text().splitlines(keepends=True)
    (cut_csv / "similarity.csv").write_text("".join(csv_lines[:2] + csv_lines[3:]))
    (good / "index.html").unlink()

    for command in ("report", "plot"):
        assert cli.main([command, str(runs)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("dsl: error: 2 of 3 folders left as they were"), err
        assert f"{manifest}: not a manifest" in err and f"{cut_csv / 'similarity.csv'}" in err
        assert (good / "index.html").is_file()
    assert "a/index.html" in (runs / "index.html").read_text()


def test_a_folder_page_shows_every_figure_a_run_drew(attribution_run: Path, tmp_path: Path) -> None:
    """The page of a folder of runs shows each run's figures, where its heads look (looks/) too."""
    runs = tmp_path / "runs"
    shutil.copytree(attribution_run, runs / "one")
    assert cli.main(["report", str(runs)]) == 0
    looks = sorted(p.relative_to(runs).as_posix() for p in (runs / "one" / "looks").glob("*.png"))
    assert looks and all(f'src="{name}"' in (runs / "index.html").read_text() for name in looks)


def test_an_attribution_page_shows_its_target_and_its_shares(attribution_run: Path) -> None:
    """An attribution run's scores are shares of cos(embedding, target): its settings name the target, its
    table holds the attribution column of similarity.csv."""
    html = (attribution_run / "index.html").read_text()
    assert f"attribution, target &quot;{TARGET}&quot;" in html
    components = html.split('id="components"')[1]
    assert '<th data-type="num" tabindex="0">attribution</th>' in components


def test_the_component_table_shows_every_column_a_run_filled_and_no_empty_one() -> None:
    """The run page's table left out what similarity.csv holds beyond the scores (the seeds' mean and spread,
    a head's top patches, a feature's description, `lens.text`'s labels); a column no row fills stays out."""
    from dsl_cli.report import components_section

    base = {"image": "cat", "lens": "steering", "kind": "head", "layer": 2, "head": 1, "sim_embed": 0.5,
            "sim_decoded": 0.7, "norm": 1.0, "rank": 1, "file": ""}
    rows = [base | {"component": "L02H01", "sim_decoded_mean": 0.61, "sim_decoded_std": 0.04,
                    "top_patches": "r0c1;r2c2", "labels": "tabby 0.31; tiger cat 0.29"},
            base | {"component": "L02H02", "head": 2, "description": "whiskers", "labels": ""}]
    html = components_section(rows, {})
    heads = [h.split(">")[1].split("<")[0] for h in html.split("<th ")[1:]]
    assert heads[9:] == ["sim_decoded_mean", "sim_decoded_std", "top_patches", "description", "top label",
                         "label score", "file"], heads
    assert ">0.610<" in html and ">r0c1; r2c2<" in html and ">whiskers<" in html and ">tabby<" in html
    assert ">0.310<" in html
    plain = components_section([base | {"component": "L02H01"}], {})
    assert [h.split(">")[1].split("<")[0] for h in plain.split("<th ")[1:]][9:] == ["file"]


def test_an_interrupted_sweeps_page_lists_every_job(tmp_path: Path) -> None:
    """A sweep stopped before its merge (its manifest the claim's stamp) and before its second job started:
    the page lists both jobs with their overrides and states, as `dsl merge` does."""
    assert dsl_here(["run", "--multirun", "debug=tiny", "images.limit=1", "decode.enabled=false", "layer=0,1",
                     "hydra.sweep.dir=sw"], tmp_path) == 0
    sweep = tmp_path / "sw"
    (sweep / "manifest.json").write_text(json.dumps({"made_by": "dsl", "kind": "sweep", "status": "interrupted"}))
    shutil.rmtree(sweep / "1")
    assert cli.main(["report", str(sweep)]) == 0
    html = (sweep / "index.html").read_text()
    assert "<p>1 of 2 jobs complete</p>" in html
    jobs = html.split("<h2>Jobs</h2>")[1].split("</table>")[0]
    assert "layer=0</td>" in jobs and "layer=1</td>" in jobs and ">not started</span>" in jobs


def decoding_manifest(**recorded) -> dict:
    return {"made_by": "dsl", "config": {"decode": {"enabled": True, "batch_size": 4, "steps": 2}}, **recorded}


@pytest.mark.parametrize("recorded, pictures, text", [
    ({"rows": 20, "decoded": 16, "resumed_rows": 20}, 20, "20 rows, 20 pictures (16 decoded in the last attempt)"),
    ({"rows": 4, "decoded": 3}, 3, "4 rows, 3 pictures"),  # decode.top_k=3: one row without a picture
])
def test_the_page_counts_the_pictures_a_run_holds(recorded: dict, pictures: int, text: str) -> None:
    """A resumed run decodes only what its earlier attempts had not: the manifest's `decoded` is that
    attempt's; the page counts the pictures from the rows."""
    from dsl_cli.report import settings_section

    rows = [{"file": f"p{n}.png" if n < pictures else ""} for n in range(recorded["rows"])]
    assert f"<td>{text}</td>" in settings_section(decoding_manifest(**recorded), rows=rows)


def test_an_sae_runs_settings_name_its_features_not_heads() -> None:
    """An SAE run reads the SAE's features at its own layer: `layer=30 component=heads` is not what it read."""
    from dsl_cli.report import settings_section

    sae = {"source": "my_sae", "hook_name": "blocks.1.hook_resid_post", "architecture": "topk", "d_sae": 40}
    manifest = decoding_manifest(components=4, layers=[1], sae=sae)
    manifest["config"] |= {"layer": 30, "head": "all", "component": "heads",
                           "sae": {"path": "my_sae", "features": "top", "top_k": 2}}
    html = settings_section(manifest)
    assert ("SAE my_sae (topk, 40 features at blocks.1.hook_resid_post): the 2 most active features of each "
            "image, each scored in every image, and the error term: 4 per image, layers read 1") in html
    assert "layer=30" not in html and "component=heads" not in html


@pytest.mark.parametrize("held_out", [0, 3])
def test_the_adapter_page_says_how_lambda_was_chosen(held_out: int, tmp_path: Path) -> None:
    """With no image held out, `adapters.fit` takes the smallest positive strength and has no metrics: the
    page says so, rather than a lambda "picked on the held-out images" beside a table of n/a."""
    from dsl_cli.adapter_page import write_adapter_page

    metrics = {"cosine_mean": 0.9, "heldout_images": held_out} if held_out else {}
    (tmp_path / "adapter.json").write_text(json.dumps({
        "name": "a", "readout": {"kind": "resid", "layer": 3}, "lambda": 5e-8, "relative_lambda": 1e-8,
        "heldout_fraction": 0.1, "heldout_images": held_out, "metrics": metrics}))
    html = write_adapter_page(tmp_path).read_text()
    assert ("picked on the held-out images" in html) == bool(held_out)
    assert ("no image was held out" in html) == (not held_out)
    assert ("n/a" in html) == bool(held_out)  # the metrics a few held-out images lack; none without them


@pytest.mark.parametrize(("kind", "says"), [("adapter", "the folder of an adapter: `dsl adapter fit` wrote its page"),
                                            ("sae", "the folder of an SAE (`dsl sae train`)")])
@pytest.mark.parametrize("command", ["report", "plot"])
def test_report_and_plot_of_an_adapter_or_sae_folder_say_what_it_is(kind: str, says: str, command: str,
                                                                     tmp_path: Path, capsys) -> None:
    """They said "no manifest.json ... in it", of a folder that holds dsl's own manifest.json."""
    folder = tmp_path / kind
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps({"made_by": "dsl", "kind": kind, "status": "complete"}))
    assert cli.main([command, str(folder)]) == 2
    err = capsys.readouterr().err
    assert says in err and "no manifest.json" not in err, err


def write_manifest(folder: Path, **manifest) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "manifest.json").write_text(json.dumps({"made_by": "dsl", "status": "complete", **manifest}))
    return folder


def test_the_overview_says_in_one_line_what_each_run_is(tmp_path: Path) -> None:
    """The page over many folders named each by its path and status alone: each now says what it is, from its
    manifest, escaped as the rest of the page."""
    from dsl_cli.report import collection_page

    runs = tmp_path / "outputs"
    run = write_manifest(runs / "a", images=["cat", "dog"], layers=[3], config={
        "lens": {"name": "steering<b>"}, "layer": 30, "head": "all", "component": "heads", "study": {"name": None}})
    study = write_manifest(runs / "b", images=["cat"], config={"lens": {"name": "steering"}, "layer": 30,
                                                               "study": {"name": "head_importance"}})
    sweep = runs / "sw"
    jobs = [{"job": n, "folder": str(n), "overrides": ["debug=tiny", f"layer={layer}", f"lens.alpha={alpha}"],
             "status": "complete", "error": None, "rows": 4} for n, (layer, alpha) in
            enumerate([(0, 1), (1, 1), (0, 4), (1, 4)])]
    write_manifest(sweep, kind="sweep", jobs=jobs)
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    html = collection_page(runs, [run, study, sweep])
    lines = [part.split("</p>")[0] for part in html.split("<p class=what>")[1:]]
    assert lines == ["steering&lt;b&gt; lens, layer 3, heads, 2 images", "study head_importance, 1 image",
                     "sweep of 4 jobs: layer=0,1 x lens.alpha=1,4"]


def test_a_clamped_runs_settings_say_what_it_read_before_what_it_asked() -> None:
    """debug=tiny keeps layer=30 and reads the tiny model's last layer: the settings led with `layer=30`."""
    from dsl_cli.report import settings_section

    manifest = decoding_manifest(components=4, layers=[3])
    manifest["config"] |= {"layer": 30, "head": "all", "component": "heads", "clamp_to_model": True}
    rows = [{"file": "", "kind": "head", "layer": 3, "head": h} for h in range(4)]
    html = settings_section(manifest, rows=rows)
    assert ("<td>layers read 3 (asked layer=30, moved into the model by clamp_to_model), heads read 0-3, "
            "component=heads: 4 per image</td>") in html
    listed = decoding_manifest(components=2)  # labels, before the layers were recorded: as typed
    listed["config"] |= {"layer": 30, "head": "all", "component": ["L3MLP", "L0H1"]}
    assert "component=[L3MLP, L0H1]: 2 per image" in settings_section(listed, rows=rows)
    manifest["config"] |= {"layer": [1, 3], "clamp_to_model": False}
    manifest["layers"] = [1, 3]
    assert "<td>layers read 1, 3, heads read 0-3, component=heads: 4 per image</td>" in settings_section(
        manifest, rows=rows)


def test_an_overlay_study_on_a_small_model_says_the_settings_it_ran_with() -> None:
    """On 16 heads `steps 40` ran 16 steps and decoded steps 0, 5, 10, 16: the page said 40 and [0, 5, 10, 20,
    40], while its plot and fades showed what ran."""
    from types import SimpleNamespace

    from dsl_cli.report import settings_section
    from dsl_cli.studies import clamped_settings

    study = SimpleNamespace(steps=40, greedy_pool=32, decode_steps=[0, 5, 10, 20, 40])
    clamped = clamped_settings(study, 16, decoded=True)
    assert clamped == {"steps": 16, "greedy_pool": 16, "decode_steps": [0, 5, 10, 16]}
    assert clamped_settings(study, 64, decoded=False) == {}  # a model as large as asked: nothing to say
    assert clamped_settings(SimpleNamespace(**{**vars(study), "greedy_pool": None}), 64, True) == {}  # None: all
    config = {"study": {"name": "overlay_removal", "steps": 40, "greedy_pool": 32, "decode_steps": [0, 5, 10, 20, 40]}}
    html = settings_section({"made_by": "dsl", "config": config, "components": 16,
                             "study": {"clamped": clamped}}, study=True)
    assert ("steps 40 (ran 16 over the 16 heads), greedy_pool 32 (ran 16 over the 16 heads), decode_steps "
            "[0, 5, 10, 20, 40] (ran [0, 5, 10, 16] over the 16 heads)") in html


def test_a_study_sweeps_page_shows_its_pooled_plot_apart_from_each_jobs(tmp_path: Path) -> None:
    """A sweep of a study over layer=0,1 pools the jobs into plots/head_importance.png: the page only linked
    it, and headed each job's own plots with the pooled one's path."""
    assert dsl_here(["run", "--multirun", "debug=tiny", "images.limit=1", "study=head_importance", "layer=0,1",
                     "hydra.sweep.dir=sw"], tmp_path) == 0
    html = (tmp_path / "sw" / "index.html").read_text()
    pooled, each = html.split("<h2>Pooled over all jobs</h2>")[1].split("<h2>Each job's own heatmaps and plots</h2>")
    assert '<img src="plots/head_importance.png"' in pooled and "head_importance pooled over jobs 0, 1" in pooled
    assert "<h3>plots/head_importance.png of each job</h3>" in each and 'src="0/plots/head_importance.png"' in each
    assert "<h3>plots/head_importance.png</h3>" not in html
    # each job's page says which heads it ablated (a study records them: it writes no similarity.csv)
    job = (tmp_path / "sw" / "1" / "index.html").read_text()
    assert "<td>layers read 1, heads read 0-3, component=heads: 4 per image</td>" in job


def test_an_unmerged_sweeps_jobs_are_listed_by_their_numbers(tmp_path: Path) -> None:
    """A sweep with no merge yet (stopped, or still running) lists its jobs from their folders, by the number
    Hydra saved in each: job 10 after job 9, whatever the folders are named (`hydra.sweep.subdir=job_N`), and a
    job that never started leaves its number out (the folders were sorted as text and numbered in that order:
    folder 10 was job 2)."""
    from dsl_cli.report import manifest_jobs

    numbers = [n for n in range(13) if n != 7]  # job 7 never started
    for num in numbers:
        folder = tmp_path / f"job_{num}"
        (folder / ".hydra").mkdir(parents=True)
        (folder / ".hydra" / "hydra.yaml").write_text(f"hydra:\n  job:\n    num: {num}\n")
        status = "complete" if num else "failed"
        (folder / "manifest.json").write_text(json.dumps({"made_by": "dsl", "status": status}))
    jobs = manifest_jobs(tmp_path)
    assert [(job["job"], job["folder"]) for job in jobs] == [(num, f"job_{num}") for num in numbers]
    assert jobs[0]["status"] == "failed" and jobs[10]["status"] == "complete"
    for folder in tmp_path.glob("job_*"):  # a copy without its dot-folders: Hydra's default names are the numbers
        shutil.rmtree(folder / ".hydra")
        folder.rename(tmp_path / folder.name.removeprefix("job_"))
    assert [job["job"] for job in manifest_jobs(tmp_path)] == numbers
