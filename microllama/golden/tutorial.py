"""The tutorial's grader (docs/tutorial/): one piece of a learner's Llama checked against what Meta's reference
computed at a capture point of a golden set, for one of its cases, with the rule `microllama verify` applies:
bit-exact on the recording's platform, within microllama.tolerances.LOGITS_ATOL elsewhere. Beside `check`, the
generated ids (`check_completion`, `check_chat_prompt`, `check_reply`: identical, or parting only where the
tolerance allows, as verify judges completions) and a training run's losses (`check_losses`, against the
loss-curve golden by its rule).

    from microllama.golden.tutorial import check, recorded
    check("layers.0.attention_norm", my_rmsnorm(recorded("tok_embeddings")))
"""

import dataclasses
import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Optional, Union

import torch

from ..checkpoint.load import open_checkpoint
from ..generation import output_ends
from ..model import Transformer
from ..tokenizer import Tokenizer
from ..tolerances import LOGITS_ATOL, LOSS_CURVE_PLATFORM_RTOL
from .capture import platform_fingerprint
from .inference_set import LONG_RANGE, GoldenSet, Row, read_set
from .loss_curve import compare, read_golden
from .verify import compare_arrays, comparison_mode, parts_within_tolerance, recorded_checkpoint

GOLDENS = Path(__file__).resolve().parents[2] / "goldens"
# The set the tutorial checks against: Meta's tiny checkpoint in float32 on the CPU, one process.
DEFAULT_SET = GOLDENS / "tiny-fp32-cpu-ws1"
# The loss curve stage 08 reproduces: microllama's trainer on the recipe of microllama.golden.loss_curve.RECIPE.
DEFAULT_CURVE = GOLDENS / "losses" / "tiny-fp32-cpu-ws1.json"

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


def first_difference(got: Sequence[int], want: Sequence[int]) -> int:
    """The first position where two id lists differ (the shorter one's length if one is the other's start)."""
    return next((i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), min(len(got), len(want)))


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
            at = first_difference(got, want)
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


@functools.cache
def _model(path: Path) -> Transformer:
    """The set's checkpoint as microllama's model in the set's dtype: what the tolerance's judgement runs on."""
    g = _read(path)
    m = g.manifest
    return open_checkpoint(recorded_checkpoint(g)).load_model(m.model.max_seq_len, m.model.max_batch_size,
                                                              dtype=m.torch_dtype)  # fmt: skip


@functools.cache
def _stop_tokens() -> list[int]:
    """The ids generation stops at (<|end_of_text|>, <|eom_id|>, <|eot_id|>): the tokenizer read once."""
    return Tokenizer().stop_tokens


def _check_ids(g: GoldenSet, what: str, got: list[int], want: list[int], prompt: list[int],
               ends: tuple[list[int], list[int]], temperature: float, top_p: float) -> bool:  # fmt: skip
    """Generated ids against Meta's, as verify judges them: identical; or, where the check is not bit-exact, ids
    that part from Meta's where a model within LOGITS_ATOL of microllama's could have made both (tolerance_admits).
    ends: per generation (got, want), the ids one of which ended it (none: it ran out of length)."""
    mode = comparison_mode(g, "cpu")
    n = f"{len(got)} id{'s' if len(got) != 1 else ''}"
    if got == want:
        print(f"{what}: identical ({n}); check: {mode.line}")
        return True
    at = first_difference(got, want)
    if not mode.exact:
        atol = LOGITS_ATOL[g.manifest.torch_dtype]
        stops = _stop_tokens()
        if parts_within_tolerance(_model(g.path), prompt, (got, want), ends, stops, temperature, top_p,
                                  atol) is not None:  # fmt: skip
            print(f"{what}: parts from Meta's at token {at} where the tolerance allows; check: {mode.line} "
                  f"(atol {atol:g})")  # fmt: skip
            return True
    raise CheckFailed(f"{what}: DIFFERS from Meta's at token {at} (yours {n}: {got[at : at + 4]}..., Meta's "
                      f"{len(want)}: {want[at : at + 4]}...); check: {mode.line}")  # fmt: skip


def check_completion(tokens: Sequence[int], prompt: int = 0, kind: str = "greedy",
                     golden: Union[str, Path, None] = None) -> bool:  # fmt: skip
    """Check a completion's ids (after the prompt, without the stop token) against the one Meta generated for
    prompt number `prompt` in the set's batch of `kind` (greedy or top_p, with the manifest's settings: all of the
    kind's prompts in one batch, a top-p batch seeded). Prints the pass and returns True; raises CheckFailed naming
    the first token that differs."""
    g = golden_set(golden)
    if kind not in g.manifest.completions:
        raise ValueError(f"kind {kind!r}: expected one of {', '.join(g.manifest.completions)}")
    s, recorded = g.manifest.completions[kind], g.outputs.completions[kind]
    if not (isinstance(prompt, int) and 0 <= prompt < len(recorded)):
        raise ValueError(f"prompt {prompt!r}: the {kind} batch holds prompts 0 to {len(recorded) - 1}")
    ids = list(g.outputs.prompt_ids[g.manifest.prompts.index(s.prompts[prompt])])  # the batch's prompts are the set's
    got, want = [int(t) for t in tokens], recorded[prompt]
    _, (end,) = output_ends([len(ids)], s.max_gen_len, g.manifest.model.max_seq_len)
    stops = _stop_tokens()
    ends = tuple(stops if len(ids) + len(c) < end else [] for c in (got, want))
    return _check_ids(g, f"{kind} completion, prompt {prompt}", got, want, ids, ends, s.temperature, s.top_p)


def _dialog(g: GoldenSet, dialog: int) -> None:
    if g.chat is None:
        raise ValueError(f"{g.path.name} records no chat")
    if not (isinstance(dialog, int) and 0 <= dialog < len(g.chat.prompt_ids)):
        raise ValueError(f"dialog {dialog!r}: expected a dialog number 0 to {len(g.chat.prompt_ids) - 1}")


def check_chat_prompt(ids: Sequence[int], dialog: int = 0, golden: Union[str, Path, None] = None) -> bool:
    """Check a dialog's prompt ids (BOS, every message, the open assistant header) against the ids Meta's
    ChatFormat made for dialog number `dialog` of the set (golden_set().manifest.chat.dialogs)."""
    g = golden_set(golden)
    _dialog(g, dialog)
    got, want = [int(t) for t in ids], g.chat.prompt_ids[dialog]
    if got != want:
        at = first_difference(got, want)
        raise CheckFailed(f"chat prompt ids, dialog {dialog}: DIFFER from Meta's at token {at} ({len(got)} ids, "
                          f"Meta's {len(want)}: {want[at : at + 4]}... from there)")  # fmt: skip
    print(f"chat prompt ids, dialog {dialog}: identical ({len(got)} ids)")
    return True


def check_reply(tokens: Sequence[int], stop_token: Optional[int], dialog: int = 0, kind: str = "greedy",
                golden: Union[str, Path, None] = None) -> bool:  # fmt: skip
    """Check a chat reply (its ids without the stop token, and the stop token that ended it, None when none did)
    against the reply Meta generated to dialog number `dialog` in the set's chat batch of `kind`."""
    g = golden_set(golden)
    _dialog(g, dialog)
    if kind not in g.chat.replies:
        raise ValueError(f"kind {kind!r}: expected one of {', '.join(g.chat.replies)}")
    recorded, s = g.chat.replies[kind][dialog], g.manifest.chat.completions[kind]
    what = f"chat {kind} reply, dialog {dialog}"
    if stop_token != recorded.stop_token:
        raise CheckFailed(f"{what}: stop token {stop_token}, Meta's {recorded.stop_token} "
                          f"({recorded.stop_reason})")  # fmt: skip
    ends = ([] if stop_token is None else [stop_token], [] if stop_token is None else [stop_token])
    return _check_ids(g, what, [int(t) for t in tokens], recorded.tokens, g.chat.prompt_ids[dialog], ends,
                      s.temperature, s.top_p)  # fmt: skip


def check_losses(losses: Sequence[float], grad_norms: Optional[Sequence[float]] = None,
                 curve: Union[str, Path] = DEFAULT_CURVE) -> bool:  # fmt: skip
    """Check a training run's first steps (each step's loss, and its gradient norm before clipping when given)
    against a loss-curve golden, by its rule: bit for bit on the recording's platform (CPU ISA, torch build and
    thread count), within LOSS_CURVE_PLATFORM_RTOL relative elsewhere. Prints the pass; CheckFailed names the step."""
    golden = read_golden(curve)
    if not 1 <= len(losses) <= len(golden.steps):
        raise ValueError(f"{len(losses)} losses: the curve holds steps 1 to {len(golden.steps)}")
    if grad_norms is not None and len(grad_norms) != len(losses):
        raise ValueError(f"{len(grad_norms)} gradient norms for {len(losses)} losses")
    differ = platform_fingerprint("cpu").differences(golden.platform)
    rtol = 0.0 if not differ else LOSS_CURVE_PLATFORM_RTOL
    line = (f"tolerance: this platform differs from the recording's ({', '.join(differ)}) (rtol {rtol:g})" if differ
            else "bit-exact: this platform matches the recording's")  # fmt: skip
    mine = [dataclasses.replace(s, loss=float(loss), grad_norm=float(norm) if grad_norms is not None else s.grad_norm)
            for s, loss, norm in zip(golden.steps, losses, grad_norms or losses, strict=False)]  # fmt: skip
    parting = compare(mine, golden.steps[: len(mine)], rtol)
    what = f"loss curve, steps 1 to {len(mine)} ({'loss and grad_norm' if grad_norms is not None else 'loss'})"
    if parting is not None:
        rel = abs(parting.a - parting.b) / abs(parting.b)
        raise CheckFailed(f"{what}: PARTS from the golden {Path(curve).name} at step {parting.step}: {parting.key} "
                          f"{parting.a!r} (yours) vs {parting.b!r}, {rel:.3g} relative; check: {line}")  # fmt: skip
    print(f"{what}: {'identical to' if rtol == 0 else 'within tolerance of'} the golden {Path(curve).name}; "
          f"check: {line}")  # fmt: skip
    return True
