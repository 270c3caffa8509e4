"""Running a golden set's cases on a model and capturing what it computes: forward hooks on the capture
points, the prompts and the long-range case, and the compact record of the logits. The same code drives
Meta's model (in reference_harness/record.py) and microllama's (in microllama/verify.py): it needs only
Meta's module names, which microllama keeps."""

import contextlib
import hashlib
import os
import platform
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from ..checkpoint.load import Checkpoint
from ..checkpoint.tiny import SHA256 as TINY_SHA256
from .inference_set import LONG_RANGE, LogitsSummary, Row, capture_points
from .schema import CheckpointEntry, Platform


@contextlib.contextmanager
def capturing(model: nn.Module, into: dict[str, list[torch.Tensor]]) -> Iterator[None]:
    """While active, append each capture point's activation of batch row 0 (seqlen, dim), as float32 on
    the CPU, to into[name]. `layers.N.residual_attention` is h = x + attention, the input of ffn_norm
    (taken by a forward pre-hook); every other point is the output of the module of that name."""

    def keep(name: str, tensor: torch.Tensor) -> None:
        into.setdefault(name, []).append(tensor[0].detach().float().cpu())

    handles = []
    try:
        for name in capture_points(len(model.layers)):
            if name.endswith(".residual_attention"):
                module = model.get_submodule(name.replace("residual_attention", "ffn_norm"))
                handles.append(module.register_forward_pre_hook(lambda m, args, name=name: keep(name, args[0])))
            else:
                module = model.get_submodule(name)
                handles.append(module.register_forward_hook(lambda m, args, out, name=name: keep(name, out)))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def last_position_logits(model: nn.Module) -> Iterator[None]:
    """While active, the output layer sees only the last position: a prefill of thousands of positions
    then costs no (positions x vocab) logits. The layers, and so the KV cache, compute as usual."""
    handle = model.output.register_forward_pre_hook(lambda m, args: (args[0][:, -1:],))
    try:
        yield
    finally:
        handle.remove()


@dataclass(frozen=True, kw_only=True)
class Records:
    """What one model computed for a golden set's cases."""

    logits: list[torch.Tensor]  # per case, float32 (rows, vocab) on the CPU
    activations: dict[str, torch.Tensor]  # capture point -> (rows, dim) float32, cases concatenated
    rows: list[Row]  # per case


def long_context_ids(length: int, vocab_size: int = 128000, seed: int = 0) -> np.ndarray:
    """Token ids for the long-range case: `length` ids drawn from numpy's PCG64 (machine-independent)."""
    return np.random.Generator(np.random.PCG64(seed)).integers(0, vocab_size, length, dtype=np.int64).astype(np.int32)


@torch.inference_mode()
def run_cases(
    model: nn.Module,
    prompt_ids: Sequence[Sequence[int]],
    long_ids: Sequence[int],
    chunk: int,
    cache: Optional[contextlib.AbstractContextManager] = None,
    progress: bool = False,
    decode_step: Optional[Callable[[torch.Tensor, int], torch.Tensor]] = None,
) -> Records:
    """Each prompt's forward from position 0, then the long-range case: long_ids[:-1] prefilled in
    chunks of `chunk` positions, and one decode step for long_ids[-1]. `cache` is entered around the
    long-range case (microllama's `model.kv_cache(...)`; Meta's model always has one). decode_step(tokens,
    start_pos) makes that step (default model.forward; a CompiledDecoder's forward checks the compiled
    step). progress: bars on stderr."""
    device = model.output.weight.device
    captured: dict[str, list[torch.Tensor]] = {}
    logits, rows, first_row = [], [], 0
    with capturing(model, captured):
        for i, ids in enumerate(tqdm(prompt_ids, "forward, prompts", disable=not progress, file=sys.stderr)):
            tokens = torch.tensor([list(ids)], dtype=torch.long, device=device)
            logits.append(model.forward(tokens, 0)[0].float().cpu())
            rows.append(Row(case=f"prompt {i}", first_row=first_row, n_rows=len(ids), start_pos=0))
            first_row += len(ids)
    long_tokens = torch.tensor([list(long_ids)], dtype=torch.long, device=device)
    step = long_tokens.shape[1] - 1
    with cache or contextlib.nullcontext():
        with last_position_logits(model), tqdm(total=step, desc="long-range prefill", unit="tok",
                                               disable=not progress, file=sys.stderr) as bar:  # fmt: skip
            for start in range(0, step, chunk):
                model.forward(long_tokens[:, start : min(start + chunk, step)], start)
                bar.update(min(chunk, step - start))
        with capturing(model, captured):
            logits.append((decode_step or model.forward)(long_tokens[:, step:], step)[0].float().cpu())
    rows.append(Row(case=LONG_RANGE, first_row=first_row, n_rows=1, start_pos=step))
    return Records(logits=logits, activations={name: torch.cat(parts) for name, parts in captured.items()}, rows=rows)


def summarize_logits(logits: Sequence[torch.Tensor], top_k: int, full_vocab_rows: Sequence[int]) -> LogitsSummary:
    """The compact record of the logits: top-k values and indices and logsumexp per row, and the full
    rows numbered in full_vocab_rows."""
    rows = torch.cat(list(logits))
    values, indices = rows.topk(top_k, dim=-1)
    return LogitsSummary(
        topk_values=values.numpy(),
        topk_indices=indices.to(torch.int32).numpy(),
        logsumexp=torch.logsumexp(rows, dim=-1).numpy(),
        full_vocab=rows[list(full_vocab_rows)].numpy(),
    )


def checkpoint_entry(ckpt: Checkpoint) -> CheckpointEntry:
    """The manifest's checkpoint entry for ckpt (reads its tensors for the sha256). A directory holding an
    embedded tiny checkpoint's exact tensors is named as that tiny checkpoint."""
    digest = ckpt.sha256()
    tiny = next((name for name, sha in TINY_SHA256.items() if sha == digest), None)
    shards = len(ckpt.weight_files) if ckpt.layout == "meta" else 0
    return CheckpointEntry(tiny=tiny, dir=None if tiny else str(ckpt.dir.resolve()), sha256=digest, shards=shards)


def platform_fingerprint(device: Union[str, torch.device]) -> Platform:
    """What decides the bits of a float computation here: CPU ISA (ATen's and oneDNN's cap, which can be lowered
    apart: ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA), torch build, torch's CPU threads, and the GPU if used."""
    gpu = torch.device(device).type == "cuda"
    return Platform(
        machine=platform.machine(),
        torch=torch.__version__,
        cpu_capability=torch.backends.cpu.get_cpu_capability(),
        torch_config_sha256=hashlib.sha256(torch.__config__.show().encode()).hexdigest(),
        gpu=torch.cuda.get_device_name(torch.device(device)) if gpu else None,
        cuda=str(torch.version.cuda) if gpu else None,
        threads=None if gpu else torch.get_num_threads(),
        onednn_max_cpu_isa=None if gpu else os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA"),
    )


@contextlib.contextmanager
def cpu_threads(n: Optional[int]) -> Iterator[None]:
    """torch's CPU thread count set to n inside the block (None: left as it is). The count, not the number
    of cores, decides how a CPU sum is split: a recording's count reproduces its bits on any machine of
    the same ISA and torch build."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
