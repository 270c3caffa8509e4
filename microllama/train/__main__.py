"""`python -m microllama.train ...`: the same flags and checks as `microllama train`."""

from .command import main

main()
