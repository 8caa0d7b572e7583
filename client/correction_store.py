"""A site's private correction store: encrypted, authenticated, bound to the source model."""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import secrets
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from shared.crypto import (
    SealedFileError,
    load_or_create_key,
    read_header,
    read_key_file,
    seal,
    unseal,
)
from shared.errors import FedadaptError
from shared.files import ensure_private_dir, write_atomically

log = logging.getLogger(__name__)

KIND = "fedadapt-correction"
FORMAT = "1"
MIN_FREE_BYTES = 1024 * 1024
REASONS = (
    "wrong-key",
    "tampered",
    "truncated",
    "not-sealed",
    "header-mismatch",
    "foreign-site",
    "other-source-model",
    "missing",
)

_DIGEST = re.compile(r"[0-9a-f]{64}")


class CorrectionRefused(FedadaptError, ValueError):
    """A stored correction was refused; ``reason`` says why, the message says what to do.

    Attributes
    ----------
    reason : str
        One of ``REASONS``.
    """

    def __init__(self, reason: str, message: str) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown correction refusal reason {reason!r}")
        super().__init__(message)
        self.reason = reason


class SiteDirError(FedadaptError, OSError):
    """The site folder cannot be created or written, or its disk is almost full."""

    def __init__(self, message: str, path: Path) -> None:
        super().__init__(message)
        self.path = path


def key_path(site_dir: Path) -> Path:
    """Return where the site's key file lives.

    Parameters
    ----------
    site_dir : pathlib.Path
        The site's private folder.

    Returns
    -------
    pathlib.Path
        ``site_dir / "site.key"``.
    """
    return Path(site_dir) / "site.key"


def correction_path(site_dir: Path, source_digest: str) -> Path:
    """Return where the correction fitted on a given source model is stored.

    Parameters
    ----------
    site_dir : pathlib.Path
        The site's private folder.
    source_digest : str
        Hex SHA-256 digest of the source model.

    Returns
    -------
    pathlib.Path
        ``site_dir / "corrections" / "correction-<first 16 hex of the digest>.enc"``.
    """
    _check_digest(source_digest)
    return Path(site_dir) / "corrections" / f"correction-{source_digest[:16]}.enc"


def _check_digest(source_digest: str) -> None:
    if not isinstance(source_digest, str) or not _DIGEST.fullmatch(source_digest):
        raise ValueError(
            "the source model digest must be a 64-character lowercase hex SHA-256 string "
            "(as returned by shared.source_model.arrays_digest)"
        )


def _check_site(site_name: str) -> None:
    if not isinstance(site_name, str) or not site_name.strip():
        raise ValueError("the site name must be a non-empty string")


def save_correction(
    site_dir: str | Path, site_name: str, source_digest: str, correction: dict[str, Any]
) -> Path:
    """Encrypt and store a site's correction, bound to the site and the source model.

    Parameters
    ----------
    site_dir : str or pathlib.Path
        The site's private folder (created with mode 0700; the site key is created in it on
        first use).
    site_name : str
        The site's name, recorded in the file so another site's file is recognised.
    source_digest : str
        Hex SHA-256 digest of the source model the correction was fitted on.
    correction : dict
        The correction: JSON-compatible lists, finite floats and strings only.

    Returns
    -------
    pathlib.Path
        The file written (replaced atomically if it existed).

    Raises
    ------
    ValueError
        If the correction holds NaN/infinity or values JSON cannot store, or the site name or
        digest is malformed. The message never contains the correction's values.
    """
    _check_site(site_name)
    _check_digest(source_digest)
    if not isinstance(correction, dict):
        raise TypeError("the correction must be a dict")
    try:
        payload = json.dumps(
            correction, allow_nan=False, sort_keys=True, separators=(",", ":")
        ).encode("utf-8")
    except ValueError:
        raise ValueError(
            "the correction holds NaN or infinite values and was not saved; the fit did not "
            "converge, so check the site's data and fit it again"
        ) from None
    except TypeError:
        raise ValueError(
            "the correction holds a value JSON cannot store and was not saved; use lists, "
            "floats and strings (convert numpy arrays with .tolist())"
        ) from None
    site_dir = ensure_private_dir(site_dir)
    key = load_or_create_key(key_path(site_dir))
    header = {
        "kind": KIND,
        "format": FORMAT,
        "site": site_name,
        "source-model": source_digest,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    path = correction_path(site_dir, source_digest)
    ensure_private_dir(path.parent)
    write_atomically(path, seal(key, payload, header), mode=0o600)
    log.info(
        "saved the correction of site %s for source model %s to %s",
        site_name,
        source_digest[:16],
        path,
    )
    return path


def load_correction(
    site_dir: str | Path,
    site_name: str,
    source_digest: str,
    path: str | Path | None = None,
) -> dict[str, Any]:
    """Read, authenticate and decrypt a site's correction for the current source model.

    Parameters
    ----------
    site_dir : str or pathlib.Path
        The site's private folder (holds the site key).
    site_name : str
        This site's name; a correction of another site is refused.
    source_digest : str
        Hex SHA-256 digest of the current source model; a correction fitted on another one
        is refused.
    path : str or pathlib.Path, optional
        The file to read; defaults to ``correction_path(site_dir, source_digest)``.

    Returns
    -------
    dict
        The correction, returned only once the file has been fully authenticated.

    Raises
    ------
    CorrectionRefused
        If the file is missing, not a correction, another site's, fitted on another source
        model, sealed with another key, modified or truncated (see its ``reason``), or the
        site key is missing or invalid.
    PermissionError
        If the site key file is readable by group or others (fix: ``chmod 600``).
    """
    _check_site(site_name)
    _check_digest(source_digest)
    site_dir = Path(site_dir)
    path = correction_path(site_dir, source_digest) if path is None else Path(path)
    kpath = key_path(site_dir)
    try:
        key = read_key_file(kpath)
    except FileNotFoundError:
        if not path.exists():  # a site that never adapted: the file is what is missing
            raise _missing(path) from None
        raise CorrectionRefused(
            "wrong-key",
            f"the site key {kpath} is missing, so no correction of this site can be read; "
            "restore the key from your backup, or run the adapt phase again to fit a new "
            "correction (a new key is then created)",
        ) from None
    except ValueError as err:
        raise CorrectionRefused("wrong-key", f"the site key cannot be used: {err}") from None
    try:
        blob = path.read_bytes()
    except FileNotFoundError:
        raise _missing(path) from None

    try:
        # Identify the file from its clear header BEFORE the key check: another site's file
        # is normally sealed with another key, and "belongs to site X" is the useful message.
        # Nothing here is trusted: it only picks the message; unseal authenticates everything.
        header = read_header(blob)
        _check_header(header, site_name, source_digest, path)
        expected = {
            "kind": KIND,
            "format": FORMAT,
            "site": site_name,
            "source-model": source_digest,
        }
        _, payload = unseal(key, blob, expected)
    except SealedFileError as err:
        raise _refusal(err, path) from None

    try:
        correction = json.loads(payload.decode("utf-8"), parse_constant=_reject_constant)
    except ValueError:
        correction = None
    if not isinstance(correction, dict):
        raise CorrectionRefused(
            "tampered",
            f"{path} is authentic but its content is not a fedadapt correction (was it "
            "written by another program with this site's key?); run the adapt phase again",
        )
    log.info(
        "loaded the correction of site %s for source model %s from %s",
        site_name,
        source_digest[:16],
        path,
    )
    return correction


def _missing(path: Path) -> CorrectionRefused:
    return CorrectionRefused(
        "missing",
        f"no correction at {path}; run the adapt phase to fit this site's correction for the "
        "current source model",
    )


def _reject_constant(name: str) -> Any:
    raise ValueError("non-finite number in a correction")


def _check_header(header: dict[str, str], site_name: str, source_digest: str, path: Path) -> None:
    """Refuse a file whose (not yet authenticated) header says it is not this correction."""
    kind = header.get("kind")
    if kind != KIND:
        raise CorrectionRefused(
            "header-mismatch",
            f"{path} is a sealed {kind or 'unlabelled'} file, not a fedadapt correction; point "
            "to a correction file",
        )
    if header.get("format") != FORMAT:
        raise CorrectionRefused(
            "header-mismatch",
            f"{path} uses correction format {header.get('format')!r}, this version reads "
            f"format {FORMAT!r}; use the fedadapt version that wrote it or run the adapt "
            "phase again",
        )
    site = header.get("site")
    if site != site_name:
        raise CorrectionRefused(
            "foreign-site",
            f"{path}: this correction belongs to site {site!r}, not {site_name!r}; a site "
            "can only use its own correction, so run the adapt phase at this site",
        )
    fitted_on = header.get("source-model") or "?"
    if fitted_on != source_digest:
        raise CorrectionRefused(
            "other-source-model",
            f"{path} was fitted on source model {fitted_on[:16]}…, the current source model "
            f"is {source_digest[:16]}…; run the adapt phase again",
        )


def _refusal(err: SealedFileError, path: Path) -> CorrectionRefused:
    """Translate a sealed-file refusal into a correction refusal that says what to do."""
    if err.reason == "header-mismatch":
        # The pre-check above catches these; kept for the authenticated second check.
        if err.field == "site":
            return CorrectionRefused(
                "foreign-site",
                f"{path}: this correction belongs to site {err.found!r}, not "
                f"{err.expected!r}; run the adapt phase at this site",
            )
        if err.field == "source-model":
            return CorrectionRefused(
                "other-source-model",
                f"{path} was fitted on source model {(err.found or '?')[:16]}…, the current "
                f"source model is {(err.expected or '?')[:16]}…; run the adapt phase again",
            )
        return CorrectionRefused(
            "header-mismatch", f"{path}: {err.detail}; point to a correction file"
        )
    advice = {
        "wrong-key": "use this site's own key file, or run the adapt phase again",
        "tampered": "do not use it; restore it from a backup or run the adapt phase again",
        "truncated": "restore it from a backup or run the adapt phase again",
        "not-sealed": "point to a correction file written by fedadapt",
    }[err.reason]
    return CorrectionRefused(err.reason, f"{path}: {err.detail}; {advice}")


def check_writable(site_dir: str | Path) -> None:
    """Make sure the site folder can hold a correction, before any training starts.

    Creates the folder (and its ``corrections`` sub-folder) if needed, writes and removes a
    probe file in each, and checks the free disk space.

    Parameters
    ----------
    site_dir : str or pathlib.Path
        The site's private folder.

    Raises
    ------
    SiteDirError
        If a folder cannot be created or written, or less than 1 MiB is free on its disk.
    """
    site_dir = Path(site_dir)
    corrections = correction_path(site_dir, "0" * 64).parent
    for folder in (site_dir, corrections):
        try:
            ensure_private_dir(folder)
        except OSError as err:
            raise SiteDirError(f"cannot create the site folder {folder}: {err}", folder) from err
        probe = folder / f".write-probe-{secrets.token_hex(8)}"
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, b"0")
                os.fsync(fd)
            finally:
                os.close(fd)
                probe.unlink()
        except OSError as err:
            advice = (
                "the disk is full: free some space or choose a folder on another disk"
                if err.errno == errno.ENOSPC else
                "give this user write permission there or choose another folder"
            )
            raise SiteDirError(
                f"cannot write in the site folder {folder}: {err.strerror or err}; {advice}",
                folder,
            ) from err
    free = shutil.disk_usage(site_dir).free
    if free < MIN_FREE_BYTES:
        raise SiteDirError(
            f"only {free} bytes are free on the disk of {site_dir} (at least {MIN_FREE_BYTES} "
            "needed); free some space or choose a folder on another disk",
            site_dir,
        )
    log.debug("site folder %s is writable (%d bytes free)", site_dir, free)
