"""The embedded default: tiny Llama 3.1-shaped checkpoints in Meta's layout (their configurations
are in microllama.checkpoint.family), built from a seed.

Weights come from numpy's PCG64, whose stream does not depend on the machine, so a seed gives the
same bytes everywhere; the recorded sha256 makes drift (a new numpy, a new bf16 rounding) visible.
"""

import hashlib
import json
import os
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from ..args import ModelArgs
from ..files import atomic_dir, state_dict_sha256
from . import family
from .params import expected_shapes

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
    state_dict = {}
    for key, shape in expected_shapes(ModelArgs.from_params(params)).items():
        if key.endswith("norm.weight"):
            values = 1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32)
        elif key == "tok_embeddings.weight":
            values = rng.standard_normal(shape, dtype=np.float32)
        else:
            scale = 4.0 if key == "output.weight" else 1.0
            values = scale / np.sqrt(shape[1]) * rng.standard_normal(shape, dtype=np.float32)
        state_dict[key] = torch.from_numpy(values.astype(np.float32)).to(torch.bfloat16)
    return state_dict


def params_json(name: str) -> str:
    """The params.json text of the tiny configuration `name`, as make_tiny writes it."""
    return json.dumps(family.REGISTRY[name].params, indent=2) + "\n"


def make_tiny(out_dir: Union[str, Path], name: str = "tiny", seed: int = DEFAULT_SEED) -> Path:
    """Write params.json and consolidated.00.pth of the tiny configuration `name` into out_dir
    (atomically: a half-written directory is never left at out_dir). Returns out_dir."""
    if name not in family.TINY:
        raise ValueError(f"unknown tiny config {name!r}; expected one of {', '.join(family.TINY)}")
    params = family.REGISTRY[name].params
    state_dict = tiny_state_dict(params, seed)
    digest = state_dict_sha256(state_dict)
    if seed == DEFAULT_SEED and SHA256[name] and digest != SHA256[name]:
        raise RuntimeError(
            f"tiny checkpoint {name!r} drifted: sha256 {digest} != recorded {SHA256[name]} "
            f"(numpy {np.__version__}, torch {torch.__version__}); the goldens no longer apply to it"
        )
    with atomic_dir(out_dir) as tmp:
        (tmp / "params.json").write_text(params_json(name))
        torch.save(state_dict, tmp / "consolidated.00.pth")
        (tmp / "sha256.txt").write_text(digest + "\n")
    return Path(out_dir)


def cache_dir() -> Path:
    """$MICROLLAMA_CACHE, else ~/.cache/microllama; ValueError, naming the variable, where a file is in the way."""
    set_to = os.environ.get(CACHE_ENV)
    path = Path(set_to or Path.home() / ".cache" / "microllama")
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        where = f"${CACHE_ENV} names {path}" if set_to else f"the cache is {path} (${CACHE_ENV} is unset)"
        under = f", under {existing}," if existing != path else ""
        raise ValueError(f"{where}{under} which is not a directory")
    return path


def default_ckpt_dir(name: str = "tiny", root: Optional[Union[str, Path]] = None) -> Path:
    """The embedded tiny checkpoint's directory, built on first use (about a second) under
    $MICROLLAMA_CACHE or ~/.cache/microllama. Its name holds a digest of what makes it (the params.json text and
    the weights' recorded sha256), so a checkpoint an earlier version built with other files is never reused."""
    made_of = hashlib.sha256(f"{params_json(name)}{SHA256[name]}\n".encode()).hexdigest()
    path = Path(root or cache_dir()) / f"{name}-seed{DEFAULT_SEED}-{made_of[:12]}"
    if not (path / "consolidated.00.pth").is_file():
        try:
            make_tiny(path, name)
        except OSError:
            if not (path / "consolidated.00.pth").is_file():
                raise  # not a concurrent build that finished first
    return path
