"""Peak memory of prefilling one long prompt through the KV cache: at once or in chunks, side by side.

    python tools/bench_prefill.py run                            # the tiny checkpoint, 8,192 positions, float32
    python tools/bench_prefill.py run --positions 16384 --chunks '["0", "2048", "512"]'
    python tools/bench_prefill.py run --device cuda --dtype bfloat16

Each case runs in a fresh process: the model is loaded and its KV cache (1 x positions) allocated and written
before the baseline, so the figure is what the prefill itself adds: the rise of the peak resident set over the
resident set before it on the CPU (the peak is reset through /proc/self/clear_refs first), of
torch.cuda.max_memory_allocated on CUDA. Chunk "all" is the default path (one shot, every position projected to
float32 logits, as Meta's code does), 0 one shot with the last position's logits alone, N chunks of N positions.
Seconds are wall time of the prefill on a machine that may be shared: reported, not a measurement of speed.
"""

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # microllama from this checkout

from microllama import flags  # noqa: E402
from microllama.generation import Llama  # noqa: E402
from microllama.memory import format_bytes  # noqa: E402
from tools.bench_load import status_bytes  # noqa: E402


def measure(
    positions: int, chunk: str, ckpt_dir: str = "tiny", dtype: str = "float32", device: str = "cpu",
    flash: bool = False,
) -> dict:  # fmt: skip
    """In this process: prefill `positions` random token ids through a fresh KV cache (chunk: "all", "0" or a
    number of positions, see the module's docstring) and return the memory figures."""
    prefill_chunk = None if chunk == "all" else positions if chunk == "0" else int(chunk)
    llama = Llama.build(ckpt_dir, positions, 1, device, dtype, flash=flash, prefill_chunk=prefill_chunk)
    tokens = torch.randint(0, 128000, (1, positions), generator=torch.Generator().manual_seed(0)).to(device)
    with torch.inference_mode(), llama.decoder.kv_cache(1, positions):
        cuda = device.startswith("cuda")
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux 4.0 and later)
            before = status_bytes("VmRSS")
        start = time.perf_counter()
        logits = llama.forward(tokens, 0, positions)
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        peak = (torch.cuda.max_memory_allocated() if cuda else status_bytes("VmHWM")) - before
    return {"positions": positions, "chunk": chunk, "dtype": dtype, "device": device, "flash": flash,
            "logits_rows": logits.shape[1], "kv_cache_bytes": llama.model.check_cache_fits(1, positions),
            "peak_bytes": peak, "seconds": round(seconds, 2)}  # fmt: skip


def report(
    positions: int, chunk: str, ckpt_dir: str = "tiny", dtype: str = "float32", device: str = "cpu",
    flash: bool = False,
) -> None:  # fmt: skip
    """Print measure's figures as one JSON line."""
    print(json.dumps(measure(positions, chunk, ckpt_dir, dtype, device, flash)))


def run(
    positions: int = 8192, chunks: Optional[list[str]] = None, ckpt_dir: str = "tiny", dtype: str = "float32",
    device: str = "cpu", flash: bool = False,
) -> None:  # fmt: skip
    """Measure each of --chunks (a JSON list; default ["all", "0", "2048", "512"]) in a fresh process and print
    one table."""
    rows = []
    for chunk in chunks or ["all", "0", "2048", "512"]:
        cmd = [sys.executable, __file__, "measure", str(positions), chunk, f"--ckpt_dir={ckpt_dir}",
               f"--dtype={dtype}", f"--device={device}", f"--flash={flash}"]  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"chunk {chunk}: {(out.stderr.strip().splitlines() or ['failed'])[-1]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"prefill of {positions:,} positions, {ckpt_dir}, {dtype}, {device}, {'flash' if flash else 'default'} "
          f"attention; KV cache {format_bytes(rows[0]['kv_cache_bytes'])}")  # fmt: skip
    print(f"{'chunk':>8} {'logits rows':>12} {'peak memory':>12} {'seconds':>8}")
    for r in rows:
        print(f"{r['chunk']:>8} {r['logits_rows']:>12,} {format_bytes(r['peak_bytes']):>12} {r['seconds']:>8}")


if __name__ == "__main__":
    flags.run({"run": run, "measure": report})
