"""What `microllama generate` and `microllama chat` do with text in and out: a reply streamed as it is generated,
the interactive chat session, and dialogs read from a JSONL file and answered as JSONL."""

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Optional, TextIO

from .chat import DialogError, Message, as_dialog, check_prompt
from .generation import ChatCompletion, Llama

COMMANDS_HELP = (
    "/reset forgets the conversation, /system TEXT sets the system prompt (/system alone removes it), "
    "/tool TEXT answers a tool call, /exit leaves (or Ctrl-D); Ctrl-C stops a reply"
)
STOP_NOTES = {
    "end_of_message": "[end of message: the model waits for a tool's answer (/tool TEXT)]",
    "out_of_tokens": "[out of tokens: the reply reached max_gen_len or max_seq_len]",
}


class StreamPrinter:
    """Prints one row's tokens as text as they come, holding back bytes that do not yet form a character."""

    def __init__(self, decode, out=None):
        self.decode, self.out = decode, out or sys.stdout
        self.tokens: list[int] = []
        self.shown = 0

    def __call__(self, row: int, token: int) -> None:
        self.tokens.append(token)
        text = self.decode(self.tokens)
        if not text.endswith("\ufffd"):
            self.out.write(text[self.shown :])
            self.out.flush()
            self.shown = len(text)


class ChatSession:
    """A conversation with one model: the history, a system prompt, and what is shown of each reply."""

    def __init__(
        self,
        llama: Llama,
        system: Optional[str] = None,
        out: Optional[TextIO] = None,  # default: sys.stdout
        **sampling,  # temperature, top_p, max_gen_len, seed, tool_prompt_format: as Llama.chat_completion takes them
    ):
        self.llama, self.system, self.out, self.sampling = llama, system, out or sys.stdout, sampling
        self.history: list[Message] = []

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def dialog(self) -> list[Message]:
        return ([Message("system", self.system)] if self.system else []) + self.history

    def fit(self) -> bool:
        """Drop the oldest turns (a user message and what followed it) until the dialog leaves max_gen_len tokens
        for the reply, saying so; False (and the newest message taken back) when even the last turn alone does
        not fit max_seq_len."""
        max_seq_len = self.llama.model.params.max_seq_len
        room = self.sampling.get("max_gen_len") or 1
        dropped = 0
        while True:
            n = len(
                self.llama.formatter.encode_dialog_prompt(
                    self.dialog(), self.sampling.get("tool_prompt_format", "json")
                )
            )
            starts = [i for i, m in enumerate(self.history) if m.role == "user"]
            if n + room <= max_seq_len or len(starts) < 2:
                break
            del self.history[: starts[1]]
            dropped += 1
        if dropped:
            kept = len([m for m in self.history if m.role == "user"])
            self.say(f"[the history no longer fits max_seq_len {max_seq_len}: dropped the {dropped} oldest "
                     f"turn{'s' if dropped > 1 else ''}, {kept} kept]")  # fmt: skip
        if n >= max_seq_len:
            self.history.pop()
            self.say(f"[not sent: this message makes the dialog {n} tokens, and max_seq_len is {max_seq_len}]")
            return False
        return True

    def reply(self) -> Optional[ChatCompletion]:
        """Stream the model's reply to the dialog and keep it in the history; Ctrl-C stops it where it is."""
        if not self.fit():
            return None
        printer = StreamPrinter(self.llama.tokenizer.decode, self.out)
        self.out.write("llama> ")
        try:
            completion = self.llama.chat_completion([self.dialog()], on_token=printer, **self.sampling)[0]
        except KeyboardInterrupt:
            self.history.append(self.llama.formatter.decode_reply(printer.tokens, None))
            self.say("\n[stopped: the reply so far is kept]")
            return None
        self.history.append(completion.message)
        self.say("")
        for call in completion.message.tool_calls:
            self.say(f"[tool call: {call.tool_name} {json.dumps(call.arguments, ensure_ascii=False)}]")
        if completion.stop_reason in STOP_NOTES:
            self.say(STOP_NOTES[completion.stop_reason])
        return completion

    def handle(self, line: str) -> bool:
        """Act on one line typed by the user; False when the session ends."""
        command, _, text = line.strip().partition(" ")
        if command == "/exit":
            return False
        if command == "/reset":
            self.history.clear()
            self.say("[conversation reset]")
        elif command == "/system":
            self.system = text.strip() or None
            self.say(f"[system prompt set: {self.system}]" if self.system else "[system prompt removed]")
        elif command == "/tool":
            self.history.append(Message("tool", text))
            self.reply()
        elif command.startswith("/"):
            self.say(f"[unknown command {command}: {COMMANDS_HELP}]")
        elif line.strip():
            self.history.append(Message("user", line))
            self.reply()
        return True

    def run(self, read: Callable[[str], str] = input) -> None:
        """Read lines until /exit or end of input. Ctrl-C at the prompt only clears the line."""
        while True:
            try:
                line = read("you> ")
            except EOFError:
                self.say("")
                return
            except KeyboardInterrupt:
                self.say("\n[Ctrl-C stops a reply; /exit or Ctrl-D leaves]")
                continue
            if not self.handle(line):
                return


def read_dialogs(path: Path) -> list[tuple[int, list[Message]]]:
    """The dialogs of a JSONL file (one JSON list of messages per line; blank lines skipped) with their line
    numbers, each checked to be answerable; DialogError names the file and line."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise DialogError(f"{path}: not UTF-8 text: {e}") from None
    dialogs = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            messages = as_dialog(json.loads(line))
            check_prompt(messages)
        except json.JSONDecodeError as e:
            raise DialogError(f"{path}:{lineno}: not JSON ({e})") from None
        except DialogError as e:
            raise DialogError(f"{path}:{lineno}: {e}") from None
        dialogs.append((lineno, messages))
    if not dialogs:
        raise DialogError(f"{path}: no dialogs (one JSON list of messages per line)")
    return dialogs


def answer_dialogs(
    llama: Llama, path: Path, dialogs: list[tuple[int, list[Message]]], out: Optional[TextIO] = None, **sampling
) -> None:
    """Write the reply to each dialog as one JSON line, batched by the model's max_batch_size. A dialog too
    long for max_seq_len is refused, naming its line, before anything is generated."""
    out = out or sys.stdout
    max_seq_len, batch = llama.model.params.max_seq_len, llama.model.params.max_batch_size
    for lineno, messages in dialogs:
        n = len(llama.formatter.encode_dialog_prompt(messages, sampling.get("tool_prompt_format", "json")))
        if n >= max_seq_len:
            raise DialogError(f"{path}:{lineno}: the dialog is {n} tokens, at or beyond max_seq_len {max_seq_len}")
    for start in range(0, len(dialogs), batch):
        for completion in llama.chat_completion([m for _, m in dialogs[start : start + batch]], **sampling):
            out.write(json.dumps(completion.message.to_dict(), ensure_ascii=False) + "\n")
            out.flush()
