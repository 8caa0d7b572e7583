"""The fedadapt command-line face (``fedadapt.cli``); the work lives in the other packages."""
