"""Check microllama against a golden set: the same as `microllama verify GOLDEN_DIR`.

    python tools/compare_goldens.py GOLDEN_DIR [--ckpt_dir DIR] [--device cpu|cuda]

Prints a table per capture point and names the first divergent one; exit status 1 on divergence.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # microllama from this checkout

from microllama import cli, flags  # noqa: E402

if __name__ == "__main__":
    flags.run(cli.verify)
