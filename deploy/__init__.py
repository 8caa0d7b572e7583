"""Flower's processes on this machine: starting and stopping them, and a local TLS deployment.

Nothing here imports ``simulations``: a simulation uses these helpers, not the other way round.
"""
