"""Llama.chat_completion: the same tokens, stop tokens and reasons, parsed replies and log-probabilities as Meta's
Llama3.chat_completion on the tiny checkpoint (greedy, seeded top-p, and replies forced into tool calls and stop
tokens), batched like text_completion, and one clear error for a request it cannot serve."""

from collections.abc import Sequence

import pytest
import torch

from microllama import Llama
from microllama.chat import DialogError
from reference_harness.dialogs import CHAT_DIALOGS

MAX_GEN_LEN = 24


@pytest.fixture(scope="module")
def llama(tiny_ckpt, tokenizer, one_torch_thread):
    return Llama.build(tiny_ckpt, max_seq_len=256, max_batch_size=4)


def without_call_ids(message: dict) -> dict:
    return {**message, "tool_calls": [{k: v for k, v in c.items() if k != "call_id"} for c in message["tool_calls"]]}


def as_compared(completions) -> list[dict]:
    return [
        {"tokens": c.tokens, "stop_token": c.stop_token, "stop_reason": c.stop_reason, "logprobs": c.logprobs,
         "message": without_call_ids({"tool_calls": [], **c.message.to_dict()})}
        for c in completions
    ]  # fmt: skip


def metas(rows: list[dict]) -> list[dict]:
    return [{**r, "message": {"tool_calls": [], **r["message"]}} for r in rows]


def force_replies(model: torch.nn.Module, prompt_lens: Sequence[int], replies: Sequence[Sequence[int]]):
    """Make `model` (microllama's or Meta's) generate `replies[row]` for each row: the row's first new token comes
    from forward call len(prompt) - shortest prompt, each later one from the next call."""
    calls = []

    def hook(module, args, output):
        for row, reply in enumerate(replies):
            step = len(calls) - (prompt_lens[row] - min(prompt_lens))
            if 0 <= step < len(reply):
                output[row, -1, reply[step]] = 1e4
        calls.append(1)
        return output

    return model.output.register_forward_hook(hook)


@pytest.mark.reference
@pytest.mark.parametrize(
    ("temperature", "seed", "max_gen_len"),
    # top-p sampling sorts 128,256 probabilities a row a step: seconds on one CPU thread, so fewer steps
    [(0.0, 1, MAX_GEN_LEN), pytest.param(0.8, 7, 8, marks=pytest.mark.slow)],
    ids=["greedy", "top_p"],
)
def test_chat_completion_equals_metas(llama, tiny_ckpt, temperature, seed, max_gen_len):
    """The four fixed dialogs (system + user, multi-turn, a builtin tool's result, a custom tool call), batched:
    ids, stop reasons, parsed replies and float32 log-probabilities bit for bit."""
    from reference_harness.meta import meta_chat_completions, meta_llama

    meta = meta_llama(tiny_ckpt, torch.float32, max_seq_len=256, max_batch_size=4, seed=seed)
    expected = meta_chat_completions(meta, CHAT_DIALOGS, temperature, top_p=0.9, max_gen_len=max_gen_len)
    got = llama.chat_completion(CHAT_DIALOGS, temperature, 0.9, max_gen_len, logprobs=True, seed=seed)
    assert as_compared(got) == metas(expected)
    # random weights rarely pick a stop token: these run to max_gen_len (stop tokens: the next test)
    assert [c.stop_reason for c in got] == ["out_of_tokens"] * 4 and all(len(c.tokens) == max_gen_len for c in got)


@pytest.mark.reference
def test_replies_forced_into_tool_calls_and_stop_tokens_parse_as_metas(llama, tiny_ckpt, tokenizer):
    """Each row's reply forced, in both models, into a form the parser must read: a builtin call ending with
    <|eom_id|>, a JSON custom call and a <function> call ending with <|eot_id|>, text ending with <|end_of_text|>."""
    from reference_harness.meta import meta_chat_completions, meta_llama

    text = lambda s: tokenizer.encode(s, bos=False, eos=False)  # noqa: E731
    special = tokenizer.special_tokens
    replies = [
        [special["<|python_tag|>"], *text('brave_search.call(query="price of gold")'), special["<|eom_id|>"]],
        [*text('{"type": "function", "name": "get_weather", "parameters": {"city": "Paris"}}'), tokenizer.eot_id],
        [*text('<function=get_weather>{"city": "Zürich"}</function>'), tokenizer.eot_id],
        [*text("Plain text "), tokenizer.eos_id],
    ]
    prompt_lens = [len(llama.formatter.encode_dialog_prompt(d)) for d in CHAT_DIALOGS]
    meta = meta_llama(tiny_ckpt, torch.float32, max_seq_len=256, max_batch_size=4)
    with force_replies(meta.model, prompt_lens, replies):
        expected = meta_chat_completions(meta, CHAT_DIALOGS, 0.0, top_p=0.9, max_gen_len=MAX_GEN_LEN)
    with force_replies(llama.model, prompt_lens, replies):
        got = llama.chat_completion(CHAT_DIALOGS, 0.0, max_gen_len=MAX_GEN_LEN, logprobs=True)
    assert as_compared(got) == metas(expected)
    assert [c.stop_reason for c in got] == ["end_of_message", "end_of_turn", "end_of_turn", "end_of_turn"]
    assert [c.stop_token for c in got] == [r[-1] for r in replies]
    assert [c.message.tool_calls[0].tool_name for c in got[:3]] == ["brave_search", "get_weather", "get_weather"]
    assert [c.tokens for c in got] == [r[:-1] for r in replies] and got[3].message.content == "Plain text"


def test_replies_are_the_same_alone_or_batched(llama):
    batched = llama.chat_completion(CHAT_DIALOGS, temperature=0, max_gen_len=8)
    alone = [llama.chat_completion([d], temperature=0, max_gen_len=8)[0] for d in CHAT_DIALOGS]
    assert [c.tokens for c in batched] == [c.tokens for c in alone]
    assert [c.message for c in batched] == [c.message for c in alone]


def test_the_reply_is_the_text_completion_of_the_encoded_dialog(llama):
    """chat_completion is generate on the dialog's ids: no second decoding loop, the same stream."""
    seen: dict[int, list[int]] = {}
    got = llama.chat_completion(
        CHAT_DIALOGS[:2], 0.8, 0.9, 8, seed=3, on_token=lambda r, t: seen.setdefault(r, []).append(t)
    )
    prompts = [llama.formatter.encode_dialog_prompt(d) for d in CHAT_DIALOGS[:2]]
    tokens, _ = llama.generate(prompts, 8, 0.8, 0.9, seed=3)
    assert [c.tokens for c in got] == tokens == [seen[0], seen[1]]
    assert [c.message.content for c in got] == [llama.tokenizer.decode(t).strip(" ") for t in tokens]


USER, ASSISTANT = {"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}


@pytest.mark.parametrize(
    ("dialogs", "message"),
    [
        ([[{"role": "robot", "content": "x"}]], r"^dialog 0: message 0: unknown role 'robot'; roles: system, user, "),
        ([[USER], [{"role": "user"}]], r"^dialog 1: message 0: 'user' message has no content$"),
        ([[]], r"^dialog 0: the dialog is empty: there is nothing to reply to$"),
        ([[USER, ASSISTANT]], r"^dialog 0: the dialog ends with an assistant message: the model replies to a user"),
        ([[{"role": "user", "content": "word " * 300}]], r"^dialog 0 is \d+ tokens, at or beyond max_seq_len 256: no "),
        ([], r"^no dialogs given: the batch is empty$"),
        ([[USER]] * 5, r"^5 prompts exceed max_batch_size 4$"),
    ],
    ids=["unknown-role", "no-content", "empty-dialog", "ends-with-assistant", "too-long", "no-dialogs", "too-many"],
)  # fmt: skip
def test_bad_dialogs_get_one_clear_error_before_model_work(llama, monkeypatch, dialogs, message):
    monkeypatch.setattr(llama.model, "forward", lambda *a, **k: pytest.fail("model ran on a bad request"))
    with pytest.raises(ValueError, match=message):
        llama.chat_completion(dialogs, temperature=0, max_gen_len=4)


def test_one_dialog_passed_as_the_batch_is_refused(llama):
    with pytest.raises(TypeError, match="dialogs must be a list of dialogs"):
        llama.chat_completion([{"role": "user", "content": "x"}])
    with pytest.raises(DialogError, match="tool_prompt_format must be one of json, function_tag, got 'yaml'"):
        llama.chat_completion([CHAT_DIALOGS[3]], tool_prompt_format="yaml")
