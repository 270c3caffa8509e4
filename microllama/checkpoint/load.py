"""A checkpoint argument, resolved once: `open_checkpoint(name_or_path)` turns a directory (Meta's
layout or Hugging Face's), the name of a tiny checkpoint, or a published model's name into one
`Checkpoint`, and everything downstream (loading, conversion, `info`, the golden recorder, every
command) takes that value.

Loading is lean: files are memory-mapped, pickles that would run code are refused (weights_only),
the model is built on the meta device and takes the checkpoint's tensors as they are when dtype and
device already match (no copy, no float32 round trip), and each tensor is converted or moved to the
GPU on its own as it is read. Every check runs before a model is returned; errors name file and key.
"""

import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch

from ..args import ModelArgs
from ..distributed import data_parallel
from ..distributed import tensor_parallel as parallel
from ..distributed.launch import is_rank_0
from ..files import StateDict, parse_dtype, read_json, state_dict_sha256
from ..model import Transformer
from ..quantize import check_quantize, is_dense, is_quantized_key, quantize_model, quantize_weight
from . import family, tiny
from .hf_layout import hf_stored_bytes, read_config, read_hf, safetensors_files, save_hf
from .meta_layout import Rows, meta_stored_bytes, read_meta, save_meta, shard_files
from .params import CheckpointError, args_from_params

__all__ = ["Checkpoint", "CheckpointError", "convert", "load_model", "open_checkpoint", "read_checkpoint"]


@dataclass(frozen=True)
class Checkpoint:
    """Where a checkpoint's files are, their layout, and the configuration they declare. A published
    model's name gives a Checkpoint without files (dir None): its configuration alone."""

    name: str  # what the user passed: a path, or a registered name
    params: dict[str, Any]  # Meta's params.json dict (converted from config.json in Hugging Face's layout)
    args: ModelArgs  # params checked, with the published RoPE factor; run-time fields at their defaults
    tied: bool = False  # output.weight is tok_embeddings.weight
    dir: Optional[Path] = None
    layout: Optional[str] = None  # "meta" or "hf"
    config_file: Optional[Path] = None  # params.json or config.json
    weight_files: tuple[Path, ...] = field(default=())  # Meta's shards in rank order, or safetensors files
    tiny: Optional[str] = None  # the embedded tiny configuration it was named by

    @property
    def source(self) -> str:
        """Where the configuration comes from, for messages."""
        return str(self.config_file) if self.config_file else f"the published configuration of {self.name}"

    def model_args(self, **runtime: Any) -> ModelArgs:
        """ModelArgs with the run-time fields (max_seq_len, max_batch_size, flash) set."""
        return self.args.replace(**runtime) if runtime else self.args

    def _files(self) -> tuple[Path, ...]:
        if self.dir is None:
            raise CheckpointError(
                f"{self.name} is a published configuration, and microllama ships no weights for it: "
                "pass the directory of a checkpoint (Meta's or Hugging Face's layout)"
            )
        return self.weight_files

    def read_state_dict(
        self,
        device: Union[str, torch.device] = "cpu",
        dtype: Optional[Union[str, torch.dtype]] = None,
        part: tuple[int, int] = (0, 1),
        quantize: Optional[str] = None,
        into: Optional[Rows] = None,
    ) -> StateDict:
        """Checked tensors in Meta's names, in dtype (None: as stored) on device: dense, or with part = (rank, n)
        the slices rank holds under tensor parallelism at n ranks, read without reading the rest; or with
        `into` (data_parallel.shard_rows) the rows an FSDP2 rank holds, copied into its local tensors. quantize:
        a format of microllama.quantize, in which the block linear layers' weights are quantized one by one as
        they are read (with `into`: each whole, then this rank's rows of it kept, in the result)."""
        if into is not None and part != (0, 1):
            raise ValueError("FSDP2's rows are read from the whole tensors: no tensor-parallel part")
        device, dtype = torch.device(device), None if dtype is None else parse_dtype(dtype)
        files = list(self._files())
        if self.layout == "meta":
            return read_meta(files, self.args, device, dtype, self.config_file, part, quantize, into)
        return read_hf(files, self.args, self.tied, device, dtype, part, quantize, into)

    def load_model(
        self,
        max_seq_len: int = 2048,
        max_batch_size: int = 1,
        device: Union[str, torch.device] = "cpu",
        dtype: Union[str, torch.dtype] = torch.float32,
        flash: bool = False,
        state_dict: Optional[StateDict] = None,
        mesh: Optional[parallel.DeviceMesh] = None,
        quantize: Optional[str] = None,
    ) -> Transformer:
        """A Transformer holding the weights in `dtype` on `device`, built on the meta device (no memory is
        spent on an initialisation the checkpoint overwrites). state_dict: tensors already read (by
        read_state_dict), converted here instead of reading the files again. mesh: shard the model over its
        ranks as Meta's tensor parallelism does (microllama.distributed.tensor_parallel), each rank reading only
        its slices. quantize: int8, nf4 or int4 (microllama.quantize), the block linear layers' weights
        quantized as they are read, frozen (requires_grad False)."""
        args = self.model_args(max_seq_len=max_seq_len, max_batch_size=max_batch_size, flash=flash)
        dtype = parse_dtype(dtype)
        if mesh is not None and state_dict is not None:
            raise ValueError("a tensor-parallel model reads its own slices of the checkpoint: pass no state_dict")
        if mesh is not None and quantize is not None:
            raise ValueError(
                "quantization and tensor parallelism cannot be combined: a quantized model is on one device"
            )
        if quantize is not None:
            check_quantize(quantize, device, dtype)
        if mesh is not None:
            parallel.check_world_size(args, mesh.size(), self.source)
        part = (0, 1) if mesh is None else (mesh.get_local_rank(), mesh.size())
        if state_dict is None:
            state_dict = self.read_state_dict(device, dtype, part, quantize)
        else:
            state_dict = {k: v.to(device=device, dtype=dtype) for k, v in state_dict.items()}
            if quantize is not None:
                state_dict = {k: quantize_weight(v, quantize, k) if is_quantized_key(k) else v
                              for k, v in state_dict.items()}  # fmt: skip
        with torch.device("meta"):
            model = Transformer(args)
        if mesh is not None:
            state_dict = parallel.from_local(parallel.parallelize(model, mesh), state_dict)
        model.load_state_dict(state_dict, strict=True, assign=True)
        for p in model.parameters():
            if not is_dense(p):
                p.requires_grad_(False)
        return model.eval()

    def load_sharded(
        self,
        shard: Callable[[Transformer], None],
        max_seq_len: int = 2048,
        device: Union[str, torch.device] = "cpu",
        dtype: Union[str, torch.dtype] = torch.float32,
        flash: bool = False,
        part: tuple[int, int] = (0, 1),
        quantize: Optional[str] = None,
        quantized_dtype: Optional[torch.dtype] = None,
    ) -> Transformer:
        """FSDP2 from the meta device (torchtitan's order): the Transformer built there in dtype, `shard` applies
        fully_shard to it (Ranks.shard), then this rank's shards are allocated on device and filled with the rows
        of each weight it holds, read from the memory-mapped files: no rank holds the whole model. Nothing else
        is materialised (RoPE's table is computed on first use). part: on a 2-D mesh (`shard` applied tensor
        parallelism first), this rank's (rank, K) in its tensor-parallel group: its slice of each tensor is read
        (1/K of each split one, as tensor-parallel inference reads it), then its FSDP2 rows of it kept.
        quantize (QLoRA's nf4): the block linear layers' weights quantized from quantized_dtype (default dtype),
        frozen, each read whole in turn, quantized as one process quantizes it and only this rank's rows of the
        result kept (quantize.check_nf4_split says which world sizes split them): no rank holds more than one
        whole tensor at a time."""
        args, dtype = self.model_args(max_seq_len=max_seq_len, flash=flash), parse_dtype(dtype)
        self._files()
        if quantize is not None and part != (0, 1):
            raise ValueError("quantization and tensor parallelism cannot be combined: FSDP2 shards a quantized base "
                             "over data ranks only")  # fmt: skip
        with torch.device("meta"):
            model = Transformer(args).to(dtype)
        if quantize is not None:
            check_quantize(quantize, device, quantized_dtype or dtype)
            # On the meta device, NF4's layout without values: fully_shard splits it as it splits the real one.
            quantize_model(model, quantize, quantized_dtype)
        shard(model)
        model.to_empty(device=device)
        with torch.no_grad():
            if part == (0, 1):
                read = self.read_state_dict(device, dtype, quantize=quantize, into=data_parallel.shard_rows(model))
                # A quantized shard is not filled in place: this rank's rows of each, read as new tensors, replace them.
                data_parallel.place_shards(model, {k: v for k, v in read.items() if not is_dense(v)})
            else:
                data_parallel.fill_from_parts(model, self.read_state_dict(device, dtype, part))
        return model.eval()

    def sha256(self) -> str:
        """state_dict_sha256 of the stored tensors: names, dtypes, shapes and bytes, whatever the layout
        and however many shards."""
        return state_dict_sha256(self.read_state_dict())

    def stored_bytes(self) -> dict[str, int]:
        """Bytes of the tensors per dtype, as stored. Files are memory-mapped and only their headers read."""
        files = list(self._files())
        return meta_stored_bytes(files) if self.layout == "meta" else hf_stored_bytes(files)

    def describe(self) -> list[str]:
        """The lines `microllama info` prints."""
        if self.dir is None:  # a published configuration: its numbers alone
            return family.describe_published(self.name)
        return family.describe(self.name, self.args, self.tied, self.source, self.stored_bytes())


def open_checkpoint(target: Union[str, Path, Checkpoint, None] = None) -> Checkpoint:
    """The Checkpoint that `target` names: the name of a tiny checkpoint (built on first use into the cache);
    a published model's name (a configuration without weights); any other text, or a Path, is a checkpoint
    directory in either layout; None for the default tiny checkpoint. A registered name always means the
    built-in: a directory of that name is reached by a path (./tiny), and a note on stderr says so when one
    is here."""
    if isinstance(target, Checkpoint):
        return target
    if target is None:
        target = "tiny"
    if isinstance(target, str) and target in family.REGISTRY:
        named = family.REGISTRY[target]
        if Path(target).is_dir() and is_rank_0():
            what = "checkpoint" if named.tiny else "configuration"
            print(
                f"note: {target} names the built-in {what}, not the directory {target} here (for that: ./{target})",
                file=sys.stderr,
            )
        if named.tiny:
            return _open_dir(tiny.default_ckpt_dir(target), target, tiny=target)
        return Checkpoint(name=target, params=dict(named.params), args=named.args(), tied=named.tied)
    path = Path(target).expanduser()
    if not path.is_dir():
        known = ", ".join(family.REGISTRY)
        what = "is not a directory" if path.exists() else "not found"
        raise CheckpointError(f"checkpoint directory {what}: {path} (nor is it a named configuration: {known})")
    return _open_dir(path, str(target))


def _open_dir(path: Path, name: str, tiny: Optional[str] = None) -> Checkpoint:
    if (path / "params.json").is_file():
        config = path / "params.json"
        params = read_json(config, CheckpointError)
        args = args_from_params(params, config)
        return Checkpoint(name, params, args, False, path, "meta", config, tuple(shard_files(path, args)), tiny)
    if (path / "config.json").is_file():
        config = path / "config.json"
        params, tied = read_config(path)
        args = args_from_params(params, config)
        return Checkpoint(name, params, args, tied, path, "hf", config, tuple(safetensors_files(path)), tiny)
    raise CheckpointError(
        f"{path}: no params.json (Meta layout, beside consolidated.*.pth) and no config.json "
        "(Hugging Face layout, beside *.safetensors)"
    )


def load_model(
    ckpt: Union[str, Path, Checkpoint, None],
    max_seq_len: int = 2048,
    max_batch_size: int = 1,
    device: Union[str, torch.device] = "cpu",
    dtype: Union[str, torch.dtype] = torch.float32,
    flash: bool = False,
    quantize: Optional[str] = None,
) -> Transformer:
    """open_checkpoint(ckpt).load_model(...): a Transformer holding the checkpoint's weights (quantize: see there)."""
    return open_checkpoint(ckpt).load_model(max_seq_len, max_batch_size, device, dtype, flash, quantize=quantize)


def read_checkpoint(
    ckpt: Union[str, Path, Checkpoint, None],
    device: Union[str, torch.device] = "cpu",
    dtype: Optional[Union[str, torch.dtype]] = None,
    **runtime: Any,
) -> tuple[ModelArgs, StateDict]:
    """ModelArgs (with the run-time fields given) and the dense, checked tensors of a checkpoint."""
    checkpoint = open_checkpoint(ckpt)
    return checkpoint.model_args(**runtime), checkpoint.read_state_dict(device, dtype)


def convert(src: Union[str, Path, Checkpoint], dst: Union[str, Path], to: str, shards: int = 1) -> Path:
    """Rewrite checkpoint src as dst in layout `to` ('meta', in `shards` files, or 'hf'), tensors
    bit for bit in their stored dtype. tokenizer.model is copied along when src has one."""
    if to not in ("meta", "hf"):
        raise ValueError(f"--to must be 'meta' or 'hf', got {to!r}")
    if shards < 1:
        raise ValueError(f"--shards must be a positive integer, got {shards}")
    if to == "hf" and shards != 1:
        raise ValueError("--shards splits Meta's layout over tensor-parallel ranks; a Hugging Face checkpoint is one")
    checkpoint = open_checkpoint(src)
    state_dict = checkpoint.read_state_dict()
    if to == "meta":
        save_meta(state_dict, checkpoint.params, dst, shards)
    else:
        save_hf(state_dict, checkpoint.params, dst)
    if (checkpoint.dir / "tokenizer.model").is_file():
        shutil.copyfile(checkpoint.dir / "tokenizer.model", Path(dst) / "tokenizer.model")
    return Path(dst)
