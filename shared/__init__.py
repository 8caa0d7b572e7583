"""What the coordinator and every site agree on: schema, models, keys, crypto, metrics."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("fedadapt")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"
