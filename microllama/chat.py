"""Llama 3.1's dialog format, token for token as Meta's reference writes and reads it (llama-models 0.3.0:
llama3/chat_format.py, llama3/tool_utils.py), and the system prompts for tools that its
llama3_1/prompt_format.md documents.

A dialog is a list of messages. The prompt is one <|begin_of_text|>, then each message as

    <|start_header_id|>ROLE<|end_header_id|>\\n\\nCONTENT<|eot_id|>

and an open assistant header for the model to complete. The tool role is written `ipython`; an assistant
message that stopped at end of message (a tool call it expects an answer to) ends with <|eom_id|>. Content
is tokenized as text and never stripped: "<|eot_id|>" typed by a user is seven ordinary tokens, not the
special one. Nothing is added that the caller did not ask for: no system message, no date.
"""

import ast
import json
import re
import uuid
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import date
from typing import Any, Optional, Union

from .tokenizer import Tokenizer

ROLES = ("system", "user", "assistant", "tool")
BUILTIN_TOOLS = ("brave_search", "wolfram_alpha", "photogen", "code_interpreter")
STOP_REASONS = ("end_of_turn", "end_of_message", "out_of_tokens")
TOOL_PROMPT_FORMATS = ("json", "function_tag")  # Llama 3.1's two formats for custom tool calls
MESSAGE_KEYS = ("role", "content", "context", "stop_reason", "tool_calls")
TOOL_CALL_KEYS = ("tool_name", "arguments", "call_id")
ASSISTANT_HEADER = "<|start_header_id|>assistant<|end_header_id|>\n\n"

# Meta's patterns (tool_utils.py): a builtin call `name.call(query="...")` anywhere in the reply, and a custom
# call `<function=NAME>{...}</function>` whose arguments end at the first "}".
BUILTIN_CALL = re.compile(r'\b(?P<tool_name>\w+)\.call\(query="(?P<query>[^"]*)"\)')
FUNCTION_TAG = re.compile(r"<function=(?P<function_name>[^}]+)>(?P<args>{.*?})")


class DialogError(ValueError):
    """A message or dialog that cannot be encoded or answered; the text says which one and why."""


@dataclass
class ToolCall:
    tool_name: str  # one of BUILTIN_TOOLS, or a custom tool's name
    arguments: Union[dict[str, Any], str]  # builtin tools: {"query": ...}; code_interpreter: {"code": ...}
    call_id: str = ""  # a parsed reply's calls get a random uuid4, as Meta's do


@dataclass
class Message:
    role: str  # system, user, assistant or tool
    content: str
    context: Optional[str] = None  # a user message's retrieved (RAG) text, appended after a blank line
    stop_reason: Optional[str] = None  # an assistant message's: end_of_message makes it end with <|eom_id|>
    tool_calls: list[ToolCall] = field(default_factory=list)  # an assistant message's

    def to_dict(self) -> dict[str, Any]:
        """The {"role", "content", ...} form, without the fields left at their defaults."""
        d: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.context is not None:
            d["context"] = self.context
        if self.stop_reason is not None:
            d["stop_reason"] = self.stop_reason
        if self.tool_calls:
            d["tool_calls"] = [
                {"tool_name": t.tool_name, "arguments": t.arguments, "call_id": t.call_id} for t in self.tool_calls
            ]
        return d


def as_message(message: Union[Message, Mapping[str, Any]]) -> Message:
    """A checked Message from a Message or a {"role": ..., "content": ...} dict; DialogError says what is wrong."""
    if isinstance(message, Mapping):
        unknown = [k for k in message if k not in MESSAGE_KEYS]
        if unknown:
            raise DialogError(f"unknown key {unknown[0]!r} (a message has {', '.join(MESSAGE_KEYS)})")
        if "role" not in message:
            raise DialogError("message has no role")
        if "content" not in message:
            raise DialogError(f"{message['role']!r} message has no content")
        message = Message(**{**message, "tool_calls": message.get("tool_calls") or []})
    elif not isinstance(message, Message):
        raise DialogError(f'a message is a Message or a {{"role": ..., "content": ...}} dict, got {message!r:.80}')
    if not isinstance(message.tool_calls, list):
        raise DialogError(f"tool_calls must be a list, got {type(message.tool_calls).__name__}")
    message = replace(message, tool_calls=[as_tool_call(c) for c in message.tool_calls])
    role = message.role
    if role not in ROLES:
        hint = " (the tool role is written ipython in the prompt; give it as tool)" if role == "ipython" else ""
        raise DialogError(f"unknown role {role!r}{hint}; roles: {', '.join(ROLES)}")
    if not isinstance(message.content, str):
        raise DialogError(f"{role} message: content must be text, got {type(message.content).__name__}")
    if message.context is not None and (role != "user" or not isinstance(message.context, str)):
        raise DialogError(f"{role} message: context is a user message's retrieved text (a string)")
    if message.stop_reason is not None and (role != "assistant" or message.stop_reason not in STOP_REASONS):
        raise DialogError(
            f"{role} message: stop_reason is an assistant message's, one of {', '.join(STOP_REASONS)}; "
            f"got {message.stop_reason!r}"
        )
    if message.tool_calls and role != "assistant":
        raise DialogError(f"{role} message: only assistant messages make tool calls")
    return message


def as_tool_call(call: Union[ToolCall, Mapping[str, Any]]) -> ToolCall:
    if isinstance(call, Mapping):
        unknown = [k for k in call if k not in TOOL_CALL_KEYS]
        if unknown or "tool_name" not in call or "arguments" not in call:
            raise DialogError(
                f"a tool call is {{'tool_name': ..., 'arguments': ...}} (call_id optional), got {call!r:.80}"
            )
        call = ToolCall(call["tool_name"], call["arguments"], call.get("call_id", ""))
    elif not isinstance(call, ToolCall):
        raise DialogError(f"a tool call is a ToolCall or a dict, got {call!r:.80}")
    if not isinstance(call.tool_name, str) or not isinstance(call.call_id, str):
        raise DialogError(f"tool call: tool_name and call_id must be strings, got {call.tool_name!r}, {call.call_id!r}")
    if not isinstance(call.arguments, (dict, str)):
        raise DialogError(
            f"tool call {call.tool_name}: arguments must be a dict (or a string), got {call.arguments!r:.80}"
        )
    needs = "code" if call.tool_name == "code_interpreter" else "query" if call.tool_name in BUILTIN_TOOLS else None
    if needs and not (isinstance(call.arguments, dict) and needs in call.arguments):
        raise DialogError(f"tool call {call.tool_name}: arguments must have {needs!r}, got {call.arguments!r:.80}")
    if needs == "code" and not isinstance(call.arguments["code"], str):
        raise DialogError(f"tool call code_interpreter: the code must be text, got {call.arguments['code']!r:.80}")
    return call


def as_dialog(dialog: Sequence[Union[Message, Mapping[str, Any]]]) -> list[Message]:
    """Checked messages; DialogError names the message (counted from 0)."""
    if isinstance(dialog, (str, Mapping, Message)) or not isinstance(dialog, Sequence):
        raise DialogError(f"a dialog is a list of messages, got {type(dialog).__name__}")
    messages = []
    for i, m in enumerate(dialog):
        try:
            messages.append(as_message(m))
        except DialogError as e:
            raise DialogError(f"message {i}: {e}") from None
    return messages


def check_prompt(dialog: Sequence[Message]) -> None:
    """A dialog the model can answer: not empty, and not ending with an assistant turn (its reply)."""
    if not dialog:
        raise DialogError("the dialog is empty: there is nothing to reply to")
    if dialog[-1].role == "assistant":
        raise DialogError(
            "the dialog ends with an assistant message: the model replies to a user, system or tool message"
        )


def encode_tool_call(call: ToolCall, tool_prompt_format: str = "json") -> str:
    """A tool call as the assistant writes it (Meta's ToolUtils.encode_tool_call)."""
    if call.tool_name == "code_interpreter":
        return call.arguments["code"]
    if call.tool_name in BUILTIN_TOOLS:
        return f'{call.tool_name}.call(query="{call.arguments["query"]}")'
    if tool_prompt_format == "json":
        return json.dumps({"type": "function", "name": call.tool_name, "parameters": call.arguments})
    if tool_prompt_format == "function_tag":
        return f"<function={call.tool_name}>{json.dumps(call.arguments)}</function>"
    raise DialogError(f"tool_prompt_format must be one of {', '.join(TOOL_PROMPT_FORMATS)}, got {tool_prompt_format!r}")


class ChatFormat:
    """Dialogs to token ids and generated ids back to an assistant message, as Meta's ChatFormat does."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        special = tokenizer.special_tokens
        self.start_header, self.end_header = special["<|start_header_id|>"], special["<|end_header_id|>"]
        self.python_tag = special["<|python_tag|>"]

    def _text(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, bos=False, eos=False)  # special-token text stays text

    def encode_header(self, role: str) -> list[int]:
        name = "ipython" if role == "tool" else role
        return [self.start_header, *self._text(name), self.end_header, *self._text("\n\n")]

    def encode_message(self, message: Union[Message, Mapping[str, Any]], tool_prompt_format: str = "json") -> list[int]:
        """One message: header, content, then <|eot_id|> (or <|eom_id|>). Each piece (content, context, each
        tool call) is tokenized on its own, as Meta does; joined first, the ids could differ at the seams."""
        m = as_message(message)
        tokens = self.encode_header(m.role)
        if m.tool_calls and m.tool_calls[0].tool_name == "code_interpreter":
            tokens.append(self.python_tag)
        tokens += self._text(m.content)
        if m.role == "user" and m.context is not None:
            tokens += self._text("\n\n") + self._text(m.context)
        for call in m.tool_calls:
            tokens += self._text(encode_tool_call(call, tool_prompt_format))
        end = "<|eom_id|>" if m.stop_reason == "end_of_message" else "<|eot_id|>"
        return tokens + [self.tokenizer.special_tokens[end]]

    def encode_dialog_prompt(
        self, dialog: Sequence[Union[Message, Mapping[str, Any]]], tool_prompt_format: str = "json"
    ) -> list[int]:
        """<|begin_of_text|>, every message, and the open assistant header the model completes."""
        tokens = [self.tokenizer.bos_id]
        for i, message in enumerate(as_dialog(dialog)):
            try:
                tokens += self.encode_message(message, tool_prompt_format)
            except DialogError as e:
                raise DialogError(f"message {i}: {e}") from None
        return tokens + self.encode_header("assistant")

    def decode_assistant_message(self, tokens: Sequence[int], stop_reason: str) -> Message:
        """The assistant message in generated ids (which may end with their stop token)."""
        return parse_assistant_message(self.tokenizer.decode(tokens), stop_reason)

    def stop_reason(self, stop_token: Optional[int]) -> str:
        """Why a reply ended: <|eot_id|> end_of_turn, <|eom_id|> end_of_message, no stop token out_of_tokens.
        <|end_of_text|> (a base model's end; generation stops there too) counts as end_of_turn."""
        if stop_token is None:
            return "out_of_tokens"
        return "end_of_message" if stop_token == self.tokenizer.eom_id else "end_of_turn"

    def decode_reply(self, tokens: Sequence[int], stop_token: Optional[int]) -> Message:
        """The reply generated as `tokens` (without their stop token), parsed as Meta's chat completion parsed
        it: with its <|eot_id|> or <|eom_id|>, which decode_assistant_message strips after stripping spaces."""
        ends = [stop_token] if stop_token in (self.tokenizer.eot_id, self.tokenizer.eom_id) else []
        return self.decode_assistant_message([*tokens, *ends], self.stop_reason(stop_token))


def parse_assistant_message(content: str, stop_reason: str) -> Message:
    """A reply's text as Meta's ChatFormat.decode_assistant_message_from_content reads it: spaces stripped, a
    leading assistant header and <|python_tag|> dropped, a trailing <|eot_id|> or <|eom_id|> taken as the stop
    reason, and at most one tool call found (then the content is empty). Where Meta's parser raises on a
    malformed call (a JSON call without "parameters", arguments no ToolCall accepts), the reply stays text."""
    content = content.strip(" ")
    if content.startswith(ASSISTANT_HEADER):
        content = content[len(ASSISTANT_HEADER) :]
    ipython = content.startswith("<|python_tag|>")
    if ipython:
        content = content[len("<|python_tag|>") :]
    if content.endswith("<|eot_id|>"):
        content, stop_reason = content[: -len("<|eot_id|>")], "end_of_turn"
    elif content.endswith("<|eom_id|>"):
        content, stop_reason = content[: -len("<|eom_id|>")], "end_of_message"
    try:
        call = _tool_call(content, ipython)
    except (KeyError, IndexError, TypeError, AttributeError, ValueError, RecursionError):
        call = None
    if call is None:
        return Message("assistant", content, stop_reason=stop_reason)
    return Message("assistant", "", stop_reason=stop_reason, tool_calls=[call])


def _tool_call(content: str, ipython: bool) -> Optional[ToolCall]:
    """The tool call in a reply, found as Meta finds it: a custom call first, then a builtin one, then (after
    <|python_tag|>) the whole reply as code. Raises where Meta's parser would."""
    custom = _custom_tool_call(content)
    if custom is not None:
        name, arguments = custom
        if name is None:  # {"name": null, ...}: Meta makes no call of it
            return None
        if not isinstance(name, str):
            raise TypeError(f"tool name {name!r}")
        if name in BUILTIN_TOOLS:  # a builtin tool called in a custom tool's format: its first argument is the query
            return ToolCall(name, {"query": _value(list(arguments.values())[0])}, str(uuid.uuid4()))
        return ToolCall(name, _arguments(arguments), str(uuid.uuid4()))
    builtin = BUILTIN_CALL.search(content)
    if builtin is not None:
        return ToolCall(builtin["tool_name"], {"query": builtin["query"]}, str(uuid.uuid4()))
    if ipython:
        return ToolCall("code_interpreter", {"code": content}, str(uuid.uuid4()))
    return None


def _custom_tool_call(body: str) -> Optional[tuple[Any, Any]]:
    """(name, arguments) of a custom call: <function=NAME>{...}, a JSON object with "name" (or "type":
    "function"), or a Python list of calls `[f(a=1)]` (the first is taken)."""
    match = FUNCTION_TAG.search(body)
    if match is not None:
        try:  # Meta reads single quotes as double quotes, and gives up on anything it cannot read
            return match["function_name"], json.loads(match["args"].replace("'", '"'))
        except Exception:
            return None
    try:
        obj = json.loads(body)
    except json.JSONDecodeError:
        obj = None
    if isinstance(obj, dict):
        if obj.get("type") == "function" or "name" in obj:
            return obj["name"], obj["parameters"]
        return None
    calls = _python_calls(body)
    return calls[0] if calls else None


def _python_calls(body: str) -> Optional[list[tuple[str, dict[Any, Any]]]]:
    """[(name, keyword arguments)] of a body that is one Python list of calls with literal keyword arguments."""
    try:
        with warnings.catch_warnings():  # model output is not code: no warnings about its escape sequences
            warnings.simplefilter("ignore")
            tree = ast.parse(body)
    except SyntaxError:
        return None
    if len(tree.body) != 1 or not isinstance(tree.body[0], ast.Expr) or not isinstance(tree.body[0].value, ast.List):
        return None
    calls = tree.body[0].value.elts
    if not calls or not all(isinstance(c, ast.Call) and isinstance(c.func, ast.Name) and not c.args for c in calls):
        return None
    return [(c.func.id, {k.arg: ast.literal_eval(k.value) for k in c.keywords}) for c in calls]


# Meta's ToolCall (a pydantic model) takes arguments as a string, or a dict whose values are primitives, lists
# of primitives or dicts of primitives; Python literals are converted as pydantic does (tuples and sets to
# lists, bytes to text). Anything else makes Meta raise: TypeError here.
def _primitive(value: Any) -> Any:
    if value is None or isinstance(value, (str, int, float)):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8")
    raise TypeError(f"not a primitive: {value!r:.40}")


def _key(key: Any) -> str:
    if isinstance(key, (str, bytes)):
        return _primitive(key)
    raise TypeError(f"not a key: {key!r:.40}")


def _value(value: Any) -> Any:
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_primitive(v) for v in value]
    if isinstance(value, dict):
        return {_key(k): _primitive(v) for k, v in value.items()}
    return _primitive(value)


def _arguments(arguments: Any) -> Union[dict[str, Any], str]:
    if isinstance(arguments, str):
        return arguments
    if isinstance(arguments, dict):
        return {_key(k): _value(v) for k, v in arguments.items()}
    raise TypeError(f"not arguments: {arguments!r:.40}")


# System prompts for tools, as llama3_1/prompt_format.md shows them.

MONTHS = (
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
)


@dataclass
class ToolParam:
    param_type: str
    description: Optional[str] = None
    required: bool = True
    default: Any = None  # not shown to the model, as in Meta's prompts


@dataclass
class ToolDefinition:
    """A custom tool the model may call (Meta's ToolDefinition)."""

    tool_name: str
    description: str = ""
    parameters: dict[str, ToolParam] = field(default_factory=dict)


def system_prompt(
    builtin_tools: Sequence[str] = (),
    *,
    custom_tools: bool = False,
    today: Optional[date] = None,
    knowledge_cutoff: str = "December 2023",
    instructions: str = "",
) -> str:
    """The text of a Llama 3.1 system message: `Environment: ipython` when any tool is on (custom_tools: the
    dialog defines custom tools, see custom_tools_prompt), the `Tools:` line of builtin tools (code_interpreter
    is implied by the environment line), the knowledge-cutoff and date lines only when `today` is given, then
    your instructions. `system_prompt(["brave_search", "wolfram_alpha"], today=date(2024, 9, 21),
    instructions="You are a helpful assistant.")` is prompt_format.md's example."""
    unknown = [t for t in builtin_tools if t not in BUILTIN_TOOLS]
    if unknown:
        raise DialogError(f"unknown builtin tool {unknown[0]!r}; builtin tools: {', '.join(BUILTIN_TOOLS)}")
    text = ""
    if builtin_tools or custom_tools:
        named = [t for t in builtin_tools if t != "code_interpreter"]
        text += "Environment: ipython\n" + (f"Tools: {', '.join(named)}\n" if named else "\n")
    if today is not None:
        text += f"Cutting Knowledge Date: {knowledge_cutoff}\n"
        text += f"Today Date: {today.day:02d} {MONTHS[today.month - 1]} {today.year}\n"
    if instructions:
        text += f"\n{instructions}\n"
    return text


JSON_TOOLS_PROMPT = """\
Answer the user's question by making use of the following functions if needed.
If none of the function can be used, please say so.
Here is a list of functions in JSON format:
{tools}

Return function calls in JSON format."""
JSON_TOOL = """\
{{
    "type": "function",
    "function": {{
        "name": {name},
        "description": {description},
        "parameters": {{
            "type": "object",
            "properties": [{properties}
            ],
            "required": {required}
        }}
    }}
}}"""
JSON_TOOL_PROPERTY = """
                {{
                    {name}: {{
                        "type": "object",
                        "description": {description}
                    }}
                }}"""
FUNCTION_TAG_TOOLS_PROMPT = """\
You have access to the following functions:

{tools}Think very carefully before calling functions.
If you choose to call a function ONLY reply in the following format with no prefix or suffix:

<function=example_function_name>{{"example_name": "example_value"}}</function>

Reminder:
- If looking for real time information use relevant functions before falling back to brave_search
- Function calls MUST follow the specified format, start with <function= and end with </function>
- Required parameters MUST be specified
- Only call one function at a time
- Put the entire function call reply on one line"""
FUNCTION_TAG_TOOL = """\
Use the function '{name}' to '{description}':
{{"name": {json_name}, "description": {json_description}, "parameters": {parameters}}}

"""


def custom_tools_prompt(tools: Sequence[ToolDefinition], tool_prompt_format: str = "json") -> str:
    """The user message that defines custom tools, in prompt_format.md's JSON or <function> format. It goes
    before the user's first message; the system message then needs system_prompt(custom_tools=True)."""

    def q(text: Optional[str]) -> str:  # a JSON string (Meta's templates paste names in unescaped)
        return json.dumps(text, ensure_ascii=False)

    if tool_prompt_format == "json":
        blocks = []
        for t in tools:
            properties = ",".join(
                JSON_TOOL_PROPERTY.format(name=q(name), description=q(p.description))
                for name, p in t.parameters.items()
            )
            required = json.dumps([name for name, p in t.parameters.items() if p.required])
            blocks.append(
                JSON_TOOL.format(
                    name=q(t.tool_name), description=q(t.description), properties=properties, required=required
                )
            )
        return JSON_TOOLS_PROMPT.format(tools="\n".join(blocks))
    if tool_prompt_format == "function_tag":
        blocks = []
        for t in tools:
            # the parameters with sorted keys and without defaults, as Meta's template (jinja's tojson) writes them
            parameters = {
                name: {"description": p.description, "param_type": p.param_type, "required": p.required}
                for name, p in t.parameters.items()
            }
            blocks.append(
                FUNCTION_TAG_TOOL.format(
                    name=t.tool_name,
                    description=t.description,
                    json_name=q(t.tool_name),
                    json_description=q(t.description),
                    parameters=json.dumps(parameters, sort_keys=True),
                )
            )
        return FUNCTION_TAG_TOOLS_PROMPT.format(tools="".join(blocks))
    raise DialogError(f"tool_prompt_format must be one of {', '.join(TOOL_PROMPT_FORMATS)}, got {tool_prompt_format!r}")
