"""The scripts in tools/ have microllama's command line (microllama.flags.run): --help works, arguments are
checked against the signature before any work, and every error is one line `SCRIPT: error: ...`, status 1."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from microllama import cli, flags
from tools import bench_decode, bench_fsdp_load, bench_load, record_goldens

ROOT = Path(__file__).resolve().parents[1]


def assert_one_line_error(stderr: str, prog: str, message: str) -> None:
    assert stderr.count("\n") == 1 and stderr.startswith(f"{prog}: error: "), stderr
    assert re.search(message, stderr), stderr


@pytest.mark.parametrize(
    ("script", "args", "status", "message"),
    [
        ("bench_decode.py", ["--help"], 0, None),
        ("bench_load.py", ["bogus"], 1, r"unknown command 'bogus'; commands: run, build, measure"),
        ("record_goldens.py", ["--dtype", "float64"], 1, r"--dtype .float64.: a golden set is recorded in float32"),
        ("compare_goldens.py", ["/nonexistent/set"], 1, r"/nonexistent/set/manifest\.json not found"),
    ],
)
def test_script_runs_from_anywhere_with_one_line_errors(script, args, status, message, tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "tools" / script), *args], capture_output=True, text=True,
                            cwd=tmp_path)  # fmt: skip
    assert result.returncode == status and "Traceback" not in result.stderr
    if message is None:
        assert "--batch_size=BATCH_SIZE" in result.stderr  # fire writes help to stderr
    else:
        assert result.stdout == ""
        assert_one_line_error(result.stderr, script, message)


@pytest.mark.parametrize(
    ("commands", "args", "message"),
    [
        (bench_decode.main, ["--batch_size", "1.5"], r"--batch_size must be an integer, got '1\.5'"),
        (bench_decode.main, ["--batchsize", "2"], r"unknown flag --batchsize \(did you mean --batch_size\?\); "
         r"script.py takes --model, --device, --dtype, --n_layers, --batch_size, --prompt_len, --gen_len, "),
        (bench_decode.main, ["--repeats", "0"], r"repeats must be at least 1, got 0"),
        (bench_decode.main, ["--model", "llama4"], r"unknown model 'llama4'; expected one of llama3\.1-8b"),
        (bench_load.COMMANDS, ["build", "out", "--name", "nope"], r"unknown model 'nope'"),
        (bench_load.COMMANDS, ["run", "--out", "out", "--dtypes", "bfloat16"], r"--dtypes must be a non-empty JSON"),
        (bench_load.COMMANDS, ["run"], r"script.py run needs OUT \(or --out\)"),
        (bench_fsdp_load.COMMANDS, ["run", "--world_sizes", "[2, 4.5]"],
         r"--world_sizes must be a non-empty JSON list of integers, such as '\[2, 4\]', got '\[2, 4\.5\]'"),
        (record_goldens.main, ["--wrold_size", "2"], r"unknown flag --wrold_size \(did you mean --world_size\?\)"),
        (record_goldens.main, ["--world_size", "two"], r"--world_size must be an integer, got 'two'"),
        (record_goldens.main, ["--ckpt_dir", "/nonexistent/ckpt"], r"checkpoint directory not found"),
        (cli.verify, ["set", "ckpt", "cpu", "extra"], r"unexpected argument 'extra'.* takes 3 positional"),
    ],
)  # fmt: skip
def test_script_argument_errors_are_one_line_before_any_work(commands, args, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        flags.run(commands, args, "script.py")
    assert exit_info.value.code == 1
    captured = capsys.readouterr()
    assert captured.out == "" and list(tmp_path.iterdir()) == []
    assert_one_line_error(captured.err, "script.py", message)
