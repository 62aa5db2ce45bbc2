"""``python -m tiermem``."""

from tiermem.cli.main import main

main()
