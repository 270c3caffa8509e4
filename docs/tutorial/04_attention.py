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
# # Stage 04: attention, with grouped-query heads, the causal mask and the KV cache
#
# Each token's normalised vector is projected to queries (n_heads heads), keys and values (n_kv_heads heads each:
# grouped-query attention, where n_heads // n_kv_heads query heads share one key and value head). Queries and keys
# are turned by RoPE (stage 03). A query's scores are its dot products with the keys divided by sqrt(head_dim); the
# causal mask puts -inf on keys after the query's own position; a softmax (in float32) makes them weights of the
# values; the heads, side by side, are mixed back to dim by wo.
#
# Generating, a model sees one new token at a time: the keys and values of earlier positions are kept in a KV cache
# instead of being computed again, and the new queries attend over all of them.

# %%
import math

import torch

from microllama.checkpoint.load import open_checkpoint
from microllama.golden.tutorial import check, prompt_ids, recorded
from microllama.model import precompute_freqs_cis

ckpt = open_checkpoint("tiny")
args = ckpt.args  # dim 64, n_heads 4, n_kv_heads 2, head_dim 16
weights = ckpt.read_state_dict(dtype=torch.float32)  # stored in bfloat16; the golden set ran float32
w = {n: weights[f"layers.0.attention.{n}.weight"] for n in ("wq", "wk", "wv", "wo")}
# Stage 03's rotations, from microllama: complex64 (positions, head_dim // 2).
table = precompute_freqs_cis(args.head_dim, 2 * 9256, args.rope_theta, args.use_scaled_rope, scaling=args.rope_scaling)


def rotate(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Stage 03: x (positions, heads, head_dim), each pair turned by its position's angle."""
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(pairs * table[:, None, :]).flatten(-2).type_as(x)


# %% tags=["solution"]
def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(positions, n_kv_heads, head_dim) -> (positions, n_kv_heads * n_rep, head_dim): kv head j serves query heads
    j * n_rep .. (j + 1) * n_rep - 1, so each is repeated n_rep times in place."""
    return x.repeat_interleave(n_rep, dim=1)


def causal_mask(n: int, start: int) -> torch.Tensor:
    """(n, start + n): 0 where query start + i may see key j (j <= start + i), else -inf."""
    later = torch.triu(torch.full((n, n), float("-inf")), diagonal=1)  # keys after the query, among the new ones
    return torch.hstack([torch.zeros(n, start), later])  # every cached key is earlier


def attention(x: torch.Tensor, start: int, cache: dict) -> torch.Tensor:
    """Layer 0's attention for x (positions, dim) at positions start..: (positions, dim). cache holds the keys and
    values of the positions before start ({} at first) and gains those of x."""
    n, hd = x.shape[0], args.head_dim
    q = rotate((x @ w["wq"].T).view(n, args.n_heads, hd), table[start : start + n])
    k = rotate((x @ w["wk"].T).view(n, args.n_kv_heads, hd), table[start : start + n])
    v = (x @ w["wv"].T).view(n, args.n_kv_heads, hd)
    cache["k"] = torch.cat([cache["k"], k]) if cache else k  # (start + n, n_kv_heads, head_dim)
    cache["v"] = torch.cat([cache["v"], v]) if "v" in cache else v
    rep = args.n_heads // args.n_kv_heads
    keys = repeat_kv(cache["k"], rep).transpose(0, 1)  # heads first: (n_heads, start + n, head_dim)
    values = repeat_kv(cache["v"], rep).transpose(0, 1)
    scores = q.transpose(0, 1) @ keys.transpose(1, 2) / math.sqrt(hd)  # (n_heads, n, start + n)
    if n > 1:  # one new token sees every key: no mask
        scores = scores + causal_mask(n, start)
    probs = torch.softmax(scores.float(), dim=-1)
    return (probs @ values).transpose(0, 1).reshape(n, -1) @ w["wo"].T


# %% [markdown]
# The check: the first block's attention on Meta's recorded attention norm of prompt 5 (59 positions, no cache);
# then the long-range case: 9,000 positions prefilled into the cache 512 at a time, as the recording did, and one
# decode step at position 9,000.

# %%
check("layers.0.attention", attention(recorded("layers.0.attention_norm", 5), 0, {}), 5)

ids = torch.tensor(prompt_ids("long-range"))
x = weights["tok_embeddings.weight"][ids]  # layer 0 input: the attention norm of the embeddings, in Meta's order
x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + args.norm_eps) * weights["layers.0.attention_norm.weight"]
cache: dict = {}
for start in range(0, len(ids) - 1, 512):
    attention(x[start : min(start + 512, len(ids) - 1)], start, cache)
check("layers.0.attention", attention(x[-1:], len(ids) - 1, cache), "long-range")
