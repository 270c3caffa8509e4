"""The benchmark scripts run and report figures (their timings are printed, never asserted)."""

import re

import pytest

from tools.bench_decode import benchmark
from tools.bench_load import tp


def test_decode_benchmark_reports_both_attention_paths_on_the_same_weights():
    rows = benchmark(model="tiny", prompt_len=8, gen_len=4, repeats=1)
    assert [r["path"] for r in rows] == ["default", "flash"]
    assert all(r["prefill_tok_s"] > 0 and r["decode_ms_per_step"] > 0 for r in rows)
    assert rows[0]["tokens"] == rows[1]["tokens"]  # float32 greedy ids agree across the two paths


@pytest.mark.slow
def test_tensor_parallel_load_benchmark_reports_each_ranks_peak_against_its_share(tmp_path, capsys):
    tp(str(tmp_path), name="tiny", world_sizes=[2], dtypes=["bfloat16"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in lines] == ["tiny-2l-meta-2-shards", "tiny-2l-meta"]
    for line in lines:
        ratios = re.findall(r"GB \((\d+\.\d+)x\)", line)
        assert len(ratios) == 2 and all(float(r) > 0 for r in ratios), line
