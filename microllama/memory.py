"""How much memory a device has left, so that what cannot fit (a KV cache for a long max_seq_len) is refused in one
line before it is allocated, instead of ending in the kernel's out-of-memory killer or a CUDA error mid-way."""

import os
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Union

from .args import ModelArgs

if TYPE_CHECKING:  # torch is imported where a device is asked about: `microllama info NAME` sizes without it
    import torch


def format_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def _meminfo_available() -> Optional[int]:
    """MemAvailable of /proc/meminfo (what the kernel can give without swapping), else the free pages."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None


def _cgroup_room() -> Optional[int]:
    """What this process's cgroup (v2) still allows, where it sets a limit: a container's limit is not in
    /proc/meminfo, which describes the whole machine."""
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = Path("/sys/fs/cgroup/memory.current").read_text().strip()
    except OSError:
        return None
    return None if limit == "max" else int(limit) - int(used)


def available_bytes(device: Union[str, "torch.device"]) -> Optional[int]:
    """Bytes a new tensor on device can still take: on CUDA the driver's free memory plus what torch's caching
    allocator holds unused; on the CPU MemAvailable, within the cgroup's limit if one is set; None where unknown."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type != "cpu":
        return None
    known = [n for n in (_meminfo_available(), _cgroup_room()) if n is not None]
    return min(known) if known else None


def check_fits(what: str, nbytes: int, device: Union[str, "torch.device"], advice: str) -> None:
    """Raise ValueError, one line saying what needs how much and what is available, if nbytes do not fit
    device's available memory (available_bytes); nothing is allocated here."""
    available = available_bytes(device)
    if available is not None and nbytes > available:
        raise ValueError(f"{what} takes {format_bytes(nbytes)} ({nbytes:,} bytes), more than the "
                         f"{format_bytes(available)} available on {device}: {advice}")  # fmt: skip


def kv_cache_bytes(
    args: ModelArgs, max_batch_size: int, max_seq_len: int, itemsize: int, n_kv_heads: Optional[int] = None
) -> int:
    """Keys and values of max_batch_size x max_seq_len positions in every layer, itemsize bytes each. n_kv_heads:
    the kv heads one rank caches under tensor parallelism (default: the model's)."""
    heads = args.n_kv_heads if n_kv_heads is None else n_kv_heads
    return max_batch_size * max_seq_len * 2 * args.n_layers * heads * args.head_dim * itemsize


def check_kv_cache(
    args: ModelArgs,
    max_batch_size: int,
    max_seq_len: int,
    dtype: "torch.dtype",
    device: Union[str, "torch.device"],
    n_kv_heads: Optional[int] = None,
) -> int:
    """The bytes of a KV cache of max_batch_size x max_seq_len positions in dtype on device for a model of args
    (kv_cache_bytes); ValueError, one line and nothing allocated, unless the model takes that many positions
    and the device has room for them. It needs only the configuration: generation asks before any weight loads."""
    if not 0 < max_seq_len <= args.max_seq_len or max_batch_size < 1:
        raise ValueError(f"a KV cache of {max_batch_size} x {max_seq_len} positions; the model takes 1 to "
                         f"max_seq_len {args.max_seq_len} positions and at least 1 sequence")  # fmt: skip
    nbytes = kv_cache_bytes(args, max_batch_size, max_seq_len, dtype.itemsize, n_kv_heads)
    check_fits(f"a KV cache of {max_batch_size} x {max_seq_len:,} positions in {str(dtype).removeprefix('torch.')}",
               nbytes, device, "lower max_seq_len or max_batch_size")  # fmt: skip
    return nbytes
