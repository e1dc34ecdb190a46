"""``python -m vaeeval``."""

from vaeeval.cli import main

main()
