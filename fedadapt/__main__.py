"""Run the fedadapt command: ``python -m fedadapt``."""

from fedadapt.cli import main

main()
