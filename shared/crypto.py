"""Sealed files: AES-GCM encryption bound to a readable, authenticated header, and site keys.

File format (version 1), all integers big-endian::

    magic          8 bytes   b"FADSEAL1"
    header length  4 bytes   length in bytes of the header that follows
    header         n bytes   canonical JSON (sort_keys, compact separators, UTF-8) of the
                             caller's header dict plus two reserved fields:
                             "key-id" (fingerprint of the sealing key, see ``key_id``) and
                             "ciphertext-bytes" (length of the ciphertext+tag below)
    nonce          12 bytes  random, fresh for every seal
    ciphertext     m bytes   AES-256-GCM encryption of the payload, 16-byte tag included

The associated data of AES-GCM is the whole prefix (magic + header length + header), so the
header is authenticated (any change to it makes decryption fail) yet can be read without the
key. That lets a caller say *why* a file does not fit (sealed with another key, for another
site, for another source model) instead of a bare "decryption failed". Nothing read from the
header is trusted before decryption succeeds: it only chooses the error message, and
``unseal`` returns nothing until the tag has been verified.

Why each check in ``unseal`` exists, in the order it runs:

1. Magic: a file that is not a sealed file at all (plain JSON, a file from another tool) is
   reported as such ("not-sealed") rather than as corruption.
2. Lengths: the prefix, the header, the nonce and the ciphertext length recorded in the
   header must all be present. A file cut short (interrupted copy, full disk) is reported as
   "truncated"; extra bytes after the ciphertext mean the file was modified ("tampered").
3. Header JSON: the header must parse and be in canonical form; anything else is a modified
   or corrupted header ("tampered").
4. Key id: a file sealed with another key cannot be decrypted. Comparing fingerprints first
   turns the opaque authentication failure into "sealed with key X, the key given is Y"
   ("wrong-key"). The fingerprint is a one-way hash of the key, so it reveals nothing about it.
5. Expected header fields: the caller states what the file must be (kind, site, source
   model...); a mismatch names the field and both values ("header-mismatch"). Header values
   are identifiers chosen by the caller, never payload data, so they can be shown.
6. Decryption: AES-GCM verifies the tag over the header and the ciphertext; a failure means
   the file was modified or corrupted ("tampered"). Only then is the payload returned.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from shared.errors import FedadaptError
from shared.files import create_private_file

log = logging.getLogger(__name__)

KEY_BYTES = 32
MAGIC = b"FADSEAL1"
NONCE_BYTES = 12
TAG_BYTES = 16
LENGTH_BYTES = 4
KEY_ID_FIELD = "key-id"
CIPHERTEXT_FIELD = "ciphertext-bytes"
RESERVED_FIELDS = (KEY_ID_FIELD, CIPHERTEXT_FIELD)
REASONS = ("wrong-key", "tampered", "truncated", "not-sealed", "header-mismatch")

_PREFIX_BYTES = len(MAGIC) + LENGTH_BYTES
_KEY_ID_DOMAIN = b"fedadapt-key-id\0"
_ADVICE = {
    "wrong-key": "use the key file it was sealed with",
    "tampered": "do not use it; restore it from a backup or produce it again",
    "truncated": "restore it from a backup or produce it again",
    "not-sealed": "point to a file written by fedadapt",
    "header-mismatch": "point to the file that matches",
}


class SealedFileError(FedadaptError, ValueError):
    """A sealed file was refused; ``reason`` says why (one of ``REASONS``).

    Attributes
    ----------
    reason : str
        ``"wrong-key"``, ``"tampered"``, ``"truncated"``, ``"not-sealed"`` or
        ``"header-mismatch"``.
    detail : str
        What is wrong, without the advice on what to do (for callers that give their own).
    field : str or None
        For ``"header-mismatch"``: the header field that differs.
    found : str or None
        For ``"header-mismatch"``: the value in the file (``None`` if the field is absent).
    expected : str or None
        For ``"header-mismatch"``: the value the caller expected.
    """

    def __init__(
        self,
        reason: str,
        detail: str,
        *,
        advice: str | None = None,
        field: str | None = None,
        found: str | None = None,
        expected: str | None = None,
    ) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown sealed-file refusal reason {reason!r}")
        super().__init__(f"{detail}; {advice or _ADVICE[reason]}")
        self.reason = reason
        self.detail = detail
        self.field = field
        self.found = found
        self.expected = expected


# ---------------------------------------------------------------------------- key files


def create_key_file(path: str | Path) -> bytes:
    """Create a new random key file readable only by its owner.

    The file is created with mode 0600 from the start (never briefly readable by others),
    and missing parent directories are created with mode 0700.

    Parameters
    ----------
    path : str or pathlib.Path
        Where to write the key. Must not exist yet.

    Returns
    -------
    bytes
        The ``KEY_BYTES`` random bytes written.

    Raises
    ------
    FileExistsError
        If ``path`` already exists: an existing key is never overwritten, because every file
        sealed with it would become unreadable.
    """
    path = Path(path)
    key = os.urandom(KEY_BYTES)
    try:
        create_private_file(path, key)
    except FileExistsError:
        raise FileExistsError(
            f"key file {path} already exists; refusing to overwrite it, since every file "
            "sealed with that key would become unreadable. Use the existing key, or move the "
            "file away first if you really mean to start over with a new key"
        ) from None
    log.info("created key file %s (key id %s)", path, key_id(key))
    return key


def read_key_file(path: str | Path) -> bytes:
    """Read a key file, refusing one that others can read or that has the wrong length.

    Parameters
    ----------
    path : str or pathlib.Path
        The key file written by ``create_key_file``.

    Returns
    -------
    bytes
        The ``KEY_BYTES``-byte key.

    Raises
    ------
    FileNotFoundError
        If the file does not exist.
    PermissionError
        If the file grants any permission to group or others (fix: ``chmod 600 <path>``).
    ValueError
        If the path is not a regular file or does not hold exactly ``KEY_BYTES`` bytes.
    """
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise FileNotFoundError(
            f"key file {path} not found; create it with create_key_file (or restore it from "
            "your backup: files sealed with a lost key cannot be recovered)"
        ) from None
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"key file {path} is not a regular file; point to the key file itself")
    if st.st_mode & 0o077:
        raise PermissionError(
            f"key file {path} is accessible by group or others (mode "
            f"{stat.S_IMODE(st.st_mode):04o}); refusing to use it. Restrict it with "
            f"`chmod 600 {path}` and check who may have copied it"
        )
    key = path.read_bytes()
    if len(key) != KEY_BYTES:
        raise ValueError(
            f"key file {path} holds {len(key)} bytes, not {KEY_BYTES}: it is not a fedadapt "
            "key or it was damaged. Restore it from your backup; if nothing was ever sealed "
            "with it, delete it and a new key will be created"
        )
    return key


def load_or_create_key(path: str | Path) -> bytes:
    """Read the key file at ``path``, creating it first if it does not exist.

    Parameters
    ----------
    path : str or pathlib.Path
        The key file.

    Returns
    -------
    bytes
        The ``KEY_BYTES``-byte key.
    """
    try:
        return read_key_file(path)
    except FileNotFoundError:
        pass
    try:
        return create_key_file(path)
    except FileExistsError:  # another process created it in the meantime
        return read_key_file(path)


def key_id(key: bytes) -> str:
    r"""Return a short public fingerprint of a key.

    Parameters
    ----------
    key : bytes
        The key.

    Returns
    -------
    str
        The first 16 hex digits of SHA-256(``b"fedadapt-key-id\0" + key``); safe to show and
        to store in clear, it does not reveal the key.
    """
    return hashlib.sha256(_KEY_ID_DOMAIN + key).hexdigest()[:16]


# ---------------------------------------------------------------------------- sealing


def _check_key(key: bytes) -> None:
    if not isinstance(key, bytes) or len(key) != KEY_BYTES:
        raise ValueError(f"a sealing key must be {KEY_BYTES} bytes; read it with read_key_file")


def _canonical(header: dict[str, str]) -> bytes:
    return json.dumps(
        header, sort_keys=True, separators=(",", ":"), ensure_ascii=False
    ).encode("utf-8")


def seal(key: bytes, payload: bytes, header: dict[str, str]) -> bytes:
    """Encrypt ``payload`` and bind it to ``header``.

    Parameters
    ----------
    key : bytes
        A ``KEY_BYTES``-byte key.
    payload : bytes
        The secret content.
    header : dict of str to str
        Identifiers stored in clear and authenticated (kind, owner, what the payload is bound
        to...). Never put secret or personal data here. The reserved fields ``"key-id"`` and
        ``"ciphertext-bytes"`` are added by this function.

    Returns
    -------
    bytes
        The sealed file's content (see the module docstring for the format).
    """
    _check_key(key)
    for name, value in header.items():
        if not isinstance(name, str) or not isinstance(value, str):
            raise TypeError("header fields and values must be strings")
        if name in RESERVED_FIELDS:
            raise ValueError(f"header field {name!r} is reserved; choose another name")
    full = {
        **header,
        KEY_ID_FIELD: key_id(key),
        CIPHERTEXT_FIELD: str(len(payload) + TAG_BYTES),
    }
    header_bytes = _canonical(full)
    prefix = MAGIC + len(header_bytes).to_bytes(LENGTH_BYTES, "big") + header_bytes
    nonce = os.urandom(NONCE_BYTES)
    return prefix + nonce + AESGCM(key).encrypt(nonce, payload, prefix)


def read_header(blob: bytes) -> dict[str, str]:
    """Parse a sealed file's header WITHOUT authenticating it.

    Use it only to choose an error message before ``unseal``; never act on its values
    otherwise, since they are not verified until ``unseal`` succeeds.

    Parameters
    ----------
    blob : bytes
        The sealed file's content.

    Returns
    -------
    dict of str to str
        The header fields, reserved ones included.

    Raises
    ------
    SealedFileError
        With reason ``"not-sealed"``, ``"truncated"`` or ``"tampered"``.
    """
    return _parse(blob)[0]


def _parse(blob: bytes) -> tuple[dict[str, str], int, int]:
    """Check the structure of ``blob``; return header, prefix length and ciphertext length."""
    if not blob:
        raise SealedFileError("truncated", "the file is empty (an interrupted write or copy?)")
    if blob[: len(MAGIC)] != MAGIC:
        if len(blob) < len(MAGIC) and MAGIC.startswith(blob):
            raise SealedFileError("truncated", "the file is cut short inside its first bytes")
        raise SealedFileError(
            "not-sealed",
            "this is not a fedadapt sealed file (it does not start with the FADSEAL1 marker)",
        )
    if len(blob) < _PREFIX_BYTES:
        raise SealedFileError("truncated", "the file is cut short before its header")
    header_len = int.from_bytes(blob[len(MAGIC) : _PREFIX_BYTES], "big")
    prefix_len = _PREFIX_BYTES + header_len
    if len(blob) < prefix_len:
        raise SealedFileError(
            "truncated",
            f"the file is cut short inside its header ({len(blob)} bytes, the header alone "
            f"needs {prefix_len}: an interrupted write or copy, or a modified header length)",
        )
    header_bytes = blob[_PREFIX_BYTES:prefix_len]
    try:
        header = json.loads(header_bytes.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise SealedFileError(
            "tampered", "the file's header is not valid: it was modified or corrupted"
        ) from None
    if (
        not isinstance(header, dict)
        or not all(isinstance(k, str) and isinstance(v, str) for k, v in header.items())
        or _canonical(header) != header_bytes
    ):
        raise SealedFileError(
            "tampered", "the file's header is not in canonical form: it was modified or corrupted"
        )
    declared = header.get(CIPHERTEXT_FIELD, "")
    if not (declared.isascii() and declared.isdigit()) or int(declared) < TAG_BYTES:
        raise SealedFileError(
            "tampered", "the file's header lacks a valid ciphertext length: it was modified"
        )
    ct_len = int(declared)
    expected_total = prefix_len + NONCE_BYTES + ct_len
    if len(blob) < expected_total:
        raise SealedFileError(
            "truncated",
            f"the file is cut short: {len(blob)} bytes instead of {expected_total} (an "
            "interrupted write or copy, or a modified length in its header)",
        )
    if len(blob) > expected_total:
        raise SealedFileError(
            "tampered",
            f"the file has {len(blob) - expected_total} unexpected bytes after its end: "
            "it was modified",
        )
    return header, prefix_len, ct_len


def unseal(
    key: bytes, blob: bytes, expected: dict[str, str] | None = None
) -> tuple[dict[str, str], bytes]:
    """Check, authenticate and decrypt a sealed file.

    Parameters
    ----------
    key : bytes
        The ``KEY_BYTES``-byte key the file should have been sealed with.
    blob : bytes
        The sealed file's content.
    expected : dict of str to str, optional
        Header fields that must have exactly these values.

    Returns
    -------
    header : dict of str to str
        The authenticated header, reserved fields included.
    payload : bytes
        The decrypted payload.

    Raises
    ------
    SealedFileError
        If the file is refused; its ``reason`` says why (checks run in the order given in the
        module docstring, and nothing is returned unless all pass).
    """
    _check_key(key)
    header, prefix_len, _ = _parse(blob)
    sealed_with = header.get(KEY_ID_FIELD)
    given = key_id(key)
    if sealed_with != given:
        raise SealedFileError(
            "wrong-key",
            f"this file was sealed with key {sealed_with}, the key given is {given} (if no key "
            "with that id ever existed, the file's header was modified)",
        )
    for name, value in (expected or {}).items():
        found = header.get(name)
        if found != value:
            shown = "nothing" if found is None else repr(found)
            raise SealedFileError(
                "header-mismatch",
                f"the file's {name!r} is {shown}, expected {value!r}",
                field=name,
                found=found,
                expected=value,
            )
    nonce = blob[prefix_len : prefix_len + NONCE_BYTES]
    try:
        payload = AESGCM(key).decrypt(nonce, blob[prefix_len + NONCE_BYTES :], blob[:prefix_len])
    except InvalidTag:
        raise SealedFileError(
            "tampered",
            "the file failed its integrity check: it was modified or corrupted after it was "
            "written",
        ) from None
    return header, payload
