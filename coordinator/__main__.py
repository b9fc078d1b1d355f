"""``python -m coordinator``: the same as the ``sandrun-coordinator`` console script."""

from coordinator.cli import main

main()
