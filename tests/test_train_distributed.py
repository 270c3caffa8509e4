"""Data-parallel training (microllama/distributed.py) against one process: DDP and FSDP2 at world size 2, started
by torchrun on gloo (tests/train_worker.py, every run in one launch), give one process's losses on the same global
batch within microllama.tolerances.DATA_PARALLEL_RTOL and its final weights within DATA_PARALLEL_WEIGHTS_ATOL, in
every mode (full; lora with dropout, accumulation and activation checkpointing; norms with the chunked loss); an
FSDP2 run's torch.distributed.checkpoint save at world size 2 resumes in one process with the same losses, and a
one process's save resumes under FSDP2 at 2 ranks; the loss-curve golden's recipe at 2 ranks stays within
DATA_PARALLEL_CURVE_RTOL of the golden.

FSDP2 from the meta device (Checkpoint.load_sharded), checked in the same launch: each rank holds and reads only its
share of every tensor, for Meta's layout in one file and in two shards and for Hugging Face's safetensors; its loss
and gradient norm equal those of the old path (the whole model loaded, then fully_shard) bit for bit; a checkpoint
missing a shard is refused in one line before any weight is read.

The final export of an FSDP2 run, also from that launch: every rank writes its Meta shard (consolidated.0r.pth, r <
2) without the model gathered onto one rank, and the two shards read back (Llama.build, open_checkpoint) are the
trained model gathered, bit for bit (full, and lora merged), within DATA_PARALLEL_WEIGHTS_ATOL of one process's.

QLoRA under FSDP2, in the 2-rank launch, on tiny-hd128 (each of its NF4 weights splits over 2 ranks in whole
scaler blocks; tiny's, one scaler block each, are refused in one line before any weight is read): stopped after step 2
and resumed, its losses and merged export within the data-parallel tolerances of one process's, the layers without
adapters exported bit for bit, each rank holding exactly its share of the NF4 base, the DCP save without it.

2-D, FSDP2 x tensor parallelism (--tensor_parallel 2) at 4 gloo ranks as 2 x 2, in one launch before the 2-rank one:
tiny stopped after step 2 (its DCP save resumed under plain FSDP2 at 2 ranks, in the 2-rank launch, with one
process's next-step loss) and norms, within TENSOR_DATA_PARALLEL_RTOL / _WEIGHTS_ATOL of one process's; the
loss-curve recipe's first steps within DATA_PARALLEL_CURVE_RTOL of the golden, and the rest resumed by 2 FSDP2 ranks.
A second shape, tiny-kv4 (4 rows per step): FSDP2 at 4 ranks in every mode, and full at 2 x 2 with activation
checkpointing to its export (two Meta shards written by the first data rank's tensor ranks), within
DATA_PARALLEL_4_RANKS_RTOL of one process. Bad inputs are refused in one line before anything is written; so is a
sharded save that is not whole, on --resume."""

import importlib.util
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import HAVE_REFERENCE, platform_differs, run_torchrun

from microllama.checkpoint.hf_layout import INDEX, file_owners, hf_file_name, hf_name
from microllama.checkpoint.load import convert, open_checkpoint
from microllama.checkpoint.meta_layout import load_pth, shard_shape
from microllama.checkpoint.params import expected_shapes
from microllama.distributed.launch import leave_process_group, rank_device
from microllama.files import READS
from microllama.generation import Llama
from microllama.golden.loss_curve import RECIPE, compare, read_curve, read_golden, recipe_config_fields
from microllama.quantize import is_quantized_key, nf4_layout
from microllama.tolerances import (
    DATA_PARALLEL_4_RANKS_RTOL,
    DATA_PARALLEL_CURVE_RTOL,
    DATA_PARALLEL_RTOL,
    DATA_PARALLEL_WEIGHTS_ATOL,
    LOGITS_ATOL,
    LOSS_CURVE_PLATFORM_RTOL,
    TENSOR_DATA_PARALLEL_RTOL,
    TENSOR_DATA_PARALLEL_WEIGHTS_ATOL,
)
from microllama.train.config import TrainConfig
from microllama.train.loop import Trainer, train
from microllama.train.lora import merge_lora_state_dict
from microllama.train.run_dir import load_checkpoint, read_metrics

REPO = Path(__file__).resolve().parents[1]
# 3 steps of a global micro-batch of 2 rows of 32 tokens, one row per rank; held-out loss at the start and end.
RUN = dict(data=str(REPO / "corpus" / "tinytales.txt"), max_seq_len=32, batch_size=2, max_steps=3, warmup_steps=1,
           eval_every=0, eval_rows=1, save_every=0)  # fmt: skip
# The other modes, each with the switches that change how a step is computed: LoRA with dropout (each rank keeps its
# rows of the whole batch's masks), 2 micro-batches per step and activation checkpointing; norms with the chunked
# cross-entropy. Each is compared with the same settings in one process.
MODES = {"lora": dict(RUN, mode="lora", lora_rank=4, lora_dropout=0.1, lora_targets=["wq", "wv", "w2"], grad_accum=2,
                      activation_checkpointing=True),
         "norms": dict(RUN, mode="norms", loss_chunk=8)}  # fmt: skip
# QLoRA (an NF4 base, needs torchao) with lora's switches: under DDP on tiny; under FSDP2 on tiny-hd128, whose every
# NF4 weight splits over 2 ranks in whole blocks of second-level scales (tiny's 64 x 64 weights are one such block).
QLORA = dict(MODES["lora"], quantize="nf4")
QLORA_FSDP = dict(QLORA, ckpt_dir="tiny-hd128")
HAVE_TORCHAO = importlib.util.find_spec("torchao") is not None
CURVE_GOLDEN = REPO / "goldens" / "losses" / "tiny-fp32-cpu-ws1.json"
# 2-D: 2 data x 2 tensor-parallel ranks (tiny's 2 kv heads split over 2); the loss-curve recipe's first 10 of its 20
# steps there (stop_at: the learning-rate schedule is the recipe's), to fit the suite's time.
TWO_D = dict(distributed="fsdp", tensor_parallel=2)
CURVE_2D_STEPS = 10
# A second shape: tiny-kv4 (dim 128, 8 heads, 4 kv heads, 448 feed-forward features), a global micro-batch of 4 rows:
# FSDP2 over 4 ranks (one row each) in every mode, and 2-D at 2 x 2, against one process on the same batch.
KV4 = dict(RUN, ckpt_dir="tiny-kv4", batch_size=4)
KV4_MODES = {"full": KV4, "lora": dict(MODES["lora"], ckpt_dir="tiny-kv4", batch_size=4),
             "norms": dict(MODES["norms"], ckpt_dir="tiny-kv4", batch_size=4)}  # fmt: skip
pytestmark = [
    pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed"),
    pytest.mark.usefixtures("tokenizer"),
]


def steps(run_dir: Path) -> list[dict]:
    return [{k: m[k] for k in ("step", "loss", "grad_norm", "eval_loss") if k in m} for m in read_metrics(run_dir)]


def assert_close_runs(got: list[dict], expected: list[dict], rtol: float = DATA_PARALLEL_RTOL) -> None:
    assert [(m["step"], m.keys()) for m in got] == [(m["step"], m.keys()) for m in expected]
    for a, b in zip(got, expected, strict=True):
        for key in a.keys() - {"step"}:
            assert math.isclose(a[key], b[key], rel_tol=rtol, abs_tol=0), (a, b)


def max_weight_diff(a: Path, b: Path, file: str = "final") -> float:
    """Of the final weights (read as Llama.build reads them: one file or several shards), or of a .pth file."""
    read = (lambda d: open_checkpoint(d).read_state_dict()) if file == "final" else load_pth
    x, y = read(a / file), read(b / file)
    assert x.keys() == y.keys() and all(x[k].dtype == y[k].dtype == torch.float32 for k in x)
    return max(float((x[k] - y[k]).abs().max()) for k in x)


def torchrun(world_size: int, configs: list[dict], *loading_checks: str) -> None:
    """tests/train_worker.py on world_size gloo ranks of one thread each, training each config in turn (after the
    loading checks, given OUT and LOADS_JSON)."""
    run_torchrun(world_size, "train_worker.py", json.dumps(configs), *loading_checks)


def loading_spec(root: Path, tiny_ckpt: Path) -> dict:
    """The checkpoints the loading checks read: tiny in Meta's layout in one file and in two shards, in Hugging
    Face's; and, to be refused, the two-shard one without consolidated.01.pth."""
    convert(tiny_ckpt, root / "meta2", "meta", shards=2)
    convert(tiny_ckpt, root / "hf", "hf")
    (root / "missing").mkdir()
    for name in ("params.json", "consolidated.00.pth"):
        shutil.copyfile(root / "meta2" / name, root / "missing" / name)
    return {"layouts": {"meta1": str(tiny_ckpt), "meta2": str(root / "meta2"), "hf": str(root / "hf")},
            "refused": {"missing": str(root / "missing")}}  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_ckpt):
    """One process (full, its final weights in Hugging Face's layout; lora, norms; and full stopped after step 2); in
    one launch at 4 ranks: as 2 x 2 (2-D), full stopped after step 2 (DCP), norms (chunked loss; read from and
    exported in Hugging Face's layout), the loss-curve recipe's first CURVE_2D_STEPS steps; tiny-kv4 under FSDP2 in
    each mode and at 2 x 2 to the end with activation checkpointing (each also in one process); then in one launch
    at 2 ranks: the loading checks, DDP (3 steps), FSDP2 stopped after step
    2 (saved with DCP) and FSDP2 from step 0 to the end (its export), the stopped one-process run and the stopped
    2-D run resumed under FSDP2; lora and norms under DDP and FSDP2, lora under FSDP2 again exporting Hugging Face's
    layout; QLoRA under DDP, and under FSDP2 (tiny-hd128) stopped after step 2 then resumed; the loss-curve recipe
    under DDP and FSDP2; last, Meta's own code at 2 ranks reading lora's FSDP2 export. Then the stopped FSDP2 run
    resumed in one process."""
    root = tmp_path_factory.mktemp("dp")
    names = (
        "single",
        "ddp",
        "fsdp",
        "fsdp-to-the-end",
        "single-then-fsdp",
        "loads",
        "2d-then-fsdp",
        "norms-2d",
        "curve-2d",
    )
    dirs = {name: root / name for name in names}
    train(TrainConfig(out_dir=str(dirs["single"]), export="hf", **RUN))
    train(TrainConfig(out_dir=str(dirs["single-then-fsdp"]), stop_at=2, **RUN))
    layouts = loading_spec(root, tiny_ckpt)  # tiny in Meta's layout (1 and 2 files) and Hugging Face's
    four = [{**RUN, **TWO_D, "out_dir": str(dirs["2d-then-fsdp"]), "stop_at": 2},
            {**MODES["norms"], **TWO_D, "out_dir": str(dirs["norms-2d"]), "export": "hf",
             "ckpt_dir": layouts["layouts"]["hf"]},
            recipe_config_fields(RECIPE, REPO, dirs["curve-2d"], stop_at=CURVE_2D_STEPS, **TWO_D)]  # fmt: skip
    # tiny-kv4: one process, FSDP2 at 4 ranks; full at 2 x 2 too, with activation checkpointing, to the end (export)
    two_d = [("2d", {**TWO_D, "activation_checkpointing": True})]
    for mode, settings in KV4_MODES.items():
        for run, changes in ((f"kv4-{mode}-single", {}), (f"kv4-{mode}-fsdp4", {"distributed": "fsdp"}),
                             *(two_d if mode == "full" else [])):  # fmt: skip
            dirs[run] = root / run
            if changes:
                four.append({**settings, **changes, "out_dir": str(dirs[run])})
            else:
                train(TrainConfig(out_dir=str(dirs[run]), **settings))
    torchrun(4, four)
    dirs["2d-at-4"] = steps(dirs["2d-then-fsdp"])  # what the 2-D ranks logged before the resume
    dirs["curve-2d-at-4"] = read_curve(dirs["curve-2d"])  # resumed at 2 ranks below, to the recipe's end
    dirs["2d-saved"] = load_checkpoint(dirs["2d-then-fsdp"])[0]
    dirs["2d-saved-files"] = sorted(p.name for p in (dirs["2d-then-fsdp"] / "checkpoint" / "dcp").iterdir())
    dirs["loads"].mkdir()
    configs = [{**RUN, "out_dir": str(dirs["ddp"]), "distributed": "ddp"},
               {**RUN, "out_dir": str(dirs["fsdp"]), "distributed": "fsdp", "stop_at": 2},
               {**RUN, "out_dir": str(dirs["fsdp-to-the-end"]), "distributed": "fsdp"},
               {**RUN, "out_dir": str(dirs["single-then-fsdp"]), "distributed": "fsdp", "resume": True},
               {**RUN, "out_dir": str(dirs["2d-then-fsdp"]), "distributed": "fsdp", "resume": True}]  # fmt: skip
    for mode, settings in MODES.items():
        dirs[f"{mode}-single"] = root / f"{mode}-single"
        train(TrainConfig(out_dir=str(dirs[f"{mode}-single"]), **settings))
        for kind in ("ddp", "fsdp"):
            dirs[f"{mode}-{kind}"] = root / f"{mode}-{kind}"
            configs.append({**settings, "out_dir": str(dirs[f"{mode}-{kind}"]), "distributed": kind})
    dirs["lora-fsdp-hf"] = root / "lora-fsdp-hf"
    configs.append({**MODES["lora"], "out_dir": str(dirs["lora-fsdp-hf"]), "distributed": "fsdp", "export": "hf"})
    if HAVE_TORCHAO:
        dirs["qlora-single"], dirs["qlora-ddp"] = root / "qlora-single", root / "qlora-ddp"
        train(TrainConfig(out_dir=str(dirs["qlora-single"]), **QLORA))
        configs.append({**QLORA, "out_dir": str(dirs["qlora-ddp"]), "distributed": "ddp"})
        dirs["qlora-fsdp-single"], dirs["qlora-fsdp"] = root / "qlora-fsdp-single", root / "qlora-fsdp"
        train(TrainConfig(out_dir=str(dirs["qlora-fsdp-single"]), **QLORA_FSDP))
        qlora_fsdp = {**QLORA_FSDP, "out_dir": str(dirs["qlora-fsdp"]), "distributed": "fsdp"}
        configs += [{**qlora_fsdp, "stop_at": 2}, {**qlora_fsdp, "resume": True}]
    for kind in ("ddp", "fsdp"):
        dirs[f"curve-{kind}"] = root / f"curve-{kind}"
        configs.append(recipe_config_fields(RECIPE, REPO, dirs[f"curve-{kind}"], distributed=kind))
    # the recipe stopped at 2 x 2 after CURVE_2D_STEPS, resumed by 2 FSDP2 ranks to its end
    configs.append(recipe_config_fields(RECIPE, REPO, dirs["curve-2d"], distributed="fsdp", resume=True))
    meta_export = [str(dirs["lora-fsdp"] / "final")] if HAVE_REFERENCE else []  # read last by Meta's code at 2 ranks
    torchrun(2, configs, str(dirs["loads"]), json.dumps(layouts), *meta_export)
    dirs["seen"] = [json.loads((dirs["loads"] / f"rank{r}.json").read_text()) for r in range(2)]
    dirs["fsdp-at-2"] = steps(dirs["fsdp"])  # what the ranks logged before the resume
    dirs["saved"] = load_checkpoint(dirs["fsdp"])[0]
    dirs["saved_files"] = sorted(p.name for p in (dirs["fsdp"] / "checkpoint" / "dcp").iterdir())
    train(TrainConfig(out_dir=str(dirs["fsdp"]), resume=True, **RUN))  # one process, no torchrun
    return dirs


def test_ddp_at_world_size_2_gives_one_process_losses_and_weights(runs):
    assert_close_runs(steps(runs["ddp"]), steps(runs["single"]))
    assert max_weight_diff(runs["ddp"], runs["single"]) <= DATA_PARALLEL_WEIGHTS_ATOL
    # tokens_per_s is the job's (the global batch); each rank computes half of it
    lines = [m for m in read_metrics(runs["ddp"]) if "loss" in m]
    assert all(m["tokens_per_s_per_rank"] == pytest.approx(m["tokens_per_s"] / 2, abs=0.1) for m in lines)


def test_fsdp2_at_world_size_2_gives_one_process_losses(runs):
    single = steps(runs["single"])
    assert [m["step"] for m in runs["fsdp-at-2"]] == [0, 1, 2]
    assert_close_runs(runs["fsdp-at-2"], single[:3])


def test_fsdp2_dcp_save_at_world_size_2_resumes_in_one_process_with_the_same_losses(runs):
    """The DCP save (every rank's shard) is read into one unsharded model and AdamW: step 3 and the final
    held-out loss are one process's, and so are the exported weights."""
    assert runs["saved"].step == 2 and runs["saved"].dcp is not None and runs["saved"].weights == {}
    assert runs["saved_files"] == [".metadata", "__0_0.distcp", "__1_0.distcp"]  # one file per rank
    assert_close_runs(steps(runs["fsdp"]), steps(runs["single"]))
    assert max_weight_diff(runs["fsdp"], runs["single"]) <= DATA_PARALLEL_WEIGHTS_ATOL


def test_a_one_process_save_resumes_under_fsdp2_at_world_size_2_with_the_same_next_step_loss(runs):
    """state.pth's whole weights and AdamW state go to the ranks' shards (set_state_dict, full state dicts): step 3
    and the final held-out loss are one process's within DATA_PARALLEL_RTOL (steps 1 and 2 are its own)."""
    resumed, single = steps(runs["single-then-fsdp"]), steps(runs["single"])
    assert resumed[:3] == single[:3]  # the one-process steps, before the resume
    assert_close_runs(resumed, single)
    assert max_weight_diff(runs["single-then-fsdp"], runs["single"]) <= DATA_PARALLEL_WEIGHTS_ATOL


def test_fsdp2_run_to_the_end_at_world_size_2_exports_one_process_weights_in_two_shards(runs):
    """Each rank writes its Meta shard of the weights; rank 0 the small files."""
    assert_close_runs(steps(runs["fsdp-to-the-end"]), steps(runs["single"]))
    assert max_weight_diff(runs["fsdp-to-the-end"], runs["single"]) <= DATA_PARALLEL_WEIGHTS_ATOL
    assert sorted(p.name for p in (runs["fsdp-to-the-end"] / "final").iterdir()) == [
        "consolidated.00.pth", "consolidated.01.pth", "params.json", "train_config.json"
    ]  # fmt: skip


@pytest.mark.parametrize("damage", ["a rank's file missing", "a rank's file cut short", "metadata unreadable"])
def test_resuming_a_sharded_save_that_is_not_whole_is_refused_in_one_line_before_the_model_is_built(
    runs, tmp_path, damage, monkeypatch
):
    """DCP reads a whole save at any world size (the resumes above); a save it cannot read is refused when the
    checkpoint is opened, naming the file, before any weight is loaded or the run directory is written."""
    run = tmp_path / "run"
    shutil.copytree(runs["lora-fsdp"], run)
    saved = run / "checkpoint" / "dcp"
    if damage == "a rank's file missing":
        (saved / "__1_0.distcp").unlink()
        refused = r"is incomplete: __1_0\.distcp missing \(of the 2 files, one per rank that saved it"
    elif damage == "a rank's file cut short":
        data = (saved / "__0_0.distcp").read_bytes()
        (saved / "__0_0.distcp").write_bytes(data[: len(data) // 2])
        refused = rf"is incomplete: __0_0\.distcp holds {len(data) // 2:,} of its [\d,]+ bytes \(of the 2 files"
    else:
        (saved / ".metadata").write_bytes(b"not a pickle")
        refused = r": not a readable torch\.distributed\.checkpoint save \("
    before = sorted((p.relative_to(run), p.stat().st_mtime_ns) for p in run.rglob("*"))
    monkeypatch.setattr(Trainer, "build", lambda self: pytest.fail("the model was built"))
    with pytest.raises(ValueError, match=refused) as error:
        train(TrainConfig(out_dir=str(run), resume=True, **MODES["lora"]))
    assert len(str(error.value).splitlines()) == 1
    assert sorted((p.relative_to(run), p.stat().st_mtime_ns) for p in run.rglob("*")) == before


# The FSDP2 runs of the launch that run to max_steps: full (resumed from one process's save) and lora.
FSDP_TO_THE_END = {"full": "single-then-fsdp", "lora": "lora-fsdp"}
LORA_SCALE = TrainConfig.lora_alpha / MODES["lora"]["lora_rank"]


def trained_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The model a data-parallel run's last DCP save holds (saved at max_steps, beside the export), gathered here
    in one process, LoRA's adapters merged into their weights by merge_lora_state_dict."""
    import torch.distributed.checkpoint as dcp

    path = run_dir / "checkpoint" / "dcp"
    saved = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    weights = {k.removeprefix("model."): torch.empty(tuple(m.size), dtype=m.properties.dtype)
               for k, m in saved.items() if k.startswith("model.")}  # fmt: skip
    dcp.load({"model": weights}, checkpoint_id=path)
    return merge_lora_state_dict(weights, LORA_SCALE)


def assert_two_meta_shards_of_the_trained_model(run: Path, shapes: dict) -> tuple[Path, dict[str, torch.Tensor]]:
    """run's final export is 2 Meta shards, rank r's tensors split as fairscale splits them at 2 ranks, which read
    back as the trained model (its last DCP save, gathered) bit for bit. Returns the export and that model."""
    final = run / "final"
    assert sorted(p.name for p in final.iterdir()) == [
        "consolidated.00.pth", "consolidated.01.pth", "params.json", "train_config.json"
    ]  # fmt: skip
    for rank in range(2):
        shard = load_pth(final / f"consolidated.0{rank}.pth")
        assert {k: tuple(v.shape) for k, v in shard.items()} == {k: shard_shape(k, s, 2) for k, s in shapes.items()}
    exported, trained = open_checkpoint(final).read_state_dict(), trained_weights(run)
    assert exported.keys() == trained.keys() and all(torch.equal(exported[k], trained[k]) for k in exported)
    return final, trained


@pytest.mark.parametrize("mode", list(FSDP_TO_THE_END))
def test_fsdp2_final_export_is_each_ranks_meta_shard_and_reads_back_as_the_trained_model(runs, mode, tiny_ckpt):
    """Two Meta shards (rank r's tensors split as fairscale splits them at 2 ranks), which Llama.build reads back
    as the trained model gathered whole, bit for bit: weights (LoRA folded block by block equals folding whole
    tensors) and logits. Against one process: the tests above (DATA_PARALLEL_WEIGHTS_ATOL)."""
    run, shapes = runs[FSDP_TO_THE_END[mode]], expected_shapes(open_checkpoint(tiny_ckpt).args)
    final, trained = assert_two_meta_shards_of_the_trained_model(run, shapes)
    tokens = torch.randint(0, 128256, (1, 9), generator=torch.Generator().manual_seed(0))
    built = Llama.build(final, max_seq_len=16, max_batch_size=1).model(tokens)
    assert torch.equal(built, open_checkpoint(tiny_ckpt).load_model(16, 1, state_dict=trained)(tokens))


@pytest.mark.parametrize("mode", list(FSDP_TO_THE_END))
def test_no_rank_holds_the_whole_model_while_exporting(runs, mode, tiny_ckpt):
    """What each rank held at once (its Summary's export_held_bytes): its shard, the adapters (gathered whole) and
    one block in flight (DTensor.redistribute's output: a Meta shard of one tensor), less than the model."""
    run, shapes = runs[FSDP_TO_THE_END[mode]], expected_shapes(open_checkpoint(tiny_ckpt).args)
    model_bytes = 4 * sum(math.prod(s) for s in shapes.values())  # float32
    shard_bytes = 4 * sum(math.prod(shard_shape(k, s, 2)) for k, s in shapes.items())
    largest_block = 4 * max(math.prod(shard_shape(k, s, 2)) for k, s in shapes.items())
    adapter_bytes = sum(t.nbytes for t in load_pth(run / "adapters.pth").values()) if mode == "lora" else 0
    for rank in range(2):
        summary = json.loads((run / f"summary-rank{rank}.json").read_text())
        assert summary["final_shards"] == 2
        assert summary["export_held_bytes"] == shard_bytes + adapter_bytes + largest_block
        assert summary["export_held_bytes"] < 0.8 * model_bytes


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
@pytest.mark.parametrize("mode", list(MODES))
def test_lora_and_norms_at_world_size_2_give_one_process_losses_and_merged_weights(runs, mode, kind):
    """Losses, gradient norms and held-out losses of each step, the final weights (LoRA: merged, from the gathered
    state dict) and LoRA's adapters: one process's, within the data-parallel tolerances."""
    assert_close_runs(steps(runs[f"{mode}-{kind}"]), steps(runs[f"{mode}-single"]))
    assert max_weight_diff(runs[f"{mode}-{kind}"], runs[f"{mode}-single"]) <= DATA_PARALLEL_WEIGHTS_ATOL
    if mode == "lora":
        assert max_weight_diff(runs[f"{mode}-{kind}"], runs[f"{mode}-single"], "adapters.pth") <= (
            DATA_PARALLEL_WEIGHTS_ATOL
        )


@pytest.mark.skipif(not HAVE_TORCHAO, reason="needs torchao (the quant extra)")
def test_qlora_under_ddp_at_world_size_2_gives_one_process_losses_and_merged_weights(runs):
    """The NF4 base replicated (DDP leaves the frozen weights as each rank loaded them), the adapters trained."""
    assert_close_runs(steps(runs["qlora-ddp"]), steps(runs["qlora-single"]))
    assert max_weight_diff(runs["qlora-ddp"], runs["qlora-single"]) <= DATA_PARALLEL_WEIGHTS_ATOL
    assert max_weight_diff(runs["qlora-ddp"], runs["qlora-single"], "adapters.pth") <= DATA_PARALLEL_WEIGHTS_ATOL


@pytest.mark.skipif(not HAVE_TORCHAO, reason="needs torchao (the quant extra)")
def test_qlora_under_fsdp2_stopped_and_resumed_at_world_size_2_gives_one_process_losses_and_merged_weights(runs):
    """The NF4 base sharded (each rank its rows' codes and scales), the adapters trained and sharded as lora's; saved
    by DCP at step 2 and resumed under FSDP2. Losses, gradient norms, held-out losses, merged weights and adapters:
    one process's within the data-parallel tolerances; the layers without adapters (wk, wo, w1, w3: the NF4 base
    dequantized) bit for bit, each rank's rows having been quantized with the whole tensor."""
    run, single = runs["qlora-fsdp"], runs["qlora-fsdp-single"]
    assert [m["step"] for m in steps(run)] == [0, 1, 2, 3, 3]
    assert_close_runs(steps(run), steps(single))
    assert max_weight_diff(run, single) <= DATA_PARALLEL_WEIGHTS_ATOL
    assert max_weight_diff(run, single, "adapters.pth") <= DATA_PARALLEL_WEIGHTS_ATOL
    exported, expected = (open_checkpoint(d / "final").read_state_dict() for d in (run, single))
    frozen = [k for k in exported if k.split(".")[-2] in ("wk", "wo", "w1", "w3")]
    assert len(frozen) == 4 * 2 and all(torch.equal(exported[k], expected[k]) for k in frozen)


@pytest.mark.skipif(not HAVE_TORCHAO, reason="needs torchao (the quant extra)")
def test_each_fsdp2_rank_holds_its_share_of_the_nf4_base_and_dcp_saves_none_of_it(runs):
    """Summary.weight_bytes, each rank's parameters' local bytes: of every NF4 weight, half the codes (4 bits a
    weight), half the blocks' int8 absmaxes and half the scaler blocks' float32 scales, and the whole tensor's mean
    absmax and 16-entry table; of every other weight (adapters included), its torch.chunk rows in float32. The DCP
    save holds the adapters and the dense weights: the NF4 base is quantized again from the checkpoint on resume."""
    import torch.distributed.checkpoint as dcp

    shapes, r = expected_shapes(open_checkpoint(QLORA_FSDP["ckpt_dir"]).args), QLORA_FSDP["lora_rank"]
    adapters = {}  # A: (r, in), B: (out, r)
    for key, shape in shapes.items():
        if key.split(".")[-2] in QLORA_FSDP["lora_targets"]:
            adapters |= {key.replace("weight", "lora_a"): (r, shape[1]), key.replace("weight", "lora_b"): (shape[0], r)}
    for rank in range(2):
        share = 0
        for key, shape in {**shapes, **adapters}.items():
            if is_quantized_key(key):
                blocks, _, groups = nf4_layout(shape)
                share += math.prod(shape) // 2 // 2 + blocks // 2 + 4 * groups // 2 + 4 * (1 + 16)
            else:
                share += 4 * chunk_rows(shape[0], rank)[1] * math.prod(shape[1:])
        summary = json.loads((runs["qlora-fsdp"] / f"summary-rank{rank}.json").read_text())
        assert summary["weight_bytes"] == share
    saved = load_checkpoint(runs["qlora-fsdp"])[0]
    assert saved.step == 3 and saved.dcp is not None
    metadata = dcp.FileSystemReader(saved.dcp).read_metadata().state_dict_metadata
    model_keys = {k.removeprefix("model.") for k in metadata if k.startswith("model.")}
    assert model_keys == {k for k in shapes if not is_quantized_key(k)} | adapters.keys()


@pytest.mark.skipif(not HAVE_TORCHAO, reason="needs torchao (the quant extra)")
@pytest.mark.parametrize(
    ("ckpt", "world_size", "refused"),
    [
        ("tiny", "2", r"^--quantize nf4 cannot be sharded by --distributed fsdp over 2 ranks: layers\.0\.attention"
         r"\.wq\.weight \(64 x 64, \S+params\.json\) is 64 blocks of 64 weights in 1 scaler block of 64 absmaxes, "
         r"and each rank must hold whole scaler blocks of whole rows \(no world size above 1 splits all of this "
         r"model's: use --distributed ddp\)$"),
        ("tiny-hd128", "4", r"^--quantize nf4 cannot be sharded by --distributed fsdp over 4 ranks: layers\.0\."
         r"attention\.wk\.weight \(128 x 256, \S+params\.json\) is 512 blocks of 64 weights in 2 scaler blocks of "
         r"256 absmaxes, and each rank must hold whole scaler blocks of whole rows \(world sizes dividing 2 split all "
         r"of this model's: use one, or --distributed ddp\)$"),
    ],
)  # fmt: skip
def test_qlora_whose_nf4_weights_cannot_split_over_the_ranks_is_refused_in_one_line_before_any_weight_is_read(
    monkeypatch, tmp_path, ckpt, world_size, refused
):
    """As torchrun's rank 0 of world_size ranks would see it, from params.json's shapes alone: before the process
    group is joined, any weight read or anything written."""
    monkeypatch.setenv("WORLD_SIZE", world_size)
    monkeypatch.setenv("RANK", "0")
    before = READS.bytes
    with pytest.raises(ValueError, match=refused) as error:
        train(TrainConfig(out_dir=str(tmp_path / "run"), distributed="fsdp", **{**QLORA, "ckpt_dir": ckpt}))
    assert len(str(error.value).splitlines()) == 1 and READS.bytes == before
    assert not any(tmp_path.iterdir()) and not torch.distributed.is_initialized()


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_loss_curve_recipe_at_world_size_2_stays_within_tolerance_of_the_golden(runs, kind):
    """The golden was recorded in one process: 2 ranks add their gradients in another order, and on another
    platform than the recording's the kernels differ too."""
    golden = read_golden(CURVE_GOLDEN)
    rtol = DATA_PARALLEL_CURVE_RTOL + (LOSS_CURVE_PLATFORM_RTOL if platform_differs(golden) else 0)
    assert len(read_curve(runs[f"curve-{kind}"])) == len(golden.steps) == 20
    assert compare(read_curve(runs[f"curve-{kind}"]), golden.steps, rtol) is None


def test_a_batch_the_ranks_cannot_split_is_refused(monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ValueError, match="--batch_size 3 rows must split evenly over 2 ranks"):
        train(TrainConfig(out_dir=str(tmp_path / "b"), distributed="fsdp", **{**RUN, "batch_size": 3}))
    with pytest.raises(ValueError, match="launched by torchrun with 2 ranks: pass --distributed ddp or fsdp"):
        train(TrainConfig(out_dir=str(tmp_path / "c"), **RUN))
    assert not any(tmp_path.iterdir())


def chunk_rows(rows: int, rank: int) -> tuple[int, int]:
    """torch.chunk's split of dim 0, as FSDP2's Shard(0) makes it: (first row, row count) of rank."""
    size = math.ceil(rows / 2)
    first = min(rows, rank * size)
    return first, min(rows, first + size) - first


@pytest.mark.parametrize("layout", ["meta1", "meta2", "hf"])
def test_each_rank_holds_and_reads_only_its_rows_of_every_tensor(runs, layout, tiny_ckpt):
    """Local parameter elements: torch.chunk's share of every tensor, norms included (FSDP2 shards them too), and
    the ranks' shares make the model once. Bytes read from the files: exactly those rows in the stored dtype
    (bfloat16), plus, from two Meta shards, the norms compared whole in each (replicated there)."""
    shapes = expected_shapes(open_checkpoint(tiny_ckpt).args)
    norms = sum(math.prod(s) for k, s in shapes.items() if k.endswith("norm.weight"))
    total = 0
    for rank, ranks in enumerate(runs["seen"]):
        got = ranks["layouts"][layout]
        assert got["stored_dtype"] == "torch.bfloat16"
        share = 0
        for key, shape in shapes.items():
            first, rows = chunk_rows(shape[0], rank)
            assert (got["first_row"][key], got["local"][key]) == (first, [rows, *shape[1:]]), key
            share += rows * math.prod(shape[1:])
        replicated = 2 * norms if layout == "meta2" else 0  # shard 01's norms and shard 00's, compared
        assert got["read"] == 2 * (share + replicated)
        total += share
    assert total == sum(math.prod(s) for s in shapes.values())


@pytest.mark.parametrize("layout", ["meta1", "meta2", "hf"])
def test_meta_device_loading_gives_the_whole_load_paths_loss_and_gradients_bit_for_bit(runs, layout):
    """The same float32 values land in the same shards (compared with torch.equal), so one forward and backward
    of the same batch gives the same loss and gradient norm as loading the whole model and then sharding it."""
    for ranks in runs["seen"]:
        got = ranks["layouts"][layout]
        assert got["same_shards"]
        assert got["new"] == got["old"]
    assert len({ranks["layouts"][layout]["new"]["grad_norm"] for ranks in runs["seen"]}) == 1  # the whole gradient's


def test_a_checkpoint_missing_a_shard_is_refused_in_one_line_before_any_weight_is_read(runs):
    for ranks in runs["seen"]:
        refused = ranks["refused"]["missing"]
        missing = "consolidated.00.pth holds 1/2 of each split tensor: a checkpoint of 2 shards, 1 of them missing"
        assert refused["error"].startswith("CheckpointError: ") and refused["error"].endswith(missing)
        assert refused["lines"] == 1 and refused["read"] == 0


def test_2d_fsdp_x_tensor_parallel_at_2x2_gives_one_process_losses_and_weights(runs):
    """tiny-kv4 at 2 data x 2 tensor-parallel ranks (2 kv heads per tensor rank), activation checkpointing on (it
    recomputes each block's tensor-parallel collectives): losses, gradient norms and held-out losses of each step,
    and the final weights, against one process without it."""
    assert_close_runs(steps(runs["2d"]), steps(runs["kv4-full-single"]), DATA_PARALLEL_4_RANKS_RTOL)
    assert max_weight_diff(runs["2d"], runs["kv4-full-single"]) <= TENSOR_DATA_PARALLEL_WEIGHTS_ATOL
    lines = [m for m in read_metrics(runs["2d"]) if "loss" in m]  # the job's 4 rows per step, over its 4 ranks
    assert all(m["tokens_per_s_per_rank"] == pytest.approx(m["tokens_per_s"] / 4, abs=0.1) for m in lines)


def test_norms_at_2x2_give_one_process_losses_and_weights(runs):
    """The norms' weights (left whole by the tensor-parallel plan, split over the data ranks by FSDP2) train, the
    split weights frozen; the chunked loss on the gathered logits. Read from tiny in Hugging Face's layout (each
    rank its tensor-parallel slice, wq and wk by whole heads out of their RoPE order). Against one process with the
    same settings, from Meta's layout."""
    assert_close_runs(steps(runs["norms-2d"]), steps(runs["norms-single"]), TENSOR_DATA_PARALLEL_RTOL)
    assert max_weight_diff(runs["norms-2d"], runs["norms-single"]) <= TENSOR_DATA_PARALLEL_WEIGHTS_ATOL


def test_2d_final_export_is_two_meta_shards_of_the_trained_model_without_gathering_it(runs):
    """The tensor-parallel slices are Meta's split at 2: the first data rank's two tensor ranks write them (gathered
    over the data dim only), and they read back as the trained model (its last DCP save, gathered here) bit for
    bit. What each rank held at once: the first data rank's ranks their shard and one block in flight, the others
    that block alone."""
    run, shapes = runs["2d"], expected_shapes(open_checkpoint("tiny-kv4").args)
    assert_two_meta_shards_of_the_trained_model(run, shapes)
    model_bytes = 4 * sum(math.prod(s) for s in shapes.values())
    shard_bytes = 4 * sum(math.prod(shard_shape(k, s, 2)) for k, s in shapes.items())
    largest_block = 4 * max(math.prod(shard_shape(k, s, 2)) for k, s in shapes.items())
    for rank in range(4):  # ranks 0 and 1: data rank 0, tensor ranks 0 and 1
        summary = json.loads((run / f"summary-rank{rank}.json").read_text())
        assert summary["final_shards"] == 2
        assert summary["export_held_bytes"] == (shard_bytes if rank < 2 else 0) + largest_block < 0.8 * model_bytes


def test_2d_dcp_save_resumes_under_fsdp2_at_2_ranks_with_the_same_next_step_loss(runs):
    """Saved at step 2 by 4 ranks (2 x 2), read by 2 FSDP2 ranks (DCP reshards: mesh and world size differ): step 3
    and the final held-out loss are one process's within the 2-D bounds (steps 1 and 2 are the 2-D run's own)."""
    assert runs["2d-saved"].step == 2 and runs["2d-saved"].dcp is not None
    assert runs["2d-saved-files"] == [".metadata", "__0_0.distcp", "__1_0.distcp", "__2_0.distcp", "__3_0.distcp"]
    resumed, single = steps(runs["2d-then-fsdp"]), steps(runs["single"])
    assert [m["step"] for m in runs["2d-at-4"]] == [0, 1, 2] and resumed[:3] == runs["2d-at-4"]
    assert_close_runs(resumed, single, TENSOR_DATA_PARALLEL_RTOL)
    assert max_weight_diff(runs["2d-then-fsdp"], runs["single"]) <= TENSOR_DATA_PARALLEL_WEIGHTS_ATOL


def test_loss_curve_recipe_at_2x2_stays_within_tolerance_of_the_golden(runs):
    """The recipe's first CURVE_2D_STEPS steps (its learning-rate schedule, stopped there) against the golden's."""
    golden = read_golden(CURVE_GOLDEN)
    rtol = DATA_PARALLEL_CURVE_RTOL + (LOSS_CURVE_PLATFORM_RTOL if platform_differs(golden) else 0)
    curve = runs["curve-2d-at-4"]
    assert [s.step for s in curve] == list(range(1, CURVE_2D_STEPS + 1))
    assert compare(curve, golden.steps[:CURVE_2D_STEPS], rtol) is None


def test_loss_curve_recipe_stopped_at_2x2_and_resumed_by_2_fsdp2_ranks_stays_within_tolerance_of_the_golden(runs):
    """Stop and resume at another world size and mesh: the recipe's first CURVE_2D_STEPS steps at 2 x 2, saved
    (DCP, 4 files), the rest by 2 FSDP2 ranks; all 20 steps against the golden recorded in one process, the bound
    of the data-parallel curves (the steps before the resume are the 2-D run's own)."""
    golden = read_golden(CURVE_GOLDEN)
    rtol = DATA_PARALLEL_CURVE_RTOL + (LOSS_CURVE_PLATFORM_RTOL if platform_differs(golden) else 0)
    curve = read_curve(runs["curve-2d"])
    assert [s.step for s in curve] == list(range(1, 21)) and curve[:CURVE_2D_STEPS] == runs["curve-2d-at-4"]
    assert compare(curve, golden.steps, rtol) is None


@pytest.mark.parametrize("mode", list(KV4_MODES))
def test_fsdp2_at_4_ranks_on_a_second_shape_gives_one_process_losses_and_weights(runs, mode):
    """tiny-kv4 (other widths than tiny's: dim 128, 8 heads of which 4 kv heads, 448 feed-forward features) at 4
    FSDP2 ranks, one row each: every mode's losses, gradient norms and final weights against one process."""
    assert_close_runs(steps(runs[f"kv4-{mode}-fsdp4"]), steps(runs[f"kv4-{mode}-single"]), DATA_PARALLEL_4_RANKS_RTOL)
    assert max_weight_diff(runs[f"kv4-{mode}-fsdp4"], runs[f"kv4-{mode}-single"]) <= DATA_PARALLEL_WEIGHTS_ATOL


@pytest.mark.parametrize(
    ("settings", "world_size", "refused"),
    [
        (dict(tensor_parallel=2, distributed="ddp"), "4", r"^--tensor_parallel 2 trains on a 2-D mesh, FSDP2 over the "
         r"data ranks: pass --distributed fsdp \(got --distributed ddp\)$"),
        (dict(tensor_parallel=2, distributed="fsdp", mode="lora"), "4", r"^--tensor_parallel 2 trains --mode full "
         r"or norms, got --mode lora \(its adapters have no tensor-parallel plan yet\): use --distributed fsdp "
         r"without --tensor_parallel$"),
        (dict(tensor_parallel=0, distributed="fsdp"), "4", r"^--tensor_parallel must be at least 1, got 0$"),
        (dict(tensor_parallel=2, distributed="fsdp"), None, r"^--tensor_parallel 2 runs one process per rank under "
         r"torchrun: torchrun --nproc_per_node N -m microllama train \.\.\. --distributed fsdp --tensor_parallel 2, "
         r"N a multiple of 2$"),
        (dict(tensor_parallel=3, distributed="fsdp"), "4", r"^--tensor_parallel 3 must divide the world size 4: the "
         r"ranks form a mesh of data x 3 tensor-parallel ranks$"),
        (dict(tensor_parallel=4, distributed="fsdp"), "4", r"^tensor parallelism over 4 ranks splits the heads, the "
         r"feed-forward and the vocabulary into 4 equal blocks, but \S+params\.json has n_kv_heads 2: use a "
         r"--tensor_parallel that divides n_heads 4 and n_kv_heads 2$"),
        (dict(tensor_parallel=2, distributed="fsdp", batch_size=3), "4", r"^--batch_size 3 rows must split evenly "
         r"over 2 data-parallel ranks \(4 ranks / --tensor_parallel 2\)$"),
    ],
)  # fmt: skip
def test_a_2d_run_that_cannot_work_is_refused_in_one_line_before_anything_is_written(
    monkeypatch, tmp_path, settings, world_size, refused
):
    """In this process, as torchrun's rank 0 of world_size ranks would see it (None: not under torchrun): the
    refusal comes before the process group is joined."""
    if world_size is not None:
        monkeypatch.setenv("WORLD_SIZE", world_size)
        monkeypatch.setenv("RANK", "0")
    else:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
        monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(ValueError, match=refused) as error:
        train(TrainConfig(out_dir=str(tmp_path / "run"), **{**RUN, **settings}))
    assert len(str(error.value).splitlines()) == 1
    assert not any(tmp_path.iterdir()) and not torch.distributed.is_initialized()


def test_one_process_hf_export_is_one_safetensors_file_of_its_trained_weights(runs):
    """--export hf in one process: config.json and model.safetensors (save_hf, as convert writes), read back as
    the weights its last checkpoint holds, bit for bit; against the ranks' Meta exports: the tests above."""
    final = runs["single"] / "final"
    assert sorted(p.name for p in final.iterdir()) == ["config.json", "model.safetensors", "train_config.json"]
    exported, trained = open_checkpoint(final).read_state_dict(), load_checkpoint(runs["single"])[0].weights
    assert exported.keys() == trained.keys() and all(torch.equal(exported[k], trained[k]) for k in exported)


# FSDP2 runs exporting Hugging Face's layout: run -> world size (lora at 2 ranks, norms at 2 x 2).
HF_EXPORTS = {"lora-fsdp-hf": 2, "norms-2d": 4}


@pytest.mark.parametrize("run", list(HF_EXPORTS))
def test_fsdp2_hf_export_is_a_safetensors_file_per_rank_with_an_index_and_reads_back_as_the_trained_model(
    runs, run, tiny_ckpt
):
    """Each tensor whole in one rank's file (hf_layout.file_owners), gathered whole in turn and kept by its owner
    only (LoRA folded in); rank 0 writes config.json and the index. Read back (open_checkpoint, through the index)
    it is the trained model gathered from the last DCP save, bit for bit. What each rank held at once: its own
    tensors, the adapters and the largest tensor in flight (on the tiny checkpoint that is most of the model: its
    embedding and output are 99% of it)."""
    world, shapes = HF_EXPORTS[run], expected_shapes(open_checkpoint(tiny_ckpt).args)
    final, files = runs[run] / "final", [hf_file_name(i, HF_EXPORTS[run]) for i in range(HF_EXPORTS[run])]
    assert sorted(p.name for p in final.iterdir()) == sorted(["config.json", INDEX, "train_config.json", *files])
    owners = file_owners(shapes, world)
    index = json.loads((final / INDEX).read_text())
    assert index["weight_map"] == {hf_name(k): files[owners[k]] for k in shapes}
    assert index["metadata"]["total_size"] == 4 * sum(math.prod(s) for s in shapes.values())  # float32
    exported, trained = open_checkpoint(final).read_state_dict(), trained_weights(runs[run])
    assert exported.keys() == trained.keys() and all(torch.equal(exported[k], trained[k]) for k in exported)
    adapter_bytes = sum(t.nbytes for t in load_pth(runs[run] / "adapters.pth").values()) if "lora" in run else 0
    for rank in range(world):
        summary = json.loads((runs[run] / f"summary-rank{rank}.json").read_text())
        own = 4 * sum(math.prod(s) for k, s in shapes.items() if owners[k] == rank)
        assert summary["final_shards"] == world
        assert summary["export_held_bytes"] == own + adapter_bytes + 4 * max(math.prod(s) for s in shapes.values())
    if "lora" in run:
        assert max_weight_diff(runs[run], runs["lora-single"]) <= DATA_PARALLEL_WEIGHTS_ATOL


def test_under_torchrun_a_bare_cuda_device_is_each_ranks_own_gpu(monkeypatch):
    """Training and tensor-parallel inference take their device from rank_device: on a machine of 8 GPUs rank r of
    `--device cuda` trains on cuda:LOCAL_RANK (made current, as nccl needs), not all 8 on cuda:0."""
    made_current = []
    monkeypatch.setattr(torch.cuda, "set_device", made_current.append)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert rank_device("cuda") == torch.device("cuda", 3) and made_current == [torch.device("cuda", 3)]
    assert rank_device("cuda:1") == torch.device("cuda", 1) and rank_device("cpu") == torch.device("cpu")
    monkeypatch.delenv("LOCAL_RANK")
    assert rank_device("cuda") == torch.device("cuda") and len(made_current) == 1


def test_leaving_the_process_group_ends_only_one_microllama_joined(tmp_path):
    """leave_process_group (the end of `microllama train` and of the torchrun workers) ends the group
    join_process_group made, not one this process had before: the reference harness's in-process group, which Meta's
    fairscale layers go on using, survives a train command run in the same process (it did not, once)."""
    made = not torch.distributed.is_initialized()
    if made:
        torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        leave_process_group()
        assert torch.distributed.is_initialized()
    finally:
        if made:
            torch.distributed.destroy_process_group()


@pytest.mark.reference
def test_a_meta_layout_export_at_world_size_2_loads_in_metas_own_code_with_the_same_logits(runs):
    """lora trained under FSDP2 at 2 ranks, its adapters merged into the 2 shards each rank wrote: Meta's
    Llama3.build at world size 2 (fairscale's layers, torch.load of consolidated.0r.pth on rank r) reads them, and
    its logits equal microllama's tensor-parallel model's on the same files bit for bit (the same world size adds
    the same partial sums), and the one-process model's within LOGITS_ATOL (Meta's row-parallel sums). Meta's
    loader keeps bfloat16 weights: both microllama models round theirs through bfloat16 alike."""
    got = torch.load(runs["loads"] / "meta-export.pt", weights_only=True)
    assert torch.equal(got["meta"], got["ours"]), (got["meta"] - got["ours"]).abs().max()
    model = Llama.build(runs["lora-fsdp"] / "final", 64, 1).model
    with torch.inference_mode():
        for p in model.parameters():
            p.copy_(p.bfloat16().float())
        dense = model(got["tokens"])
    assert (dense - got["meta"]).abs().max() <= LOGITS_ATOL[torch.float32]
