"""Peak host memory per rank while FSDP2 loads a checkpoint, as a multiple of the rank's share of it.

    python tools/bench_fsdp_load.py run                          # llama3.2-1b shapes, bf16 (~3 GB), in /tmp
    python tools/bench_fsdp_load.py run --world_sizes '[2]' --n_layers 2

`run` writes a random-init bfloat16 checkpoint of the model's shapes in Meta's layout (one file, and split into 2
shards) into a temporary directory, deleted after; then, under torchrun (gloo ranks on the CPU), loads it at each
world size N the new way (`Checkpoint.load_sharded`: the model built on the meta device, fully_shard, each rank
reading only its rows) and, at --old_world_sizes only and in bfloat16 only, the old way (the whole model loaded by
every rank, then fully_shard: in float32 that is a whole 6 GB copy of 1B per rank, and shards beside it, more than
a 24 GB machine shared with other work should be asked for). Each rank reports its own peak against the
checkpoint's bytes / N (its share).

The ratio is counted against the share in the dtype the rank holds: for bfloat16 (the stored dtype: the loader
alone) against checkpoint bytes / N; for float32 (what `--distributed fsdp` trains on: float32 master weights)
against twice that, the share's float32 bytes. "Peak host memory" is, as in tools/bench_load.py, the rise of the
rank's peak resident set (VmHWM) over its resident set just before loading (the process group joined), after every
local weight has been touched; it counts the touched pages of the memory-mapped files as well as copies.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # microllama from this checkout

import torch.distributed as dist  # noqa: E402

from microllama import flags  # noqa: E402
from microllama.checkpoint.load import convert, open_checkpoint  # noqa: E402
from microllama.distributed import data_parallel  # noqa: E402
from microllama.distributed.launch import join_process_group  # noqa: E402
from tools.bench_load import build, status_bytes  # noqa: E402


def measure(ckpt_dir: str, out: str, way: str = "new", dtype: str = "bfloat16") -> None:
    """Under torchrun: load ckpt_dir sharded by FSDP2 over the job's ranks the new way (meta device, each rank its
    rows) or the old way (whole, then fully_shard), touch every local weight, and write this rank's figures to
    OUT/rank{RANK}.json."""
    join_process_group(torch.device("cpu"))
    rank, world_size = dist.get_rank(), dist.get_world_size()
    checkpoint = open_checkpoint(ckpt_dir)
    ckpt_bytes = sum(p.stat().st_size for p in checkpoint.weight_files)
    ranks = data_parallel.Ranks("fsdp", rank, world_size)
    before = status_bytes("VmRSS")
    if way == "new":
        model = checkpoint.load_sharded(lambda m: ranks.shard(m, torch.bfloat16), 16, "cpu", dtype)
    else:
        model = checkpoint.load_model(16, 1, "cpu", dtype)
        ranks.wrap(model, torch.bfloat16, list(model.parameters()))
    for p in model.parameters():  # one element per 4 KiB page: every page of the rank's weights resident
        p.to_local().detach().reshape(-1).view(torch.uint8)[::4096].sum()
    peak = status_bytes("VmHWM") - before
    share = ckpt_bytes / world_size * torch.empty(0, dtype=getattr(torch, dtype)).element_size() / 2
    figures = {"rank": rank, "world_size": world_size, "checkpoint_bytes": ckpt_bytes, "peak_host_bytes": peak,
               "share_bytes": share, "ratio_to_share": round(peak / share, 3)}  # fmt: skip
    Path(out, f"rank{rank}.json").write_text(json.dumps(figures))
    dist.destroy_process_group()


def at_ranks(path: Path, n: int, way: str, dtype: str) -> list[dict]:
    """measure() on n torchrun ranks; each rank's figures."""
    root = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory() as reports:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", __file__,
               "measure", str(path), reports, f"--way={way}", f"--dtype={dtype}"]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=root)
        if done.returncode:
            raise RuntimeError(f"measuring {path} at {n} ranks failed: {done.stderr.strip()[-2000:]}")
        return [json.loads((Path(reports) / f"rank{r}.json").read_text()) for r in range(n)]


def run(
    name: str = "llama3.2-1b", n_layers: Optional[int] = None, world_sizes: Optional[list[int]] = None,
    old_world_sizes: Optional[list[int]] = None, dtypes: Optional[list[str]] = None, out: Optional[str] = None,
) -> None:  # fmt: skip
    """Write the checkpoint (all the model's layers unless --n_layers) under OUT (default: a new directory in the
    system's temporary one), deleted after; print each rank's peak at each of --world_sizes (default [2, 4]) the
    new way in each of --dtypes (default bfloat16, float32), and at --old_world_sizes (default [2]) the old way."""
    root = Path(tempfile.mkdtemp(prefix="bench_fsdp_load-", dir=out))
    try:
        dense = build(str(root / "meta-1-file"), name, n_layers or open_checkpoint(name).args.n_layers, "meta")
        sharded = convert(dense, root / "meta-2-shards", "meta", shards=2)
        print(f"{name}: checkpoint {sum(p.stat().st_size for p in dense.glob('*.pth')) / 1e9:.3f} GB (bfloat16)")
        for path in (dense, sharded):
            for way, counts, kinds in (("new", world_sizes or [2, 4], dtypes or ["bfloat16", "float32"]),
                                       ("old", old_world_sizes or [2], ["bfloat16"])):  # fmt: skip
                for n in counts:
                    for dtype in kinds:
                        ranks = at_ranks(path, n, way, dtype)
                        per_rank = ", ".join(f"{f['peak_host_bytes'] / 1e9:.3f} GB ({f['ratio_to_share']:.3f}x)"
                                             for f in ranks)  # fmt: skip
                        print(
                            f"{path.name:<13} {way} way {dtype:<8} at {n} ranks: share "
                            f"{ranks[0]['share_bytes'] / 1e9:.3f} GB; peak host per rank {per_rank}",
                            flush=True,
                        )
    finally:
        shutil.rmtree(root)


COMMANDS = {"run": run, "measure": measure}

if __name__ == "__main__":
    flags.run(COMMANDS)
