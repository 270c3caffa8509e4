"""Memory-lean loading: weights stay in the memory-mapped file unless a conversion needs a copy."""

import os

import pytest
import torch

from microllama.checkpoint.load import convert, load_model


def _inside_mapping_of(path, tensor) -> bool:
    """Whether tensor's bytes lie in a memory mapping of file `path` (Linux /proc/self/maps)."""
    real = str(path.resolve())
    for line in open("/proc/self/maps"):
        fields = line.split()
        if len(fields) >= 6 and fields[5] == real:
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if start <= tensor.data_ptr() and tensor.data_ptr() + tensor.nbytes <= end:
                return True
    return False


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads Linux's /proc/self/maps")
def test_bf16_load_of_bf16_checkpoint_uses_the_mapped_file_without_a_copy(tiny_ckpt, tmp_path):
    model = load_model(tiny_ckpt, dtype=torch.bfloat16)
    assert all(_inside_mapping_of(tiny_ckpt / "consolidated.00.pth", p) for p in model.parameters())
    hf = convert(tiny_ckpt, tmp_path / "hf", "hf")
    model = load_model(hf, dtype=torch.bfloat16)
    for name, p in model.named_parameters():  # wq and wk are reordered for RoPE: the only copies
        assert _inside_mapping_of(hf / "model.safetensors", p) == (".wq." not in name and ".wk." not in name), name
    model = load_model(tiny_ckpt, dtype=torch.float32)
    assert not any(_inside_mapping_of(tiny_ckpt / "consolidated.00.pth", p) for p in model.parameters())
