# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     name: python3
# ---

# %% [markdown]
# # Stage 07: the chat format
#
# An instruct model reads a dialog as one sequence of ids. Llama 3.1's format: `<|begin_of_text|>`, then each
# message as a header `<|start_header_id|>` role `<|end_header_id|>` followed by "\n\n", its content, and an end
# marker: `<|eot_id|>` (end of turn), or `<|eom_id|>` (end of message) after a tool call the assistant expects an
# answer to. A tool's answer comes in the role `ipython`. The prompt ends with an open assistant header, which the
# model completes; its reply ends at its own `<|eot_id|>` or `<|eom_id|>`, which say why it stopped.
#
# Each piece (the role's name, "\n\n", the content, a tool call) is byte-pair encoded on its own, as Meta's
# `ChatFormat` does: encoding the joined text could merge pieces across the seams.

# %%
import torch

from microllama.chat import Message, as_message, encode_tool_call
from microllama.checkpoint.load import open_checkpoint
from microllama.generation import Llama
from microllama.golden.schema import to_json
from microllama.golden.tutorial import check_chat_prompt, check_reply, golden_set
from microllama.tokenizer import Tokenizer

golden = golden_set()
chat = golden.manifest.chat  # 4 dialogs: system and user; a second turn; a built-in tool call; a custom one
tokenizer = Tokenizer()
special = tokenizer.special_tokens  # name -> id, e.g. special["<|eot_id|>"]


def text(s: str) -> list[int]:
    """A piece of text's byte-pair ids, no BOS, special-looking text left as text."""
    return tokenizer.encode(s, bos=False, eos=False)


# %% tags=["solution"]
def encode_header(role: str) -> list[int]:
    """<|start_header_id|> role <|end_header_id|> "\n\n"; a tool's answer is written under the role ipython."""
    name = "ipython" if role == "tool" else role
    return [special["<|start_header_id|>"], *text(name), special["<|end_header_id|>"], *text("\n\n")]


def encode_message(message: Message) -> list[int]:
    """Header, content, each tool call (microllama.chat.encode_tool_call writes it as text), end marker."""
    tokens = encode_header(message.role) + text(message.content)
    for call in message.tool_calls:
        tokens += text(encode_tool_call(call, chat.tool_prompt_format))
    end = "<|eom_id|>" if message.stop_reason == "end_of_message" else "<|eot_id|>"
    return tokens + [special[end]]


def encode_dialog(dialog: list[Message]) -> list[int]:
    """The prompt: BOS, every message, then the open assistant header the model completes."""
    tokens = [special["<|begin_of_text|>"]]
    for message in dialog:
        tokens += encode_message(message)
    return tokens + encode_header("assistant")


# %% [markdown]
# The check: each of the golden set's dialogs against the prompt ids Meta's `ChatFormat.encode_dialog_prompt`
# made. Dialog 2 holds a built-in tool call (`wolfram_alpha.call(query="...")`, then `<|eom_id|>`) and the tool's
# answer; dialog 3 a custom tool call written as JSON.

# %%
dialogs = [[as_message(to_json(message)) for message in dialog] for dialog in chat.dialogs]  # as microllama's Message
prompts = [encode_dialog(dialog) for dialog in dialogs]
for i, ids in enumerate(prompts):
    check_chat_prompt(ids, i)
print(repr(tokenizer.decode(prompts[0])))

# %% [markdown]
# The reply: Meta's greedy chat completion of the 4 dialogs in one batch (stage 06's loop, as microllama's
# `Llama.generate` runs it) from your prompt ids. A reply that stops before max_gen_len stopped at a stop token,
# the next greedy pick; one that fills max_gen_len has none (its stop reason is out_of_tokens). The random tiny
# model never says `<|eot_id|>` in 16 tokens.

# %%
model = open_checkpoint("tiny").load_model(golden.manifest.model.max_seq_len, golden.manifest.model.max_batch_size)
greedy = chat.completions["greedy"]
replies, _ = Llama(model, tokenizer).generate(prompts, greedy.max_gen_len, greedy.temperature, greedy.top_p)
for i, (prompt, reply) in enumerate(zip(prompts, replies, strict=True)):
    stop = None
    if len(reply) < greedy.max_gen_len:
        with torch.inference_mode():
            stop = int(model(torch.tensor([prompt + reply]))[0, -1].argmax())
    check_reply(reply, stop, i, "greedy")
