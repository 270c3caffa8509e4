"""The command line of microllama and of the scripts in tools/: a command's flags checked against its signature
before anything runs, fire's help, every error one line. The standard library and fire only, and nothing of
microllama, so that every command line can import it without importing torch or making a circle."""

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

Command = Callable[..., Any]


def config_command(config: type, run_config: Callable[[Any], None]) -> Command:
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


def field_comments(config: type) -> str:
    """An "Args:" section (which fire shows in --help) from the comments beside the fields of `config`."""
    comments = re.findall(r"^    (\w+): [^#\n]*#\s*(.+)$", inspect.getsource(config), re.MULTILINE)
    return "\n\nArgs:\n" + "\n".join(f"    {name}: {text}" for name, text in comments)


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
    """Print line on stderr on rank 0 (microllama.distributed.launch.is_rank_0's rule, read without
    importing torch)."""
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
    if annotation in (list[str], list[int]):
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = None
        kind = typing.get_args(annotation)[0]
        if not (isinstance(value, list) and value and all(type(v) is kind for v in value)):
            example = '["a", "b"]' if kind is str else "[2, 4]"
            what = "strings" if kind is str else "integers"
            raise ValueError(f"--{name} must be a non-empty JSON list of {what}, such as '{example}', got {text!r}")
        return value
    raise TypeError(f"--{name}: no command-line parser for {annotation}")
