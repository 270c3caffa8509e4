"""Checking microllama against a golden set: which comparison applies (bit for bit on the recording's
platform, else within microllama.tolerances), the errors at every capture point, the completions, the
chat replies, and the report `microllama verify` prints."""

import dataclasses
import math
import sys
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Optional, Union

import torch
from torch import nn
from tqdm import tqdm

from ..checkpoint.load import Checkpoint, open_checkpoint
from ..compiled import CompiledDecoder
from ..distributed import tensor_parallel as parallel
from ..files import state_dict_sha256, tensor_sha256
from ..generation import Llama, output_ends
from ..model import Transformer
from ..tokenizer import Tokenizer
from ..tolerances import LOGITS_ATOL
from .capture import Records, cpu_threads, platform_fingerprint, run_cases
from .inference_set import ChatReply, GoldenSet, Row, chat_message, full_vocab_rows, read_set
from .schema import GoldenError, json_bytes, to_json
from .training_set import TrainingSet


@dataclass(frozen=True, kw_only=True)
class PointResult:
    name: str
    max_abs: float
    max_rel: float
    worst: str  # "prompt 3 pos 12", "long-range pos 9000", or "-" when equal
    diverges: bool


REPLY_FIELDS = ("tokens", "stop_token", "stop_reason", "message")  # of ChatReply, compared in this order


@dataclass(frozen=True, kw_only=True)
class ChatCheck:
    """microllama's chat_completion against a set's chat.json."""

    prompt_ids_equal: list[bool]  # per dialog: microllama's ChatFormat ids are Meta's
    differences: dict[str, list[list[str]]]  # kind -> per dialog, the REPLY_FIELDS that differ (none: identical)
    not_compared: dict[str, str]  # kind -> why
    # kind -> dialog -> the token where the reply parts from the recorded one, for replies that differ where the
    # tolerance allows (see tolerance_admits; only when the check is not bit-exact)
    parted: dict[str, dict[int, int]] = dataclasses.field(default_factory=dict)

    @property
    def first_divergent(self) -> Optional[str]:
        if not all(self.prompt_ids_equal):
            return f"chat prompt ids (dialog {self.prompt_ids_equal.index(False)})"
        for kind, dialogs in self.differences.items():
            for i, fields in enumerate(dialogs):
                if fields and i not in self.parted.get(kind, {}):
                    return f"chat {kind} (dialog {i}: {', '.join(fields)})"
        return None


@dataclass(frozen=True, kw_only=True)
class Comparison:
    golden: GoldenSet
    ckpt_dir: Path
    checkpoint_matches: bool  # its tensors' sha256 is the recording's
    other_checkpoint: bool  # comparing another checkpoint than the recorded one is intended
    exact: bool  # bit-identity expected (same platform, world size 1), else LOGITS_ATOL applies
    mode: str  # one line saying which check applies and why
    points: list[PointResult]
    logits_sha256_equal: list[bool]
    prompt_ids_equal: bool
    completions_equal: dict[str, list[bool]]  # kind -> per prompt, the ids identical
    completions_not_compared: dict[str, str]  # kind -> why
    # kind -> prompt -> the token where the completion parts from the recorded one, for completions that differ
    # where the tolerance allows (see tolerance_admits; only when the check is not bit-exact)
    completions_parted: dict[str, dict[int, int]]
    chat: Optional[ChatCheck]  # None: the set records no chat, or it was not run (stopped_at)
    # What stopped the check before the end: the prompt ids or a capture point that diverged (completions and chat
    # not run: with other inputs or other arithmetic, every one of them would differ), or the completions (chat
    # not run). None: every check ran.
    stopped_at: Optional[str] = None

    @property
    def first_divergent(self) -> Optional[str]:
        """The first capture point (in data-flow order) that diverges, else the first failing check."""
        if not self.prompt_ids_equal:
            return "prompt ids (tokenizer)"
        for point in self.points:
            if point.diverges:
                return point.name
        for kind, equal in self.completions_equal.items():
            if not all(e or i in self.completions_parted.get(kind, {}) for i, e in enumerate(equal)):
                return f"{kind} completions"
        return None if self.chat is None else self.chat.first_divergent

    @property
    def failure(self) -> Optional[str]:
        """Why the check fails, or None when it passes."""
        if self.first_divergent is not None:
            return f"microllama diverges from the recording, first at {self.first_divergent}"
        return None

    @property
    def passed(self) -> bool:
        return self.failure is None


def compare_arrays(
    name: str, actual: torch.Tensor, expected: torch.Tensor, rows: Sequence[Row], exact: bool,
    dtype: torch.dtype, row_of: Optional[Sequence[int]] = None,
) -> PointResult:  # fmt: skip
    """Errors of actual against expected, both (n, ...) with n rows numbered as in `rows` (or row_of[i]
    for row i). The relative error is the max abs error over the largest |expected| at this point (an
    elementwise ratio blows up at values near zero)."""
    actual, expected = actual.double(), expected.double()
    if actual.shape != expected.shape:
        shapes = f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
        return PointResult(name=name, max_abs=float("inf"), max_rel=float("inf"), worst=shapes, diverges=True)
    err = (actual - expected).abs()
    err = torch.where(torch.isnan(actual) & torch.isnan(expected), 0.0, err.nan_to_num(nan=float("inf")))
    diverges = bool((err > (0 if exact else LOGITS_ATOL[dtype])).any())
    max_abs = float(err.max()) if err.numel() else 0.0
    worst = "-"
    if max_abs > 0:
        row = int(err.reshape(err.shape[0], -1).amax(dim=1).argmax())
        row = row_of[row] if row_of is not None else row
        case = next(r for r in rows if r.first_row <= row < r.first_row + r.n_rows)
        worst = f"{case.case} pos {case.start_pos + row - case.first_row}"
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    return PointResult(name=name, max_abs=max_abs, max_rel=max_abs / scale if scale else max_abs, worst=worst,
                       diverges=diverges)  # fmt: skip


def compare_records(golden: GoldenSet, records: Records, exact: bool) -> tuple[list[PointResult], list[bool]]:
    """Per capture point results, then 'output' (logits: top-k at every row, full rows) and
    'output.logsumexp'; and per case whether the full logits' sha256 is equal."""
    m, rows, dtype = golden.manifest, golden.outputs.rows, golden.manifest.torch_dtype
    results = [
        compare_arrays(name, records.activations[name], torch.from_numpy(golden.activations[name]), rows, exact, dtype)
        for name in m.capture_points
    ]
    sha_equal = [tensor_sha256(t) == s for t, s in zip(records.logits, golden.outputs.logits_sha256, strict=True)]
    all_rows = torch.cat(records.logits)
    full_rows = full_vocab_rows(rows, m.logits.full_vocab_cases)
    indices = torch.from_numpy(golden.logits.topk_indices).long()
    topk = compare_arrays("output", all_rows.gather(1, indices), torch.from_numpy(golden.logits.topk_values),
                          rows, exact, dtype)  # fmt: skip
    full = compare_arrays("output", all_rows[full_rows], torch.from_numpy(golden.logits.full_vocab), rows, exact,
                          dtype, row_of=full_rows)  # fmt: skip
    output = dataclasses.replace(
        max(topk, full, key=lambda r: r.max_abs),
        max_rel=max(topk.max_rel, full.max_rel),
        diverges=topk.diverges or full.diverges or (exact and not all(sha_equal)),
    )
    lse = compare_arrays("output.logsumexp", torch.logsumexp(all_rows, dim=-1),
                         torch.from_numpy(golden.logits.logsumexp), rows, exact, dtype)  # fmt: skip
    return results + [output, lse], sha_equal


@dataclass(frozen=True)
class Check:
    """Which comparison applies here, and the line saying why that a report prints."""

    exact: bool  # bit-identity: the recording's platform (device type, CPU ISA, torch build) and world size
    # the platform differs: other kernels (another GEMM blocking, other vectorized exp and rsqrt), not only sums
    # taken in another order; bounds measured across platforms apply where they differ (tolerances.py)
    across_platforms: bool
    line: str


def comparison_mode(
    golden: Union[GoldenSet, TrainingSet], device: Union[str, torch.device], world_size: int = 1
) -> Check:
    """Whether bit-identity is expected on `device` here at world_size tensor-parallel ranks: where the platform
    fingerprint and the world size match the recording's; elsewhere tolerances.py's bounds apply."""
    m, device = golden.manifest, torch.device(device)
    if torch.device(m.device).type != device.type:
        return Check(False, True, f"tolerance: recorded on {m.device}, checked on {device.type}")
    differ = platform_fingerprint(device).differences(m.platform)
    if differ:
        return Check(False, True, f"tolerance: this platform differs from the recording's ({', '.join(differ)})")
    if m.world_size != world_size:
        return Check(False, False, f"tolerance: recorded at world size {m.world_size}, checked at {world_size} "
                                   "(row-parallel sums add in another order)")  # fmt: skip
    return Check(True, False, "bit-exact: this platform matches the recording's")


def check_forwards(
    golden: GoldenSet, model: nn.Module, exact: bool, progress: bool = False, decoder: Optional[CompiledDecoder] = None
) -> tuple[list[PointResult], list[bool]]:
    """Run the set's cases on a microllama model (prompts without a KV cache, the long-range case with
    one; its decode step through decoder's compiled step when given) and compare: per capture point results,
    and per case whether the full logits' sha256 is equal."""
    m = golden.manifest
    cache = (decoder or model).kv_cache(m.model.max_batch_size, m.model.max_seq_len)
    step = None if decoder is None else decoder.forward
    records = run_cases(model, golden.outputs.prompt_ids, golden.long_context.tolist(), m.long_range.chunk, cache,
                        progress, step)  # fmt: skip
    return compare_records(golden, records, exact)


def tolerance_admits(
    model: Transformer,
    prompt: Sequence[int],
    completion: Sequence[int],
    stop_tokens: Collection[int],
    end: Collection[int],
    temperature: float,
    top_p: float,
    atol: float,
) -> Optional[int]:
    """Whether a model whose logits lie within atol of model's, generating as Llama.generate does with stop_tokens,
    could have made completion after prompt, then one of end (the ids one of which ended the row; none: it ran out
    of length): None if it could, else the first step where it could not. A stop token inside the completion, or
    an end that is no stop token, it could not have made. Teacher-forced, one forward over prompt + completion; at
    each step, for the token taken there:
    - greedy (temperature 0): that model ranked the token first, so here its logit is within 2 atol of the top;
    - sampled: on logits divided by the temperature T, that model's probabilities lie within a factor
      exp(2 atol / T) of these, so the mass it put on the tokens ranked above this one is at least
      exp(-2 atol / T) times the mass here on the tokens more than 2 atol / T above it; top-p kept the token,
      so that is at most top_p. In bfloat16 (atol 0.375) this admits nearly any token of the nucleus."""
    ids = torch.tensor([[*prompt, *completion]], device=model.output.weight.device)
    with torch.inference_mode():
        logits = model.forward(ids)[0, len(prompt) - 1 :].double()  # row k: the logits of step k
    steps = [[token] for token in completion] + ([[t for t in end if t in stop_tokens]] if end else [])
    for k, candidates in enumerate(steps):
        if not candidates or (k < len(completion) and completion[k] in stop_tokens):
            return k
        z = logits[k] if temperature == 0 else logits[k] / temperature
        margin = 2 * atol / (temperature or 1)
        if temperature == 0:
            admitted = [float(z.max() - z[t]) <= margin for t in candidates]
        else:
            probs = torch.softmax(z, dim=-1)
            admitted = [float(probs[z > z[t] + margin].sum()) * math.exp(-margin) <= top_p for t in candidates]
        if not any(admitted):
            return k
    return None


def parts_within_tolerance(
    model: Transformer,
    prompt: Sequence[int],
    ids: tuple[Sequence[int], Sequence[int]],
    ends: tuple[Collection[int], Collection[int]],
    stop_tokens: Collection[int],
    temperature: float,
    top_p: float,
    atol: float,
) -> Optional[int]:
    """Where two generations from prompt (microllama's and the recorded one) part, when they differ and
    tolerance_admits both, each with its end (the ids one of which ended it); None when they are the same or
    the tolerance does not admit one of them."""
    a, b = ids
    if a == b or any(tolerance_admits(model, prompt, c, stop_tokens, end, temperature, top_p, atol) is not None
                     for c, end in zip(ids, ends, strict=True)):  # fmt: skip
        return None
    return next((k for k, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def check_completions(
    golden: GoldenSet, llama: Llama, skip: Collection[str] = (), progress: bool = False, atol: Optional[float] = None
) -> tuple[dict[str, list[bool]], dict[str, dict[int, int]]]:
    """Per completion kind (greedy, top_p) not in skip, whether each prompt's generated ids equal the recorded
    ones; and with atol (a check within tolerance), per kind the prompts whose ids differ but both the generated
    and the recorded completion are ones the tolerance admits (tolerance_admits), each with the token where the
    two part."""
    completions, parted = {}, {}
    stops = llama.tokenizer.stop_tokens
    kinds = [kind for kind in golden.manifest.completions if kind not in skip]
    for kind in tqdm(kinds, "completions", disable=not progress, file=sys.stderr):
        s = golden.manifest.completions[kind]
        ids = [llama.tokenizer.encode(p, bos=True, eos=False) for p in s.prompts]
        tokens, _ = llama.generate(ids, s.max_gen_len, s.temperature, s.top_p, seed=s.seed)
        recorded = golden.outputs.completions[kind]
        completions[kind] = [a == b for a, b in zip(tokens, recorded, strict=True)]
        if atol is None:
            continue
        _, ends = output_ends([len(p) for p in ids], s.max_gen_len, llama.model.params.max_seq_len)
        parted[kind] = {}
        for i, (prompt, end, got, rec) in enumerate(zip(ids, ends, tokens, recorded, strict=True)):
            # A row that ends before its latest end ended at a stop token (which one is not kept).
            stopped = tuple(stops if len(prompt) + len(c) < end else [] for c in (got, rec))
            k = parts_within_tolerance(llama.model, prompt, (got, rec), stopped, stops, s.temperature, s.top_p, atol)
            if k is not None:
                parted[kind][i] = k
    return completions, parted


def reply_differences(got: ChatReply, recorded: ChatReply) -> list[str]:
    """The REPLY_FIELDS where got differs from recorded, each compared as its JSON text: the ids and the stop
    token as integers, the stop reason as a string, the parsed message field by field (content, stop reason,
    tool names and arguments, key order and number types included)."""
    return [f for f in REPLY_FIELDS if json_bytes(getattr(got, f)) != json_bytes(getattr(recorded, f))]


def check_chat(
    golden: GoldenSet,
    llama: Llama,
    skip: Mapping[str, str] = MappingProxyType({}),
    progress: bool = False,
    atol: Optional[float] = None,
) -> ChatCheck:
    """microllama's prompt ids for the set's dialogs against Meta's, and per chat kind not in skip (kind ->
    why it is not compared) its chat_completion of all the dialogs in one batch against the recorded replies;
    with atol, replies whose ids differ where the tolerance allows (as check_completions)."""
    spec, recorded = golden.manifest.chat, golden.chat
    dialogs = [[to_json(m) for m in dialog] for dialog in spec.dialogs]
    prompt_ids = [llama.formatter.encode_dialog_prompt(d, spec.tool_prompt_format) for d in dialogs]
    differences, parted = {}, {}
    kinds = [kind for kind in spec.completions if kind not in skip]
    for kind in tqdm(kinds, "chat completions", disable=not progress, file=sys.stderr):
        s = spec.completions[kind]
        replies = llama.chat_completion(dialogs, s.temperature, s.top_p, s.max_gen_len, seed=s.seed,
                                        tool_prompt_format=spec.tool_prompt_format)  # fmt: skip
        got = [ChatReply(tokens=c.tokens, stop_token=c.stop_token, stop_reason=c.stop_reason,
                         message=chat_message(c.message)) for c in replies]  # fmt: skip
        differences[kind] = [reply_differences(a, b) for a, b in zip(got, recorded.replies[kind], strict=True)]
        if atol is None:
            continue
        parted[kind] = {}
        for i, (prompt, a, b) in enumerate(zip(prompt_ids, got, recorded.replies[kind], strict=True)):
            stopped = tuple([] if r.stop_token is None else [r.stop_token] for r in (a, b))
            k = parts_within_tolerance(llama.model, prompt, (a.tokens, b.tokens), stopped, llama.tokenizer.stop_tokens,
                                       s.temperature, s.top_p, atol)  # fmt: skip
            if k is not None:
                parted[kind][i] = k
    return ChatCheck(
        prompt_ids_equal=[a == b for a, b in zip(prompt_ids, recorded.prompt_ids, strict=True)],
        differences=differences,
        not_compared=dict(skip),
        parted=parted,
    )


def checking_device(recorded: str, device: Optional[Union[str, torch.device]]) -> torch.device:
    """The device a check runs on: the one asked for, else the set's own, else the CPU where that is CUDA and
    none is here (the check then says so and uses tolerances). GoldenError for CUDA asked for and absent."""
    if device is None:
        device = recorded if torch.device(recorded).type != "cuda" or torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise GoldenError(f"--device {device} was asked for, but torch sees no CUDA device here")
    return device


def recorded_checkpoint(golden: Union[GoldenSet, TrainingSet]) -> str:
    """The checkpoint a set was recorded from, when it is here: a tiny checkpoint's name or a directory."""
    c = golden.manifest.checkpoint
    if c.tiny:
        return c.tiny
    if c.dir and Path(c.dir).is_dir():
        return c.dir
    raise GoldenError(f"{golden.path}: its checkpoint {c.dir} is not here; pass --ckpt_dir")


def check_recorded_checkpoint(
    golden: Union[GoldenSet, TrainingSet], ckpt: Checkpoint, sha256: str, other_checkpoint: bool
) -> None:
    """GoldenError, before any model runs, for a checkpoint (of this sha256) that is not the one the set was
    recorded from, unless other_checkpoint says comparing it is intended."""
    recorded = golden.manifest.checkpoint.sha256
    if sha256 != recorded and not other_checkpoint:
        raise GoldenError(
            f"{ckpt.name} is not the checkpoint {golden.path} was recorded from (sha256 {sha256[:12]}..., "
            f"recorded {recorded[:12]}...): pass --other_checkpoint to compare it on purpose"
        )


def checkpoint_words(matches: bool, other_checkpoint: bool) -> str:
    """What a report says of the checkpoint's sha256 against the recording's."""
    if matches:
        return "sha256 matches the recording"
    return "sha256 DIFFERS from the recording" + (" (compared on purpose)" if other_checkpoint else "")


def check_prompts_are_recorded_text(golden: GoldenSet, tokenizer: Tokenizer) -> None:
    """GoldenError, before any forward, for a manifest prompt that is not the text its recorded ids decode to
    (the manifest edited after recording). A prompt that is, but that microllama encodes to other ids, is a
    tokenizer divergence, which the check reports."""
    for i, (prompt, ids) in enumerate(zip(golden.manifest.prompts, golden.outputs.prompt_ids, strict=True)):
        recorded = tokenizer.decode(ids[1:])  # after BOS
        if recorded != prompt:
            raise GoldenError(
                f"{golden.path / 'manifest.json'}: prompts[{i}] is {prompt!r}, but the set recorded the ids of "
                f"{recorded!r}: the manifest was edited after recording"
            )


def verify(
    golden_dir: Union[str, Path],
    ckpt_dir: Optional[Union[str, Path, Checkpoint]] = None,
    device: Optional[Union[str, torch.device]] = None,
    other_checkpoint: bool = False,
    progress: bool = False,
    tensor_parallel: bool = False,
    compile: bool = False,
) -> Comparison:
    """Check microllama (on ckpt_dir, default the set's own checkpoint; on the set's device unless
    given, or the CPU where that is CUDA and none is here) against a golden set: capture points,
    logits, prompt ids, greedy and top-p completions and chat replies (sampled ones only on the recording's
    device type).
    A checkpoint other than the recorded one fails the check unless other_checkpoint. On the CPU it runs
    with the recording's thread count, which decides the bits. progress: what it is doing, on stderr.
    tensor_parallel: under torchrun, the model sharded over the job's ranks (every rank calls verify).
    compile: check the compiled decode path (Llama.build(compile=True)) instead of the default one: capture
    points and logits within tolerance, completions and chat replies exactly.
    The checks stop at the first that fails (Comparison.stopped_at): after the prompt ids or a capture point, the
    completions and chat replies are not generated; after the completions, the chat replies are not."""
    if tensor_parallel and compile:
        raise GoldenError("--compile checks the compiled path in one process; it cannot be tensor-parallel")
    golden = read_set(golden_dir)
    m = golden.manifest
    device = checking_device(m.device, device)
    with cpu_threads(m.platform.threads if device.type == "cpu" else None):
        return _verify(golden, ckpt_dir, device, other_checkpoint, progress, tensor_parallel, compile)


def _verify(
    golden: GoldenSet,
    ckpt_dir: Optional[Union[str, Path, Checkpoint]],
    device: torch.device,
    other_checkpoint: bool,
    progress: bool,
    tensor_parallel: bool,
    compile: bool,
) -> Comparison:
    m = golden.manifest
    ckpt = open_checkpoint(ckpt_dir if ckpt_dir is not None else recorded_checkpoint(golden))
    tokenizer = Tokenizer(ckpt_dir=ckpt.dir)
    check_prompts_are_recorded_text(golden, tokenizer)
    if progress:
        print(f"loading {ckpt.dir} ({m.dtype}, {device})", file=sys.stderr, flush=True)
    # The sha256 is checked before the model runs: another checkpoint fails at once unless asked for.
    stored = None if tensor_parallel else ckpt.read_state_dict()  # read once: its sha256, then the model
    sha256 = ckpt.sha256() if stored is None else state_dict_sha256(stored)
    check_recorded_checkpoint(golden, ckpt, sha256, other_checkpoint)
    size = (m.model.max_seq_len, m.model.max_batch_size)
    if tensor_parallel:  # each rank reads its own slices (the sha256 above read the whole checkpoint)
        mesh, device = parallel.device_mesh(device)
        model = ckpt.load_model(*size, device, m.torch_dtype, flash=compile, mesh=mesh)
        world_size = mesh.size()
    else:
        model = ckpt.load_model(*size, device, m.torch_dtype, flash=compile, state_dict=stored)
        world_size = 1
    check = comparison_mode(golden, device, world_size)
    exact, mode = check.exact, check.line
    if compile:
        exact = False
        mode = (
            "tolerance: the compiled path (prefill through flash attention, decode steps compiled) is not bit-identical"
        )
    # A seed gives one random stream on the CPU and another on CUDA: sampled ids compare on one device type.
    sampling_comparable = device.type == torch.device(m.device).type
    why = f"sampled with the {m.device} generator, checked on {device.type}: random streams differ by device"
    not_compared = {kind: why for kind, s in m.completions.items() if s.temperature > 0 and not sampling_comparable}
    chat_kinds = m.chat.completions if m.chat is not None else {}
    chat_not_compared = {kind: why for kind, s in chat_kinds.items() if s.temperature > 0 and not sampling_comparable}
    llama = Llama(model, tokenizer, compile=compile)
    decoder = llama.decoder if isinstance(llama.decoder, CompiledDecoder) else None
    points, sha_equal = check_forwards(golden, model, exact, progress, decoder)
    atol = None if exact else LOGITS_ATOL[m.torch_dtype]
    comparison = Comparison(
        golden=golden,
        ckpt_dir=ckpt.dir,
        checkpoint_matches=sha256 == m.checkpoint.sha256,
        other_checkpoint=other_checkpoint,
        exact=exact,
        mode=mode,
        points=points,
        logits_sha256_equal=sha_equal,
        prompt_ids_equal=[llama.tokenizer.encode(p, bos=True, eos=False) for p in m.prompts]
        == golden.outputs.prompt_ids,
        completions_equal={},
        completions_not_compared=not_compared,
        completions_parted={},
        chat=None,
    )
    # The checks run in the order of first_divergent and stop at the first that fails: what follows a divergence
    # would differ too, and generating it is most of the time (a slip in layer 0 is named in seconds).
    if comparison.first_divergent is not None:  # the prompt ids or a capture point
        return dataclasses.replace(comparison, stopped_at=comparison.first_divergent)
    completions_equal, completions_parted = check_completions(golden, llama, not_compared, progress, atol)
    comparison = dataclasses.replace(
        comparison, completions_equal=completions_equal, completions_parted=completions_parted
    )
    if m.chat is None:
        return comparison
    if comparison.first_divergent is not None:  # the completions
        return dataclasses.replace(comparison, stopped_at=comparison.first_divergent)
    return dataclasses.replace(comparison, chat=check_chat(golden, llama, chat_not_compared, progress, atol))


def format_parted(parted: Mapping[int, int], noun: str) -> str:
    """The report's words for the rows (prompts or dialogs) that part from the recording where the tolerance allows."""
    if not parted:
        return ""
    rows = ", ".join(f"{noun} {i} at token {k}" for i, k in parted.items())
    return f"; {rows} part{'s' if len(parted) == 1 else ''} from the recording where the tolerance allows"


def format_chat(chat: Optional[ChatCheck]) -> list[str]:
    """The report's chat lines: prompt ids, then per kind the replies identical in ids, stop token, stop reason
    and parsed message, and those parting where the tolerance allows."""
    if chat is None:
        return ["chat: not recorded in this set"]
    n, equal = len(chat.prompt_ids_equal), chat.prompt_ids_equal
    differ = ", ".join(str(i) for i, e in enumerate(equal) if not e)
    lines = [f"chat prompt ids: {'identical' if all(equal) else f'DIFFER in dialogs {differ}'} ({n} dialogs)"]
    for kind, dialogs in chat.differences.items():
        parted = chat.parted.get(kind, {})
        first = next(((i, f) for i, f in enumerate(dialogs) if f and i not in parted), None)
        where = f" (dialog {first[0]}: {', '.join(first[1])} differ)" if first else ""
        identical = f"{sum(not f for f in dialogs)}/{n} identical"
        lines.append(f"chat {kind}: {identical}{format_parted(parted, 'dialog')}{where}")
    for kind, why in chat.not_compared.items():
        lines.append(f"chat {kind}: not compared ({why})")
    return lines


def format_comparison(c: Comparison) -> str:
    """The per-capture-point table and the verdict lines that `microllama verify` prints."""
    m = c.golden.manifest
    checkpoint = m.checkpoint.tiny or m.checkpoint.dir
    shards = f" (read from {m.checkpoint.shards} shards)" if (m.checkpoint.shards or 0) > 1 else ""
    gpu = f", {m.platform.gpu}" if m.platform.gpu else ""
    lines = [
        f"golden set {c.golden.path}: {checkpoint}{shards}, {m.dtype}, {m.device}, world size {m.world_size}, "
        f"recorded with torch {m.versions.torch} ({m.platform.cpu_capability}{gpu})",
        f"checkpoint {c.ckpt_dir}: {checkpoint_words(c.checkpoint_matches, c.other_checkpoint)}",
        f"check: {c.mode}" + ("" if c.exact else f" (atol {LOGITS_ATOL[m.torch_dtype]:g})"),
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
        f"prompt ids: {'identical' if c.prompt_ids_equal else 'DIFFER'} ({len(m.prompts)} prompts)",
    ]
    not_run = f"not run: microllama already diverges at {c.stopped_at}"
    if c.completions_equal or c.stopped_at is None:
        for kind, equal in c.completions_equal.items():
            parted = format_parted(c.completions_parted.get(kind, {}), "prompt")
            lines.append(f"{kind} completions: {sum(equal)}/{len(equal)} identical{parted}")
        for kind, why in c.completions_not_compared.items():
            lines.append(f"{kind} completions: not compared ({why})")
    else:
        lines.append(f"completions: {not_run}")
    lines += [f"chat: {not_run}"] if c.chat is None and m.chat is not None else format_chat(c.chat)
    lines.append(f"first divergent capture point: {c.first_divergent or 'none'}")
    how = "bit-exact" if c.exact else "within tolerance"
    lines.append(f"verdict: FAIL: {c.failure}" if c.failure else f"verdict: pass ({how})")
    return "\n".join(lines)
