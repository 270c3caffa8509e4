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
# # Stage 01: the tokenizer and its special tokens
#
# Llama 3.1 reads text as ids of a byte-pair encoding with 128,000 pieces (tiktoken, with a split pattern that keeps
# numbers to at most three digits), followed by 256 special tokens: `<|begin_of_text|>` is 128000, and the chat
# format's headers and end-of-turn markers come after it. Every prompt starts with `<|begin_of_text|>` (BOS).
# Text that looks like a special token is encoded as plain text unless you ask otherwise: a user cannot type one.

# %%
from microllama.golden.tutorial import PROMPT_IDS, check, golden_set
from microllama.tokenizer import SPECIAL_TOKENS, Tokenizer

tokenizer = Tokenizer()  # Meta's tokenizer.model, shipped with microllama
bpe = tokenizer.model  # a tiktoken.Encoding: bpe.encode(text) gives the byte-pair ids, no special tokens
n_base = bpe.n_vocab - len(SPECIAL_TOKENS)  # 128,000 byte-pair pieces


# %% tags=["solution"]
def special_token_id(name: str) -> int:
    """A special token's id: they are numbered after the byte-pair pieces, in the order of SPECIAL_TOKENS."""
    return n_base + SPECIAL_TOKENS.index(name)


def encode_prompt(text: str) -> list[int]:
    """A prompt's ids as Llama 3.1 reads them: BOS, then the byte-pair ids of the text."""
    return [special_token_id("<|begin_of_text|>"), *bpe.encode(text, disallowed_special=())]


# %% [markdown]
# The check: each of the golden set's prompts (one of them empty, one with newlines and French) against the ids
# Meta's tokenizer gave.

# %%
print(
    "<|begin_of_text|> is", special_token_id("<|begin_of_text|>"), "and <|eot_id|> is", special_token_id("<|eot_id|>")
)
for case, text in enumerate(golden_set().manifest.prompts):
    check(PROMPT_IDS, encode_prompt(text), case)
