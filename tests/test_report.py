"""The pages of a run, a study and a sweep (`dsl report`), opened in headless Chromium from file:// with the
network off: every picture loads, every link leads to a file, sorting and filtering the component table
work, nothing is fetched from anywhere but the disk; and `dsl plot` redraws study figures from files alone.

The browser tests need Chromium (Debian's `chromium-headless-shell` or `chromium`; `.ci/run` installs one)
and Playwright (a dev dependency); they are skipped, saying which is missing, where either is absent.
Each saves a full-page screenshot as a test artefact and prints its path. DSL_TEST_CHROMIUM=/path/to/chrome picks
another browser.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

from dsl_cli import cli

BROWSERS = ("/usr/bin/chromium-headless-shell", "/usr/bin/chromium")
# no sandbox (CI runs as root), no GPU, a fresh profile, and nothing that would reach the network
BROWSER_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-default-apps", "--no-default-browser-check"]
TINY = ["debug=tiny", "images.limit=2"]


def dsl_run(*args: str) -> None:
    assert cli.main(["run", *TINY, *args]) == 0


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """A run (two layers, heads and MLPs: 10 components per image), a head-importance study and a sweep of
    two jobs (lens.alpha=1,4), made in this process, and their pages written by `dsl report`."""
    root = tmp_path_factory.mktemp("report")
    made = {"run": root / "run", "study": root / "study", "sweep": root / "sweep"}
    dsl_run("layer=[1,3]", "component=all", f"hydra.run.dir={made['run']}")
    dsl_run("study=head_importance", "layer=all", f"hydra.run.dir={made['study']}")
    dsl_run("--multirun", "layer=1", "lens.alpha=1,4", f"hydra.sweep.dir={made['sweep']}")
    assert cli.main(["report", str(root)]) == 0
    return made


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """A headless Chromium with a fresh profile and the network off (Playwright's offline mode)."""
    candidates = [os.environ["DSL_TEST_CHROMIUM"]] if os.environ.get("DSL_TEST_CHROMIUM") else BROWSERS
    executable = next((b for b in candidates if Path(b).is_file()), None)
    if executable is None:
        pytest.skip(f"no Chromium here (looked for {', '.join(candidates)}): `apt-get install "
                    "chromium-headless-shell` (.ci/run installs it)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is missing: pip install -e '.[dev]'")
    with sync_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("profile")), executable_path=executable, headless=True,
            args=BROWSER_FLAGS, offline=True, viewport={"width": 1400, "height": 900})
        yield context
        context.close()


def open_page(browser, path: Path, screenshot: Path):
    """Open a page from file://, load every picture (lazy ones too), check what it loaded, and save a
    full-page screenshot. Returns the page."""
    page = browser.new_page()
    requests, errors = [], []
    page.on("request", lambda request: requests.append(request.url))
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.goto(path.as_uri())
    page.evaluate("document.querySelectorAll('img').forEach(i => { i.loading = 'eager'; })")
    page.wait_for_function("[...document.images].every(i => i.complete)", timeout=30_000)
    pictures = page.evaluate("[...document.images].map(i => [i.getAttribute('src'), i.naturalWidth])")
    assert pictures, "no picture on the page"
    assert [src for src, width in pictures if width == 0] == [], "pictures that did not load"
    assert all(url.startswith("file://") for url in requests), [u for u in requests if not u.startswith("file://")]
    assert errors == []
    for href in page.evaluate("[...document.querySelectorAll('a[href]')].map(a => a.href)"):
        url = urlparse(href)
        assert url.scheme == "file" and Path(unquote(url.path)).exists(), href
    page.screenshot(path=str(screenshot), full_page=True)
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    print(f"screenshot: {screenshot}")
    return page


def visible_column(page, name: str) -> list[str]:
    """The data-v (sort value) of column `name` in the visible rows of the component table."""
    return page.evaluate("""name => {
        const table = document.querySelector('#components table');
        const i = [...table.tHead.rows[0].cells].findIndex(th => th.textContent === name);
        return [...table.tBodies[0].rows].filter(r => !r.hidden).map(r => r.cells[i].dataset.v);
    }""", name)


def test_run_page_in_a_browser(folders, browser, tmp_path, record_property) -> None:
    folder = folders["run"]
    rows = read_rows(folder / "similarity.csv")
    shot = tmp_path / "run_page.png"
    page = open_page(browser, folder / "index.html", shot)
    record_property("screenshot", str(shot))
    # a picture per decoded row (best pictures), the inputs, the figures: all loaded above
    assert page.locator("img").count() >= len({r["image"] for r in rows}) + sum(1 for r in rows if r["file"])
    assert page.locator("#components tbody tr").count() == len(rows)
    page.click("#components th:text-is('sim_embed')")
    sims = [float(v) for v in visible_column(page, "sim_embed")]
    assert sims[0] == max(float(r["sim_embed"]) for r in rows) and sims == sorted(sims, reverse=True)
    page.click("#components th:text-is('sim_embed')")  # a second click: lowest first
    assert float(visible_column(page, "sim_embed")[0]) == min(float(r["sim_embed"]) for r in rows)
    page.select_option("#components select[data-filter=layer]", "3")
    page.select_option("#components select[data-filter=kind]", "head")
    assert visible_column(page, "layer") == ["3"] * sum(r["layer"] == "3" and r["kind"] == "head" for r in rows)
    # each heatmap cell links to its picture
    cells = page.locator("table.heat td a")
    assert cells.count() == 2 * len(rows)  # sim_embed and sim_decoded panels
    assert {unquote(urlparse(h).path).split(f"{folder.name}/", 1)[1] for h in
            page.eval_on_selector_all("table.heat td a", "as => as.map(a => a.href)")} == {r["file"] for r in rows}
    text = page.inner_text("body")
    for setting in ("tiny", "steering", "norm, 2.0", "DDPMScheduler, 2 steps, guidance 4.0", "fp32", "cpu",
                    "torch", "stage times"):
        assert setting in text, setting
    assert re.search(r"encoder dtype\s+fp32\n", text), "the encoder's precision is not shown"


def test_study_page_in_a_browser(folders, browser, tmp_path, record_property) -> None:
    folder = folders["study"]
    shot = tmp_path / "study_page.png"
    page = open_page(browser, folder / "index.html", shot)
    record_property("screenshot", str(shot))
    assert page.locator("img[src='plots/head_importance.png']").count() == 1
    pooled = [r for r in read_rows(folder / "correlations.csv") if r["image"] == "pooled"]
    text = page.inner_text("body")
    assert all(f"{float(r['spearman']):.3f}" in text for r in pooled) and "head_importance" in text
    rows = read_rows(folder / "study_head_importance.csv")
    assert page.locator("section tbody tr").count() == len(rows)


def test_sweep_page_in_a_browser(folders, browser, tmp_path, record_property) -> None:
    folder = folders["sweep"]
    shot = tmp_path / "sweep_page.png"
    page = open_page(browser, folder / "index.html", shot)
    record_property("screenshot", str(shot))
    jobs = page.eval_on_selector_all("table tbody tr", "rows => rows.map(r => [...r.cells].map(c => c.textContent))")
    assert [(job[0], job[2]) for job in jobs] == [("0", "complete"), ("1", "complete")]
    assert "lens.alpha=1" in jobs[0][1] and "lens.alpha=4" in jobs[1][1]
    # every job's heatmap of each image, side by side, captioned with the job's overrides
    heatmaps = sorted(folder.glob("*/heatmaps/*.png"))
    assert len(heatmaps) == 2 * 2 and page.locator("figure img[src*='/heatmaps/']").count() == len(heatmaps)
    # the merged heatmaps (dsl merge, at the end of the sweep): one per image and value of lens.alpha
    merged = sorted(p.name for p in folder.glob("heatmaps/*.png"))
    assert merged == [f"{image}_steering_lens.alpha={alpha}.png" for image in ("astronaut", "chelsea")
                      for alpha in (1, 4)]
    assert sorted(unquote(src).split("/")[-1] for src in page.eval_on_selector_all(
        "img[src^='heatmaps/']", "images => images.map(i => i.getAttribute('src'))")) == merged


# ---------------------------------------------------------------- without a browser


class Elements(HTMLParser):
    """The start tags with their attributes, and the text."""

    def __init__(self):
        super().__init__()
        self.tags, self.text = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def test_everything_written_into_a_page_is_escaped(folders, tmp_path) -> None:
    """Markup in what a page shows from the files (an error message, config values, image names in the
    manifest, a label) comes out as text: one <script> (the page's own), no element it would make."""
    folder = shutil.copytree(folders["run"], tmp_path / "run")
    hostile = '<script>alert("x")</script>&<img src=x onerror=alert(1)>'
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest |= {"status": "failed", "error": hostile, "images": [hostile], "git_commit": hostile}
    manifest["config"]["encoder"]["checkpoint"] = hostile
    (folder / "manifest.json").write_text(json.dumps(manifest))
    (folder / "index.html").unlink()
    assert cli.main(["report", str(folder)]) == 0
    parsed = Elements()
    parsed.feed((folder / "index.html").read_text())
    assert [tag for tag, _ in parsed.tags].count("script") == 1
    assert not any("onerror" in attrs or attrs.get("src") == "x" for _, attrs in parsed.tags)
    assert "".join(parsed.text).count(hostile) == 4


@pytest.mark.parametrize("asked, used, fitting, text", [
    ("auto", 80, 0.43, "80 per batch (auto, fitted in 0.4 s)"),  # on a GPU: the probes' time
    ("auto", 8, 0.001, "8 per batch (auto)"),  # on the CPU: nothing to fit
    (6, 6, 0.0, "6 per batch"),  # the user's
    ("auto", None, None, "auto per batch"),  # a manifest from before the batch was recorded
])
def test_the_page_shows_the_batch_the_run_decoded_in(asked, used, fitting, text) -> None:
    from dsl_cli.report import settings_section

    config = {"decode": {"enabled": True, "batch_size": asked, "steps": 2, "dtype": "bf16"}}
    manifest = {"made_by": "dsl", "config": config, "decode_batch_size": used, "decode_fit_seconds": fitting}
    assert f"every component per image, {text}, bf16</td>" in settings_section(manifest)


def test_report_on_a_folder_with_nothing_in_it(tmp_path: Path, capsys) -> None:
    assert cli.main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dsl: error:") and "no dsl run here" in err and err.count("\n") == 1
    assert cli.main(["report", str(tmp_path / "missing")]) == 2
    assert "not a folder" in capsys.readouterr().err
    (tmp_path / "similarity.csv").write_text("image,lens,component\n")  # a run whose manifest.json was deleted
    assert cli.main(["report", str(tmp_path)]) == 2
    assert "holds a similarity.csv but no manifest.json" in capsys.readouterr().err


FOREIGN = {"manifest.json and similarity.csv": {"manifest.json": '{"name": "x"}', "similarity.csv": "a,b\n"},
           "multirun.yaml": {"multirun.yaml": "hydra:\n  job:\n    name: other_app\n"}}


@pytest.mark.parametrize("command", ["report", "plot"])
@pytest.mark.parametrize("names", list(FOREIGN))
def test_a_folder_of_another_programs_files_is_named_as_such(names: str, command: str, tmp_path: Path,
                                                             capsys) -> None:
    """Not "no manifest.json, similarity.csv or multirun.yaml", which is false: the first folder that holds
    them, and that they are not dsl's."""
    for name, text in FOREIGN[names].items():
        (tmp_path / "f" / "p").mkdir(parents=True, exist_ok=True)
        (tmp_path / "f" / "p" / name).write_text(text)
    for given, where in ((tmp_path / "f", f"{tmp_path / 'f'}: no dsl run here, nor a study or sweep; "
                                          f"{tmp_path / 'f' / 'p'} "),
                         (tmp_path / "f" / "p", f"{tmp_path / 'f' / 'p'}: ")):
        assert cli.main([command, str(given)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"dsl: error: {where}holds {names} of another program, not "
                                                       "dsl's: report and plot work only in dsl's folders"), err


def test_report_help(capsys) -> None:
    assert cli.main(["report", "--help"]) == 0
    assert capsys.readouterr().out.startswith("usage: dsl report FOLDER")


def test_plot_redraws_a_study_from_its_files_alone(folders, tmp_path, monkeypatch) -> None:
    folder = shutil.copytree(folders["study"], tmp_path / "study")
    (folder / "plots" / "head_importance.png").unlink()
    (folder / "index.html").unlink()

    def no_model(*args, **kwargs):
        raise AssertionError("dsl plot built a model")

    monkeypatch.setattr("dsl_cli.encoder.HookedEncoder.__init__", no_model)
    assert cli.main(["plot", str(folder)]) == 0
    assert (folder / "plots" / "head_importance.png").read_bytes() == (
        folders["study"] / "plots" / "head_importance.png").read_bytes()
    assert (folder / "index.html").is_file()
