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
# # Stage 06: generation (greedy, top-p, stop tokens) with the KV cache
#
# A model gives, for each position, logits over the next token. Generating is a loop: run the prompt once
# (the prefill, which fills the KV cache), pick a token from the last position's logits, feed that one token at its
# position (the cache holds the keys and values of everything before it), pick again, until a stop token or
# max_gen_len new tokens.
#
# Meta's loop (llama-models' `Llama3.generate`) runs a batch of prompts of different lengths together: the ids go
# into one buffer padded on the right with pad_id, the prefill runs up to the shortest prompt's length, and from
# there one position at a time for every row; a row still inside its own prompt keeps its prompt's token there
# instead of the one picked. Greedy picks the largest logit. Top-p (nucleus) sampling divides the logits by a
# temperature, sorts the probabilities, keeps the most likely tokens until the mass *before* a token exceeds p,
# renormalises and draws one (`torch.multinomial`); Meta seeds torch's generator, so a seeded batch draws the
# same tokens on any CPU.

# %%
import torch

from microllama.checkpoint.load import open_checkpoint
from microllama.golden.tutorial import check_completion, golden_set
from microllama.tokenizer import Tokenizer

golden = golden_set()
m = golden.manifest  # its completions: the greedy batch (4 prompts) and the seeded top-p batch (3 prompts)
tokenizer = Tokenizer()
# Meta's model size for the recording: a KV cache of max_batch_size rows x max_seq_len positions, float32.
model = open_checkpoint("tiny").load_model(m.model.max_seq_len, m.model.max_batch_size)


# %% tags=["solution"]
def sample_top_p(probs: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """Nucleus sampling: probs (bsz, vocab) -> one id per row (bsz,), from the smallest set of most likely tokens
    whose mass reaches p, renormalised."""
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    sorted_probs[mass_before > p] = 0.0
    sorted_probs.div_(sorted_probs.sum(dim=-1, keepdim=True))
    return torch.gather(order, -1, torch.multinomial(sorted_probs, 1, generator=generator))[:, 0]


@torch.inference_mode()
def generate(prompts: list[list[int]], max_gen_len: int, temperature: float, top_p: float,
             stop_tokens: list[int], generator: torch.Generator) -> list[list[int]]:  # fmt: skip
    """Meta's batched loop: each prompt's completion, at most max_gen_len ids, cut before its first stop token."""
    lens = [len(p) for p in prompts]
    total = max(lens) + max_gen_len
    tokens = torch.full((len(prompts), total), tokenizer.pad_id)
    for row, p in enumerate(prompts):
        tokens[row, : len(p)] = torch.tensor(p)
    in_prompt = tokens != tokenizer.pad_id
    stops = torch.tensor(stop_tokens)
    done = torch.zeros(len(prompts), dtype=torch.bool)
    prev = 0
    with model.kv_cache(m.model.max_batch_size, m.model.max_seq_len):
        for cur in range(min(lens), total):
            logits = model(tokens[:, prev:cur], prev)[:, -1]  # positions prev..cur-1 in, the next token's logits out
            if temperature > 0:
                picked = sample_top_p(torch.softmax(logits / temperature, dim=-1), top_p, generator)
            else:
                picked = logits.argmax(dim=-1)
            tokens[:, cur] = torch.where(in_prompt[:, cur], tokens[:, cur], picked)
            done |= ~in_prompt[:, cur] & torch.isin(tokens[:, cur], stops)
            prev = cur
            if done.all():
                break
    completions = []
    for row, p in enumerate(prompts):
        out = tokens[row, len(p) : len(p) + max_gen_len].tolist()
        completions.append(next((out[:k] for k, t in enumerate(out) if t in stop_tokens), out))
    return completions


# %% [markdown]
# The check: each batch the golden set recorded, with its settings, against the ids Meta's `generate` made. (The
# tiny checkpoint's weights are random: its text is noise from all over the vocabulary, so only ids are shown.)

# %%
for kind, s in m.completions.items():
    prompts = [tokenizer.encode(text, bos=True, eos=False) for text in s.prompts]
    seeded = torch.Generator().manual_seed(s.seed if s.seed is not None else 0)  # Meta: torch.manual_seed(seed)
    completions = generate(prompts, s.max_gen_len, s.temperature, s.top_p, tokenizer.stop_tokens, seeded)
    print(f"{kind} (temperature {s.temperature}): {s.prompts[0]!r} -> {completions[0]}")
    for i, ids in enumerate(completions):
        check_completion(ids, i, kind)

# %% [markdown]
# Stop tokens: a base model ends a text with `<|end_of_text|>`, a chat model ends its turn with `<|eot_id|>` or a
# tool call with `<|eom_id|>`; generation stops at any of them and the stop token is not part of the completion.
# The random tiny model never makes one in 16 steps, so here the 6th greedy token of prompt 0 is made a stop
# token: the completion must end before it.

# %%
greedy = m.completions["greedy"]
first = [tokenizer.encode(greedy.prompts[0], bos=True, eos=False)]
recorded = golden.outputs.completions["greedy"][0]
stopped = generate(first, greedy.max_gen_len, 0.0, greedy.top_p, [recorded[5]], torch.Generator())[0]
print(f"with {recorded[5]} as the stop token: {stopped}")
if stopped != recorded[:5]:
    raise ValueError(f"Stage 06: generation with stop token {recorded[5]} gave {stopped}, expected {recorded[:5]}")

# %% [markdown]
# Why a prompt must not end in a space: the byte-pair pieces carry their leading space (" Paris" is one piece),
# so a trailing space becomes a piece of its own, " " (220), after which the model must continue with a word
# *without* its space, which it rarely saw in training. Leave the space to the model.

# %%
for text in ("The capital of France is", "The capital of France is ", " Paris", "Paris"):
    ids = tokenizer.encode(text, bos=False, eos=False)
    print(f"{text!r:28} -> {ids}  {[tokenizer.decode([t]) for t in ids]}")
