"""The root of the errors fedadapt raises itself: messages safe to show, saying what to do."""

from __future__ import annotations


class FedadaptError(Exception):
    """An error fedadapt wrote itself.

    Its message names files, lines, columns, features and settings, never a cell value of a
    patient file, and says how to fix the problem: it may be printed, logged and (after the
    site's paths are taken out, ``client.egress``) sent. Any other exception is shown by its
    type only where it could quote data.
    """
