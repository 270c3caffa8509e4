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
# # Stage 03: RoPE, with Llama 3.1's frequency scaling
#
# Attention compares queries with keys by dot products, which know nothing of order. RoPE gives them order: it
# reads each head's features as pairs (x0, x1), (x2, x3), ..., each pair a complex number x0 + i x1, and turns pair
# k of the token at position t by the angle t * freq_k, with freq_k = theta ** (-2k / head_dim). The dot product of
# a turned query and a turned key then depends only on how far apart the two tokens are.
#
# Llama 3.1 stretches the slow frequencies so that a model trained on 8,192 positions reads 128K: a pair whose
# wavelength 2 pi / freq is longer than original_context / low_freq_factor (8192) turns `factor` (8) times slower;
# one shorter than original_context / high_freq_factor (2048) is kept; between the two bands the frequency moves
# smoothly from one to the other.
#
# ![RoPE wavelengths of Llama 3.1 8B before and after scaling](../images/rope_wavelengths.svg)
#
# The picture (`tools/make_figures.py`) shows Llama 3.1 8B's 64 pairs (head_dim 128); the tiny model below has 8.

# %%
import math

import torch

from microllama.checkpoint.load import open_checkpoint
from microllama.golden.tutorial import check, prompt_ids, recorded
from microllama.model import causal_mask

ckpt = open_checkpoint("tiny")
args = ckpt.args  # head_dim 16, rope_theta 500000, use_scaled_rope, rope_scaling (factor 8, low 1, high 4, 8192)
weights = ckpt.read_state_dict(dtype=torch.float32)  # stored in bfloat16; the golden set ran float32


# %% tags=["solution"]
def rope_frequencies(head_dim: int, theta: float, factor: float, low: float, high: float, context: int) -> torch.Tensor:
    """Each pair's frequency, (head_dim // 2,) float32, with Llama 3.1's scaling."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
    wavelen = 2 * math.pi / freqs
    slow = torch.where(wavelen > context / low, freqs / factor, freqs)  # the long wavelengths stretched
    smooth = (context / wavelen - low) / (high - low)  # 0 at the slow band's edge, 1 at the fast band's
    between = (wavelen >= context / high) & (wavelen <= context / low)
    return torch.where(between, (1 - smooth) * slow / factor + smooth * slow, slow)


def rope_table(freqs: torch.Tensor, n_positions: int) -> torch.Tensor:
    """e^(i t freq) for positions t < n_positions: complex64 (n_positions, head_dim // 2)."""
    angles = torch.outer(torch.arange(n_positions, dtype=torch.float32), freqs)
    return torch.polar(torch.ones_like(angles), angles)


def rotate(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """x (positions, heads, head_dim), each pair turned by its position's angle: the same shape."""
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))  # (positions, heads, head_dim // 2)
    return torch.view_as_real(pairs * table[:, None, :]).flatten(-2).type_as(x)


# %% [markdown]
# The three bands of the tiny model's 8 frequencies (head_dim 16): which are kept, stretched, or in between.

# %%
s = args.rope_scaling
freqs = rope_frequencies(args.head_dim, args.rope_theta, s.factor, s.low_freq_factor, s.high_freq_factor,
                         s.original_context)  # fmt: skip
plain = 1.0 / (args.rope_theta ** (torch.arange(0, args.head_dim, 2).float() / args.head_dim))
for k, (before, after) in enumerate(zip(plain.tolist(), freqs.tolist(), strict=True)):
    print(f"pair {k}: wavelength {2 * math.pi / before:12.1f} -> {2 * math.pi / after:12.1f} positions")


# %% [markdown]
# The check: attention in the first block (given below, Meta's computation, with your `rotate` and table) on
# Meta's recorded attention norm of prompt 5, then on the long-range case, one token at position 9,000 after the
# 9,000 before it, where the stretched frequencies matter most.


# %%
def attention_layer0(x: torch.Tensor, table: torch.Tensor, start: int, cache: dict) -> torch.Tensor:
    """Layer 0's attention for x (positions, dim) at positions start.., keys and values kept in cache."""
    w = {n: weights[f"layers.0.attention.{n}.weight"] for n in ("wq", "wk", "wv", "wo")}
    n, hd = x.shape[0], args.head_dim
    q = rotate((x @ w["wq"].T).view(n, -1, hd), table[start : start + n])
    k = rotate((x @ w["wk"].T).view(n, -1, hd), table[start : start + n])
    cache["k"] = torch.cat([cache.get("k", k[:0]), k])
    cache["v"] = torch.cat([cache.get("v", k[:0]), (x @ w["wv"].T).view(n, -1, hd)])
    rep = args.n_heads // args.n_kv_heads
    keys, values = (t.repeat_interleave(rep, dim=1).transpose(0, 1) for t in (cache["k"], cache["v"]))
    scores = q.transpose(0, 1) @ keys.transpose(1, 2) / math.sqrt(hd)
    mask, _ = causal_mask(n, start, False, scores)
    probs = torch.softmax(scores + (0 if mask is None else mask), dim=-1)
    return (probs @ values).transpose(0, 1).reshape(n, -1) @ w["wo"].T


table = rope_table(freqs, 2 * 9256)
check("layers.0.attention", attention_layer0(recorded("layers.0.attention_norm", 5), table, 0, {}), 5)

ids = torch.tensor(prompt_ids("long-range"))
x = weights["tok_embeddings.weight"][ids]  # layer 0 input: the attention norm of the embeddings, in Meta's order
x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + args.norm_eps) * weights["layers.0.attention_norm.weight"]
cache: dict = {}
for start in range(0, len(ids) - 1, 512):  # the recording's prefill, 512 positions at a time
    attention_layer0(x[start : min(start + 512, len(ids) - 1)], table, start, cache)
check("layers.0.attention", attention_layer0(x[-1:], table, len(ids) - 1, cache), "long-range")
