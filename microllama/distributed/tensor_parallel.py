"""Tensor parallelism on torch's own engine: the plan that shards the dense Transformer over the ranks of a
torchrun job as Meta's fairscale layers shard its reference model, applied with DTensor's parallelize_module.

Meta's split (llama_models/llama3/model.py), and DTensor's style for each:

- ColumnParallelLinear (wq, wk, wv, w1, w3 and output): a rank holds a block of the output features, rows of
  the weight: ColwiseParallel, weight Shard(0). The output layer's logits are gathered on every rank.
- RowParallelLinear (wo, w2): a block of the input features, columns of the weight; each rank's partial sums
  are added by an all-reduce: RowwiseParallel, weight Shard(1).
- VocabParallelEmbedding: a block of the vocabulary; a rank looks up the ids in its block, zeros for the others,
  and an all-reduce adds them: RowwiseParallel on nn.Embedding, weight Shard(0).
- RMSNorm weights replicated.

So a rank's attention computes n_heads / N query heads and n_kv_heads / N kv heads (whole grouped-query
groups), and caches only those; its feed-forward a block of the hidden features. Every rank gets the same
residual stream and the same logits. The collectives are DTensor's, on gloo (CPU) or nccl (CUDA).
"""

import os
from typing import Optional, Union

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh  # a stand-in class where torch is built without distributed

from ..args import ModelArgs, ffn_hidden_dim
from ..files import StateDict
from ..model import Transformer
from .launch import join_process_group, rank_device

if dist.is_available():  # a torch built without it (USE_DISTRIBUTED=0) still runs microllama on one device
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, distribute_tensor
    from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel, parallelize_module


class TensorParallelError(ValueError):
    """A tensor-parallel request that cannot run: not under torchrun, or a world size the model cannot split."""


def check_world_size(args: ModelArgs, world_size: int, source: str, flag: str = "a world size") -> None:
    """Raise TensorParallelError unless world_size ranks can split the model as Meta's layers do: the query
    heads, the kv heads, the feed-forward's hidden features and the vocabulary into equal blocks. flag: what the
    message asks to change."""
    hidden = ffn_hidden_dim(args.dim, args.multiple_of, args.ffn_dim_multiplier)
    sizes = {"n_heads": args.n_heads, "n_kv_heads": args.n_kv_heads, "ffn hidden size": hidden,
             "vocab_size": args.vocab_size}  # fmt: skip
    bad = [f"{name} {size}" for name, size in sizes.items() if size % world_size]
    if bad:
        raise TensorParallelError(
            f"tensor parallelism over {world_size} ranks splits the heads, the feed-forward and the vocabulary "
            f"into {world_size} equal blocks, but {source} has {', '.join(bad)}: use {flag} that divides "
            f"n_heads {args.n_heads} and n_kv_heads {args.n_kv_heads}"
        )


def device_mesh(device: Union[str, torch.device]) -> tuple[DeviceMesh, torch.device]:
    """The one-dimensional mesh of this torchrun job's ranks, and this rank's device (cuda:LOCAL_RANK on
    CUDA). Joins the process group torchrun describes (gloo on CPU, nccl on CUDA) unless one exists."""
    if not dist.is_available():
        raise TensorParallelError("tensor_parallel=True needs torch.distributed, which this torch build lacks")
    if "RANK" not in os.environ:
        raise TensorParallelError(
            "tensor_parallel=True runs one process per rank under torchrun: "
            "torchrun --nproc_per_node N -m microllama generate ..."
        )
    device = rank_device(device)
    join_process_group(device)
    return init_device_mesh(device.type, (dist.get_world_size(),)), device


def plan(n_layers: int) -> dict[str, ParallelStyle]:
    """Module name -> DTensor's parallel style, for Meta's split (see the module's docstring)."""
    styles: dict[str, ParallelStyle] = {
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate()),  # ids on every rank, Shard(0) of the vocab
        "output": ColwiseParallel(output_layouts=Replicate()),  # every rank gets the whole row of logits
    }
    for i in range(n_layers):
        for name in ("attention.wq", "attention.wk", "attention.wv", "feed_forward.w1", "feed_forward.w3"):
            styles[f"layers.{i}.{name}"] = ColwiseParallel()  # output stays sharded: this rank's heads or features
        for name in ("attention.wo", "feed_forward.w2"):
            styles[f"layers.{i}.{name}"] = RowwiseParallel()  # takes them sharded, adds the partial sums
    return styles


def parallelize(model: Transformer, mesh: DeviceMesh) -> Transformer:
    """Shard model (on any device, the meta device included) over mesh in place, and give each attention its
    rank's head counts."""
    parallelize_module(model, mesh, plan(len(model.layers)))
    for layer in model.layers:
        layer.attention.n_heads //= mesh.size()
        layer.attention.n_kv_heads //= mesh.size()
    return model


def from_local(model: Transformer, local: StateDict) -> StateDict:
    """This rank's slices (read with part = (rank, world size)) as DTensors placed as the parallelized model's
    sharded parameters, for model.load_state_dict(..., assign=True); the norms' weights, which the plan leaves
    as plain tensors on every rank, as they are. Nothing is communicated."""
    out = {}
    for key, tensor in local.items():
        param = model.get_parameter(key)
        if isinstance(param, DTensor):
            tensor = DTensor.from_local(tensor, param.device_mesh, param.placements, shape=param.shape,
                                        stride=param.stride())  # fmt: skip
        out[key] = tensor
    return out


def mesh_of(model: Transformer) -> Optional[DeviceMesh]:
    """The mesh a tensor-parallel model is sharded over; None for a dense one."""
    weight = model.output.weight
    return weight.device_mesh if dist.is_available() and isinstance(weight, DTensor) else None


def shared_seed(mesh: DeviceMesh) -> int:
    """A seed drawn from rank 0's global generator, the same on every rank (DTensor's broadcast from rank 0),
    so that unseeded sampling draws the same tokens everywhere."""
    seed = torch.randint(0, 2**62, (1,), dtype=torch.int64, device=mesh.device_type)
    return int(distribute_tensor(seed, mesh, [Replicate()], src_data_rank=0).to_local().item())
