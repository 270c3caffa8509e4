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
# # Stage 09: LoRA, fine-tuning through a low-rank update
#
# LoRA (Hu et al., 2021) freezes every weight W and trains, beside a chosen linear layer, two small matrices:
# A (rank x in) and B (out x rank), so that the layer computes W x + (alpha / rank) B A x. With rank 8 on the
# tiny model's 64 x 64 attention weights, that is 1,024 trained numbers per layer instead of 4,096; on Llama 3.1
# 8B's 4,096 x 4,096 ones, 65,536 instead of 16.8 million. A starts random (drawn as nn.Linear draws its weight)
# and B at zero, so a fresh adapter changes nothing: the model's logits stay bit for bit as they were.
#
# No golden set holds a LoRA run (Meta's reference code has no LoRA), so the oracle here is microllama's own
# (`microllama.train.lora`, what `microllama train --mode lora` uses): the same seed, the same data and the same
# loop must give the same losses and the same adapters, bit for bit.

# %%
import math

import torch
import torch.nn.functional as F
from torch import nn

from microllama.checkpoint.load import open_checkpoint
from microllama.checkpoint.tiny import cache_dir
from microllama.golden.loss_curve import RECIPE
from microllama.golden.tutorial import DEFAULT_CURVE, CheckFailed
from microllama.tokenizer import Tokenizer
from microllama.train.data import Batches, load_corpus, split_documents
from microllama.train.lora import apply_lora

RANK, ALPHA, TARGETS, STEPS = 8, 16.0, ("wq", "wk", "wv", "wo"), 4  # adapters on attention's four layers
torch.set_num_threads(1)
tokenizer = Tokenizer()
corpus = load_corpus(DEFAULT_CURVE.parents[2] / RECIPE["data"], tokenizer, cache_dir() / "data")  # as in stage 08
documents, _ = split_documents(len(corpus), 0.0, 0)


def tiny_model() -> nn.Module:
    return open_checkpoint("tiny").load_model(RECIPE["max_seq_len"]).train()  # float32


def train(model: nn.Module, adapters: list[nn.Parameter]) -> list[float]:
    """STEPS AdamW steps on the adapters alone, on the packed rows of stage 08 (2 rows of 32 tokens each)."""
    batches = Batches(corpus, documents, RECIPE["max_seq_len"], 2, 0, tokenizer.pad_id)
    optimizer = torch.optim.AdamW(adapters, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0, fused=True)
    losses = []
    for _ in range(STEPS):
        batch = batches.next_batch()
        loss = model.loss(batch.tokens, batch.targets, documents=batch.documents)  # the mean next-token loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


# %% tags=["exercise"]
# Your turn: write these functions, then run the check below.
class LoRALinear(nn.Module):
    """A frozen nn.Linear's weight plus a trainable low-rank update: W x + (alpha / rank) B A x."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        raise NotImplementedError("Stage 09 (lora): LoRALinear.__init__ is yours to write")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("Stage 09 (lora): LoRALinear.forward is yours to write")


def add_lora(model: nn.Module, rank: int, alpha: float, targets: tuple[str, ...]) -> list[nn.Parameter]:
    """Freeze every weight, then wrap each target linear layer of every block in a LoRALinear, layer by layer,
    attention's before the feed-forward's, targets in order (the order microllama draws A in); returns the
    adapters, A then B of each."""
    raise NotImplementedError("Stage 09 (lora): add_lora is yours to write")


# %% [markdown]
# The checks: a fresh adapter leaves the logits bit-identical; then STEPS steps of your LoRA against microllama's
# from the same seed.

# %%
model = tiny_model()
tokens = torch.tensor([tokenizer.encode("Once upon a time, a tiny llama", bos=True, eos=False)])
with torch.no_grad():
    before = model(tokens)
    torch.manual_seed(0)
    adapters = add_lora(model, RANK, ALPHA, TARGETS)
    after = model(tokens)
n_trained, n_frozen = (
    sum(p.numel() for p in adapters),
    sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in adapters),
)
print(f"{len(adapters) // 2} adapters: {n_trained:,} trained numbers beside {n_frozen:,} frozen ones")
if not torch.equal(before, after):
    raise CheckFailed(f"Stage 09: a fresh adapter changed the logits (max abs diff {(after - before).abs().max():g}): "
                      "B must start at zero")  # fmt: skip
print("fresh adapters: logits bit-identical to the model's without them")

yours = train(model, adapters)
oracle_model = tiny_model()
torch.manual_seed(0)
oracle_adapters = apply_lora(oracle_model, RANK, ALPHA, targets=TARGETS)
oracle = train(oracle_model, oracle_adapters)
print("your losses:        ", [f"{x:.6f}" for x in yours])
print("microllama's losses:", [f"{x:.6f}" for x in oracle])
step = next((k for k, (a, b) in enumerate(zip(yours, oracle, strict=True)) if a != b), None)
if step is not None:
    raise CheckFailed(f"Stage 09: your LoRA's loss parts from microllama's at step {step + 1}: {yours[step]!r} vs "
                      f"{oracle[step]!r} (same seed, data and loop)")  # fmt: skip
apart = [k for k, (a, b) in enumerate(zip(adapters, oracle_adapters, strict=True)) if not torch.equal(a, b)]
if apart:
    raise CheckFailed(f"Stage 09: after {STEPS} steps, adapter {apart[0]} differs from microllama's")
print(f"LoRA, {STEPS} steps: losses and adapters bit-identical to microllama.train.lora's from the same seed")
