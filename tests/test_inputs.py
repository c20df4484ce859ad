"""A continued run works on the inputs and pictures it started with: an input image changed, added or removed
since, two inputs of one name, and a file of the user's where dsl puts a picture are each refused in one line
(exit 2), before any work and with every file left as it was."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from dsl_cli.errors import UserError
from helpers import dsl_here, dsl_in_process

SCORES_ONLY = ["run", "debug=tiny", "decode.enabled=false", "layer=1", "head=0"]  # seconds, nothing decoded
# one head's picture and the two baselines' (decode.baselines): every kind of picture a run keeps
DECODED = ["run", "debug=tiny", "layer=1", "head=0", "images.limit=1", "decode.baselines=true"]


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("dsl: error:")]


def files(folder: Path) -> dict[str, bytes]:
    """Every file below `folder` with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def photo(path: Path, colour: tuple[int, int, int]) -> None:
    Image.new("RGB", (80, 60), colour).save(path)


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    photo(folder / "one.png", (200, 30, 30))
    photo(folder / "two.png", (30, 200, 30))
    return folder


@pytest.fixture(scope="module")
def decoded(tmp_path_factory) -> Path:
    """A complete run with a decoded picture, its input and baseline pictures."""
    folder = tmp_path_factory.mktemp("decoded") / "run"
    assert dsl_here([*DECODED, f"hydra.run.dir={folder}"], folder.parent) == 0
    return folder


def refused(args: list[str], folder: Path, tmp_path: Path, monkeypatch, capsys, before_it_began: bool = False) -> str:
    """The one error line of a command refused with exit 2 that left `folder` byte for byte as it was (but for
    its manifest, which says `failed` and why; `before_it_began`: the manifest too, a complete run's status
    kept)."""
    before = files(folder)
    code, err = dsl_in_process(args, tmp_path, monkeypatch, capsys)
    assert code == 2 and len(error_lines(err)) == 1 and "Traceback" not in err, err
    after = files(folder)
    if not before_it_began:
        assert after.pop("manifest.json") and before.pop("manifest.json")
    assert after.keys() - {"dsl.log"} == before.keys() - {"dsl.log"}
    assert {k: v for k, v in after.items() if k != "dsl.log"} == {k: v for k, v in before.items() if k != "dsl.log"}
    return error_lines(err)[0]


def scored_run(photos: Path, tmp_path: Path, monkeypatch, capsys) -> Path:
    """A complete run of `photos`, scores only, in tmp_path/run."""
    run = tmp_path / "run"
    code, err = dsl_in_process([*SCORES_ONLY, f"images.path={photos}", f"hydra.run.dir={run}"], tmp_path,
                               monkeypatch, capsys)
    assert code == 0, err
    return run


def edit_manifest(run: Path, edit) -> None:
    """The run's manifest.json as `edit` (called on its data) leaves it."""
    manifest = json.loads((run / "manifest.json").read_text())
    edit(manifest)
    (run / "manifest.json").write_text(json.dumps(manifest))


def test_resume_refuses_input_images_changed_added_or_removed(photos: Path, tmp_path: Path, monkeypatch,
                                                              capsys) -> None:
    """Resumed after an input changed, its input.png would be the old picture beside the new one's rows."""
    run = scored_run(photos, tmp_path, monkeypatch, capsys)
    original = (photos / "one.png").read_bytes()
    photo(photos / "one.png", (30, 30, 200))
    photo(photos / "three.png", (90, 90, 90))
    # refused before the attempt began: the run, complete, stays so (its manifest said `failed`)
    line = refused(["run", f"resume={run}"], run, tmp_path, monkeypatch, capsys, before_it_began=True)
    assert "changed: one; added: three" in line and "put them back" in line and "start a new run" in line, line

    (photos / "one.png").write_bytes(original)
    (photos / "three.png").unlink()
    (photos / "two.png").unlink()
    assert "removed: two" in refused(["run", f"resume={run}"], run, tmp_path, monkeypatch, capsys, True)
    config = run / ".hydra" / "config.yaml"  # and so is an edited setting
    kept = config.read_text()
    config.write_text(kept.replace("alpha: 2.0", "alpha: 3.0"))
    assert "lens.alpha is 3.0 now" in refused(["run", f"resume={run}"], run, tmp_path, monkeypatch, capsys, True)
    config.write_text(kept)

    photo(photos / "two.png", (30, 200, 30))  # the same bytes again: the run goes on
    from dsl_cli import images

    hashed, real = [], images.fingerprint
    monkeypatch.setattr(images, "fingerprint", lambda path: hashed.append(path.name) or real(path))
    code, err = dsl_in_process(["run", f"resume={run}"], tmp_path, monkeypatch, capsys)
    assert code == 0, err
    assert sorted(hashed) == ["one.png", "two.png"]  # each read once: checked, then recorded
    assert json.loads((run / "manifest.json").read_text())["fingerprints"]["images"].keys() == {"one", "two"}


def test_a_run_from_before_fingerprints_still_resumes_and_records_them(photos: Path, tmp_path: Path, monkeypatch,
                                                                       capsys) -> None:
    run = scored_run(photos, tmp_path, monkeypatch, capsys)
    edit_manifest(run, lambda manifest: manifest.pop("fingerprints"))
    code, err = dsl_in_process(["run", f"resume={run}"], tmp_path, monkeypatch, capsys)
    assert code == 0, err
    assert "holds no fingerprints of the input images" in (run / "dsl.log").read_text()
    assert json.loads((run / "manifest.json").read_text())["fingerprints"]["images"].keys() == {"one", "two"}


def test_a_path_alone_is_recorded_as_the_folder_source_and_an_older_record_still_resumes(
        photos: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    """`images.path=X` reads the folder, but the record said `source: samples` beside the path."""
    run = scored_run(photos, tmp_path, monkeypatch, capsys)
    assert json.loads((run / "manifest.json").read_text())["config"]["images"]["source"] == "folder"
    config = run / ".hydra" / "config.yaml"
    assert "source: folder" in config.read_text()
    # a run recorded before: `samples` in both, resumed as before
    edit_manifest(run, lambda manifest: manifest["config"]["images"].update(source="samples"))
    config.write_text(config.read_text().replace("source: folder", "source: samples"))
    code, err = dsl_in_process(["run", f"resume={run}"], tmp_path, monkeypatch, capsys)
    assert code == 0, err


def test_damaged_image_fingerprints_are_refused_as_a_damaged_manifest(photos: Path, tmp_path: Path, monkeypatch,
                                                                      capsys) -> None:
    run = scored_run(photos, tmp_path, monkeypatch, capsys)
    edit_manifest(run, lambda manifest: manifest["fingerprints"].update(images=["one", "two"]))
    code, err = dsl_in_process(["run", f"resume={run}"], tmp_path, monkeypatch, capsys)
    assert code == 2 and "fingerprints.images" in error_lines(err)[0] and "not a manifest dsl can read" in err, err


def test_an_image_named_twice_is_refused_before_any_work(tmp_path: Path, monkeypatch, capsys) -> None:
    """images.names=[coffee,coffee] decoded coffee twice, then called its own table damaged, on every resume."""
    code, err = dsl_in_process([*SCORES_ONLY, "images.names=[coffee,astronaut,coffee]", "hydra.run.dir=run"],
                               tmp_path, monkeypatch, capsys)
    assert code == 2 and len(error_lines(err)) == 1, err
    assert "two inputs are named coffee" in err and "give each image once" in err, err
    assert not (tmp_path / "run").exists()  # stopped before its first result: nothing to resume


def test_an_empty_list_of_sample_names_is_refused_not_taken_for_all() -> None:
    """images.names=[] ran every sample photo, where component=[] is refused as naming nothing."""
    from dsl_cli.images import _sample_files

    with pytest.raises(UserError, match=r"^images.names=\[\] names no image"):
        _sample_files([])
    assert len(_sample_files(None)) > 1 and [n for n, _ in _sample_files(["coffee"])] == ["coffee"]


def _picture_of_the_users(folder: Path, file: str) -> None:
    Image.new("RGB", (64, 64), (255, 0, 0)).save(folder / file)  # a PNG, but not one dsl wrote


def _without_its_row(folder: Path, file: str) -> None:
    """The picture dsl decodes next: its row is not in the table, and a PNG of the user's is where it goes."""
    with open(folder / "similarity.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    with open(folder / "similarity.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(row for row in rows if row["file"] != file)
    _picture_of_the_users(folder, file)


@pytest.mark.parametrize(("file", "place"), [
    ("images/astronaut/input.png", _picture_of_the_users),
    ("images/astronaut/steering/L01H00.png", _picture_of_the_users),  # a finished picture, its row kept
    ("images/astronaut/steering/L01H00.png", _without_its_row),  # a picture to decode: never written over
    ("images/_baselines/steering/seed0/mean.png", _picture_of_the_users),
])
def test_a_file_of_the_users_where_dsl_puts_a_picture_is_refused(file: str, place, decoded: Path, tmp_path: Path,
                                                                  monkeypatch, capsys) -> None:
    """Not taken as a result (nor drawn in a grid), not written over: one line naming it, the file kept."""
    run = tmp_path / "run"
    shutil.copytree(decoded, run)
    place(run, file)
    line = refused(["run", f"resume={run}"], run, tmp_path, monkeypatch, capsys)
    assert f"{run / file} is not a picture dsl made; move it away" in line, line
