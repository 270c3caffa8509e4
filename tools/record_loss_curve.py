"""Record the loss-curve golden: microllama.golden.loss_curve.RECIPE (tiny checkpoint, corpus/tinytales.txt, 20
float32 steps, seeded) run in one process, its per-step losses and gradient norms with this platform's fingerprint.

    python tools/record_loss_curve.py [--out goldens/losses/tiny-fp32-cpu-ws1.json] [--threads 1]

The committed golden was recorded at 1 torch thread, the count each pytest-xdist worker runs at. Compare a run
against it with `microllama compare-losses RUN_DIR goldens/losses/tiny-fp32-cpu-ws1.json`.
"""

import tempfile
from pathlib import Path

from microllama import flags
from microllama.golden.loss_curve import record_curve, write_golden

REPO = Path(__file__).resolve().parents[1]


def main(out: str = str(REPO / "goldens" / "losses" / "tiny-fp32-cpu-ws1.json"), threads: int = 1) -> None:
    """Run the recipe in a temporary directory and write its curve to OUT."""
    with tempfile.TemporaryDirectory() as tmp:
        curve = record_curve(REPO, Path(tmp) / "run", threads)
    print(f"wrote {write_golden(out, curve)}: {len(curve.steps)} steps, loss {curve.steps[0].loss:.4f} -> "
          f"{curve.steps[-1].loss:.4f}")  # fmt: skip


if __name__ == "__main__":
    flags.run(main)
