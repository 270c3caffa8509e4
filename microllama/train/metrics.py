"""What a step's log line says beyond its loss: throughput per rank, model FLOPs utilisation (MFU) on CUDA, and the
TensorBoard writer that mirrors metrics.jsonl (`--tensorboard DIR`, pip install 'microllama[tensorboard]').

Model FLOPs per token (PaLM's appendix B, as nanoGPT's estimate_mfu and torchtitan count them):
    6 N + 12 L H Q T
N: the parameters that multiply (all but the input embedding, a lookup; the output projection counts); each does a
multiply-add per token forward (2 N) and two backward (4 N: the input's gradient and the weight's). L H Q T: layers,
heads, head dimension and the row's length: the attention scores and their weighted sum, 4 L H Q T forward and twice
that backward, counted over the whole row (the causal and document masks' skipped half counted too, as the others
do). Where the weights are frozen (--mode lora, norms) their gradients are not computed: 4 N + 12 L H Q T (the
adapters' few FLOPs left out). MFU: tokens/s per rank times that, over the device's peak dense bfloat16 FLOP/s.
"""

import importlib.util
from pathlib import Path
from typing import Any, Optional

from ..args import ModelArgs
from ..checkpoint.params import expected_shapes

# Peak dense (no sparsity) bfloat16 tensor-core FLOP/s, from NVIDIA's data sheets: A100 (SXM and PCIe) 312 T; H100
# SXM 989 T, H100 PCIe 756 T; H200 (SXM) 989 T. Matched against torch.cuda.get_device_name, first match wins.
PEAK_BF16_FLOPS = (("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("A100", 312e12))
TENSORBOARD_INSTALL = "pip install 'microllama[tensorboard]'"


def multiplying_params(args: ModelArgs) -> int:
    """N: the parameters of a model of args that multiply activations (every one but the input embedding's)."""
    shapes = expected_shapes(args)
    return sum(_numel(shape) for name, shape in shapes.items() if name != "tok_embeddings.weight")


def flops_per_token(args: ModelArgs, seq_len: int, weights_train: bool = True) -> int:
    """Model FLOPs of a training step per token of rows seq_len long: 6 N + 12 L H Q T, or 4 N + 12 L H Q T when
    the weights are frozen (the module's docstring says why)."""
    n = multiplying_params(args)
    return (6 if weights_train else 4) * n + 12 * args.n_layers * args.n_heads * args.head_dim * seq_len


def peak_bf16_flops(device_name: str) -> Optional[float]:
    """The table's peak for a CUDA device's name; None for a device not in it."""
    return next((peak for key, peak in PEAK_BF16_FLOPS if key in device_name), None)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


class TensorBoard:
    """Each step's scalars written with torch.utils.tensorboard's SummaryWriter into log_dir (on rank 0)."""

    def __init__(self, log_dir: Path):
        self.check_installed()
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir))

    @staticmethod
    def check_installed() -> None:
        """RuntimeError in one line, naming the extra, unless the tensorboard package is installed."""
        if importlib.util.find_spec("tensorboard") is None:
            raise RuntimeError(f"--tensorboard needs the tensorboard package: {TENSORBOARD_INSTALL}")

    def write(self, step: int, values: dict[str, Any]) -> None:
        for key, value in values.items():
            if key != "step" and isinstance(value, (int, float)):
                self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
