"""Edges of the command line and of what it prints: help of `dsl sae train`, the terminal's escaping of log
lines, and the setting that a refusal of an output folder names."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from dsl_cli.logs import PrintableFormatter
from helpers import dsl_in_process


@pytest.mark.parametrize("args", [["train", "--help"], ["train", "debug=tiny", "-h"]])
def test_sae_train_help_is_the_usage(args: list[str], tmp_path: Path, monkeypatch, capsys) -> None:
    """`dsl sae train --help` was refused, status 2, for want of layer=N (only `dsl sae --help` gave the usage)."""
    code, out, err = dsl_in_process(["sae", *args], tmp_path, monkeypatch, capsys, out=True)
    assert code == 0 and out.startswith("usage: dsl sae train [OVERRIDES...]") and err == "", out + err


def test_a_log_line_keeps_its_indentation_and_escapes_the_rest() -> None:
    """Hydra indents each job of a sweep with a tab (`\\t#0 : layer=0`), which was printed as `\\t`; a tab or
    an escape sequence inside a message (a folder's name) is still escaped."""
    record = logging.LogRecord("hydra", logging.INFO, __file__, 1, "\t#0 : hydra.run.dir=a\tb\x1b[31m\nc", None, None)
    assert PrintableFormatter("%(message)s").format(record) == "\t#0 : hydra.run.dir=a\\tb\\x1b[31m\\nc"


def test_an_unwritable_output_folder_names_the_setting_given(tmp_path: Path, monkeypatch, capsys) -> None:
    """`outputs_root=A_FILE`: the default run folder below it cannot be made, and the refusal said to choose
    another with hydra.run.dir, a setting the user had not given; where they gave that, it names it still."""
    (tmp_path / "a_file").write_text("")
    for given, named in (([], "outputs_root"), (["hydra.run.dir=a_file/run"], "hydra.run.dir")):
        code, err = dsl_in_process(["run", "debug=tiny", "outputs_root=a_file", *given], tmp_path, monkeypatch,
                                   capsys)
        assert code == 2 and err.count("\n") == 1 and "cannot write the output folder a_file/" in err, err
        assert err.endswith(f"(Not a directory); choose another with {named}=...\n"), err
