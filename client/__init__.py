"""The site: reads and validates its data, trains locally, fits and keeps its private correction.

Nothing here imports ``server``: a site needs only what both sides agree on (``shared``).
"""
