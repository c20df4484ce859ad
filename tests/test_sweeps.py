"""Sweeps on one machine: image shards, the merged sweep folder (CSV, heatmaps, manifest), resuming a sweep,
`launcher=local_gpus`, and a requeued SLURM job's claim on its own run folder (with SLURM's environment
variables set by hand; tests/test_slurm.py submits to a real SLURM)."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf
from PIL import Image

from dsl_cli import cli
from dsl_cli.config import ImagesConfig, register_configs
from dsl_cli.errors import UserError
from dsl_cli.images import load_images
from dsl_cli.outputs import SIMILARITY, type_row
from dsl_cli.figures import heatmap_matrix
from dsl_cli.resumption import requeued_run
from dsl_cli.sweeps import OVERRIDE, expected_overrides, pin_gpu
from helpers import dsl_here, dsl_in_process
import zygote  # dsl processes forked after the model libraries' imports (tests/zygote.py)

DSL = str(Path(sys.executable).parent / "dsl")
FAST = ["debug=tiny", "decode.enabled=false", "layer=1", "images.limit=2"]  # later overrides win


def dsl(*args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return zygote.run([DSL, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def job_folders(sweep: Path) -> dict[int, Path]:
    return {int(p.name): p for p in sweep.iterdir() if p.name.isdigit()}


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- image shards


def test_image_shards_are_disjoint_stable_and_cover_the_set(tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    for index, name in enumerate(["a.png", "a.jpg", "b.png", "c.png", "d.png", "e.png", "f.png"]):
        Image.new("RGB", (32, 32), (index * 30, 0, 0)).save(folder / name)
    cfg = OmegaConf.structured(ImagesConfig(source="folder", path=str(folder)))
    whole = [(item.name, item.source) for item in load_images(cfg).images]
    assert len({name for name, _ in whole}) == 7  # the two `a` files keep distinct names
    for count in range(1, 8):
        shards = []
        for index in range(count):
            cfg.shard, cfg.num_shards = index, count
            shards.append([(item.name, item.source) for item in load_images(cfg).images])
            assert [(i.name, i.source) for i in load_images(cfg).images] == shards[-1]  # stable
        together = [item for shard in shards for item in shard]
        assert sorted(together) == sorted(whole), count  # every image once: no overlap, no gap


@pytest.mark.parametrize(("shard", "count", "fragment"), [
    (3, 3, "images.shard=3: must be between 0 and"), (None, 2, "needs images.shard"),
    (0, 0, "images.num_shards=0"), (5, 6, "holds no image"),
])
def test_bad_shard_settings_are_refused(shard, count, fragment) -> None:
    cfg = OmegaConf.structured(ImagesConfig(source="samples", shard=shard, num_shards=count))
    with pytest.raises(UserError, match=fragment):
        load_images(cfg)


def test_whole_model_preset_splits_a_sweep_by_image(tmp_path: Path, monkeypatch, capsys) -> None:
    """sweep=whole_model in 3 jobs gives, merged, exactly the rows of one unsharded run: every image once."""
    whole = ["images.limit=null", "layer=all", "component=all"]  # debug=tiny picks layer 1 and 2 images
    code, out = dsl_in_process(["run", *FAST, *whole, "hydra.run.dir=whole"], tmp_path, monkeypatch, capsys)
    assert code == 0, out
    code, out = dsl_in_process(["run", *FAST, *whole, "sweep=whole_model", "images.num_shards=3",
                                "hydra.sweep.dir=sweep", "--multirun"], tmp_path, monkeypatch, capsys)
    assert code == 0, out
    merged = read_rows(tmp_path / "sweep" / "similarity.csv")
    images_of = {}
    for row in merged:
        images_of.setdefault(row[OVERRIDE + "images.shard"], set()).add(row["image"])
    assert sorted(images_of) == ["0", "1", "2"]
    assert sum(len(s) for s in images_of.values()) == len(set().union(*images_of.values())) == 5
    # the same rows as one run, up to float noise (the encoder saw batches of other sizes)
    reference = {(r["image"], r["component"]): r for r in read_rows(tmp_path / "whole" / "similarity.csv")}
    assert sorted((r["image"], r["component"]) for r in merged) == sorted(reference)
    for row in merged:
        expected = reference[(row["image"], row["component"])]
        for column in SIMILARITY.columns:
            if column in ("sim_embed", "norm"):
                assert float(row[column]) == pytest.approx(float(expected[column]), abs=1e-5)
            else:
                assert row[column] == expected[column], column


# ---------------------------------------------------------------- merging a sweep


@pytest.fixture(scope="module")
def alpha_sweep(tmp_path_factory) -> Path:
    """Four jobs (layer 0 and 1, alpha 1 and 4), scores only, merged by the callback when the sweep ended."""
    root = tmp_path_factory.mktemp("alpha")
    assert dsl_here(["run", *FAST, "hydra.sweep.dir=sweep", "--multirun", "layer=0,1", "lens.alpha=1,4"], root) == 0
    return root / "sweep"


@pytest.fixture
def sweep_copy(alpha_sweep: Path, tmp_path: Path) -> Path:
    shutil.copytree(alpha_sweep, tmp_path / "sweep")
    return tmp_path / "sweep"


def test_merged_csv_holds_every_jobs_rows_with_its_overrides(alpha_sweep: Path) -> None:
    merged = read_rows(alpha_sweep / "similarity.csv")
    expected = []
    for num, folder in sorted(job_folders(alpha_sweep).items()):
        overrides = dict(o.split("=", 1) for o in OmegaConf.load(folder / ".hydra" / "overrides.yaml"))
        for row in read_rows(folder / "similarity.csv"):
            expected.append({"job": str(num), **{OVERRIDE + k: v for k, v in overrides.items()}, **row})
    assert merged == expected
    assert {(r[OVERRIDE + "layer"], r["layer"]) for r in merged} == {("0", "0"), ("1", "1")}
    assert {(r[OVERRIDE + "lens.alpha"], r["alpha"]) for r in merged} == {("1", "1.000000"), ("4", "4.000000")}


def test_the_sweep_is_expanded_as_hydra_launched_it(alpha_sweep: Path) -> None:
    launched = {num: list(OmegaConf.load(folder / ".hydra" / "overrides.yaml"))
                for num, folder in job_folders(alpha_sweep).items()}
    assert expected_overrides(alpha_sweep) == launched


def test_heatmaps_hold_all_layers_per_value_of_the_swept_alpha(alpha_sweep: Path) -> None:
    names = sorted(p.name for p in (alpha_sweep / "heatmaps").glob("*.png"))
    assert names == [f"{image}_steering_lens.alpha={alpha}.png" for image in ("astronaut", "chelsea")
                     for alpha in (1, 4)]
    rows = [type_row(r, SIMILARITY, "sweep row") for r in read_rows(alpha_sweep / "similarity.csv")
            if r["image"] == "astronaut" and r[OVERRIDE + "lens.alpha"] == "4"]
    layers, columns, matrix = heatmap_matrix(rows, "sim_embed")
    assert layers == [0, 1] and columns == ["H00", "H01", "H02", "H03"]  # two jobs in one figure
    for row in rows:
        assert matrix[int(row["layer"]), int(row["head"])] == float(row["sim_embed"])
    manifest = json.loads((alpha_sweep / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["complete"] == 4 and manifest["rows"] == len(
        read_rows(alpha_sweep / "similarity.csv"))
    assert sorted(manifest["figures"]) == [f"heatmaps/{name}" for name in names]


def test_merging_twice_gives_the_same_bytes(alpha_sweep: Path, sweep_copy: Path, monkeypatch, capsys) -> None:
    written = ["similarity.csv", "manifest.json", "index.html", "heatmaps"]
    by_callback = {name: data for name, data in files(sweep_copy).items() if name.split("/")[0] in written}
    for _ in range(2):
        code, err = dsl_in_process(["merge", str(sweep_copy)], sweep_copy.parent, monkeypatch, capsys)
        assert code == 0, err
        again = {name: data for name, data in files(sweep_copy).items() if name.split("/")[0] in written}
        assert again == by_callback


def test_merged_heatmaps_name_the_models_their_jobs_share(sweep_copy: Path, monkeypatch, capsys) -> None:
    """Each job's heatmap title names its encoder (and decoder where it decoded); the merged ones named none, the
    sweep's manifest holding no config."""
    from dsl_cli import figures

    titles, draw = [], figures.heatmap_figure
    monkeypatch.setattr(figures, "heatmap_figure", lambda rows, title, *a: titles.append(title) or draw(rows, title, *a))
    code, err = dsl_in_process(["merge", str(sweep_copy)], sweep_copy.parent, monkeypatch, capsys)
    assert code == 0, err
    job = figures.models_text(job_folders(sweep_copy)[0], decoded=False)
    assert job and len(titles) == 4 and all(title.endswith(f" | {job}") for title in titles), (job, titles)


def test_failed_unfinished_and_missing_jobs_are_listed_not_merged(sweep_copy: Path, monkeypatch, capsys) -> None:
    for num, status in ((1, "failed"), (2, "interrupted")):
        path = sweep_copy / str(num) / "manifest.json"
        manifest = json.loads(path.read_text()) | {"status": status, "error": "out of memory" if num == 1 else None}
        path.write_text(json.dumps(manifest))
    shutil.rmtree(sweep_copy / "3")  # a job that never started
    monkeypatch.chdir(sweep_copy.parent)
    assert cli.main(["merge", str(sweep_copy)]) == 0
    out = capsys.readouterr().out
    assert "job 1 (layer=0 lens.alpha=4) failed: out of memory" in out
    assert "job 3 (layer=1 lens.alpha=4) not started" in out
    manifest = json.loads((sweep_copy / "manifest.json").read_text())
    assert manifest["status"] == "incomplete" and manifest["complete"] == 1
    assert [(j["job"], j["error"]) for j in manifest["failed"]] == [(1, "out of memory")]
    assert [(j["job"], j["status"], j["folder"]) for j in manifest["unfinished"]] == [
        (2, "interrupted", "2"), (3, "not started", None)]
    assert {r["job"] for r in read_rows(sweep_copy / "similarity.csv")} == {"0"}


def test_plot_redraws_the_jobs_and_the_sweep(sweep_copy: Path, monkeypatch, capsys) -> None:
    heatmaps = {p.name: p.read_bytes() for p in (sweep_copy / "heatmaps").glob("*.png")}
    shutil.rmtree(sweep_copy / "heatmaps")
    monkeypatch.chdir(sweep_copy.parent)
    assert cli.main(["plot", str(sweep_copy)]) == 0
    assert {p.name: p.read_bytes() for p in (sweep_copy / "heatmaps").glob("*.png")} == heatmaps
    assert capsys.readouterr().out.count("redrew") == 5  # four jobs and the sweep


MERGED_DAMAGE = {"a row removed": lambda lines: lines[:2] + lines[3:],
                 "a row repeated": lambda lines: [*lines, lines[1]]}


@pytest.mark.parametrize("damage", list(MERGED_DAMAGE))
def test_report_refuses_a_merged_csv_edited_since_the_merge_and_names_the_merge_that_mends_it(
        damage: str, sweep_copy: Path, monkeypatch, capsys) -> None:
    """`dsl report` of a merged sweep whose similarity.csv lost a row or holds one twice: refused as `dsl plot`
    refuses it, in a line naming the file and `dsl merge`, the sweep's page and CSV left as they were (its
    page, read from the manifest, had shown the rows as whole); that merge mends it."""
    merged = sweep_copy / "similarity.csv"
    merged.write_text("".join(MERGED_DAMAGE[damage](merged.read_text().splitlines(keepends=True))))
    kept = {name: (sweep_copy / name).read_bytes() for name in ("similarity.csv", "index.html")}
    code, err = dsl_in_process(["report", str(sweep_copy)], sweep_copy.parent, monkeypatch, capsys)
    assert code == 2 and "Traceback" not in err, err[-3000:]
    assert len([line for line in err.splitlines() if line.startswith("dsl: error:")]) == 1, err
    assert f"{merged}: " in err and f"`dsl merge {sweep_copy}` writes it again" in err, err
    assert {name: (sweep_copy / name).read_bytes() for name in kept} == kept
    assert dsl_in_process(["merge", str(sweep_copy)], sweep_copy.parent, monkeypatch, capsys)[0] == 0
    assert dsl_in_process(["report", str(sweep_copy)], sweep_copy.parent, monkeypatch, capsys)[0] == 0


def test_merge_refuses_a_sweep_that_a_live_process_is_writing(sweep_copy: Path, monkeypatch, capsys) -> None:
    import socket

    before = (sweep_copy / "similarity.csv").read_bytes()
    # a live Python process, as dsl's is (pytest's parent may be a shell, which a lock check may tell apart)
    writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (sweep_copy / ".dsl.lock").write_text(f"{writer.pid} {socket.gethostname()} feedface\n")
        code, err = dsl_in_process(["merge", str(sweep_copy)], sweep_copy.parent, monkeypatch, capsys)
    finally:
        writer.kill()
        writer.wait()
    assert code == 2 and f"is being written by dsl process {writer.pid}" in err
    assert "hydra.run.dir" not in err  # no setting of a run moves a merge
    assert (sweep_copy / "similarity.csv").read_bytes() == before


def test_merge_refuses_a_folder_that_is_not_a_sweep(tmp_path: Path, monkeypatch, capsys) -> None:
    code, out = dsl_in_process(["merge", str(tmp_path)], tmp_path, monkeypatch, capsys)
    assert code == 2 and out.count("\n") == 1 and "not a sweep folder" in out


def test_swept_paths_that_sanitise_alike_or_run_long_get_distinct_bounded_heatmaps(tmp_path: Path, monkeypatch,
                                                                                   capsys) -> None:
    """`images.path` swept over q/r and q_r: both sanitised to `q_r`, the second job's heatmap overwrote the
    first's and the manifest listed it twice; a value of 200+ characters made a file name too long, and the
    sweep could never be merged. Each value now gets a tag of its own, cut short and hashed."""
    long = tmp_path / ("a" * 120) / ("b" * 120)
    for folder in (tmp_path / "q" / "r", tmp_path / "q_r", long):
        folder.mkdir(parents=True)
        Image.new("RGB", (32, 32), (200, 0, 0)).save(folder / "x.png")
    paths = ",".join(str(f) for f in (tmp_path / "q" / "r", tmp_path / "q_r", long))
    code, err = dsl_in_process(["run", "-m", *FAST, "images.limit=1", f"images.path={paths}", "hydra.sweep.dir=sw"],
                               tmp_path, monkeypatch, capsys)
    assert code == 0, err[-3000:]
    manifest = json.loads((tmp_path / "sw" / "manifest.json").read_text())
    drawn = sorted(p.name for p in (tmp_path / "sw" / "heatmaps").glob("*.png"))
    assert manifest["status"] == "complete" and len(drawn) == 3 and len(set(manifest["figures"])) == 3, drawn
    assert sorted(manifest["figures"]) == [f"heatmaps/{name}" for name in drawn]
    assert all(len(name) < 100 for name in drawn), drawn


# ---------------------------------------------------------------- resuming a sweep


def test_resumed_sweep_skips_complete_jobs_and_continues_the_others(tmp_path: Path) -> None:
    """A sweep killed in its second job, resumed: the first job is left alone, the second keeps its finished
    pictures and ends with the files of the first (the jobs differ only in the encoder's batch size, which
    does not change one image's results: the first job is the uninterrupted reference)."""
    sweep = tmp_path / "sweep"
    slow = ["debug=tiny", "layer=1", "component=all", "images.limit=1", "decode.batch_size=1"]  # 5 pictures a job, one by one
    process = zygote.popen([DSL, "run", *slow, f"hydra.sweep.dir={sweep}", "--multirun",
                                "encoder.batch_size=1,2"],
                               cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while len(list(sweep.glob("1/images/*/steering/*.png"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    first = files(sweep / "0")
    assert json.loads((sweep / "0" / "manifest.json").read_text())["status"] == "complete"

    result = dsl("run", f"resume={sweep}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "0: this job completed before; nothing to do" in result.stdout  # Hydra logs to stdout
    assert {k: v for k, v in files(sweep / "0").items() if not k.startswith((".hydra", "dsl.log"))} == {
        k: v for k, v in first.items() if not k.startswith((".hydra", "dsl.log"))}
    job = json.loads((sweep / "1" / "manifest.json").read_text())
    assert 0 < job["resumed_rows"] < 5 and job["decoded"] == 5 - job["resumed_rows"]
    assert read_rows(sweep / "1" / "similarity.csv") == read_rows(sweep / "0" / "similarity.csv")
    pictures = lambda run: {p.name: p.read_bytes() for p in run.glob("images/*/steering/*.png")}  # noqa: E731
    assert len(pictures(sweep / "1")) == 5 and pictures(sweep / "1") == pictures(sweep / "0")
    assert json.loads((sweep / "manifest.json").read_text())["status"] == "complete"


# ---------------------------------------------------------------- a requeued job's own folder


def test_a_requeued_job_continues_its_run_and_no_other_job_may(tmp_path: Path, monkeypatch, capsys) -> None:
    args = ["run", *FAST, "hydra.run.dir=run"]
    monkeypatch.setenv("SLURM_CLUSTER_NAME", "hpc")
    monkeypatch.setenv("SLURM_JOB_ID", "41")
    assert dsl_in_process(args, tmp_path, monkeypatch, capsys)[0] == 0
    before = (tmp_path / "run" / "similarity.csv").read_bytes()
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["slurm_job"] == "hpc/41"
    for job, restarts, allowed in (("41", "0", False), ("42", "1", False), ("41", "1", True)):
        monkeypatch.setenv("SLURM_JOB_ID", job)
        monkeypatch.setenv("SLURM_RESTART_COUNT", restarts)
        assert requeued_run(tmp_path / "run") is allowed
        code, out = dsl_in_process(args, tmp_path, monkeypatch, capsys)
        assert (code == 0) is allowed, out
        assert allowed or "already holds a run" in out
    assert "completed before; nothing to do" in (tmp_path / "run" / "dsl.log").read_text()
    assert (tmp_path / "run" / "similarity.csv").read_bytes() == before


# ---------------------------------------------------------------- launcher=local_gpus


def test_local_gpus_without_a_gpu_runs_local_processes_and_merges_past_a_failed_job(tmp_path: Path) -> None:
    """Two jobs, one local process each (submitit's folders): the first fails, the second still runs, and the
    merge holds the second's rows and names the first as failed."""
    result = dsl("run", *FAST, "clamp_to_model=false", "launcher=local_gpus", "hydra.sweep.dir=sweep", "--multirun",
                 "layer=9,1", cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]  # a job failed: the sweep says so
    sweep = tmp_path / "sweep"
    assert "job 0 (layer=9) failed: layer=9 is outside this model" in result.stdout  # Hydra logs to stdout
    launcher = OmegaConf.load(sweep / "multirun.yaml").hydra.launcher._target_
    assert launcher.endswith("LocalLauncher")
    ids = {OmegaConf.load(f / ".hydra" / "hydra.yaml").hydra.job.id for f in job_folders(sweep).values()}
    assert len(ids) == 2 and all((sweep / ".submitit" / i / f"{i}_0_log.out").is_file() for i in ids)
    manifest = json.loads((sweep / "manifest.json").read_text())
    assert manifest["status"] == "incomplete" and manifest["complete"] == 1
    assert [(j["job"], j["folder"]) for j in manifest["failed"]] == [(0, "0")]
    assert "layer=9 is outside this model" in manifest["failed"][0]["error"]
    merged = read_rows(sweep / "similarity.csv")
    assert merged and merged == [{"job": "1", **{OVERRIDE + k: v for k, v in (o.split("=") for o in
                                  OmegaConf.load(sweep / "1" / ".hydra" / "overrides.yaml"))}, **row}
                                 for row in read_rows(sweep / "1" / "similarity.csv")]


def processes_naming(text: str) -> list[int]:
    """The processes whose command line holds `text` (none found where there is no /proc)."""
    found = []
    for pid in (p for p in os.listdir("/proc") if p.isdigit()) if Path("/proc").is_dir() else ():
        try:
            if text.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(int(pid))
        except OSError:  # it ended meanwhile
            pass
    return found


def test_local_gpus_stopped_stops_its_running_job_and_names_the_resume(tmp_path: Path) -> None:
    """SIGTERM to the waiting `dsl run -m launcher=local_gpus` alone (a `kill`, not Ctrl-C's whole process
    group): submitit's local job would run on, orphaned, into a sweep marked stopped. It is stopped with it,
    its manifest says so, and the advice names the sweep's resume."""
    sweep = tmp_path / "sweep"
    slow = ["debug=tiny", "layer=1", "component=all", "images.limit=1", "decode.batch_size=1"]  # 5 pictures, one by one
    process = zygote.popen([DSL, "run", *slow, "launcher=local_gpus", f"hydra.sweep.dir={sweep}", "--multirun",
                            "seed=0"], cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not list(sweep.glob("0/images/*/steering/*.png")) and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode != 0 and f"`dsl run resume={sweep}` completes and merges the sweep" in err, err
    assert not processes_naming(str(sweep)), "a job of the stopped sweep runs on"
    assert json.loads((sweep / "0" / "manifest.json").read_text())["status"] == "interrupted"
    assert json.loads((sweep / "manifest.json").read_text())["status"] == "interrupted"


def test_submitits_warnings_go_through_hydras_console_once(monkeypatch, capsys) -> None:
    """submitit printed each warning itself, to stdout and stderr, once per status poll (its sacct warning: 8
    lines for a 2-job sweep); its records now reach only Hydra's console, whose filter shows one once."""
    import logging

    import submitit  # noqa: F401 - imported already where a launcher ran in this process: its handlers are taken off
    from dsl_cli.logs import SweepTerminalFilter
    from dsl_cli.sweeps import submitit_logs_through_hydra

    logger = logging.getLogger("submitit")
    monkeypatch.setattr(logger, "handlers", [logging.StreamHandler(sys.stdout), logging.StreamHandler(sys.stderr)])
    monkeypatch.delenv("SUBMITIT_LOG_LEVEL", raising=False)
    submitit_logs_through_hydra()
    assert os.environ["SUBMITIT_LOG_LEVEL"] == "NOCONFIG"  # for a submitit imported later, and for the jobs
    assert not logger.handlers and logger.propagate
    console = SweepTerminalFilter()
    polls = [logging.LogRecord("submitit", logging.WARNING, "", 0, f"Call #{n} - Bypassing sacct error", (), None)
             for n in (1, 2, 3)]
    assert [console.filter(record) for record in polls] == [True, False, False]


@pytest.mark.parametrize(("launcher", "batch"), [(None, 16), ("local", 16), ("slurm", None)])
def test_a_local_sweep_launches_in_batches_and_a_slurm_sweep_as_one_array(launcher: str | None,
                                                                          batch: int | None) -> None:
    """Hydra composes every job's config of a batch before launching it (0.2 s a job): a local sweep of 1,000
    values started its first job after 3 minutes in one batch; in batches of 16 it starts at once. A SLURM
    sweep stays one array: a batch would wait for its jobs to end before submitting the next."""
    register_configs()
    with initialize_config_module(config_module="dsl_cli.configs", version_base="1.3"):
        cfg = compose(config_name="run", overrides=[f"launcher={launcher}"] if launcher else [],
                      return_hydra_config=True)
    assert cfg.hydra.sweeper.max_batch_size == batch


@pytest.mark.parametrize("gpus", [0, 1, 4])
def test_local_gpus_starts_one_job_per_gpu_and_each_keeps_its_own(gpus: int, monkeypatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    register_configs()
    with initialize_config_module(config_module="dsl_cli.configs", version_base="1.3"):
        cfg = compose(config_name="run", overrides=["launcher=local_gpus"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith("LocalLauncher")
    assert cfg.hydra.launcher.gpus_per_node == gpus  # each job process is shown every GPU ...
    batch = cfg.hydra.sweeper.max_batch_size
    assert batch == max(1, gpus)  # ... the sweeper starts one job per GPU at a time ...
    for start in range(0, 10, batch):  # ... and each job of a batch keeps a GPU of its own
        kept = []
        for num in range(start, start + batch):
            monkeypatch.setenv("CUDA_VISIBLE_DEVICES", ",".join(map(str, range(gpus))))
            pin_gpu(num)
            kept.append(os.environ["CUDA_VISIBLE_DEVICES"])
        if gpus > 1:
            assert len(set(kept)) == len(kept) and all(k.isdigit() for k in kept)
        else:  # nothing to share out
            assert kept == [",".join(map(str, range(gpus)))] * batch


@pytest.mark.parametrize(("swept", "line"), [
    (["layer=0,12,24"], "layer=12 and layer=24 both read layer 3 of this model (it has 4 layers;"),
    (["layer=[0,5],[0,9]", "lens.alpha=1,2"], "layer=[0, 5] and layer=[0, 9] both read layers 0, 3 of this model"),
    (["head=1,3,7"], "head=3 and head=7 both read head 3 of this model (it has 4 heads;"),
    # the same layers or heads written two ways, nothing clamped (any real model): the rows were merged twice
    (["clamp_to_model=false", "layer=1,01"], "layer=1 and layer=01 both read layer 1 of this model (it has 4 layers): "
                                             "the sweep would run that job twice; give each layer once"),
    (["clamp_to_model=false", "layer=1,1-1"], "layer=1 and layer=1-1 both read layer 1"),
    (["clamp_to_model=false", "head=0,[0]"], "head=0 and head=[0] both read head 0"),
])
def test_a_sweep_whose_values_clamp_to_the_same_job_is_refused_before_any_job(swept: list[str], line: str,
                                                                              tmp_path: Path, monkeypatch,
                                                                              capsys) -> None:
    """debug=tiny clamps a layer or head beyond the tiny model to its last: two such values would run one job
    twice and merge its rows twice. Values it has, and a model whose shape is unknown before it loads, pass."""
    from helpers import dsl_in_process

    code, err = dsl_in_process(["run", "-m", "debug=tiny", "decode.enabled=false", *swept,
                                f"hydra.sweep.dir={tmp_path / 'sweep'}"], tmp_path, monkeypatch, capsys)
    assert code == 2 and err == f"dsl: error: {line}" + err.split(line, 1)[1] and len(err.splitlines()) == 1, err
    assert "sweep layers 0 to 3" in err or "sweep heads 0 to 3" in err or "clamp_to_model=false" in swept
    assert not (tmp_path / "sweep").exists()


def test_clamped_values_that_differ_are_swept() -> None:
    from dsl_cli.sweeps import refuse_clamped_repeats

    register_configs()
    with initialize_config_module(config_module="dsl_cli.configs", version_base="1.3"):
        config = compose("run", ["debug=tiny"], return_hydra_config=True)
    OmegaConf.set_struct(config, False)
    # 3 and 9 are one layer of the tiny ViT, but the swept encoder's shape is known only per job
    for swept in (["layer=0,1,3"], ["layer=2,9", "head=0,1"], ["encoder=tiny,tiny_timm", "layer=3,9"]):
        config.hydra.overrides.task = swept  # as Hydra hands a sweep's own overrides to its callbacks
        refuse_clamped_repeats(config)  # refuses nothing
    config.hydra.overrides.task = ["layer=3,9"]
    with pytest.raises(UserError, match="layer=3 and layer=9 both read layer 3"):
        refuse_clamped_repeats(config)


def test_a_sweeps_own_subdir_keeps_the_folder_claimed_and_its_jobs_inside(tmp_path: Path, monkeypatch,
                                                                         capsys) -> None:
    """`hydra.sweep.subdir=job_${hydra.job.num}` (Hydra's own setting): the sweep folder is claimed as ever (the
    claim read the override and met the unset job number; Hydra made that a warning, and the sweep wrote over a
    folder of the user's files, multirun.yaml included), the sweep merges and resumes; a subdir that leaves the
    sweep folder or names no job is refused in one line before anything is written."""
    subdir = "hydra.sweep.subdir=job_${hydra.job.num}"
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "multirun.yaml").write_text("mine: 1\n")
    code, err = dsl_in_process(["run", *FAST, "--multirun", "layer=0,1", subdir, f"hydra.sweep.dir={theirs}"],
                               tmp_path, monkeypatch, capsys)
    assert code == 2 and "is not a dsl folder" in err and "Traceback" not in err, err[-3000:]
    assert sorted(p.name for p in theirs.iterdir()) == ["multirun.yaml"]
    assert (theirs / "multirun.yaml").read_text() == "mine: 1\n"

    code, err = dsl_in_process(["run", *FAST, "--multirun", "layer=0,1", subdir, "hydra.sweep.dir=ok"], tmp_path,
                               monkeypatch, capsys)
    assert code == 0, err[-3000:]
    assert sorted(p.name for p in (tmp_path / "ok").glob("job_*")) == ["job_0", "job_1"]
    assert len(read_rows(tmp_path / "ok" / "similarity.csv")) == 2 * 2 * 4  # 2 jobs, 2 images, 4 heads
    merged = (tmp_path / "ok" / "similarity.csv").read_bytes()
    code, err = dsl_in_process(["run", "resume=ok"], tmp_path, monkeypatch, capsys)  # was refused: multirun.yaml
    assert code == 0 and (tmp_path / "ok" / "similarity.csv").read_bytes() == merged, err[-3000:]

    # named by a swept setting, the jobs in a shuffled order: merged (a shuffle's jobs are known from their folders)
    code, err = dsl_in_process(["run", *FAST, "--multirun", "seed=shuffle(1,2,3)", "hydra.sweep.subdir=s${seed}",
                                "hydra.sweep.dir=by_seed"], tmp_path, monkeypatch, capsys)
    assert code == 0, err[-3000:]
    rows = read_rows(tmp_path / "by_seed" / "similarity.csv")
    assert sorted(p.name for p in (tmp_path / "by_seed").glob("s?")) == ["s1", "s2", "s3"]
    assert {(r["override.seed"], r["seed"]) for r in rows} == {(s, s) for s in "123"}  # each job's rows its own
    jobs = json.loads((tmp_path / "by_seed" / "manifest.json").read_text())["jobs"]
    assert {(job["overrides"][-1], job["folder"]) for job in jobs} == {(f"seed={s}", f"s{s}") for s in "123"}
    # its resume would draw the order again and run another job's values into a missing job's folder: refused
    shutil.rmtree(tmp_path / "by_seed" / "s2")
    code, err = dsl_in_process(["run", "resume=by_seed"], tmp_path, monkeypatch, capsys)
    assert code == 2 and "its jobs were swept in a shuffled order (seed=shuffle(1,2,3))" in err, err[-3000:]

    for bad, says in (("../out_${hydra.job.num}", "must be inside the sweep folder"),
                      ("/tmp/x_${hydra.job.num}", "must be inside the sweep folder"),
                      ("same", "jobs would share a folder"),
                      ("s${seed}", "jobs would share a folder")):  # seed is not swept here: one folder
        code, err = dsl_in_process(["run", *FAST, "--multirun", "layer=0,1", f"hydra.sweep.subdir={bad}",
                                    "hydra.sweep.dir=bad"], tmp_path, monkeypatch, capsys)
        lines = [line for line in err.splitlines() if line.startswith("dsl:")]
        assert code == 2 and len(lines) == 1 and says in lines[0], err[-3000:]
        assert not (tmp_path / "bad").exists() and not list(tmp_path.glob("out_*"))
