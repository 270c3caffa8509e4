"""Peak host memory while loading a checkpoint, as a multiple of the checkpoint's bytes.

    python tools/bench_load.py run --out /tmp/bench            # llama3.2-1b shapes, 2 layers: 1.29 GB
    python tools/bench_load.py run --out /tmp/bench --device cuda
    python tools/bench_load.py tp --out /tmp/bench             # tensor-parallel, per rank, 2 and 4 ranks
    python tools/bench_load.py quant --out /tmp/bench          # bfloat16, int8 and nf4 side by side (torchao)

`tp` starts torchrun (gloo ranks on the CPU) for each world size N and loads the N-shard checkpoint, and the
one-file one sliced as read, with `load_model(..., mesh=...)`; each rank reports its own peak, as a multiple of
the checkpoint's bytes / N (what a rank's share of the weights is).

`quant` loads the bfloat16 checkpoint as it is, and quantized while loading to int8 and to nf4 (--quantize,
microllama.quantize), and reports each peak as a multiple of that model's own bytes (codes, scales and tables of
the quantized layers, the rest in bfloat16) and of the bfloat16 checkpoint's.

"Peak host memory" here is the rise of the loading process's peak resident set (VmHWM) over its
resident set just before loading, after every weight has been read once. VmHWM counts anonymous memory
and the touched pages of memory-mapped files alike, so the weights that a memory-mapped load leaves in
the page cache are counted in full, as if they had been copied; the figure is an upper bound on what
loading costs. Each load runs in a fresh process, so nothing cached in this one counts.
"""

import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # microllama from this checkout

from torch.distributed.tensor import DTensor  # noqa: E402

from microllama import flags  # noqa: E402
from microllama.checkpoint import family  # noqa: E402
from microllama.checkpoint.hf_layout import save_hf  # noqa: E402
from microllama.checkpoint.load import convert, load_model, open_checkpoint  # noqa: E402
from microllama.checkpoint.meta_layout import save_meta  # noqa: E402
from microllama.checkpoint.params import expected_shapes  # noqa: E402
from microllama.distributed import tensor_parallel as parallel  # noqa: E402
from microllama.quantize import is_dense, tensor_bytes, torchao_quantization  # noqa: E402


def status_bytes(field: str) -> int:
    """A field of /proc/self/status in bytes (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def build(out: str, name: str = "llama3.2-1b", n_layers: int = 2, layout: str = "meta", seed: int = 0) -> Path:
    """Write a bf16 checkpoint of registry model `name` cut to n_layers, with random weights."""
    params = {**family.lookup(name).params, "n_layers": n_layers}
    args = family.model_args(name, n_layers=n_layers)
    g = torch.Generator().manual_seed(seed)
    shapes = expected_shapes(args)
    state_dict = {k: torch.randn(s, generator=g, dtype=torch.float32).to(torch.bfloat16) for k, s in shapes.items()}
    return save_meta(state_dict, params, out) if layout == "meta" else save_hf(state_dict, params, out)


def _dense_parts(t: torch.Tensor) -> list[torch.Tensor]:
    """A weight's plain tensors: itself, or a quantized one's codes, scales and tables."""
    if is_dense(t):
        return [t.detach()]
    names, _ = t.__tensor_flatten__()
    return [part for name in names if (inner := getattr(t, name)) is not None for part in _dense_parts(inner)]


def measure(ckpt_dir: str, dtype: str = "bfloat16", device: str = "cpu", quantize: Optional[str] = None) -> dict:
    """Load ckpt_dir in this process (quantized while loading, with quantize), read every weight once, and return
    the memory figures."""
    ckpt_bytes = sum(p.stat().st_size for p in Path(ckpt_dir).iterdir() if p.suffix in (".pth", ".safetensors"))
    if quantize is not None:
        torchao_quantization()  # imported before the baseline: its libraries are not the weights' memory

    before = status_bytes("VmRSS")
    start = time.perf_counter()
    model = load_model(ckpt_dir, max_seq_len=16, device=device, dtype=dtype, quantize=quantize)
    seconds = time.perf_counter() - start
    for p in model.parameters():  # one element per 4 KiB page: every mapped page becomes resident
        for t in _dense_parts(p):
            t.reshape(-1)[:: max(1, 4096 // t.element_size())].float().sum()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    peak = status_bytes("VmHWM") - before
    model_bytes = sum(tensor_bytes(p) for p in model.parameters())
    figures = {
        "checkpoint": ckpt_dir, "dtype": dtype, "device": device, "quantize": quantize, "checkpoint_bytes": ckpt_bytes,
        "model_bytes": model_bytes, "peak_host_bytes": peak, "ratio": round(peak / ckpt_bytes, 3),
        "ratio_to_model": round(peak / model_bytes, 3), "load_seconds": round(seconds, 2),
        "rss_anon_after": status_bytes("RssAnon"), "rss_file_after": status_bytes("RssFile"),
    }  # fmt: skip
    if device.startswith("cuda"):
        figures["cuda_max_allocated"] = torch.cuda.max_memory_allocated()
    return figures


def measure_tp(ckpt_dir: str, out: str, dtype: str = "bfloat16") -> None:
    """Under torchrun: load ckpt_dir tensor-parallel over the job's ranks (CPU, gloo), touch every weight of this
    rank, and write its figures to OUT/rank{RANK}.json. The process group exists before the baseline is taken."""
    mesh, device = parallel.device_mesh("cpu")
    ckpt_bytes = sum(p.stat().st_size for p in Path(ckpt_dir).iterdir() if p.suffix in (".pth", ".safetensors"))
    before = status_bytes("VmRSS")
    model = open_checkpoint(ckpt_dir).load_model(16, 1, device, dtype, mesh=mesh)
    for p in model.parameters():
        local = p.to_local() if isinstance(p, DTensor) else p
        local.detach().reshape(-1).view(torch.uint8)[::4096].sum()
    peak = status_bytes("VmHWM") - before
    share = ckpt_bytes / mesh.size()
    figures = {"rank": mesh.get_local_rank(), "world_size": mesh.size(), "checkpoint_bytes": ckpt_bytes,
               "peak_host_bytes": peak, "ratio_to_share": round(peak / share, 3)}  # fmt: skip
    Path(out, f"rank{mesh.get_local_rank()}.json").write_text(json.dumps(figures))


def tp(
    out: str, name: str = "llama3.2-1b", n_layers: int = 2, world_sizes: Optional[list[int]] = None,
    dtypes: Optional[list[str]] = None,
) -> None:  # fmt: skip
    """Build the checkpoint under OUT (once) in Meta's layout, one file and N shards for each of --world_sizes (a
    JSON list, default [2, 4]); for each N load both at N ranks and print each rank's peak host memory against
    the checkpoint's bytes / N."""
    root = Path(__file__).resolve().parent.parent
    dense = Path(out) / f"{name}-{n_layers}l-meta"
    if not dense.exists():
        build(str(dense), name, n_layers, "meta")
    for n in world_sizes or [2, 4]:
        sharded = Path(out) / f"{name}-{n_layers}l-meta-{n}-shards"
        if not sharded.exists():
            convert(dense, sharded, "meta", shards=n)
        for path, dtype in itertools.product((sharded, dense), dtypes or ["bfloat16", "float32"]):
            with tempfile.TemporaryDirectory() as reports:
                cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
                       __file__, "measure_tp", str(path), reports, f"--dtype={dtype}"]  # fmt: skip
                env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
                done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=root)
                if done.returncode:
                    raise RuntimeError(f"measuring {path} at {n} ranks failed: {done.stderr.strip()[-2000:]}")
                ranks = [json.loads((Path(reports) / f"rank{r}.json").read_text()) for r in range(n)]
            per_rank = ", ".join(f"{f['peak_host_bytes'] / 1e9:.3f} GB ({f['ratio_to_share']:.3f}x)" for f in ranks)
            print(
                f"{path.name:<28} {dtype:<8} at {n} ranks: checkpoint {ranks[0]['checkpoint_bytes'] / 1e9:.3f} GB, "
                f"share {ranks[0]['checkpoint_bytes'] / n / 1e9:.3f} GB; peak host per rank {per_rank}"
            )


def measure_in_subprocess(
    ckpt_dir: str, dtype: str = "bfloat16", device: str = "cpu", quantize: Optional[str] = None
) -> dict:
    """measure() in a fresh Python process, so nothing cached here counts."""
    call = f"b.measure({ckpt_dir!r}, {dtype!r}, {device!r}, {quantize!r})"
    code = f"import json, tools.bench_load as b; print(json.dumps({call}))"
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root)
    if done.returncode:
        raise RuntimeError(f"measuring {ckpt_dir} failed: {done.stderr.strip().splitlines()[-1]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(
    out: str, name: str = "llama3.2-1b", n_layers: int = 2, device: str = "cpu", dtypes: Optional[list[str]] = None
) -> None:
    """Build the checkpoint under OUT (once) in Meta's layout, one file, 2 and 4 shards, and Hugging Face's;
    print the peak-memory ratio of each load (in each of --dtypes, a JSON list: '["bfloat16"]')."""
    for layout in ("meta", "hf", "meta-2-shards", "meta-4-shards"):
        path = Path(out) / f"{name}-{n_layers}l-{layout}"
        if not path.exists() and layout.endswith("-shards"):
            convert(Path(out) / f"{name}-{n_layers}l-meta", path, "meta", shards=int(layout.split("-")[1]))
        elif not path.exists():
            build(str(path), name, n_layers, layout)
        for dtype in dtypes or ["bfloat16", "float32"]:
            f = measure_in_subprocess(str(path), dtype, device)
            gpu = f" cuda max allocated {f['cuda_max_allocated'] / 1e9:.3f} GB" if "cuda_max_allocated" in f else ""
            print(
                f"{layout:<13} {dtype:<8} -> {device}: checkpoint {f['checkpoint_bytes'] / 1e9:.3f} GB, peak host "
                f"{f['peak_host_bytes'] / 1e9:.3f} GB, ratio {f['ratio']:.3f} (anon {f['rss_anon_after'] / 1e9:.3f} "
                f"GB, file-backed {f['rss_file_after'] / 1e9:.3f} GB after), {f['load_seconds']} s{gpu}"
            )


def quant(out: str, name: str = "llama3.2-1b", n_layers: int = 2, device: str = "cpu") -> None:
    """Build the bfloat16 checkpoint under OUT (once) in Meta's layout; load it as it is and quantized while loading
    to int8 and to nf4, each in a fresh process, and print their peak host memory side by side: as a multiple of
    that model's bytes, and of the checkpoint's."""
    path = Path(out) / f"{name}-{n_layers}l-meta"
    if not path.exists():
        build(str(path), name, n_layers, "meta")
    rows = [(quantize or "bfloat16", measure_in_subprocess(str(path), "bfloat16", device, quantize))
            for quantize in (None, "int8", "nf4")]  # fmt: skip
    print(f"{name} cut to {n_layers} layers, Meta's layout, checkpoint {rows[0][1]['checkpoint_bytes'] / 1e9:.3f} GB "
          f"(bfloat16) -> {device}")  # fmt: skip
    print(f"{'weights':<9} {'model GB':>9} {'peak host GB':>13} {'x model':>8} {'x checkpoint':>13} {'load s':>7}")
    for label, f in rows:
        gigabytes = f"{f['model_bytes'] / 1e9:>9.3f} {f['peak_host_bytes'] / 1e9:>13.3f}"
        print(f"{label:<9} {gigabytes} {f['ratio_to_model']:>8.3f} {f['ratio']:>13.3f} {f['load_seconds']:>7}")


COMMANDS = {"run": run, "build": build, "measure": measure, "tp": tp, "measure_tp": measure_tp, "quant": quant}

if __name__ == "__main__":
    flags.run(COMMANDS)
