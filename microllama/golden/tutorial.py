"""The tutorial's grader (docs/tutorial/): one piece of a learner's Llama checked against what Meta's reference
computed at a capture point of a golden set, for one of its cases, with the rule `microllama verify` applies:
bit-exact on the recording's platform, within microllama.tolerances.LOGITS_ATOL elsewhere.

    from microllama.golden.tutorial import check, recorded
    check("layers.0.attention_norm", my_rmsnorm(recorded("tok_embeddings")))
"""

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Union

import torch

from ..tolerances import LOGITS_ATOL
from .inference_set import LONG_RANGE, GoldenSet, Row, read_set
from .verify import compare_arrays, comparison_mode

# The set the tutorial checks against: Meta's tiny checkpoint in float32 on the CPU, one process.
DEFAULT_SET = Path(__file__).resolve().parents[2] / "goldens" / "tiny-fp32-cpu-ws1"

# The tokenizer's stage: a case's token ids, as `verify` names that check.
PROMPT_IDS = "prompt ids"

Case = Union[int, str]  # a prompt's number, or "long-range" (one decode step after 9,000 cached positions)


class CheckFailed(Exception):
    """A learner's piece differs from Meta's recording; the message names the capture point and what differs."""


@functools.cache
def _read(path: Path) -> GoldenSet:
    return read_set(path)


def golden_set(path: Union[str, Path, None] = None) -> GoldenSet:
    """The golden set at path (default DEFAULT_SET), read and checked once per process."""
    path = Path(path).resolve() if path is not None else DEFAULT_SET
    if not (path / "manifest.json").is_file():
        raise FileNotFoundError(f"{path}: no golden set here (the tutorial needs a checkout's goldens/ directory)")
    return _read(path)


def _row(g: GoldenSet, case: Case) -> Row:
    name = case if case == LONG_RANGE else f"prompt {case}" if isinstance(case, int) else None
    row = next((r for r in g.outputs.rows if r.case == name), None)
    if row is None:
        last = len(g.outputs.prompt_ids) - 1
        raise ValueError(f"case {case!r}: expected a prompt number 0 to {last} or {LONG_RANGE!r}")
    return row


def _point(g: GoldenSet, point: str) -> str:
    if point not in g.manifest.capture_points and point != PROMPT_IDS:
        names = ", ".join([PROMPT_IDS, *g.manifest.capture_points])
        raise ValueError(f"{point!r} is not a capture point of {g.path.name}: expected one of {names}")
    return point


def prompt_ids(case: Case = 0, golden: Union[str, Path, None] = None) -> list[int]:
    """The token ids Meta's model ran for case: a prompt's ids (BOS first), or the long-range case's 9,001 ids."""
    g = golden_set(golden)
    if _row(g, case).case == LONG_RANGE:
        return g.long_context.tolist()
    return list(g.outputs.prompt_ids[case])


def recorded(point: str, case: Case = 0, golden: Union[str, Path, None] = None) -> torch.Tensor:
    """Meta's activation at a capture point for case, float32 (positions, dim): a stage's input, taken from the
    stage before so that each stage is checked on its own."""
    g = golden_set(golden)
    if _point(g, point) == PROMPT_IDS:
        return torch.tensor(prompt_ids(case, golden))
    row = _row(g, case)
    return torch.from_numpy(g.activations[point][row.first_row : row.first_row + row.n_rows].copy())


def check(point: str, actual: Union[torch.Tensor, Sequence[int]], case: Case = 0,
          golden: Union[str, Path, None] = None) -> bool:  # fmt: skip
    """Check actual, a learner's activation at a capture point for case ((positions, dim), or with a batch dimension
    of 1), or its token ids at "prompt ids", against Meta's recording. Prints the pass and returns True; raises
    CheckFailed naming the point, the max abs error and where it is; ValueError in one line for a wrong shape."""
    g = golden_set(golden)
    _point(g, point)
    row = _row(g, case)
    if point == PROMPT_IDS:
        got, want = [int(t) for t in actual], prompt_ids(case, golden)
        if got != want:
            at = next((i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), min(len(got), len(want)))
            raise CheckFailed(f"{PROMPT_IDS} (tokenizer), {row.case}: DIFFER from Meta's at token {at} "
                              f"({len(got)} ids, Meta's {len(want)}: {want[:at + 3]}...)")  # fmt: skip
        print(f"{PROMPT_IDS} (tokenizer), {row.case}: identical ({len(got)} id{'s' if len(got) > 1 else ''})")
        return True
    if not isinstance(actual, torch.Tensor):
        raise TypeError(f"{point}: expected a torch.Tensor, got {type(actual).__name__}")
    expected = recorded(point, case, golden)
    shape = tuple(actual.shape)
    if shape[:1] == (1,) and len(shape) == 3:
        actual = actual[0]
    if tuple(actual.shape) != tuple(expected.shape):
        n, dim = expected.shape
        raise ValueError(f"{point}: expected shape ({n}, {dim}) ({row.case}'s {n} positions x dim {dim}), "
                         f"or (1, {n}, {dim}), got {shape}")  # fmt: skip
    mode = comparison_mode(g, actual.device)
    dtype = g.manifest.torch_dtype
    result = compare_arrays(point, actual.detach().cpu(), expected, g.outputs.rows, mode.exact, dtype,
                            row_of=range(row.first_row, row.first_row + row.n_rows))  # fmt: skip
    rule = mode.line if mode.exact else f"{mode.line} (atol {LOGITS_ATOL[dtype]:g})"
    where = f"{point}, {row.case} ({row.n_rows} position{'s' if row.n_rows > 1 else ''})"
    if result.diverges:
        atol = LOGITS_ATOL[dtype]
        # Bit-exact here, but within what another platform would admit: a learner's cue to look at the order of ops.
        near = f" (within atol {atol:.3g}: Meta's arithmetic in another order?)" if result.max_abs <= atol else ""
        raise CheckFailed(f"{where}: DIVERGES from Meta's recording: max abs err {result.max_abs:.4g} (max rel err "
                          f"{result.max_rel:.4g}), worst at {result.worst}; check: {rule}{near}")  # fmt: skip
    print(f"{where}: ok, max abs err {result.max_abs:.4g}; check: {rule}")
    return True
