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
# # Stage 02: the embedding and RMSNorm
#
# A token id becomes a vector by picking a row of `tok_embeddings.weight` (vocab_size x dim). Before attention and
# before the feed-forward, each block normalises its input with RMSNorm: each vector divided by its root mean square
# (no mean subtracted, no bias), then scaled feature by feature by a learned gain. The epsilon sits *inside* the
# square root, so a vector of zeros stays finite. Llama 3.1 normalises in float32 and casts back before the gain.

# %%
import torch

from microllama.checkpoint.load import open_checkpoint
from microllama.golden.tutorial import check, prompt_ids, recorded

ckpt = open_checkpoint("tiny")  # the tiny checkpoint the golden set was recorded with: dim 64, 2 layers
weights = ckpt.read_state_dict(dtype=torch.float32)  # Meta's names: tok_embeddings.weight, ...
eps = ckpt.args.norm_eps


# %% tags=["exercise"]
# Your turn: write these functions, then run the check below.
def embed(ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Token ids (positions,) -> their rows of the embedding table, (positions, dim)."""
    raise NotImplementedError("Stage 02 (embedding rmsnorm): embed is yours to write")


def rms_norm(x: torch.Tensor, gain: torch.Tensor, eps: float) -> torch.Tensor:
    """x (..., dim) divided by its root mean square over dim (eps inside the root), times gain (dim,)."""
    raise NotImplementedError("Stage 02 (embedding rmsnorm): rms_norm is yours to write")


# %% [markdown]
# The check: the embedding of prompt 0's ids, then the first block's attention norm and the model's final norm,
# each fed Meta's recorded input, so that this stage is checked on its own.

# %%
ids = torch.tensor(prompt_ids(0))
check("tok_embeddings", embed(ids, weights["tok_embeddings.weight"]))
check("layers.0.attention_norm", rms_norm(recorded("tok_embeddings"), weights["layers.0.attention_norm.weight"], eps))
check("norm", rms_norm(recorded("layers.1"), weights["norm.weight"], eps))
