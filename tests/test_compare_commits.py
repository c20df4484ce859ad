"""scripts/compare_commits.py, the check that a refactor keeps every output: its verdicts on hand-made run
folders (a CSV with a column added, rows changed, a column removed; a decoded picture and a figure changed)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))

from compare_commits import compare_run  # noqa: E402  (a script, not a package)

ROWS = "image,component,sim_embed\nastronaut,L01H00,0.5\nchelsea,L01H02,0.25\n"


def folder(root: Path, files: dict[str, str | bytes]) -> Path:
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)
    return root


def verdicts(tmp_path: Path, before: dict, after: dict) -> tuple[dict[str, str], bool]:
    rows, ok = compare_run(folder(tmp_path / "before", before), folder(tmp_path / "after", after))
    return {name: verdict for name, verdict, _ in rows}, ok


def test_same_files_and_an_added_column_pass(tmp_path: Path) -> None:
    added = "image,component,sim_embed,activation\nastronaut,L01H00,0.5,\nchelsea,L01H02,0.25,\n"
    found, ok = verdicts(tmp_path, {"similarity.csv": ROWS, "images/a/x.png": b"\x89PNG1", "index.html": "a"},
                         {"similarity.csv": added, "images/a/x.png": b"\x89PNG1", "index.html": "b"})
    assert ok and found == {"similarity.csv": "same rows on the shared columns; added activation",
                            "images/a/x.png": "same bytes"}


def test_a_changed_figure_is_listed_and_passes(tmp_path: Path) -> None:
    found, ok = verdicts(tmp_path, {"grids/a.png": b"1", "looks/a.png": b"1"},
                         {"grids/a.png": b"2", "looks/a.png": b"1", "plots/new.png": b"3"})
    assert ok and found == {"grids/a.png": "changed", "looks/a.png": "same bytes", "plots/new.png": "only after"}


def test_changed_rows_a_removed_column_a_changed_or_lost_picture_fail(tmp_path: Path) -> None:
    cases = [({"similarity.csv": ROWS}, {"similarity.csv": ROWS.replace("0.25", "0.26")}, "ROWS DIFFER"),
             ({"similarity.csv": ROWS}, {"similarity.csv": "image,component\nastronaut,L01H00\nchelsea,L01H02\n"},
              "REMOVED sim_embed"),
             ({"input.png": b"1"}, {"input.png": b"2"}, "PICTURE DIFFERS"),
             ({"images/a/x.png": b"1"}, {}, "only before")]
    for n, (before, after, expected) in enumerate(cases):
        found, ok = verdicts(tmp_path / str(n), before, after)
        assert not ok and expected in " ".join(found.values()), (n, found)
