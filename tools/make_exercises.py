"""Write the tutorial's exercise version: each notebook of docs/tutorial/ with its learner's cells (tagged "solution"
in jupytext's percent format) cut to their functions' signatures and docstrings, each body a NotImplementedError
that names the stage. The other cells, the checks among them, are kept as they are.

    python tools/make_exercises.py [--out docs/tutorial/exercises]
"""

import ast
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # microllama from this checkout

from microllama import flags  # noqa: E402

TUTORIAL = Path(__file__).resolve().parents[1] / "docs" / "tutorial"
SOLUTION = '# %% tags=["solution"]'
EXERCISE = '# %% tags=["exercise"]'
CELL = re.compile(r"^(?=# %%)", re.M)  # a cell starts at each `# %%` line
TITLE = re.compile(r"^# # (Stage \d+): (.+)$", re.M)


def notebooks(folder: Path = TUTORIAL) -> list[Path]:
    """The solution notebooks, in stage order: NN_name.py."""
    return sorted(folder.glob("[0-9][0-9]_*.py"))


def stage_name(source: str, path: Path) -> str:
    """'Stage 02 (embedding rmsnorm)': the notebook's `# # Stage NN: title` line and its file's name."""
    match = TITLE.search(source)
    if match is None:
        raise ValueError(f"{path}: no title line `# # Stage NN: what it builds`")
    return f"{match[1]} ({path.stem[3:].replace('_', ' ')})"


def _stub(cell: str, stage: str, path: Path) -> str:
    """A solution cell's functions with their signatures and docstrings kept and their bodies a NotImplementedError."""
    lines = cell.splitlines()[1:]  # the cell's code, without its `# %%` line
    stubs = []
    for node in ast.parse("\n".join(lines)).body:
        if not isinstance(node, ast.FunctionDef):
            raise ValueError(f"{path}: a solution cell holds only functions, found {type(node).__name__} on line "
                             f"{node.lineno}")  # fmt: skip
        first = node.body[0]
        doc = isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
        keep = lines[node.lineno - 1 : first.end_lineno if doc else first.lineno - 1]
        raise_line = f'{" " * first.col_offset}raise NotImplementedError("{stage}: {node.name} is yours to write")'
        stubs.append("\n".join([*keep, raise_line]))
    head = f"{EXERCISE}\n# Your turn: write these functions, then run the check below.\n"
    return head + "\n\n\n".join(stubs) + "\n\n\n"


def exercise(source: str, path: Path) -> str:
    """The exercise version of a solution notebook's source."""
    stage = stage_name(source, path)
    cells = [c for c in CELL.split(source) if c]
    if not any(c.startswith(SOLUTION) for c in cells):
        raise ValueError(f"{path}: no cell tagged solution ({SOLUTION})")
    return "".join(_stub(c, stage, path) if c.startswith(SOLUTION) else c for c in cells)


def main(out: str = str(TUTORIAL / "exercises")) -> None:
    """Write the exercise version of every notebook of docs/tutorial/ into out."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    for path in notebooks():
        (folder / path.name).write_text(exercise(path.read_text(), path))
        print(f"wrote {folder / path.name}")


if __name__ == "__main__":
    flags.run(main)
