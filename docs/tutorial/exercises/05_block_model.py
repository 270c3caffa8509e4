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
# # Stage 05: the feed-forward (SwiGLU), the block and the whole model
#
# After attention, each position goes through a feed-forward network on its own: SwiGLU, where silu(w1 x) gates
# w3 x feature by feature and w2 brings the hidden size back to dim. Its hidden size follows Meta's rule: 2/3 of
# 4 * dim (so that three matrices cost what two of 4 * dim would), times ffn_dim_multiplier, rounded up to a
# multiple of multiple_of.
#
# A block is pre-norm and residual: h = x + attention(attention_norm(x)), then h + feed_forward(ffn_norm(h)). The
# model is the embedding, n_layers blocks, a final RMSNorm and the output layer (dim -> vocab_size logits).

# %%
import torch

from microllama.checkpoint.load import open_checkpoint
from microllama.golden.tutorial import check, prompt_ids, recorded
from microllama.model import causal_mask

ckpt = open_checkpoint("tiny")
args = ckpt.args  # dim 64, n_layers 2, multiple_of 32, ffn_dim_multiplier 1.3
model = ckpt.load_model(max_seq_len=args.max_seq_len)  # stages 02 to 04, as microllama's modules, in float32
weights = {name: p.detach() for name, p in model.state_dict().items()}


# %% tags=["exercise"]
# Your turn: write these functions, then run the check below.
def ffn_hidden_dim(dim: int, multiple_of: int, multiplier: float) -> int:
    """The SwiGLU hidden size: int(2/3 of 4 * dim), times the multiplier (truncated), rounded up to multiple_of."""
    raise NotImplementedError("Stage 05 (block model): ffn_hidden_dim is yours to write")


def feed_forward(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    """SwiGLU: (positions, dim) -> (positions, dim)."""
    raise NotImplementedError("Stage 05 (block model): feed_forward is yours to write")


def block(x: torch.Tensor, i: int) -> torch.Tensor:
    """Block i on x (positions, dim) from position 0, with microllama's norms and attention and your feed-forward."""
    raise NotImplementedError("Stage 05 (block model): block is yours to write")


def final_hidden(ids: torch.Tensor) -> torch.Tensor:
    """Token ids (positions,) -> the final norm's output (positions, dim): embedding, every block, final norm."""
    raise NotImplementedError("Stage 05 (block model): final_hidden is yours to write")


# %% [markdown]
# The check: the hidden size against the checkpoint's w1; the first block's feed-forward on Meta's recorded
# ffn_norm of prompt 5; both blocks on their recorded inputs; then the whole model from prompt 5's ids to the final
# norm, whose output times the output layer is the logits.

# %%
hidden = ffn_hidden_dim(args.dim, args.multiple_of, args.ffn_dim_multiplier)
print(f"SwiGLU hidden size {hidden}; the checkpoint's w1 is {tuple(weights['layers.0.feed_forward.w1.weight'].shape)}")
if weights["layers.0.feed_forward.w1.weight"].shape != (hidden, args.dim):
    raise ValueError(f"ffn_hidden_dim gives {hidden}: the checkpoint's feed-forward has another size")
ff0 = {name: weights[f"layers.0.feed_forward.{name}.weight"] for name in ("w1", "w2", "w3")}
with torch.inference_mode():
    check("layers.0.feed_forward", feed_forward(recorded("layers.0.ffn_norm", 5), ff0["w1"], ff0["w2"], ff0["w3"]), 5)
    check("layers.0", block(recorded("tok_embeddings", 5), 0), 5)
    check("layers.1", block(recorded("layers.0", 5), 1), 5)
    h = final_hidden(torch.tensor(prompt_ids(5)))
    check("norm", h, 5)
    print("the next token after prompt 5, greedily:", int((h[-1] @ weights["output.weight"].T).argmax()))
