"""The coordinator: the ServerApp, strategies, federated preprocessing and the report.

Nothing here imports ``client``: the server knows sites only through their replies.
"""
