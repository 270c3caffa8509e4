"""`microllama chat`: a session in a real pseudo-terminal as a person uses it, the session's history, notes and
tool calls, JSONL dialogs in and replies out, and one-line errors for bad input."""

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from microllama import Llama
from microllama.chat import Message
from microllama.cli import main
from microllama.terminal import ChatSession

ROOT = Path(__file__).resolve().parents[1]
PTY_GEN_LEN = 400  # long enough for a Ctrl-C to land inside a reply


@pytest.fixture(scope="module")
def llama(tiny_ckpt, tokenizer, one_torch_thread):
    return Llama.build(tiny_ckpt, max_seq_len=2048, max_batch_size=1)


def reply_text(llama, dialog: list, max_gen_len: int) -> tuple[str, Message]:
    """What the session shows of the greedy reply to dialog, and the message it keeps."""
    completion = llama.chat_completion([dialog], temperature=0, max_gen_len=max_gen_len)[0]
    return llama.tokenizer.decode(completion.tokens), completion.message


def on_screen(text: str) -> str:
    return text.replace("\n", "\r\n")  # the terminal's line discipline turns each newline into CR LF


@pytest.mark.slow
def test_terminal_session_as_a_person_uses_it(llama):
    """Two turns, /reset, Ctrl-C at the prompt and during a reply, one more turn, /exit: in a real pseudo-terminal,
    checked against what the screen shows. The second reply is the model's answer to the whole history."""
    pexpect = pytest.importorskip("pexpect")
    args = ["-m", "microllama.cli", "chat", "--system", "Be brief.", "--temperature", "0"]
    args += ["--max_gen_len", str(PTY_GEN_LEN), "--max_seq_len", "2048"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TERM": "dumb"}
    started = time.monotonic()
    # A suite launched in the background inherits SIGINT ignored, and so would the session: give it the default back.
    child = pexpect.spawn(sys.executable, args, cwd=ROOT, env=env, encoding="utf-8", timeout=120,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    try:
        child.expect_exact("you> ")
        assert "microllama chat: tiny (random weights: its replies are nonsense), max_seq_len 2048" in child.before
        assert "/reset forgets the conversation" in child.before

        system = {"role": "system", "content": "Be brief."}
        first, first_message = reply_text(llama, [system, {"role": "user", "content": "Hello there"}], PTY_GEN_LEN)
        child.sendline("Hello there")
        child.expect_exact("you> ")
        assert child.before == on_screen(f"Hello there\nllama> {first}\n[out of tokens: the reply reached max_gen_len "
                                         "or max_seq_len]\n")  # fmt: skip

        history = [
            system,
            {"role": "user", "content": "Hello there"},
            first_message,
            {"role": "user", "content": "And?"},
        ]
        second, _ = reply_text(llama, history, PTY_GEN_LEN)
        assert second != first
        child.sendline("And?")
        child.expect_exact("you> ")
        assert child.before.startswith(on_screen(f"And?\nllama> {second}\n[out of tokens"))

        child.sendline("/reset")
        child.expect_exact("you> ")
        assert child.before == on_screen("/reset\n[conversation reset]\n")

        child.sendintr()  # at the prompt: the line is dropped, the session goes on
        child.expect_exact("you> ")
        assert "[Ctrl-C stops a reply; /exit or Ctrl-D leaves]" in child.before

        child.sendline("Hello there")  # after /reset the history is empty again: the first reply once more
        child.expect_exact("llama> ")
        child.expect_exact(on_screen(first[:10]))
        child.sendintr()  # during the reply
        child.expect_exact("[stopped: the reply so far is kept]")
        shown = on_screen(first[:10]) + child.before
        child.expect_exact("you> ")
        assert shown.endswith("^C\r\n")  # the terminal echoes the Ctrl-C, then the session says what it did
        shown = shown.removesuffix("^C\r\n")
        assert on_screen(first).startswith(shown) and len(shown) < len(on_screen(first))  # cut short

        child.sendline("Still there?")  # the session survived the interrupted reply
        child.expect_exact("you> ")
        assert child.before.startswith(on_screen("Still there?\nllama> ")) and "[out of tokens" in child.before

        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0, child.before
    print(f"pty session: {time.monotonic() - started:.1f} s")


class Script:
    """A person's lines for ChatSession.run, then the end of input."""

    def __init__(self, *lines: str):
        self.lines = list(lines)

    def __call__(self, prompt: str) -> str:
        if not self.lines:
            raise EOFError
        return self.lines.pop(0)


def session(llama, **kwargs) -> tuple[ChatSession, io.StringIO]:
    out = io.StringIO()
    settings = dict(temperature=0, top_p=0.9, max_gen_len=16, seed=None, tool_prompt_format="json")
    return ChatSession(llama, out=out, **{**settings, **kwargs}), out


@pytest.fixture
def short_llama(tiny_ckpt, tokenizer, one_torch_thread):
    return Llama.build(tiny_ckpt, max_seq_len=96, max_batch_size=1)


def test_history_that_no_longer_fits_drops_the_oldest_turns_and_says_so(short_llama):
    chat, out = session(short_llama, system="Be brief.")
    chat.run(Script("one", "two", "three", "four"))
    notes = re.findall(r"\[the history no longer fits max_seq_len 96: dropped the (\d+) oldest turns?, (\d+) kept\]",
                       out.getvalue())  # fmt: skip
    assert notes, out.getvalue()
    dialog = chat.dialog()
    assert dialog[0] == Message("system", "Be brief.") and dialog[-2].content == "four"  # the newest turn is kept
    assert len(short_llama.formatter.encode_dialog_prompt(dialog[:-1])) + 16 <= 96


def test_a_message_too_long_for_max_seq_len_is_not_sent_and_the_session_goes_on(short_llama):
    chat, out = session(short_llama)
    chat.run(Script("word " * 200, "short"))
    assert re.search(r"\[not sent: this message makes the dialog \d+ tokens, and max_seq_len is 96\]", out.getvalue())
    assert [m.role for m in chat.history] == ["user", "assistant"] and chat.history[0].content == "short"


def test_tool_calls_are_shown_parsed_and_answered_with_slash_tool(llama, tokenizer):
    """A reply forced into a builtin call: the session shows the parsed call and the end-of-message note, and
    /tool sends the result as a tool (ipython) message for the next reply."""
    call = [tokenizer.special_tokens["<|python_tag|>"], *tokenizer.encode('brave_search.call(query="gold price")',
            bos=False, eos=False), tokenizer.eom_id]  # fmt: skip
    calls = []

    def hook(module, args, output):
        if len(calls) < len(call):
            output[0, -1, call[len(calls)]] = 1e4
        calls.append(1)
        return output

    chat, out = session(llama)
    with llama.model.output.register_forward_hook(hook):
        chat.run(Script("Search the price of gold", "/tool 2,650 USD"))
    shown = out.getvalue()
    assert '[tool call: brave_search {"query": "gold price"}]' in shown
    assert "[end of message: the model waits for a tool's answer (/tool TEXT)]" in shown
    assert [m.role for m in chat.history] == ["user", "assistant", "tool", "assistant"]
    assert chat.history[1].tool_calls[0].arguments == {"query": "gold price"} and chat.history[2].content == "2,650 USD"


def test_slash_commands(llama):
    chat, out = session(llama, max_gen_len=2)
    chat.run(Script("/system Answer in French.", "hi", "/system", "/what", "/reset", "/exit", "never read"))
    assert out.getvalue().splitlines()[0] == "[system prompt set: Answer in French.]"
    assert "[system prompt removed]" in out.getvalue() and "[conversation reset]" in out.getvalue()
    assert "[unknown command /what: /reset forgets the conversation" in out.getvalue()
    assert chat.history == [] and chat.system is None


DIALOGS = [
    [{"role": "user", "content": "Hello"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
]


def test_dialogs_file_gets_one_jsonl_reply_per_line(tmp_path, capsys, llama):
    path = tmp_path / "dialogs.jsonl"
    path.write_text("\n".join(json.dumps(d) for d in DIALOGS[:2]) + "\n\n" + json.dumps(DIALOGS[2]) + "\n")
    main(["chat", "--dialogs", str(path), "--temperature", "0", "--max_gen_len", "6", "--max_batch_size", "2"])
    replies = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    expected = [llama.chat_completion([d], temperature=0, max_gen_len=6)[0].message.to_dict() for d in DIALOGS]
    assert replies == expected and all(r["role"] == "assistant" for r in replies)


@pytest.fixture
def no_loading(monkeypatch):
    def build(*args, **kwargs):
        raise AssertionError("a checkpoint was loaded")

    monkeypatch.setattr(Llama, "build", staticmethod(build))


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (['[{"role": "user", "content": "a"}]', '[{"role": "user", "content": "b"', ""], r"\.jsonl:2: not JSON \("),
        (['{"role": "user", "content": "a"}'], r"dialogs\.jsonl:1: a dialog is a list of messages, got dict$"),
        (['[{"role": "narrator", "content": "a"}]'], r"dialogs\.jsonl:1: message 0: unknown role 'narrator'; roles: "),
        (['[{"role": "user"}]'], r"dialogs\.jsonl:1: message 0: 'user' message has no content$"),
        (["", "[]"], r"dialogs\.jsonl:2: the dialog is empty: there is nothing to reply to$"),
        (['[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]'], r":1: the dialog ends with "),
        (["", "  "], r"dialogs\.jsonl: no dialogs \(one JSON list of messages per line\)$"),
    ],
)  # fmt: skip
def test_bad_dialogs_file_is_one_line_error_naming_file_and_line_before_loading(tmp_path, capsys, no_loading,
                                                                                 lines, message):  # fmt: skip
    path = tmp_path / "dialogs.jsonl"
    path.write_text("\n".join(lines))
    with pytest.raises(SystemExit) as exit_info:
        main(["chat", "--dialogs", str(path)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and err.count("\n") == 1 and err.startswith("microllama: error: ")
    assert str(path) in err and re.search(message, err), err


def test_dialog_too_long_for_max_seq_len_names_its_line(tmp_path, capsys, tokenizer):
    path = tmp_path / "dialogs.jsonl"
    path.write_text(json.dumps(DIALOGS[0]) + "\n" + json.dumps([{"role": "user", "content": "word " * 40}]) + "\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["chat", "--dialogs", str(path), "--max_seq_len", "32"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and capsys.readouterr().out == ""
    assert re.fullmatch(rf"KV cache: .+\nmicrollama: error: {re.escape(str(path))}:2: the dialog is \d+ tokens, at or "
                        r"beyond max_seq_len 32\n", err), err  # fmt: skip


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--dialogs", "d.jsonl", "--system", "x"], r"--system is for the interactive session; with --dialogs, put"),
        (["--tool_prompt_format", "xml"], r"--tool_prompt_format must be one of json, function_tag, got 'xml'"),
        (["--temperature", "-1"], r"temperature must be a finite number >= 0"),
        (["--max_batch_size", "0"], r"--max_batch_size must be at least 1, got 0"),
        (["--dialogs", "/nonexistent/d.jsonl"], r"No such file or directory: '/nonexistent/d\.jsonl'"),
        (["hello"], r"unexpected argument 'hello'.*microllama chat takes no positional arguments"),
        (["--sytem", "x"], r"unknown flag --sytem \(did you mean --system\?\)"),
    ],
)
def test_chat_refuses_bad_flags_in_one_line_before_loading(capsys, no_loading, args, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["chat", *args])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and err.count("\n") == 1 and re.search(message, err), err


def test_chat_help_lists_its_flags_without_importing_torch():
    code = ("import atexit, sys; atexit.register(lambda: print('torch imported:', 'torch' in sys.modules)); "
            "from microllama.cli import main; main(sys.argv[1:])")  # fmt: skip
    result = subprocess.run([sys.executable, "-c", code, "chat", "--help"], capture_output=True, text=True, cwd=ROOT)
    help_text = " ".join(result.stderr.split())  # fire writes help to stderr
    assert result.returncode == 0 and result.stdout == "torch imported: False\n"
    assert all(f"--{flag}=" in help_text for flag in ("system", "dialogs", "max_gen_len", "tool_prompt_format"))
