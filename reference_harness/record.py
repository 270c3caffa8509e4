"""Record a golden set with Meta's reference code, unmodified, under torchrun.

    torchrun --standalone --nproc_per_node N -m reference_harness.record --out DIR [--ckpt_dir DIR]
             [--device cpu|cuda] [--dtype float32|bfloat16]

Every rank runs Meta's tensor-parallel model (gloo on CPU, nccl on CUDA; Meta's build reshards a
one-shard checkpoint for N ranks); rank 0 writes the set through microllama.golden.inference_set. `launch()`
checks a request and starts torchrun from Python, and `record_goldens()` (tools/record_goldens.py)
records into the cache and checks microllama against that recording and against the committed set.
"""

import contextlib
import importlib.metadata
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from microllama.checkpoint.load import Checkpoint, open_checkpoint
from microllama.checkpoint.tiny import cache_dir
from microllama.distributed.launch import is_rank_0, torchrun_world_size
from microllama.files import tensor_sha256
from microllama.golden.capture import (
    checkpoint_entry,
    long_context_ids,
    platform_fingerprint,
    run_cases,
    summarize_logits,
)
from microllama.golden.inference_set import (
    LONG_RANGE,
    ChatOutputs,
    ChatReply,
    ChatSampling,
    ChatSpec,
    LogitsSpec,
    LongRange,
    Manifest,
    Outputs,
    Sampling,
    capture_points,
    chat_message,
    data_files,
    full_vocab_rows,
    is_golden_set,
    write_set,
)
from microllama.golden.schema import (
    DEVICE_TYPES,
    DTYPES,
    SCHEMA_VERSION,
    ModelEntry,
    Versions,
    check_writable,
    device_type,
    set_name,
    to_json,
)
from microllama.golden.verify import Comparison, format_comparison, verify

from .dialogs import CHAT_DIALOGS
from .meta import meta_chat_completions, meta_chat_prompt_ids, meta_completions, meta_llama

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
# After Ctrl-C or SIGTERM, how long torchrun gets to stop: its own shutdown gives its workers 30 s, then kills them.
GRACE_S = 40


def sampling(prompts: list[str], max_gen_len: int) -> dict[str, Sampling]:
    """Completions in one batch each: greedy of the four classic prompts, seeded top-p of the three short
    ones. Meta's loop runs from the shortest prompt's end to the longest's plus max_gen_len, and top-p
    sorts the whole vocabulary at every step: this keeps checking all committed sets within seconds."""
    return {
        "greedy": Sampling(prompts=prompts[:4], temperature=0.0, top_p=0.9, max_gen_len=max_gen_len),
        "top_p": Sampling(prompts=prompts[:3], temperature=0.6, top_p=0.9, seed=SEED, max_gen_len=max_gen_len),
    }


def chat_spec(max_gen_len: int) -> ChatSpec:
    """The four fixed dialogs (reference_harness.dialogs), answered in one batch greedily and in one with seeded
    top-p. Tool calls in json: Meta's chat_completion (llama-models 0.3.0) encodes json whatever it is asked."""
    return ChatSpec(
        dialogs=[[chat_message(m) for m in dialog] for dialog in CHAT_DIALOGS],
        tool_prompt_format="json",
        completions={
            "greedy": ChatSampling(temperature=0.0, top_p=0.9, max_gen_len=max_gen_len),
            "top_p": ChatSampling(temperature=0.6, top_p=0.9, seed=SEED, max_gen_len=max_gen_len),
        },
    )


def record_chat(llama: object, spec: ChatSpec) -> ChatOutputs:
    """Meta's prompt ids for the spec's dialogs and, per kind, Meta's Llama3.chat_completion of all of them in
    one batch (every rank runs it)."""
    dialogs = [[to_json(m) for m in dialog] for dialog in spec.dialogs]
    replies = {}
    for kind, s in spec.completions.items():
        progress(f"chat {kind}: {len(dialogs)} dialogs, {s.max_gen_len} tokens")
        if s.seed is not None:
            torch.manual_seed(s.seed)
        rows = meta_chat_completions(llama, dialogs, s.temperature, s.top_p, s.max_gen_len)
        replies[kind] = [
            ChatReply(tokens=r["tokens"], stop_token=r["stop_token"], stop_reason=r["stop_reason"],
                      message=chat_message(r["message"]))
            for r in rows
        ]  # fmt: skip
    return ChatOutputs(prompt_ids=meta_chat_prompt_ids(llama, dialogs), replies=replies)


def reference_versions() -> Versions:
    """The versions of what a recording ran: torch, Meta's llama-models and fairscale, numpy, Python."""
    return Versions(
        torch=torch.__version__,
        llama_models=importlib.metadata.version("llama-models"),
        fairscale=importlib.metadata.version("fairscale"),
        numpy=np.__version__,
        python=sys.version.split()[0],
    )


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
    torch_dtype, world_size = DTYPES[dtype], torchrun_world_size()
    max_seq_len = long_context + 256
    chat = chat_spec(max_gen_len)
    max_batch_size = max(len(prompts), len(chat.dialogs))
    progress(f"Meta's Llama3.build: {ckpt.dir}, {device}, {torch_dtype}, world size {world_size}")
    llama = meta_llama(ckpt.dir, torch_dtype, max_seq_len, max_batch_size, SEED, device, world_size)
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
    chat_outputs = record_chat(llama, chat)

    if is_rank_0():
        manifest = Manifest(
            schema=SCHEMA_VERSION,
            recorded_by="reference_harness.record: Meta's llama-models Llama3.build / completion / chat_completion, "
            "unmodified",
            model=ModelEntry(params=ckpt.params, max_seq_len=max_seq_len, max_batch_size=max_batch_size),
            checkpoint=checkpoint_entry(ckpt),
            dtype=dtype,
            device=device,
            world_size=world_size,
            versions=reference_versions(),
            platform=platform_fingerprint(device),
            prompts=prompts,
            completions=settings,
            chat=chat,
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
        logits = summarize_logits(records.logits, TOP_K, full_rows)
        write_set(out, manifest, outputs, logits, activations, long_ids, chat=chat_outputs)
        progress(f"wrote {out}")
    dist.barrier()
    dist.destroy_process_group()


def check_request(
    out: Optional[Union[str, Path]],
    ckpt_dir: Union[str, Path, Checkpoint, None],
    device: str,
    dtype: str,
    world_size: int,
) -> Checkpoint:
    """The checkpoint to record, once the request is known to be one Meta's code can run and its set can be
    written at `out` (see microllama.golden.schema.check_writable; None: not yet known); ValueError, saying what is
    wrong, before any work."""
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: a golden set is recorded in {' or '.join(DTYPES)}")
    if device_type(device) not in DEVICE_TYPES:
        raise ValueError(f"--device {device!r}: expected cpu or cuda")
    if device_type(device) == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: torch sees no CUDA device here")
    ckpt = open_checkpoint(ckpt_dir)
    if ckpt.dir is None:
        raise ValueError(f"--ckpt_dir {ckpt.name}: a published configuration without weights; pass a directory")
    args = ckpt.args
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
        raise ValueError(f"--world_size {world_size!r}: expected a positive number of ranks")
    if args.n_heads % world_size or args.n_kv_heads % world_size:
        raise ValueError(
            f"--world_size {world_size}: Meta's tensor-parallel layers split the heads over the ranks, and "
            f"{ckpt.source} has n_heads {args.n_heads} and n_kv_heads {args.n_kv_heads}"
        )
    if out is not None:
        check_writable(out, is_golden_set, "golden set")
    return ckpt


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """While active (in the main thread), SIGTERM raises SystemExit(143) instead of ending the process at
    once, so the caller can stop what it started."""

    def terminate(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_process_group(cmd: list[str], **popen: object) -> int:
    """Run torchrun (cmd) in a session of its own and wait for it, its output (stdout and stderr) passed on to
    stderr. On Ctrl-C (KeyboardInterrupt) or SIGTERM the signal goes to its process group, and torchrun stops
    its workers (each in a session of its own, out of reach of a terminal's Ctrl-C) before it exits; the group
    is killed if it is still there after GRACE_S seconds or at a second Ctrl-C. What they print while stopping
    (torchrun's and the workers' tracebacks) is dropped, and the interruption is raised again: the caller says
    it in one line."""
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, errors="replace", **popen)  # fmt: skip
    stopping = threading.Event()

    def pass_on() -> None:
        for line in proc.stdout:
            if not stopping.is_set():
                print(line, end="", file=sys.stderr, flush=True)

    output = threading.Thread(target=pass_on, daemon=True)
    output.start()
    try:
        with _sigterm_raises():
            status = proc.wait()
    except BaseException as e:
        stopping.set()
        _stop_group(proc, signal.SIGINT if isinstance(e, KeyboardInterrupt) else signal.SIGTERM)
        raise
    output.join()
    return status


def _stop_group(proc: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    with contextlib.suppress(subprocess.TimeoutExpired, KeyboardInterrupt):
        proc.wait(timeout=GRACE_S)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


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
    """Record a golden set in a torchrun subprocess of world_size ranks; its progress goes to stderr.
    The request is checked first (check_request); Ctrl-C or SIGTERM stops torchrun and every worker."""
    check_request(out, ckpt_dir, device, dtype, world_size)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world_size}",
           "-m", "reference_harness.record", f"--out={Path(out).resolve()}", f"--device={device}",
           f"--dtype={dtype}", f"--long_context={long_context}", f"--max_gen_len={max_gen_len}"]  # fmt: skip
    if ckpt_dir is not None:
        cmd.append(f"--ckpt_dir={ckpt_dir}")
    if prompts is not None:
        cmd.append(f"--prompts={json_list(prompts)}")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // world_size)))
    status = run_process_group(cmd, cwd=REPO, env=env)
    if status != 0:
        raise RuntimeError(f"recording failed: torchrun exited with status {status} ({' '.join(cmd)})")
    return Path(out)


def json_list(items: list[str]) -> str:
    """A list argument fire reads back as the same list of strings."""
    return json.dumps(list(items))


@dataclass(frozen=True, kw_only=True)
class RecordCheck:
    """microllama against a fresh recording, and against the committed set of the same name if there is one."""

    out: Path
    fresh: Comparison
    committed: Optional[Comparison]
    differing_files: list[str]  # data files of both sets whose bytes differ between the fresh and the committed one

    @property
    def diverged(self) -> bool:
        return not self.fresh.passed or (self.committed is not None and not self.committed.passed)


def record_goldens(
    out: Optional[str] = None,
    ckpt_dir: Optional[str] = None,
    device: str = "cpu",
    dtype: str = "float32",
    world_size: int = 1,
) -> RecordCheck:
    """Record a golden set with Meta's code (default: the embedded tiny checkpoint, into
    $MICROLLAMA_CACHE/goldens/<name>, so the work tree stays as it is), check microllama against it, then
    against the committed goldens/<name> if there is one, and say whether the recording's data files are
    byte-identical to the committed ones. Prints each comparison's table."""
    ckpt = check_request(out, ckpt_dir, device, dtype, world_size)
    name = set_name(checkpoint_entry(ckpt), dtype, device, world_size)
    out = Path(out) if out is not None else cache_dir() / "goldens" / name
    start = time.time()
    launch(out, ckpt_dir, device, dtype, world_size)
    print(f"recorded {out} in {time.time() - start:.1f} s; checking microllama against it", file=sys.stderr)
    fresh = verify(out, ckpt, device, progress=True)
    print(format_comparison(fresh))
    committed_dir = REPO / "goldens" / name
    if not is_golden_set(committed_dir) or committed_dir.resolve() == out.resolve():
        return RecordCheck(out=out, fresh=fresh, committed=None, differing_files=[])
    print(f"checking microllama against the committed {committed_dir}", file=sys.stderr)
    committed = verify(committed_dir, ckpt, device, progress=True)
    committed_files = data_files(committed.golden.manifest)
    shared = [f for f in data_files(fresh.golden.manifest) if f in committed_files]
    new = [f for f in data_files(fresh.golden.manifest) if f not in committed_files]
    differing = [f for f in shared if (out / f).read_bytes() != (committed_dir / f).read_bytes()]
    print(f"\n{format_comparison(committed)}\n")
    if differing:
        differ = fresh.golden.manifest.platform.differences(committed.golden.manifest.platform)
        where = f"recorded on another platform ({', '.join(differ)})" if differ else "on the same platform"
        print(f"fresh recording {out}: {', '.join(differing)} differ from the committed set's bytes, {where}")
    else:
        print(f"fresh recording {out}: data files byte-identical to the committed {committed_dir}")
    if new:
        print(f"fresh recording {out}: {', '.join(new)} not in the committed set (recorded before it was kept)")
    return RecordCheck(out=out, fresh=fresh, committed=committed, differing_files=differing)


if __name__ == "__main__":
    import fire

    fire.Fire(record)
