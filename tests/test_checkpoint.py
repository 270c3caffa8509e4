"""open_checkpoint: one resolution of a checkpoint argument (a path, a tiny name, a published name) that
every entry point shares; the import graph it sits in; what files it leaves behind."""

import ast
import os
import pickle
import re
import stat
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

import pytest
import torch

from microllama.checkpoint import family
from microllama.checkpoint.load import Checkpoint, CheckpointError, convert, load_model, open_checkpoint
from microllama.checkpoint.tiny import default_ckpt_dir
from microllama.cli import main
from microllama.files import atomic_dir, parse_dtype
from microllama.generation import Llama

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "microllama"


def test_none_and_tiny_names_open_the_embedded_checkpoints():
    assert open_checkpoint(None).dir == default_ckpt_dir("tiny")
    for name in family.TINY:
        ckpt = open_checkpoint(name)
        assert (ckpt.dir, ckpt.layout, ckpt.tiny) == (default_ckpt_dir(name), "meta", name)
        assert ckpt.params == family.REGISTRY[name].params


def test_published_name_is_a_configuration_without_weights():
    ckpt = open_checkpoint("llama3.2-1b")
    assert ckpt.dir is None and ckpt.tied and ckpt.args.rope_scaling.factor == 32.0
    with pytest.raises(CheckpointError, match="llama3.2-1b is a published configuration.*pass the directory"):
        ckpt.load_model()


def test_a_name_means_the_built_in_even_beside_a_directory_of_that_name_which_a_path_reaches(
    tmp_path, monkeypatch, tiny_ckpt, capsys
):
    convert(tiny_ckpt, tmp_path / "llama3.1-8b", "meta", shards=2)
    monkeypatch.chdir(tmp_path)
    named = open_checkpoint("llama3.1-8b")
    assert named.dir is None and named.args == family.REGISTRY["llama3.1-8b"].args()
    assert capsys.readouterr().err.startswith("note: llama3.1-8b names the built-in configuration, not the directory")
    for path in ("./llama3.1-8b", Path("llama3.1-8b"), tmp_path / "llama3.1-8b"):
        ckpt = open_checkpoint(path)
        assert ckpt.dir == Path(path) and len(ckpt.weight_files) == 2


def test_missing_path_and_file_path_are_named(tmp_path):
    with pytest.raises(CheckpointError, match=r"checkpoint directory not found: .*absent \(nor is it a named"):
        open_checkpoint(tmp_path / "absent")
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="checkpoint directory is not a directory: .*file"):
        open_checkpoint(tmp_path / "file")


def test_open_checkpoint_passes_a_checkpoint_through():
    ckpt = open_checkpoint("tiny")
    assert open_checkpoint(ckpt) is ckpt and isinstance(ckpt, Checkpoint)


def test_llama_build_takes_a_tiny_name(tokenizer):
    llama = Llama.build("tiny-hd128", max_seq_len=32, max_batch_size=1)
    assert llama.model.params.dim == family.REGISTRY["tiny-hd128"].params["dim"]


def test_config_json_is_read_once_per_load(tmp_path, tiny_ckpt, monkeypatch):
    hf = convert(tiny_ckpt, tmp_path / "hf", "hf")
    reads = []
    read_text = Path.read_text
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: reads.append(self.name) or read_text(self, *a, **k))
    load_model(hf, max_seq_len=16)
    assert reads.count("config.json") == 1


def test_parse_dtype_names_what_it_takes():
    assert parse_dtype("bf16") is torch.bfloat16 and parse_dtype(torch.float32) is torch.float32
    for bad in ("float64", torch.float64, 32):
        with pytest.raises(ValueError, match="unknown dtype .* expected one of float32"):
            parse_dtype(bad)


def _package_imports() -> dict[str, tuple[set[str], set[str]]]:
    """module (dotted under microllama: "model", "golden.verify") -> (the microllama modules it imports at module
    level, those it imports inside functions), every room (subpackage) walked."""
    out = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        package = name.split(".")[:-1]  # what a relative import starts from
        top, inner = set(), set()
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if not isinstance(node, ast.ImportFrom):
                continue
            if node.level == 0:
                if not (node.module or "").startswith("microllama"):
                    continue
                base, names = (node.module or "").split(".")[1:], [a.name for a in node.names]
            else:
                base = package[: len(package) - (node.level - 1)] + (node.module.split(".") if node.module else [])
                names = [a.name for a in node.names]
            # `from .x import y`: module x; `from . import x` / `from .room import x`: module room.x where one exists
            targets = {".".join([*base, n]) for n in names if (PACKAGE.joinpath(*base, n + ".py")).is_file()}
            targets = targets or {".".join(base)}
            (top if node in tree.body else inner).update(t for t in targets if t)
        out[name] = (top, inner)
    return out


# Rooms in the order they may import one another (each only those after it): golden sets check the trainer, which
# loads checkpoints, which build the model. The modules of the learner's core (args, model) import no room.
ROOMS = ["golden", "train", "checkpoint", "core"]
CORE = {"args", "model"}


def _room(module: str) -> Optional[str]:
    first = module.split(".")[0]
    return first if first in ROOMS else "core" if module in CORE else None


def test_package_import_graph_has_no_cycle_counting_imports_inside_functions():
    imports = {m: top | inner for m, (top, inner) in _package_imports().items()}
    done: set[str] = set()
    while len(done) < len(imports):  # peel off modules whose imports are all done: a cycle never peels
        ready = {m for m, deps in imports.items() if m not in done and deps <= done}
        assert ready, f"import cycle among {sorted(set(imports) - done)}"
        done |= ready


def test_rooms_import_downward_only_and_nothing_imports_the_command_line():
    """golden -> train -> checkpoint -> model, at module level or inside a function; cli (the command) is imported
    by nothing, and flags (the command line) imports nothing of microllama."""
    upward, into_cli = [], []
    for module, (top, inner) in _package_imports().items():
        for target in top | inner:
            if target == "cli" and module != "__main__":
                into_cli.append(module)
            here, there = _room(module), _room(target)
            if here and there and ROOMS.index(there) < ROOMS.index(here):
                upward.append(f"{module} ({here}) imports {target} ({there})")
    assert upward == [] and into_cli == [], (upward, into_cli)
    assert _package_imports()["flags"] == (set(), set())


def test_only_the_command_line_imports_inside_functions():
    """Function-level imports defer what --help does not need; elsewhere they would only hide structure."""
    assert {m for m, (_, inner) in _package_imports().items() if inner} <= {"cli", "train.command"}


def test_no_module_shares_a_name_with_a_repository_folder():
    """From the directory above a clone, the repository root imports as a namespace package, and a
    module named like a top-level folder (goldens/) would resolve to that folder."""
    folders = {p.name for p in REPO.iterdir() if p.is_dir()}
    rooms = {p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert ({p.stem for p in PACKAGE.glob("*.py")} | rooms) & folders == set()


def test_atomic_dir_removes_what_a_killed_writer_left_and_keeps_a_live_ones(tmp_path, tiny_ckpt):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    leftover = tmp_path / f".out.partial-{dead.stdout.strip()}-abc123"
    (leftover / "x").mkdir(parents=True)
    live = tmp_path / f".out.partial-{os.getpid()}-def456"
    live.mkdir()
    convert(tiny_ckpt, tmp_path / "out", "meta")
    assert not leftover.exists() and live.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name, "out"]


def test_atomic_dir_refuses_a_file_and_a_non_empty_directory(tmp_path):
    (tmp_path / "file").write_text("mine")
    with pytest.raises(FileExistsError, match="is not a directory"), atomic_dir(tmp_path / "file"):
        pass
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "mine").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"), atomic_dir(tmp_path / "dir"):
        pass
    assert (tmp_path / "file").read_text() == (tmp_path / "dir" / "mine").read_text() == "mine"


def test_an_unwritable_target_is_named_as_given_not_by_its_temporary_directory(tmp_path, monkeypatch, capsys):
    def unwritable(prefix, dir):  # what mkdtemp raises in a directory the user may not write
        raise PermissionError(13, "Permission denied", f"{dir}/{prefix}x1y2z3")

    monkeypatch.setattr(tempfile, "mkdtemp", unwritable)
    with pytest.raises(SystemExit):
        main(["make-tiny", str(tmp_path / "out")])
    assert capsys.readouterr().err == f"microllama: error: cannot write {tmp_path / 'out'}: Permission denied\n"
    monkeypatch.undo()
    with pytest.raises(FileNotFoundError, match=rf"^cannot write {re.escape(str(tmp_path / 'out' / 'a' / 'b'))}: "):
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "a" / "b").write_text("")
    assert [p.name for p in tmp_path.iterdir()] == []


@pytest.mark.parametrize("to", ["meta", "hf"])
def test_written_files_get_the_permissions_of_a_plain_open(tmp_path, tiny_ckpt, to):
    mask = os.umask(0o022)
    try:
        out = convert(tiny_ckpt, tmp_path / "out", to)
    finally:
        os.umask(mask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {p.name: 0o644 for p in out.iterdir()}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads Linux's /proc/self/status")
def test_release_pages_gives_back_a_mapped_tensors_resident_pages(tmp_path):
    from microllama.checkpoint.meta_layout import load_pth, release_pages

    def rss_file() -> int:
        line = next(s for s in Path("/proc/self/status").read_text().splitlines() if s.startswith("RssFile:"))
        return int(line.split()[1]) * 1024

    torch.save({"w": torch.ones(64 << 20, dtype=torch.uint8)}, tmp_path / "w.pth")
    w = load_pth(tmp_path / "w.pth")["w"]
    assert int(w[::4096].sum()) == 16384  # touch every page
    before = rss_file()
    release_pages(w)
    assert before - rss_file() > 60 << 20
    assert int(w.sum()) == 64 << 20  # read again from the file, unchanged


def test_pickled_pth_is_refused_as_a_pickle_not_as_truncated(tmp_path):
    (tmp_path / "params.json").write_text((default_ckpt_dir("tiny") / "params.json").read_text())
    with open(tmp_path / "consolidated.00.pth", "wb") as f:
        pickle.dump({"w": [1.0]}, f)
    with pytest.raises(CheckpointError, match="consolidated.00.pth: a pickle, not the zip archive torch.save writes"):
        load_model(tmp_path)
    (tmp_path / "consolidated.00.pth").write_text("hello")
    with pytest.raises(CheckpointError, match=r"consolidated.00.pth: not a torch.save file \(it begins with"):
        load_model(tmp_path)
