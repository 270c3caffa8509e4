"""Training over the ranks of a torchrun job, on torch's own engine: DDP (every rank a whole copy, gradients
all-reduced) or FSDP2 (`fully_shard` on each block, then the root: weights, gradients and AdamW state sharded,
a block's weights gathered only while it computes), chosen by `--distributed ddp|fsdp`.

The data: every rank draws the same global micro-batches (the packing is seeded) and keeps its own block of
rows. The loss: each rank's summed token losses over the target count of the whole global step, so the
gradient is the one-process gradient of the global batch; DDP and FSDP average gradients over the ranks, so
each rank's loss is multiplied by the world size first (exact for a power of two).
"""

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .data import Batch
from .model import Transformer
from .parallel import torchrun_world_size

if dist.is_available():  # a torch built without it (USE_DISTRIBUTED=0) still trains in one process
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

KINDS = ("none", "ddp", "fsdp")


class LossOf(nn.Module):
    """A Transformer's `loss` as a module's forward: DDP's and FSDP's hooks run around a module's __call__, and
    the trainer asks the model for its loss, not its logits."""

    def __init__(self, model: Transformer):
        super().__init__()
        self.model = model

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.model.loss(*args, **kwargs)


@dataclass
class Ranks:
    """This process's place in a data-parallel job, and (once `wrap` has run) the wrapped loss to call."""

    kind: str  # ddp or fsdp
    rank: int
    world_size: int
    loss_fn: Optional[nn.Module] = None  # DDP(LossOf(model)), or LossOf(model) under fully_shard

    @property
    def is_rank_0(self) -> bool:
        return self.rank == 0

    def rows(self, batch: Batch) -> Batch:
        """This rank's block of a global micro-batch's rows."""
        n = batch.tokens.shape[0] // self.world_size
        part = slice(self.rank * n, (self.rank + 1) * n)
        return Batch(batch.tokens[part], batch.targets[part], batch.documents[part])

    def loss(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Transformer.loss on this rank's rows, run through DDP or FSDP (their hooks around the module's call)."""
        return self.loss_fn(*args, **kwargs)

    def rank_0_first(self) -> "contextlib.AbstractContextManager[None]":
        """A block rank 0 runs before the others: it fills a cache (the tokenized corpus) that they then read."""
        return _rank_0_first(self.is_rank_0)

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        """value added over the ranks (a step's loss, for the log)."""
        dist.all_reduce(value)
        return value

    def wrap(self, model: Transformer, compute_dtype: torch.dtype) -> None:
        """DDP, or FSDP2's fully_shard on each block and then the root, around model's loss. FSDP keeps the
        weights (and AdamW's state) sharded in the model's dtype and computes in compute_dtype
        (MixedPrecisionPolicy), reducing gradients in float32."""
        if self.kind == "ddp":
            self.loss_fn = DistributedDataParallel(LossOf(model))
            return
        policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
        for layer in model.layers:
            fully_shard(layer, mp_policy=policy)
        self.loss_fn = fully_shard(LossOf(model), mp_policy=policy)

    def full_state_dict(self, model: Transformer, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The whole weights in dtype on rank 0's CPU (gathered from FSDP's shards), empty on the other ranks;
        every rank must call it."""
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return {k: v.to(dtype) for k, v in get_model_state_dict(model, options=options).items()}


@contextlib.contextmanager
def _rank_0_first(is_rank_0: bool) -> Iterator[None]:
    if not is_rank_0:
        dist.barrier()
    yield
    if is_rank_0:
        dist.barrier()


def join(kind: str, batch_size: int, device: torch.device) -> Optional[Ranks]:
    """This rank of torchrun's job (its process group joined: gloo on CPU, nccl on CUDA), or None when one
    process trains (kind none, or not launched by torchrun). ValueError for a split that cannot work."""
    world_size = torchrun_world_size()
    if kind not in KINDS:
        raise ValueError(f"--distributed must be one of {', '.join(KINDS)}, got {kind!r}")
    if world_size > 1 and kind == "none":
        raise ValueError(f"launched by torchrun with {world_size} ranks: pass --distributed ddp or fsdp")
    if kind == "none" or "RANK" not in os.environ:
        return None
    if batch_size % world_size:
        raise ValueError(f"--batch_size {batch_size} rows must split evenly over {world_size} ranks")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Ranks(kind, dist.get_rank(), world_size)
