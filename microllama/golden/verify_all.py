"""`microllama verify --all`: every golden and training set in a directory checked in one run, one summary
table and one verdict; the check a contributor runs after a refactor. Each set is checked as `microllama verify`
checks it alone (microllama.golden.verify, microllama.golden.verify_training), by the same rule: bit for bit on the
recording's platform, else within microllama.tolerances."""

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
from tqdm import tqdm

from ..tolerances import LOGITS_ATOL
from .schema import GoldenError
from .training_set import is_training_set
from .verify import Comparison, format_comparison, verify
from .verify_training import TrainingComparison, format_training_comparison, verify_training


@dataclass(frozen=True, kw_only=True)
class SetResult:
    path: Path
    kind: str  # "forward" (capture points, completions, chat replies) or "training"
    check: str  # "bit-exact", "tolerance" or "-" where the set could not be read
    worst: float  # the largest error of what is compared: capture points (absolute), first-step gradients (relative)
    bound: float  # what that error is held to: 0 where bit-exact
    outputs: str  # completions and chat replies identical, or training steps within their bounds
    failure: Optional[str]
    seconds: float
    report: str  # what `microllama verify` prints for this set alone

    @property
    def passed(self) -> bool:
        return self.failure is None


def golden_sets(root: Union[str, Path]) -> list[Path]:
    """The set directories (those holding a manifest.json) directly under root, in name order."""
    root = Path(root)
    if not root.is_dir():
        raise GoldenError(f"{root}: not a directory of golden sets")
    sets = sorted(p.parent for p in root.glob("*/manifest.json"))
    if not sets:
        raise GoldenError(f"{root}: holds no golden set (no */manifest.json)")
    return sets


def _identical(equal: dict[str, list[bool]], parted: dict[str, dict[int, int]]) -> tuple[int, int, int]:
    """Identical, parting where the tolerance allows, and compared, over all kinds."""
    return (sum(sum(v) for v in equal.values()), sum(len(v) for v in parted.values()),
            sum(len(v) for v in equal.values()))  # fmt: skip


def _forward_result(c: Comparison, seconds: float) -> SetResult:
    same, parted, n = _identical(c.completions_equal, c.completions_parted)
    if c.chat is not None:
        chat_equal = {kind: [not fields for fields in dialogs] for kind, dialogs in c.chat.differences.items()}
        s, p, k = _identical(chat_equal, c.chat.parted)
        same, parted, n = same + s, parted + p, n + k
    outputs = f"{same}/{n} identical" + (f", {parted} part within tolerance" if parted else "")
    return SetResult(path=c.golden.path, kind="forward", check="bit-exact" if c.exact else "tolerance",
                     worst=max(p.max_abs for p in c.points),
                     bound=0.0 if c.exact else LOGITS_ATOL[c.golden.manifest.torch_dtype], outputs=outputs,
                     failure=c.failure, seconds=seconds, report=format_comparison(c))  # fmt: skip


def _training_result(c: TrainingComparison, seconds: float) -> SetResult:
    steps = len(c.ours.losses)
    ok = sum(not c.step_diverges(i) for i in range(steps))
    return SetResult(path=c.golden.path, kind="training", check="bit-exact" if c.exact else "tolerance",
                     worst=max(c.first_gradient_error(i) for i in range(len(c.golden.manifest.parameters))),
                     bound=0.0 if c.exact else c.grad_rtol, outputs=f"{ok}/{steps} steps within bounds",
                     failure=c.failure, seconds=seconds, report=format_training_comparison(c))  # fmt: skip


def verify_all(
    root: Union[str, Path], device: Optional[Union[str, torch.device]] = None, progress: bool = False
) -> list[SetResult]:
    """Check microllama against every set under root, each on its own recorded checkpoint; a set that cannot be
    read or checked is a failed row, and the others are still checked."""
    results = []
    for path in tqdm(golden_sets(root), "golden sets", disable=not progress, file=sys.stderr):
        start = time.perf_counter()
        training = is_training_set(path)
        try:
            if training:
                result = _training_result(verify_training(path, device=device), time.perf_counter() - start)
            else:
                result = _forward_result(verify(path, device=device), time.perf_counter() - start)
        except GoldenError as e:
            result = SetResult(path=path, kind="training" if training else "forward", check="-", worst=0.0,
                               bound=0.0, outputs="-", failure=str(e), seconds=time.perf_counter() - start,
                               report=f"golden set {path}: {e}")  # fmt: skip
        results.append(result)
    return results


def format_summary(results: Sequence[SetResult]) -> str:
    """One row per set (the worst error beside its bound: capture points' absolute error for a forward set,
    first-step gradient norms' error relative to the largest for a training set), then one verdict."""
    width = max(len(r.path.name) for r in results)
    lines = [f"{'set':<{width}}  {'kind':<8}  {'check':<9}  {'worst err':>9}  {'bound':>9}  {'outputs':<36}  "
             f"{'seconds':>7}  verdict"]  # fmt: skip
    for r in results:
        lines.append(f"{r.path.name:<{width}}  {r.kind:<8}  {r.check:<9}  {r.worst:>9.3g}  {r.bound:>9.3g}  "
                     f"{r.outputs:<36}  {r.seconds:>7.1f}  {'pass' if r.passed else 'FAIL'}")  # fmt: skip
    failed = [r for r in results if not r.passed]
    lines.append("")
    for r in failed:
        lines.append(f"{r.path.name}: {r.failure}")
    if failed:
        lines.append(f"verdict: FAIL: {len(failed)} of {len(results)} sets ({', '.join(r.path.name for r in failed)})")
    else:
        lines.append(f"verdict: pass ({len(results)} sets)")
    return "\n".join(lines)
