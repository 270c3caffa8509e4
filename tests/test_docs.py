"""The docs cannot drift from the code: every command in a ```bash, ```sh or ```console block of README.md and
docs/**/*.md runs here, on the tiny default, in one temporary directory with a cache of its own, and must exit 0.
A block that cannot run here (real weights, a GPU, torchrun, minutes of work) carries a mark just before it in the
markdown source, which renders as nothing: `<!-- not run: REASON -->` (reported here as a skip with its reason) or
`<!-- run by PATH -->`, where PATH runs the block's commands as written (checked here). The manual also builds as a
site, `mkdocs build --strict`, and the front page links every page of it."""

import io
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import REPO

from microllama.cli import main

DOC_FILES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
SHELL_LANGUAGES = ("bash", "sh", "console")
MARK = re.compile(r"<!-- (not run|run by):? (.+?) -->")
FENCE = re.compile(r"```(\S*)")


@dataclass(frozen=True)
class Command:
    line: int
    text: str
    stdin: str = ""  # what a console transcript shows typed at the program's prompts (`you> ...` in chat)


@dataclass(frozen=True)
class Block:
    path: Path
    line: int
    commands: tuple[Command, ...]
    mark: str = ""  # "", "not run" or "run by"
    reason: str = ""

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"


def commands(lang: str, lines: list[str], first: int) -> list[Command]:
    """The commands of a block whose first line is line number first: a console block's `$ ` lines (the rest is
    output, and `you> TEXT` lines are input to the command before them), every line of a bash or sh block but
    comments and blank ones; a line ending in a backslash goes on."""
    found: list[Command] = []
    text, start = "", 0
    for number, line in enumerate(lines, first):
        if text:
            text += "\n" + line
        elif lang == "console" and line.startswith("you> ") and found:
            last = found[-1]
            found[-1] = Command(last.line, last.text, last.stdin + line.removeprefix("you> ") + "\n")
            continue
        elif lang == "console" and not line.startswith("$ "):
            continue
        elif not line.strip() or line.lstrip().startswith("#"):
            continue
        else:
            text, start = line.removeprefix("$ ") if lang == "console" else line, number
        if not text.endswith("\\"):
            found.append(Command(start, text))
            text = ""
    return found


def blocks(path: Path) -> list[Block]:
    """The shell blocks of a markdown file, each with the mark on the line before it (if any)."""
    lines = path.read_text().splitlines()
    found, i = [], 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if fence is None:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), None)
        assert end is not None, f"{path.relative_to(REPO)}:{i + 1}: a code block that is never closed"
        if fence.group(1) in SHELL_LANGUAGES:
            mark = MARK.fullmatch(lines[i - 1].strip()) if i else None
            found.append(Block(path, i + 1, tuple(commands(fence.group(1), lines[i + 1 : end], i + 2)),
                               *(mark.groups() if mark else ())))  # fmt: skip
        i = end + 1
    return found


ALL_BLOCKS = [block for path in DOC_FILES for block in blocks(path)]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """One directory for every block, so that a block can use what an earlier one made (a run directory, a
    checkpoint copy): the repository's corpus/ and goldens/ linked in, read only by the commands, and a
    MICROLLAMA_CACHE of its own (the tiny checkpoints built there, the corpus tokenized there)."""
    root = tmp_path_factory.mktemp("docs")
    for name in ("corpus", "goldens"):
        (root / name).symlink_to(REPO / name, target_is_directory=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MICROLLAMA_CACHE", str(root / "cache"))
        yield root


def git_status() -> str:
    return subprocess.run(["git", "status", "--porcelain", "--ignored=no"], cwd=REPO, capture_output=True,
                          text=True, check=True).stdout  # fmt: skip


@pytest.fixture(scope="module")
def status_before() -> str:
    return git_status()


RAN: dict[str, str] = {}  # a command's words and input -> the block that ran it: a command shown twice runs once


def run(command: Command, where: str, cwd: Path, capsys, monkeypatch) -> tuple[int, str]:
    """Exit status and stderr of one command: `microllama ...` through the command line's main in this process,
    `python tools/...` and `python docs/tutorial/...` (a stage) in a fresh interpreter, anything else (echo with a
    redirection) through bash."""
    argv = shlex.split(command.text, comments=True)
    if argv[0] == "microllama":
        monkeypatch.setattr(sys, "stdin", io.StringIO(command.stdin))
        try:
            main(argv[1:])
            status = 0
        except SystemExit as exit_info:  # an error, or --help
            status = exit_info.code if isinstance(exit_info.code, int) else 0 if exit_info.code is None else 1
        return status, capsys.readouterr().err
    if argv[0] == "python" and argv[1].startswith(("tools/", "docs/tutorial/")):
        done = subprocess.run([sys.executable, str(REPO / argv[1]), *argv[2:]], cwd=cwd, capture_output=True,
                              text=True)  # fmt: skip
        return done.returncode, done.stderr
    if argv[0] == "echo":
        done = subprocess.run(["bash", "-c", command.text], cwd=cwd, capture_output=True, text=True)
        return done.returncode, done.stderr
    pytest.fail(f"{where}: no way to run `{command.text}` here: make it runnable or mark its block not run")


def runs_as_written(block: Block) -> None:
    """A block marked `run by PATH` holds commands that PATH runs: each command of the block (split at &&) is a
    line of PATH, word for word, but for a -q there (quieter output, the same work)."""
    path = REPO / block.reason
    assert path.is_file(), f"{block.where}: marked run by {block.reason}, which is not a file"
    lines = [
        [word for word in shlex.split(line, comments=True) if word != "-q"] for line in path.read_text().splitlines()
    ]
    for command in block.commands:
        for part in command.text.split("&&"):
            assert shlex.split(part) in lines, f"{block.where}: `{part.strip()}` is not run by {block.reason}"


@pytest.mark.slow
@pytest.mark.parametrize("block", ALL_BLOCKS, ids=[block.where for block in ALL_BLOCKS])
def test_every_command_in_the_docs_runs(block, workdir, status_before, request, capsys, monkeypatch):
    if block.mark == "not run":
        pytest.skip(f"{block.where}: not run: {block.reason}")
    if block.mark == "run by":
        runs_as_written(block)
        return
    assert block.commands, f"{block.where}: a shell block without a command"
    request.getfixturevalue("tokenizer")  # skips where tokenizer.model cannot be found (the core tox env)
    monkeypatch.chdir(workdir)
    for command in block.commands:
        key = shlex.join(shlex.split(command.text, comments=True)) + "\0" + command.stdin
        if key in RAN:
            continue
        where = f"{block.path.relative_to(REPO)}:{command.line}"
        status, err = run(command, where, workdir, capsys, monkeypatch)
        last = (err.strip().splitlines() or [""])[-1]
        assert status == 0, f"{where}: `{command.text}` exited {status}: {last}"
        RAN[key] = block.where


def test_every_mark_stands_before_a_shell_block():
    """A mark elsewhere (before a python block, or left behind when a block moved) would hide nothing: it is an
    error, so the marks stay honest."""
    marked = {(block.path, block.line - 1) for block in ALL_BLOCKS if block.mark}
    for path in DOC_FILES:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if MARK.fullmatch(line.strip()):
                assert (path, number) in marked, f"{path.relative_to(REPO)}:{number}: a mark not before a shell block"


def test_the_front_page_links_every_docs_page():
    readme = (REPO / "README.md").read_text()
    links = set(re.findall(r"\]\((docs/[^)#]+)", readme))
    pages = {str(p.relative_to(REPO)) for p in (REPO / "docs").rglob("*.md") if "exercises" not in p.parts}
    assert pages - links == set(), "README.md does not link these pages"
    assert len(readme.splitlines()) <= 250, "README.md is a front page: at most about 250 lines"


def mkdocs_build(config: Path, site: Path) -> subprocess.CompletedProcess:
    # not --quiet: mkdocs then logs no warnings, and strict mode, which counts them, passes a broken link
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(config),
                           "--site-dir", str(site)], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})  # fmt: skip


@pytest.mark.slow
def test_the_manual_builds_as_a_site_in_strict_mode(tmp_path, status_before):
    """mkdocs build --strict passes, into tmp_path, leaving the work tree as it was; and the same build of a copy
    of the docs with one broken anchor planted fails naming it, so strict mode is seen to check links."""
    pytest.importorskip("material", reason="needs mkdocs-material: pip install -e '.[docs]'")
    done = mkdocs_build(REPO / "mkdocs.yml", tmp_path / "site")
    assert done.returncode == 0, done.stderr[-4000:]
    assert (tmp_path / "site" / "index.html").is_file()
    assert git_status() == status_before

    shutil.copytree(REPO / "docs", tmp_path / "docs")
    shutil.copy(REPO / "mkdocs.yml", tmp_path / "mkdocs.yml")
    page = tmp_path / "docs" / "layout.md"
    page.write_text(page.read_text() + "\nSee [the figures](benchmarks.md#no-such-section).\n")
    planted = mkdocs_build(tmp_path / "mkdocs.yml", tmp_path / "planted-site")
    assert planted.returncode != 0 and "#no-such-section" in planted.stderr, planted.stderr[-2000:]


def test_running_the_docs_left_the_work_tree_as_it_was(status_before):
    assert git_status() == status_before
