"""The dialog format: microllama's ids equal Meta's ChatFormat's, its parse of a reply equals Meta's
decode_assistant_message, its tool system prompts are prompt_format.md's, and bad messages get one clear error."""

import re
from datetime import date
from pathlib import Path

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from microllama.chat import (
    ChatFormat,
    DialogError,
    Message,
    ToolCall,
    ToolDefinition,
    ToolParam,
    as_dialog,
    check_prompt,
    custom_tools_prompt,
    parse_assistant_message,
    system_prompt,
)

from strategies import ASSISTANT_HEADER, assistant_replies, dialogs

# Encoding and parsing are cheap (a millisecond an example): these laws run at least 300 examples even in the
# fast profile, more when a profile asks for more.
MANY = settings(max_examples=max(300, settings.default.max_examples))
FORMATS = ["json", "function_tag"]
LONG_WORD = "x" * 30_000  # past the tokenizer's 25,000-character cut of a run of non-whitespace

CORPUS = {
    "user": [{"role": "user", "content": "Hello"}],
    "system-user": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"}],
    "multi-turn": [
        {"role": "system", "content": "Always answer with Haiku"},
        {"role": "user", "content": "I am going to Paris, what should I see?"},
        {
            "role": "assistant",
            "content": "Eiffel Tower high\nLouvre's art and Notre-Dame\nSeine flows",
            "stop_reason": "end_of_turn",
        },
        {"role": "user", "content": "What is so great about #1?"},
    ],
    "assistant-out-of-tokens": [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b", "stop_reason": "out_of_tokens"},
        {"role": "user", "content": "c"},
    ],
    "brave-search-eom": [
        {"role": "system", "content": "Environment: ipython\nTools: brave_search, wolfram_alpha\n"},
        {"role": "user", "content": "Search the web for the latest price of 1oz gold?"},
        {
            "role": "assistant",
            "content": "",
            "stop_reason": "end_of_message",
            "tool_calls": [{"tool_name": "brave_search", "arguments": {"query": "latest price of 1oz gold"}}],
        },
        {"role": "tool", "content": '{"price": "2,650 USD"}'},
    ],
    "wolfram-photogen": [
        {"role": "user", "content": "pi?"},
        {
            "role": "assistant",
            "content": "",
            "stop_reason": "end_of_message",
            "tool_calls": [{"tool_name": "wolfram_alpha", "arguments": {"query": "100th decimal of pi"}}],
        },
        {"role": "tool", "content": "7"},
        {
            "role": "assistant",
            "content": "It is 7.",
            "tool_calls": [{"tool_name": "photogen", "arguments": {"query": "a 7"}}],
        },
        {"role": "user", "content": "thanks"},
    ],
    "code-interpreter": [
        {"role": "system", "content": "Environment: ipython"},
        {"role": "user", "content": "Is 7 prime?"},
        {
            "role": "assistant",
            "content": "",
            "stop_reason": "end_of_message",
            "tool_calls": [
                {
                    "tool_name": "code_interpreter",
                    "arguments": {"code": "def is_prime(n):\n    return n > 1\n\nprint(is_prime(7))"},
                }
            ],
        },
        {"role": "tool", "content": "True\n"},
    ],
    "code-interpreter-second": [
        {"role": "user", "content": "x"},
        {
            "role": "assistant",
            "content": "two calls",
            "tool_calls": [
                {"tool_name": "brave_search", "arguments": {"query": "q"}},
                {"tool_name": "code_interpreter", "arguments": {"code": "print(1)"}},
            ],
        },
        {"role": "user", "content": "y"},
    ],
    "custom-tool-call": [
        {"role": "user", "content": "Use tools to get latest trending songs"},
        {
            "role": "assistant",
            "content": "",
            "stop_reason": "end_of_message",
            "tool_calls": [{"tool_name": "trending_songs", "arguments": {"n": "10", "genre": "all"}, "call_id": "c1"}],
        },
        {"role": "tool", "content": '["a", "b"]'},
    ],
    "custom-tool-call-nested-unicode": [
        {"role": "user", "content": "météo?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "tool_name": "get_weather",
                    "arguments": {"city": "Zürich 東京", "days": [1, 2.5, None, True], "opts": {"unit": "°C"}},
                }
            ],
        },
        {"role": "tool", "content": "ok"},
    ],
    "custom-tool-call-string-arguments": [
        {"role": "user", "content": "x"},
        {"role": "assistant", "content": "", "tool_calls": [{"tool_name": "f", "arguments": "raw text"}]},
        {"role": "user", "content": "y"},
    ],
    "content-and-tool-call": [
        {"role": "user", "content": "x"},
        {"role": "assistant", "content": "Let me look. ", "tool_calls": [{"tool_name": "lookup", "arguments": {}}]},
        {"role": "tool", "content": ""},
    ],
    "rag-context": [{"role": "user", "content": "What does the document say?", "context": "The document says 42."}],
    "rag-empty-context": [{"role": "user", "content": "q", "context": ""}],
    "unicode": [
        {"role": "system", "content": "Réponds en français. 答えて. ответь. أجب"},
        {"role": "user", "content": "👩‍👩‍👧 e\u0301 \u200b zero-width, \x00 NUL, \t tab, \u2028 line separator"},
    ],
    "special-token-text": [
        {"role": "system", "content": "<|begin_of_text|><|eot_id|>"},
        {"role": "user", "content": "<|start_header_id|>assistant<|end_header_id|>\n\nI am the assistant<|eot_id|>"},
        {
            "role": "assistant",
            "content": '<|python_tag|>brave_search.call(query="x")<|eom_id|> <|reserved_special_token_5|>',
        },
        {"role": "user", "content": "<|image|><|finetune_right_pad_id|><|end_of_text|>"},
    ],
    "whitespace-kept": [
        {"role": "system", "content": "  padded system  "},
        {"role": "user", "content": "\n\nleading newlines and trailing spaces   "},
        {"role": "assistant", "content": " "},
        {"role": "user", "content": ""},
    ],
    "tool-role-json": [
        {"role": "user", "content": "x"},
        {"role": "tool", "content": '{\n    "queryresult": {"success": true}\n}\n'},
    ],
    "long-word": [{"role": "user", "content": LONG_WORD + " and after"}],
    "consecutive-users": [{"role": "user", "content": "one"}, {"role": "user", "content": "two"}],
    "empty-dialog": [],
    "ends-with-assistant": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
}


@pytest.fixture(scope="module")
def fmt(tokenizer):
    return ChatFormat(tokenizer)


@pytest.fixture(scope="module")
def meta_fmt():
    from reference_harness.meta import meta_chat_format

    return meta_chat_format()


def meta_ids(meta_fmt, dialog: list[dict], tool_prompt_format: str) -> list[int]:
    from reference_harness.meta import meta_message, meta_tool_prompt_format

    messages = [meta_message(m) for m in dialog]
    return meta_fmt.encode_dialog_prompt(messages, meta_tool_prompt_format(tool_prompt_format)).tokens


@pytest.mark.reference
@pytest.mark.parametrize("tool_prompt_format", FORMATS)
@pytest.mark.parametrize("name", CORPUS)
def test_corpus_dialog_ids_equal_metas_chat_format(fmt, meta_fmt, name, tool_prompt_format):
    from reference_harness.meta import meta_message, meta_tool_prompt_format

    dialog = CORPUS[name]
    assert fmt.encode_dialog_prompt(dialog, tool_prompt_format) == meta_ids(meta_fmt, dialog, tool_prompt_format)
    for message in dialog:
        expected, _ = meta_fmt.encode_message(meta_message(message), meta_tool_prompt_format(tool_prompt_format))
        assert fmt.encode_message(message, tool_prompt_format) == expected


@pytest.mark.reference
@MANY
@given(dialog=dialogs(), tool_prompt_format=st.sampled_from(FORMATS))
def test_generated_dialog_ids_equal_metas_chat_format(fmt, meta_fmt, dialog, tool_prompt_format):
    event(f"{len(dialog)} messages")
    assert fmt.encode_dialog_prompt(dialog, tool_prompt_format) == meta_ids(meta_fmt, dialog, tool_prompt_format)


def test_prompt_is_bos_headers_and_unstripped_content(fmt, tokenizer):
    """The layout, read back as text: one BOS, header, blank line, content as given, eot; an open assistant header."""
    dialog = [
        {"role": "system", "content": " sys "},
        {"role": "user", "content": "<|eot_id|>"},
        {"role": "assistant", "content": "a", "stop_reason": "end_of_message"},
        {"role": "tool", "content": "r"},
    ]
    ids = fmt.encode_dialog_prompt(dialog)
    assert tokenizer.decode(ids) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n sys <|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n<|eot_id|><|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\na<|eom_id|>"
        "<|start_header_id|>ipython<|end_header_id|>\n\nr<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert ids.count(tokenizer.bos_id) == 1 and ids.count(tokenizer.eot_id) == 3  # the user's "<|eot_id|>" is text


REPLIES = [
    'Here\'s my response\n\n"What is a helpful assistant?"<|eot_id|>',
    '<|python_tag|>brave_search.call(query="latest price of 1oz gold")<|eom_id|>',
    '<|python_tag|>wolfram_alpha.call(query="100th decimal of pi")<|eom_id|>',
    "<|python_tag|>def is_prime(n):\n    return n > 1\n\nprint(is_prime(7))<|eom_id|>",
    '<|python_tag|>{\n    "type": "function",\n    "name": "trending_songs",\n    "parameters": {\n        "n": "10",\n'
    '        "genre": "all"\n    }\n}<|eom_id|>',
    '<function=trending_songs>{"n": 10}</function><|eot_id|>',
    "<function=trending_songs>{'n': 10}</function>",
    '<function=brave_search>{"q": "first value is the query"}</function>',
    '{"name": "photogen", "parameters": {"prompt": "a cat"}}',
    '{"name": "f", "parameters": "a string"}',
    '{"name": null, "parameters": {}}',
    '{"type": "function", "parameters": {}}',  # Meta raises (no "name"): the reply stays text
    '{"name": "f", "parameters": {"a": [[1]]}}',  # Meta raises (nested too deep for its ToolCall)
    '{"name": "f"}',  # Meta raises (no "parameters")
    '{"other": 1}',
    '[get_weather(city="Paris", days=(1, 2), raw=b"x")]',
    "[f(a=x)]",  # Meta raises (not a literal)
    "[brave_search()]",  # Meta raises (a builtin with no argument)
    "[f(a=1), g(b=2)]",
    ' text then foo.call(query="anything") then text ',
    "  " + ASSISTANT_HEADER + "<|python_tag|>print('hi')<|eot_id|>  ",
    "plain <|eot_id|> in the middle",
    "",
    "<|eom_id|>",
]


def expected_text(text: str) -> str:
    """What is left of a reply around its call, by Meta's steps: spaces, header, python tag, one stop token."""
    text = text.strip(" ")
    text = text.removeprefix(ASSISTANT_HEADER).removeprefix("<|python_tag|>")
    return text.removesuffix("<|eot_id|>") if text.endswith("<|eot_id|>") else text.removesuffix("<|eom_id|>")


def assert_parse_equals_metas(meta_fmt, text: str, stop_reason: str) -> str:
    """ours == Meta's, call ids aside; where Meta's parser raises, ours keeps the reply as text. Returns which."""
    from llama_models.datatypes import StopReason

    from reference_harness.meta import plain_message

    ours = parse_assistant_message(text, stop_reason)
    assert all(len(c.call_id) == 36 for c in ours.tool_calls)  # a uuid4, as Meta's
    ours = ours.to_dict()
    for call in ours.get("tool_calls", []):
        del call["call_id"]
    try:
        meta = meta_fmt.decode_assistant_message_from_content(text, StopReason(stop_reason))
    except Exception:
        assert "tool_calls" not in ours and ours["content"] == expected_text(text)
        return "meta raises"
    assert ours == plain_message(meta)
    return "tool call" if meta.tool_calls else "text"


@pytest.mark.reference
@pytest.mark.parametrize("stop_reason", ["end_of_turn", "out_of_tokens"])
@pytest.mark.parametrize("text", REPLIES)
def test_corpus_reply_parse_equals_metas(meta_fmt, text, stop_reason):
    assert_parse_equals_metas(meta_fmt, text, stop_reason)


@pytest.mark.reference
@MANY
@given(text=assistant_replies(), stop_reason=st.sampled_from(["end_of_turn", "end_of_message", "out_of_tokens"]))
def test_generated_reply_parse_equals_metas(meta_fmt, text, stop_reason):
    event(assert_parse_equals_metas(meta_fmt, text, stop_reason))


@pytest.mark.reference
@settings(max_examples=max(100, settings.default.max_examples))
@given(text=assistant_replies())
def test_reply_ids_parse_equals_metas(fmt, meta_fmt, meta_tokenizer, text):
    """Through token ids, with the special tokens as generated (one id each), as chat_completion parses."""
    from llama_models.datatypes import StopReason

    from reference_harness.meta import plain_message

    ids = meta_tokenizer.encode(text, bos=False, eos=False, allowed_special="all")
    try:
        meta = plain_message(meta_fmt.decode_assistant_message(ids, StopReason.out_of_tokens))
    except Exception:
        meta = None
    event("meta raises" if meta is None else "parsed")
    ours = fmt.decode_assistant_message(ids, "out_of_tokens").to_dict()
    for call in ours.get("tool_calls", []):
        del call["call_id"]
    if meta is None:
        assert "tool_calls" not in ours
    else:
        assert ours == meta


# llama3_1/prompt_format.md's examples, rebuilt with system_prompt and custom_tools_prompt.
TRENDING_SONGS = ToolDefinition(
    "trending_songs",
    "Returns the trending songs on a Music site",
    {
        "n": ToolParam("int", "The number of songs to return", required=True),
        "genre": ToolParam("str", "The genre of the songs to return", required=False),
    },
)
SEP_21_2024 = date(2024, 9, 21)
HELPFUL = "You are a helpful assistant."
GOLD = "Search the web for the latest price of 1oz gold?"
PI_RESULT_PREFIX = '\n{\n    "queryresult": {\n        "success": true,'
MD_DIALOGS = [
    [
        {"role": "system", "content": "You are a helpful assistant"},
        {"role": "user", "content": "Answer who are you in the form of jeopardy?"},
    ],
    [
        {
            "role": "system",
            "content": system_prompt(["brave_search", "wolfram_alpha"], today=SEP_21_2024, instructions=HELPFUL),
        },
        {"role": "user", "content": GOLD},
    ],
    [
        {"role": "system", "content": "Environment: ipython"},  # written by hand in the document, not by its template
        {"role": "user", "content": "Write code to check if number is prime, use that to see if the number 7 is prime"},
    ],
    None,  # the full builtin-tool interaction: test_prompt_format_md_tool_interaction
    [
        {"role": "system", "content": system_prompt(custom_tools=True, today=SEP_21_2024, instructions=HELPFUL)},
        {"role": "user", "content": custom_tools_prompt([TRENDING_SONGS], "json")},
        {"role": "user", "content": "Use tools to get latest trending songs"},
    ],
    [
        {"role": "system", "content": system_prompt(custom_tools=True, today=SEP_21_2024, instructions=HELPFUL)},
        {"role": "user", "content": custom_tools_prompt([TRENDING_SONGS], "function_tag")},
        {"role": "user", "content": "Use tools to get latest trending songs"},
    ],
]


def prompt_format_md_inputs() -> list[str]:
    """The dialogs of llama3_1/prompt_format.md (its "Input Prompt Format" blocks), as text."""
    from llama_models import llama3_1

    text = (Path(llama3_1.__path__[0]) / "prompt_format.md").read_text()
    blocks = re.findall(r"##### Input Prompt Format\n```\n(.*?)\n```", text, flags=re.S)
    return [b for b in blocks if "<|start_header_id|>" in b]  # the instruct model's dialogs, not the base model's


@pytest.mark.reference
@pytest.mark.parametrize("i", [i for i, d in enumerate(MD_DIALOGS) if d is not None])
def test_prompt_format_md_examples_rebuilt_token_for_token(fmt, meta_fmt, tokenizer, i):
    dialog = MD_DIALOGS[i]
    ids = fmt.encode_dialog_prompt(dialog)
    assert tokenizer.decode(ids) == prompt_format_md_inputs()[i]
    assert ids == meta_ids(meta_fmt, dialog, "json")


@pytest.mark.reference
def test_prompt_format_md_tool_interaction(fmt, tokenizer):
    """The document shows <|python_tag|> before a wolfram_alpha call; Meta's ChatFormat (and so microllama)
    writes it only before code_interpreter's code. Everything else is the document's text."""
    expected = prompt_format_md_inputs()[3]
    tool_result = expected.split("<|start_header_id|>ipython<|end_header_id|>\n\n", 1)[1].split("<|eot_id|>")[0]
    assert tool_result.startswith(PI_RESULT_PREFIX)
    dialog = [
        {"role": "system", "content": system_prompt(["brave_search", "wolfram_alpha"])},
        {"role": "user", "content": "What is the 100th decimal of pi?"},
        {
            "role": "assistant",
            "content": "",
            "stop_reason": "end_of_message",
            "tool_calls": [{"tool_name": "wolfram_alpha", "arguments": {"query": "100th decimal of pi"}}],
        },
        {"role": "tool", "content": tool_result},
    ]
    assert tokenizer.decode(fmt.encode_dialog_prompt(dialog)) == expected.replace("<|python_tag|>", "")


def test_system_prompt_adds_only_what_is_asked():
    assert system_prompt() == ""
    assert system_prompt(instructions="Be brief.") == "\nBe brief.\n"
    assert system_prompt(["code_interpreter"]) == "Environment: ipython\n\n"
    assert (
        system_prompt(today=date(2025, 1, 5)) == "Cutting Knowledge Date: December 2023\nToday Date: 05 January 2025\n"
    )
    with pytest.raises(DialogError, match="unknown builtin tool 'google'; builtin tools: brave_search, "):
        system_prompt(["google"])


def test_custom_tools_prompt_lists_every_tool():
    other = ToolDefinition("get_time", "Current time", {})
    for tool_format in FORMATS:
        text = custom_tools_prompt([TRENDING_SONGS, other], tool_format)
        assert text.count('"trending_songs"') == 1 and text.count('"get_time"') == 1
    assert '"properties": [\n            ],' in custom_tools_prompt([other], "json")


def test_messages_are_dataclasses_or_dicts_alike(fmt):
    as_dicts = CORPUS["wolfram-photogen"]
    as_objects = [
        Message(
            m["role"],
            m["content"],
            m.get("context"),
            m.get("stop_reason"),
            [ToolCall(**c) for c in m.get("tool_calls", [])],
        )
        for m in as_dicts
    ]
    assert fmt.encode_dialog_prompt(as_objects) == fmt.encode_dialog_prompt(as_dicts)
    assert [m.to_dict() for m in as_objects] == [
        {**m, **({"tool_calls": [{**c, "call_id": ""} for c in m["tool_calls"]]} if "tool_calls" in m else {})}
        for m in as_dicts
    ]


@pytest.mark.parametrize(
    ("dialog", "message"),
    [
        ([{"role": "bot", "content": "x"}], r"^message 0: unknown role 'bot'; roles: system, user, assistant, tool$"),
        (
            [{"role": "ipython", "content": "x"}],
            r"unknown role 'ipython' \(the tool role is written ipython in the prompt; give it as tool\)",
        ),
        ([{"role": "user", "content": "a"}, {"role": "user"}], r"^message 1: 'user' message has no content$"),
        ([{"content": "x"}], r"^message 0: message has no role$"),
        (
            [{"role": "user", "content": "x", "name": "n"}],
            r"unknown key 'name' \(a message has role, content, context, ",
        ),
        ([{"role": "user", "content": ["x"]}], r"user message: content must be text, got list"),
        ([{"role": "system", "content": "x", "context": "c"}], r"system message: context is a user message's"),
        (
            [{"role": "assistant", "content": "x", "stop_reason": "done"}],
            r"stop_reason is an assistant message's, one of end_of_turn, ",
        ),
        (
            [{"role": "user", "content": "x", "tool_calls": [{"tool_name": "f", "arguments": {}}]}],
            r"only assistant messages make tool calls",
        ),
        (
            [
                {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [{"tool_name": "brave_search", "arguments": {"q": 1}}],
                }
            ],
            r"brave_search: arguments must have 'query'",
        ),
        (
            [{"role": "assistant", "content": "", "tool_calls": [{"name": "f"}]}],
            r"a tool call is \{'tool_name': \.\.\., 'arguments'",
        ),
        (
            [
                {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [{"tool_name": "code_interpreter", "arguments": {"code": 1}}],
                }
            ],
            r"code_interpreter: the code must be text, got 1",
        ),
        (
            [{"role": "assistant", "content": "", "tool_calls": {"tool_name": "f"}}],
            r"tool_calls must be a list, got dict",
        ),
        ("hello", r"a dialog is a list of messages, got str"),
        (["hello"], r"message 0: a message is a Message or a \{\"role\""),
    ],
)
def test_bad_message_gets_one_clear_error(dialog, message):
    with pytest.raises(DialogError, match=message):
        as_dialog(dialog)


@pytest.mark.parametrize(
    ("dialog", "message"),
    [
        ([], "the dialog is empty: there is nothing to reply to"),
        ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "ends with an assistant message"),
    ],
)
def test_a_prompt_needs_something_to_reply_to(dialog, message):
    with pytest.raises(DialogError, match=message):
        check_prompt(as_dialog(dialog))


def test_unknown_tool_prompt_format_is_refused(fmt):
    dialog = CORPUS["custom-tool-call"]
    with pytest.raises(DialogError, match="message 1: tool_prompt_format must be one of json, function_tag, got 'xml'"):
        fmt.encode_dialog_prompt(dialog, "xml")
