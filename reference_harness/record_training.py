"""Record a training golden set: a short full fine-tune of Meta's reference model, unmodified, under torchrun.

    torchrun --standalone --nproc_per_node N -m reference_harness.record_training --out DIR [--dtype ...]

Every rank holds Meta's tensor-parallel model (gloo on CPU, nccl on CUDA) and takes the same steps: Meta's
forward without its inference_mode (reference_harness.meta.meta_forward_for_training), the loss as the sum
of token losses over the batch's target count, backward, the global gradient norm clipped, torch's AdamW
with decay on matrices only. Norms and the final weights are of the dense tensors: a sharded gradient's
squares are summed over the ranks, sharded weights gathered. Meta's model has no document mask, so each
row of the batch is one document (packing is checked by microllama's packed-vs-alone law). Rank 0 writes
the set through microllama.golden.training_set. `record_training_goldens()` (tools/record_training_goldens.py)
records into the cache and checks microllama's trainer against it and against the committed set.
"""

import os
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from microllama.checkpoint.meta_layout import shard_dim
from microllama.checkpoint.tiny import cache_dir
from microllama.distributed.launch import is_rank_0, torchrun_world_size
from microllama.golden.capture import checkpoint_entry, platform_fingerprint
from microllama.golden.schema import DTYPES, SCHEMA_VERSION, ModelEntry
from microllama.golden.training_set import (
    TRAINING_DATA_FILES,
    TRAINING_KIND,
    Optimization,
    TrainingManifest,
    TrainingOutputs,
    is_training_set,
    training_set_name,
    write_training_set,
)
from microllama.golden.verify_training import TrainingComparison, format_training_comparison, verify_training
from microllama.train.config import TrainConfig
from microllama.train.loop import lr_at

from .meta import meta_forward_for_training, meta_llama
from .record import REPO, check_request, progress, reference_versions, run_process_group

ROWS, SEQLEN, STEPS = 2, 48, 4
SETTINGS = TrainConfig(data="-", lr=1e-3, min_lr=1e-4, warmup_steps=1, max_steps=STEPS, weight_decay=0.1,
                       grad_clip=1.0)  # fmt: skip
EPS = 1e-8  # microllama.train.loop.make_optimizer's


def golden_batch(vocab_size: int = 128000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """ROWS documents of SEQLEN tokens from numpy's PCG64 (machine-independent), targets the next token;
    a prompt (row 0's first 8 positions) and each row's last position have none."""
    tokens = np.random.Generator(np.random.PCG64(seed)).integers(0, vocab_size, (ROWS, SEQLEN), dtype=np.int64)
    targets = np.concatenate([tokens[:, 1:], np.full((ROWS, 1), -100)], axis=1)
    targets[0, :8] = -100
    return tokens.astype(np.int32), targets.astype(np.int32)


def _dense_square_sum(name: str, t: torch.Tensor, world_size: int) -> torch.Tensor:
    """The sum of squares of the dense tensor `name` of which t is this rank's shard (or a replica)."""
    import torch.distributed as dist

    total = t.float().pow(2).sum()
    if world_size > 1 and shard_dim(name) is not None:
        dist.all_reduce(total)
    return total


def _dense(name: str, t: torch.Tensor, world_size: int) -> torch.Tensor:
    """The dense tensor `name` gathered from every rank's shard."""
    import torch.distributed as dist

    dim = shard_dim(name)
    if world_size == 1 or dim is None:
        return t.detach().cpu()
    parts = [torch.empty_like(t) for _ in range(world_size)]
    dist.all_gather(parts, t.detach().contiguous())
    return torch.cat(parts, dim=dim).cpu()


def record_training(out: str, ckpt_dir: Optional[str] = None, device: str = "cpu", dtype: str = "float32") -> None:
    """Run under torchrun: every rank trains, rank 0 writes the training set to `out`."""
    import torch.distributed as dist

    world_size = torchrun_world_size()
    ckpt = check_request(None, ckpt_dir, device, dtype, world_size)
    progress(f"Meta's Llama3.build: {ckpt.dir}, {device}, {dtype}, world size {world_size}")
    model = meta_llama(ckpt.dir, DTYPES[dtype], SEQLEN + 16, ROWS, 1, device, world_size).model.train()
    names = [name for name, _ in model.named_parameters()]
    params = list(model.parameters())
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": SETTINGS.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]  # fmt: skip
    fused = torch.device(device).type in ("cpu", "cuda")
    optimizer = torch.optim.AdamW(groups, lr=SETTINGS.lr, betas=(SETTINGS.beta1, SETTINGS.beta2), eps=EPS,
                                  fused=fused)  # fmt: skip
    tokens_np, targets_np = golden_batch()
    tokens, targets = (torch.from_numpy(a).long().to(device) for a in (tokens_np, targets_np))
    n_targets = int((targets != -100).sum())
    lrs = [lr_at(step, SETTINGS) for step in range(STEPS)]
    losses, grad_norms, first_norms = [], [], []
    for step, lr in enumerate(lrs):
        progress(f"step {step + 1} of {STEPS}, lr {lr:.3g}")
        for group in optimizer.param_groups:
            group["lr"] = lr
        logits = meta_forward_for_training(model, tokens)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum") / n_targets
        loss.backward()
        norms = [_dense_square_sum(n, p.grad, world_size).sqrt() for n, p in zip(names, params, strict=True)]
        if step == 0:
            first_norms = [x.item() for x in norms]
        if world_size == 1:  # torch's own clipping, as microllama's trainer clips
            grad_norm = torch.nn.utils.clip_grad_norm_(params, SETTINGS.grad_clip).item()
        else:  # the same formula over the dense gradients (torch's would see only this rank's shards)
            total = torch.linalg.vector_norm(torch.stack(norms))
            coef = torch.clamp(SETTINGS.grad_clip / (total + 1e-6), max=1.0)
            for p in params:
                p.grad.mul_(coef.to(p.grad.dtype))
            grad_norm = total.item()
        losses.append(loss.item())
        grad_norms.append(grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    weights = {n: _dense(n, p, world_size) for n, p in zip(names, params, strict=True)}

    if is_rank_0():
        manifest = TrainingManifest(
            schema=SCHEMA_VERSION,
            kind=TRAINING_KIND,
            recorded_by="reference_harness.record_training: Meta's llama-models Transformer (forward unmodified, "
            "called without its inference_mode) and torch's AdamW",
            model=ModelEntry(params=ckpt.params, max_seq_len=SEQLEN + 16, max_batch_size=ROWS),
            checkpoint=checkpoint_entry(ckpt),
            dtype=dtype,
            device=device,
            world_size=world_size,
            versions=reference_versions(),
            platform=platform_fingerprint(device),
            optimization=Optimization(
                optimizer=f"torch.optim.AdamW(fused={fused})",
                lrs=lrs,
                betas=[SETTINGS.beta1, SETTINGS.beta2],
                eps=EPS,
                weight_decay=SETTINGS.weight_decay,
                grad_clip=SETTINGS.grad_clip,
                batch=f"{ROWS} x {SEQLEN} ids from numpy PCG64 seed 0 in [0, 128000), targets the next id; none "
                "at row 0's first 8 positions and each row's last",
            ),  # fmt: skip
            parameters=names,
        )
        outputs = TrainingOutputs.from_run(losses, grad_norms, first_norms, weights)
        write_training_set(out, manifest, outputs, tokens_np, targets_np)
        progress(f"wrote {out}")
    dist.barrier()
    dist.destroy_process_group()


def launch_training(out: Path, ckpt_dir: Optional[str], device: str, dtype: str, world_size: int) -> Path:
    """Record a training set in a torchrun subprocess of world_size ranks (Ctrl-C stops every worker)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world_size}",
           "-m", "reference_harness.record_training", f"--out={out.resolve()}", f"--device={device}",
           f"--dtype={dtype}"] + ([f"--ckpt_dir={ckpt_dir}"] if ckpt_dir is not None else [])  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // world_size)))
    status = run_process_group(cmd, cwd=REPO, env=env)
    if status != 0:
        raise RuntimeError(f"recording failed: torchrun exited with status {status} ({' '.join(cmd)})")
    return out


def record_training_goldens(
    out: Optional[str] = None, ckpt_dir: Optional[str] = None, device: str = "cpu", dtype: str = "float32",
    world_size: int = 1,
) -> list[TrainingComparison]:  # fmt: skip
    """Record a training set (default into $MICROLLAMA_CACHE/goldens/<name>, the work tree untouched), check
    microllama's trainer against it and against the committed goldens/<name>, and say whether the data files
    are byte-identical to the committed ones. Prints each comparison."""
    ckpt = check_request(None, ckpt_dir, device, dtype, world_size)
    name = training_set_name(checkpoint_entry(ckpt), dtype, device, world_size)
    out_dir = Path(out) if out is not None else cache_dir() / "goldens" / name
    start = time.time()
    launch_training(out_dir, ckpt_dir, device, dtype, world_size)
    print(f"recorded {out_dir} in {time.time() - start:.1f} s; checking microllama's trainer against it",
          file=sys.stderr)  # fmt: skip
    comparisons = [verify_training(out_dir, ckpt, device)]
    print(format_training_comparison(comparisons[0]))
    committed = REPO / "goldens" / name
    if is_training_set(committed) and committed.resolve() != out_dir.resolve():
        comparisons.append(verify_training(committed, ckpt, device))
        print(f"\n{format_training_comparison(comparisons[1])}\n")
        same = all((out_dir / f).read_bytes() == (committed / f).read_bytes() for f in TRAINING_DATA_FILES)
        print(f"fresh recording {out_dir}: data files {'byte-identical to' if same else 'DIFFER from'} {committed}")
    return comparisons


if __name__ == "__main__":
    import fire

    fire.Fire(record_training)
