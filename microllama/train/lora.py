"""LoRA (Hu et al., 2021): a frozen weight W plus a trainable low-rank update, W x + (alpha / r) B A x. W may be
quantized (QLoRA, Dettmers et al., 2023: NF4, microllama.quantize): its linear dequantizes it, then multiplies.

A is (r, in) and drawn like nn.Linear's weight; B is (out, r) and starts at zero, so a fresh adapter leaves
the model's output bit for bit as it was. `merge_lora` folds B A into W and gives back plain nn.Linear layers
(Meta's names and layout again); `merge_lora_state_dict` does the same to a whole state dict (a data-parallel
job's, gathered from its ranks); `adapter_state_dict` and `load_adapters` save and restore the adapters alone.
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


class RowsDropout(nn.Module):
    """Dropout on this rank's block of a global batch's rows, with the mask the whole batch draws: each of
    world_size ranks draws the mask of all world_size x its rows (every rank's generator is in the same state) and
    keeps its own rows, so a data-parallel job drops what one process does. One rank: nn.Dropout's arithmetic."""

    def __init__(self, p: float, rank: int = 0, world_size: int = 1):
        super().__init__()
        self.p, self.rank, self.world_size = p, rank, world_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        n = x.shape[0]
        keep = x.new_empty((n * self.world_size, *x.shape[1:])).bernoulli_(1 - self.p)
        return x * keep[self.rank * n : (self.rank + 1) * n].div_(1 - self.p)


def fold(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> torch.Tensor:
    """W + scale B A, computed in float32 and returned in W's dtype (a quantized W dequantized first)."""
    weight = dequantize_weight(weight)
    delta = (lora_b.detach().float() @ lora_a.detach().float()) * scale
    return (weight.float() + delta).to(weight.dtype)


def fold_shard(block: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float, dim: int | None,
               rows: tuple[int, int]) -> torch.Tensor:  # fmt: skip
    """fold() on a block of W: its rows [start, stop) of dim 0 (only those rows of B count) or of dim 1 (only
    those columns of A), the adapters whole; dim None: the whole W."""
    part = slice(*rows)
    if dim == 0:
        lora_b = lora_b[part]
    elif dim == 1:
        lora_a = lora_a[:, part]
    return fold(block, lora_a, lora_b, scale)


class LoRALinear(nn.Module):
    """nn.Linear's frozen `weight` (same name, same dtype) with adapters lora_a, lora_b in adapter_dtype. Dropout
    on its input: of this rank's rows of a global batch split over world_size ranks (RowsDropout)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float, adapter_dtype: torch.dtype,
                 rows_of: tuple[int, int] = (0, 1)):  # fmt: skip
        super().__init__()
        self.weight = base.weight
        self.weight.requires_grad_(False)
        self.scale = alpha / rank
        self.dropout = RowsDropout(dropout, *rows_of)
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, dtype=adapter_dtype, device=base.weight.device))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, dtype=adapter_dtype, device=base.weight.device))
        draw_a(self.lora_a)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight)
        # The update in the adapters' dtype, cast back: with B zero it is exactly zero, and out stays as it was.
        update = F.linear(F.linear(self.dropout(x).to(self.lora_a.dtype), self.lora_a), self.lora_b) * self.scale
        return out + update.to(out.dtype)

    def merged(self) -> nn.Linear:
        """An nn.Linear holding W + (alpha / r) B A, in W's dtype (W dequantized, under QLoRA)."""
        linear = nn.Linear(self.weight.shape[1], self.weight.shape[0], bias=False, device="meta")
        linear.weight = nn.Parameter(fold(self.weight, self.lora_a, self.lora_b, self.scale), requires_grad=False)
        return linear


def draw_a(a: torch.Tensor) -> torch.Tensor:
    """A's initialisation, in place: nn.Linear's own (on the meta device it draws nothing)."""
    return nn.init.kaiming_uniform_(a, a=math.sqrt(5))


def draw_sharded_adapters(
    model: Transformer, targets: Sequence[str], rows: dict[str, tuple[int, torch.Tensor]]
) -> None:
    """The adapters of a model that apply_lora changed on the meta device and FSDP2 then sharded, drawn as
    apply_lora draws them in one process: every A whole, layer by layer in the same order from the current random
    state, B zero; each rank keeps its rows (rows: a parameter's name -> its first row and local tensor, as
    microllama.distributed.data_parallel.shard_rows gives them). Call under torch.no_grad()."""
    names = {module: name for name, module in model.named_modules()}
    for parent, attribute in _linears(model, targets):
        name = f"{names[parent]}.{attribute}"
        (first, a), (_, b) = rows[f"{name}.lora_a"], rows[f"{name}.lora_b"]
        whole = draw_a(torch.empty(getattr(parent, attribute).lora_a.shape, dtype=a.dtype, device=a.device))
        a.copy_(whole[first : first + a.shape[0]])
        b.zero_()


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
    rows_of: tuple[int, int] = (0, 1),
) -> list[nn.Parameter]:
    """Freeze every weight of model and put adapters on the target layers of every block; returns the adapters.
    rows_of: (rank, world_size) of a data-parallel job whose ranks each compute their block of the batch's rows."""
    check_lora(rank, alpha, dropout, targets)
    model.requires_grad_(False)
    adapters = []
    for parent, name in _linears(model, targets):
        lora = LoRALinear(getattr(parent, name), rank, alpha, dropout, adapter_dtype, rows_of)
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


def merge_lora_state_dict(state_dict: StateDict, scale: float) -> StateDict:
    """A whole state dict with every adapter pair folded into its weight (scale: alpha / rank) and every quantized
    weight dequantized: Meta's keys only, as merge_lora's model holds them (the same arithmetic)."""
    merged = {k: dequantize_weight(v) for k, v in state_dict.items() if not is_adapter(k)}
    for key in state_dict:
        if key.endswith(".lora_a"):
            prefix = key.removesuffix(".lora_a")
            merged[f"{prefix}.weight"] = fold(state_dict[f"{prefix}.weight"], state_dict[key],
                                              state_dict[f"{prefix}.lora_b"], scale)  # fmt: skip
    return merged


def is_adapter(key: str) -> bool:
    return key.rsplit(".", 1)[-1] in ("lora_a", "lora_b")


def adapter_state_dict(model_or_state_dict: nn.Module | StateDict) -> StateDict:
    """The adapters alone, under their names in the model (layers.0.attention.wq.lora_a, ...)."""
    sd = model_or_state_dict.state_dict() if isinstance(model_or_state_dict, nn.Module) else model_or_state_dict
    return {k: v for k, v in sd.items() if is_adapter(k)}


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
