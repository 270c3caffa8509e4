"""What int8 and nf4 cost a trained model: held-out loss, top-1 agreement and mean KL against the dense model.

    python tools/bench_quality.py                        # the README's 60-step recipe on the shipped corpus
    python tools/bench_quality.py --run runs/tales       # the final weights of a finished `microllama train` run

Without --run, the tiny checkpoint is trained first with the recipe of README's Training section (60 AdamW steps
of 4 x 128 tokens of corpus/tinytales.txt, lr 5e-3 down to 5e-4: held-out loss about 1.8), into
$MICROLLAMA_CACHE/runs (kept: a second call reuses it; a few minutes on 2 CPU cores). The final weights are then
loaded dense and quantized (float32; the embedding, output and norms stay dense, see microllama.quantize) and run
over every held-out row of that run (microllama.train.quality).
"""

import sys
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # microllama from this checkout

from microllama import flags  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# README's Training section: `microllama train corpus/tinytales.txt --max_seq_len 128 --max_steps 60 --lr 5e-3
# --min_lr 5e-4 --eval_every 20` (the other flags at their defaults; no checkpoint before the end).
RECIPE = dict(data=str(ROOT / "corpus" / "tinytales.txt"), max_seq_len=128, max_steps=60, lr=5e-3, min_lr=5e-4,
              eval_every=20, save_every=0)  # fmt: skip


def main(run: Optional[str] = None, formats: Optional[list[str]] = None, dtype: str = "float32") -> None:
    """Print, for each format, the held-out loss of the dense and the quantized model, its relative change, the
    top-1 agreement and the mean KL(dense || quantized) over the run's held-out positions."""
    from microllama.quantize import FORMATS  # imports no torch: a bad flag is refused at once

    formats = formats or ["int8", "nf4"]
    unknown = [q for q in formats if q not in FORMATS]
    if unknown:
        raise ValueError(f"unknown quantization {unknown[0]!r}; expected one of {', '.join(FORMATS)}")
    if run is not None and not (Path(run) / "final").is_dir():
        raise ValueError(f"--run {run}: no final weights there (a finished run of microllama train)")
    from microllama.files import parse_dtype
    from microllama.quantize import check_quantize
    from microllama.train.quality import measure, trained_run

    for quantize in formats:
        check_quantize(quantize, "cpu", parse_dtype(dtype))  # int4 off CUDA, torchao missing
    run_dir = Path(run) if run is not None else trained_run(RECIPE)
    results = measure(run_dir, formats, dtype)
    print(f"{run_dir}: {results[0].positions:,} held-out positions, {dtype}")
    print("| format | held-out loss | dense | change | top-1 agreement | mean KL (nats) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for q in results:
        print(f"| {q.quantize} | {q.loss:.4f} | {q.dense_loss:.4f} | {q.loss_change:+.3%} | {q.top1_agreement:.2%} "
              f"| {q.mean_kl:.2e} |")  # fmt: skip


if __name__ == "__main__":
    flags.run(main)
