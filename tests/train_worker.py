"""One rank of the data-parallel training runs of tests/test_train_distributed.py, started by torchrun:

    torchrun --standalone --nproc_per_node N tests/train_worker.py CONFIGS_JSON [OUT LOADS_JSON [META_EXPORT_DIR]]

Runs microllama.train.loop.train on each TrainConfig (a JSON list of their fields) in turn, in one process group:
one torchrun start for several runs; each rank writes each run's Summary to its out_dir, summary-rank{RANK}.json.
With OUT and LOADS_JSON, first the FSDP2 loading checks: for each checkpoint directory LOADS_JSON's "layouts" names,
this rank builds the model on the meta device, shards it and reads its rows (Checkpoint.load_sharded), counting the
bytes it reads (files.READS); then loads it the old way (whole, then fully_shard) and runs one forward and backward of
the same batch through both, keeping the loss and the gradients' norm of each. A checkpoint that must be refused
("refused") records its error's first line and the bytes read before it. What this rank saw goes to
OUT/rank{RANK}.json. With META_EXPORT_DIR, last, Meta's own Llama3.build at this world size reads that run's final
export (one consolidated.0r.pth per rank) beside microllama's tensor-parallel model: OUT/meta-export.pt."""

import dataclasses
import json
import math
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from microllama.checkpoint.load import open_checkpoint
from microllama.distributed import data_parallel
from microllama.distributed.launch import join_process_group, leave_process_group
from microllama.files import READS
from microllama.train.config import TrainConfig
from microllama.train.loop import train


def one_step(ranks: data_parallel.Ranks, model: torch.nn.Module, tokens: torch.Tensor) -> dict:
    """This rank's rows of tokens: the loss, and the norm of the whole gradient (the ranks' shards together)."""
    loss = ranks.loss(tokens[:, :-1], tokens[:, 1:], reduction="sum")
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(list(model.parameters()), math.inf).full_tensor()
    return {"loss": loss.item(), "grad_norm": norm.item()}


def check(ckpt_dir: str, tokens: torch.Tensor) -> dict:
    checkpoint = open_checkpoint(ckpt_dir)
    ranks = data_parallel.Ranks("fsdp", dist.get_rank(), dist.get_world_size())
    before = READS.bytes
    model = checkpoint.load_sharded(lambda m: ranks.shard(m, torch.float32), 64, "cpu", torch.float32).train()
    read = READS.bytes - before
    local = {name: list(p.to_local().shape) for name, p in model.named_parameters()}
    rows = {name: first for name, (first, _) in data_parallel.shard_rows(model).items()}
    new = one_step(ranks, model, tokens)
    old_ranks = data_parallel.Ranks("fsdp", dist.get_rank(), dist.get_world_size())
    whole = checkpoint.load_model(64, 1, "cpu", torch.float32).train()
    old_ranks.wrap(whole, torch.float32, list(whole.parameters()))
    old = one_step(old_ranks, whole, tokens)
    pairs = zip(model.named_parameters(), whole.named_parameters(), strict=True)
    same = all(a == b and torch.equal(x.to_local(), y.to_local()) for (a, x), (b, y) in pairs)
    return {"read": read, "local": local, "first_row": rows, "new": new, "old": old, "same_shards": same,
            "stored_dtype": str(next(iter(checkpoint.read_state_dict().values())).dtype)}  # fmt: skip


def refused(ckpt_dir: str) -> dict:
    before = READS.bytes
    ranks = data_parallel.Ranks("fsdp", dist.get_rank(), dist.get_world_size())
    try:
        open_checkpoint(ckpt_dir).load_sharded(lambda m: ranks.shard(m, torch.float32), 64)
    except Exception as e:  # noqa: BLE001 (the test checks the type and message)
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0]}", "lines": len(str(e).splitlines()),
                "read": READS.bytes - before}  # fmt: skip
    return {"error": None, "read": READS.bytes - before}


def loading_checks(out: Path, spec: dict) -> None:
    join_process_group(torch.device("cpu"))
    torch.manual_seed(0)
    tokens = torch.randint(0, 128256, (dist.get_world_size(), 17))[dist.get_rank() :: dist.get_world_size()]
    result = {"layouts": {name: check(path, tokens) for name, path in spec["layouts"].items()},
              "refused": {name: refused(path) for name, path in spec.get("refused", {}).items()}}  # fmt: skip
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(result))


def meta_reads_export(export_dir: str, out: Path) -> None:
    """Meta's Llama3.build (fairscale's layers) at this world size on a Meta-layout export the ranks wrote, and
    microllama's tensor-parallel model on the same files: both models' logits of fixed tokens, from rank 0. Meta's
    loader keeps bfloat16 weights (its default tensor type; reference_harness.meta_llama then runs them in float32),
    so microllama's weights are rounded through bfloat16 as well: the same weights, the same world size."""
    from microllama.generation import Llama
    from reference_harness.meta import meta_llama

    meta = meta_llama(export_dir, torch.float32, 64, 1, 1, "cpu", dist.get_world_size())
    tokens = torch.randint(0, 128256, (1, 17), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        meta_logits = meta.model.forward(tokens, 0)
        ours = Llama.build(export_dir, 64, 1, tensor_parallel=True).model
        for p in ours.parameters():
            local = p.to_local() if hasattr(p, "to_local") else p
            local.copy_(local.bfloat16().float())
        ours_logits = ours(tokens)
    if dist.get_rank() == 0:
        torch.save({"tokens": tokens, "meta": meta_logits, "ours": ours_logits}, out / "meta-export.pt")


if __name__ == "__main__":
    if len(sys.argv) > 2:
        loading_checks(Path(sys.argv[2]), json.loads(sys.argv[3]))
    for fields in json.loads(sys.argv[1]):
        summary = dataclasses.asdict(train(TrainConfig(**fields)))
        out = Path(fields["out_dir"]) / f"summary-rank{dist.get_rank()}.json"
        out.write_text(json.dumps(summary, default=str))
    if len(sys.argv) > 4:
        meta_reads_export(sys.argv[4], Path(sys.argv[2]))
    leave_process_group()
