"""Record a golden set with Meta's reference code under torchrun, then check microllama against it.

    python tools/record_goldens.py [--out DIR] [--ckpt_dir DIR|tiny|tiny-hd128] [--device cpu|cuda]
                                   [--dtype float32|bfloat16] [--world_size N]

Without --out the set is recorded into $MICROLLAMA_CACHE/goldens/<name> (default ~/.cache/microllama), so the
work tree stays as it is; microllama is checked against that fresh recording and against the committed
goldens/<name>. Run from anywhere with the reference extra installed; the logic is
reference_harness.record.record_goldens. Exit status 1 when microllama diverges from either.
"""

import sys
from pathlib import Path
from typing import Optional

# reference_harness sits beside microllama in the repository and is not installed with it.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from microllama import flags  # noqa: E402
from reference_harness.record import record_goldens  # noqa: E402


def main(
    out: Optional[str] = None,
    ckpt_dir: Optional[str] = None,
    device: str = "cpu",
    dtype: str = "float32",
    world_size: int = 1,
) -> None:
    """Record (default: the embedded tiny checkpoint, into the cache) and verify, against the fresh recording
    and the committed set."""
    comparison = record_goldens(out, ckpt_dir, device, dtype, world_size)
    if comparison.diverged:
        sys.exit(1)


if __name__ == "__main__":
    flags.run(main)
