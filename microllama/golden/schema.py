"""What the golden sets (inference_set.py) and the training sets (training_set.py) share: the typed-JSON
engine that builds and parses every file of both formats, the manifest entries both hold (model, checkpoint,
versions, platform), and the file writers and readers.

Data files load without running code (npz with allow_pickle off, json), and are written byte for byte the
same from the same numbers. A set is read only when its files are what its manifest declares: every sha256,
every field's type, and every array's name, dtype and shape; anything else is a one-line GoldenError naming
file and field.
"""

import dataclasses
import io
import json
import re
import types
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union, get_args, get_origin

import numpy as np
import torch

from ..args import ModelArgs, is_finite, is_int
from ..files import file_sha256, read_json

SCHEMA_VERSION = 1
# The dtypes a set is recorded in (microllama.tolerances bounds both), and their short names in set names.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
SHORT_DTYPES = {"float32": "fp32", "bfloat16": "bf16"}
DEVICE_TYPES = ("cpu", "cuda")
# The model config's keys the arrays' shapes depend on (ModelArgs would fill in defaults), and the run sizes.
MODEL_KEYS = ("dim", "n_layers", "n_heads", "vocab_size", "max_seq_len", "max_batch_size")


class GoldenError(ValueError):
    """A golden set that is missing, malformed, or changed since it was recorded."""


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


def file_hashes(directory: Path, names: Sequence[str]) -> dict[str, str]:
    """name -> sha256 of each of the named files that directory holds: a manifest's `files`."""
    return {name: file_sha256(directory / name) for name in names if (directory / name).is_file()}


def check_files(directory: Path, recorded: dict[str, str], names: Sequence[str]) -> None:
    """Raise GoldenError unless each named file is in directory with the sha256 its manifest recorded."""
    for name in names:
        file = directory / name
        if not file.is_file():
            raise GoldenError(f"{file} not found (the manifest lists it)")
        actual = file_sha256(file)
        if actual != recorded.get(name):
            raise GoldenError(
                f"{file}: sha256 mismatch: the file has {actual}, the manifest recorded {recorded.get(name)} "
                "(changed or truncated since recording)"
            )


def check_writable(out_dir: Union[str, Path], is_set: Callable[[Path], bool], kind: str) -> None:
    """Raise GoldenError unless a set of this kind ("golden set", "training set") may be written at out_dir:
    absent, an empty directory, or such a set (is_set; it is then replaced). Anything else (a file, a directory
    of other files) is never touched."""
    out_dir = Path(out_dir)
    if not out_dir.exists() or (out_dir.is_dir() and not any(out_dir.iterdir())) or is_set(out_dir):
        return
    what = f"a directory that is not a {kind}" if out_dir.is_dir() else "not a directory"
    raise GoldenError(
        f"{out_dir} exists and is {what}: a {kind} is written only to a new path, an empty directory, "
        f"or over an existing {kind}"
    )


def _manifest_json(path: Path) -> tuple[Path, dict]:
    """The manifest.json of the set in directory path and its parsed JSON, of this microllama's schema."""
    file = path / "manifest.json"
    if not file.is_file():
        raise GoldenError(f"{file} not found: not a golden set directory")
    raw = read_json(file, GoldenError)
    if raw.get("schema") != SCHEMA_VERSION:
        raise _fail(file, "schema", f"{_show(raw.get('schema'))}, this microllama reads {SCHEMA_VERSION}")
    return file, raw


def _read_npz(file: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(file, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise GoldenError(f"{file}: not an npz archive of plain arrays: {e}") from e
