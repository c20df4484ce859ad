"""The codebase's shape as the style guide asks: no function in dsl_cli/ longer than 50 lines (from its `def`
line to its last line, docstring included)."""

from __future__ import annotations

import ast
from pathlib import Path

import dsl_cli

PACKAGE = Path(dsl_cli.__file__).parent
MAX_LINES = 50


def long_functions(root: Path, limit: int) -> list[str]:
    """`file:line name (N lines)` for every function or method under `root` longer than `limit` lines."""
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > limit:
                    found.append(f"{path.relative_to(root.parent)}:{node.lineno} {node.name} ({length} lines)")
    return found


def test_no_function_in_dsl_cli_is_longer_than_50_lines() -> None:
    assert long_functions(PACKAGE, MAX_LINES) == []


def test_the_length_check_sees_a_long_function(tmp_path: Path) -> None:
    body = "\n".join(f"        x{i} = {i}" for i in range(50))
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "m.py").write_text(f"def short():\n    return 1\n\n\nclass C:\n    def long(self):\n{body}\n")
    assert long_functions(tmp_path / "pkg", MAX_LINES) == ["pkg/m.py:6 long (51 lines)"]
