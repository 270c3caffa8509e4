"""`python -m microllama ...`: the `microllama` command (torchrun --nproc_per_node N -m microllama generate ...)."""

from .cli import script_main

script_main()
