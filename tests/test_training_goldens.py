"""microllama's trainer against the committed training goldens (a short full fine-tune of Meta's reference
model, recorded by reference_harness/record_training.py), and the laws of their format: reads verified
against the manifest, byte-deterministic writes, divergence named by step and parameter."""

import dataclasses
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import platform_differs, recording_platform, run_main

from microllama.cli import main as cli_main
from microllama.golden import training_set as golden_format
from microllama.golden import verify_training
from microllama.golden.loss_curve import (
    RECIPE,
    compare,
    max_relative_difference,
    read_golden,
    recipe_config_fields,
    record_curve,
)
from microllama.golden.schema import GoldenError
from microllama.golden.training_set import read_training_set, write_training_set
from microllama.tolerances import LOGITS_ATOL, LOSS_CURVE_PLATFORM_RTOL
from microllama.train.config import TrainConfig
from microllama.train.loop import make_optimizer as trainers_optimizer
from microllama.train.loop import select_trainable, train

REPO = Path(__file__).resolve().parents[1]
GOLDENS = REPO / "goldens"
COMMITTED = ["train-tiny-fp32-cpu-ws1", "train-tiny-bf16-cpu-ws1", "train-tiny-fp32-cpu-ws2",
             "train-tiny-bf16-cpu-ws2"]  # fmt: skip

pytestmark = pytest.mark.usefixtures("tiny_ckpt")


def test_committed_training_sets_are_all_present_and_are_all_the_training_sets():
    assert sorted(p.name for p in GOLDENS.iterdir() if golden_format.is_training_set(p)) == sorted(COMMITTED)


@pytest.mark.parametrize(
    ("name", "platform"),
    [pytest.param(name, "native", marks=pytest.mark.golden) for name in COMMITTED]
    + [("train-tiny-fp32-cpu-ws1", "foreign")],
)
def test_microllamas_trainer_reproduces_metas_fine_tune(name, platform, request):
    """Bit for bit at world size 1 on the recording's platform (every loss and gradient norm, every final
    weight's sha256); at world size 2 (Meta's row-parallel sums) and on another platform (checked here too as if
    foreign) within tolerances.py's bounds, which the report prints beside each error."""
    if platform == "foreign":
        request.getfixturevalue("foreign_platform")
    c = verify_training.verify_training(GOLDENS / name)
    report = verify_training.format_training_comparison(c)
    assert c.checkpoint_matches and c.passed, report
    m = c.golden.manifest
    assert c.exact == (platform == "native" and recording_platform(m)), report
    assert c.across_platforms == (platform == "foreign" or platform_differs(m))
    if m.world_size > 1:
        assert c.ours.final_sha256 != c.golden.outputs.final_sha256
    if c.exact:
        assert c.ours.losses == c.golden.outputs.losses and c.ours.grad_norms == c.golden.outputs.grad_norms
        assert c.ours.final_parameter_sha256 == c.golden.outputs.final_parameter_sha256
        assert c.ours.final_sha256 == c.golden.outputs.final_sha256
        assert "bounds: none, bit for bit" in report
    else:
        assert f"bound {c.grad_rtol:.3g})" in report and f"losses within {c.loss_atol:.3g}" in report
    assert c.golden.outputs.losses[-1] < c.golden.outputs.losses[0]  # the steps do train


@pytest.mark.parametrize("name", COMMITTED)
def test_committed_training_set_rewritten_from_its_parsed_values_is_byte_identical(name, tmp_path):
    g = read_training_set(GOLDENS / name)
    out = write_training_set(tmp_path / name, g.manifest, g.outputs, g.tokens, g.targets)
    for file in [*golden_format.TRAINING_DATA_FILES, "manifest.json"]:
        assert (out / file).read_bytes() == (GOLDENS / name / file).read_bytes(), file


def test_write_training_set_never_replaces_a_file_or_a_directory_that_is_not_a_training_set(tmp_path):
    g = read_training_set(GOLDENS / "train-tiny-fp32-cpu-ws1")
    user_file, user_dir, golden_set = tmp_path / "notes.txt", tmp_path / "mine", GOLDENS / "tiny-fp32-cpu-ws1"
    user_file.write_text("keep me")
    user_dir.mkdir()
    (user_dir / "thesis.tex").write_text("keep me too")
    before = {p: p.read_bytes() for p in [user_file, *user_dir.iterdir(), *golden_set.iterdir()]}
    for target in (user_file, user_dir, golden_set):
        with pytest.raises(GoldenError, match="a training set is written only to a new path, an empty directory, or"):
            write_training_set(target, g.manifest, g.outputs, g.tokens, g.targets)
    assert {p: p.read_bytes() for p in before} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "notes.txt"]


def test_verify_of_a_training_set_on_another_checkpoint_fails_at_once_in_one_line_naming_the_flag(
    planted_ckpt, capsys, no_model
):
    """As for a golden set: refused before any model is built or step taken, in the same words."""
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["verify", str(GOLDENS / "train-tiny-fp32-cpu-ws1"), "--ckpt_dir", str(planted_ckpt)])
    assert exit_info.value.code == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert re.fullmatch(
        rf"microllama: error: {re.escape(str(planted_ckpt))} is not the checkpoint "
        rf"{re.escape(str(GOLDENS))}/train-tiny-fp32-cpu-ws1 was recorded from "
        r"\(sha256 \w{12}\.\.\., recorded \w{12}\.\.\.\): pass --other_checkpoint to compare it on purpose\n",
        captured.err,
    )


@pytest.mark.slow
def test_verify_of_a_training_set_on_another_checkpoint_on_purpose_trains_and_reports_it(planted_ckpt, capsys):
    """--other_checkpoint: the steps run and the report says so; the doubled norm weight changes every gradient
    from step 1 on (the first parameter in model order is the embedding)."""
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["verify", str(GOLDENS / "train-tiny-fp32-cpu-ws1"), "--ckpt_dir", str(planted_ckpt),
                  "--other_checkpoint"])  # fmt: skip
    assert exit_info.value.code == 1
    out = capsys.readouterr().out
    assert f"checkpoint {planted_ckpt}: sha256 DIFFERS from the recording (compared on purpose)\n" in out
    assert out.endswith("verdict: FAIL: microllama's trainer diverges from the recording, first at step 1, "
                        "parameter tok_embeddings.weight\n"), out  # fmt: skip


@pytest.fixture
def training_copy(tmp_path):
    return Path(shutil.copytree(GOLDENS / "train-tiny-fp32-cpu-ws1", tmp_path / "set"))


@pytest.mark.parametrize("file", ["training.json", "batch.npz"])
def test_tampered_training_file_fails_naming_file_and_sha256(training_copy, file):
    data = bytearray((training_copy / file).read_bytes())
    data[len(data) // 2] ^= 0x01
    (training_copy / file).write_bytes(bytes(data))
    with pytest.raises(GoldenError, match=rf"{file}: sha256 mismatch"):
        read_training_set(training_copy)


@pytest.mark.parametrize(
    ("edit", "message"),
    [(lambda m: m["optimization"].update(lrs="fast"), r"optimization\.lrs: expected a list"),
     (lambda m: m.update(extra=1), r"extra: not a field of this format"),
     (lambda m: m.update(parameters=m["parameters"][1:]), r"parameters: expected the 21 parameters"),
     (lambda m: m["optimization"].pop("grad_clip"), r"optimization\.grad_clip: missing")],
)  # fmt: skip
def test_training_manifest_it_does_not_describe_is_refused(training_copy, edit, message):
    manifest = json.loads((training_copy / "manifest.json").read_text())
    edit(manifest)
    (training_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(GoldenError, match=message):
        read_training_set(training_copy)


@pytest.mark.golden
def test_a_planted_slip_is_named_by_its_first_step_and_parameter(monkeypatch):
    """A backward slip in one layer (w2 of block 1 gets twice its gradient): step 1's loss is still Meta's, its
    gradient norm is not, and the parameter named is that one."""

    def selecting_with_a_slip(model, cfg):
        params = select_trainable(model, cfg)
        model.layers[1].feed_forward.w2.weight.register_hook(lambda grad: 2 * grad)
        return params

    monkeypatch.setattr(verify_training, "select_trainable", selecting_with_a_slip)
    c = verify_training.verify_training(GOLDENS / "train-tiny-fp32-cpu-ws1")
    assert c.ours.losses[0] == c.golden.outputs.losses[0] if c.exact else c.loss_error(0) <= c.loss_atol
    assert (c.first_divergent_step, c.first_divergent_parameter) == (1, "layers.1.feed_forward.w2.weight")
    assert "first at step 1, parameter layers.1.feed_forward.w2.weight" in c.failure


def test_final_weights_whose_sha256_differs_from_the_recording_fail_where_bit_exact(tmp_path):
    """On the recording's platform the sha256 of all the final weights is a check of its own: a set recording
    another one fails, naming it, though every loss, gradient norm and parameter's own sha256 agree."""
    g = read_training_set(GOLDENS / "train-tiny-fp32-cpu-ws1")
    outputs = dataclasses.replace(g.outputs, final_sha256="0" * 64)
    changed = write_training_set(tmp_path / "set", g.manifest, outputs, g.tokens, g.targets)
    c = verify_training.verify_training(changed)
    if c.exact:
        assert c.first_divergent_step is None and c.first_divergent_parameter is None
        assert not c.passed and c.failure == "the final weights' sha256 differs"
    else:  # another platform: the final weights are compared within tolerance, their sha256 is not asked
        assert c.passed


@pytest.mark.golden
def test_verify_command_checks_a_training_set(capsys):
    """The command's report in either branch. On the float32 set: the arithmetic is the same as the trainer test
    above; under an AVX2 CPU's kernels a bfloat16 set's 4 steps take 4x as long, for no other check of the report."""
    cli_main(["verify", str(GOLDENS / "train-tiny-fp32-cpu-ws1")])
    out = capsys.readouterr().out
    if recording_platform(read_training_set(GOLDENS / "train-tiny-fp32-cpu-ws1").manifest):
        assert "verdict: pass (bit-exact)" in out and "first-step gradient norms: 21/21 parameters bit-identical" in out
    else:
        atol = LOGITS_ATOL[torch.float32]
        assert "verdict: pass (within tolerance)" in out and f"\nbounds: losses within {atol:.3g} (absolute)" in out


def test_a_divergence_found_only_in_the_gradients_is_named_by_parameter_not_by_a_step(monkeypatch):
    """Every step's loss and gradient norm within bounds, one parameter's first-step gradient norm off by more:
    the verdict names that parameter and says no step diverges (no "step None")."""
    c = verify_training.verify_training(GOLDENS / "train-tiny-fp32-cpu-ws1")
    norms = list(c.ours.first_step_grad_norms)
    norms[3] += 2 * c.grad_rtol * max(c.golden.outputs.first_step_grad_norms)
    slipped = dataclasses.replace(c, exact=False, ours=dataclasses.replace(c.ours, first_step_grad_norms=norms))
    name = c.golden.manifest.parameters[3]
    assert slipped.first_divergent_step is None and slipped.first_divergent_parameter == name
    assert slipped.failure == (f"microllama's trainer diverges from the recording at the first-step gradient of "
                               f"{name} (every step's loss and gradient norm agree)")  # fmt: skip
    assert "step None" not in verify_training.format_training_comparison(slipped)


@pytest.mark.reference
@pytest.mark.slow
def test_recording_a_training_set_again_gives_the_committed_bytes(tmp_path, monkeypatch):
    from reference_harness.record_training import launch_training

    committed = GOLDENS / "train-tiny-fp32-cpu-ws1"
    # The recording's thread count (the harness takes OMP_NUM_THREADS; under pytest-xdist a worker's is 1).
    monkeypatch.setenv("OMP_NUM_THREADS", str(read_training_set(committed).manifest.platform.threads))
    out = launch_training(tmp_path / "set", None, "cpu", "float32", 1)
    if golden_format.read_training_set(out).manifest.platform != read_training_set(committed).manifest.platform:
        pytest.skip("recorded on another platform: bytes may differ")
    for file in [*golden_format.TRAINING_DATA_FILES, "manifest.json"]:
        assert (out / file).read_bytes() == (committed / file).read_bytes(), file


def test_optimizer_settings_of_the_recording_are_the_trainers():
    """The recorder builds torch's AdamW itself: its settings must be what microllama's make_optimizer makes."""
    m = read_training_set(GOLDENS / "train-tiny-fp32-cpu-ws1").manifest
    cfg = dataclasses.replace(verify_training.TrainConfig(data="-"), weight_decay=m.optimization.weight_decay)
    optimizer = trainers_optimizer([torch.nn.Parameter(torch.ones(2, 2))], cfg, torch.device("cpu"))
    assert optimizer.defaults["eps"] == m.optimization.eps and optimizer.defaults["fused"] is True
    assert m.optimization.optimizer == "torch.optim.AdamW(fused=True)"


def test_verify_all_checks_every_set_in_a_directory_and_fails_naming_the_sets_that_fail(tmp_path, capsys):
    """One row per set, one verdict: a damaged set is a failed row (its one-line reason first), the others are
    still checked, and the exit status is 1."""
    for name in ("train-tiny-fp32-cpu-ws1", "train-tiny-bf16-cpu-ws2"):
        shutil.copytree(GOLDENS / name, tmp_path / name)
    cli_main(["verify", str(tmp_path), "--all"])
    out = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.split() for line in out[1:3]}
    assert out[0].split()[:3] == ["set", "kind", "check"] and sorted(rows) == sorted(p.name for p in tmp_path.iterdir())
    assert all(row[1] == "training" and row[-1] == "pass" for row in rows.values())
    assert out[-1] == "verdict: pass (2 sets)"
    damaged = tmp_path / "train-tiny-bf16-cpu-ws2" / "batch.npz"
    damaged.write_bytes(damaged.read_bytes()[:100])
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["verify", str(tmp_path), "--all"])
    assert exit_info.value.code == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"golden set {tmp_path / 'train-tiny-bf16-cpu-ws2'}: " + out[-2].split(": ", 1)[1]  # its report
    header = next(i for i, line in enumerate(out) if line.startswith("set "))
    verdicts = {line.split()[0]: line.split()[-1] for line in out[header + 1 : header + 3]}
    assert verdicts == {"train-tiny-bf16-cpu-ws2": "FAIL", "train-tiny-fp32-cpu-ws1": "pass"}
    assert out[-1] == "verdict: FAIL: 1 of 2 sets (train-tiny-bf16-cpu-ws2)"
    assert any(line.startswith("train-tiny-bf16-cpu-ws2: ") and "batch.npz: sha256 mismatch" in line for line in out)


@pytest.mark.parametrize(
    ("args", "message"),
    [(["verify"], "verify needs GOLDEN_DIR (a golden or training set), or --all"),
     (["verify", "--all", "--compile"], "--compile is for one set"),
     (["verify", "/nonexistent/sets", "--all"], "/nonexistent/sets: not a directory of golden sets")],
)  # fmt: skip
def test_verify_refuses_what_it_cannot_do_in_one_line(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(args)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


# The loss-curve golden (microllama.golden.loss_curve): RECIPE's 20 steps in one process, and the comparer.
CURVE = GOLDENS / "losses" / "tiny-fp32-cpu-ws1.json"


@pytest.fixture(scope="module")
def recipe_run(tmp_path_factory, tokenizer):
    """The golden's recipe run once in one process, at the recording's thread count."""
    run_dir = tmp_path_factory.mktemp("curve") / "run"
    return record_curve(REPO, run_dir, read_golden(CURVE).platform.threads), run_dir


@pytest.mark.golden
@pytest.mark.slow
def test_one_process_reproduces_the_loss_curve_golden(recipe_run):
    """Bit for bit on the recording's platform (every loss and gradient norm of 20 steps), within
    LOSS_CURVE_PLATFORM_RTOL elsewhere (the AVX2 rerun checks that branch)."""
    golden, (curve, _) = read_golden(CURVE), recipe_run
    assert golden.recipe == RECIPE and len(golden.steps) == 20
    rtol = 0.0 if recording_platform(golden) else LOSS_CURVE_PLATFORM_RTOL
    assert compare(curve.steps, golden.steps, rtol) is None, max_relative_difference(curve.steps, golden.steps)
    if recording_platform(golden):
        assert curve.steps == golden.steps


@pytest.mark.slow
def test_compare_losses_names_the_first_step_a_planted_change_parts_at(recipe_run, tmp_path, capsys):
    """A run of the recipe at twice the learning rate (3 of its 20 steps): step 1's loss and gradient norm are
    computed before any update and agree; step 2 parts, named with exit status 1. A run against the golden (or the
    golden against itself) agrees, exit status 0."""
    _, run_dir = recipe_run
    planted = tmp_path / "planted"
    train(TrainConfig(**recipe_config_fields(RECIPE, REPO, planted, lr=2e-3, stop_at=3)))
    capsys.readouterr()  # the run's own lines
    status, out, _ = run_main(capsys, "compare-losses", str(planted), str(CURVE))
    assert status == 1 and out.startswith("A and B part at step 2: loss "), out
    cli_main(["compare-losses", str(run_dir / "metrics.jsonl"), str(CURVE)])  # returns: exit status 0
    assert capsys.readouterr().out.startswith("A and B agree over 20 steps within 1.53e-05 relative")
    cli_main(["compare-losses", str(CURVE), str(CURVE), "--rtol", "0"])
    assert capsys.readouterr().out == "A and B agree over 20 steps within 0 relative (largest difference 0)\n"


def test_compare_losses_refuses_what_is_not_a_curve_in_one_line(tmp_path, capsys):
    status, _, err = run_main(capsys, "compare-losses", str(tmp_path), str(CURVE))
    assert status == 1
    assert err == (f"microllama: error: {tmp_path}: neither a loss-curve golden (.json) nor a run directory with "
                   "metrics.jsonl\n")  # fmt: skip
