"""Write the tutorial's exercise version: each notebook of docs/tutorial/ with its learner's cells (tagged "solution"
in jupytext's percent format) cut to their functions' (and classes' methods') signatures and docstrings, each body a
NotImplementedError that names the stage. The other cells, the checks among them, are kept as they are.

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


def _head(node: ast.AST, lines: list[str]) -> tuple[list[str], list[ast.stmt]]:
    """A function's or class's lines up to its body (decorators, signature, docstring kept), and the body after
    its docstring."""
    first = node.body[0]
    doc = isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
    start = min([node.lineno, *(d.lineno for d in node.decorator_list)])
    return lines[start - 1 : first.end_lineno if doc else first.lineno - 1], node.body[1:] if doc else node.body


def _stub_function(node: ast.FunctionDef, lines: list[str], stage: str, qualname: str) -> str:
    keep, _ = _head(node, lines)
    indent = " " * node.body[0].col_offset
    return "\n".join([*keep, f'{indent}raise NotImplementedError("{stage}: {qualname} is yours to write")'])


def _stub(cell: str, stage: str, path: Path) -> str:
    """A solution cell's functions, and classes' methods, with their signatures and docstrings kept and their bodies a
    NotImplementedError naming the stage and the function (Class.method for a method)."""
    lines = cell.splitlines()[1:]  # the cell's code, without its `# %%` line
    stubs = []
    for node in ast.parse("\n".join(lines)).body:
        if isinstance(node, ast.FunctionDef):
            stubs.append(_stub_function(node, lines, stage, node.name))
        elif isinstance(node, ast.ClassDef):
            keep, body = _head(node, lines)
            methods = [m for m in body if isinstance(m, ast.FunctionDef)]
            if len(methods) != len(body):
                raise ValueError(f"{path}: class {node.name} in a solution cell holds only methods after its "
                                 "docstring")  # fmt: skip
            stubs.append("\n\n".join(["\n".join(keep)] + [_stub_function(m, lines, stage, f"{node.name}.{m.name}")
                                                      for m in methods]))  # fmt: skip
        else:
            raise ValueError(f"{path}: a solution cell holds only functions and classes, found "
                             f"{type(node).__name__} on line {node.lineno}")  # fmt: skip
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
