"""Record a golden set with Meta's reference code, unmodified, under torchrun.

    torchrun --standalone --nproc_per_node N -m reference_harness.record --out DIR [--ckpt_dir DIR]
             [--device cpu|cuda] [--dtype float32|bfloat16]

Every rank runs Meta's tensor-parallel model (gloo on CPU, nccl on CUDA; Meta's build reshards a
one-shard checkpoint for N ranks); rank 0 writes the set through microllama.golden_format. `launch()`
starts torchrun from Python, and `record_goldens()` (tools/record_goldens.py) records and then verifies.
"""

import importlib.metadata
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from microllama.capture import long_context_ids, platform_fingerprint, run_cases, summarize_logits
from microllama.checkpoint import open_checkpoint
from microllama.files import tensor_sha256
from microllama.golden_format import (
    DTYPES,
    LONG_RANGE,
    SCHEMA_VERSION,
    LogitsSpec,
    LongRange,
    Manifest,
    ModelEntry,
    Outputs,
    Sampling,
    Versions,
    capture_points,
    checkpoint_entry,
    full_vocab_rows,
    set_name,
    write_set,
)
from microllama.verify import Comparison, format_comparison, verify

from .meta import meta_completions, meta_llama

REPO = Path(__file__).resolve().parents[1]
# The four classic prompts, then an empty one (BOS alone: a one-position forward, no mask) and a
# longer paragraph, so the cases span 1 to about 70 positions.
CLASSIC_PROMPTS = [
    "Clearly, the meaning of life is",
    "Simply put, the theory of relativity states that",
    "The repo llm.c on GitHub is",
    "Translate English to French:\n\n        sea otter => loutre de mer\n        peppermint => menthe poivrée\n"
    "        plush girafe => girafe peluche\n        cheese =>",
]
PROMPTS = CLASSIC_PROMPTS + [
    "",
    "In the first decades of the twentieth century, physicists found that light behaves both as a wave and as a "
    "particle. The debates this started between Bohr, Einstein and their students shaped how we think about "
    "measurement, chance, and what it means for a physical theory to be complete. Today,",
]
LONG_CONTEXT = 9000  # the long-range step is at position 9000, past RoPE's original 8,192
CHUNK = 512
TOP_K = 32
# Full-vocabulary rows cost 0.5 MB each in float32; two (a short and the long-range context) keep
# all committed sets under 10 MB. Every position keeps top-k, logsumexp and the sha256 of all bits.
FULL_VOCAB_CASES = ["prompt 0", LONG_RANGE]
MAX_GEN_LEN = 16
SEED = 1  # Meta's Llama3.build default


def sampling(prompts: list[str], max_gen_len: int) -> dict[str, Sampling]:
    """Completions in one batch each: greedy of the four classic prompts, seeded top-p of the three short
    ones. Meta's loop runs from the shortest prompt's end to the longest's plus max_gen_len, and top-p
    sorts the whole vocabulary at every step: this keeps checking all committed sets within seconds."""
    return {
        "greedy": Sampling(prompts=prompts[:4], temperature=0.0, top_p=0.9, max_gen_len=max_gen_len),
        "top_p": Sampling(prompts=prompts[:3], temperature=0.6, top_p=0.9, seed=SEED, max_gen_len=max_gen_len),
    }


def is_rank_0() -> bool:
    return int(os.environ.get("RANK", 0)) == 0


def progress(message: str) -> None:
    if is_rank_0():
        print(f"[record {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def record(
    out: str,
    ckpt_dir: Optional[str] = None,
    device: str = "cpu",
    dtype: str = "float32",
    prompts: Optional[list[str]] = None,
    long_context: int = LONG_CONTEXT,
    max_gen_len: int = MAX_GEN_LEN,
) -> None:
    """Run under torchrun: every rank computes, rank 0 writes the golden set to `out`. prompts,
    long_context and max_gen_len shrink the work for quick tests."""
    import torch.distributed as dist

    prompts = PROMPTS if prompts is None else list(prompts)
    ckpt = open_checkpoint(ckpt_dir)
    torch_dtype, world_size = DTYPES[dtype], int(os.environ.get("WORLD_SIZE", 1))
    max_seq_len = long_context + 256
    progress(f"Meta's Llama3.build: {ckpt.dir}, {device}, {torch_dtype}, world size {world_size}")
    llama = meta_llama(ckpt.dir, torch_dtype, max_seq_len, len(prompts), SEED, device, world_size)
    prompt_ids = [llama.formatter.encode_content(p).tokens for p in prompts]

    settings, completions = sampling(prompts, max_gen_len), {}
    for kind, s in settings.items():
        progress(f"{kind} completions of {len(s.prompts)} prompts, {max_gen_len} tokens")
        if s.seed is not None:
            torch.manual_seed(s.seed)  # as Llama3.build does: the draw does not depend on earlier work
        completions[kind], _ = meta_completions(llama, s.prompts, s.temperature, s.top_p, max_gen_len)

    progress(f"forward passes with capture hooks; long-range step at position {long_context}")
    long_ids = long_context_ids(long_context + 1)
    records = run_cases(llama.model, prompt_ids, long_ids.tolist(), CHUNK, progress=is_rank_0())

    if is_rank_0():
        manifest = Manifest(
            schema=SCHEMA_VERSION,
            recorded_by="reference_harness.record: Meta's llama-models Llama3.build / completion, unmodified",
            model=ModelEntry(params=ckpt.params, max_seq_len=max_seq_len, max_batch_size=len(prompts)),
            checkpoint=checkpoint_entry(ckpt),
            dtype=dtype,
            device=device,
            world_size=world_size,
            versions=Versions(
                torch=torch.__version__,
                llama_models=importlib.metadata.version("llama-models"),
                fairscale=importlib.metadata.version("fairscale"),
                numpy=np.__version__,
                python=sys.version.split()[0],
            ),
            platform=platform_fingerprint(device),
            prompts=prompts,
            completions=settings,
            long_range=LongRange(context=long_context, chunk=CHUNK, ids="numpy PCG64 seed 0"),
            logits=LogitsSpec(top_k=TOP_K, full_vocab_cases=FULL_VOCAB_CASES),
            capture_points=capture_points(len(llama.model.layers)),
        )
        outputs = Outputs(
            prompt_ids=prompt_ids,
            completions=completions,
            completion_text={k: [llama.tokenizer.decode(t) for t in v] for k, v in completions.items()},
            logits_sha256=[tensor_sha256(t) for t in records.logits],
            rows=records.rows,
        )
        full_rows = full_vocab_rows(records.rows, FULL_VOCAB_CASES)
        activations = {name: t.numpy() for name, t in records.activations.items()}
        write_set(out, manifest, outputs, summarize_logits(records.logits, TOP_K, full_rows), activations, long_ids)
        progress(f"wrote {out}")
    dist.barrier()
    dist.destroy_process_group()


def launch(
    out: Union[str, Path],
    ckpt_dir: Optional[Union[str, Path]] = None,
    device: str = "cpu",
    dtype: str = "float32",
    world_size: int = 1,
    prompts: Optional[list[str]] = None,
    long_context: int = LONG_CONTEXT,
    max_gen_len: int = MAX_GEN_LEN,
) -> Path:
    """Record a golden set in a torchrun subprocess of world_size ranks; its progress goes to stderr."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world_size}",
           "-m", "reference_harness.record", f"--out={Path(out).resolve()}", f"--device={device}",
           f"--dtype={dtype}", f"--long_context={long_context}", f"--max_gen_len={max_gen_len}"]  # fmt: skip
    if ckpt_dir is not None:
        cmd.append(f"--ckpt_dir={ckpt_dir}")
    if prompts is not None:
        cmd.append(f"--prompts={json_list(prompts)}")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // world_size)))
    result = subprocess.run(cmd, cwd=REPO, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"recording failed: torchrun exited with status {result.returncode} ({' '.join(cmd)})")
    return Path(out)


def json_list(items: list[str]) -> str:
    """A list argument fire reads back as the same list of strings."""
    return json.dumps(list(items))


@dataclass(frozen=True, kw_only=True)
class RecordCheck:
    """microllama against a fresh recording."""

    out: Path
    fresh: Comparison

    @property
    def diverged(self) -> bool:
        return not self.fresh.passed


def record_goldens(
    out: Optional[str] = None,
    ckpt_dir: Optional[str] = None,
    device: str = "cpu",
    dtype: str = "float32",
    world_size: int = 1,
) -> RecordCheck:
    """Record a golden set with Meta's code (default: the embedded tiny checkpoint into
    goldens/<name>), then check microllama against it and print the per-capture-point table."""
    if out is None:
        out = REPO / "goldens" / set_name(checkpoint_entry(open_checkpoint(ckpt_dir)), dtype, device, world_size)
    start = time.time()
    launch(out, ckpt_dir, device, dtype, world_size)
    print(f"recorded {out} in {time.time() - start:.1f} s; checking microllama against it", file=sys.stderr)
    fresh = verify(out, ckpt_dir, device, progress=True)
    print(format_comparison(fresh))
    return RecordCheck(out=Path(out), fresh=fresh)


if __name__ == "__main__":
    import fire

    fire.Fire(record)
