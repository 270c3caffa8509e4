"""Checking microllama's trainer against a training golden set (microllama.golden.training_set): the same steps on
the same batch through microllama.train.loop's own train_step, then every step's loss and gradient norm, each
parameter's first-step gradient norm and the final weights compared; bit for bit on the recording's
platform at world size 1, else within microllama.tolerances."""

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch

from ..checkpoint.load import Checkpoint, open_checkpoint
from ..tolerances import GRAD_RTOL, LOGITS_ATOL, PLATFORM_GRAD_RTOL, TRAINED_WEIGHTS_RTOL
from ..train.config import TrainConfig
from ..train.data import Batch
from ..train.loop import make_optimizer, select_trainable, train_step
from .capture import cpu_threads
from .schema import GoldenError
from .training_set import TrainingOutputs, TrainingSet, read_training_set
from .verify import check_recorded_checkpoint, checking_device, checkpoint_words, comparison_mode, recorded_checkpoint


@dataclass(frozen=True, kw_only=True)
class TrainingComparison:
    golden: TrainingSet
    ckpt_dir: Path
    checkpoint_matches: bool  # its tensors' sha256 is the recording's
    other_checkpoint: bool  # comparing another checkpoint than the recorded one is intended
    exact: bool
    across_platforms: bool  # the platform differs from the recording's: PLATFORM_GRAD_RTOL bounds the gradients
    mode: str
    ours: TrainingOutputs  # what microllama's trainer computed

    @property
    def loss_atol(self) -> float:
        return LOGITS_ATOL[self.golden.manifest.torch_dtype]

    @property
    def grad_rtol(self) -> float:
        """The bound on gradient norms: relative to the step's norm, or for first-step ones to the largest."""
        return (PLATFORM_GRAD_RTOL if self.across_platforms else GRAD_RTOL)[self.golden.manifest.torch_dtype]

    @property
    def weights_rtol(self) -> float:
        return TRAINED_WEIGHTS_RTOL[self.golden.manifest.torch_dtype]

    def loss_error(self, i: int) -> float:
        return abs(self.ours.losses[i] - self.golden.outputs.losses[i])

    def grad_norm_error(self, i: int) -> float:
        """Step i's gradient norm, relative to the recorded one."""
        return abs(self.ours.grad_norms[i] - self.golden.outputs.grad_norms[i]) / self.golden.outputs.grad_norms[i]

    def first_gradient_error(self, i: int) -> float:
        """Parameter i's first-step gradient norm, relative to the largest recorded one (see GRAD_RTOL)."""
        o, g = self.ours.first_step_grad_norms, self.golden.outputs.first_step_grad_norms
        return abs(o[i] - g[i]) / max(g)

    def final_weight_error(self, i: int) -> float:
        o, g = self.ours.final_weight_norms, self.golden.outputs.final_weight_norms
        return abs(o[i] - g[i]) / g[i]

    def step_diverges(self, i: int) -> bool:
        o, g = self.ours, self.golden.outputs
        if self.exact:
            return o.losses[i] != g.losses[i] or o.grad_norms[i] != g.grad_norms[i]
        return self.loss_error(i) > self.loss_atol or self.grad_norm_error(i) > self.grad_rtol

    def _gradient_diverges(self, i: int) -> bool:
        """Parameter i's first-step gradient norm is off."""
        if self.exact:
            return self.ours.first_step_grad_norms[i] != self.golden.outputs.first_step_grad_norms[i]
        return self.first_gradient_error(i) > self.grad_rtol

    def _final_weight_diverges(self, i: int) -> bool:
        if self.exact:
            return self.ours.final_parameter_sha256[i] != self.golden.outputs.final_parameter_sha256[i]
        return self.final_weight_error(i) > self.weights_rtol

    @property
    def first_divergent_step(self) -> Optional[int]:
        return next((i + 1 for i in range(len(self.ours.losses)) if self.step_diverges(i)), None)

    def _first_parameter(self) -> tuple[Optional[str], str]:
        """The first parameter (model order) whose first-step gradient is off, else whose final weight is (once one
        step diverges every later weight does, so the gradients name the origin), and which of the two."""
        names = self.golden.manifest.parameters
        for diverges, what in ((self._gradient_diverges, "first-step gradient"),
                               (self._final_weight_diverges, "final weight")):  # fmt: skip
            first = next((name for i, name in enumerate(names) if diverges(i)), None)
            if first is not None:
                return first, what
        return None, ""

    @property
    def first_divergent_parameter(self) -> Optional[str]:
        return self._first_parameter()[0]

    @property
    def failure(self) -> Optional[str]:
        step, (parameter, what) = self.first_divergent_step, self._first_parameter()
        if step is not None:
            where = f"first at step {step}" + ("" if parameter is None else f", parameter {parameter}")
            return f"microllama's trainer diverges from the recording, {where}"
        if parameter is not None:
            return (f"microllama's trainer diverges from the recording at the {what} of {parameter} (every step's "
                    "loss and gradient norm agree)")  # fmt: skip
        if self.exact and self.ours.final_sha256 != self.golden.outputs.final_sha256:
            return "the final weights' sha256 differs"
        return None

    @property
    def passed(self) -> bool:
        return self.failure is None


def train_on_golden_batch(golden: TrainingSet, checkpoint: Checkpoint, device: torch.device) -> TrainingOutputs:
    """Full fine-tune of the checkpoint's weights with the set's optimizer settings and learning rates, through
    microllama.train.loop's select_trainable, make_optimizer and train_step."""
    m = golden.manifest
    opt = m.optimization
    cfg = TrainConfig(data="-", mode="full", beta1=opt.betas[0], beta2=opt.betas[1], weight_decay=opt.weight_decay,
                      grad_clip=opt.grad_clip, max_steps=len(opt.lrs))  # fmt: skip
    if opt.eps != 1e-8:
        raise GoldenError(f"{golden.path}: AdamW eps {opt.eps}; microllama's trainer uses 1e-8")
    model = checkpoint.load_model(m.model.max_seq_len, m.model.max_batch_size, device, m.torch_dtype).train()
    params = select_trainable(model, cfg)
    optimizer = make_optimizer(params, cfg, device)
    tokens, targets = (torch.from_numpy(a).long().to(device) for a in (golden.tokens, golden.targets))
    batch = Batch(tokens, targets, None)
    first: list[float] = []

    def keep_first_gradients() -> None:
        if not first:
            # sqrt of the sum of squares, as the recorder sums the squares of a gradient's shards over the ranks
            first.extend(p.grad.float().pow(2).sum().sqrt().item() for p in model.parameters())

    losses, grad_norms = [], []
    for lr in opt.lrs:
        loss, grad_norm = train_step(model, params, optimizer, [batch], lr, cfg, keep_first_gradients)
        losses.append(loss)
        grad_norms.append(grad_norm)
    weights = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return TrainingOutputs.from_run(losses, grad_norms, first, weights)


def verify_training(
    golden_dir: Union[str, Path],
    ckpt_dir: Optional[Union[str, Path, Checkpoint]] = None,
    device: Optional[Union[str, torch.device]] = None,
    other_checkpoint: bool = False,
) -> TrainingComparison:
    """Run microllama's trainer on a training set's batch and compare (see the module's docstring). A checkpoint
    other than the recorded one is refused before any step unless other_checkpoint."""
    golden = read_training_set(golden_dir)
    m = golden.manifest
    ckpt = open_checkpoint(ckpt_dir if ckpt_dir is not None else recorded_checkpoint(golden))
    sha256 = ckpt.sha256()
    check_recorded_checkpoint(golden, ckpt, sha256, other_checkpoint)
    device = checking_device(m.device, device)
    with cpu_threads(m.platform.threads if device.type == "cpu" else None):  # the count splits CPU sums
        check = comparison_mode(golden, device)
        ours = train_on_golden_batch(golden, ckpt, device)
    return TrainingComparison(golden=golden, ckpt_dir=ckpt.dir, checkpoint_matches=sha256 == m.checkpoint.sha256,
                              other_checkpoint=other_checkpoint, exact=check.exact,
                              across_platforms=check.across_platforms, mode=check.line, ours=ours)  # fmt: skip


def format_training_comparison(c: TrainingComparison) -> str:
    """The per-step table and the verdict that `microllama verify` prints for a training set: each error beside
    its bound where the check is within tolerance."""
    m, g, o = c.golden.manifest, c.golden.outputs, c.ours
    opt = m.optimization
    checkpoint = m.checkpoint.tiny or m.checkpoint.dir
    bounds = ("bounds: none, bit for bit" if c.exact else
              f"bounds: losses within {c.loss_atol:.3g} (absolute); gradient norms within {c.grad_rtol:.3g} (relative "
              f"to the step's, first-step ones to the largest); final weight norms within {c.weights_rtol:.3g} "
              "(relative)")  # fmt: skip
    lines = [
        f"training golden set {c.golden.path}: {checkpoint}, {m.dtype}, {m.device}, world size {m.world_size}, "
        f"{len(opt.lrs)} steps of {opt.optimizer} on a batch of {c.golden.tokens.shape[0]} x "
        f"{c.golden.tokens.shape[1]} tokens, recorded with torch {m.versions.torch} ({m.platform.cpu_capability})",
        f"checkpoint {c.ckpt_dir}: {checkpoint_words(c.checkpoint_matches, c.other_checkpoint)}",
        f"check: {c.mode}",
        bounds,
        "",
        f"{'step':>4} {'lr':>9} {'recorded loss':>15} {'microllama loss':>15} {'abs err':>10} {'grad norm rel err':>17}"
        "  status",
    ]
    for i, lr in enumerate(opt.lrs):
        status = "DIVERGES" if c.step_diverges(i) else "ok"
        lines.append(f"{i + 1:>4} {lr:>9.3g} {g.losses[i]:>15.8g} {o.losses[i]:>15.8g} {c.loss_error(i):>10.3g} "
                     f"{c.grad_norm_error(i):>17.3g}  {status}")  # fmt: skip
    n = len(m.parameters)
    equal_norms = sum(a == b for a, b in zip(o.first_step_grad_norms, g.first_step_grad_norms, strict=True))
    equal_final = sum(a == b for a, b in zip(o.final_parameter_sha256, g.final_parameter_sha256, strict=True))
    how = "bit-exact" if c.exact else "within tolerance"
    worst_gradient = max(c.first_gradient_error(i) for i in range(n))
    worst_weight = max(c.final_weight_error(i) for i in range(n))

    def within(bound: float) -> str:
        return "" if c.exact else f"; bound {bound:.3g}"

    lines += [
        "",
        f"first-step gradient norms: {equal_norms}/{n} parameters bit-identical (max err {worst_gradient:.3g} of the "
        f"largest{within(c.grad_rtol)})",
        f"final weights: {equal_final}/{n} parameters bit-identical (max rel err of their norms {worst_weight:.3g}"
        f"{within(c.weights_rtol)}); sha256 of all {'equal' if o.final_sha256 == g.final_sha256 else 'differs'}",
        f"first divergent step: {c.first_divergent_step or 'none'}; first divergent parameter: "
        f"{c.first_divergent_parameter or 'none'}",
        f"verdict: FAIL: {c.failure}" if c.failure else f"verdict: pass ({how})",
    ]
    return "\n".join(lines)
