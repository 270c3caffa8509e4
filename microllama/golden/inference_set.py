"""The golden-set format, schema 1: what Meta's reference code computed for a checkpoint, kept so that
microllama can be checked against it anywhere. This module owns the whole format: the typed values
below are the schema, built and parsed here only (with schema.py's typed JSON); the recorder
(reference_harness/record.py), the tools and the tests all go through it.

A set is a directory:

- `manifest.json` (Manifest): model config, checkpoint sha256, dtype, device, world size, library
  versions, platform fingerprint, prompts, settings, the capture points and the sha256 of every data file.
- `outputs.json` (Outputs): prompt token ids, greedy and seeded top-p completions, the sha256 of each
  case's full float32 logits, and which rows of the arrays belong to which case.
- `logits.npz` (LogitsSummary): per row (one row per position of each case), the top-k logits and their
  indices and the logsumexp; full-vocabulary rows for the cases in `full_vocab_cases`.
- `activations.npz`: one (rows, dim) float32 array per capture point (bfloat16 values are exact in it).
- `long_context.npz`: `ids`, the token ids of the long-range case.
- `chat.json` (ChatOutputs), in sets recorded with chat (the manifest's `chat` entry, ChatSpec): per dialog
  its prompt ids, and per chat kind (greedy, top_p) and dialog the reply: generated ids, stop token, stop
  reason and the message as Meta's ChatFormat parsed it.

Optional data files like chat.json are present exactly when the manifest entry that declares them is, and
only then listed in the manifest's `files`: sets recorded before a kind existed stay valid, byte for byte.

A case is one forward pass: each prompt on its own from position 0 (all its positions are rows), and
the long-range case, one cached decode step at a position far past the 8,192 of RoPE's original
context (its one row). Data files load without running code (npz with allow_pickle off, json), and
are written byte for byte the same from the same numbers. A set is read only when its files are what
its manifest declares: every sha256, every field's type, and every array's name, dtype and shape
against the rows, top_k and model config; anything else is a one-line GoldenError naming file and field.
"""

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch

from ..args import check_sampling
from ..chat import STOP_REASONS, TOOL_PROMPT_FORMATS, DialogError, Message, as_message, check_prompt
from ..files import atomic_dir, read_json
from .schema import (
    _SHA256,
    DEVICE_TYPES,
    DTYPES,
    OPTIONAL,
    CheckpointEntry,
    GoldenError,
    JSONValue,
    ModelEntry,
    Platform,
    Versions,
    _check_array,
    _check_members,
    _fail,
    _manifest_json,
    _read_npz,
    _require,
    _show,
    check_files,
    check_writable,
    device_type,
    file_hashes,
    from_json,
    json_bytes,
    npz_bytes,
    to_json,
)

DATA_FILES = ("outputs.json", "logits.npz", "activations.npz", "long_context.npz")  # in every set
# Data files a set holds only when its manifest has the entry of that name (a Manifest field), which describes it.
OPTIONAL_FILES = {"chat.json": "chat"}
LONG_RANGE = "long-range"


def capture_points(n_layers: int) -> list[str]:
    """Names of the captured activations, in the order data flows through the model: the module names
    of microllama and of Meta's model alike, and `layers.N.residual_attention`, the input of ffn_norm."""
    points = ["tok_embeddings"]
    for i in range(n_layers):
        points += [f"layers.{i}.{p}" for p in ("attention_norm", "attention", "residual_attention", "ffn_norm")]
        points += [f"layers.{i}.feed_forward", f"layers.{i}"]
    return points + ["norm"]


@dataclass(frozen=True, kw_only=True)
class Sampling:
    """One batch of completions: these prompts, Meta's settings, the seed of torch's global generator."""

    prompts: list[str]
    temperature: float
    top_p: float
    seed: Optional[int] = field(default=None, metadata=OPTIONAL)
    max_gen_len: int


@dataclass(frozen=True, kw_only=True)
class ChatToolCall:
    """A tool call in a message, without its call id (Meta's parser makes a random one)."""

    tool_name: str
    arguments: JSONValue  # as the message holds them: a JSON object (builtin tools: {"query": ...}) or a string


@dataclass(frozen=True, kw_only=True)
class ChatMessage:
    """A message in microllama's dict form (microllama.chat.Message), tool calls without call ids."""

    role: str  # system, user, assistant or tool
    content: str
    context: Optional[str] = field(default=None, metadata=OPTIONAL)
    stop_reason: Optional[str] = field(default=None, metadata=OPTIONAL)
    tool_calls: Optional[list[ChatToolCall]] = field(default=None, metadata=OPTIONAL)  # None when it makes none


@dataclass(frozen=True, kw_only=True)
class ChatSampling:
    """One batch of chat completions of all the dialogs: Meta's settings, the seed of torch's global generator."""

    temperature: float
    top_p: float
    seed: Optional[int] = field(default=None, metadata=OPTIONAL)
    max_gen_len: int


@dataclass(frozen=True, kw_only=True)
class ChatSpec:
    """The chat cases: these dialogs, their earlier tool calls written in tool_prompt_format, answered in one
    batch per kind. (Meta's Llama3.chat_completion in llama-models 0.3.0 encodes json whatever it is given.)"""

    dialogs: list[list[ChatMessage]]
    tool_prompt_format: str  # one of microllama.chat.TOOL_PROMPT_FORMATS
    completions: dict[str, ChatSampling]  # kind (greedy, top_p) -> its batch


@dataclass(frozen=True, kw_only=True)
class LongRange:
    context: int  # the decode step's position; context + 1 ids, the first `context` prefilled
    chunk: int  # positions per prefill forward
    ids: str  # how the ids were drawn


@dataclass(frozen=True, kw_only=True)
class LogitsSpec:
    top_k: int
    full_vocab_cases: list[str]  # cases whose last row is kept whole


@dataclass(frozen=True, kw_only=True)
class Manifest:
    schema: int
    recorded_by: str
    model: ModelEntry
    checkpoint: CheckpointEntry
    dtype: str  # a key of DTYPES
    device: str
    world_size: int  # Meta's tensor-parallel ranks
    versions: Versions
    platform: Platform
    prompts: list[str]  # one forward case each
    completions: dict[str, Sampling]  # kind (greedy, top_p) -> its batch
    chat: Optional[ChatSpec] = field(default=None, metadata=OPTIONAL)  # declares chat.json
    long_range: LongRange
    logits: LogitsSpec
    capture_points: list[str]
    files: dict[str, str] = field(default_factory=dict)  # data file -> sha256, filled in by write_set

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


@dataclass(frozen=True, kw_only=True)
class Row:
    """Rows first_row .. first_row + n_rows - 1 of every array are positions start_pos.. of one case."""

    case: str  # "prompt N" or LONG_RANGE
    first_row: int
    n_rows: int
    start_pos: int


@dataclass(frozen=True, kw_only=True)
class Outputs:
    prompt_ids: list[list[int]]  # per manifest prompt, with BOS
    completions: dict[str, list[list[int]]]  # kind -> generated ids per prompt of its batch
    completion_text: dict[str, list[str]]
    logits_sha256: list[str]  # per case, tensor_sha256 of its full float32 logits (rows, vocab)
    rows: list[Row]  # per case, in order; they tile the arrays


@dataclass(frozen=True, kw_only=True)
class ChatReply:
    tokens: list[int]  # generated ids, without the stop token
    stop_token: Optional[int]  # the id that ended the reply; null when max_gen_len or max_seq_len did
    stop_reason: str  # end_of_turn, end_of_message or out_of_tokens
    message: ChatMessage  # the reply as Meta's ChatFormat.decode_assistant_message parsed it


@dataclass(frozen=True, kw_only=True)
class ChatOutputs:
    prompt_ids: list[list[int]]  # per manifest dialog, Meta's ChatFormat.encode_dialog_prompt
    replies: dict[str, list[ChatReply]]  # kind -> the reply to each dialog


@dataclass(frozen=True, kw_only=True, eq=False)
class LogitsSummary:
    """The compact record of the logits, in the file's member order."""

    topk_values: np.ndarray  # (rows, top_k) float32
    topk_indices: np.ndarray  # (rows, top_k) int32
    logsumexp: np.ndarray  # (rows,) float32
    full_vocab: np.ndarray  # (full-vocabulary rows, vocab_size) float32, in row order

    def arrays(self) -> dict[str, np.ndarray]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclass(frozen=True, kw_only=True, eq=False)
class GoldenSet:
    path: Path
    manifest: Manifest
    outputs: Outputs
    logits: LogitsSummary
    activations: dict[str, np.ndarray]  # capture point -> (rows, dim) float32
    long_context: np.ndarray  # (context + 1,) int32 token ids
    chat: Optional[ChatOutputs] = None  # when the manifest has a chat entry


def data_files(manifest: Manifest) -> list[str]:
    """The data files of a set with this manifest: DATA_FILES, then the optional ones its entries declare."""
    return [*DATA_FILES, *(name for name, entry in OPTIONAL_FILES.items() if getattr(manifest, entry) is not None)]


def chat_message(message: Union[Message, dict[str, Any]]) -> ChatMessage:
    """A checked message (microllama.chat.as_message) as the golden format keeps it, without call ids."""
    m = as_message(message)
    calls = [ChatToolCall(tool_name=c.tool_name, arguments=c.arguments) for c in m.tool_calls]
    return ChatMessage(role=m.role, content=m.content, context=m.context, stop_reason=m.stop_reason,
                       tool_calls=calls or None)  # fmt: skip


def full_vocab_rows(rows: Sequence[Row], cases: Sequence[str]) -> list[int]:
    """Row numbers of the last position of each named case, in row order."""
    return [r.first_row + r.n_rows - 1 for r in rows if r.case in cases]


def _check_manifest(m: Manifest, file: Path) -> None:
    def require(ok: bool, at: str, message: str) -> None:
        _require(ok, file, at, message)

    args = m.model.args
    require(m.dtype in DTYPES, "dtype", f"expected one of {', '.join(DTYPES)}, got {_show(m.dtype)}")
    require(device_type(m.device) in DEVICE_TYPES, "device", f"expected cpu or cuda, got {_show(m.device)}")
    require(m.world_size >= 1, "world_size", f"expected a positive integer, got {m.world_size}")
    c = m.checkpoint
    require(_SHA256.fullmatch(c.sha256) is not None, "checkpoint.sha256", "expected 64 lowercase hex digits")
    require(c.tiny is not None or c.dir is not None, "checkpoint", "names no tiny checkpoint and no directory")
    require(c.shards is None or c.shards >= 0, "checkpoint.shards", f"expected a count >= 0, got {c.shards}")
    require(len(m.prompts) <= m.model.max_batch_size, "model.max_batch_size", "fewer than the prompts")
    for kind, s in m.completions.items():
        try:
            check_sampling(s.temperature, s.top_p, s.max_gen_len, s.seed)
        except ValueError as e:
            raise _fail(file, f"completions.{kind}", str(e)) from e
        require(bool(s.prompts), f"completions.{kind}.prompts", "expected at least one prompt")
    if m.chat is not None:
        _check_chat_spec(m.chat, m.model.max_batch_size, file)
    r = m.long_range
    require(r.context >= 1, "long_range.context", f"expected a positive integer, got {r.context}")
    require(r.chunk >= 1, "long_range.chunk", f"expected a positive integer, got {r.chunk}")
    require(r.context < m.model.max_seq_len, "long_range.context", "must be below model.max_seq_len")
    require(1 <= m.logits.top_k <= args.vocab_size, "logits.top_k", f"expected 1 to vocab_size, got {m.logits.top_k}")
    expected = capture_points(args.n_layers)
    require(m.capture_points == expected, "capture_points",
            f"expected the {len(expected)} points of a {args.n_layers}-layer model, {expected[0]} to {expected[-1]}, "
            f"got {_show(m.capture_points)}")  # fmt: skip
    expected_files = data_files(m)
    require(sorted(m.files) == sorted(expected_files), "files", f"expected the sha256 of {', '.join(expected_files)}")
    for name, digest in m.files.items():
        require(_SHA256.fullmatch(digest) is not None, f"files.{name}", "expected 64 lowercase hex digits")


def _check_message(message: ChatMessage, file: Path, at: str) -> Message:
    """The message as microllama reads it (role, stop reason, tool calls checked); GoldenError names the field."""
    _require(message.tool_calls != [], file, f"{at}.tool_calls", "expected at least one call (left out when none)")
    try:
        return as_message(to_json(message))
    except DialogError as e:
        raise _fail(file, at, str(e)) from e


def _check_chat_spec(chat: ChatSpec, max_batch_size: int, file: Path) -> None:
    def require(ok: bool, at: str, message: str) -> None:
        _require(ok, file, f"chat.{at}", message)

    require(chat.tool_prompt_format in TOOL_PROMPT_FORMATS, "tool_prompt_format",
            f"expected one of {', '.join(TOOL_PROMPT_FORMATS)}, got {_show(chat.tool_prompt_format)}")  # fmt: skip
    require(1 <= len(chat.dialogs) <= max_batch_size, "dialogs",
            f"expected 1 to model.max_batch_size ({max_batch_size}) dialogs, got {len(chat.dialogs)}")  # fmt: skip
    for i, dialog in enumerate(chat.dialogs):
        messages = [_check_message(m, file, f"chat.dialogs[{i}][{j}]") for j, m in enumerate(dialog)]
        try:
            check_prompt(messages)
        except DialogError as e:
            raise _fail(file, f"chat.dialogs[{i}]", str(e)) from e
    require(bool(chat.completions), "completions", "expected at least one kind")
    for kind, s in chat.completions.items():
        try:
            check_sampling(s.temperature, s.top_p, s.max_gen_len, s.seed)
        except ValueError as e:
            raise _fail(file, f"chat.completions.{kind}", str(e)) from e


def _check_chat(chat: ChatOutputs, m: Manifest, file: Path) -> None:
    """chat.json against the manifest's chat entry: a prompt per dialog, a reply per kind and dialog, each reply
    within max_gen_len, its stop token there exactly when its stop reason is not out_of_tokens."""
    spec, vocab, max_seq_len = m.chat, m.model.args.vocab_size, m.model.max_seq_len

    def require(ok: bool, at: str, message: str) -> None:
        _require(ok, file, at, message)

    def ids_ok(ids: Sequence[int]) -> bool:
        return all(0 <= t < vocab for t in ids)

    n = len(spec.dialogs)
    require(len(chat.prompt_ids) == n, "prompt_ids", f"{len(chat.prompt_ids)} lists for the manifest's {n} dialogs")
    for i, ids in enumerate(chat.prompt_ids):
        require(bool(ids) and ids_ok(ids), f"prompt_ids[{i}]", f"expected ids in [0, {vocab}), at least BOS")
    kinds, expected = _show(list(chat.replies)), _show(list(spec.completions))
    require(list(chat.replies) == list(spec.completions), "replies",
            f"kinds {kinds}, the manifest's chat.completions are {expected}")  # fmt: skip
    for kind, replies in chat.replies.items():
        s = spec.completions[kind]
        require(len(replies) == n, f"replies.{kind}", f"{len(replies)} replies for the manifest's {n} dialogs")
        for i, r in enumerate(replies):
            at = f"replies.{kind}[{i}]"
            room = min(s.max_gen_len, max_seq_len - len(chat.prompt_ids[i]))
            require(ids_ok(r.tokens), f"{at}.tokens", f"expected ids in [0, {vocab})")
            require(len(r.tokens) <= room, f"{at}.tokens",
                    f"{len(r.tokens)} ids, more than max_gen_len {s.max_gen_len} (and max_seq_len) allow")  # fmt: skip
            require(r.stop_reason in STOP_REASONS, f"{at}.stop_reason",
                    f"expected one of {', '.join(STOP_REASONS)}, got {_show(r.stop_reason)}")  # fmt: skip
            out_of_tokens = r.stop_reason == "out_of_tokens"
            require((r.stop_token is None) == out_of_tokens, f"{at}.stop_token",
                    "expected null exactly when the stop reason is out_of_tokens")  # fmt: skip
            require(r.stop_token is None or ids_ok([r.stop_token]), f"{at}.stop_token",
                    f"expected an id in [0, {vocab})")  # fmt: skip
            require(not out_of_tokens or len(r.tokens) == room, f"{at}.tokens",
                    f"out_of_tokens after {len(r.tokens)} ids, before max_gen_len or max_seq_len")  # fmt: skip
            message = _check_message(r.message, file, f"{at}.message")
            require(message.role == "assistant", f"{at}.message.role", f"expected assistant, got {_show(message.role)}")


def _check_contents(g: GoldenSet) -> None:
    """The data files against the manifest: counts, rows, array names, dtypes and shapes."""
    m, o = g.manifest, g.outputs
    args = m.model.args

    def require(ok: bool, at: str, message: str) -> None:
        _require(ok, g.path / "outputs.json", at, message)

    require(len(o.prompt_ids) == len(m.prompts), "prompt_ids",
            f"{len(o.prompt_ids)} lists for the manifest's {len(m.prompts)} prompts")  # fmt: skip
    for i, ids in enumerate(o.prompt_ids):
        require(bool(ids) and all(0 <= t < args.vocab_size for t in ids), f"prompt_ids[{i}]",
                f"expected ids in [0, {args.vocab_size}), at least BOS")  # fmt: skip
    for at, kinds in (("completions", o.completions), ("completion_text", o.completion_text)):
        require(list(kinds) == list(m.completions), at,
                f"kinds {_show(list(kinds))}, the manifest's are {_show(list(m.completions))}")  # fmt: skip
        for kind, items in kinds.items():
            n = len(m.completions[kind].prompts)
            require(len(items) == n, f"{at}.{kind}", f"{len(items)} completions for the manifest's {n} prompts")
    cases = [f"prompt {i}" for i in range(len(o.prompt_ids))] + [LONG_RANGE]
    require(len(o.rows) == len(cases), "rows", f"{len(o.rows)} rows for {len(cases)} cases (prompts and long-range)")
    first = 0
    for i, (row, case) in enumerate(zip(o.rows, cases, strict=True)):
        n_rows, start = (len(o.prompt_ids[i]), 0) if case != LONG_RANGE else (1, m.long_range.context)
        expected = Row(case=case, first_row=first, n_rows=n_rows, start_pos=start)
        got, want = (
            f"{r.case!r} first_row {r.first_row} n_rows {r.n_rows} start_pos {r.start_pos}" for r in (row, expected)
        )
        require(row == expected, f"rows[{i}]", f"{got}, expected {want} (rows tile the arrays, case by case)")
        first += n_rows
    n = len(o.logits_sha256)
    require(n == len(cases), "logits_sha256", f"{n} digests for {len(cases)} cases")
    for i, digest in enumerate(o.logits_sha256):
        require(_SHA256.fullmatch(digest) is not None, f"logits_sha256[{i}]", "expected 64 lowercase hex digits")
    unknown = [c for c in m.logits.full_vocab_cases if c not in cases]
    if unknown:
        message = f"{unknown[0]!r} is not a case of outputs.json's rows ({cases[0]} .. {cases[-1]})"
        raise _fail(g.path / "manifest.json", "logits.full_vocab_cases", message)

    logits, top_k = g.path / "logits.npz", m.logits.top_k
    _check_array(logits, "topk_values", g.logits.topk_values, np.float32, (first, top_k), "rows x top_k")
    _check_array(logits, "topk_indices", g.logits.topk_indices, np.int32, (first, top_k), "rows x top_k",
                 args.vocab_size)  # fmt: skip
    _check_array(logits, "logsumexp", g.logits.logsumexp, np.float32, (first,), "one per row")
    n_full = len(full_vocab_rows(o.rows, m.logits.full_vocab_cases))
    _check_array(logits, "full_vocab", g.logits.full_vocab, np.float32, (n_full, args.vocab_size),
                 "full_vocab_cases x vocab_size")  # fmt: skip
    activations = g.path / "activations.npz"
    _check_members(activations, g.activations, m.capture_points)
    for name in m.capture_points:
        _check_array(activations, name, g.activations[name], np.float32, (first, args.dim), "rows x dim")
    _check_array(g.path / "long_context.npz", "ids", g.long_context, np.int32, (m.long_range.context + 1,),
                 "the manifest's long_range.context + 1", args.vocab_size)  # fmt: skip
    if g.chat is not None:
        _check_chat(g.chat, m, g.path / "chat.json")


def is_golden_set(path: Union[str, Path]) -> bool:
    """Whether path is a directory whose manifest.json parses as a golden manifest."""
    try:
        read_manifest(path)
    except GoldenError:
        return False
    return True


def write_set(
    out_dir: Union[str, Path],
    manifest: Manifest,
    outputs: Outputs,
    logits: LogitsSummary,
    activations: dict[str, np.ndarray],
    long_context: np.ndarray,
    chat: Optional[ChatOutputs] = None,
) -> Path:
    """Write a golden set, the manifest with the sha256 of each data file (chat.json only when chat is
    given). Atomic: the set is written into a temporary directory beside out_dir and renamed into place,
    so an interrupted run leaves any old set intact. out_dir must pass check_writable. The values are
    written as given: read_set is what checks a set's contents against its manifest."""
    check_writable(out_dir, is_golden_set, "golden set")
    with atomic_dir(out_dir, replace=True) as tmp:
        (tmp / "outputs.json").write_bytes(json_bytes(outputs))
        (tmp / "logits.npz").write_bytes(npz_bytes(logits.arrays()))
        (tmp / "activations.npz").write_bytes(npz_bytes(activations))
        (tmp / "long_context.npz").write_bytes(npz_bytes({"ids": long_context}))
        if chat is not None:
            (tmp / "chat.json").write_bytes(json_bytes(chat))
        files = file_hashes(tmp, [*DATA_FILES, *OPTIONAL_FILES])
        (tmp / "manifest.json").write_bytes(json_bytes(dataclasses.replace(manifest, files=files)))
    return Path(out_dir)


def read_manifest(path: Union[str, Path]) -> Manifest:
    """The manifest of the set in directory path, parsed and checked on its own (data files unread)."""
    file, raw = _manifest_json(Path(path))
    manifest = from_json(Manifest, raw, file)
    _check_manifest(manifest, file)
    return manifest


def read_set(path: Union[str, Path]) -> GoldenSet:
    """Load a golden set: the manifest, then each data file against its sha256 (a changed, truncated or
    missing file raises GoldenError naming it), then every field and array against the manifest."""
    path = Path(path)
    manifest = read_manifest(path)
    for name in OPTIONAL_FILES:
        if name not in manifest.files and (path / name).exists():
            raise GoldenError(f"{path / name}: the manifest does not declare it (no {OPTIONAL_FILES[name]} entry)")
    check_files(path, manifest.files, data_files(manifest))
    logits = _read_npz(path / "logits.npz")
    _check_members(path / "logits.npz", logits, [f.name for f in dataclasses.fields(LogitsSummary)])
    long_context = _read_npz(path / "long_context.npz")
    _check_members(path / "long_context.npz", long_context, ["ids"])
    chat_file = path / "chat.json"
    chat = None if manifest.chat is None else from_json(ChatOutputs, read_json(chat_file, GoldenError), chat_file)
    golden = GoldenSet(
        path=path,
        manifest=manifest,
        outputs=from_json(Outputs, read_json(path / "outputs.json", GoldenError), path / "outputs.json"),
        logits=LogitsSummary(**logits),
        activations=_read_npz(path / "activations.npz"),
        long_context=long_context["ids"],
        chat=chat,
    )
    _check_contents(golden)
    return golden
