"""The `microllama` command line: streaming generation, make-tiny, one-line errors."""

import re
import subprocess
import sys

import pytest

from microllama import Llama, tiny
from microllama.cli import main

PROMPT = "Clearly, the meaning of life is"


def test_generate_streams_the_greedy_completion_after_the_prompt(capsys, tiny_ckpt, tokenizer):
    main(["generate", "--prompt", PROMPT, "--temperature", "0", "--max_gen_len", "8"])
    expected = Llama.build(tiny_ckpt, max_seq_len=512, max_batch_size=1).text_completion([PROMPT], 0, max_gen_len=8)
    assert capsys.readouterr().out == PROMPT + expected[0].generation + "\n"


def test_generate_takes_a_list_of_prompts(capsys, tokenizer):
    main(["generate", "--prompt", '["Hi", "Simply put,"]', "--temperature", "0", "--max_gen_len", "3"])
    out = capsys.readouterr().out
    assert out.startswith("Hi") and "\nSimply put," in out and out.count("=" * 40) == 2


def test_make_tiny_writes_meta_layout_with_the_embedded_seed(tmp_path, capsys):
    main(["make-tiny", str(tmp_path / "t")])
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == ["consolidated.00.pth", "params.json", "sha256.txt"]
    assert capsys.readouterr().out == f"wrote {tmp_path / 't'} (sha256 {tiny.SHA256['tiny']})\n"


@pytest.mark.parametrize("args", [["--help"], ["generate", "--help"], ["convert", "-h"]])
def test_help_does_not_import_torch(args):
    code = (
        "import atexit, sys; atexit.register(lambda: print('torch imported:', 'torch' in sys.modules)); "
        "from microllama.cli import main; main(sys.argv[1:])"
    )
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    assert result.returncode == 0 and "SYNOPSIS" in result.stderr  # fire writes help to stderr
    assert result.stdout == "torch imported: False\n"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["generate", "--ckpt_dir", "/nonexistent/ckpt"], "checkpoint directory not found: /nonexistent/ckpt"),
        (["generate", "--prompt", "1, 2"], "--prompt must be text"),
        (["generate", "--top_p", "2"], r"top_p must be a number in \(0, 1\]"),
        (["generate", "--dtype", "float8"], "unknown dtype 'float8'"),
    ],
    ids=["missing-ckpt", "prompt-parsed-as-tuple", "bad-top-p", "bad-dtype"],
)
def test_cli_error_is_one_line_and_nonzero_exit(args, message):
    result = subprocess.run([sys.executable, "-m", "microllama.cli", *args], capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("microllama: error: ")
    assert re.search(message, result.stderr)
