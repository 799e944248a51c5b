"""Print the fault catalogue as a markdown table: | case | what you see |.

The rows come, in file order, from the docstrings of the tests in tests/test_faults.py (engine and
command line) and tests/_qt/test_faults_gui.py (widgets): the first line is the case, the text after
"You see:" is what the user sees. Usage: python scripts/fault_table.py
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CATALOGUES = (("command line / engine", ROOT / "tests" / "test_faults.py"),
              ("napari widgets", ROOT / "tests" / "_qt" / "test_faults_gui.py"))


def rows(path: Path) -> list[tuple[str, str]]:
    """(case, what you see) for every test function of ``path`` with a docstring."""
    result = []
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
            doc = ast.get_docstring(node) or ""
            lines = [line.strip() for line in doc.splitlines()]
            case = lines[0] if lines else node.name
            seen = " ".join(lines[1:]).strip()
            seen = seen.split("You see:", 1)[1].strip() if "You see:" in seen else ""
            result.append((case, seen))
    return result


def cell(text: str) -> str:
    return text.replace("|", "\\|")


def main() -> None:
    print("| case | what you see |")
    print("| --- | --- |")
    for where, path in CATALOGUES:
        for case, seen in rows(path):
            print(f"| {cell(case)} ({where}) | {cell(seen)} |")


if __name__ == "__main__":
    main()
