"""Checkpoints on disk, in Meta's layout (params.json beside consolidated.NN.pth, one file per
tensor-parallel rank) or Hugging Face's (config.json beside *.safetensors, see hf.py).

Loading is lean: files are memory-mapped, pickles that would run code are refused (weights_only),
the model is built on the meta device and takes the checkpoint's tensors as they are when dtype and
device already match (no copy, no float32 round trip), and each tensor is converted or moved to the
GPU on its own as it is read. Every check runs before a model is returned; errors name file and key.
"""

import contextlib
import dataclasses
import hashlib
import json
import pickle
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional, Union

import torch

from . import family
from .model import ModelArgs, Transformer, ffn_hidden_dim

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}  # fmt: skip
StateDict = dict[str, torch.Tensor]
# fairscale splits each weight over the tensor-parallel ranks (llama_models/llama3/model.py):
# RowParallelLinear (wo, w2) along its input, dim 1; ColumnParallelLinear (wq, wk, wv, w1, w3, output)
# along its output, dim 0; VocabParallelEmbedding along the vocabulary, dim 0; RMSNorm weights are
# replicated. Merging shards is therefore concatenation, and splitting is chunking.
ROW_PARALLEL = ("attention.wo.weight", "feed_forward.w2.weight")


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded as asked."""


def parse_dtype(dtype: Union[str, torch.dtype]) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def shard_dim(key: str) -> Optional[int]:
    """The dim along which Meta's tensor parallelism splits the weight `key`; None if replicated."""
    if key.endswith("norm.weight"):
        return None
    return 1 if key.endswith(ROW_PARALLEL) else 0


def layout(ckpt_dir: Union[str, Path]) -> str:
    """'meta' (params.json) or 'hf' (config.json)."""
    path = Path(ckpt_dir)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {path}")
    if (path / "params.json").is_file():
        return "meta"
    if (path / "config.json").is_file():
        return "hf"
    raise CheckpointError(
        f"{path}: no params.json (Meta layout, beside consolidated.*.pth) and no config.json "
        "(Hugging Face layout, beside *.safetensors)"
    )


def config_path(ckpt_dir: Union[str, Path]) -> Path:
    """The file holding the model's configuration: params.json or config.json."""
    return Path(ckpt_dir) / ("params.json" if layout(ckpt_dir) == "meta" else "config.json")


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def read_params(ckpt_dir: Union[str, Path]) -> dict[str, Any]:
    """The dict in ckpt_dir/params.json."""
    if layout(ckpt_dir) != "meta":
        raise CheckpointError(f"{Path(ckpt_dir) / 'params.json'} not found: {ckpt_dir} is in Hugging Face layout")
    return read_json(Path(ckpt_dir) / "params.json")


def args_from_params(params: dict[str, Any], source: Union[str, Path], **runtime: Any) -> ModelArgs:
    """ModelArgs for a params.json dict. A family member whose published RoPE factor differs from Meta's
    hard-coded 8 (Llama 3.2 1B and 3B: 32) gets the published one unless params sets rope_scale_factor."""
    try:
        args = ModelArgs.from_params(params, **runtime)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: {e}") from e
    name = family.match(vars(args), ffn_hidden_dim(args.dim, args.multiple_of, args.ffn_dim_multiplier))
    published = family.FAMILY[name].get("rope_scale_factor") if name else None
    if published is not None and "rope_scale_factor" not in params:
        args = args.replace(rope_scaling=dataclasses.replace(args.rope_scaling, factor=published))
    return args


def expected_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor a checkpoint for args holds (computed on the meta device)."""
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in Transformer(args).state_dict().items()}


def check_shapes(
    shapes: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]], source: Union[str, Path], config: str
) -> None:
    """Raise CheckpointError naming the first missing, unexpected or mis-shaped tensor in source."""
    missing = sorted(expected.keys() - shapes.keys())
    unexpected = sorted(shapes.keys() - expected.keys())
    if missing:
        raise CheckpointError(f"{source}: missing tensor {missing[0]!r} ({len(missing)} missing in all)")
    if unexpected:
        raise CheckpointError(f"{source}: unexpected tensor {unexpected[0]!r} ({len(unexpected)} unexpected in all)")
    for key, shape in expected.items():
        if tuple(shapes[key]) != shape:
            raise CheckpointError(f"{source}: tensor {key!r} has shape {tuple(shapes[key])}, {config} implies {shape}")


def load_pth(path: Path) -> StateDict:
    """The tensors of one .pth file, memory-mapped; a pickle that would build anything but tensors is refused."""
    try:
        state_dict = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: refused to unpickle: it holds objects other than tensors, whose loading could run code "
            f"(torch.load weights_only=True): {str(e).splitlines()[0]}"
        ) from e
    except Exception as e:  # torch raises several types for truncated or foreign files
        raise CheckpointError(
            f"{path}: not a complete torch.save file (truncated?): {type(e).__name__}: {str(e).splitlines()[0]}"
        ) from e
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise CheckpointError(f"{path} must hold a dict of tensors, got {type(state_dict).__name__}")
    return state_dict


def meta_shards(ckpt_dir: Union[str, Path], args: ModelArgs) -> list[Path]:
    """The *.pth files in rank order, checked to be a shard count Meta's tensor parallelism can have made."""
    paths = sorted(Path(ckpt_dir).glob("*.pth"))
    if not paths:
        raise CheckpointError(f"{ckpt_dir}: no *.pth checkpoint files beside params.json")
    n = len(paths)
    if args.n_heads % n or args.n_kv_heads % n:
        raise CheckpointError(
            f"{ckpt_dir}: {n} *.pth shards, but splitting attention over {n} tensor-parallel ranks needs "
            f"n_heads ({args.n_heads}) and n_kv_heads ({args.n_kv_heads}) in params.json divisible by {n}"
        )
    return paths


def read_meta(
    ckpt_dir: Union[str, Path], args: ModelArgs, device: torch.device, dtype: Optional[torch.dtype]
) -> StateDict:
    """The dense tensors of a Meta-layout checkpoint in dtype (None: as stored) on device. One shard is
    used as read (memory-mapped); several are merged one at a time into tensors allocated once, so host
    memory holds the merged weights plus one shard."""
    paths = meta_shards(ckpt_dir, args)
    n = len(paths)
    expected = expected_shapes(args)
    per_shard = {}
    for key, shape in expected.items():
        dim = shard_dim(key)
        per_shard[key] = shape if dim is None else shape[:dim] + (shape[dim] // n,) + shape[dim + 1 :]
    merged: StateDict = {}
    for rank, path in enumerate(paths):
        shard = load_pth(path)
        config = "params.json" if n == 1 else f"params.json split over {n} shards"
        check_shapes({k: tuple(v.shape) for k, v in shard.items()}, per_shard, path, config)
        for key, tensor in shard.items():
            dim = shard_dim(key)
            if n == 1:
                merged[key] = tensor.to(device=device, dtype=dtype)
            elif dim is None and rank == 0:
                merged[key] = tensor.to(device=device, dtype=dtype, copy=True)
            elif dim is None:
                if not torch.equal(tensor.to(device=device, dtype=dtype), merged[key]):
                    raise CheckpointError(f"{path}: replicated tensor {key!r} differs from the one in {paths[0]}")
            else:
                if rank == 0:
                    merged[key] = torch.empty(expected[key], device=device, dtype=dtype or tensor.dtype)
                size = per_shard[key][dim]
                merged[key].narrow(dim, rank * size, size).copy_(tensor)
        del shard, tensor  # unmaps the file before the next one is read
    return merged


def checkpoint_params(ckpt_dir: Union[str, Path]) -> dict[str, Any]:
    """Meta's params.json dict for a checkpoint in either layout."""
    if layout(ckpt_dir) == "meta":
        return read_params(ckpt_dir)
    from .hf import read_config  # hf.py builds on this module

    return read_config(ckpt_dir)[0]


def read_checkpoint(
    ckpt_dir: Union[str, Path],
    device: Union[str, torch.device] = "cpu",
    dtype: Optional[Union[str, torch.dtype]] = None,
    **runtime: Any,
) -> tuple[ModelArgs, StateDict]:
    """ModelArgs and dense, checked tensors in Meta's names, from either layout, in dtype (None: as
    stored). runtime: ModelArgs fields the checkpoint does not fix (max_seq_len, max_batch_size, flash)."""
    from .hf import read_hf

    dtype, device = None if dtype is None else parse_dtype(dtype), torch.device(device)
    args = args_from_params(checkpoint_params(ckpt_dir), config_path(ckpt_dir), **runtime)
    read = read_meta if layout(ckpt_dir) == "meta" else read_hf
    return args, read(ckpt_dir, args, device, dtype)


def convert(src: Union[str, Path], dst: Union[str, Path], to: str, shards: int = 1) -> Path:
    """Rewrite checkpoint src as dst in layout `to` ('meta', in `shards` files, or 'hf'), tensors
    bit for bit in their stored dtype. tokenizer.model is copied along when src has one."""
    from .hf import save_hf

    if to not in ("meta", "hf"):
        raise ValueError(f"--to must be 'meta' or 'hf', got {to!r}")
    params = checkpoint_params(src)
    _, state_dict = read_checkpoint(src)
    if to == "meta":
        save_meta(state_dict, params, dst, shards)
    else:
        save_hf(state_dict, params, dst)
    if (Path(src) / "tokenizer.model").is_file():
        shutil.copyfile(Path(src) / "tokenizer.model", Path(dst) / "tokenizer.model")
    return Path(dst)


def load_model(
    ckpt_dir: Union[str, Path],
    max_seq_len: int = 2048,
    max_batch_size: int = 1,
    device: Union[str, torch.device] = "cpu",
    dtype: Union[str, torch.dtype] = torch.float32,
    flash: bool = False,
) -> Transformer:
    """A Transformer holding ckpt_dir's weights (Meta or Hugging Face layout) in `dtype` on `device`.
    Built on the meta device, so no memory is spent on an initialisation the checkpoint overwrites."""
    args, state_dict = read_checkpoint(
        ckpt_dir, device, dtype, max_seq_len=max_seq_len, max_batch_size=max_batch_size, flash=flash
    )
    with torch.device("meta"):
        model = Transformer(args)
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model.eval()


@contextlib.contextmanager
def atomic_dir(out_dir: Union[str, Path], replace: bool = False) -> Iterator[Path]:
    """A temporary directory beside out_dir, renamed to out_dir when the block succeeds. out_dir must
    be absent or empty, unless `replace`: then an old out_dir stays whole (moved aside) until the new
    one is in place. An interrupted write never leaves a half-written out_dir."""
    out_dir = Path(out_dir)
    if not replace and out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} exists and is not empty")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    tmp.chmod(0o755)  # mkdtemp's private 0o700 is for the temporary name only
    try:
        yield tmp
        if out_dir.exists():
            old = tmp.with_name(tmp.name + ".old")
            out_dir.rename(old)
            tmp.rename(out_dir)
            shutil.rmtree(old)
        else:
            tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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


def save_meta(state_dict: StateDict, params: dict[str, Any], out_dir: Union[str, Path], n_shards: int = 1) -> Path:
    """Write params.json and consolidated.NN.pth, the tensors split over n_shards tensor-parallel
    ranks exactly as fairscale splits them. out_dir must be absent or empty."""
    args = ModelArgs.from_params(params)
    if n_shards < 1 or args.n_heads % n_shards or args.n_kv_heads % n_shards:
        raise ValueError(
            f"cannot split into {n_shards} shards: n_heads ({args.n_heads}) and n_kv_heads ({args.n_kv_heads}) "
            "must be divisible by the shard count"
        )
    with atomic_dir(out_dir) as tmp:
        (tmp / "params.json").write_text(json.dumps(params, indent=2) + "\n")
        for rank in range(n_shards):
            shard = {
                k: v if shard_dim(k) is None else v.chunk(n_shards, dim=shard_dim(k))[rank]
                for k, v in state_dict.items()
            }
            torch.save(own_tensors(shard), tmp / f"consolidated.{rank:02d}.pth")
    return Path(out_dir)


def stored_bytes(ckpt_dir: Union[str, Path]) -> dict[str, int]:
    """Bytes of the checkpoint's tensors per dtype, as stored. Files are memory-mapped and only their
    headers read."""
    from .hf import open_safetensors, safetensors_files

    tensors: list[torch.Tensor] = []
    if layout(ckpt_dir) == "meta":
        for path in sorted(Path(ckpt_dir).glob("*.pth")):
            tensors.extend(load_pth(path).values())
    else:
        for path in safetensors_files(ckpt_dir):
            with open_safetensors(path) as f:
                tensors.extend(f.get_tensor(k) for k in f.keys())
    totals: dict[str, int] = {}
    for t in tensors:
        name = str(t.dtype).removeprefix("torch.")
        totals[name] = totals.get(name, 0) + t.nbytes
    return totals


def state_dict_sha256(state_dict: StateDict) -> str:
    """sha256 over names, dtypes, shapes and bytes, in key order: independent of torch's file format."""
    h = hashlib.sha256()
    for key in sorted(state_dict):
        t = state_dict[key].detach().contiguous().cpu()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
