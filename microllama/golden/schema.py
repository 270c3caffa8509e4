"""The golden-set format, schema 1: what Meta's reference code computed for a checkpoint, kept so that
microllama can be checked against it anywhere. This module owns the whole format: the typed values
below are the schema, built and parsed here only; the recorder (reference_harness/record.py), the tools
and the tests all go through it.

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
import io
import json
import re
import types
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union, get_args, get_origin

import numpy as np
import torch

from ..args import ModelArgs, check_sampling, is_finite, is_int
from ..chat import STOP_REASONS, TOOL_PROMPT_FORMATS, DialogError, Message, as_message, check_prompt
from ..checkpoint.params import expected_shapes
from ..files import atomic_dir, file_sha256, read_json, state_dict_sha256, tensor_sha256

SCHEMA_VERSION = 1
DATA_FILES = ("outputs.json", "logits.npz", "activations.npz", "long_context.npz")  # in every set
# Data files a set holds only when its manifest has the entry of that name (a Manifest field), which describes it.
OPTIONAL_FILES = {"chat.json": "chat"}
LONG_RANGE = "long-range"
# The dtypes a set is recorded in (microllama.tolerances bounds both), and their short names in set names.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
SHORT_DTYPES = {"float32": "fp32", "bfloat16": "bf16"}
DEVICE_TYPES = ("cpu", "cuda")
# The model config's keys the arrays' shapes depend on (ModelArgs would fill in defaults), and the run sizes.
MODEL_KEYS = ("dim", "n_layers", "n_heads", "vocab_size", "max_seq_len", "max_batch_size")


class GoldenError(ValueError):
    """A golden set that is missing, malformed, or changed since it was recorded."""


def capture_points(n_layers: int) -> list[str]:
    """Names of the captured activations, in the order data flows through the model: the module names
    of microllama and of Meta's model alike, and `layers.N.residual_attention`, the input of ffn_norm."""
    points = ["tok_embeddings"]
    for i in range(n_layers):
        points += [f"layers.{i}.{p}" for p in ("attention_norm", "attention", "residual_attention", "ffn_norm")]
        points += [f"layers.{i}.feed_forward", f"layers.{i}"]
    return points + ["norm"]


# ---------------------------------------------------------------------------------------------------
# The schema. Each class is one JSON object, its fields in file order; a field whose metadata is
# OPTIONAL is left out of the file when None (sets recorded before it was kept lack it).

OPTIONAL = {"optional": True}
JSONValue = Any  # the type of a field holding any JSON value, kept as parsed


@dataclass(frozen=True, kw_only=True)
class ModelEntry:
    """The model config: the checkpoint's params.json as Meta's code read it, then the sizes the recording
    built the model with. In the file: one object, params' keys followed by max_seq_len and max_batch_size."""

    params: dict[str, Any]
    max_seq_len: int
    max_batch_size: int  # the number of prompts, or of chat dialogs where they are more

    @property
    def args(self) -> ModelArgs:
        return ModelArgs.from_params(self.params, max_seq_len=self.max_seq_len, max_batch_size=self.max_batch_size)


@dataclass(frozen=True, kw_only=True)
class CheckpointEntry:
    """Which weights were recorded: state_dict_sha256 of the dense tensors (names, dtypes, shapes and bytes,
    so independent of torch's file format and of sharding); for an embedded tiny checkpoint its name,
    else its directory."""

    tiny: Optional[str]
    dir: Optional[str]
    sha256: str
    shards: Optional[int] = field(default=None, metadata=OPTIONAL)  # Meta-layout shard files read; 0: Hugging Face


@dataclass(frozen=True, kw_only=True)
class Versions:
    torch: str
    llama_models: str = field(metadata={"key": "llama-models"})
    fairscale: str
    numpy: str
    python: str


@dataclass(frozen=True, kw_only=True)
class Platform:
    """What decides the bits of a float computation: CPU ISA, torch build, torch's CPU threads (they decide
    how sums are split: one thread and two give other bits), and the GPU if one was used."""

    machine: str
    torch: str
    cpu_capability: str
    torch_config_sha256: str
    gpu: Optional[str] = field(default=None, metadata=OPTIONAL)
    cuda: Optional[str] = field(default=None, metadata=OPTIONAL)
    threads: Optional[int] = field(default=None, metadata=OPTIONAL)  # on the CPU; sets before it lack it
    # oneDNN's own ISA cap (ONEDNN_MAX_CPU_ISA), which cpu_capability does not show: None where it is not set
    onednn_max_cpu_isa: Optional[str] = field(default=None, metadata=OPTIONAL)

    def differences(self, other: "Platform") -> list[str]:
        """Names of the fields where other differs."""
        return [f.name for f in dataclasses.fields(self) if getattr(self, f.name) != getattr(other, f.name)]


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


def set_name(checkpoint: CheckpointEntry, dtype: str, device: str, world_size: int) -> str:
    """The default directory name of a set, e.g. tiny-fp32-cpu-ws1."""
    model = checkpoint.tiny or Path(checkpoint.dir).name
    return f"{model}-{SHORT_DTYPES[dtype]}-{torch.device(device).type}-ws{world_size}"


# ---------------------------------------------------------------------------------------------------
# JSON: typed values to JSON objects and back; every error names the file and the field.


def _key(f: dataclasses.Field) -> str:
    return f.metadata.get("key", f.name)


def to_json(value: Any) -> Any:
    """The JSON value of a schema object (dataclass fields in order, OPTIONAL ones left out when None)."""
    if isinstance(value, ModelEntry):
        return {**value.params, "max_seq_len": value.max_seq_len, "max_batch_size": value.max_batch_size}
    if dataclasses.is_dataclass(value):
        return {
            _key(f): to_json(getattr(value, f.name))
            for f in dataclasses.fields(value)
            if not (f.metadata.get("optional") and getattr(value, f.name) is None)
        }
    if isinstance(value, list):
        return [to_json(v) for v in value]
    if isinstance(value, dict):
        return {k: to_json(v) for k, v in value.items()}
    return value


def _show(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 60 else text[:57] + "..."


def _fail(file: Path, at: str, message: str) -> GoldenError:
    return GoldenError(f"{file}: {at}: {message}" if at else f"{file}: {message}")


def _require(ok: bool, file: Path, at: str, message: str) -> None:
    if not ok:
        raise _fail(file, at, message)


_SCALARS = {
    int: ("an integer", is_int),
    float: ("a finite number", is_finite),
    str: ("a string", lambda v: isinstance(v, str)),
}


def from_json(tp: Any, value: Any, file: Path, at: str = "") -> Any:
    """The value of type tp (a schema class, list[...], dict[str, ...], Optional[...] or a scalar) that
    the JSON value holds; GoldenError naming file and field for anything the type does not describe."""
    origin, args = get_origin(tp), get_args(tp)
    if tp is JSONValue:
        return value
    if origin in (Union, types.UnionType):  # Optional[X]
        return None if value is None else from_json(args[0], value, file, at)
    if tp is ModelEntry:
        return _model_entry(value, file, at)
    if dataclasses.is_dataclass(tp):
        return _object(tp, value, file, at)
    if origin is list:
        if not isinstance(value, list):
            raise _fail(file, at, f"expected a list, got {_show(value)}")
        return [from_json(args[0], v, file, f"{at}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise _fail(file, at, f"expected a JSON object, got {_show(value)}")
        return {k: from_json(args[1], v, file, f"{at}.{k}") for k, v in value.items()}
    what, ok = _SCALARS[tp]
    if not ok(value):
        raise _fail(file, at, f"expected {what}, got {_show(value)}")
    return value


def _object(cls: type, value: Any, file: Path, at: str) -> Any:
    if not isinstance(value, dict):
        raise _fail(file, at, f"expected a JSON object, got {_show(value)}")
    fields = dataclasses.fields(cls)
    unknown = sorted(value.keys() - {_key(f) for f in fields})
    if unknown:
        raise _fail(file, f"{at}.{unknown[0]}" if at else unknown[0], "not a field of this format (schema 1)")
    kwargs = {}
    for f in fields:
        where = f"{at}.{_key(f)}" if at else _key(f)
        if _key(f) in value:
            kwargs[f.name] = from_json(f.type, value[_key(f)], file, where)
        elif not f.metadata.get("optional"):
            raise _fail(file, where, "missing (a required field)")
    return cls(**kwargs)


def _model_entry(value: Any, file: Path, at: str) -> ModelEntry:
    if not isinstance(value, dict):
        raise _fail(file, at, f"expected a JSON object (params.json and the run sizes), got {_show(value)}")
    for key in MODEL_KEYS:
        if key not in value:
            raise _fail(file, f"{at}.{key}", "missing (a required field)")
    sizes = {key: from_json(int, value[key], file, f"{at}.{key}") for key in ("max_seq_len", "max_batch_size")}
    try:  # Meta's params.json rules, as microllama's ModelArgs applies them
        ModelArgs.from_params(value)
    except (TypeError, ValueError) as e:
        raise _fail(file, at, str(e)) from e
    return ModelEntry(params={k: v for k, v in value.items() if k not in sizes}, **sizes)


# ---------------------------------------------------------------------------------------------------
# What the types cannot say: ranges, and the data files against the manifest.

_SHA256 = re.compile(r"[0-9a-f]{64}")


def device_type(device: Any) -> Optional[str]:
    """cpu, cuda, ... for a device name torch reads, else None."""
    try:
        return torch.device(device).type
    except (RuntimeError, TypeError):
        return None


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


def _check_array(
    file: Path, name: str, array: np.ndarray, dtype: type, shape: tuple[int, ...], meaning: str, high: int = 0
) -> None:
    """dtype and shape as the manifest implies; integer arrays (high > 0) hold values in [0, high)."""
    if array.dtype != dtype:
        raise GoldenError(f"{file}: {name}: dtype {array.dtype}, expected {np.dtype(dtype)}")
    if array.shape != shape:
        raise GoldenError(f"{file}: {name}: shape {array.shape}, expected {shape} ({meaning})")
    if high and array.size and not (0 <= array.min() and array.max() < high):
        raise GoldenError(f"{file}: {name}: ids outside [0, {high}) (the model's vocab_size)")


def _check_members(file: Path, arrays: dict[str, np.ndarray], expected: Sequence[str]) -> None:
    missing = [n for n in expected if n not in arrays]
    if missing:
        raise GoldenError(f"{file}: no array {missing[0]!r}, which the set declares")
    extra = [n for n in arrays if n not in expected]
    if extra:
        raise GoldenError(f"{file}: array {extra[0]!r} is not one the set declares")


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


# ---------------------------------------------------------------------------------------------------
# The files: written atomically and byte-deterministically, read with every sha256 and shape checked.


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


def json_bytes(value: Any) -> bytes:
    return (json.dumps(to_json(value), indent=1, ensure_ascii=False) + "\n").encode()


def is_golden_set(path: Union[str, Path]) -> bool:
    """Whether path is a directory whose manifest.json parses as a golden manifest."""
    try:
        read_manifest(path)
    except GoldenError:
        return False
    return True


def check_writable(out_dir: Union[str, Path]) -> None:
    """Raise GoldenError unless a set may be written at out_dir: absent, an empty directory, or a golden
    set (which is then replaced). Anything else (a file, a directory of other files) is never touched."""
    out_dir = Path(out_dir)
    if not out_dir.exists() or (out_dir.is_dir() and not any(out_dir.iterdir())) or is_golden_set(out_dir):
        return
    what = "a directory that is not a golden set" if out_dir.is_dir() else "not a directory"
    raise GoldenError(
        f"{out_dir} exists and is {what}: a golden set is written only to a new path, an empty directory, "
        "or over an existing golden set"
    )


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
    check_writable(out_dir)
    with atomic_dir(out_dir, replace=True) as tmp:
        (tmp / "outputs.json").write_bytes(json_bytes(outputs))
        (tmp / "logits.npz").write_bytes(npz_bytes(logits.arrays()))
        (tmp / "activations.npz").write_bytes(npz_bytes(activations))
        (tmp / "long_context.npz").write_bytes(npz_bytes({"ids": long_context}))
        if chat is not None:
            (tmp / "chat.json").write_bytes(json_bytes(chat))
        files = {name: file_sha256(tmp / name) for name in [*DATA_FILES, *OPTIONAL_FILES] if (tmp / name).is_file()}
        (tmp / "manifest.json").write_bytes(json_bytes(dataclasses.replace(manifest, files=files)))
    return Path(out_dir)


def _manifest_json(path: Path) -> tuple[Path, dict]:
    """The manifest.json of the set in directory path and its parsed JSON, of this microllama's schema."""
    file = path / "manifest.json"
    if not file.is_file():
        raise GoldenError(f"{file} not found: not a golden set directory")
    raw = read_json(file, GoldenError)
    if raw.get("schema") != SCHEMA_VERSION:
        raise _fail(file, "schema", f"{_show(raw.get('schema'))}, this microllama reads {SCHEMA_VERSION}")
    return file, raw


def read_manifest(path: Union[str, Path]) -> Manifest:
    """The manifest of the set in directory path, parsed and checked on its own (data files unread)."""
    file, raw = _manifest_json(Path(path))
    manifest = from_json(Manifest, raw, file)
    _check_manifest(manifest, file)
    return manifest


def _read_npz(file: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(file, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise GoldenError(f"{file}: not an npz archive of plain arrays: {e}") from e


def read_set(path: Union[str, Path]) -> GoldenSet:
    """Load a golden set: the manifest, then each data file against its sha256 (a changed, truncated or
    missing file raises GoldenError naming it), then every field and array against the manifest."""
    path = Path(path)
    manifest = read_manifest(path)
    for name in OPTIONAL_FILES:
        if name not in manifest.files and (path / name).exists():
            raise GoldenError(f"{path / name}: the manifest does not declare it (no {OPTIONAL_FILES[name]} entry)")
    for name in data_files(manifest):
        file = path / name
        if not file.is_file():
            raise GoldenError(f"{file} not found (the manifest lists it)")
        actual = file_sha256(file)
        if actual != manifest.files[name]:
            raise GoldenError(
                f"{file}: sha256 mismatch: the file has {actual}, the manifest recorded {manifest.files[name]} "
                "(changed or truncated since recording)"
            )
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


# ---------------------------------------------------------------------------------------------------
# Training sets: a short full fine-tune of Meta's reference model, recorded by
# reference_harness/record_training.py; `microllama verify` runs microllama's trainer on the same batch.
#
# - `manifest.json` (TrainingManifest): kind "training", the model, checkpoint, dtype, device, world size,
#   versions and platform as above, the optimizer's settings and per-step learning rates, the parameter
#   names in model order, and the sha256 of each data file.
# - `training.json` (TrainingOutputs): the loss of every step, the gradient norm of every step (before
#   clipping), each parameter's gradient norm at the first step, and of the final weights each
#   parameter's norm and sha256 and the state_dict_sha256 of them all.
# - `batch.npz`: `tokens` and `targets` (rows, seqlen) int32, the batch every step trains on (-100: no target).

TRAINING_KIND = "training"
TRAINING_DATA_FILES = ("training.json", "batch.npz")


@dataclass(frozen=True, kw_only=True)
class Optimization:
    """The steps' settings: torch's AdamW (decoupled weight decay on matrices only), the global gradient norm
    clipped to grad_clip before each step, the loss the sum of token losses over the batch's target count."""

    optimizer: str  # e.g. "torch.optim.AdamW(fused=True)"
    lrs: list[float]  # one per step
    betas: list[float]
    eps: float
    weight_decay: float
    grad_clip: float
    batch: str  # how the batch was drawn


@dataclass(frozen=True, kw_only=True)
class TrainingManifest:
    schema: int
    kind: str  # TRAINING_KIND
    recorded_by: str
    model: ModelEntry
    checkpoint: CheckpointEntry
    dtype: str
    device: str
    world_size: int
    versions: Versions
    platform: Platform
    optimization: Optimization
    parameters: list[str]  # names in model order: the order of the per-parameter lists of training.json
    files: dict[str, str] = field(default_factory=dict)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


@dataclass(frozen=True, kw_only=True)
class TrainingOutputs:
    losses: list[float]  # per step, the float32 loss
    grad_norms: list[float]  # per step, the global gradient norm before clipping
    first_step_grad_norms: list[float]  # per parameter, its gradient's norm at step 1
    final_weight_norms: list[float]  # per parameter, its final weight's norm
    final_parameter_sha256: list[str]  # per parameter, tensor_sha256 of its final (dense) weight
    final_sha256: str  # state_dict_sha256 of all final weights

    @classmethod
    def from_run(
        cls,
        losses: list[float],
        grad_norms: list[float],
        first_step_grad_norms: list[float],
        weights: dict[str, torch.Tensor],
    ) -> "TrainingOutputs":
        """A run's outputs, the final weights' norms and sha256 taken from weights (dense, in parameter order)."""
        return cls(
            losses=losses,
            grad_norms=grad_norms,
            first_step_grad_norms=first_step_grad_norms,
            final_weight_norms=[torch.linalg.vector_norm(w.float()).item() for w in weights.values()],
            final_parameter_sha256=[tensor_sha256(w) for w in weights.values()],
            final_sha256=state_dict_sha256(weights),
        )


@dataclass(frozen=True, kw_only=True, eq=False)
class TrainingSet:
    path: Path
    manifest: TrainingManifest
    outputs: TrainingOutputs
    tokens: np.ndarray  # (rows, seqlen) int32
    targets: np.ndarray  # (rows, seqlen) int32


def training_set_name(checkpoint: CheckpointEntry, dtype: str, device: str, world_size: int) -> str:
    """The default directory name of a training set, e.g. train-tiny-fp32-cpu-ws1."""
    return "train-" + set_name(checkpoint, dtype, device, world_size)


def is_training_set(path: Union[str, Path]) -> bool:
    """Whether path holds a manifest.json of kind "training" (read_training_set checks the rest)."""
    file = Path(path) / "manifest.json"
    try:
        return file.is_file() and read_json(file, GoldenError).get("kind") == TRAINING_KIND
    except GoldenError:
        return False


def _check_training(g: TrainingSet) -> None:
    m, o, file = g.manifest, g.outputs, g.path / "manifest.json"
    args = m.model.args
    _require(m.kind == TRAINING_KIND, file, "kind", f"expected {TRAINING_KIND!r}, got {_show(m.kind)}")
    _require(m.dtype in DTYPES, file, "dtype", f"expected one of {', '.join(DTYPES)}, got {_show(m.dtype)}")
    _require(device_type(m.device) in DEVICE_TYPES, file, "device", f"expected cpu or cuda, got {_show(m.device)}")
    _require(m.world_size >= 1, file, "world_size", f"expected a positive integer, got {m.world_size}")
    _require(_SHA256.fullmatch(m.checkpoint.sha256) is not None, file, "checkpoint.sha256", "expected 64 hex digits")
    steps = len(m.optimization.lrs)
    _require(steps >= 1, file, "optimization.lrs", "expected one learning rate per step, at least one")
    _require(len(m.optimization.betas) == 2, file, "optimization.betas", "expected two numbers")
    names = list(expected_shapes(args))
    _require(m.parameters == names, file, "parameters", f"expected the {len(names)} parameters of the model, in order")
    _require(sorted(m.files) == sorted(TRAINING_DATA_FILES), file, "files",
             f"expected the sha256 of {', '.join(TRAINING_DATA_FILES)}")  # fmt: skip
    out = g.path / "training.json"
    for at, values, n in (("losses", o.losses, steps), ("grad_norms", o.grad_norms, steps),
                          ("first_step_grad_norms", o.first_step_grad_norms, len(names)),
                          ("final_weight_norms", o.final_weight_norms, len(names)),
                          ("final_parameter_sha256", o.final_parameter_sha256, len(names))):  # fmt: skip
        _require(len(values) == n, out, at, f"{len(values)} values, expected {n}")
    for at, digest in [("final_sha256", o.final_sha256)] + [
        (f"final_parameter_sha256[{i}]", d) for i, d in enumerate(o.final_parameter_sha256)
    ]:
        _require(_SHA256.fullmatch(digest) is not None, out, at, "expected 64 lowercase hex digits")
    batch = g.path / "batch.npz"
    _require(g.tokens.ndim == 2 and g.tokens.shape[1] <= m.model.max_seq_len, batch, "tokens",
             f"expected (rows, seqlen <= {m.model.max_seq_len}), got shape {g.tokens.shape}")  # fmt: skip
    _check_array(batch, "tokens", g.tokens, np.int32, g.tokens.shape, "rows x seqlen", args.vocab_size)
    _check_array(batch, "targets", g.targets, np.int32, g.tokens.shape, "the shape of tokens")
    _require(bool(((g.targets == -100) | ((g.targets >= 0) & (g.targets < args.vocab_size))).all()), batch,
             "targets", f"expected ids in [0, {args.vocab_size}) or -100")  # fmt: skip


def write_training_set(
    out_dir: Union[str, Path], manifest: TrainingManifest, outputs: TrainingOutputs, tokens: np.ndarray,
    targets: np.ndarray,
) -> Path:  # fmt: skip
    """Write a training set atomically and byte-deterministically, the manifest with each data file's sha256.
    out_dir must be absent, an empty directory, or a training set (which is then replaced)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not (out_dir.is_dir() and not any(out_dir.iterdir())) and not is_training_set(out_dir):
        raise GoldenError(f"{out_dir} exists and is not a training golden set: it is never written over")
    with atomic_dir(out_dir, replace=True) as tmp:
        (tmp / "training.json").write_bytes(json_bytes(outputs))
        (tmp / "batch.npz").write_bytes(npz_bytes({"tokens": tokens, "targets": targets}))
        files = {name: file_sha256(tmp / name) for name in TRAINING_DATA_FILES}
        (tmp / "manifest.json").write_bytes(json_bytes(dataclasses.replace(manifest, files=files)))
    return out_dir


def read_training_set(path: Union[str, Path]) -> TrainingSet:
    """Load a training set: the manifest, each data file against its sha256, every field and array against
    the manifest; GoldenError naming file and field otherwise."""
    path = Path(path)
    file, raw = _manifest_json(path)
    manifest = from_json(TrainingManifest, raw, file)
    for name in TRAINING_DATA_FILES:
        if not (path / name).is_file():
            raise GoldenError(f"{path / name} not found (the manifest lists it)")
        actual = file_sha256(path / name)
        if actual != manifest.files.get(name):
            raise GoldenError(
                f"{path / name}: sha256 mismatch: the file has {actual}, the manifest recorded "
                f"{manifest.files.get(name)} (changed or truncated since recording)"
            )
    batch = _read_npz(path / "batch.npz")
    _check_members(path / "batch.npz", batch, ["tokens", "targets"])
    outputs = from_json(TrainingOutputs, read_json(path / "training.json", GoldenError), path / "training.json")
    golden = TrainingSet(path=path, manifest=manifest, outputs=outputs, tokens=batch["tokens"],
                         targets=batch["targets"])  # fmt: skip
    _check_training(golden)
    return golden
