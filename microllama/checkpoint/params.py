"""What a checkpoint's configuration implies, for either layout: Meta's params.json dict checked into
ModelArgs, the tensors (names and shapes) a model of it holds, and the checks every weight passes."""

import dataclasses
from pathlib import Path
from typing import Any, Union

import torch

from ..args import ModelArgs, RopeScaling
from ..model import Transformer
from . import family

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked; the message names the file and what is wrong."""


def args_from_params(params: dict[str, Any], source: Union[str, Path], **runtime: Any) -> ModelArgs:
    """ModelArgs for a params.json dict. A published model whose RoPE factor differs from Meta's hard-coded
    8 (Llama 3.2 1B and 3B: 32) gets the published one unless params sets rope_scale_factor. runtime:
    the fields a checkpoint does not fix (max_seq_len, max_batch_size, flash)."""
    try:
        args = ModelArgs.from_params(params, **runtime)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: {e}") from e
    name = family.match(*family.shapes_key(args))
    published = family.REGISTRY[name].rope_factor if name else None
    if published is not None and RopeScaling.PARAMS_KEYS["factor"] not in params:
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


def check_dtype(dtype: torch.dtype, key: str, source: Union[str, Path]) -> None:
    """Weights are stored as floating-point numbers; integers (a quantized or foreign file) are not cast."""
    if dtype not in FLOAT_DTYPES:
        raise CheckpointError(
            f"{source}: tensor {key!r} is {dtype}; Llama weights are float32, bfloat16 or float16 "
            "(a quantized checkpoint is not something microllama reads)"
        )


def check_finite(t: torch.Tensor, key: str, source: Union[str, Path]) -> None:
    """Refuse a weight holding NaN or infinity, which would turn every logit into NaN. aminmax propagates
    both and, unlike isfinite, allocates nothing the size of the tensor."""
    if t.numel() and not all(torch.isfinite(v) for v in torch.aminmax(t)):
        bad = int((~torch.isfinite(t.reshape(-1))).nonzero()[0])
        raise CheckpointError(f"{source}: tensor {key!r} holds {t.reshape(-1)[bad].item()} at flat index {bad}")
