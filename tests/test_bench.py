"""The benchmark scripts run and report figures (their timings are printed, never asserted)."""

import re

import pytest

from tools.bench_decode import SYSTEMS, benchmark, format_report
from tools.bench_load import quant, tp
from tools.bench_prefill import measure
from tools.bench_train import run_row, step_ratios


def test_decode_benchmark_runs_each_system_on_the_same_weights_and_compares_their_tokens():
    result = benchmark(model="tiny", prompt_len=8, gen_len=4, repeats=1, systems=["microllama-flash", "transformers"],
                       bandwidth=False)  # fmt: skip
    rows = result["rows"]
    assert [r["system"] for r in rows] == ["microllama", "microllama-flash", "transformers"]
    assert all(r["prefill_tok_s"] > 0 and r["decode_ms_per_step"] > 0 for r in rows)
    assert all(len(r["tokens"][0]) == 4 for r in rows)
    assert all(r["same_tokens"] for r in rows)  # float32 greedy ids agree across the three
    assert "same as microllama" in format_report(result)


@pytest.mark.slow
@pytest.mark.reference
def test_decode_benchmark_side_by_side_with_compiled_paths_and_meta():
    """Every system but transformers-static-compile, whose cold compile took 21 s of the suite's 10 minutes for the
    peer's own code (transformers' static cache and torch.compile, which the benchmark only calls): microllama's
    compiled path, its step alone and the report's "vs compiled" column are microllama's and are run here."""
    systems = [s for s in SYSTEMS if s != "transformers-static-compile"]
    result = benchmark(model="tiny", prompt_len=8, gen_len=4, repeats=1, systems=systems)
    rows = {r["system"]: r for r in result["rows"]}
    assert set(rows) == {"microllama", "microllama-flash", "microllama-compiled", "transformers", "meta"}
    assert result["step_alone_s"] > 0
    assert all(re.search(r" \d+\.\d\dx ", line) for line in format_report(result).splitlines()[2:7])  # vs compiled
    assert all(r["same_tokens"] for r in rows.values()), format_report(result)
    assert result["bound_tok_s"] > 0


@pytest.mark.slow
def test_tensor_parallel_load_benchmark_reports_each_ranks_peak_against_its_share(tmp_path, capsys):
    tp(str(tmp_path), name="tiny", world_sizes=[2], dtypes=["bfloat16"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in lines] == ["tiny-2l-meta-2-shards", "tiny-2l-meta"]
    for line in lines:
        ratios = re.findall(r"GB \((\d+\.\d+)x\)", line)
        assert len(ratios) == 2 and all(float(r) > 0 for r in ratios), line


@pytest.mark.slow  # two tiny models built and prefilled: about 10 s on a loaded 2-core machine
def test_prefill_benchmark_sees_the_one_shot_logits_that_a_chunked_prefill_never_makes(tokenizer):
    one_shot, chunked = measure(128, "all"), measure(128, "32")
    assert (one_shot["logits_rows"], chunked["logits_rows"]) == (128, 1)
    logits_bytes = 128 * 128_256 * 4  # the tiny checkpoint's float32 logits of every position: 63 MiB
    assert one_shot["peak_bytes"] >= logits_bytes > chunked["peak_bytes"]


@pytest.mark.slow
def test_quantized_load_benchmark_reports_each_formats_peak_against_its_own_bytes(tmp_path, capsys):
    pytest.importorskip("torchao", reason="needs torchao (the quant extra)")
    quant(str(tmp_path), name="tiny", n_layers=2)
    rows = capsys.readouterr().out.strip().splitlines()[2:]
    assert [row.split()[0] for row in rows] == ["bfloat16", "int8", "nf4"]
    assert all(float(row.split()[1]) > 0 and float(row.split()[3]) > 0 for row in rows)  # model GB, x model


def test_train_benchmark_measures_a_lora_and_a_qlora_steps_memory_apart_from_the_models():
    """In this process, tiny shapes, one timed step each: what the process holds once built, the step's peak (reset
    after the warm-up step) and their difference, and the qlora / lora line of the two."""
    pytest.importorskip("torchao", reason="needs torchao (the quant extra)")
    row = dict(model="tiny", n_layers=None, device="cpu", dtype="float32", seq_len=16, batch_size=1, steps=1,
               flash=False, threads=0, variant="plain")  # fmt: skip
    results = [run_row(dict(row, mode=mode)) for mode in ("lora", "qlora")]
    for r in results:
        assert r["model_gib"] > 0 and r["step_peak_gib"] > 0 and r["tok_s"] > 0
        assert r["step_adds_gib"] == pytest.approx(r["step_peak_gib"] - r["model_gib"])
    (line,) = step_ratios(results)
    assert re.fullmatch(r"qlora / lora \(plain, medians of 1 and 1\): step peak \d+\.\d\d / \d+\.\d\d GiB = "
                        r"\d+\.\d\dx, step adds -?\d+\.\d\d / -?\d+\.\d\d GiB", line), line  # fmt: skip
