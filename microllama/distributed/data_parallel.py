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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..model import Transformer
from ..train.data import Batch
from .launch import join_process_group, torchrun_world_size

if dist.is_available():  # a torch built without it (USE_DISTRIBUTED=0) still trains in one process
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

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
    """This process's place in the training job: a rank of a data-parallel torchrun job (ddp or fsdp), or the
    one rank of a process that trains alone (kind none: its collectives are no-ops). Once `wrap` has run, `loss`
    is the model's loss as the job computes it."""

    kind: str = "none"  # none, ddp or fsdp
    rank: int = 0
    world_size: int = 1
    loss_fn: Optional[Callable[..., torch.Tensor]] = None  # model.loss, DDP(LossOf(model)), or fully_shard's

    @classmethod
    def alone(cls, model: Transformer) -> "Ranks":
        """The one rank of a process training model by itself."""
        return cls(loss_fn=model.loss)

    @property
    def is_rank_0(self) -> bool:
        return self.rank == 0

    def rows(self, batch: Batch) -> Batch:
        """This rank's block of a global micro-batch's rows (all of them for one rank)."""
        if self.world_size == 1:
            return batch
        n = batch.tokens.shape[0] // self.world_size
        part = slice(self.rank * n, (self.rank + 1) * n)
        return Batch(batch.tokens[part], batch.targets[part], batch.documents[part])

    def loss(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Transformer.loss on this rank's rows, run through DDP or FSDP (their hooks around the module's call)."""
        return self.loss_fn(*args, **kwargs)

    def rank_0_first(self) -> "contextlib.AbstractContextManager[None]":
        """A block rank 0 runs before the others: it fills a cache (the tokenized corpus) that they then read."""
        return _rank_0_first(self.is_rank_0) if self.world_size > 1 else contextlib.nullcontext()

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        """value added over the ranks (a step's loss, for the log)."""
        if self.world_size > 1:
            dist.all_reduce(value)
        return value

    def wrap(self, model: Transformer, compute_dtype: torch.dtype, params: list[nn.Parameter]) -> list[nn.Parameter]:
        """Nothing for one process; DDP, or FSDP2 (`shard`, unless the model was sharded as it was built), around
        model's loss. Returns the trainable params as the job holds them: FSDP's sharded parameters replace the
        model's."""
        if self.kind == "none":
            self.loss_fn = model.loss
            return params
        if self.kind == "ddp":
            # Every rank built the same model (one checkpoint; LoRA's adapters drawn from one seed), so DDP's start-up
            # broadcast of rank 0's weights is not needed; it would also rewrite torchao's NF4Tensor (a QLoRA base),
            # which measured off one process's after it. Frozen weights take no part in DDP's gradient buckets.
            self.loss_fn = DistributedDataParallel(LossOf(model), init_sync=False)
            return params
        if self.loss_fn is None:
            self.shard(model, compute_dtype)
        return [p for p in model.parameters() if p.requires_grad]

    def shard(self, model: Transformer, compute_dtype: torch.dtype) -> None:
        """FSDP2's fully_shard on each block, then on the root around model's loss: every weight split on dim 0
        over the ranks, whole or on the meta device (then each rank fills its rows: shard_rows). FSDP keeps the
        weights (and AdamW's state) sharded in the model's dtype and computes in compute_dtype
        (MixedPrecisionPolicy), reducing gradients in float32."""
        policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
        for layer in model.layers:
            fully_shard(layer, mp_policy=policy)
        self.loss_fn = fully_shard(LossOf(model), mp_policy=policy)

    def full_state_dict(self, model: Transformer) -> dict[str, torch.Tensor]:
        """The whole weights as the model holds them (LoRA's adapters beside their frozen weights): the model's
        own in one process; on rank 0's CPU (gathered from FSDP's shards) in a data-parallel job, empty on the
        other ranks, and every rank must call it."""
        if self.kind == "none":
            return model.state_dict()
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def meta_block(self, p: torch.Tensor, dim: Optional[int], n_shards: int) -> Optional[torch.Tensor]:
        """This rank's block of weight p as shard number `rank` of n_shards Meta shards holds it: split on dim
        (meta_layout.shard_dim), or whole for dim None; None on a rank at or past n_shards. Every rank must call it.
        At n_shards == world size, DTensor's redistribute moves FSDP2's dim-0 rows into that placement (an
        all-to-all for dim 1) and no rank holds the whole tensor; at fewer shards, the whole tensor is gathered
        (full_tensor) and cut, one tensor at a time."""
        if isinstance(p, DTensor) and n_shards == self.world_size:
            return p.redistribute(p.device_mesh, [Replicate() if dim is None else Shard(dim)]).to_local().detach()
        whole = self.whole(p)
        if self.rank >= n_shards:
            return None
        return whole if dim is None else whole.chunk(n_shards, dim)[self.rank].clone()

    def from_rank_0(self, value: Any) -> Any:
        """Rank 0's value (a picklable object) on every rank."""
        if self.world_size == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_succeeded(self, ok: bool, device: torch.device) -> bool:
        """Whether every rank says ok (device: the process group's, for nccl); also a barrier."""
        if self.world_size == 1:
            return ok
        flag = torch.tensor([int(ok)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def whole(self, p: torch.Tensor) -> torch.Tensor:
        """p whole on every rank (FSDP2's shards gathered: every rank must call it); p itself if not sharded."""
        return p.full_tensor().detach() if isinstance(p, DTensor) else p.detach()


def shard_rows(model: nn.Module) -> dict[str, tuple[int, torch.Tensor]]:
    """For each parameter of a model sharded by fully_shard: the first row this rank holds and its local tensor
    (FSDP2 splits dim 0 as torch.chunk does: ceil(rows / world size) each, the last ranks fewer or none), for a
    reader to fill in place. Call under torch.no_grad()."""
    rows = {}
    for name, p in model.named_parameters():
        if not isinstance(p, DTensor):
            raise TypeError(f"{name} is not sharded: apply fully_shard first")
        local = p.to_local()
        shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
        assert tuple(shape) == tuple(local.shape), (name, shape, local.shape)
        rows[name] = (offset[0], local)
    return rows


@contextlib.contextmanager
def _rank_0_first(is_rank_0: bool) -> Iterator[None]:
    if not is_rank_0:
        dist.barrier()
    yield
    if is_rank_0:
        dist.barrier()


def join(kind: str, batch_size: int, device: torch.device) -> Ranks:
    """This rank of torchrun's job (its process group joined: gloo on CPU, nccl on CUDA), or the one rank of a
    process that trains alone (kind none, or not launched by torchrun). ValueError for a split that cannot work."""
    world_size = torchrun_world_size()
    if kind not in KINDS:
        raise ValueError(f"--distributed must be one of {', '.join(KINDS)}, got {kind!r}")
    if world_size > 1 and kind == "none":
        raise ValueError(f"launched by torchrun with {world_size} ranks: pass --distributed ddp or fsdp")
    if kind == "none" or "RANK" not in os.environ:
        return Ranks()
    if batch_size % world_size:
        raise ValueError(f"--batch_size {batch_size} rows must split evenly over {world_size} ranks")
    join_process_group(device)
    return Ranks(kind, dist.get_rank(), world_size)
