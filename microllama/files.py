"""What every file microllama writes or reads needs, whatever the format: directories written
atomically, sha256 digests, JSON objects, dtype names, memory-mapped weights converted without
holding the whole file resident.

Both checkpoint layouts and the golden sets build on this module; it imports nothing of microllama.
"""

import contextlib
import ctypes
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional, Union

import torch

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}  # fmt: skip
StateDict = dict[str, torch.Tensor]


def parse_dtype(dtype: Union[str, torch.dtype]) -> torch.dtype:
    """torch.float32, torch.bfloat16 or torch.float16 from a torch dtype or a name (float32, bf16, ...)."""
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def read_json(path: Path, error: type[Exception] = ValueError) -> dict[str, Any]:
    """The JSON object in path; `error` (naming the file) if it is missing, not JSON, or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{path} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise error(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tensor_sha256(t: torch.Tensor) -> str:
    """sha256 of a tensor's bytes in row-major order."""
    return hashlib.sha256(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def state_dict_sha256(state_dict: StateDict) -> str:
    """sha256 over names, dtypes, shapes and bytes, in key order: independent of the file format and of
    how the tensors were split into files."""
    h = hashlib.sha256()
    for key in sorted(state_dict):
        t = state_dict[key].detach().contiguous().cpu()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def own_tensors(state_dict: StateDict) -> StateDict:
    """state_dict with every tensor owning its storage: torch.save writes a view's whole storage, and
    a storage shared by two keys (a tied output) once."""
    seen: set[int] = set()
    out = {}
    for key, t in state_dict.items():
        ptr = t.untyped_storage().data_ptr()
        shared = ptr in seen or t.untyped_storage().nbytes() != t.nbytes or not t.is_contiguous()
        out[key] = t.clone(memory_format=torch.contiguous_format) if shared else t
        seen.add(ptr)
    return out


# A directory being written is a hidden sibling `.NAME.partial-PID-XXXX`, renamed to NAME when complete.
_PARTIAL = ".partial-"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def remove_stale_partials(out_dir: Path) -> list[Path]:
    """Remove what an earlier write of out_dir left when its process was killed (a partial directory,
    or an old copy set aside): those whose writing process no longer runs. Returns what was removed."""
    removed = []
    for path in out_dir.parent.glob(f".{out_dir.name}{_PARTIAL}*"):
        pid = path.name.removeprefix(f".{out_dir.name}{_PARTIAL}").split("-")[0]
        if pid.isdigit() and not _process_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publish_permissions(root: Path) -> None:
    """Give everything under root the permissions a plain open() would: some writers (mkdtemp,
    safetensors) create private 0600/0700 files."""
    mask = _umask()
    root.chmod(0o777 & ~mask)
    for path in root.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


@contextlib.contextmanager
def atomic_dir(out_dir: Union[str, Path], replace: bool = False) -> Iterator[Path]:
    """A temporary directory beside out_dir, renamed to out_dir when the block succeeds. out_dir must
    be absent or an empty directory, unless `replace` (the caller has checked that what is there may go):
    then an old out_dir stays whole, set aside, until the new one is in place. An interrupted write never
    leaves a half-written out_dir, and what a killed one left behind is removed by the next."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is not a directory")
    if not replace and out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} exists and is not empty")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(out_dir)
    prefix = f".{out_dir.name}{_PARTIAL}{os.getpid()}-"
    try:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=out_dir.parent))
    except OSError as e:
        raise _naming_target(e, out_dir.parent / prefix, out_dir) from e
    try:
        yield tmp
        _publish_permissions(tmp)
        if out_dir.exists():
            old = tmp.with_name(tmp.name + "-old")
            out_dir.rename(old)
            tmp.rename(out_dir)
            shutil.rmtree(old)
        else:
            tmp.rename(out_dir)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _naming_target(e, tmp, out_dir) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _naming_target(e: OSError, tmp: Path, out_dir: Path) -> OSError:
    """e as the user should read it: a file of the temporary directory named as the file of out_dir it
    becomes (the temporary name means nothing to them); e itself if it concerns another file."""
    name = str(e.filename or "")
    if not name.startswith(str(tmp)):
        return e
    rest = name[len(str(tmp)) :]  # a file within it, or mkdtemp's random suffix
    target = out_dir / rest.lstrip(os.sep) if rest.startswith(os.sep) else out_dir
    return type(e)(f"cannot write {target}: {e.strerror or e}")


_MADV_DONTNEED = 4  # <sys/mman.h>, Linux
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def release_pages(t: torch.Tensor) -> None:
    """Give back the resident pages of a memory-mapped weight whose values have been copied: they stop
    counting in this process's memory, and are read from the file again if touched (weights are mapped
    read-only). Only whole pages inside the tensor's bytes. Linux only; elsewhere the OS reclaims them
    when it needs to."""
    if _libc is None or not t.is_contiguous():
        return
    start = -(-t.data_ptr() // _PAGE) * _PAGE
    end = (t.data_ptr() + t.nbytes) // _PAGE * _PAGE
    if end > start:
        _libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), ctypes.c_int(_MADV_DONTNEED))


def copy_releasing(dst: torch.Tensor, src: torch.Tensor, block_bytes: int = 1 << 26) -> None:
    """dst.copy_(src) (converting dtype, moving device) in blocks of rows, each block's mapped pages
    released once copied: the whole source is never resident beside its copy."""
    if not src.dim():
        dst.copy_(src)
        return
    rows = max(1, block_bytes * src.shape[0] // max(1, src.nbytes))
    for start in range(0, src.shape[0], rows):
        dst[start : start + rows].copy_(src[start : start + rows])
        release_pages(src[start : start + rows])


def converted(t: torch.Tensor, device: torch.device, dtype: Optional[torch.dtype]) -> torch.Tensor:
    """t in dtype (None: its own) on device: t itself when nothing changes, else a copy made by
    copy_releasing."""
    if dtype in (None, t.dtype) and t.device == device:
        return t
    out = torch.empty(t.shape, device=device, dtype=dtype or t.dtype)
    copy_releasing(out, t)
    return out


class ReadTally:
    """Bytes of checkpoint tensors this process has read out of their files (copied from a memory map, or
    sliced by safetensors), counted by the readers: a test or benchmark reads `bytes` before and after."""

    def __init__(self) -> None:
        self.bytes = 0

    def count(self, *tensors: torch.Tensor) -> None:
        self.bytes += sum(t.nbytes for t in tensors)


READS = ReadTally()
