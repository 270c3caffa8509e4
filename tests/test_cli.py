"""The `microllama` command line: text stays text, every argument is checked before any work (and before torch
is imported), every error is one line, --help is quick, streamed generation, make-tiny, convert."""

import inspect
import re
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest
from conftest import run_main

from microllama import Llama, flags
from microllama.checkpoint import tiny
from microllama.cli import COMMANDS, main
from microllama.flags import _param_named, run

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "Clearly, the meaning of life is"
# `microllama ARGS` in a fresh interpreter, whose last line of stdout says whether it imported torch.
FRESH = (
    "import atexit, sys; atexit.register(lambda: print('torch imported:', 'torch' in sys.modules)); "
    "from microllama.cli import main; main(sys.argv[1:])"
)


def microllama(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", FRESH, *args], capture_output=True, text=True, cwd=ROOT)


def assert_one_line_error(stderr: str, message: str, prog: str = "microllama") -> None:
    assert stderr.count("\n") == 1 and stderr.startswith(f"{prog}: error: "), stderr
    assert re.search(message, stderr), stderr


@pytest.fixture
def no_loading(monkeypatch):
    """Fails the test if a command gets as far as loading a checkpoint."""

    def build(*args, **kwargs):
        raise AssertionError("a checkpoint was loaded")

    monkeypatch.setattr(Llama, "build", staticmethod(build))


@pytest.fixture(scope="module")
def tiny_llama(tiny_ckpt, tokenizer):
    return Llama.build(tiny_ckpt, max_seq_len=512, max_batch_size=1)


@pytest.mark.parametrize("args", [["--help"], ["generate", "--help"], ["convert", "-h"]])
def test_help_does_not_import_torch(args):
    result = microllama(*args)  # fire writes help to stderr
    assert result.returncode == 0 and "Traceback" not in result.stderr and "SYNOPSIS" in result.stderr
    assert result.stdout == "torch imported: False\n"


def help_of(command: str, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().err  # fire writes help to stderr


@pytest.mark.parametrize("command", list(COMMANDS))
def test_help_names_each_type_and_shows_only_the_short_flags_that_the_parser_takes(command, capsys):
    help_text = help_of(command, capsys)
    types = set(re.findall(r"^ +Type: (.*)$", help_text, re.MULTILINE))
    assert types and all(re.fullmatch(r"(Optional\[)?(str|int|float|bool|JSON list of str)\]?", t) for t in types), (
        types
    )
    short = re.findall(r"^ +-(\w), --(\w+)", help_text, re.MULTILINE)
    params = inspect.signature(COMMANDS[command]).parameters
    assert all(_param_named(letter, params) == flag for letter, flag in short), short
    assert len({letter for letter, _ in short}) == len(short), short


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_help_describes_every_flag_of_generate_and_chat(command, capsys):
    flags = help_of(command, capsys).split("FLAGS\n")[1].split("\n\n")[0]
    items = re.split(r"\n(?= +(?:-\w, )?--)", flags)
    assert len(items) == len(inspect.signature(COMMANDS[command]).parameters)
    undescribed = [i.split()[0] for i in items if not re.search(r"\n +(?!Type:|Default:)\S", i)]
    assert undescribed == []


def test_generate_help_lists_the_flags_and_the_json_list_of_prompts():
    help_text = " ".join(microllama("generate", "--help").stderr.split())
    assert all(f"--{flag}=" in help_text for flag in ("prompts", "temperature", "max_gen_len", "flash"))
    assert '--prompts \'["first", "second"]\'' in help_text


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["generate", "--temprature", "0"], r"unknown flag --temprature \(did you mean --temperature\?\); "
         r"microllama generate takes --prompt, --prompts, --ckpt_dir, --temperature, --top_p, "),
        (["convert", "a", "b", "--to", "hf", "--shard", "2"], r"unknown flag --shard \(did you mean --shards\?\); "
         r"microllama convert takes --src, --dst, --to, --shards$"),
        (["generate", "Hello", "world"], r"unexpected argument 'world' \(quote text that has spaces\)"),
        (["info", "tiny", "extra"], r"unexpected argument 'extra'.*microllama info takes 1 positional \(TARGET\)"),
        (["make-tiny"], r"microllama make-tiny needs OUT_DIR \(or --out_dir\)"),
        (["generat"], r"unknown command 'generat' \(did you mean generate\?\); commands: generate, make-tiny, "),
        (["--temperature", "0"], r"the command comes first, got --temperature"),
        (["generate", "--prompt"], r"--prompt needs a value \(--prompt=VALUE for one that starts with -\)"),
        (["generate", "-p", "x"], r"-p could be any of --prompt, --prompts"),
        (["generate", "--seed", "1", "--seed", "2"], r"--seed is given twice"),
        (["generate", "--temperature", "nan"], r"--temperature must be a finite number, got 'nan'"),
        (["generate", "--temperature", "inf"], r"--temperature must be a finite number, got 'inf'"),
        (["generate", "--temperature", "hot"], r"--temperature must be a finite number, got 'hot'"),
        (["generate", "--top_p=1e999"], r"--top_p must be a finite number, got '1e999'"),
        (["generate", "--max_gen_len", "1.5"], r"--max_gen_len must be an integer, got '1\.5'"),
        (["generate", "--seed", "1.5"], r"--seed must be an integer, got '1\.5'"),
        (["generate", "--seed", "2**70"], r"--seed must be an integer, got '2\*\*70'"),
        (["generate", "--max_seq_len", "many"], r"--max_seq_len must be an integer, got 'many'"),
        (["generate", "--flash", "maybe"], r"--flash must be true or false, got 'maybe'"),
        (["generate", "--prompts", "[]"], r"--prompts must be a non-empty JSON list of strings, such as "),
        (["generate", "--prompts", "first prompt"], r"--prompts must be a non-empty JSON list of strings"),
        (["generate", "--prompts", '"one"'], r"--prompts must be a non-empty JSON list of strings"),
        (["generate", "--prompts", "[1, 2]"], r"--prompts must be a non-empty JSON list of strings"),
        (["generate", "--prompts", '{"a": "b"}'], r"--prompts must be a non-empty JSON list of strings"),
        (["convert", "a", "b", "--to", "hf", "--shards", "two"], r"--shards must be an integer, got 'two'"),
        (["make-tiny", "out", "--seed", "0.5"], r"--seed must be an integer, got '0\.5'"),
    ],
)  # fmt: skip
def test_argument_errors_are_one_line_before_torch_is_imported(args, message):
    result = microllama(*args)
    assert result.returncode == 1
    assert_one_line_error(result.stderr, message)
    assert result.stdout == "torch imported: False\n"  # nothing ran, nothing was printed


def test_misspelt_flag_does_no_work(tmp_path, capsys):
    status, out, err = run_main(capsys, "make-tiny", str(tmp_path / "t"), "--sed", "1")
    assert status == 1 and out == "" and "unknown flag --sed (did you mean --seed?)" in err
    assert not (tmp_path / "t").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--temperature", "-1"], r"temperature must be a finite number >= 0, got -1\.0"),
        (["--top_p", "2"], r"top_p must be a number in \(0, 1\], got 2\.0"),
        (["--top_p", "0"], r"top_p must be a number in \(0, 1\], got 0\.0"),
        (["--max_gen_len", "0"], r"max_gen_len must be an integer >= 1, got 0"),
        (["--seed", "-1"], r"seed must be an integer from 0 to 2\*\*64 - 1, got -1"),
        (["--seed", str(2**70)], r"seed must be an integer from 0 to 2\*\*64 - 1, got 1180591620717411303424"),
        (["--max_seq_len", "0"], r"--max_seq_len must be at least 1, got 0"),
        (["--prompt", "a", "--prompts", '["b"]'], r"give --prompt or --prompts, not both"),
    ],
)
def test_generate_refuses_bad_values_before_loading_a_checkpoint(args, message, capsys, no_loading):
    status, out, err = run_main(capsys, "generate", *args)
    assert status == 1 and out == ""
    assert_one_line_error(err, message)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["generate", "--ckpt_dir", "/nonexistent/ckpt"], r"checkpoint directory not found: /nonexistent/ckpt"),
        (["generate", "--dtype", "float8"], r"unknown dtype 'float8'"),
        (["convert", "tiny", "out", "--to", "hf", "--shards", "2"], r"--shards splits Meta's layout over tensor-par"),
        (["convert", "tiny", "out", "--to", "safetensors"], r"--to must be 'meta' or 'hf', got 'safetensors'"),
        (["convert", "tiny", "out", "--to", "meta", "--shards", "0"], r"--shards must be a positive integer, got 0$"),
        (["make-tiny", "out", "--name", "huge"], r"unknown tiny config 'huge'"),
        (["info", "/nonexistent/ckpt"], r"checkpoint directory not found: /nonexistent/ckpt \(nor is it a named"),
        (["verify", "/nonexistent/set"], r"/nonexistent/set/manifest\.json not found"),
    ],
)
def test_every_command_reports_errors_in_one_line_with_status_1(args, message, capsys):
    status, out, err = run_main(capsys, *args)
    assert status == 1 and out == ""
    assert_one_line_error(err, message)


def test_generate_refuses_a_prompt_too_long_before_echoing_it(capsys, tokenizer):
    status, out, err = run_main(capsys, "generate", "--prompt", "word " * 20, "--max_seq_len", "8")
    assert status == 1 and out == ""
    assert_one_line_error(err, r"prompt 0 has \d+ tokens, at or beyond max_seq_len 8: no room to generate")


def test_generate_streams_the_greedy_completion_after_the_prompt(capsys, tiny_llama):
    main(["generate", "--prompt", PROMPT, "--temperature", "0", "--max_gen_len", "8"])
    expected = tiny_llama.text_completion([PROMPT], 0, max_gen_len=8)
    assert capsys.readouterr().out == PROMPT + expected[0].generation + "\n"


def test_generate_with_compile_says_on_stderr_that_the_first_step_compiles(capsys, monkeypatch, tiny_llama):
    """The first compiled step can take a minute (8B on CUDA): said before the prompt is echoed, on stderr, so
    stdout stays the completion. (Llama.build is stood in for by the eager model here: the saying is the test.)"""
    built = {}

    def build(*args, **kwargs):
        built.update(kwargs)
        return tiny_llama

    monkeypatch.setattr(Llama, "build", staticmethod(build))
    main(["generate", "--prompt", PROMPT, "--temperature", "0", "--max_gen_len", "4", "--compile"])
    captured = capsys.readouterr()
    assert built["compile"] is True
    assert captured.err.startswith("--compile: the first decode step compiles the model")
    assert captured.out.startswith(PROMPT)


@pytest.mark.parametrize("prompt", ["Hello, world", "1984", "None", "True", '{"a": 1}', '["a", "b"]', "-1", ""])
def test_generate_takes_the_prompt_as_plain_text(prompt, capsys, tiny_llama):
    main(["generate", "--prompt", prompt, "--temperature", "0", "--max_gen_len", "2"])
    expected = tiny_llama.text_completion([prompt], 0, max_gen_len=2)
    assert capsys.readouterr().out == prompt + expected[0].generation + "\n"


def test_generate_takes_the_prompt_as_its_positional_argument(capsys, tiny_llama):
    main(["generate", "Hello, world", "--temperature=0", "--max-gen-len", "2"])
    expected = tiny_llama.text_completion(["Hello, world"], 0, max_gen_len=2)
    assert capsys.readouterr().out == "Hello, world" + expected[0].generation + "\n"


def test_generate_takes_a_json_list_of_prompts(capsys, tokenizer):
    main(["generate", "--prompts", '["Hi", "Simply put, 1984"]', "--temperature", "0", "--max_gen_len", "3"])
    out = capsys.readouterr().out
    assert out.startswith("Hi") and "\nSimply put, 1984" in out and out.count("=" * 40) == 2


def test_generate_takes_a_tiny_checkpoint_by_name(capsys, tiny_hd128_ckpt, tokenizer):
    main(["generate", "--ckpt_dir", "tiny-hd128", "--temperature", "0", "--max_gen_len", "2"])
    expected = Llama.build(tiny_hd128_ckpt, max_seq_len=512, max_batch_size=1).text_completion([PROMPT], 0, 0.9, 2)
    assert capsys.readouterr().out == PROMPT + expected[0].generation + "\n"


def test_make_tiny_writes_meta_layout_with_the_embedded_seed(tmp_path, capsys):
    main(["make-tiny", str(tmp_path / "t")])
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == ["consolidated.00.pth", "params.json", "sha256.txt"]
    assert capsys.readouterr().out == f"wrote {tmp_path / 't'} (sha256 {tiny.SHA256['tiny']})\n"


def test_convert_names_the_layout_and_the_shard_count(tmp_path, capsys, tiny_ckpt):
    main(["convert", str(tiny_ckpt), str(tmp_path / "mp2"), "--to", "meta", "--shards", "2"])
    main(["convert", str(tmp_path / "mp2"), str(tmp_path / "hf"), "--to=hf"])
    main(["convert", str(tmp_path / "hf"), str(tmp_path / "meta"), "meta"])
    assert capsys.readouterr().out.splitlines() == [
        f"wrote {tmp_path / 'mp2'} (meta layout, 2 shards)",
        f"wrote {tmp_path / 'hf'} (hf layout)",
        f"wrote {tmp_path / 'meta'} (meta layout)",
    ]


def test_info_of_a_published_configuration_does_not_import_torch():
    result = microllama("info", "llama3.2-1b")
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert "\nparameters  1,235,814,400 (output tied to the embedding)\n" in result.stdout
    assert result.stdout.endswith("(CUDA only)\ntorch imported: False\n")  # the last line, quantized sizes


def test_info_takes_a_tiny_checkpoint_by_name(capsys):
    main(["info", "tiny"])
    assert "parameters" in capsys.readouterr().out


def test_a_directory_named_like_a_built_in_never_replaces_it_and_a_path_reaches_it(tmp_path, monkeypatch, capsys):
    tiny.make_tiny(tmp_path / "tiny", "tiny-kv4")
    monkeypatch.chdir(tmp_path)
    main(["info", "tiny"])
    out, err = capsys.readouterr()
    assert out.startswith("model       tiny\n")
    assert err == "note: tiny names the built-in checkpoint, not the directory tiny here (for that: ./tiny)\n"
    main(["info", "./tiny"])
    out, err = capsys.readouterr()
    assert out.startswith("model       ./tiny (matches tiny-kv4)\n") and err == ""


DEFAULTS = {"text": "t", "max_len": 0, "count": 1, "ratio": 0.5, "flash": False, "names": None}


def parsed(*argv: str) -> dict:
    """The arguments run() passes to a command from argv."""
    got = {}

    def command(
        text: str = "t",
        max_len: int = 0,
        *,
        count: int = 1,
        ratio: float = 0.5,
        flash: bool = False,
        names: Optional[list[str]] = None,
    ) -> None:
        got.update(text=text, max_len=max_len, count=count, ratio=ratio, flash=flash, names=names)

    run(command, argv, "prog")
    return got


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ([], {}),
        (["--count", "3"], {"count": 3}),
        (["--count=3"], {"count": 3}),
        (["-c", "3"], {"count": 3}),
        (["--max-len", "5"], {"max_len": 5}),
        (["--max_len=-5"], {"max_len": -5}),
        (["--ratio", "-0.25"], {"ratio": -0.25}),
        (["--ratio", "1e-3"], {"ratio": 0.001}),
        (["--flash"], {"flash": True}),
        (["--flash", "--count", "2"], {"flash": True, "count": 2}),
        (["--flash=false"], {}),
        (["--flash", "False"], {}),
        (["--noflash"], {}),
        (["--no-flash"], {}),
        (["--names", '["a", "b"]'], {"names": ["a", "b"]}),
        (["hello, world"], {"text": "hello, world"}),
        (["1984", "7"], {"text": "1984", "max_len": 7}),
        (["--text", "None"], {"text": "None"}),
        (["--text=--x"], {"text": "--x"}),
        (["--text", "-1"], {"text": "-1"}),
        (["--max_len", "3", "words"], {"text": "words", "max_len": 3}),
    ],
)
def test_run_takes_fires_spellings_and_keeps_text_as_text(argv, expected):
    assert parsed(*argv) == {**DEFAULTS, **expected}


@pytest.mark.parametrize("rank", ["0", "1", "2"])
def test_under_torchrun_rank_0_alone_says_the_error_and_every_rank_exits_1(rank, monkeypatch, capsys):
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setattr(flags, "QUIET_RANK_WAIT_S", 0)
    status, out, err = run_main(capsys, "generate", "--temperature", "-1")
    assert status == 1 and out == ""
    if rank == "0":
        assert_one_line_error(err, "temperature")
    else:
        assert err == ""


def test_ctrl_c_stops_quietly_with_status_130():
    def interrupted() -> None:
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as exit_info:
        run(interrupted, [], "tool")
    assert exit_info.value.code == 130
