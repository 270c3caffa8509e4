"""The training run's files, built and read here only.

    OUT_DIR/train_config.json    the run's resolved configuration (TrainConfig, model, data, dtype, versions)
    OUT_DIR/metrics.jsonl        one line per step and per evaluation
    OUT_DIR/checkpoint/          the last save: state.pth and train_config.json, replaced atomically; a
                                 data-parallel run's weights (a QLoRA run's NF4 base left out) and AdamW state in dcp/
                                 (torch.distributed.checkpoint, written by every rank, readable at any world size,
                                 one process included)
    OUT_DIR/final/               params.json + consolidated.00.pth in Meta's layout (LoRA merged), train_config.json
    OUT_DIR/adapters.pth         LoRA runs: the adapters alone (microllama.train.lora.load_adapters)

state.pth holds what a resume needs to go on bit for bit: the step, the weights that train (all of them,
the norm weights, or the LoRA adapters alone), the optimizer's state, torch's random states and the data
position. It is read with weights_only=True: tensors, numbers and strings, nothing that runs code.
"""

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.distributed as dist
from torch import nn

from ..files import StateDict, atomic_dir, read_json
from ..quantize import is_quantized
from .config import RESUMABLE
from .data import DataPosition

if dist.is_available():
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

STATE_FORMAT = 1
RECORD = "train_config.json"
METRICS = "metrics.jsonl"
CHECKPOINT = "checkpoint"
DCP = "dcp"
FINAL = "final"
ADAPTERS = "adapters.pth"


class TrainCheckpointError(ValueError):
    """A run directory or checkpoint that cannot be used as asked; the message names the file."""


@dataclass
class TrainState:
    step: int  # optimizer steps taken
    weights: StateDict  # the weights that train, by their names in the model
    optimizer: dict[str, Any]  # torch.optim state_dict
    data: DataPosition
    targets_seen: int = 0  # target tokens trained on so far
    rng: dict[str, Any] = field(default_factory=dict)  # torch's generator states: "cpu", and "cuda" (one per device)
    dcp: Optional[Path] = None  # where a data-parallel run saved weights and optimizer (then both above are empty)


def capture_rng() -> dict[str, Any]:
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def restore_rng(rng: dict[str, Any]) -> None:
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def save_checkpoint(run_dir: Path, state: TrainState, record: dict[str, Any]) -> Path:
    """Write run_dir/checkpoint atomically: a crash while saving leaves the previous checkpoint whole."""
    payload = {
        "format": STATE_FORMAT,
        "step": state.step,
        "weights": {k: v.detach().cpu() for k, v in state.weights.items()},
        "optimizer": state.optimizer,
        "data": {"epoch": state.data.epoch, "row": state.data.row},
        "targets_seen": state.targets_seen,
        "rng": state.rng,
    }
    with atomic_dir(run_dir / CHECKPOINT, replace=True) as tmp:
        torch.save(payload, tmp / "state.pth")
        write_record(tmp, record)
    return run_dir / CHECKPOINT


def save_sharded_checkpoint(
    run_dir: Path, state: TrainState, record: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer,
    is_rank_0: bool,
) -> Path:  # fmt: skip
    """A data-parallel run's save, called on every rank: the weights and AdamW state (sharded or not) with
    torch.distributed.checkpoint into a partial directory, which rank 0 then moves into run_dir/checkpoint/dcp
    beside state.pth (step, data position, random states) and the record, replaced atomically."""
    partial = run_dir / f".{CHECKPOINT}-{DCP}.partial"
    if is_rank_0:
        shutil.rmtree(partial, ignore_errors=True)
    dist.barrier()
    weights, optim = get_state_dict(model, optimizer)
    dcp.save({"model": without_quantized(weights), "optimizer": optim}, checkpoint_id=partial)
    if is_rank_0:
        payload = {"format": STATE_FORMAT, "step": state.step, "weights": {}, "optimizer": {}, "dcp": True,
                   "data": {"epoch": state.data.epoch, "row": state.data.row}, "targets_seen": state.targets_seen,
                   "rng": state.rng}  # fmt: skip
        with atomic_dir(run_dir / CHECKPOINT, replace=True) as tmp:
            torch.save(payload, tmp / "state.pth")
            write_record(tmp, record)
            partial.rename(tmp / DCP)
    dist.barrier()
    return run_dir / CHECKPOINT


def load_sharded_weights(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Weights and AdamW state saved by save_sharded_checkpoint at any world size, into model and optimizer as
    they are placed here (sharded by FSDP, whole under DDP or in one process): DCP reshards as it reads. A
    quantized base stays as the model was built with it, from the checkpoint (without_quantized)."""
    weights, optim = get_state_dict(model, optimizer)
    state = {"model": without_quantized(weights), "optimizer": optim}
    dcp.load(state, checkpoint_id=path)
    strict = len(state["model"]) == len(weights)  # unless a quantized base was left out
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=StateDictOptions(strict=strict))  # fmt: skip


def without_quantized(weights: StateDict) -> StateDict:
    """A model state dict less its quantized weights (QLoRA's frozen NF4 base, whole or FSDP2's shards): not state
    a resume needs, as it quantizes them again from the model's checkpoint, whose files the record's fingerprint
    says are the same. DCP would write them as pickled torchao objects, which its readers then need."""
    return {k: v for k, v in weights.items() if not is_quantized(v)}


def load_whole_into_sharded(state: TrainState, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """A one-process checkpoint's weights and AdamW state (whole tensors; AdamW's keyed by parameter index, in
    the order of its groups) into a model and AdamW sharded by FSDP2: set_state_dict with full state dicts, each
    rank keeping its own shard of every tensor. The optimizer must be built as the saved one was (make_optimizer
    on the same trainable weights)."""
    names = {p: name for name, p in model.named_parameters()}
    saved_groups = state.optimizer["param_groups"]
    fqn = {i: names[p] for group, saved in zip(optimizer.param_groups, saved_groups, strict=True)
           for p, i in zip(group["params"], saved["params"], strict=True)}  # fmt: skip
    optim = {"state": {fqn[i]: s for i, s in state.optimizer["state"].items()},
             "param_groups": [{**g, "params": [fqn[i] for i in g["params"]]} for g in saved_groups]}  # fmt: skip
    options = StateDictOptions(full_state_dict=True, strict=False)
    set_state_dict(model, optimizer, model_state_dict=state.weights, optim_state_dict=optim, options=options)


def load_checkpoint(run_dir: Path) -> tuple[TrainState, dict[str, Any]]:
    """The state and the record of run_dir's last checkpoint."""
    path = run_dir / CHECKPOINT / "state.pth"
    if not path.is_file() and saved_nothing(run_dir):
        raise TrainCheckpointError(f"nothing to resume: the run in {run_dir} saved no checkpoint; run the same "
                                   "command without --resume to start it again there")  # fmt: skip
    if not path.is_file():
        raise TrainCheckpointError(f"nothing to resume: {path} not found (the run saved no checkpoint)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a damaged archive raises one of several types
        raise TrainCheckpointError(f"{path}: not a readable training checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(payload, dict) or payload.get("format") != STATE_FORMAT:
        raise TrainCheckpointError(f"{path}: not a microllama training checkpoint of format {STATE_FORMAT}")
    if payload.get("dcp"):
        check_sharded_checkpoint(run_dir / CHECKPOINT / DCP)
    state = TrainState(
        step=payload["step"],
        weights=payload["weights"],
        optimizer=payload["optimizer"],
        data=DataPosition(**payload["data"]),
        targets_seen=payload["targets_seen"],
        rng=payload["rng"],
        dcp=run_dir / CHECKPOINT / DCP if payload.get("dcp") else None,
    )
    return state, read_record(run_dir / CHECKPOINT)


def check_sharded_checkpoint(path: Path) -> None:
    """TrainCheckpointError in one line unless path holds a whole torch.distributed.checkpoint save: its .metadata
    readable and every file it names there, as long as the metadata says. DCP reads a whole save into any mesh and
    world size (it reshards as it reads); a save with a rank's file missing or cut short it would find only once
    the model is built, deep in its reader."""
    if not dist.is_available():
        raise TrainCheckpointError(f"{path} was saved by a data-parallel run with torch.distributed.checkpoint, which "
                                   "this torch build cannot read (torch.distributed is not available)")  # fmt: skip
    try:
        metadata = dcp.FileSystemReader(path).read_metadata()
    except Exception as e:  # absent, cut short or not DCP's: several types
        raise TrainCheckpointError(f"{path}: not a readable torch.distributed.checkpoint save ({type(e).__name__}: "
                                   f"{str(e).splitlines()[0] if str(e) else ''})") from None  # fmt: skip
    needs: dict[str, int] = {}  # file -> the bytes the metadata reads from it
    for where in (metadata.storage_data or {}).values():
        needs[where.relative_path] = max(needs.get(where.relative_path, 0), where.offset + where.length)
    missing = [name for name in sorted(needs) if not (path / name).is_file()]
    held = {name: (path / name).stat().st_size for name in needs if name not in missing}
    short = [f"{name} holds {held[name]:,} of its {size:,} bytes" for name, size in sorted(needs.items())
             if name in held and held[name] < size]  # fmt: skip
    if missing or short:
        what = [f"{', '.join(missing)} missing"] if missing else []
        raise TrainCheckpointError(f"{path} is incomplete: {'; '.join(what + short)} (of the {len(needs)} files, one "
                                   "per rank that saved it, its .metadata names): copy the checkpoint whole, or "
                                   "start a new run in another --out_dir")  # fmt: skip


def save_adapters(run_dir: Path, adapters: StateDict) -> Path:
    """run_dir/adapters.pth, replaced atomically."""
    path, tmp = run_dir / ADAPTERS, run_dir / f".{ADAPTERS}.partial-{os.getpid()}"
    torch.save({k: v.detach().cpu() for k, v in adapters.items()}, tmp)
    os.replace(tmp, path)
    return path


def load_adapters(path: Union[str, Path]) -> StateDict:
    """The adapters saved by save_adapters (a run's adapters.pth)."""
    try:
        adapters = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise TrainCheckpointError(f"{path} not found") from None
    except Exception as e:
        raise TrainCheckpointError(f"{path}: not a readable adapters file ({type(e).__name__}: {e})") from e
    if not isinstance(adapters, dict) or not all(isinstance(v, torch.Tensor) for v in adapters.values()):
        raise TrainCheckpointError(f"{path} must hold a dict of tensors")
    return adapters


def write_record(directory: Path, record: dict[str, Any]) -> None:
    (directory / RECORD).write_text(json.dumps(record, indent=2) + "\n")


def read_record(directory: Path) -> dict[str, Any]:
    return read_json(directory / RECORD, TrainCheckpointError)


def check_resumable(saved: dict[str, Any], record: dict[str, Any], where: Path) -> None:
    """TrainCheckpointError naming what differs, unless record describes the run that saved `saved` (the
    settings in RESUMABLE and library versions may differ)."""
    differences = []
    for section in ("model", "data", "dtype"):
        if saved.get(section) != record.get(section):
            differences.append(f"{section} {json.dumps(saved.get(section))} (now {json.dumps(record.get(section))})")
    old, new = saved.get("config", {}), record["config"]
    for key in sorted(old.keys() | new.keys()):
        if key not in RESUMABLE and old.get(key) != new.get(key):
            differences.append(f"--{key} {json.dumps(old.get(key))} (now {json.dumps(new.get(key))})")
    if differences:
        raise TrainCheckpointError(
            f"{where} was saved by another run: {'; '.join(differences)}. Resume with the same model, data and "
            "settings, or start a new run in another --out_dir"
        )


def files_fingerprint(files: list[Path]) -> str:
    """sha256 over each file's name, size and first and last MiB: tells checkpoints apart in a moment, where
    hashing every byte of an 8B model would take a minute."""
    h = hashlib.sha256()
    for path in files:
        size = path.stat().st_size
        h.update(f"{path.name}|{size}\n".encode())
        with open(path, "rb") as f:
            h.update(f.read(1 << 20))
            f.seek(max(0, size - (1 << 20)))
            h.update(f.read(1 << 20))
    return h.hexdigest()


def check_new_run_dir(run_dir: Path) -> None:
    """TrainCheckpointError unless run_dir is absent, empty, or a run that saved no checkpoint (a failed or
    killed start, which a new run replaces): another run's checkpoints are never touched."""
    if run_dir.exists() and not run_dir.is_dir():
        raise TrainCheckpointError(f"--out_dir {run_dir} is a file: name a directory (absent or empty)")
    if not run_dir.exists() or not any(run_dir.iterdir()) or saved_nothing(run_dir):
        return
    what = "holds another run" if (run_dir / RECORD).is_file() else "is not an empty directory"
    raise TrainCheckpointError(f"--out_dir {run_dir} {what}: pass --resume to continue it, or choose another --out_dir")


def saved_nothing(run_dir: Path) -> bool:
    """Whether run_dir holds a run that stopped before its first checkpoint: nothing to resume or to keep."""
    return (run_dir / RECORD).is_file() and not any((run_dir / name).exists() for name in (CHECKPOINT, FINAL, ADAPTERS))


def start_run_dir(run_dir: Path, record: dict[str, Any]) -> None:
    """Create run_dir for a new run (or start one again there), with its record and an empty metrics.jsonl."""
    check_new_run_dir(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_record(run_dir, record)
    (run_dir / METRICS).write_text("")


def read_metrics(run_dir: Union[str, Path]) -> list[dict[str, Any]]:
    """The lines of run_dir/metrics.jsonl."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        raise TrainCheckpointError(f"{path} not found: not a training run directory")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_metrics(run_dir: Path, step: int) -> None:
    """Forget metrics of steps after `step` (a resume from there writes them again), replacing the file
    atomically: an interrupted truncation loses nothing, and other ranks reading it see the old or the new."""
    kept = [m for m in read_metrics(run_dir) if m["step"] <= step]
    tmp = run_dir / f".{METRICS}.partial-{os.getpid()}"
    tmp.write_text("".join(json.dumps(m) + "\n" for m in kept))
    os.replace(tmp, run_dir / METRICS)
