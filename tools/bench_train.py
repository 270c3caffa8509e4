"""Training speed and peak memory per mode, with and without activation checkpointing and the chunked
cross-entropy: microllama.train.loop's own train_step on random weights and random tokens.

    python tools/bench_train.py                                            # tiny shapes, CPU
    python tools/bench_train.py --model llama3.2-1b --n_layers 2 --seq_len 128 --batch_size 1
    python tools/bench_train.py --model llama3.1-8b --device cuda --seq_len 2048 --batch_size 1   # then 2
    python tools/bench_train.py --model llama3.2-1b --n_layers 2 --modes '["lora", "qlora"]' --dtype bfloat16
    python tools/bench_train.py --model llama3.2-1b --n_layers 4 --seq_len 128 --batch_size 1 --dtype bfloat16 \
        --modes '["lora", "qlora"]' --variants '["ckpt+chunk"]' --repeats 2 --steps 2

Each row runs in a fresh process (spawned), so that its peak memory is its own: on CUDA the peak of
torch.cuda.max_memory_allocated, on the CPU the process's peak resident set (which includes Python and
torch themselves: the `baseline` row, a process that only imports torch and allocates the data). Speed is
the median over --steps timed steps after one warm-up step, in tokens (batch_size x seq_len) per second.
Weights are random and drawn in the model's dtype on the device (no float32 copy of an 8B model).

The step's own memory, apart from the process's (whose peak on the CPU also holds what building the model took,
such as NF4's quantizer): `model` is what the process holds once the model is built (CPU: resident set, after
glibc's malloc_trim gives back what building freed; CUDA: allocated), `step peak` the most it holds during the
timed steps (their peak is reset after the warm-up step: CPU trimmed, then /proc/self/clear_refs; CUDA
reset_peak_memory_stats), and `step adds` the difference: gradients,
AdamW's state (made by the warm-up step), activations, logits and, under QLoRA, each NF4 weight dequantized.
--repeats N runs every row N times in turn (lora, qlora, lora, qlora, ...), so that a machine's drift over the
run falls on each mode alike.
"""

import ctypes
import functools
import json
import multiprocessing
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # microllama from this checkout

from microllama import flags  # noqa: E402

VARIANTS = {"plain": (False, 0), "ckpt+chunk": (True, 1024)}  # activation checkpointing, loss_chunk
MODES = ("full", "lora", "norms", "qlora")  # qlora: --mode lora --quantize nf4 (needs torchao)


def _clock(device: Any) -> float:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _trim_heap() -> None:
    """Give freed heap pages back to the kernel (glibc's malloc_trim), so that the resident set counts live memory
    rather than what an earlier phase (NF4's quantizer, a warm-up step) freed and the allocator kept; elsewhere
    nothing."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _held(device: Any) -> int:
    """Bytes this process holds now: CUDA's allocated memory, or the CPU's resident set (heap trimmed first)."""
    import torch

    from tools.bench_load import status_bytes

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.memory_allocated(device)
    _trim_heap()
    return status_bytes("VmRSS")


def _reset_peak(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        _trim_heap()
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux 4.0 and later)


def _peak_since_reset(device: Any) -> int:
    import torch

    from tools.bench_load import status_bytes

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    return status_bytes("VmHWM")


def run_row(row: dict[str, Any]) -> dict[str, Any]:
    """One configuration, in this process: build, warm up, time; returns the row with its figures."""
    import torch

    from microllama.args import ModelArgs
    from microllama.checkpoint import family
    from microllama.files import parse_dtype
    from microllama.model import Transformer
    from microllama.quantize import is_dense, is_quantized_key, quantize_weight
    from microllama.train.config import TrainConfig
    from microllama.train.data import Batch
    from microllama.train.loop import make_optimizer, peak_memory_gib, select_trainable, train_step

    if row["threads"]:
        torch.set_num_threads(row["threads"])
    device, dtype = torch.device(row["device"]), parse_dtype(row["dtype"])
    params = {**family.lookup(row["model"]).params}
    if row["n_layers"]:
        params["n_layers"] = row["n_layers"]
    args = ModelArgs.from_params(params, max_seq_len=row["seq_len"], flash=row["flash"])
    g = torch.Generator(device=device).manual_seed(0)
    tokens = torch.randint(0, args.vocab_size, (row["batch_size"], row["seq_len"] + 1), device=device, generator=g)
    batch = Batch(tokens[:, :-1], tokens[:, 1:], torch.zeros_like(tokens[:, :-1]))  # one document per row
    if row["mode"] == "baseline":
        return {**row, "tok_s": None, "peak_gib": peak_memory_gib(device)}
    with torch.device("meta"):
        model = Transformer(args).to(dtype)
    quantize = "nf4" if row["mode"] == "qlora" else None
    # Each weight drawn on the device in turn, and for qlora quantized at once: the dense model never exists whole.
    for name, module in model.named_modules():
        for key, p in list(module.named_parameters(recurse=False)):
            w = torch.empty(p.shape, dtype=dtype, device=device).normal_(0.0, p.shape[-1] ** -0.5, generator=g)
            if quantize is not None and is_quantized_key(f"{name}.{key}"):
                w = quantize_weight(w, quantize, f"{name}.{key}")
            setattr(module, key, torch.nn.Parameter(w, requires_grad=is_dense(w)))
    model.train()
    checkpointing, chunk = VARIANTS[row["variant"]]
    model.activation_checkpointing = checkpointing
    mode = "lora" if row["mode"] == "qlora" else row["mode"]
    cfg = TrainConfig(data="-", mode=mode, loss_chunk=chunk, lora_targets=["wq", "wv"], quantize=quantize)
    trainable = select_trainable(model, cfg)
    optimizer = make_optimizer(trainable, cfg, device)
    model_bytes = _held(device)
    times = []
    for step in range(row["steps"] + 1):  # the first is a warm-up
        if step == 1:
            _reset_peak(device)
        start = _clock(device)
        train_step(model, trainable, optimizer, [batch], 1e-5, cfg)
        times.append(_clock(device) - start)
    tokens_per_step = row["batch_size"] * row["seq_len"]
    step_peak = _peak_since_reset(device)
    return {**row, "tok_s": tokens_per_step / statistics.median(times[1:]), "peak_gib": peak_memory_gib(device),
            "trainable": sum(p.numel() for p in trainable), "model_gib": model_bytes / 2**30,
            "step_peak_gib": step_peak / 2**30, "step_adds_gib": (step_peak - model_bytes) / 2**30}  # fmt: skip


def _child(row: dict[str, Any], queue: Any) -> None:
    try:
        queue.put(run_row(row))
    except Exception as e:  # reported in the table, not lost in a child's traceback
        queue.put({**row, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"})


def benchmark(
    model: str = "tiny",
    n_layers: Optional[int] = None,
    device: str = "cpu",
    dtype: Optional[str] = None,
    seq_len: int = 256,
    batch_size: int = 4,
    steps: int = 3,
    modes: Optional[list[str]] = None,
    variants: Optional[list[str]] = None,
    flash: bool = False,
    threads: int = 0,
    repeats: int = 1,
) -> list[dict[str, Any]]:
    """One row per mode (full, lora, norms; qlora: lora over a base whose blocks' linear layers are NF4, on request)
    and variant (plain; ckpt+chunk: activation checkpointing and a 1,024-position cross-entropy chunk), each in its
    own process, after a baseline row; all of them `repeats` times in turn."""
    for name, count in {"seq_len": seq_len, "batch_size": batch_size, "steps": steps, "repeats": repeats}.items():
        if count < 1:
            raise ValueError(f"--{name} must be at least 1, got {count}")
    modes, variants = modes or ["full", "lora", "norms"], variants or list(VARIANTS)
    unknown = [v for v in variants if v not in VARIANTS] + [m for m in modes if m not in MODES]
    if unknown:
        raise ValueError(f"unknown mode or variant {unknown[0]!r}: modes {', '.join(MODES)}; variants "
                         f"{', '.join(VARIANTS)}")  # fmt: skip
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda was asked for, but torch sees no CUDA device")
    dtype = dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    base = dict(model=model, n_layers=n_layers, device=device, dtype=dtype, seq_len=seq_len, batch_size=batch_size,
                steps=steps, flash=flash, threads=threads)  # fmt: skip
    rows = [dict(base, mode="baseline", variant="-")]
    rows += [dict(base, mode=m, variant=v) for _ in range(repeats) for m in modes for v in variants]
    context = multiprocessing.get_context("spawn")
    results = []
    for row in rows:
        queue = context.Queue()
        child = context.Process(target=_child, args=(row, queue))
        child.start()
        result = queue.get()
        child.join()
        results.append(result)
        print(json.dumps(result), file=sys.stderr, flush=True)
    return results


@functools.wraps(benchmark)  # the command line takes benchmark's flags
def main(**kwargs: Any) -> None:
    results = benchmark(**kwargs)
    first = results[0]
    layers = f", {first['n_layers']} layers" if first["n_layers"] else ""
    print(f"{first['model']}{layers}, {first['dtype']}, {first['device']}, batch {first['batch_size']} x "
          f"{first['seq_len']} tokens")  # fmt: skip
    print(f"{'mode':<9} {'variant':<11} {'trainable':>12} {'tokens/s':>10} {'peak GiB':>9} {'model':>7} "
          f"{'step peak':>9} {'step adds':>9}")  # fmt: skip
    for r in results:
        if "error" in r:
            print(f"{r['mode']:<9} {r['variant']:<11} {r['error']}")
            continue
        trainable = f"{r['trainable']:,}" if "trainable" in r else "-"
        speed = f"{r['tok_s']:,.0f}" if r["tok_s"] else "-"
        step = (f"{r['model_gib']:>7.2f} {r['step_peak_gib']:>9.2f} {r['step_adds_gib']:>9.2f}" if "model_gib" in r
                else f"{'-':>7} {'-':>9} {'-':>9}")  # fmt: skip
        print(f"{r['mode']:<9} {r['variant']:<11} {trainable:>12} {speed:>10} {r['peak_gib']:>9.2f} {step}")
    for line in step_ratios(results):
        print(line)


def step_ratios(results: list[dict[str, Any]]) -> list[str]:
    """For qlora beside lora (same variant), the ratio of their medians of step peak and of step adds."""
    lines = []
    for variant in dict.fromkeys(r["variant"] for r in results):
        rows = {m: [r for r in results if r["mode"] == m and r["variant"] == variant and "model_gib" in r]
                for m in ("lora", "qlora")}  # fmt: skip
        if rows["lora"] and rows["qlora"]:
            peak, adds = ({m: statistics.median(r[k] for r in rows[m]) for m in rows}
                          for k in ("step_peak_gib", "step_adds_gib"))  # fmt: skip
            lines.append(f"qlora / lora ({variant}, medians of {len(rows['qlora'])} and {len(rows['lora'])}): step "
                         f"peak {peak['qlora']:.2f} / {peak['lora']:.2f} GiB = {peak['qlora'] / peak['lora']:.2f}x, "
                         f"step adds {adds['qlora']:.2f} / {adds['lora']:.2f} GiB")  # fmt: skip
    return lines


if __name__ == "__main__":
    flags.run(main)
