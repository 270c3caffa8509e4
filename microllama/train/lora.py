"""LoRA (Hu et al., 2021): a frozen weight W plus a trainable low-rank update, W x + (alpha / r) B A x. W may be
quantized (QLoRA, Dettmers et al., 2023: NF4, microllama.quantize): its linear dequantizes it, then multiplies.

A is (r, in) and drawn like nn.Linear's weight; B is (out, r) and starts at zero, so a fresh adapter leaves
the model's output bit for bit as it was. `merge` folds B A into W and gives back plain nn.Linear layers
(Meta's names and layout again); `adapter_state_dict` and `load_adapters` save and restore the adapters alone.
"""

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..args import is_int
from ..files import StateDict
from ..model import Transformer
from ..quantize import dequantize_weight

TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")  # attention's and the feed-forward's linear layers


class LoRALinear(nn.Module):
    """nn.Linear's frozen `weight` (same name, same dtype) with adapters lora_a, lora_b in adapter_dtype."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float, adapter_dtype: torch.dtype):
        super().__init__()
        self.weight = base.weight
        self.weight.requires_grad_(False)
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout)
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, dtype=adapter_dtype, device=base.weight.device))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, dtype=adapter_dtype, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # nn.Linear's own initialisation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight)
        # The update in the adapters' dtype, cast back: with B zero it is exactly zero, and out stays as it was.
        update = F.linear(F.linear(self.dropout(x).to(self.lora_a.dtype), self.lora_a), self.lora_b) * self.scale
        return out + update.to(out.dtype)

    def merged(self) -> nn.Linear:
        """An nn.Linear holding W + (alpha / r) B A, in W's dtype (W dequantized, under QLoRA)."""
        linear = nn.Linear(self.weight.shape[1], self.weight.shape[0], bias=False, device="meta")
        delta = (self.lora_b.detach().float() @ self.lora_a.detach().float()) * self.scale
        weight = dequantize_weight(self.weight)
        linear.weight = nn.Parameter((weight.float() + delta).to(weight.dtype), requires_grad=False)
        return linear


def _linears(model: Transformer, targets: Sequence[str]) -> list[tuple[nn.Module, str]]:
    """(parent module, attribute) of each target linear layer of every block."""
    return [
        (parent, name)
        for layer in model.layers
        for parent in (layer.attention, layer.feed_forward)
        for name in targets
        if hasattr(parent, name)
    ]


def check_lora(rank: int, alpha: float, dropout: float, targets: Sequence[str]) -> None:
    """ValueError for settings no model can take: rank < 1, alpha not positive, dropout outside [0, 1), or a
    target that is not one of TARGETS."""
    if not is_int(rank) or rank < 1:
        raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}")
    if not alpha > 0:
        raise ValueError(f"LoRA alpha must be positive, got {alpha!r}")
    if not 0 <= dropout < 1:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout!r}")
    unknown = [t for t in targets if t not in TARGETS]
    if unknown or not targets:
        raise ValueError(f"unknown LoRA target module {unknown[0] if unknown else 'list (empty)'}: expected some of "
                         f"{', '.join(TARGETS)}")  # fmt: skip


def apply_lora(
    model: Transformer,
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    targets: Sequence[str] = ("wq", "wv"),
    adapter_dtype: torch.dtype = torch.float32,
) -> list[nn.Parameter]:
    """Freeze every weight of model and put adapters on the target layers of every block; returns the adapters."""
    check_lora(rank, alpha, dropout, targets)
    model.requires_grad_(False)
    adapters = []
    for parent, name in _linears(model, targets):
        lora = LoRALinear(getattr(parent, name), rank, alpha, dropout, adapter_dtype)
        setattr(parent, name, lora)
        adapters += [lora.lora_a, lora.lora_b]
    return adapters


def merge_lora(model: Transformer) -> Transformer:
    """Fold every adapter into its weight, in place: model is a plain Transformer again (Meta's state_dict keys)."""
    for parent, name in _linears(model, TARGETS):
        module = getattr(parent, name)
        if isinstance(module, LoRALinear):
            setattr(parent, name, module.merged())
    return model


def adapter_state_dict(model: Transformer) -> StateDict:
    """The adapters alone, under their names in the model (layers.0.attention.wq.lora_a, ...)."""
    return {k: v for k, v in model.state_dict().items() if k.rsplit(".", 1)[-1] in ("lora_a", "lora_b")}


def load_adapters(model: Transformer, adapters: StateDict) -> None:
    """Copy saved adapters into a model that apply_lora gave the same adapters; ValueError naming the first
    missing, unexpected or mis-shaped one."""
    own = adapter_state_dict(model)
    for what, keys in (("missing", own.keys() - adapters.keys()), ("unexpected", adapters.keys() - own.keys())):
        if keys:
            raise ValueError(f"{what} LoRA adapter {sorted(keys)[0]} ({len(keys)} {what}): another rank or targets?")
    for key, t in adapters.items():
        if t.shape != own[key].shape:
            raise ValueError(f"LoRA adapter {key} has shape {tuple(t.shape)}, the model's {tuple(own[key].shape)}")
        own[key].copy_(t)
