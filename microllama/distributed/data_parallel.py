"""Training over the ranks of a torchrun job, on torch's own engine: DDP (every rank a whole copy, gradients
all-reduced) or FSDP2 (`fully_shard` on each block, then the root: weights, gradients and AdamW state sharded,
a block's weights gathered only while it computes), chosen by `--distributed ddp|fsdp`; and with
`--tensor_parallel K`, FSDP2 on a 2-D mesh of (world size / K) data x K tensor-parallel ranks (`Ranks.shard`).

The data: every rank draws the same global micro-batches (the packing is seeded) and keeps its own block of
rows (on a 2-D mesh: each data rank its block, the K ranks of its tensor-parallel group the same rows). The
loss: each rank's summed token losses over the target count of the whole global step, so the gradient is the
one-process gradient of the global batch; DDP and FSDP average gradients over the data ranks, so each rank's
loss is multiplied by their count first (exact for a power of two).
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

from ..args import ModelArgs
from ..model import Transformer
from ..quantize import dequantize_weight, is_quantized
from ..train.data import Batch
from .launch import join_process_group, torchrun_world_size
from .tensor_parallel import check_world_size, parallelize

if dist.is_available():  # a torch built without it (USE_DISTRIBUTED=0) still trains in one process
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.distributed.tensor import DTensor, Replicate, Shard

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
    """This process's place in the training job: a rank of a data-parallel torchrun job (ddp or fsdp, or fsdp on
    a 2-D mesh of data x tensor-parallel ranks), or the one rank of a process that trains alone (kind none: its
    collectives are no-ops). Once `wrap` has run, `loss` is the model's loss as the job computes it."""

    kind: str = "none"  # none, ddp or fsdp
    rank: int = 0
    world_size: int = 1
    loss_fn: Optional[Callable[..., torch.Tensor]] = None  # model.loss, DDP(LossOf(model)), or fully_shard's
    mesh: Optional["DeviceMesh"] = None  # 2-D: dims ("dp", "tp"); None when every rank is a data rank

    @property
    def tp(self) -> int:
        """Ranks in each tensor-parallel group (1: none)."""
        return 1 if self.mesh is None else self.mesh["tp"].size()

    @property
    def dp_size(self) -> int:
        """Data ranks: those that split the global batch, over which FSDP and DDP average gradients."""
        return self.world_size // self.tp

    @property
    def dp_rank(self) -> int:
        return self.rank if self.mesh is None else self.mesh["dp"].get_local_rank()

    @property
    def tensor_part(self) -> tuple[int, int]:
        """(rank, K) within this rank's tensor-parallel group, the `part` a checkpoint reader takes; (0, 1) for none."""
        return (0, 1) if self.mesh is None else (self.mesh["tp"].get_local_rank(), self.tp)

    @classmethod
    def alone(cls, model: Transformer) -> "Ranks":
        """The one rank of a process training model by itself."""
        return cls(loss_fn=model.loss)

    @property
    def is_rank_0(self) -> bool:
        return self.rank == 0

    def rows(self, batch: Batch) -> Batch:
        """This data rank's block of a global micro-batch's rows (all of them for one data rank)."""
        if self.dp_size == 1:
            return batch
        n = batch.tokens.shape[0] // self.dp_size
        part = slice(self.dp_rank * n, (self.dp_rank + 1) * n)
        return Batch(batch.tokens[part], batch.targets[part], batch.documents[part])

    def loss(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Transformer.loss on this rank's rows, run through DDP or FSDP (their hooks around the module's call)."""
        return self.loss_fn(*args, **kwargs)

    def rank_0_first(self) -> "contextlib.AbstractContextManager[None]":
        """A block rank 0 runs before the others: it fills a cache (the tokenized corpus) that they then read."""
        return _rank_0_first(self.is_rank_0) if self.world_size > 1 else contextlib.nullcontext()

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        """value added over the data ranks (a step's loss, for the log: a tensor-parallel group's ranks hold the
        same one)."""
        if self.world_size > 1:
            dist.all_reduce(value, group=None if self.mesh is None else self.mesh["dp"].get_group())
        return value

    def clip_grad_norm(self, params: list[nn.Parameter], max_norm: float) -> float:
        """The global norm of params' gradients (every rank's shards together), before clipping them to max_norm.
        On a 2-D mesh the split weights' gradients (2-D DTensors) and the norms' (split over the data dim only)
        live on two meshes, which one DTensor sum cannot mix: a norm per mesh, each made whole, then combined."""
        if self.mesh is None:
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
            return (norm.full_tensor() if isinstance(norm, DTensor) else norm).item()
        by_mesh: dict[DeviceMesh, list[nn.Parameter]] = {}
        for p in params:
            if p.grad is not None:
                by_mesh.setdefault(p.grad.device_mesh, []).append(p)
        norms = [torch.nn.utils.get_total_norm([p.grad for p in group]).full_tensor() for group in by_mesh.values()]
        total = torch.linalg.vector_norm(torch.stack(norms))
        for group in by_mesh.values():
            torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)
        return total.item()

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

    def shard(self, model: Transformer, compute_dtype: torch.dtype, activation_checkpointing: bool = False) -> None:
        """The wrappers, in torchtitan's order (its parallelize function), on the model whole or on the meta device
        (then each rank fills its part: Checkpoint.load_sharded). FSDP keeps the weights (and AdamW's state)
        sharded in the model's dtype and computes in compute_dtype (MixedPrecisionPolicy), reducing gradients in
        float32."""
        # 1. Tensor parallelism over the "tp" dim of a 2-D mesh: inference's plan (tensor_parallel.plan, Meta's
        #    split), each block's heads and feed-forward features split over K ranks, the logits gathered whole
        #    on each (the loss is model.loss on them, as in one process). First, because FSDP then shards what
        #    each rank holds: its tensor-parallel slices.
        if self.mesh is not None:
            parallelize(model, self.mesh["tp"])
        # 2. Activation checkpointing: the model's own switch, torch.utils.checkpoint around each block in its
        #    forward; the recomputation runs the block's tensor-parallel collectives again, inside FSDP's gather.
        if activation_checkpointing:
            model.activation_checkpointing = True
        # (3. torch.compile would go here, per block; microllama trains eagerly.)
        # 4. FSDP2 over the data ranks ("dp", or all of them without a mesh): each block, then the root around the
        #    model's loss; every weight, tensor-parallel slice or whole, split on dim 0 over them.
        policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
        data_mesh = None if self.mesh is None else self.mesh["dp"]
        for layer in model.layers:
            fully_shard(layer, mesh=data_mesh, mp_policy=policy)
        self.loss_fn = fully_shard(LossOf(model), mesh=data_mesh, mp_policy=policy)

    def full_state_dict(self, model: Transformer) -> dict[str, torch.Tensor]:
        """The whole weights as the model holds them (LoRA's adapters beside their frozen weights): the model's
        own in one process; on rank 0's CPU (gathered from FSDP's shards) in a data-parallel job, empty on the
        other ranks, and every rank must call it."""
        if self.kind == "none":
            return model.state_dict()
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    @property
    def meta_shards(self) -> int:
        """The count of Meta shards the ranks write without gathering any tensor whole: one per tensor-parallel
        rank on a 2-D mesh (their slices are Meta's split), else one per rank."""
        return self.world_size if self.mesh is None else self.tp

    def meta_index(self, n_shards: int) -> Optional[int]:
        """Which of n_shards Meta shards this rank writes; None if none. On a 2-D mesh at n_shards == K, the
        first data rank's tensor-parallel ranks write theirs; else rank r writes shard r, for r < n_shards."""
        if self.mesh is not None and n_shards == self.tp:
            return self.tensor_part[0] if self.dp_rank == 0 else None
        return self.rank if self.rank < n_shards else None

    def meta_block(self, p: torch.Tensor, dim: Optional[int], n_shards: int) -> Optional[torch.Tensor]:
        """This rank's block of weight p as Meta shard meta_index(n_shards) holds it: split on dim
        (meta_layout.shard_dim), or whole for dim None; None on a rank that writes no shard. Every rank must call
        it. At n_shards == meta_shards, DTensor's redistribute moves FSDP2's dim-0 rows into that placement (an
        all-to-all for dim 1; on a 2-D mesh a gather over the data dim only) and no rank holds the whole tensor;
        at fewer shards, the whole tensor is gathered (full_tensor) and cut, one tensor at a time. A quantized p
        (QLoRA's NF4 base) is dequantized first, each rank its rows."""
        index, p = self.meta_index(n_shards), dequantized(p)
        if isinstance(p, DTensor) and n_shards == self.meta_shards:
            if self.mesh is None:
                placements = [Replicate() if dim is None else Shard(dim)]
            else:  # the tensor-parallel placement kept: a rank's slice is its Meta shard
                placements = [Replicate(), *p.placements[1:]]
            block = p.redistribute(p.device_mesh, placements).to_local().detach()
            return None if index is None else block
        whole = self.whole(p)
        if index is None:
            return None
        return whole if dim is None else whole.chunk(n_shards, dim)[index].clone()

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
        """p whole on every rank (FSDP2's shards gathered, dequantized first: every rank must call it); p itself if
        not sharded."""
        return dequantized(p).full_tensor().detach() if isinstance(p, DTensor) else p.detach()


def dequantized(p: torch.Tensor) -> torch.Tensor:
    """p; for a quantized weight sharded by fully_shard (QLoRA's NF4 base), a DTensor of the same placement holding
    this rank's rows dequantized, which are the whole weight's dequantized rows bit for bit (each of NF4's values
    is its code times its own block's scale)."""
    if not isinstance(p, DTensor) or not is_quantized(p):
        return p
    return placed_like(p, dequantize_weight(p.to_local()))


def placed_like(p: "DTensor", local: torch.Tensor) -> "DTensor":
    """local (this rank's part) as a DTensor placed as p is: the same mesh, placements, global shape and stride."""
    return DTensor.from_local(local, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())


def first_row(rows: int, local_rows: int, mesh: "DeviceMesh", name: str) -> int:
    """The first of `rows` (a tensor's dim 0, or of its tensor-parallel slice) that this rank holds, local_rows of
    them: FSDP2 splits dim 0 over its mesh's first dim as torch.chunk does, ceil(rows / ranks) each, the last ranks
    fewer or none. One rule for the 1-D readers (shard_rows) and the 2-D ones (fill_from_parts)."""
    size = -(-rows // mesh.size(0))
    first = min(rows, mesh.get_local_rank(0) * size)
    assert local_rows == min(size, rows - first), (name, rows, local_rows, first)
    return first


def shard_rows(model: nn.Module) -> dict[str, tuple[int, torch.Tensor]]:
    """For each parameter of a model sharded by fully_shard: the first row this rank holds and its local tensor
    (first_row), for a reader to fill in place. Call under torch.no_grad()."""
    rows = {}
    for name, p in model.named_parameters():
        if not isinstance(p, DTensor):
            raise TypeError(f"{name} is not sharded: apply fully_shard first")
        local = p.to_local()
        rows[name] = (first_row(p.shape[0], local.shape[0], p.device_mesh, name), local)
    return rows


def place_shards(model: nn.Module, shards: dict[str, torch.Tensor]) -> None:
    """Make each of `shards` (a parameter's name -> this rank's local tensor of it) that parameter of a model sharded
    by fully_shard, placed as the parameter it replaces: for a tensor subclass that cannot be filled in place
    (torchao's NF4Tensor). fully_shard takes the new parameters up before its first all-gather, as after
    load_state_dict(assign=True). Call under torch.no_grad()."""
    params = dict(model.named_parameters())
    placed = {name: placed_like(params[name], local) for name, local in shards.items()}
    model.load_state_dict(placed, strict=False, assign=True)


def fill_from_parts(model: nn.Module, parts: dict[str, torch.Tensor]) -> None:
    """Copy into each parameter of a model sharded on a 2-D mesh its rows of this rank's tensor-parallel slice
    (`parts`, read with part = Ranks.tensor_part): FSDP2 splits a slice's dim 0 over the mesh's first dim as
    torch.chunk does. Call under torch.no_grad()."""
    for name, p in model.named_parameters():
        local, part = p.to_local(), parts[name]
        first = first_row(part.shape[0], local.shape[0], p.device_mesh, name)  # FSDP2's is the mesh's first dim
        rows = part[first : first + local.shape[0]]
        assert rows.shape == local.shape, (name, tuple(rows.shape), tuple(local.shape))
        local.copy_(rows)


@contextlib.contextmanager
def _rank_0_first(is_rank_0: bool) -> Iterator[None]:
    if not is_rank_0:
        dist.barrier()
    yield
    if is_rank_0:
        dist.barrier()


def join(
    kind: str, batch_size: int, device: torch.device, tensor_parallel: int = 1, args: Optional[ModelArgs] = None,
    source: str = "the checkpoint",
) -> Ranks:  # fmt: skip
    """This rank of torchrun's job (its process group joined: gloo on CPU, nccl on CUDA; with tensor_parallel K
    > 1, its 2-D mesh of data x K tensor-parallel ranks), or the one rank of a process that trains alone (kind
    none, or not launched by torchrun). ValueError for a split that cannot work, before the group is joined;
    args (the model's, from source) is needed for K > 1."""
    world_size = torchrun_world_size()
    if kind not in KINDS:
        raise ValueError(f"--distributed must be one of {', '.join(KINDS)}, got {kind!r}")
    if world_size > 1 and kind == "none":
        raise ValueError(f"launched by torchrun with {world_size} ranks: pass --distributed ddp or fsdp")
    if tensor_parallel > 1:
        if "RANK" not in os.environ:
            raise ValueError(f"--tensor_parallel {tensor_parallel} runs one process per rank under torchrun: "
                             f"torchrun --nproc_per_node N -m microllama train ... --distributed fsdp "
                             f"--tensor_parallel {tensor_parallel}, N a multiple of {tensor_parallel}")  # fmt: skip
        if world_size % tensor_parallel:
            raise ValueError(f"--tensor_parallel {tensor_parallel} must divide the world size {world_size}: the "
                             f"ranks form a mesh of data x {tensor_parallel} tensor-parallel ranks")  # fmt: skip
        assert args is not None, "join needs the model's args for tensor_parallel > 1"
        check_world_size(args, tensor_parallel, source, flag="a --tensor_parallel")
    if kind == "none" or "RANK" not in os.environ:
        return Ranks()
    data_ranks = world_size // tensor_parallel
    if batch_size % data_ranks:
        among = f"{data_ranks} ranks"
        if tensor_parallel > 1:
            among = f"{data_ranks} data-parallel ranks ({world_size} ranks / --tensor_parallel {tensor_parallel})"
        raise ValueError(f"--batch_size {batch_size} rows must split evenly over {among}")
    join_process_group(device)
    mesh = None
    if tensor_parallel > 1:
        mesh = init_device_mesh(device.type, (data_ranks, tensor_parallel), mesh_dim_names=("dp", "tp"))
    return Ranks(kind, dist.get_rank(), world_size, mesh=mesh)
