"""Golden sets: what Meta's reference code computed for a checkpoint, kept so that microllama can be
checked against it anywhere. This module owns the format; the recorder (reference_harness/record.py),
the tools and the tests all go through it.

A set is a directory:

- `manifest.json`: schema version, model config, checkpoint sha256, dtype, device, world size,
  library versions, platform fingerprint, prompts, settings, and the sha256 of every data file.
- `outputs.json`: prompt token ids, greedy and seeded top-p completions, the sha256 of each case's
  full float32 logits, and which rows of the arrays belong to which case.
- `logits.npz`: per row (one row per position of each case), the top-k logits and their indices and
  the logsumexp; full-vocabulary rows for the cases in `full_vocab_cases`.
- `activations.npz`: one (rows, dim) float32 array per capture point (bfloat16 values are exact in it).
- `long_context.npz`: the token ids of the long-range case.

A case is one forward pass: each prompt on its own from position 0 (all its positions are rows), and
the long-range case, one cached decode step at a position far past the 8,192 of RoPE's original
context (its one row). Data files load without running code (npz with allow_pickle off, json), and
are written byte for byte the same from the same numbers.
"""

import contextlib
import hashlib
import io
import json
import platform
import zipfile
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ContextManager, Optional, Union

import numpy as np
import torch
from torch import nn

from .checkpoint import Checkpoint, open_checkpoint
from .files import DTYPES, atomic_dir, parse_dtype, state_dict_sha256
from .generation import Llama
from .tiny import SHA256 as TINY_SHA256
from .tokenizer import Tokenizer
from .tolerances import LOGITS_ATOL

SCHEMA_VERSION = 1
DATA_FILES = ("outputs.json", "logits.npz", "activations.npz", "long_context.npz")
LONG_RANGE = "long-range"


class GoldenError(ValueError):
    """A golden set that is missing, malformed, or changed since it was recorded."""


# ---------------------------------------------------------------------------------------------------
# Capture points: forward hooks on modules named as in microllama and in Meta's model alike.


def capture_points(n_layers: int) -> list[str]:
    """Names of the captured activations, in the order data flows through the model."""
    points = ["tok_embeddings"]
    for i in range(n_layers):
        points += [f"layers.{i}.{p}" for p in ("attention_norm", "attention", "residual_attention", "ffn_norm")]
        points += [f"layers.{i}.feed_forward", f"layers.{i}"]
    return points + ["norm"]


@contextlib.contextmanager
def capturing(model: nn.Module, into: dict[str, list[torch.Tensor]]) -> Iterator[None]:
    """While active, append each capture point's activation of batch row 0 (seqlen, dim), as float32 on
    the CPU, to into[name]. `layers.N.residual_attention` is h = x + attention, the input of ffn_norm
    (taken by a forward pre-hook); every other point is the output of the module of that name. Works
    on any model with Meta's module names: Meta's Transformer and microllama's."""

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


# ---------------------------------------------------------------------------------------------------
# Running the cases: the same code drives Meta's model and microllama's.


@dataclass
class Records:
    """What one model computed for a golden set's cases."""

    logits: list[torch.Tensor]  # per case, float32 (rows, vocab) on the CPU
    activations: dict[str, torch.Tensor]  # capture point -> (rows, dim) float32, cases concatenated
    rows: list[dict[str, Any]]  # per case: name, first_row, n_rows, start_pos


def long_context_ids(length: int, vocab_size: int = 128000, seed: int = 0) -> np.ndarray:
    """Token ids for the long-range case: `length` ids drawn from numpy's PCG64 (machine-independent)."""
    return np.random.Generator(np.random.PCG64(seed)).integers(0, vocab_size, length, dtype=np.int64).astype(np.int32)


@torch.inference_mode()
def run_cases(
    model: nn.Module,
    prompt_ids: Sequence[Sequence[int]],
    long_ids: Sequence[int],
    chunk: int,
    cache: Callable[[], ContextManager] = contextlib.nullcontext,
) -> Records:
    """Each prompt's forward from position 0, then the long-range case: long_ids[:-1] prefilled in
    chunks of `chunk` positions, and one decode step for long_ids[-1]. `cache()` is entered around the
    long-range case (microllama allocates its KV cache there; Meta's model always has one)."""
    device = model.output.weight.device
    captured: dict[str, list[torch.Tensor]] = {}
    logits, rows, first_row = [], [], 0
    with capturing(model, captured):
        for i, ids in enumerate(prompt_ids):
            tokens = torch.tensor([list(ids)], dtype=torch.long, device=device)
            logits.append(model.forward(tokens, 0)[0].float().cpu())
            rows.append({"case": f"prompt {i}", "first_row": first_row, "n_rows": len(ids), "start_pos": 0})
            first_row += len(ids)
    long_tokens = torch.tensor([list(long_ids)], dtype=torch.long, device=device)
    step = long_tokens.shape[1] - 1
    with cache():
        with last_position_logits(model):
            for start in range(0, step, chunk):
                model.forward(long_tokens[:, start : min(start + chunk, step)], start)
        with capturing(model, captured):
            logits.append(model.forward(long_tokens[:, step:], step)[0].float().cpu())
    rows.append({"case": LONG_RANGE, "first_row": first_row, "n_rows": 1, "start_pos": step})
    return Records(logits, {name: torch.cat(parts) for name, parts in captured.items()}, rows)


def tensor_sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def summarize_logits(
    logits: Sequence[torch.Tensor], top_k: int, full_vocab_rows: Sequence[int]
) -> dict[str, np.ndarray]:
    """The compact record of the logits: top-k values and indices and logsumexp per row, and the full
    rows numbered in full_vocab_rows."""
    rows = torch.cat(list(logits))
    values, indices = rows.topk(top_k, dim=-1)
    return {
        "topk_values": values.numpy(),
        "topk_indices": indices.to(torch.int32).numpy(),
        "logsumexp": torch.logsumexp(rows, dim=-1).numpy(),
        "full_vocab": rows[list(full_vocab_rows)].numpy(),
    }


def full_vocab_rows(rows: Sequence[dict[str, Any]], cases: Sequence[str]) -> list[int]:
    """Row numbers of the last position of each named case."""
    return [r["first_row"] + r["n_rows"] - 1 for r in rows if r["case"] in cases]


# ---------------------------------------------------------------------------------------------------
# The files: written atomically and byte-deterministically, read with every sha256 checked.


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """An .npz archive (np.load reads it) that depends only on the arrays: members in the given
    order, fixed timestamps and attributes (np.savez stamps the current time into the zip)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, array in arrays.items():
            if array.dtype.hasobject:
                raise TypeError(f"array {name!r} holds Python objects; goldens store plain numbers only")
            member = io.BytesIO()
            np.lib.format.write_array(member, np.ascontiguousarray(array), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type, info.create_system, info.external_attr = zipfile.ZIP_DEFLATED, 3, 0o644 << 16
            zf.writestr(info, member.getvalue())
    return buf.getvalue()


def json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=1, ensure_ascii=False) + "\n").encode()


def write_set(out_dir: Union[str, Path], manifest: dict[str, Any], data: dict[str, Any]) -> Path:
    """Write a golden set: data maps each of DATA_FILES to a JSON-able object (.json) or a dict of
    arrays (.npz); the manifest gets their sha256. Atomic: the set is written into a temporary
    directory beside out_dir and renamed into place, so an interrupted run leaves any old set intact."""
    if sorted(data) != sorted(DATA_FILES):
        raise ValueError(f"a golden set holds exactly {', '.join(DATA_FILES)}; got {', '.join(sorted(data))}")
    with atomic_dir(out_dir, replace=True) as tmp:
        files = {}
        for name in DATA_FILES:
            content = json_bytes(data[name]) if name.endswith(".json") else npz_bytes(data[name])
            (tmp / name).write_bytes(content)
            files[name] = hashlib.sha256(content).hexdigest()
        (tmp / "manifest.json").write_bytes(json_bytes({**manifest, "files": files}))
    return Path(out_dir)


@dataclass
class GoldenSet:
    path: Path
    manifest: dict[str, Any]
    outputs: dict[str, Any]
    logits: dict[str, np.ndarray]
    activations: dict[str, np.ndarray]
    long_context: np.ndarray

    @property
    def dtype(self) -> torch.dtype:
        return parse_dtype(self.manifest["dtype"])


def read_set(path: Union[str, Path]) -> GoldenSet:
    """Load a golden set, checking each data file against the sha256 in its manifest first: a changed,
    truncated or missing file raises GoldenError naming it."""
    path = Path(path)
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        raise GoldenError(f"{manifest_path} not found: not a golden set directory")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as e:
        raise GoldenError(f"{manifest_path} is not valid JSON: {e}") from e
    if manifest.get("schema") != SCHEMA_VERSION:
        raise GoldenError(f"{manifest_path}: schema {manifest.get('schema')!r}, this microllama reads {SCHEMA_VERSION}")
    files = manifest.get("files", {})
    for name in DATA_FILES:
        if name not in files:
            raise GoldenError(f"{manifest_path} lists no sha256 for {name}")
        file = path / name
        if not file.is_file():
            raise GoldenError(f"{file} not found (the manifest lists it)")
        actual = file_sha256(file)
        if actual != files[name]:
            raise GoldenError(
                f"{file}: sha256 mismatch: the file has {actual}, the manifest recorded {files[name]} "
                "(changed or truncated since recording)"
            )

    def arrays(name: str) -> dict[str, np.ndarray]:
        with np.load(path / name, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}

    return GoldenSet(
        path=path,
        manifest=manifest,
        outputs=json.loads((path / "outputs.json").read_text()),
        logits=arrays("logits.npz"),
        activations=arrays("activations.npz"),
        long_context=arrays("long_context.npz")["ids"],
    )


# ---------------------------------------------------------------------------------------------------
# Describing where a set was recorded.


def platform_fingerprint(device: Union[str, torch.device]) -> dict[str, str]:
    """What decides the bits of a float computation here: CPU ISA, torch build, and the GPU if used."""
    fingerprint = {
        "machine": platform.machine(),
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_config_sha256": hashlib.sha256(torch.__config__.show().encode()).hexdigest(),
    }
    if torch.device(device).type == "cuda":
        fingerprint |= {"gpu": torch.cuda.get_device_name(torch.device(device)), "cuda": str(torch.version.cuda)}
    return fingerprint


def checkpoint_record(ckpt: Checkpoint) -> dict[str, Any]:
    """The manifest's checkpoint entry: state_dict_sha256 of the dense tensors (names, dtypes, shapes
    and bytes, so independent of torch's file format and of sharding), the number of Meta-layout
    tensor-parallel shard files it was read from, and, for an embedded tiny checkpoint, its name."""
    digest = ckpt.sha256()
    tiny = next((name for name, sha in TINY_SHA256.items() if sha == digest), None)
    shards = len(ckpt.weight_files) if ckpt.layout == "meta" else 0
    return {"tiny": tiny, "dir": None if tiny else str(ckpt.dir.resolve()), "sha256": digest, "shards": shards}


def set_name(checkpoint: dict[str, Any], dtype: torch.dtype, device: str, world_size: int) -> str:
    """The default directory name of a set, e.g. tiny-fp32-cpu-ws1."""
    short = {v: k for k, v in DTYPES.items() if len(k) == 4}[dtype]
    model = checkpoint["tiny"] or Path(checkpoint["dir"]).name
    return f"{model}-{short}-{torch.device(device).type}-ws{world_size}"


# ---------------------------------------------------------------------------------------------------
# Comparing microllama with a set.


@dataclass
class PointResult:
    name: str
    max_abs: float
    max_rel: float
    worst: str  # "prompt 3 pos 12", "long-range pos 9000", or "-" when equal
    diverges: bool


@dataclass
class Comparison:
    golden: GoldenSet
    ckpt_dir: Path
    checkpoint_matches: bool
    exact: bool  # bit-identity expected (same platform, world size 1), else LOGITS_ATOL applies
    mode: str  # one line saying which check applies and why
    points: list[PointResult]
    logits_sha256_equal: list[bool]
    prompt_ids_equal: bool
    completions_equal: dict[str, list[bool]] = field(default_factory=dict)
    completions_not_compared: dict[str, str] = field(default_factory=dict)  # kind -> why

    @property
    def first_divergent(self) -> Optional[str]:
        """The first capture point (in data-flow order) that diverges, else the first failing check."""
        if not self.prompt_ids_equal:
            return "prompt ids (tokenizer)"
        for point in self.points:
            if point.diverges:
                return point.name
        for kind, equal in self.completions_equal.items():
            if not all(equal):
                return f"{kind} completions"
        return None

    @property
    def diverged(self) -> bool:
        return self.first_divergent is not None


def compare_arrays(
    name: str, actual: torch.Tensor, expected: torch.Tensor, rows: Sequence[dict[str, Any]], exact: bool,
    dtype: torch.dtype, row_of: Optional[Sequence[int]] = None,
) -> PointResult:  # fmt: skip
    """Errors of actual against expected, both (n, ...) with n rows numbered as in `rows` (or row_of[i]
    for row i). The relative error is the max abs error over the largest |expected| at this point (an
    elementwise ratio blows up at values near zero)."""
    actual, expected = actual.double(), expected.double()
    if actual.shape != expected.shape:
        return PointResult(
            name, float("inf"), float("inf"), f"shape {tuple(actual.shape)} != {tuple(expected.shape)}", True
        )
    err = (actual - expected).abs()
    err = torch.where(torch.isnan(actual) & torch.isnan(expected), 0.0, err.nan_to_num(nan=float("inf")))
    if exact:
        diverges = bool((err > 0).any())
    else:
        diverges = bool((err > LOGITS_ATOL[dtype]).any())
    max_abs = float(err.max()) if err.numel() else 0.0
    worst = "-"
    if max_abs > 0:
        row = int(err.reshape(err.shape[0], -1).amax(dim=1).argmax())
        row = row_of[row] if row_of is not None else row
        case = next(r for r in rows if r["first_row"] <= row < r["first_row"] + r["n_rows"])
        worst = f"{case['case']} pos {case['start_pos'] + row - case['first_row']}"
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    return PointResult(name, max_abs, max_abs / scale if scale else max_abs, worst, diverges)


def compare_records(golden: GoldenSet, records: Records, exact: bool) -> tuple[list[PointResult], list[bool]]:
    """Per capture point results, then 'output' (logits: top-k at every row, full rows) and
    'output.logsumexp'; and per case whether the full logits' sha256 is equal."""
    rows, dtype = golden.outputs["rows"], golden.dtype
    results = [
        compare_arrays(name, records.activations[name], torch.from_numpy(golden.activations[name]), rows, exact, dtype)
        for name in golden.manifest["capture_points"]
    ]
    sha_equal = [tensor_sha256(t) == s for t, s in zip(records.logits, golden.outputs["logits_sha256"], strict=True)]
    all_rows = torch.cat(records.logits)
    full_rows = full_vocab_rows(rows, golden.manifest["logits"]["full_vocab_cases"])
    indices = torch.from_numpy(golden.logits["topk_indices"]).long()
    topk = compare_arrays("output", all_rows.gather(1, indices), torch.from_numpy(golden.logits["topk_values"]),
                          rows, exact, dtype)  # fmt: skip
    full = compare_arrays("output", all_rows[full_rows], torch.from_numpy(golden.logits["full_vocab"]), rows, exact,
                          dtype, row_of=full_rows)  # fmt: skip
    output = max(topk, full, key=lambda r: r.max_abs)
    output.max_rel = max(topk.max_rel, full.max_rel)
    output.diverges = topk.diverges or full.diverges or (exact and not all(sha_equal))
    lse = compare_arrays("output.logsumexp", torch.logsumexp(all_rows, dim=-1),
                         torch.from_numpy(golden.logits["logsumexp"]), rows, exact, dtype)  # fmt: skip
    return results + [output, lse], sha_equal


def bit_exact_expected(golden: GoldenSet, device: torch.device) -> tuple[bool, str]:
    m = golden.manifest
    if m["world_size"] != 1:
        return False, f"tolerance: recorded at world size {m['world_size']} (row-parallel sums add in another order)"
    if torch.device(m["device"]).type != device.type:
        return False, f"tolerance: recorded on {m['device']}, checked on {device.type}"
    here = platform_fingerprint(device)
    if here != m["platform"]:
        differ = ", ".join(k for k in sorted(set(here) | set(m["platform"])) if here.get(k) != m["platform"].get(k))
        return False, f"tolerance: this platform differs from the recording's ({differ})"
    return True, "bit-exact: this platform matches the recording's"


def check_forwards(golden: GoldenSet, model: nn.Module, exact: bool) -> tuple[list[PointResult], list[bool]]:
    """Run the set's cases on a microllama model (prompts without a KV cache, the long-range case with
    one) and compare: per capture point results, and per case whether the full logits' sha256 is equal."""
    m = golden.manifest["model"]

    @contextlib.contextmanager
    def cache() -> Iterator[None]:
        model.setup_cache(m["max_batch_size"], m["max_seq_len"])
        try:
            yield
        finally:
            model.clear_cache()

    chunk = golden.manifest["long_range"]["chunk"]
    records = run_cases(model, golden.outputs["prompt_ids"], golden.long_context.tolist(), chunk, cache)
    return compare_records(golden, records, exact)


def check_completions(golden: GoldenSet, llama: Llama, skip: Collection[str] = ()) -> dict[str, list[bool]]:
    """Per completion kind (greedy, top_p) not in skip, whether each prompt's generated ids equal the
    recorded ones."""
    completions = {}
    for kind, expected in golden.outputs["completions"].items():
        if kind in skip:
            continue
        s = golden.manifest["completions"][kind]
        ids = [llama.tokenizer.encode(p, bos=True, eos=False) for p in s["prompts"]]
        tokens, _ = llama.generate(ids, s["max_gen_len"], s["temperature"], s["top_p"], seed=s.get("seed"))
        completions[kind] = [a == b for a, b in zip(tokens, expected, strict=True)]
    return completions


def verify(
    golden_dir: Union[str, Path],
    ckpt_dir: Optional[Union[str, Path]] = None,
    device: Optional[Union[str, torch.device]] = None,
) -> Comparison:
    """Check microllama (on ckpt_dir, default the set's own checkpoint; on the set's device unless
    given, or the CPU where that is CUDA and none is here) against a golden set: capture points,
    logits, prompt ids, greedy and top-p completions (sampled ones only on the recording's device type)."""
    golden = read_set(golden_dir)
    m = golden.manifest
    if ckpt_dir is None:
        if m["checkpoint"]["tiny"]:
            ckpt_dir = m["checkpoint"]["tiny"]
        elif m["checkpoint"]["dir"] and Path(m["checkpoint"]["dir"]).is_dir():
            ckpt_dir = m["checkpoint"]["dir"]
        else:
            raise GoldenError(f"{golden.path}: its checkpoint {m['checkpoint']['dir']} is not here; pass --ckpt_dir")
    ckpt = open_checkpoint(ckpt_dir)
    if device is None:  # the set's own device, else the CPU (the check then says so and uses tolerances)
        device = m["device"] if torch.device(m["device"]).type != "cuda" or torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise GoldenError(f"--device {device} was asked for, but torch sees no CUDA device here")
    stored = ckpt.read_state_dict()
    model = ckpt.load_model(m["model"]["max_seq_len"], m["model"]["max_batch_size"], device, golden.dtype,
                            state_dict=stored)  # fmt: skip
    exact, mode = bit_exact_expected(golden, device)
    # A seed gives one random stream on the CPU and another on CUDA: sampled ids compare on one device type.
    sampling_comparable = device.type == torch.device(m["device"]).type
    not_compared = {
        kind: f"sampled with the {m['device']} generator, checked on {device.type}: random streams differ by device"
        for kind, s in m["completions"].items()
        if s["temperature"] > 0 and not sampling_comparable
    }
    points, sha_equal = check_forwards(golden, model, exact)
    llama = Llama(model, Tokenizer(ckpt_dir=ckpt.dir))
    return Comparison(
        golden=golden,
        ckpt_dir=ckpt.dir,
        checkpoint_matches=state_dict_sha256(stored) == m["checkpoint"]["sha256"],
        exact=exact,
        mode=mode,
        points=points,
        logits_sha256_equal=sha_equal,
        prompt_ids_equal=[llama.tokenizer.encode(p, bos=True, eos=False) for p in m["prompts"]]
        == golden.outputs["prompt_ids"],
        completions_equal=check_completions(golden, llama, skip=not_compared),
        completions_not_compared=not_compared,
    )


def format_comparison(c: Comparison) -> str:
    """The per-capture-point table and the verdict lines that `microllama verify` prints."""
    m = c.golden.manifest
    lines = [
        f"golden set {c.golden.path}: {m['checkpoint']['tiny'] or m['checkpoint']['dir']}"
        + (f" (read from {m['checkpoint']['shards']} shards)" if m["checkpoint"].get("shards", 1) > 1 else "")
        + f", {m['dtype']}, "
        f"{m['device']}, world size {m['world_size']}, recorded with torch {m['versions']['torch']} "
        f"({m['platform']['cpu_capability']}{', ' + m['platform']['gpu'] if 'gpu' in m['platform'] else ''})",
        f"checkpoint {c.ckpt_dir}: sha256 " + ("matches the recording" if c.checkpoint_matches else "DIFFERS"),
        f"check: {c.mode}" + ("" if c.exact else f" (atol {LOGITS_ATOL[c.golden.dtype]:g})"),
        "",
        f"{'capture point':<28} {'max abs err':>12} {'max rel err':>12}  {'worst position':<22} status",
    ]
    for p in c.points:
        lines.append(
            f"{p.name:<28} {p.max_abs:>12.4g} {p.max_rel:>12.4g}  {p.worst:<22} {'DIVERGES' if p.diverges else 'ok'}"
        )
    n = len(c.logits_sha256_equal)
    lines += [
        "",
        f"logits sha256: {sum(c.logits_sha256_equal)}/{n} cases bit-identical",
        f"prompt ids: {'identical' if c.prompt_ids_equal else 'DIFFER'} ({len(m['prompts'])} prompts)",
    ]
    for kind, equal in c.completions_equal.items():
        lines.append(f"{kind} completions: {sum(equal)}/{len(equal)} identical")
    for kind, why in c.completions_not_compared.items():
        lines.append(f"{kind} completions: not compared ({why})")
    lines.append(f"first divergent capture point: {c.first_divergent or 'none'}")
    return "\n".join(lines)
