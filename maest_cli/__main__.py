"""`python -m maest_cli ...` (torchrun launches workers this way)."""

from maest_cli.cli.app import main

main()
