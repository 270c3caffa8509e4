"""Weight-only quantization of the linear layers, in torchao's tensor formats (pip install 'microllama[quant]').

The seven linear layers of every block (wq, wk, wv, wo, w1, w2, w3) are quantized; the embedding, the output
projection and the norms keep the model's dtype (README, Quantization, says why). Formats:
- int8: symmetric per output channel (torchao's Int8Tensor, PerRow), scale = the row's absmax / 127.5,
  computed from the float32 weight whatever the model's dtype, so that every weight lies within half a
  scale step of its code. Its linear multiplies by the int8 codes, then scales each output column.
- nf4: QLoRA's 4-bit NormalFloat (torchao's NF4Tensor, as torchtune uses it): blocks of 64 weights, each
  block's absmax double-quantized to 8 bits in blocks of 256 absmaxes (fewer where a small tensor has fewer
  blocks). Its linear dequantizes to the model's dtype, then multiplies.
- int4: groups of 128 input features with a bfloat16 scale and zero point each (torchao's
  Int4TilePackedTo4dTensor, for the tinygemm kernel, which pads each row to a multiple of 1,024 input features
  and the rows to a multiple of 8): CUDA (compute capability 8.0 or newer) and bfloat16 only; not run in
  microllama's tests, which had no GPU.

Under FSDP2 (QLoRA, `--distributed fsdp`) each rank holds 1/W of every NF4 weight: torchao's NF4Tensor splits
along dim 0 into its rows' codes, their blocks' absmaxes and their groups' second-level scales, so every rank
must hold whole groups of whole rows (check_nf4_split). The whole tensor is quantized first and then split
(quantized_rows): double quantization subtracts the mean of the whole tensor's absmaxes, so quantizing a rank's
rows alone would not give one process's bits.

torchao is imported on first use, so microllama's core imports without it; torch too, so that the sizes
(quantized_weight_bytes) serve `microllama info NAME`, which imports no torch.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any, Optional, Union

if TYPE_CHECKING:
    import torch
    from torch import nn

FORMATS = ("int8", "nf4", "int4")
# The modules whose weights are quantized, within each block (layers.N.).
QUANTIZED_LAYERS = frozenset(
    {"attention.wq", "attention.wk", "attention.wv", "attention.wo", "feed_forward.w1", "feed_forward.w2",
     "feed_forward.w3"}
)  # fmt: skip
NF4_BLOCK = 64  # weights per absmax (QLoRA's and torchtune's)
NF4_SCALER_BLOCK = 256  # absmaxes per 8-bit second-level scale (QLoRA's and torchtune's)
INT4_GROUP = 128  # input features per scale and zero point (gpt-fast's and torchao's default)
INSTALL = "pip install 'microllama[quant]'"


def torchao_quantization() -> Any:
    """torchao.quantization, or RuntimeError saying which extra installs it. Imported with torchao's own
    warnings silenced: the CPU wheel ships CUDA extension libraries that it says it cannot load, and torch 2.13
    deprecates how torchao registers one of its enums."""
    loggers = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        import torchao.quantization
    except ImportError:
        raise RuntimeError(f"quantization needs torchao, which is not installed: {INSTALL}") from None
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
    return torchao.quantization


def check_quantize(quantize: str, device: Union[str, torch.device], dtype: torch.dtype) -> None:
    """Raise (one line) for a quantization that cannot run as asked, before anything is loaded: an unknown
    format, int4 off CUDA or outside bfloat16, torchao missing."""
    import torch

    if quantize not in FORMATS:
        raise ValueError(f"unknown quantization {quantize!r}; expected one of {', '.join(FORMATS)}")
    if quantize == "int4" and torch.device(device).type != "cuda":
        raise ValueError("int4 quantization runs on CUDA only (torchao's tinygemm kernel); on the CPU use int8 or nf4")
    if quantize == "int4" and dtype != torch.bfloat16:
        raise ValueError(f"int4 quantization computes in bfloat16 (tinygemm's kernel), not {dtype}")
    torchao_quantization()


def is_quantized_key(key: str) -> bool:
    """Whether the checkpoint tensor `key` (Meta's names) is quantized: the weight of a block's linear layer."""
    parts = key.split(".")  # layers.N.attention.wq.weight
    return (
        len(parts) == 5 and parts[0] == "layers" and parts[4] == "weight" and ".".join(parts[2:4]) in QUANTIZED_LAYERS
    )


def nf4_scaler_block(numel: int) -> int:
    """Absmaxes per second-level scale for a tensor of numel weights: 256, or the largest divisor of the number of
    blocks below 256 for tensors too small to hold 256 blocks in whole groups (the tiny checkpoints)."""
    n_blocks = numel // NF4_BLOCK
    return next(s for s in range(min(NF4_SCALER_BLOCK, n_blocks), 0, -1) if n_blocks % s == 0)


def nf4_layout(shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(blocks, absmaxes per scaler block, scaler blocks) of the NF4 form of a weight of this shape."""
    numel = math.prod(shape)
    blocks, scaler_block = numel // NF4_BLOCK, nf4_scaler_block(numel)
    return blocks, scaler_block, blocks // scaler_block


def check_nf4_split(shapes: dict[str, tuple[int, ...]], world_size: int, source: str) -> None:
    """ValueError (one line) naming the first quantized weight of `shapes` (Meta's keys, as params.json gives
    them) whose NF4 form FSDP2 cannot split over world_size ranks: each rank must hold an equal share of its rows
    and whole scaler blocks (its rows' blocks of NF4_BLOCK weights then follow)."""
    layouts = {k: nf4_layout(s) for k, s in shapes.items() if is_quantized_key(k)}
    splits = math.gcd(*(math.gcd(shapes[k][0], groups) for k, (_, _, groups) in layouts.items()))
    which = (f"world sizes dividing {splits} split all of this model's: use one, or --distributed ddp" if splits > 1
             else "no world size above 1 splits all of this model's: use --distributed ddp")  # fmt: skip
    for key, (blocks, scaler_block, groups) in layouts.items():
        rows, cols = shapes[key]
        if rows % world_size or groups % world_size:
            raise ValueError(f"--quantize nf4 cannot be sharded by --distributed fsdp over {world_size} ranks: "
                             f"{key} ({rows} x {cols}, {source}) is {blocks} blocks of {NF4_BLOCK} weights in "
                             f"{groups} scaler block{'s' * (groups != 1)} of {scaler_block} absmaxes, and each rank "
                             f"must hold whole scaler blocks of whole rows ({which})")  # fmt: skip


def quantize_weight(w: torch.Tensor, quantize: str, key: str = "weight") -> torch.Tensor:
    """The (out_features, in_features) weight w in format `quantize`, on w's device; its dtype (what it
    dequantizes to) is w's."""
    ao = torchao_quantization()
    if quantize == "int8":
        q = ao.Int8Tensor.from_hp(w.float(), ao.PerRow())
        return ao.Int8Tensor(q.qdata, q.scale, q.block_size, w.dtype, zero_point=q.zero_point)
    if quantize == "nf4":
        if w.numel() % NF4_BLOCK:
            raise ValueError(f"nf4 quantizes blocks of {NF4_BLOCK} weights: {key} has {w.numel()}")
        return ao.to_nf4(w.contiguous(), NF4_BLOCK, nf4_scaler_block(w.numel()))
    return ao.Int4TilePackedTo4dTensor.from_hp(w.contiguous(), [1, INT4_GROUP])


def quantized_rows(q: torch.Tensor, first: int, rows: int) -> torch.Tensor:
    """Rows [first, first + rows) of the quantized weight q, as FSDP2's split of dim 0 makes them (first a multiple
    of rows): for NF4 those rows' codes, their blocks' absmaxes and their groups' scales, with the whole tensor's
    mean absmax and table."""
    import torch

    part = q.split(rows)[first // rows]  # views of q's inner tensors
    own = torch.empty_like(part)  # copied out, so that q's are freed (NF4Tensor's clone would quantize again)
    own.copy_(part)
    return own


def quantize_model(model: nn.Module, quantize: str, dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Quantize, in place, the weights of model's block linear layers (QUANTIZED_LAYERS) that are still dense, as
    converted to dtype (None: their own), the dtype they then dequantize to. On the meta device it gives the
    quantized tensors' layout, without values (FSDP2 splits it)."""
    from torch import nn

    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and is_quantized_key(f"{name}.weight") and is_dense(module.weight):
            w = module.weight.detach() if dtype is None else module.weight.detach().to(dtype)
            module.weight = nn.Parameter(quantize_weight(w, quantize, name), requires_grad=False)
    return model


def dequantize_weight(t: torch.Tensor) -> torch.Tensor:
    """A quantized weight as the dense tensor it stands for, in its dtype (a dense one as it is)."""
    if is_dense(t):
        return t.detach()
    # NF4Tensor's own name for it; torchao's other formats call it dequantize.
    return t.get_original_weight() if hasattr(t, "get_original_weight") else t.dequantize()


def dequantize_model(model: nn.Module) -> nn.Module:
    """Replace, in place, every quantized weight of model by its dequantized dense tensor."""
    from torch import nn

    for module in model.modules():
        if isinstance(module, nn.Linear) and not is_dense(module.weight):
            module.weight = nn.Parameter(dequantize_weight(module.weight), requires_grad=False)
    return model


def is_dense(t: torch.Tensor) -> bool:
    """Not one of torchao's quantized tensor subclasses (a Parameter of one has its type): a plain tensor or
    Parameter, or a DTensor shard of one under FSDP2 or tensor parallelism."""
    return not type(t).__module__.startswith("torchao.")


def is_quantized(t: torch.Tensor) -> bool:
    """One of torchao's quantized tensors, or a DTensor whose local shard is one (FSDP2's of QLoRA's NF4 base)."""
    return not is_dense(_local(t))


def tensor_bytes(t: torch.Tensor) -> int:
    """The bytes a tensor holds: a quantized one's codes, scales and tables (its inner tensors, as torch's
    subclass protocol lists them), a dense one's elements; of a DTensor, this rank's local shard's."""
    t = _local(t)
    if is_dense(t):
        return t.nbytes
    names, _ = t.__tensor_flatten__()
    return sum(tensor_bytes(getattr(t, name)) for name in names if getattr(t, name) is not None)


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (FSDP2's or tensor parallelism's); any other tensor as it is."""
    return t.to_local() if hasattr(t, "to_local") else t


def quantized_weight_bytes(shape: tuple[int, int], quantize: str, itemsize: int = 2) -> int:
    """What quantize_weight's result holds for a weight of this shape whose dtype has itemsize bytes (bfloat16: 2),
    from the shape alone."""
    rows, cols = shape
    numel = rows * cols
    if quantize == "int8":
        return numel + rows * (4 + 1)  # int8 codes; a float32 scale and an int8 zero point (0) per row
    if quantize == "nf4":
        # 4-bit codes; an int8 absmax per block; per group of absmaxes a scale in dtype; their mean and the
        # 16-entry table in dtype.
        blocks, _, groups = nf4_layout(shape)
        return numel // 2 + blocks + (groups + 1 + 16) * itemsize
    rows, cols = -(-rows // 8) * 8, -(-cols // 1024) * 1024  # tinygemm's padding
    return rows * cols // 2 + rows * (cols // INT4_GROUP) * 2 * 2  # 4-bit codes; a bfloat16 scale and zero per group
