"""Meta's checkpoint layout: params.json beside consolidated.00.pth, or beside one file per
tensor-parallel rank (consolidated.00.pth ... consolidated.NN.pth) as Meta publishes 70B and 405B.

fairscale splits each weight over the ranks (llama_models/llama3/model.py): RowParallelLinear (wo, w2)
along its input, dim 1; ColumnParallelLinear (wq, wk, wv, w1, w3, output) along its output, dim 0;
VocabParallelEmbedding along the vocabulary, dim 0; RMSNorm weights are replicated. Merging shards is
therefore concatenation, and splitting is chunking.
"""

import json
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any, Optional, Union

import torch

from ..args import ModelArgs
from ..files import READS, StateDict, atomic_dir, converted, copy_releasing, dtype_name, own_tensors, release_pages
from ..quantize import is_dense, is_quantized_key, quantize_weight, quantized_rows
from .params import CheckpointError, args_from_params, check_dtype, check_finite, check_shapes, expected_shapes

ROW_PARALLEL = ("attention.wo.weight", "feed_forward.w2.weight")
SHARD_NAME = re.compile(r"consolidated\.(\d{2})\.pth")


def shard_dim(key: str) -> Optional[int]:
    """The dim along which Meta's tensor parallelism splits the weight `key`; None if replicated."""
    if key.endswith("norm.weight"):
        return None
    return 1 if key.endswith(ROW_PARALLEL) else 0


def shard_shape(key: str, shape: tuple[int, ...], n: int) -> tuple[int, ...]:
    """The shape of one of n shards of the weight `key` of the given dense shape."""
    dim = shard_dim(key)
    return shape if dim is None else shape[:dim] + (shape[dim] // n,) + shape[dim + 1 :]


def shard_count(args: ModelArgs, n: int) -> int:
    """The most shards, at most n and dividing n, that Meta's layout can split this model into: a count that
    divides the attention heads, the kv heads and every split dimension (n itself where the model allows it)."""
    split = [shape[shard_dim(key)] for key, shape in expected_shapes(args).items() if shard_dim(key) is not None]
    sizes = [args.n_heads, args.n_kv_heads, *split]
    return max(k for k in range(1, n + 1) if n % k == 0 and all(size % k == 0 for size in sizes))


def shard_files(ckpt_dir: Path, args: ModelArgs) -> list[Path]:
    """consolidated.00.pth ... in rank order, checked to be a set of shards Meta's tensor parallelism can
    have written: numbered from 00 without a gap, a count that divides the attention heads."""
    paths = sorted(ckpt_dir.glob("*.pth"))
    if not paths:
        raise CheckpointError(f"{ckpt_dir}: no consolidated.*.pth checkpoint files beside params.json")
    n = len(paths)
    expected = [shard_name(rank) for rank in range(n)]
    if [p.name for p in paths] != expected:
        found = ", ".join(p.name for p in paths)
        raise CheckpointError(
            f"{ckpt_dir}: {n} *.pth files ({found}); a Meta checkpoint of {n} shards is "
            f"{expected[0]}{f' ... {expected[-1]}' if n > 1 else ''}"
        )
    if args.n_heads % n or args.n_kv_heads % n:
        raise CheckpointError(
            f"{ckpt_dir}: {n} *.pth shards, but splitting attention over {n} tensor-parallel ranks needs "
            f"n_heads ({args.n_heads}) and n_kv_heads ({args.n_kv_heads}) in params.json divisible by {n}"
        )
    return paths


# A checkpoint saved from a quantized model (its state_dict holds torchao's tensor subclasses).
QUANTIZED = (
    "{path}: a quantized model's weights ({what}); microllama reads and converts full-precision checkpoints "
    "and quantizes as it loads (--quantize): give the checkpoint it was quantized from"
)


def load_pth(path: Path) -> StateDict:
    """The tensors of one torch.save file, memory-mapped; a pickle that would build anything but tensors
    is refused."""
    with open(path, "rb") as f:
        head = f.read(4)
    if not zipfile.is_zipfile(path):
        if head.startswith(b"PK"):
            raise CheckpointError(f"{path}: a truncated or damaged torch.save archive (its zip directory is missing)")
        if head.startswith(b"\x80"):
            raise CheckpointError(
                f"{path}: a pickle, not the zip archive torch.save writes (torch >= 1.6); microllama memory-maps "
                "weights and reads only that format: load it and torch.save it again"
            )
        raise CheckpointError(f"{path}: not a torch.save file (it begins with the bytes {head!r})")
    if head != b"PK\x03\x04":  # a zip directory at the end, but the first entry's header overwritten
        raise CheckpointError(
            f"{path}: a damaged torch.save archive: its zip header is overwritten (it begins {head!r})"
        )
    try:
        state_dict = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as e:
        if "torchao" in str(e):
            raise CheckpointError(QUANTIZED.format(path=path, what="torchao's quantized tensors")) from e
        raise CheckpointError(
            f"{path}: refused to unpickle: it holds objects other than tensors, whose loading could run code "
            f"(torch.load weights_only=True): {str(e).splitlines()[0]}"
        ) from e
    except Exception as e:  # torch raises several types for damaged archives
        raise CheckpointError(
            f"{path}: a damaged torch.save archive: {type(e).__name__}: {str(e).splitlines()[0]}"
        ) from e
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise CheckpointError(f"{path} must hold a dict of tensors, got {type(state_dict).__name__}")
    for key, t in state_dict.items():
        if not is_dense(t):
            raise CheckpointError(QUANTIZED.format(path=path, what=f"tensor {key!r}, a {type(t).__name__}"))
    return state_dict


def meta_stored_bytes(paths: list[Path]) -> dict[str, int]:
    """Bytes of the tensors per dtype name, as stored (files are memory-mapped: only headers are read)."""
    totals: dict[str, int] = {}
    for path in paths:
        for t in load_pth(path).values():
            totals[dtype_name(t.dtype)] = totals.get(dtype_name(t.dtype), 0) + t.nbytes
    return totals


def rank_range(size: int, part: tuple[int, int]) -> tuple[int, int]:
    """The indices [start, stop) that rank r of n holds of a dimension of `size` split by tensor parallelism,
    part = (r, n): equal contiguous blocks in rank order, as fairscale splits and DTensor's Shard places them."""
    rank, n = part
    return rank * size // n, (rank + 1) * size // n


# FSDP2's rows: for each tensor, the first row this rank holds (dim 0) and its local tensor, which the reader
# fills in place (see data_parallel.shard_rows).
Rows = dict[str, tuple[int, torch.Tensor]]


def read_meta(
    paths: list[Path],
    args: ModelArgs,
    device: torch.device,
    dtype: Optional[torch.dtype],
    config: Path,
    part: tuple[int, int] = (0, 1),
    quantize: Optional[str] = None,
    into: Optional[Rows] = None,
) -> StateDict:
    """The checked tensors of the shard files `paths`, in dtype (None: as stored) on device: dense, or with
    part = (rank, n) only the slice of each split tensor that rank holds under tensor parallelism at n ranks,
    or with `into` only the rows of every tensor that an FSDP2 rank holds, copied into its local tensors (which
    the result then holds). quantize: a format of microllama.quantize, in which the block linear layers' weights
    are quantized one by one as they are read, their mapped pages given back: host memory holds the quantized
    tensors and one full-precision tensor more. With `into` too, each of those is read whole in its local
    tensor's dtype, quantized as one process quantizes it, and only this rank's rows of the result kept
    (quantize.quantized_rows; the result holds them, for the caller to place).

    Only the shards holding the slices are opened (n ranks over n shards: rank i opens consolidated.0i.pth
    alone), memory-mapped, and each tensor is assembled from its pieces (a row block of a column-parallel shard,
    or the rows of each row-parallel shard: a block of columns), whose pages are given back block by block as
    they are copied: host memory holds the result and a block more. A tensor that is one piece needing no
    conversion is used as mapped, without a copy."""
    n = len(paths)
    expected = expected_shapes(args)
    per_shard = {key: shard_shape(key, shape, n) for key, shape in expected.items()}
    fill = filled_in_place(into, quantize)
    wanted = {key: _wanted(key, shape, part, fill) for key, shape in expected.items()}
    # a rank whose slices are all empty (more FSDP ranks than rows) still opens the first shard, for its checks
    opened = sorted({s for key in expected for s, _, _ in _pieces(key, expected[key], n, wanted[key])} - {None} or {0})
    shards = {s: load_pth(paths[s]) for s in opened}
    first, base = paths[opened[0]], shards[opened[0]]
    what = config.name if n == 1 else f"{config.name} split over {n} shards"
    for s, shard in shards.items():
        _check_count(shard, expected, n, paths[s])
        check_shapes({k: tuple(v.shape) for k, v in shard.items()}, per_shard, paths[s], what)
        for key, t in shard.items():
            check_dtype(t.dtype, key, paths[s])
            if t.dtype != base[key].dtype:
                raise CheckpointError(f"{paths[s]}: tensor {key!r} is {t.dtype}, but {base[key].dtype} in {first}")
    out: StateDict = {}
    for key, shape in expected.items():
        if shard_dim(key) is None:
            for s in opened[1:]:
                if not torch.equal(shards[s][key], base[key]):
                    raise CheckpointError(f"{paths[s]}: replicated tensor {key!r} differs from the one in {first}")
                READS.count(shards[s][key], base[key])
                release_pages(shards[s][key])  # replicated, equal to the first: compared, not kept
        pieces = [(at, (base if s is None else shards[s])[key][index])
                  for s, index, at in _pieces(key, shape, n, wanted[key])]  # fmt: skip
        # a quantized weight read whole under FSDP2: in its shard's dtype, the one it dequantizes to
        as_dtype = into[key][1].dtype if into is not None and key not in fill else dtype
        if key not in fill and len(pieces) == 1 and pieces[0][1].is_contiguous():
            out[key] = converted(pieces[0][1], device, as_dtype)  # as mapped when nothing changes
            copied = out[key].data_ptr() != pieces[0][1].data_ptr()
        else:
            if key in fill:
                out[key] = fill[key][1]
            else:
                local = tuple(i.stop - i.start for i in _box(shape, wanted[key]))
                out[key] = torch.empty(local, device=device, dtype=as_dtype or base[key].dtype)
            for at, piece in pieces:
                copy_releasing(out[key][at], piece)
            copied = True
        if copied:
            READS.count(*(piece for _, piece in pieces))
        check_finite(out[key], key, first if len(opened) == 1 else first.parent)
        if quantize is not None and is_quantized_key(key):
            out[key] = quantize_weight(out[key], quantize, key)
            if into is not None:
                out[key] = quantized_rows(out[key], into[key][0], into[key][1].shape[0])
            for _, piece in pieces:
                release_pages(piece)
    return out


def _check_count(shard: StateDict, expected: dict[str, tuple[int, ...]], n: int, path: Path) -> None:
    """A shard holding 1/k of the vocabulary, k a multiple of the n files found: shards are missing."""
    rows, vocab = shard.get("tok_embeddings.weight", torch.empty(0)).shape[0], expected["tok_embeddings.weight"][0]
    if rows and rows * n != vocab and vocab % rows == 0 and (vocab // rows) % n == 0:
        k = vocab // rows
        raise CheckpointError(
            f"{path.parent}: {n} consolidated.*.pth file{'s' * (n > 1)}, but {path.name} holds 1/{k} of each split "
            f"tensor: a checkpoint of {k} shards, {k - n} of them missing"
        )


def filled_in_place(into: Optional[Rows], quantize: Optional[str]) -> Rows:
    """Of an FSDP2 rank's rows (`into`), those a reader copies into its local tensors: with quantize, all but the
    quantized weights', which are read whole, quantized, and cut to this rank's rows (quantize.quantized_rows)."""
    return {k: v for k, v in (into or {}).items() if quantize is None or not is_quantized_key(k)}


def _wanted(key: str, shape: tuple[int, ...], part: tuple[int, int], into: Rows) -> Optional[tuple]:
    """(dim, start, stop): the slice of the dense tensor `key` to read (its rows in `into`); None for all of it."""
    if key in into:
        first, local = into[key]
        if tuple(local.shape[1:]) != shape[1:]:
            raise ValueError(f"{key}: a local tensor of shape {tuple(local.shape)} cannot hold rows of {shape}")
        return 0, first, first + local.shape[0]
    dim = shard_dim(key)
    return None if dim is None or part == (0, 1) else (dim, *rank_range(shape[dim], part))


def _box(shape: tuple[int, ...], wanted: Optional[tuple]) -> list[slice]:
    box = [slice(0, size) for size in shape]
    if wanted is not None:
        box[wanted[0]] = slice(wanted[1], wanted[2])
    return box


def _pieces(key: str, shape: tuple[int, ...], n: int, wanted: Optional[tuple]) -> list[tuple[int, tuple, tuple]]:
    """The pieces the slice `wanted` of tensor `key` is read from: (shard, its index into the shard's tensor,
    where it goes in the slice), one per shard that overlaps it. Shard s of a split tensor holds the block
    [s * size, (s + 1) * size) of its split dim; a replicated one (shard None) is read from the first shard opened."""
    box, dim = _box(shape, wanted), shard_dim(key)
    if dim is None:
        return [(None, tuple(box), tuple(slice(0, b.stop - b.start) for b in box))]
    size, pieces = shape[dim] // n, []
    for s in range(n):
        a, b = max(box[dim].start, s * size), min(box[dim].stop, (s + 1) * size)
        if b > a:
            src, dst = list(box), [slice(0, x.stop - x.start) for x in box]
            src[dim], dst[dim] = slice(a - s * size, b - s * size), slice(a - box[dim].start, b - box[dim].start)
            pieces.append((s, tuple(src), tuple(dst)))
    return pieces


def shard_name(rank: int) -> str:
    return f"consolidated.{rank:02d}.pth"


def write_params(out_dir: Path, params: dict[str, Any]) -> None:
    (out_dir / "params.json").write_text(json.dumps(params, indent=2) + "\n")


def save_meta(state_dict: StateDict, params: dict[str, Any], out_dir: Union[str, Path], n_shards: int = 1) -> Path:
    """Write params.json and consolidated.NN.pth, the tensors split over n_shards tensor-parallel
    ranks exactly as fairscale splits them. out_dir must be absent or empty."""
    args = args_from_params(params, "params.json")
    if n_shards < 1 or args.n_heads % n_shards or args.n_kv_heads % n_shards:
        raise ValueError(
            f"cannot split into {n_shards} shards: n_heads ({args.n_heads}) and n_kv_heads ({args.n_kv_heads}) "
            "must be divisible by the shard count"
        )
    with atomic_dir(out_dir) as tmp:
        write_params(tmp, params)
        for rank in range(n_shards):
            shard = {
                k: v if shard_dim(k) is None else v.chunk(n_shards, dim=shard_dim(k))[rank]
                for k, v in state_dict.items()
            }
            torch.save(own_tensors(shard), tmp / shard_name(rank))
    return Path(out_dir)
