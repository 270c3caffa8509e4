"""Prefill and decode speed of the model with its KV cache, default and flash attention side by side.

    python tools/bench_decode.py                                   # tiny checkpoint shapes, CPU
    python tools/bench_decode.py --model llama3.1-8b --device cuda  # 8B shapes, random bf16 weights

Weights are random (no checkpoint is read): speed depends on shapes, not values. Each figure is the
median of --repeats runs after one warm-up; CUDA work is synchronised before each clock read. The
decode loop feeds back the argmax, as greedy generation does.
"""

import functools
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # microllama from this checkout

from microllama import cli, family  # noqa: E402
from microllama.files import parse_dtype  # noqa: E402
from microllama.model import ModelArgs, Transformer  # noqa: E402


def _clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@torch.inference_mode()
def decode_run(model: Transformer, batch_size: int, prompt_len: int, gen_len: int) -> tuple[float, float, list]:
    """Seconds for the prefill, seconds per decoded token, and the decoded ids."""
    device = model.output.weight.device
    tokens = torch.randint(0, model.vocab_size, (batch_size, prompt_len), device=device,
                           generator=torch.Generator(device=device).manual_seed(0))  # fmt: skip
    with model.kv_cache(batch_size, prompt_len + gen_len):
        t0 = _clock(device)
        next_token = model(tokens, 0)[:, -1].argmax(-1, keepdim=True)
        t1 = _clock(device)
        out = [next_token]
        for pos in range(prompt_len, prompt_len + gen_len - 1):
            next_token = model(next_token, pos)[:, -1].argmax(-1, keepdim=True)
            out.append(next_token)
        t2 = _clock(device)
    return t1 - t0, (t2 - t1) / max(gen_len - 1, 1), torch.cat(out, 1).tolist()


def benchmark(
    model: str = "tiny",
    device: str = "cpu",
    dtype: Optional[str] = None,
    n_layers: Optional[int] = None,
    batch_size: int = 1,
    prompt_len: int = 128,
    gen_len: int = 64,
    repeats: int = 3,
) -> list[dict]:
    """One row per attention path: prefill tokens/s, decode ms/token and tokens/s, peak GPU memory."""
    for name, count in {
        "batch_size": batch_size,
        "prompt_len": prompt_len,
        "gen_len": gen_len,
        "repeats": repeats,
    }.items():
        if count < 1:
            raise ValueError(f"{name} must be at least 1, got {count}")
    params = {**family.lookup(model).params}
    if n_layers is not None:
        params["n_layers"] = n_layers
    device_ = torch.device(device)
    if device_.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for, but torch sees no CUDA device")
    dtype_ = parse_dtype(dtype) if dtype else torch.bfloat16 if device_.type == "cuda" else torch.float32
    rows = []
    weights = None
    for flash in (False, True):
        args = ModelArgs.from_params(params, max_seq_len=prompt_len + gen_len, max_batch_size=batch_size, flash=flash)
        with torch.device("meta"):
            net = Transformer(args).to(dtype_)
        if weights is None:  # random weights, drawn once in dtype on the device: no float32 copy of an 8B model
            net = net.to_empty(device=device_)
            generator = torch.Generator(device=device_).manual_seed(0)
            for p in net.parameters():
                p.data.normal_(0.0, p.shape[-1] ** -0.5, generator=generator)
            weights = net.state_dict()
        else:  # both paths run the same tensors
            net.load_state_dict(weights, assign=True)
        net.eval()
        if device_.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device_)
        decode_run(net, batch_size, prompt_len, min(gen_len, 4))  # warm-up
        runs = [decode_run(net, batch_size, prompt_len, gen_len) for _ in range(repeats)]
        prefill, per_token = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
        rows.append({
            "path": "flash" if flash else "default",
            "prefill_tok_s": batch_size * prompt_len / prefill,
            "decode_ms_per_step": per_token * 1e3,
            "decode_tok_s": batch_size / per_token,
            "peak_gpu_gib": torch.cuda.max_memory_allocated(device_) / 2**30 if device_.type == "cuda" else None,
            "tokens": runs[0][2],
        })  # fmt: skip
        del net
    return rows


@functools.wraps(benchmark)  # the command line takes benchmark's flags
def main(**kwargs: Any) -> None:
    rows = benchmark(**kwargs)
    print(f"{'path':<8} {'prefill tok/s':>14} {'decode ms/step':>15} {'decode tok/s':>13} {'peak GPU GiB':>13}")
    for r in rows:
        gib = "-" if r["peak_gpu_gib"] is None else f"{r['peak_gpu_gib']:.2f}"
        print(f"{r['path']:<8} {r['prefill_tok_s']:>14.1f} {r['decode_ms_per_step']:>15.3f} "
              f"{r['decode_tok_s']:>13.1f} {gib:>13}")  # fmt: skip
    same = rows[0]["tokens"] == rows[1]["tokens"]
    print(f"greedy ids from both paths {'identical' if same else 'differ (near-ties in low precision)'}")


if __name__ == "__main__":
    cli.run(main)
