"""The benchmark scripts run and report figures (their timings are printed, never asserted)."""

from tools.bench_decode import benchmark


def test_decode_benchmark_reports_both_attention_paths_on_the_same_weights():
    rows = benchmark(model="tiny", prompt_len=8, gen_len=4, repeats=1)
    assert [r["path"] for r in rows] == ["default", "flash"]
    assert all(r["prefill_tok_s"] > 0 and r["decode_ms_per_step"] > 0 for r in rows)
    assert rows[0]["tokens"] == rows[1]["tokens"]  # float32 greedy ids agree across the two paths
