"""Record a training golden set (a short full fine-tune of Meta's reference model) under torchrun, then check
microllama's trainer against it.

    python tools/record_training_goldens.py [--out DIR] [--ckpt_dir DIR|tiny] [--device cpu|cuda]
                                            [--dtype float32|bfloat16] [--world_size N]

Without --out the set is recorded into $MICROLLAMA_CACHE/goldens/train-<name> (default ~/.cache/microllama),
so the work tree stays as it is; microllama is checked against that fresh recording and against the committed
goldens/train-<name>. The logic is reference_harness.record_training. Exit status 1 when the trainer diverges.
"""

import sys
from pathlib import Path
from typing import Optional

# reference_harness sits beside microllama in the repository and is not installed with it.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from microllama import flags  # noqa: E402
from reference_harness.record_training import record_training_goldens  # noqa: E402


def main(
    out: Optional[str] = None,
    ckpt_dir: Optional[str] = None,
    device: str = "cpu",
    dtype: str = "float32",
    world_size: int = 1,
) -> None:
    """Record (default: the embedded tiny checkpoint, into the cache) and check microllama's trainer."""
    comparisons = record_training_goldens(out, ckpt_dir, device, dtype, world_size)
    if not all(c.passed for c in comparisons):
        sys.exit(1)


if __name__ == "__main__":
    flags.run(main)
