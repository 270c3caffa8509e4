"""Loss curves: the per-step losses and gradient norms of a training run, and the committed golden of a fixed
recipe (torchtitan's practice: a small file that guards the trainer's numerics over many steps).

    goldens/losses/tiny-fp32-cpu-ws1.json   LossCurve: the recipe (TrainConfig's fields, the corpus relative to
                                            the checkout), world size, the recording's platform (its thread count
                                            included) and torch version, and per step its loss and grad_norm

`compare` takes two curves (a run directory's metrics.jsonl, or a golden file) and names the first step where
they part beyond a relative tolerance; `microllama compare_losses A B` prints it, exit status 1.
"""

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

from ..files import read_json
from ..train.config import TrainConfig
from ..train.loop import train
from .capture import cpu_threads, platform_fingerprint
from .schema import GoldenError, Platform, from_json, to_json

LOSS_CURVE_KIND = "loss_curve"
KEYS = ("loss", "grad_norm")  # what a curve holds per step, in the order compare checks them
# The recipe: the tiny checkpoint, the shipped corpus, 20 AdamW steps of 2 rows of 32 tokens in float32, seeded; no
# held-out split (every step a training step), one save at the end. corpus is relative to the checkout.
RECIPE: dict[str, Any] = dict(data="corpus/tinytales.txt", ckpt_dir="tiny", dtype="float32", max_seq_len=32,
                              batch_size=2, max_steps=20, warmup_steps=2, lr=1e-3, min_lr=1e-4, seed=0,
                              eval_fraction=0.0, eval_every=0, save_every=0)  # fmt: skip


@dataclass(frozen=True)
class Step:
    step: int
    loss: float
    grad_norm: float


@dataclass(frozen=True, kw_only=True)
class LossCurve:
    kind: str  # LOSS_CURVE_KIND
    recipe: dict[str, Any]  # TrainConfig's fields (data relative to the checkout)
    device: str
    world_size: int
    platform: Platform  # the recording's: CPU ISA, torch build, threads
    steps: list[Step]


@dataclass(frozen=True)
class Parting:
    """Where two curves first part: the step, the key (loss or grad_norm) and each curve's value."""

    step: int
    key: str
    a: Optional[float]  # None: the curve has no such step
    b: Optional[float]

    def line(self, rtol: float) -> str:
        if self.a is None or self.b is None:
            return f"step {self.step}: only {'B' if self.a is None else 'A'} has it"
        rel = abs(self.a - self.b) / max(abs(self.b), 1e-300)
        return f"step {self.step}: {self.key} {self.a!r} (A) vs {self.b!r} (B), {rel:.3g} relative, over {rtol:.3g}"


def steps_of_metrics(metrics: list[dict[str, Any]]) -> list[Step]:
    """The training steps of a run's metrics.jsonl lines (held-out lines left out)."""
    return [Step(m["step"], m["loss"], m["grad_norm"]) for m in metrics if "loss" in m]


def read_curve(path: Union[str, Path]) -> list[Step]:
    """The steps of a loss-curve golden (a .json file), or of a run directory or its metrics.jsonl."""
    path = Path(path)
    if path.is_file() and path.suffix == ".json":
        return read_golden(path).steps
    metrics = path / "metrics.jsonl" if path.is_dir() else path
    if not metrics.is_file():
        raise GoldenError(f"{path}: neither a loss-curve golden (.json) nor a run directory with metrics.jsonl")
    try:
        return steps_of_metrics([json.loads(line) for line in metrics.read_text().splitlines() if line.strip()])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise GoldenError(f"{metrics}: not a training run's metrics ({type(e).__name__}: {e})") from None


def compare(a: list[Step], b: list[Step], rtol: float) -> Optional[Parting]:
    """The first step (then key, in KEYS order) where |a - b| > rtol |b|, or where one curve has a step the other
    lacks; None when they agree. rtol 0: bit for bit."""
    by_step = {s.step: s for s in b}
    for s in a:
        other = by_step.pop(s.step, None)
        if other is None:
            return Parting(s.step, "step", getattr(s, KEYS[0]), None)
        for key in KEYS:
            x, y = getattr(s, key), getattr(other, key)
            if not (x == y or math.isclose(x, y, rel_tol=rtol, abs_tol=0)):
                return Parting(s.step, key, x, y)
    if by_step:
        first = min(by_step)
        return Parting(first, "step", None, getattr(by_step[first], KEYS[0]))
    return None


def max_relative_difference(a: list[Step], b: list[Step]) -> float:
    """The largest |a - b| / |b| over the steps both hold and KEYS (what a tolerance must cover)."""
    by_step = {s.step: s for s in b}
    diffs = [abs(getattr(s, k) - getattr(by_step[s.step], k)) / abs(getattr(by_step[s.step], k))
             for s in a if s.step in by_step for k in KEYS]  # fmt: skip
    return max(diffs, default=0.0)


def write_golden(path: Union[str, Path], curve: LossCurve) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_json(curve), indent=1) + "\n")
    return path


def read_golden(path: Union[str, Path]) -> LossCurve:
    """A loss-curve golden; GoldenError naming the file and the field that is wrong (schema.from_json)."""
    raw = read_json(Path(path), GoldenError)
    if not isinstance(raw, dict) or raw.get("kind") != LOSS_CURVE_KIND:
        raise GoldenError(f"{path}: not a loss-curve golden (kind {LOSS_CURVE_KIND!r})")
    return from_json(LossCurve, raw, Path(path))


def recipe_config_fields(recipe: dict[str, Any], repo: Path, out_dir: Union[str, Path], **changes: Any) -> dict:
    """TrainConfig's fields for a recipe run in out_dir: its corpus found in the checkout at repo."""
    return {**recipe, "data": str(repo / recipe["data"]), "out_dir": str(out_dir), **changes}


def record_curve(repo: Path, out_dir: Path, threads: Optional[int] = 1) -> LossCurve:
    """Run RECIPE in one process on the CPU at `threads` torch threads (None: as set) into out_dir (absent or
    empty), and its curve with this platform's fingerprint."""
    with cpu_threads(threads):
        train(TrainConfig(**recipe_config_fields(RECIPE, repo, out_dir)))
        platform = platform_fingerprint("cpu")
    return LossCurve(kind=LOSS_CURVE_KIND, recipe=dict(RECIPE), device="cpu", world_size=1, platform=platform,
                     steps=read_curve(out_dir))  # fmt: skip
