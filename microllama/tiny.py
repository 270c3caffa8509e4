"""The embedded default: tiny Llama 3.1-shaped checkpoints in Meta's layout, built from a seed.

They keep the real 128,256-token vocabulary, grouped-query attention, ffn_dim_multiplier and scaled
RoPE. With rope_theta 500,000, head_dim 16 puts RoPE wavelengths in all three regimes of the 3.1
scaling: 6 to 862 positions (kept), 4,447 (interpolated) and 22,950 and beyond (divided by 8).
Weights come from numpy's PCG64, whose stream does not depend on the machine, so a seed gives the
same bytes everywhere; the recorded sha256 makes drift (a new numpy, a new bf16 rounding) visible.
"""

import json
import os
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from .checkpoint import atomic_dir, state_dict_sha256
from .model import ModelArgs, Transformer

CONFIGS: dict[str, dict] = {
    "tiny": {
        "dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 128256, "multiple_of": 32,
        "ffn_dim_multiplier": 1.3, "norm_eps": 1e-5, "rope_theta": 500000.0, "use_scaled_rope": True,
    },
    # head_dim 128 like the real 8B model: RoPE pairs at all 64 of its frequencies.
    "tiny-hd128": {
        "dim": 256, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1, "vocab_size": 128256, "multiple_of": 64,
        "ffn_dim_multiplier": 1.3, "norm_eps": 1e-5, "rope_theta": 500000.0, "use_scaled_rope": True,
    },
    # Four key/value heads: splits over 4 tensor-parallel ranks, as "tiny" (2 of them) cannot.
    "tiny-kv4": {
        "dim": 128, "n_layers": 2, "n_heads": 8, "n_kv_heads": 4, "vocab_size": 128256, "multiple_of": 32,
        "ffn_dim_multiplier": 1.3, "norm_eps": 1e-5, "rope_theta": 500000.0, "use_scaled_rope": True,
    },
}  # fmt: skip
DEFAULT_SEED = 0
# state_dict_sha256 of make_tiny(name, seed=DEFAULT_SEED); a mismatch means the bytes drifted.
SHA256 = {
    "tiny": "c9f7484483621f2f0b16118e37e9d6c9899a5e64b47d15a9a71c1b6769b4fafa",
    "tiny-hd128": "afa84591dde852b78d05e475fb6a278f987bd59a9576686824a979b380f60b88",
    "tiny-kv4": "0991058297317f82fa652302d4b22fb044c421edc234a3204bf2f3e875c0a497",
}
CACHE_ENV = "MICROLLAMA_CACHE"


def tiny_state_dict(params: dict, seed: int) -> dict[str, torch.Tensor]:
    """bf16 weights for params, drawn in Meta's key order: unit-variance embeddings, linear layers with
    std 1/sqrt(fan_in), norms near 1, and an output scale that spreads logits over a few units."""
    rng = np.random.Generator(np.random.PCG64(seed))
    args = ModelArgs.from_params(params)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in Transformer(args).state_dict().items()}
    state_dict = {}
    for key, shape in shapes.items():
        if key.endswith("norm.weight"):
            values = 1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32)
        elif key == "tok_embeddings.weight":
            values = rng.standard_normal(shape, dtype=np.float32)
        else:
            scale = 4.0 if key == "output.weight" else 1.0
            values = scale / np.sqrt(shape[1]) * rng.standard_normal(shape, dtype=np.float32)
        state_dict[key] = torch.from_numpy(values.astype(np.float32)).to(torch.bfloat16)
    return state_dict


def make_tiny(out_dir: Union[str, Path], name: str = "tiny", seed: int = DEFAULT_SEED) -> Path:
    """Write params.json and consolidated.00.pth for CONFIGS[name] into out_dir (atomically: a
    half-written directory is never left at out_dir). Returns out_dir."""
    if name not in CONFIGS:
        raise ValueError(f"unknown tiny config {name!r}; expected one of {', '.join(CONFIGS)}")
    state_dict = tiny_state_dict(CONFIGS[name], seed)
    digest = state_dict_sha256(state_dict)
    if seed == DEFAULT_SEED and SHA256[name] and digest != SHA256[name]:
        raise RuntimeError(
            f"tiny checkpoint {name!r} drifted: sha256 {digest} != recorded {SHA256[name]} "
            f"(numpy {np.__version__}, torch {torch.__version__}); the goldens no longer apply to it"
        )
    with atomic_dir(out_dir) as tmp:
        (tmp / "params.json").write_text(json.dumps(CONFIGS[name], indent=2) + "\n")
        torch.save(state_dict, tmp / "consolidated.00.pth")
        (tmp / "sha256.txt").write_text(digest + "\n")
    return Path(out_dir)


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "microllama")


def default_ckpt_dir(name: str = "tiny", root: Optional[Union[str, Path]] = None) -> Path:
    """The embedded tiny checkpoint's directory, built on first use (about a second) under
    $MICROLLAMA_CACHE or ~/.cache/microllama."""
    path = Path(root or cache_dir()) / f"{name}-seed{DEFAULT_SEED}"
    if not (path / "consolidated.00.pth").is_file():
        try:
            make_tiny(path, name)
        except OSError:
            if not (path / "consolidated.00.pth").is_file():
                raise  # not a concurrent build that finished first
    return path
