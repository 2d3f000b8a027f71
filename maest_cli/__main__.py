"""`python -m maest_cli ...` (torchrun launches workers this way)."""

from .cli import main

main()
