"""Greedy generation speed side by side, on one set of random weights, in one run: microllama (default
attention, flash, compiled), transformers' LlamaForCausalLM.generate (eager; static cache + torch.compile)
and Meta's reference Llama3.generate at world size 1 (when llama-models and fairscale are installed).

    python tools/bench_decode.py                                               # tiny shapes, CPU, float32
    python tools/bench_decode.py --model llama3.2-1b --n_layers 4 --dtype bfloat16
    python tools/bench_decode.py --model llama3.1-8b --device cuda --batch_size 8

Weights are random (no checkpoint is read): speed depends on shapes, not values. Every system generates
gen_len tokens from the same prompt through its own whole generation loop; the first token's time is the
prefill, the rest are per-token decode steps. Warm-up (compilation included) runs once per system and is
reported apart. Timed runs go in alternating order (forward, then backward) and each figure is the median of
--repeats. The greedy tokens of every system are compared with microllama default's before any speed is
printed. Memory is what a run adds on top of what was resident before it (the weights): the peak allocated
on CUDA, the peak resident set on the CPU (sampled every millisecond). The bound is batch_size x the
device's copy bandwidth / the bytes of weights one step reads (all but the embedding table).
"""

import contextlib
import functools
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # microllama from this checkout

from microllama import flags  # noqa: E402
from microllama.args import ModelArgs  # noqa: E402
from microllama.checkpoint import family
from microllama.files import parse_dtype  # noqa: E402
from microllama.generation import Llama  # noqa: E402
from microllama.model import Transformer  # noqa: E402

SYSTEMS = ("microllama", "microllama-flash", "microllama-compiled", "transformers", "transformers-static-compile",
           "meta")  # fmt: skip


@dataclass
class StandInTokenizer:
    """What generation reads of a tokenizer when fed ids: a pad id, and a stop id no model emits (full lengths)."""

    pad_id: int
    stop_tokens: list[int]


@dataclass
class Run:
    tokens: list[list[int]]  # per row, the generated ids
    times: list[float]  # perf_counter at the start, then after each generated token
    peak_bytes: int  # memory added during the run


class MemoryPeak:
    """Peak memory added while active: CUDA's allocator statistics, or the resident set sampled each millisecond."""

    def __init__(self, device: torch.device):
        self.device, self.peak = device, 0

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    @contextlib.contextmanager
    def measure(self) -> Iterator[None]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            start = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            yield
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - start
            return
        start, top, done = self._rss(), [0], threading.Event()

        def sample() -> None:
            while not done.wait(0.001):
                top[0] = max(top[0], self._rss())

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()
            self.peak = max(top[0], self._rss()) - start


def _sync(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def microllama_system(model: Transformer, compile: bool) -> Callable[[torch.Tensor, int], tuple[list, list]]:
    """microllama's Llama.generate (greedy), timed through its on_token callback."""
    llama = Llama(model, StandInTokenizer(pad_id=-1, stop_tokens=[model.vocab_size]), compile=compile)
    device = model.output.weight.device

    def generate(prompt: torch.Tensor, gen_len: int) -> tuple[list, list]:
        times = [_sync(device)]
        tokens, _ = llama.generate(prompt.tolist(), max_gen_len=gen_len, temperature=0,
                                   on_token=lambda row, _: row == 0 and times.append(time.perf_counter()))  # fmt: skip
        return tokens, times

    generate.decoder = llama.decoder  # type: ignore[attr-defined]  # for step_alone
    return generate


def step_alone(decoder: Any, prompt: torch.Tensor, gen_len: int) -> float:
    """Seconds per decode step of decoder.forward called back to back, without the generation loop around it
    (sampling, stop checks, streaming): after a prefill of prompt, gen_len - 1 steps, synchronized once at the
    end. Its difference to the generation's per-token time is what the loop costs."""
    device = prompt.device
    tokens = prompt[:, -1:].clone()
    bsz, prompt_len = prompt.shape
    with torch.inference_mode(), decoder.kv_cache(bsz, prompt_len + gen_len):
        decoder.forward(prompt, 0)
        decoder.forward(tokens, prompt_len)  # a first step: CUDA graphs record on their second call
        t0 = _sync(device)
        for pos in range(prompt_len + 1, prompt_len + gen_len):
            decoder.forward(tokens, pos)
        return (_sync(device) - t0) / (gen_len - 1)


def transformers_system(hf_model: Any, static_compile: bool) -> Callable[[torch.Tensor, int], tuple[list, list]]:
    """transformers' generate (greedy), timed through a streamer; static_compile: cache_implementation="static",
    compiled as microllama compiles (inductor with freezing on the CPU, CUDA graphs on CUDA)."""
    from transformers import CompileConfig
    from transformers.generation.streamers import BaseStreamer

    device = hf_model.device
    settings: dict[str, Any] = {}
    if static_compile:
        cuda = device.type == "cuda"
        options = {"mode": "reduce-overhead"} if cuda else {"mode": None, "options": {"freezing": True}}
        config = CompileConfig(fullgraph=True, dynamic=False, **options)
        config._compile_all_devices = True  # transformers compiles only on accelerators unless told
        settings = {"cache_implementation": "static", "compile_config": config}

    class Clock(BaseStreamer):
        def __init__(self) -> None:
            self.times: list[float] = []

        def put(self, value: torch.Tensor) -> None:  # the prompt first, then each new token
            self.times.append(time.perf_counter())

        def end(self) -> None:
            pass

    def generate(prompt: torch.Tensor, gen_len: int) -> tuple[list, list]:
        clock = Clock()
        start = _sync(device)
        out = hf_model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=gen_len,
                                min_new_tokens=gen_len, do_sample=False, streamer=clock, pad_token_id=0,
                                eos_token_id=None, **settings)  # fmt: skip
        return out[:, prompt.shape[1] :].tolist(), [start] + clock.times[1:]

    return generate


def meta_system(meta_llama: Any) -> Callable[[torch.Tensor, int], tuple[list, list]]:
    """Meta's Llama3.generate (greedy) through reference_harness, timed as each step's results arrive."""
    from reference_harness.meta import meta_generate

    device = next(meta_llama.model.parameters()).device

    def generate(prompt: torch.Tensor, gen_len: int) -> tuple[list, list]:
        times = [_sync(device)]
        tokens, _ = meta_generate(meta_llama, prompt.tolist(), gen_len, 0.0, 1.0, step_times=times, logprobs=False)
        return tokens, times

    return generate


def build_systems(names: Sequence[str], params: dict[str, Any], weights: dict[str, torch.Tensor], dtype: torch.dtype,
                  device: torch.device, max_seq_len: int, batch_size: int) -> dict[str, Callable]:  # fmt: skip
    """Each named system, holding the same weights (transformers and Meta keep their own copies)."""
    systems = {}
    for name in names:
        if name.startswith("microllama"):
            args = ModelArgs.from_params(params, max_seq_len=max_seq_len, max_batch_size=batch_size,
                                         flash=name != "microllama")  # fmt: skip
            with torch.device("meta"):
                model = Transformer(args)
            model.load_state_dict(weights, assign=True)
            systems[name] = microllama_system(model.eval(), compile=name == "microllama-compiled")
        elif name.startswith("transformers"):
            from transformers import LlamaConfig, LlamaForCausalLM
            from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

            from microllama.checkpoint.hf_layout import config_from_params, hf_state_dict

            config = LlamaConfig(**config_from_params(params, tied=False, dtype=dtype))
            with torch.device("meta"):
                hf_model = LlamaForCausalLM(config)
            hf_model.load_state_dict(hf_state_dict(weights, params, tied=False), assign=True)
            hf_model.model.rotary_emb = LlamaRotaryEmbedding(config).to(device)  # its tables: not in a state dict
            systems[name] = transformers_system(hf_model.eval(), static_compile=name.endswith("compile"))
        elif name == "meta":
            from reference_harness.meta import meta_generator, meta_model_from_state_dict

            model = meta_model_from_state_dict(params, weights, dtype, max_seq_len, batch_size, str(device))
            systems[name] = meta_system(meta_generator(model, pad_id=-1, stop_tokens=[params["vocab_size"]]))
    return systems


def copy_bandwidth(device: torch.device, nbytes: int = 2**28) -> float:
    """Bytes per second a device-to-device copy moves (each byte read once and written once): the best of 5."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        t0 = _sync(device)
        dst.copy_(src)
        best = min(best, _sync(device) - t0)
    return 2 * nbytes / best


def benchmark(
    model: str = "tiny",
    device: str = "cpu",
    dtype: Optional[str] = None,
    n_layers: Optional[int] = None,
    batch_size: int = 1,
    prompt_len: int = 128,
    gen_len: int = 64,
    repeats: int = 3,
    systems: Optional[list[str]] = None,
    bandwidth: bool = True,
    threads: Optional[int] = None,
) -> dict[str, Any]:
    """Rows per system (prefill tok/s, decode ms per step and tok/s, memory, warm-up seconds, tokens equal to
    microllama default's) and the bandwidth bound; systems: names from SYSTEMS (default all; meta only when
    llama-models is installed); threads: torch's CPU threads (default: torch's own choice)."""
    for name, count in {
        "batch_size": batch_size,
        "prompt_len": prompt_len,
        "gen_len": gen_len,
        "repeats": repeats,
    }.items():
        if count < 1:
            raise ValueError(f"{name} must be at least 1, got {count}")
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be at least 1, got {threads}")
        torch.set_num_threads(threads)
    if gen_len < 2:
        raise ValueError(f"gen_len must be at least 2 (a prefill, then decode steps), got {gen_len}")
    names = list(systems) if systems is not None else [s for s in SYSTEMS if s != "meta" or _have_meta()]
    unknown = [s for s in names if s not in SYSTEMS]
    if unknown:
        raise ValueError(f"unknown system {unknown[0]!r}; systems: {', '.join(SYSTEMS)}")
    names = ["microllama"] + [s for s in names if s != "microllama"]  # first: the tokens' reference
    params = {**family.lookup(model).params}
    if n_layers is not None:
        params["n_layers"] = n_layers
    device_ = torch.device(device)
    if device_.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for, but torch sees no CUDA device")
    dtype_ = parse_dtype(dtype) if dtype else torch.bfloat16 if device_.type == "cuda" else torch.float32
    max_seq_len = prompt_len + gen_len

    # Random weights, drawn once in dtype on the device (no float32 copy of an 8B model).
    with torch.device("meta"):
        shell = Transformer(ModelArgs.from_params(params, max_seq_len=max_seq_len, max_batch_size=batch_size))
    shell = shell.to(dtype_).to_empty(device=device_)
    generator = torch.Generator(device=device_).manual_seed(0)
    for p in shell.parameters():
        p.data.normal_(0.0, p.shape[-1] ** -0.5, generator=generator)
    weights = shell.state_dict()
    prompt = torch.randint(0, params["vocab_size"], (batch_size, prompt_len), device=device_,
                           generator=torch.Generator(device=device_).manual_seed(1))  # fmt: skip
    step_bytes = sum(t.nbytes for k, t in weights.items() if k != "tok_embeddings.weight")

    runners = build_systems(names, params, weights, dtype_, device_, max_seq_len, batch_size)
    memory = MemoryPeak(device_)
    warm: dict[str, tuple[float, int]] = {}
    for name, generate in runners.items():
        with memory.measure():
            t0 = _sync(device_)
            generate(prompt, gen_len)  # warm-up: compilation, allocator, caches
            warm[name] = (_sync(device_) - t0, memory.peak)
    runs: dict[str, list[Run]] = {name: [] for name in runners}
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            with memory.measure():
                tokens, times = runners[name](prompt, gen_len)
                _sync(device_)
            runs[name].append(Run(tokens, times, memory.peak))

    reference = runs["microllama"][0].tokens
    rows = []
    for name in names:
        rs = runs[name]
        prefill = statistics.median(r.times[1] - r.times[0] for r in rs)
        per_token = statistics.median((r.times[-1] - r.times[1]) / (len(r.times) - 2) for r in rs)
        rows.append({
            "system": name,
            "prefill_tok_s": batch_size * prompt_len / prefill,
            "decode_ms_per_step": per_token * 1e3,
            "decode_tok_s": batch_size / per_token,
            "peak_bytes": max(r.peak_bytes for r in rs),
            "warm_up_s": warm[name][0],
            "warm_up_bytes": warm[name][1],
            "tokens": rs[0].tokens,
            "same_tokens": all(r.tokens == reference for r in rs),
            "first_difference": _first_difference(rs[0].tokens, reference),
        })  # fmt: skip
    bw = copy_bandwidth(device_) if bandwidth else None
    compiled = runners.get("microllama-compiled")
    return {
        "rows": rows,
        "batch_size": batch_size,
        "step_alone_s": None if compiled is None else step_alone(compiled.decoder, prompt, gen_len),
        "step_bytes": step_bytes,
        "bandwidth": bw,
        "bound_tok_s": None if bw is None else batch_size * bw / step_bytes,
        "shapes": f"{model}" + (f" cut to {n_layers} layers" if n_layers else ""),
        "dtype": str(dtype_).removeprefix("torch."),
        "device": str(device_),
        "threads": torch.get_num_threads(),
    }


def _have_meta() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("llama_models", "fairscale"))


def _first_difference(tokens: list[list[int]], reference: list[list[int]]) -> Optional[tuple[int, int]]:
    for row, (a, b) in enumerate(zip(tokens, reference, strict=True)):
        for i, (x, y) in enumerate(zip(a, b, strict=False)):
            if x != y:
                return row, i
        if len(a) != len(b):
            return row, min(len(a), len(b))
    return None


def format_report(result: dict[str, Any]) -> str:
    rows = result["rows"]
    base = next((r for r in rows if r["system"] == "microllama-compiled"), None)
    lines = [
        f"{result['shapes']}, {result['dtype']}, {result['device']} ({result['threads']} threads); "
        f"weights read per step {result['step_bytes'] / 2**20:.1f} MiB",
        f"{'system':<28} {'prefill tok/s':>13} {'ms/token':>9} {'tok/s':>8} {'vs compiled':>11} "
        f"{'peak +MiB':>9} {'warm-up s':>9} {'+MiB':>7}  greedy tokens",
    ]
    for r in rows:
        ratio = "-" if base is None else f"{r['decode_tok_s'] / base['decode_tok_s']:.2f}x"
        if r["same_tokens"]:
            same = "same as microllama"
        else:
            row, pos = r["first_difference"]
            same = f"DIFFER from microllama's (row {row}, token {pos})"
        lines.append(
            f"{r['system']:<28} {r['prefill_tok_s']:>13,.0f} {r['decode_ms_per_step']:>9.2f} {r['decode_tok_s']:>8.1f} "
            f"{ratio:>11} {r['peak_bytes'] / 2**20:>9.1f} {r['warm_up_s']:>9.1f} "
            f"{r['warm_up_bytes'] / 2**20:>7.0f}  {same}"
        )
    if result["step_alone_s"] is not None:
        step, loop = result["step_alone_s"], base["decode_ms_per_step"] / 1e3
        lines.append(
            f"microllama-compiled's decode step alone, back to back: {step * 1e3:.2f} ms "
            f"({result['batch_size'] / step:.1f} tok/s); the generation loop adds {(loop - step) * 1e3:.2f} ms"
        )
    if result["bandwidth"] is not None:
        best = max(rows, key=lambda r: r["decode_tok_s"])
        lines.append(
            f"copy bandwidth {result['bandwidth'] / 1e9:.1f} GB/s: bound {result['bound_tok_s']:.1f} tok/s; "
            f"fastest ({best['system']}) at {best['decode_tok_s'] / result['bound_tok_s']:.0%} of it"
        )
    return "\n".join(lines)


@functools.wraps(benchmark)  # the command line takes benchmark's flags
def main(**kwargs: Any) -> None:
    print(format_report(benchmark(**kwargs)))


if __name__ == "__main__":
    flags.run(main)
