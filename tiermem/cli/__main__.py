"""``python -m tiermem.cli``."""

from tiermem.cli.main import main

main()
