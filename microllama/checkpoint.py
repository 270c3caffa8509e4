"""Reading Meta-layout checkpoints (params.json + consolidated.00.pth) into a Transformer, with errors
that name the file and the key."""

import hashlib
import json
from pathlib import Path
from typing import Any, Union

import torch

from .model import ModelArgs, Transformer

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}  # fmt: skip


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded as asked."""


def parse_dtype(dtype: Union[str, torch.dtype]) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def read_params(ckpt_dir: Union[str, Path]) -> dict[str, Any]:
    """The dict in ckpt_dir/params.json."""
    path = Path(ckpt_dir) / "params.json"
    if not Path(ckpt_dir).is_dir():
        raise CheckpointError(f"checkpoint directory not found: {ckpt_dir}")
    if not path.is_file():
        raise CheckpointError(f"{path} not found: a Meta-layout checkpoint has params.json beside consolidated.*.pth")
    try:
        params = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(params, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(params).__name__}")
    return params


def read_state_dict(ckpt_dir: Union[str, Path]) -> dict[str, torch.Tensor]:
    """The tensors of ckpt_dir/consolidated.00.pth, memory-mapped; loading refuses pickles that run code."""
    shards = sorted(Path(ckpt_dir).glob("*.pth"))
    if not shards:
        raise CheckpointError(f"no *.pth checkpoint files in {ckpt_dir}")
    if len(shards) > 1:
        raise CheckpointError(
            f"{ckpt_dir} holds {len(shards)} tensor-parallel shards; microllama reads one consolidated.00.pth"
        )
    try:
        state_dict = torch.load(shards[0], map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # torch raises several types for truncated or unsafe files
        raise CheckpointError(f"cannot load {shards[0]}: {type(e).__name__}: {str(e).splitlines()[0]}") from e
    if not isinstance(state_dict, dict):
        raise CheckpointError(f"{shards[0]} must hold a dict of tensors, got {type(state_dict).__name__}")
    return state_dict


def check_state_dict(state_dict: dict[str, torch.Tensor], model: torch.nn.Module, source: Union[str, Path]) -> None:
    """Raise CheckpointError naming the first missing, unexpected or mis-shaped tensor."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(expected.keys() - state_dict.keys())
    unexpected = sorted(state_dict.keys() - expected.keys())
    if missing:
        raise CheckpointError(f"{source}: missing tensor {missing[0]!r} ({len(missing)} missing in all)")
    if unexpected:
        raise CheckpointError(f"{source}: unexpected tensor {unexpected[0]!r} ({len(unexpected)} unexpected in all)")
    for key, shape in expected.items():
        if tuple(state_dict[key].shape) != shape:
            raise CheckpointError(
                f"{source}: tensor {key!r} has shape {tuple(state_dict[key].shape)}, params.json implies {shape}"
            )


def load_model(
    ckpt_dir: Union[str, Path],
    max_seq_len: int = 2048,
    max_batch_size: int = 1,
    device: Union[str, torch.device] = "cpu",
    dtype: Union[str, torch.dtype] = torch.float32,
    flash: bool = False,
) -> Transformer:
    """A Transformer holding ckpt_dir's weights in `dtype` on `device`. Built on the meta device, so
    no memory is spent on an initialisation that the checkpoint overwrites."""
    dtype, device = parse_dtype(dtype), torch.device(device)
    params = read_params(ckpt_dir)
    try:
        args = ModelArgs.from_params(params, max_seq_len=max_seq_len, max_batch_size=max_batch_size, flash=flash)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{Path(ckpt_dir) / 'params.json'}: {e}") from e
    with torch.device("meta"):
        model = Transformer(args)
    state_dict = read_state_dict(ckpt_dir)
    check_state_dict(state_dict, model, Path(ckpt_dir) / "consolidated.00.pth")
    state_dict = {k: v.to(device=device, dtype=dtype) for k, v in state_dict.items()}
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model.eval()


def state_dict_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes, in key order: independent of torch's file format."""
    h = hashlib.sha256()
    for key in sorted(state_dict):
        t = state_dict[key].detach().contiguous().cpu()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
