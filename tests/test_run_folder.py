"""A run owns its folder and nothing else: its lock, the refusal of a folder that holds a run (before Hydra
writes anything there, whatever the override's spelling), its own temporaries only, names that are data and
never paths, escaped HTML, the umask's file modes."""

from __future__ import annotations

import csv
import html
import json
import os
import re
import socket
import stat
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote

import pytest
from PIL import Image

from dsl_cli.errors import UserError
from dsl_cli.images import unique_names
from dsl_cli.outputs import (BASELINES, CORRELATIONS, IMPORTANCE, LABELS, NAME, OVERLAY, PATCHES, SEEDS, SIMILARITY,
                             TEMP_SUFFIX, LockOwner, RunFolder, Table, atomic_write_bytes, process_started,
                             release_all)
from helpers import dsl_here, dsl_in_process

DSL = str(Path(sys.executable).parent / "dsl")
SCORES_ONLY = ["run", "debug=tiny", "decode.enabled=false"]  # a run that decodes nothing: seconds
HOSTILE = "<img src=x onerror=alert(1)>"  # a folder name (no slash in it)


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file below `root` with its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("dsl: error:")]


# ------------------------------------------------------------------ one run into a folder with a user's files


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory) -> tuple[Path, dict[str, bytes]]:
    """A run (umask 022) into a folder named like an HTML tag, then, once a user has put files there (among
    them temporaries named like dsl's old ones, `.*.tmp`), resumed: the resume removes what it calls its
    temporaries. (A fresh run into a folder that already holds a user's files is refused: test_trust.py.)
    Returns (folder, the user's files)."""
    root = tmp_path_factory.mktemp("hostile")
    folder = root / HOSTILE
    users = {"thesis/.ch1.docx.tmp": b"chapter one", ".notes.tmp": b"notes", "images/.mine.png.tmp": b"mine",
             "grids/.draft.tmp": b"draft"}
    old = os.umask(0o022)
    try:  # both in this process: what is checked is the files they leave
        assert dsl_here(["run", "debug=tiny", "decode.top_k=1", f"hydra.run.dir='{folder}'"], root) == 0
        for name, data in users.items():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes(data)
        code = dsl_here(["run", f"resume={folder}"], root)
    finally:
        os.umask(old)
    assert code == 0
    return folder, users


def test_a_users_tmp_files_below_the_run_folder_survive_a_run(hostile_run) -> None:
    folder, users = hostile_run
    for name, data in users.items():
        assert (folder / name).read_bytes() == data, name
    assert not list(folder.rglob(f"*{TEMP_SUFFIX}")) and not (folder / RunFolder.LOCK).exists()


def test_files_a_run_writes_have_the_umask_mode(hostile_run) -> None:
    folder, users = hostile_run
    theirs = {folder / name for name in users} | {(folder / name).parent for name in users}
    written = [p for p in folder.rglob("*") if p not in theirs]
    files = [p for p in written if p.is_file()]
    assert len(files) > 10 and {p.name for p in files} >= {"similarity.csv", "manifest.json", "config.yaml",
                                                             "index.html", "input.png"}
    for path in written:
        assert stat.S_IMODE(path.stat().st_mode) == (0o755 if path.is_dir() else 0o644), path


def test_index_html_escapes_the_folder_name(hostile_run) -> None:
    folder, _ = hostile_run
    page = (folder / "index.html").read_text()
    assert "<img src=x" not in page and "onerror=alert(1)>" not in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page
    sources = [unquote(html.unescape(src)) for src in re.findall(r'<img src="([^"]*)"', page)]
    assert len(sources) == page.count("<img ") and all((folder / src).is_file() for src in sources), sources
    figures = {f"{p.parent.name}/{p.name}" for p in folder.glob("*/*.png") if p.parent.name in ("grids", "heatmaps")}
    assert figures and figures <= set(sources)


# ------------------------------------------------------------------ a folder that holds a run is refused


@pytest.mark.parametrize("spelling", ["hydra.run.dir={}", "++hydra.run.dir={}", "hydra.run.dir={}/",
                                      "hydra.run.dir=./{}/../{}", "hydra.run.dir='{}'",
                                      "hydra.run.dir=${{oc.env:RUN}}"])
def test_a_refused_second_run_leaves_the_finished_run_byte_identical(spelling: str, tmp_path: Path, monkeypatch,
                                                                      capsys) -> None:
    assert dsl_in_process([*SCORES_ONLY, "hydra.run.dir=run"], tmp_path, monkeypatch, capsys)[0] == 0
    before = snapshot(tmp_path / "run")
    monkeypatch.setenv("RUN", "run")
    code, err = dsl_in_process([*SCORES_ONLY, "seed=7", spelling.format("run", "run")], tmp_path, monkeypatch, capsys)
    assert code == 2 and len(error_lines(err)) == 1 and "already holds a run" in err, err
    assert snapshot(tmp_path / "run") == before


def test_a_refused_second_sweep_leaves_the_finished_sweep_byte_identical(tmp_path: Path, monkeypatch,
                                                                        capsys) -> None:
    sweep = ["-m", "hydra.sweep.dir=sweep", "seed=0,1"]
    assert dsl_in_process([*SCORES_ONLY, *sweep], tmp_path, monkeypatch, capsys)[0] == 0
    before = snapshot(tmp_path / "sweep")
    assert {"multirun.yaml", "0/.hydra/config.yaml", "1/.hydra/config.yaml"} <= set(before)
    code, err = dsl_in_process([*SCORES_ONLY, "-m", "hydra.sweep.dir=sweep", "seed=5,6"], tmp_path, monkeypatch,
                               capsys)
    assert code == 2 and len(error_lines(err)) == 1 and "already holds a run" in err, err
    assert "choose another hydra.sweep.dir" in err and "hydra.run.dir" not in err  # the setting that moves a sweep
    assert snapshot(tmp_path / "sweep") == before


def test_a_sweep_whose_job_folders_lie_outside_it_is_refused_before_anything_is_written(tmp_path: Path, monkeypatch,
                                                                                        capsys) -> None:
    """`hydra.sweep.subdir=../elsewhere/N` put the jobs beside a run of the user's, where the sweep's merge and
    resume never look (its merge found no job): refused in one line, nothing written, the run untouched."""
    assert dsl_in_process([*SCORES_ONLY, "hydra.run.dir=elsewhere/1"], tmp_path, monkeypatch, capsys)[0] == 0
    before = snapshot(tmp_path / "elsewhere")
    args = [*SCORES_ONLY, "-m", "hydra.sweep.dir=sweep", "hydra.sweep.subdir=../elsewhere/${hydra.job.num}",
            "seed=3,4"]
    code, err = dsl_in_process(args, tmp_path, monkeypatch, capsys)
    assert code == 2 and len(error_lines(err)) == 1 and "must be inside the sweep folder" in err, err
    assert snapshot(tmp_path / "elsewhere") == before and not (tmp_path / "sweep").exists()


# ------------------------------------------------------------------ the lock


def test_a_live_lock_refuses_and_a_dead_ones_is_taken_over(tmp_path: Path, caplog) -> None:
    folder = RunFolder(tmp_path / "run")
    (tmp_path / "run").mkdir()
    live = LockOwner(os.getppid(), socket.gethostname(), "feedface", process_started(os.getppid()))  # alive
    folder.lock_path.write_text(live.line + "\n")
    with pytest.raises(UserError, match=f"being written by dsl process {os.getppid()}.*remove .*dsl.lock"):
        folder.claim()
    with pytest.raises(UserError, match="wait for it to end or choose another hydra.sweep.dir"):
        folder.claim(kind="sweep")
    with pytest.raises(UserError) as given:  # resume=, plot, report, merge: the folder is the one given
        folder.claim(resume=True)
    assert "wait for it to end (if no dsl" in str(given.value) and "hydra." not in str(given.value)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    folder.lock_path.write_text(f"{int(dead.stdout)} {socket.gethostname()} 0badcafe\n")
    try:
        assert folder.claim() is True
        assert RunFolder(tmp_path / "run").claim() is False  # held by this process already
        assert LockOwner.parse(folder.lock_path.read_bytes().split(b"\n")[0].decode()) == folder.owner
        assert "took over the lock of process" in caplog.text
        assert folder.lock_path.stat().st_size > RunFolder.RESERVE  # space kept back for a full disk
    finally:
        release_all()
    assert not folder.lock_path.exists()


@pytest.mark.parametrize("hard_links", [True, False])
def test_the_lock_appears_with_its_owner_already_written(hard_links: bool, tmp_path: Path, monkeypatch) -> None:
    """A second run reading the lock must never find it empty (it would be refused as "unreadable"): the
    lock is linked into place fully written; on a file system without hard links it is written in place."""
    seen: list[bytes] = []
    real_link = os.link

    def link(source, target) -> None:
        seen.append(Path(source).read_bytes())  # what the lock will hold the moment it exists
        if not hard_links:
            raise PermissionError(1, "Operation not permitted")
        real_link(source, target)

    monkeypatch.setattr(os, "link", link)
    folder = RunFolder(tmp_path / "run")
    try:
        assert folder.claim() is True
        assert LockOwner.parse(seen[0].split(b"\n")[0].decode()) == folder.owner
        assert LockOwner.parse(folder.lock_path.read_bytes().split(b"\n")[0].decode()) == folder.owner
        # nothing staged is left; the manifest's stamp (`made_by: dsl`) makes the new folder dsl's
        assert sorted(path.name for path in folder.path.iterdir()) == [RunFolder.LOCK, "manifest.json"]
    finally:
        release_all()


def test_a_lock_from_another_host_is_refused_with_how_to_clear_it(tmp_path: Path) -> None:
    (tmp_path / RunFolder.LOCK).write_text("4242 some-other-node 0123abcd\n")
    with pytest.raises(UserError) as caught:
        RunFolder(tmp_path).claim(resume=True)
    assert "dsl process 4242 on some-other-node" in str(caught.value)
    assert f"remove {tmp_path / RunFolder.LOCK}" in str(caught.value)


# ------------------------------------------------------------------ names are data


def test_three_colliding_file_names_give_three_images(tmp_path: Path, monkeypatch, capsys) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    colours = {"a b.png": (255, 0, 0), "a_b.png": (0, 255, 0), "a_b_2.png": (0, 0, 255)}
    for name, colour in colours.items():
        Image.new("RGB", (80, 60), colour).save(photos / name)
    code, err = dsl_in_process([*SCORES_ONLY, "images=folder", f"images.path={photos}", "images.limit=null",
                                "hydra.run.dir=run"], tmp_path, monkeypatch, capsys)
    assert code == 0, err
    with open(tmp_path / "run" / "similarity.csv", newline="") as handle:
        images = sorted({row["image"] for row in csv.DictReader(handle)})
    assert len(images) == 3
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert sorted(manifest["images"]) == images
    seen = {Image.open(tmp_path / "run" / "images" / image / "input.png").getpixel((5, 5)) for image in images}
    assert seen == set(colours.values())  # each input kept its own picture


def test_names_are_stable_distinct_and_safe() -> None:
    root = Path("/data")
    files = [root / n for n in ("a b.png", "a_b.png", "a_b_2.png", "x/dup.jpg", "y/dup.jpg", "Dup.png", "é.png",
                                "..png", "a_b-0000.png", "line\nbreak.png")]
    names = unique_names(files, root)
    assert len({n.casefold() for n in names}) == len(files)
    assert all(NAME.fullmatch(n) for n in names)
    assert names[1:3] == ["a_b", "a_b_2"]  # safe, unique stems are kept as they are
    shuffled = unique_names(files[::-1], root)[::-1]
    assert shuffled == names  # the order of the files does not matter
    assert unique_names([root / "a b.png"], root) == names[:1]  # nor the presence of the others


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished run that decoded two pictures per image."""
    root = tmp_path_factory.mktemp("finished")
    assert dsl_here(["run", "debug=tiny", "layer=1", "images.limit=2", "decode.top_k=2", "decode.batch_size=1",
                     f"hydra.run.dir={root / 'run'}"], root) == 0
    return root / "run"


def test_csv_rows_are_sorted_by_image_then_component_order(finished: Path) -> None:
    """Also with decode.top_k, whose undecoded rows are written before the decoded ones."""
    with open(finished / "similarity.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    heads = [f"L01H0{h}" for h in range(4)]  # debug=tiny: layer 1, its 4 heads
    assert [(r["image"], r["component"]) for r in rows] == [(i, c) for i in ("astronaut", "chelsea") for c in heads]
    assert sum(1 for r in rows if r["file"]) == 4  # top 2 of each image decoded


@pytest.mark.parametrize("command", ["plot", "resume"])
def test_a_csv_row_naming_a_path_is_refused_and_nothing_is_written_outside(command: str, finished: Path,
                                                                           tmp_path: Path, monkeypatch, capsys) -> None:
    folder = tmp_path / "a" / "b" / "run"
    folder.parent.mkdir(parents=True)
    subprocess.run(["cp", "-a", str(finished), str(folder)], check=True)
    text = (folder / "similarity.csv").read_text()
    (folder / "similarity.csv").write_text(text.replace("astronaut,", "../../evil,", 1)
                                           .replace("images/astronaut/", "images/../../evil/", 1))
    outside = {p for p in tmp_path.rglob("*") if folder not in p.parents}
    args = ["plot", str(folder)] if command == "plot" else ["run", f"resume={folder}"]
    code, err = dsl_in_process(args, tmp_path, monkeypatch, capsys)
    assert code == 2 and len(error_lines(err)) == 1 and "'../../evil' is not a valid name" in err, err
    assert {p for p in tmp_path.rglob("*") if folder not in p.parents} == outside


@pytest.mark.parametrize("edit, told", [((",head,1,0,", ",head,3,0,"), "layer 3 is not that of component L01H00"),
                                        ((",head,1,0,", ",head,1,-1,"), "head -1 is not that of component L01H00"),
                                        ((",L01H00,head,", ",L01H00,mlp,"), "kind 'mlp' is not that of"),
                                        ((",L01H00,head,1,0,", ",L01MLP,head,1,0,"), "head 0, kind 'head' is not")])
def test_a_csv_row_whose_place_is_not_its_components_is_refused(edit: tuple[str, str], told: str, finished: Path,
                                                                tmp_path: Path, monkeypatch, capsys) -> None:
    """The figures place a row by its layer and head: a row of L01H00 edited to layer 3 would be drawn there."""
    folder = tmp_path / "run"
    subprocess.run(["cp", "-a", str(finished), str(folder)], check=True)
    csv_file = folder / "similarity.csv"
    csv_file.write_text(csv_file.read_text().replace(*edit, 1))
    before = snapshot(folder)
    code, err = dsl_in_process(["plot", str(folder)], tmp_path, monkeypatch, capsys)
    assert code == 2 and len(error_lines(err)) == 1 and f"{csv_file} row 2: {told}" in err, err
    assert snapshot(folder) == before


def test_a_damaged_picture_is_refused_by_plot_and_made_again_by_resume(finished: Path, tmp_path: Path,
                                                                       monkeypatch, capsys) -> None:
    folder = tmp_path / "run"
    subprocess.run(["cp", "-a", str(finished), str(folder)], check=True)
    picture = next(folder.glob("images/chelsea/steering/*.png"))
    whole = picture.read_bytes()
    picture.write_bytes(whole[: len(whole) // 2])
    code, err = dsl_in_process(["plot", str(folder)], tmp_path, monkeypatch, capsys)
    assert code == 2 and len(error_lines(err)) == 1 and f"{picture}: not a readable picture" in err, err
    code, err = dsl_in_process(["run", f"resume={folder}"], tmp_path, monkeypatch, capsys)
    assert code == 0, err
    assert picture.read_bytes() == whole and json.loads((folder / "manifest.json").read_text())["decoded"] == 1


def test_an_error_naming_a_file_escapes_control_characters(tmp_path: Path, monkeypatch, capsys) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "evil\n\x1b[31mred.png").write_text("not a picture")
    code, err = dsl_in_process([*SCORES_ONLY, "images=folder", f"images.path={photos}"], tmp_path, monkeypatch,
                               capsys)
    assert code == 2 and "\x1b" not in err and err.count("\n") == 1, repr(err)
    assert "evil\\n\\x1b[31mred.png" in error_lines(err)[0]


def test_atomic_writes_leave_only_dsls_own_temporary_names(tmp_path: Path, monkeypatch) -> None:
    from dsl_cli import outputs

    seen = []
    real_replace = os.replace
    monkeypatch.setattr(outputs.os, "replace", lambda src, dst: (seen.append(Path(src).name), real_replace(src, dst)))
    atomic_write_bytes(tmp_path / "similarity.csv", b"x\n")
    assert len(seen) == 1 and seen[0].startswith(".similarity.csv.") and seen[0].endswith(TEMP_SUFFIX)


# The columns each CSV starts with, as the README and docs/DESIGN.md list them (a reader's scripts index them).
FIRST_COLUMNS = {
    SIMILARITY: ["image", "lens", "component", "kind", "layer", "head", "mode", "alpha", "seed", "steps", "guidance",
                 "sim_embed", "sim_decoded", "norm", "rank", "file"],
    LABELS: ["image", "lens", "component", "layer", "head", "rank", "label", "score"],
    PATCHES: ["image", "lens", "component", "grid", "cls_share", "shares"],
    SEEDS: ["image", "lens", "component", "seed", "sim_decoded", "file"],
    BASELINES: ["image", "lens", "component", "seed", "sim_decoded", "file"],
    IMPORTANCE: ["image", "component", "layer", "head", "ablation", "mode", "alpha", "importance"],
    CORRELATIONS: ["ablation", "image", "lens", "n", "spearman", "spearman_low", "spearman_high", "spearman_p"],
    OVERLAY: ["image", "background", "foreground", "ablation", "order", "seed", "step", "component"],
}


@pytest.mark.parametrize("table", list(FIRST_COLUMNS), ids=lambda t: t.name)
def test_every_table_reads_back_the_row_it_was_written_with(tmp_path: Path, table: Table) -> None:
    """A row of values of each column's type, written through the run folder, reads back equal, each value of
    the same type (numbers are never text, an empty number is None), under the header a reader expects."""
    values = {int: 7, float: 0.125, str: "cat"}
    row = {column: values[kind] for column, kind in table.kinds.items()} | {"file": ""}
    place = {"component": "L07H07", "kind": "head", "layer": 7, "head": 7}  # a row placing its component: its label
    row = {k: v for k, v in (row | (place if "layer" in row else {})).items() if k in table.kinds}
    empty = {column: None for column, kind in table.kinds.items() if kind is not str and column not in place}
    folder = RunFolder(tmp_path)
    folder.write(table, [row, {**row, **empty}])
    with folder.csv(table).open(newline="") as handle:
        header = next(csv.reader(handle))
    assert header[:len(FIRST_COLUMNS[table])] == FIRST_COLUMNS[table]
    assert folder.read(table) == [row, {**row, **empty}]
    assert [type(v) for v in folder.read(table)[0].values()] == [type(v) for v in row.values()]
    assert any(kind is float for kind in table.kinds.values()) and any(kind is str for kind in table.kinds.values())


def test_a_row_with_a_key_that_names_no_column_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    """A misspelt column would otherwise vanish from the CSV without a word; nothing of the batch is written,
    by `append` or by `rewrite`."""
    folder = RunFolder(tmp_path)
    log = folder.log(SIMILARITY)
    good = {"image": "img0", "lens": "direct", "component": "L01H02", "kind": "head", "layer": 1, "head": 2,
            "sim_embed": 0.5}
    log.append([good])
    before = folder.csv(SIMILARITY).read_bytes()
    for write in (log.append, log.rewrite):
        with pytest.raises(ValueError, match="similarity.csv has no column 'sim_embd'"):
            write([good, {**good, "sim_embd": 0.25}])
        assert folder.csv(SIMILARITY).read_bytes() == before
    assert folder.read(SIMILARITY)[0]["sim_embed"] == 0.5


def test_pictures_are_written_on_threads_while_the_block_runs(tmp_path: Path, monkeypatch) -> None:
    """`writing_pngs`: the saves run beside the block (each waits here for the block to have started, which
    a save done before the block would never see), every file is whole and lossless when it ends, at zlib's
    fastest level; a save that fails is raised when the block ends, as the one-line write error."""
    import threading

    import numpy as np

    from dsl_cli import outputs

    rng = np.random.default_rng(0)
    pictures = [Image.fromarray(rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)) for _ in range(5)]
    files = [(tmp_path / "pictures" / f"p{i}.png", picture) for i, picture in enumerate(pictures)]
    started, saw_the_block, threads = threading.Event(), [], set()
    real_save = outputs.save_png

    def save_beside_the_block(path, image):
        saw_the_block.append(started.wait(timeout=5))
        threads.add(threading.get_ident())
        real_save(path, image)

    monkeypatch.setattr(outputs, "save_png", save_beside_the_block)
    with outputs.writing_pngs(files, workers=3):
        started.set()
    assert saw_the_block == [True] * 5 and threading.get_ident() not in threads and len(threads) <= 3
    for path, picture in files:
        data = path.read_bytes()
        assert data[data.index(b"IDAT") + 4:][:2] == b"\x78\x01"  # the zlib stream's header: level 1 (fastest)
        with Image.open(path) as saved:
            assert saved.tobytes() == picture.tobytes()
    monkeypatch.setattr(outputs, "save_png", real_save)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "p0.png").mkdir()  # a folder where a picture should go
    with pytest.raises(UserError, match="p0.png"):
        with outputs.writing_pngs([(tmp_path / "taken" / "p0.png", pictures[0]), (tmp_path / "taken" / "p1.png",
                                                                                   pictures[1])]):
            pass
    assert (tmp_path / "taken" / "p1.png").is_file()
