"""Training sets: a short full fine-tune of Meta's reference model, recorded by
reference_harness/record_training.py; `microllama verify` runs microllama's trainer on the same batch.

- `manifest.json` (TrainingManifest): kind "training", the model, checkpoint, dtype, device, world size,
  versions and platform as golden sets have them (schema.py), the optimizer's settings and per-step learning
  rates, the parameter names in model order, and the sha256 of each data file.
- `training.json` (TrainingOutputs): the loss of every step, the gradient norm of every step (before
  clipping), each parameter's gradient norm at the first step, and of the final weights each
  parameter's norm and sha256 and the state_dict_sha256 of them all.
- `batch.npz`: `tokens` and `targets` (rows, seqlen) int32, the batch every step trains on (-100: no target).
"""

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

import numpy as np
import torch

from ..checkpoint.params import expected_shapes
from ..files import atomic_dir, read_json, state_dict_sha256, tensor_sha256
from .schema import (
    _SHA256,
    DEVICE_TYPES,
    DTYPES,
    CheckpointEntry,
    GoldenError,
    ModelEntry,
    Platform,
    Versions,
    _check_array,
    _check_members,
    _manifest_json,
    _read_npz,
    _require,
    _show,
    check_files,
    check_writable,
    device_type,
    file_hashes,
    from_json,
    json_bytes,
    npz_bytes,
    set_name,
)

TRAINING_KIND = "training"
TRAINING_DATA_FILES = ("training.json", "batch.npz")


@dataclass(frozen=True, kw_only=True)
class Optimization:
    """The steps' settings: torch's AdamW (decoupled weight decay on matrices only), the global gradient norm
    clipped to grad_clip before each step, the loss the sum of token losses over the batch's target count."""

    optimizer: str  # e.g. "torch.optim.AdamW(fused=True)"
    lrs: list[float]  # one per step
    betas: list[float]
    eps: float
    weight_decay: float
    grad_clip: float
    batch: str  # how the batch was drawn


@dataclass(frozen=True, kw_only=True)
class TrainingManifest:
    schema: int
    kind: str  # TRAINING_KIND
    recorded_by: str
    model: ModelEntry
    checkpoint: CheckpointEntry
    dtype: str
    device: str
    world_size: int
    versions: Versions
    platform: Platform
    optimization: Optimization
    parameters: list[str]  # names in model order: the order of the per-parameter lists of training.json
    files: dict[str, str] = field(default_factory=dict)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


@dataclass(frozen=True, kw_only=True)
class TrainingOutputs:
    losses: list[float]  # per step, the float32 loss
    grad_norms: list[float]  # per step, the global gradient norm before clipping
    first_step_grad_norms: list[float]  # per parameter, its gradient's norm at step 1
    final_weight_norms: list[float]  # per parameter, its final weight's norm
    final_parameter_sha256: list[str]  # per parameter, tensor_sha256 of its final (dense) weight
    final_sha256: str  # state_dict_sha256 of all final weights

    @classmethod
    def from_run(
        cls,
        losses: list[float],
        grad_norms: list[float],
        first_step_grad_norms: list[float],
        weights: dict[str, torch.Tensor],
    ) -> "TrainingOutputs":
        """A run's outputs, the final weights' norms and sha256 taken from weights (dense, in parameter order)."""
        return cls(
            losses=losses,
            grad_norms=grad_norms,
            first_step_grad_norms=first_step_grad_norms,
            final_weight_norms=[torch.linalg.vector_norm(w.float()).item() for w in weights.values()],
            final_parameter_sha256=[tensor_sha256(w) for w in weights.values()],
            final_sha256=state_dict_sha256(weights),
        )


@dataclass(frozen=True, kw_only=True, eq=False)
class TrainingSet:
    path: Path
    manifest: TrainingManifest
    outputs: TrainingOutputs
    tokens: np.ndarray  # (rows, seqlen) int32
    targets: np.ndarray  # (rows, seqlen) int32


def training_set_name(checkpoint: CheckpointEntry, dtype: str, device: str, world_size: int) -> str:
    """The default directory name of a training set, e.g. train-tiny-fp32-cpu-ws1."""
    return "train-" + set_name(checkpoint, dtype, device, world_size)


def is_training_set(path: Union[str, Path]) -> bool:
    """Whether path holds a manifest.json of kind "training" (read_training_set checks the rest)."""
    file = Path(path) / "manifest.json"
    try:
        return file.is_file() and read_json(file, GoldenError).get("kind") == TRAINING_KIND
    except GoldenError:
        return False


def _check_training(g: TrainingSet) -> None:
    m, o, file = g.manifest, g.outputs, g.path / "manifest.json"
    args = m.model.args
    _require(m.kind == TRAINING_KIND, file, "kind", f"expected {TRAINING_KIND!r}, got {_show(m.kind)}")
    _require(m.dtype in DTYPES, file, "dtype", f"expected one of {', '.join(DTYPES)}, got {_show(m.dtype)}")
    _require(device_type(m.device) in DEVICE_TYPES, file, "device", f"expected cpu or cuda, got {_show(m.device)}")
    _require(m.world_size >= 1, file, "world_size", f"expected a positive integer, got {m.world_size}")
    _require(_SHA256.fullmatch(m.checkpoint.sha256) is not None, file, "checkpoint.sha256", "expected 64 hex digits")
    steps = len(m.optimization.lrs)
    _require(steps >= 1, file, "optimization.lrs", "expected one learning rate per step, at least one")
    _require(len(m.optimization.betas) == 2, file, "optimization.betas", "expected two numbers")
    names = list(expected_shapes(args))
    _require(m.parameters == names, file, "parameters", f"expected the {len(names)} parameters of the model, in order")
    _require(sorted(m.files) == sorted(TRAINING_DATA_FILES), file, "files",
             f"expected the sha256 of {', '.join(TRAINING_DATA_FILES)}")  # fmt: skip
    out = g.path / "training.json"
    for at, values, n in (("losses", o.losses, steps), ("grad_norms", o.grad_norms, steps),
                          ("first_step_grad_norms", o.first_step_grad_norms, len(names)),
                          ("final_weight_norms", o.final_weight_norms, len(names)),
                          ("final_parameter_sha256", o.final_parameter_sha256, len(names))):  # fmt: skip
        _require(len(values) == n, out, at, f"{len(values)} values, expected {n}")
    for at, digest in [("final_sha256", o.final_sha256)] + [
        (f"final_parameter_sha256[{i}]", d) for i, d in enumerate(o.final_parameter_sha256)
    ]:
        _require(_SHA256.fullmatch(digest) is not None, out, at, "expected 64 lowercase hex digits")
    batch = g.path / "batch.npz"
    _require(g.tokens.ndim == 2 and g.tokens.shape[1] <= m.model.max_seq_len, batch, "tokens",
             f"expected (rows, seqlen <= {m.model.max_seq_len}), got shape {g.tokens.shape}")  # fmt: skip
    _check_array(batch, "tokens", g.tokens, np.int32, g.tokens.shape, "rows x seqlen", args.vocab_size)
    _check_array(batch, "targets", g.targets, np.int32, g.tokens.shape, "the shape of tokens")
    _require(bool(((g.targets == -100) | ((g.targets >= 0) & (g.targets < args.vocab_size))).all()), batch,
             "targets", f"expected ids in [0, {args.vocab_size}) or -100")  # fmt: skip


def write_training_set(
    out_dir: Union[str, Path], manifest: TrainingManifest, outputs: TrainingOutputs, tokens: np.ndarray,
    targets: np.ndarray,
) -> Path:  # fmt: skip
    """Write a training set atomically and byte-deterministically, the manifest with each data file's sha256.
    out_dir must be absent, an empty directory, or a training set (which is then replaced)."""
    check_writable(out_dir, is_training_set, "training set")
    with atomic_dir(out_dir, replace=True) as tmp:
        (tmp / "training.json").write_bytes(json_bytes(outputs))
        (tmp / "batch.npz").write_bytes(npz_bytes({"tokens": tokens, "targets": targets}))
        files = file_hashes(tmp, TRAINING_DATA_FILES)
        (tmp / "manifest.json").write_bytes(json_bytes(dataclasses.replace(manifest, files=files)))
    return out_dir


def read_training_set(path: Union[str, Path]) -> TrainingSet:
    """Load a training set: the manifest, each data file against its sha256, every field and array against
    the manifest; GoldenError naming file and field otherwise."""
    path = Path(path)
    file, raw = _manifest_json(path)
    manifest = from_json(TrainingManifest, raw, file)
    check_files(path, manifest.files, TRAINING_DATA_FILES)
    batch = _read_npz(path / "batch.npz")
    _check_members(path / "batch.npz", batch, ["tokens", "targets"])
    outputs = from_json(TrainingOutputs, read_json(path / "training.json", GoldenError), path / "training.json")
    golden = TrainingSet(path=path, manifest=manifest, outputs=outputs, tokens=batch["tokens"],
                         targets=batch["targets"])  # fmt: skip
    _check_training(golden)
    return golden
