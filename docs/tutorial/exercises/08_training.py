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
# # Stage 08: training a tiny model on the shipped corpus
#
# Training asks the model, at every position, for the next token: the logits at position i are scored by
# cross-entropy against token i + 1, so the targets are the tokens shifted left by one. Documents are packed
# end to end into rows of max_seq_len tokens (no padding wasted between them): each document is
# `<|begin_of_text|>` text `<|end_of_text|>`, its positions restart at 0, attention stays inside it (a
# block-causal mask, pictured below), and its last token targets nothing, so no document is asked
# to guess the next one's first token. Ignored targets are -100, cross-entropy's `ignore_index`. A document
# longer than a row is cut into pieces of max_seq_len tokens, each packed as a document of its own.
#
# The loop is nanoGPT's: a batch, forward, the loss (summed over the step's targets, divided by their number),
# backward, the gradient's global norm clipped to 1, an AdamW step at a learning rate that warms up linearly and
# then follows a cosine down to min_lr.
#
# ![The attention mask of a packed row of 3 documents](../images/packed_mask.svg)
#
# The check: the loss-curve golden `goldens/losses/tiny-fp32-cpu-ws1.json`, 20 steps of this recipe recorded by
# microllama's trainer, whose steps reproduce Meta's own model and AdamW bit for bit on the training golden sets
# (`goldens/train-tiny-*`, 4 steps each): your first steps' losses and gradient norms must be its numbers.
#
# ![The loss-curve golden: 20 steps of the tiny model](../images/loss_curve.svg)

# %%
import math

import torch
import torch.nn.functional as F

from microllama.checkpoint.load import open_checkpoint
from microllama.checkpoint.tiny import cache_dir
from microllama.golden.loss_curve import RECIPE
from microllama.golden.tutorial import DEFAULT_CURVE, check_losses
from microllama.tokenizer import Tokenizer
from microllama.train.data import Batches, load_corpus, split_documents

STEPS = 8  # of the golden's 20: a few seconds on a CPU
recipe = RECIPE  # 2 rows of 32 tokens a step, lr 1e-3 after 2 warmup steps, cosine to 1e-4 at step 20, seed 0
torch.set_num_threads(1)  # the curve was recorded at 1 thread: the same sums in the same order, the same bits
tokenizer = Tokenizer()
corpus = load_corpus(DEFAULT_CURVE.parents[2] / recipe["data"], tokenizer, cache_dir() / "data")  # tokenized once
# microllama's packing: the documents in a seeded order, each into the first of the last 8 rows with room for it.
documents, _ = split_documents(len(corpus), recipe["eval_fraction"], recipe["seed"])  # all of them: none held out
packing = Batches(corpus, documents, recipe["max_seq_len"], recipe["batch_size"], recipe["seed"],
                  tokenizer.pad_id).packing(0)  # fmt: skip
rows = [[corpus.document(d)[0][start:end].tolist() for d, start, end in row] for row in packing.rows]
shown = next(i for i, row in enumerate(rows) if len(row) >= 3)
print(f"{len(corpus)} documents in {len(rows)} rows of {recipe['max_seq_len']} tokens; row {shown} holds pieces of",
      [len(piece) for piece in rows[shown]], "tokens:", [tokenizer.decode(piece) for piece in rows[shown]])  # fmt: skip

model = open_checkpoint(recipe["ckpt_dir"]).load_model(recipe["max_seq_len"]).train()  # float32
model.output.weight = torch.nn.Parameter(model.output.weight.detach().clone())  # the output layer trains untied


# %% tags=["exercise"]
# Your turn: write these functions, then run the check below.
def row_tensors(pieces: list[list[int]], seq_len: int, pad_id: int) -> tuple[torch.Tensor, ...]:
    """One packed row: tokens, targets (the next token of the same piece, -100 where none) and which piece each
    position is in (padding a piece of its own), each (seq_len,)."""
    raise NotImplementedError("Stage 08 (training): row_tensors is yours to write")


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of logits (rows, positions, vocab) against targets (rows, positions): summed over the
    targets that are not -100, divided by their number."""
    raise NotImplementedError("Stage 08 (training): next_token_loss is yours to write")


def lr_at(step: int) -> float:
    """The learning rate of step (0-based): linear warmup to lr over warmup_steps, then cosine to min_lr."""
    raise NotImplementedError("Stage 08 (training): lr_at is yours to write")


def train(steps: int) -> tuple[list[float], list[float]]:
    """steps AdamW steps (betas 0.9, 0.95, no weight decay, gradients clipped to norm 1) on batch_size rows each,
    in order: each step's loss and its gradient norm before clipping."""
    raise NotImplementedError("Stage 08 (training): train is yours to write")


# %% [markdown]
# The check: the first STEPS steps against the golden, every loss and gradient norm.

# %%
losses, norms = train(STEPS)
for step, (loss, norm) in enumerate(zip(losses, norms, strict=True), 1):
    print(f"step {step}: loss {loss:.4f}, grad norm {norm:.4f}, lr {lr_at(step - 1):.2e}")
check_losses(losses, norms)

# %% [markdown]
# Your steps drawn over the golden's 20 (the picture above is `tools/make_figures.py`'s, from the same file).

# %%
import matplotlib.pyplot as plt  # noqa: E402 (the plot extra: pip install matplotlib)

from microllama.golden.loss_curve import read_golden  # noqa: E402

golden_steps = read_golden(DEFAULT_CURVE).steps
fig, ax = plt.subplots(figsize=(6, 3))
ax.plot([s.step for s in golden_steps], [s.loss for s in golden_steps], color="0.6", label="the golden (20 steps)")
ax.plot(range(1, len(losses) + 1), losses, "o", color="C0", label=f"yours ({len(losses)} steps)")
ax.set(xlabel="step", ylabel="training loss (nats per token)", title="Stage 08: the tiny model's first steps")
ax.legend()
plt.show()
