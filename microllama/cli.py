"""The `microllama` command: generate text, chat, train, build the tiny checkpoint, verify against goldens,
convert and describe checkpoints. `run` is also the command line of the scripts in tools/."""

import dataclasses
import difflib
import functools
import inspect
import json
import math
import os
import re
import sys
import time
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional, Union

import fire

# torch takes seconds to import, longer on a loaded machine, and `microllama --help` or a misspelt flag should
# not wait for it: this module imports only the standard library and fire, and each command imports what it
# needs when it runs.

Command = Callable[..., Any]
DEFAULT_PROMPT = "Clearly, the meaning of life is"
# Said on stderr before --compile's first output: the first decode step of each batch size compiles first.
COMPILING = (
    "--compile: the first decode step compiles the model (seconds on a CPU for small models; on CUDA, where "
    "coordinate descent tuning times each kernel, about a minute for 8B)"
)


def generate(
    prompt: Optional[str] = None,
    *,
    prompts: Optional[list[str]] = None,
    ckpt_dir: Optional[str] = None,
    temperature: float = 0.6,
    top_p: float = 0.9,
    max_gen_len: int = 64,
    max_seq_len: int = 512,
    seed: Optional[int] = None,
    device: str = "cpu",
    dtype: Optional[str] = None,
    flash: bool = False,
    tokenizer_path: Optional[str] = None,
    compile: bool = False,
) -> None:
    """Complete PROMPT (default: "Clearly, the meaning of life is"), streamed as it comes, or each of --prompts,
    a JSON list of strings: --prompts '["first", "second"]'. The tiny default's random weights produce
    fluent-looking nonsense. Launched by torchrun with several ranks
    (torchrun --nproc_per_node N -m microllama.cli generate ...), the model is tensor-parallel over them and
    rank 0 prints.

    Args:
        prompt: the text to complete, exactly as given (no space added)
        prompts: a JSON list of texts, completed as one batch
        ckpt_dir: a checkpoint directory (Meta's or Hugging Face's layout) or a tiny checkpoint's name; tiny if none
        temperature: 0 for greedy decoding; higher samples more freely
        top_p: nucleus sampling: the smallest set of tokens whose probabilities reach top_p
        max_gen_len: the most tokens to generate per prompt
        max_seq_len: the longest sequence (prompt and completion) the KV cache holds
        seed: makes sampling reproducible (on the CPU, what Meta draws after torch.manual_seed(seed))
        device: cpu, cuda or cuda:N
        dtype: float32, bfloat16 or float16 (default: bfloat16 on CUDA, float32 elsewhere)
        flash: attention through torch's scaled_dot_product_attention (not bit-identical to Meta's)
        tokenizer_path: a tokenizer.model (default: $MICROLLAMA_TOKENIZER, the checkpoint's, else llama-models')
        compile: the compiled decode path (static KV cache, torch.compile, flash attention; one process only)
    """
    if prompt is not None and prompts is not None:
        raise ValueError("give --prompt or --prompts, not both")
    texts = prompts if prompts is not None else [DEFAULT_PROMPT if prompt is None else prompt]
    from .generation import Llama, check_sampling
    from .parallel import is_rank_0, torchrun_world_size
    from .terminal import StreamPrinter

    check_sampling(temperature, top_p, max_gen_len, seed)  # before a checkpoint that may take minutes to load
    if max_seq_len < 1:
        raise ValueError(f"--max_seq_len must be at least 1, got {max_seq_len}")
    llama = Llama.build(ckpt_dir, max_seq_len, len(texts), device=device, dtype=dtype, flash=flash,
                        tokenizer_path=tokenizer_path, tensor_parallel=torchrun_world_size() > 1,
                        compile=compile)  # fmt: skip
    # The whole request is checked before the prompt is echoed, so that an error does not follow it.
    tokens = [llama.tokenizer.encode(t, bos=True, eos=False) for t in texts]
    llama.check_request(tokens, temperature, top_p, max_gen_len, seed)
    if not is_rank_0():  # every rank computes the same tokens; one prints them
        llama.text_completion(texts, temperature, top_p, max_gen_len, seed=seed)
        return
    if compile:
        print(COMPILING, file=sys.stderr, flush=True)
    if len(texts) == 1:
        print(texts[0], end="", flush=True)
        llama.text_completion(texts, temperature, top_p, max_gen_len, seed=seed,
                              on_token=StreamPrinter(llama.tokenizer.decode))  # fmt: skip
        print()
        return
    for p, c in zip(texts, llama.text_completion(texts, temperature, top_p, max_gen_len, seed=seed), strict=True):
        print(f"{p}{c.generation}\n{'=' * 40}")


def make_tiny(out_dir: str, name: str = "tiny", seed: int = 0) -> None:
    """Write the tiny Meta-layout checkpoint NAME (tiny, tiny-hd128, tiny-kv4; params.json,
    consolidated.00.pth) into OUT_DIR; seed 0 gives the embedded one's weights."""
    from . import tiny

    path = tiny.make_tiny(Path(out_dir), name, seed)
    print(f"wrote {path} (sha256 {(path / 'sha256.txt').read_text().strip()})")


def convert(src: str, dst: str, to: str, shards: int = 1) -> None:
    """Rewrite checkpoint SRC (Meta or Hugging Face layout) into DST in layout --to meta|hf, bit for bit;
    --shards N splits a Meta-layout output over N tensor-parallel ranks as Meta's fairscale code does."""
    from .checkpoint import convert as convert_checkpoint

    path = convert_checkpoint(src, Path(dst), to, shards)  # src: a name or a path, as open_checkpoint reads it
    split = f", {shards} shards" if to == "meta" and shards > 1 else ""
    print(f"wrote {path} ({to} layout{split})")


def info(target: str) -> None:
    """Configuration, parameter count, weight bytes and KV-cache bytes of TARGET: a checkpoint directory
    (either layout) or a model name (llama3.1-8b, llama3.1-70b, llama3.1-405b, llama3.2-1b, llama3.2-3b, tiny)."""
    from .checkpoint import open_checkpoint

    print("\n".join(open_checkpoint(target).describe()))


def verify(
    golden_dir: Optional[str] = None,
    ckpt_dir: Optional[str] = None,
    device: Optional[str] = None,
    *,
    other_checkpoint: bool = False,
    compile: bool = False,
    all: bool = False,
) -> None:
    """Check microllama against the golden set in GOLDEN_DIR (recorded from Meta's code): a table per
    capture point, the completions and chat replies (or, for a training set, each step of microllama's
    trainer), the first divergent check and a verdict on stdout, progress on stderr; exit status 1 when the
    check fails. ckpt_dir defaults to the set's own checkpoint (a directory, or tiny / tiny-hd128); one whose
    sha256 is not the recording's fails at once unless --other_checkpoint says that is intended. Launched by
    torchrun with several ranks, an inference set's model is tensor-parallel over them (bit-identical to a set
    Meta recorded at that world size) and rank 0 reports.
    --compile checks the compiled decode path instead of the default one (values within tolerance; completions
    and chat replies identical, or parting from the recording only where the tolerance allows).
    --all checks every set in GOLDEN_DIR (default: this checkout's goldens/), each on its own checkpoint, and
    prints one summary table and one verdict (the reports of the sets that fail come first)."""
    if all:
        return _verify_all(golden_dir, device, ckpt_dir=ckpt_dir, other_checkpoint=other_checkpoint, compile=compile)
    if golden_dir is None:
        raise ValueError("verify needs GOLDEN_DIR (a golden or training set), or --all")
    from .golden_format import is_training_set

    if is_training_set(golden_dir):  # a training set: microllama's trainer against Meta's fine-tune
        from .verify_training import format_training_comparison, verify_training

        training = verify_training(golden_dir, ckpt_dir, device)
        print(format_training_comparison(training))
        if not training.passed:
            sys.exit(1)
        return
    from .parallel import is_rank_0, torchrun_world_size
    from .verify import format_comparison
    from .verify import verify as verify_golden_set

    comparison = verify_golden_set(golden_dir, ckpt_dir, device, other_checkpoint=other_checkpoint,
                                   progress=is_rank_0(), tensor_parallel=torchrun_world_size() > 1,
                                   compile=compile)  # fmt: skip
    if is_rank_0():
        print(format_comparison(comparison))
    if not comparison.passed:
        sys.exit(1)


# The committed golden sets of this checkout (the package is installed from it with pip install -e).
COMMITTED_GOLDENS = Path(__file__).resolve().parent.parent / "goldens"


def _verify_all(root: Optional[str], device: Optional[str], **refused: Any) -> None:
    given = [f"--{name}" for name, value in refused.items() if value]
    if given:
        raise ValueError(f"verify --all checks each set on its own checkpoint, on the default path: {given[0]} "
                         "is for one set")  # fmt: skip
    from .verify_all import format_summary, verify_all

    results = verify_all(root if root is not None else COMMITTED_GOLDENS, device, progress=True)
    for r in results:
        if not r.passed:
            print(r.report + "\n")
    print(format_summary(results))
    if not all(r.passed for r in results):
        sys.exit(1)


def chat(
    *,
    ckpt_dir: Optional[str] = None,
    system: Optional[str] = None,
    dialogs: Optional[str] = None,
    temperature: float = 0.6,
    top_p: float = 0.9,
    max_gen_len: int = 128,
    max_seq_len: int = 512,
    max_batch_size: int = 4,
    seed: Optional[int] = None,
    tool_prompt_format: str = "json",
    device: str = "cpu",
    dtype: Optional[str] = None,
    flash: bool = False,
    tokenizer_path: Optional[str] = None,
    compile: bool = False,
) -> None:
    """Talk with a model in Llama 3.1's dialog format: an interactive session (--system TEXT: a system prompt;
    type /reset, /system TEXT, /tool TEXT or /exit; Ctrl-C stops a reply), or with --dialogs FILE the reply to
    each line of a JSONL file (a JSON list of {"role": ..., "content": ...} messages per line, answered in
    batches of --max_batch_size) written to stdout as JSONL. The tiny default's random weights reply with nonsense.

    Args:
        ckpt_dir: a checkpoint directory (Meta's or Hugging Face's layout) or a tiny checkpoint's name; tiny if none
        system: the system prompt of the interactive session
        dialogs: a JSONL file of dialogs to answer instead of a session
        temperature: 0 for greedy decoding; higher samples more freely
        top_p: nucleus sampling: the smallest set of tokens whose probabilities reach top_p
        max_gen_len: the most tokens of a reply
        max_seq_len: the longest dialog (prompt and reply) the KV cache holds
        max_batch_size: with --dialogs, how many are answered at once
        seed: makes sampling reproducible
        tool_prompt_format: how tool calls are asked for: json or function_tag
        device: cpu, cuda or cuda:N
        dtype: float32, bfloat16 or float16 (default: bfloat16 on CUDA, float32 elsewhere)
        flash: attention through torch's scaled_dot_product_attention (not bit-identical to Meta's)
        tokenizer_path: a tokenizer.model (default: $MICROLLAMA_TOKENIZER, the checkpoint's, else llama-models')
        compile: the compiled decode path (static KV cache, torch.compile; the first step compiles)
    """
    from .chat import TOOL_PROMPT_FORMATS
    from .generation import check_sampling

    check_sampling(temperature, top_p, max_gen_len, seed)  # before a checkpoint that may take minutes to load
    for flag, value in (("max_seq_len", max_seq_len), ("max_batch_size", max_batch_size)):
        if value < 1:
            raise ValueError(f"--{flag} must be at least 1, got {value}")
    if tool_prompt_format not in TOOL_PROMPT_FORMATS:
        raise ValueError(
            f"--tool_prompt_format must be one of {', '.join(TOOL_PROMPT_FORMATS)}, got {tool_prompt_format!r}"
        )
    if dialogs is not None and system is not None:
        raise ValueError("--system is for the interactive session; with --dialogs, put system messages in the file")
    from .checkpoint import open_checkpoint
    from .generation import Llama
    from .terminal import COMMANDS_HELP, ChatSession, answer_dialogs, read_dialogs

    read = read_dialogs(Path(dialogs)) if dialogs is not None else None  # a bad file is reported before loading
    checkpoint = open_checkpoint(ckpt_dir)
    batch = min(max_batch_size, len(read)) if read is not None else 1
    llama = Llama.build(checkpoint, max_seq_len, batch, device=device, dtype=dtype, flash=flash,
                        tokenizer_path=tokenizer_path, compile=compile)  # fmt: skip
    if compile:
        print(COMPILING, file=sys.stderr, flush=True)
    sampling = dict(temperature=temperature, top_p=top_p, max_gen_len=max_gen_len, seed=seed,
                    tool_prompt_format=tool_prompt_format)  # fmt: skip
    if read is not None:
        answer_dialogs(llama, Path(dialogs), read, **sampling)
        return
    try:
        import readline  # noqa: F401  (line editing and history for input(), where the platform has it)
    except ImportError:
        pass
    nonsense = " (random weights: its replies are nonsense)" if checkpoint.tiny else ""
    print(f"microllama chat: {checkpoint.name}{nonsense}, max_seq_len {max_seq_len}, max_gen_len {max_gen_len}")
    print(COMMANDS_HELP)
    ChatSession(llama, system, **sampling).run()


def _config_command(config: type, run_config: Callable[[Any], None]) -> Command:
    """A command whose flags are the fields of the dataclass `config` (names, types, defaults, the class's
    docstring as help), calling run_config with the config they give: one source for the flags."""
    fields = dataclasses.fields(config)
    params = [
        inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=f.type,
                          default=f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default)
        if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        else inspect.Parameter(f.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=f.type)
        for f in fields
    ]  # fmt: skip

    def command(*args: Any, **kwargs: Any) -> None:
        run_config(config(*args, **kwargs))

    command.__signature__ = inspect.Signature(params)
    command.__annotations__ = {f.name: f.type for f in fields}
    command.__doc__ = config.__doc__
    return command


def _field_comments(config: type) -> str:
    """An "Args:" section (which fire shows in --help) from the comments beside the fields of `config`."""
    comments = re.findall(r"^    (\w+): [^#\n]*#\s*(.+)$", inspect.getsource(config), re.MULTILINE)
    return "\n\nArgs:\n" + "\n".join(f"    {name}: {text}" for name, text in comments)


def _train(config: Any) -> None:
    from .parallel import is_rank_0
    from .train import train as run_training

    summary = run_training(config)
    if is_rank_0():  # under torchrun, rank 0 speaks for the job
        print(summary.line())


def plot(run_dir: str) -> None:
    """Write RUN_DIR/loss.png, the training and held-out loss of a run (needs matplotlib: pip install
    'microllama[plot]')."""
    from .train import plot as plot_run

    print(f"wrote {plot_run(run_dir)}")


def _train_command() -> Command:
    from .train_config import TrainConfig  # the standard library only: --help stays fast

    command = _config_command(TrainConfig, _train)
    command.__doc__ = (
        "Train or fine-tune from DATA (a .txt or .jsonl file, or a directory of them): --mode full|lora|norms, "
        "checkpoints and metrics.jsonl in --out_dir, final weights in OUT_DIR/final (Meta layout)."
    ) + _field_comments(TrainConfig)
    return command


train = _train_command()
COMMANDS = {
    "generate": generate,
    "make-tiny": make_tiny,
    "verify": verify,
    "convert": convert,
    "info": info,
    "chat": chat,
    "train": train,
    "plot": plot,
}


def run(
    commands: Union[Command, dict[str, Command]], argv: Optional[Sequence[str]] = None, name: Optional[str] = None
) -> None:
    """The command line of microllama and of tools/: fire's help (-h, --help) and flag spellings, with argv
    checked against the command's signature before anything runs. A misspelt flag, a missing or extra
    argument or a value that is not of the parameter's type (str: any text; int; float: finite; bool;
    list[str]: a JSON list) is refused, and every error is one line `NAME: error: ...`, exit status 1
    (Ctrl-C: `NAME: interrupted`, 130), said by rank 0 alone under torchrun."""
    argv = list(sys.argv[1:] if argv is None else argv)
    name = name or Path(sys.argv[0]).name
    try:
        if "-h" in argv or "--help" in argv or (not argv and isinstance(commands, dict)):
            shown = {k: _help_view(c) for k, c in commands.items()} if isinstance(commands, dict) else None
            fire.Fire(shown or _help_view(commands), command=argv, name=name)  # fire's help: nothing runs
            return
        if isinstance(commands, dict):
            command, label, argv = _pick_command(commands, argv[0]), f"{name} {argv[0]}", argv[1:]
        else:
            command, label = commands, name
        # fire calls the command with the arguments checked here, and shows what it returns.
        fire.Fire(functools.partial(command, **_parse_args(command, argv, label)), command=[], name=label)
    except (ValueError, OSError, RuntimeError) as e:
        _say(f"{name}: error: {e}")
        sys.exit(1)
    except KeyboardInterrupt:  # Ctrl-C: stop quietly, with the shell's status for SIGINT
        _say(f"\n{name}: interrupted")
        sys.exit(130)


# Under torchrun every rank meets the same error, and rank 0 alone says it. The others wait this long before
# exiting silently: torchrun stops the whole job when the first rank exits, maybe before rank 0 has spoken.
QUIET_RANK_WAIT_S = 2.0


def _say(line: str) -> None:
    """Print line on stderr on rank 0 (microllama.parallel.is_rank_0's rule, read without importing torch)."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(line, file=sys.stderr)
    else:
        time.sleep(QUIET_RANK_WAIT_S)


class _TypeName:
    """A type as fire's help names it: fire prints an annotation's __qualname__."""

    def __init__(self, name: str) -> None:
        self.__qualname__ = name


def _help_view(command: Command) -> Command:
    """command as fire's help should show it: each type by name (Optional[T] as T: fire adds Optional where
    the default is None), and every flag with a default keyword-only, so that fire gives a short flag (-s)
    to exactly those that _param_named takes it for. Only inspected, never called."""
    types = typing.get_type_hints(inspect.unwrap(command))

    def name(annotation: Any) -> str:
        inner = [t for t in typing.get_args(annotation) if t is not type(None)]
        annotation = inner[0] if typing.get_origin(annotation) is Union and len(inner) == 1 else annotation
        return "JSON list of str" if annotation == list[str] else getattr(annotation, "__name__", str(annotation))

    def view(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a help view is not called")

    view.__signature__ = inspect.Signature(
        [
            p.replace(
                kind=p.kind if p.default is p.empty else p.KEYWORD_ONLY,
                annotation=_TypeName(name(types.get(p.name, str))),
            )  # fmt: skip
            for p in inspect.signature(command).parameters.values()
        ]
    )
    view.__doc__ = command.__doc__
    return view


def _pick_command(commands: dict[str, Command], word: str) -> Command:
    if word not in commands:
        what = f"the command comes first, got {word}" if word.startswith("-") else f"unknown command {word!r}"
        raise ValueError(f"{what}{_did_you_mean(word, commands)}; commands: {', '.join(commands)}")
    return commands[word]


def _did_you_mean(word: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def _is_flag(arg: str) -> bool:
    """fire's rule: --name, or - and a letter (so -1 is a value)."""
    return arg.startswith("--") or re.match("-[a-zA-Z]", arg) is not None


def _parse_args(command: Command, args: Sequence[str], label: str) -> dict[str, Any]:
    """Keyword arguments for `command` from fire's spellings: --name value, --name=value, --name alone or
    --noname / --no-name for a bool, - or _ within names, -n for the only parameter starting with n, and
    positional values in the signature's order. ValueError, naming the flag, for anything else."""
    params = inspect.signature(command).parameters
    types = typing.get_type_hints(inspect.unwrap(command))
    flags = ", ".join(f"--{p}" for p in params)
    given: dict[str, str] = {}
    positional: list[str] = []
    i = 0
    while i < len(args):
        arg, i = args[i], i + 1
        if not _is_flag(arg):
            positional.append(arg)
            continue
        flag, has_value, value = arg.partition("=")
        word = flag.lstrip("-").replace("-", "_")
        key = _param_named(word, params)
        negated = word[2:].lstrip("_")  # --noflash, --no-flash
        if key is None and word.startswith("no") and types.get(negated) is bool and not has_value:
            key, has_value, value = negated, "=", "false"
        if key is None:
            suggestion = _did_you_mean(flag, [f"--{p}" for p in params])
            raise ValueError(f"unknown flag {flag}{suggestion}; {label} takes {flags}")
        if not has_value:  # fire's rule: the next argument is the value, unless it is a flag or there is none
            if i < len(args) and not _is_flag(args[i]):
                value, i = args[i], i + 1
            elif types.get(key) is bool:
                value = "true"
            else:
                raise ValueError(f"--{key} needs a value (--{key}=VALUE for one that starts with -)")
        if key in given:
            raise ValueError(f"--{key} is given twice")
        given[key] = value
    names = [p for p, param in params.items() if param.kind is param.POSITIONAL_OR_KEYWORD]
    free = [p for p in names if p not in given]
    if len(positional) > len(free):
        takes = f"{len(names)} positional ({' '.join(p.upper() for p in names)})" if names else "no positional"
        raise ValueError(
            f"unexpected argument {positional[len(free)]!r} (quote text that has spaces): {label} "
            f"takes {takes} arguments at most; flags: {flags}"
        )
    given.update(zip(free, positional, strict=False))
    missing = [p for p, param in params.items() if param.default is param.empty and p not in given]
    if missing:
        raise ValueError(f"{label} needs {' '.join(p.upper() for p in missing)} (or --{', --'.join(missing)})")
    return {p: _parse_value(p, types.get(p, str), text) for p, text in given.items()}


def _param_named(key: str, params: Mapping[str, inspect.Parameter]) -> Optional[str]:
    """The parameter that flag `key` sets: its name; for a single letter, the only flag with a default that
    starts with it (the short flag --help shows), else the only parameter."""
    if key in params or len(key) != 1:
        return key if key in params else None
    for names in ([p for p, param in params.items() if param.default is not param.empty], list(params)):
        starting = [p for p in names if p.startswith(key)]
        if len(starting) > 1:
            raise ValueError(f"-{key} could be any of --{', --'.join(starting)}")
        if starting:
            return starting[0]
    return None


def _parse_value(name: str, annotation: Any, text: str) -> Any:
    """The value of --name from its text, by the parameter's type; ValueError naming the flag if it is not one.
    Optional[T] is parsed as T: None is only ever the default."""
    if typing.get_origin(annotation) is Union:
        inner = [t for t in typing.get_args(annotation) if t is not type(None)]
        annotation = inner[0] if len(inner) == 1 else annotation
    if annotation is str:
        return text
    if annotation is bool:
        if text.lower() not in ("true", "false"):
            raise ValueError(f"--{name} must be true or false, got {text!r}")
        return text.lower() == "true"
    if annotation is int:
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"--{name} must be an integer, got {text!r}") from None
    if annotation is float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise ValueError(f"--{name} must be a finite number, got {text!r}")
        return value
    if annotation == list[str]:
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = None
        if not (isinstance(value, list) and value and all(isinstance(v, str) for v in value)):
            raise ValueError(f'--{name} must be a non-empty JSON list of strings, such as \'["a", "b"]\', got {text!r}')
        return value
    raise TypeError(f"--{name}: no command-line parser for {annotation}")


def main(argv: Optional[Sequence[str]] = None) -> None:
    run(COMMANDS, argv, "microllama")


if __name__ == "__main__":
    main()
