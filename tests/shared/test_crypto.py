"""Tests of shared.crypto: site key files and sealed (encrypted, authenticated) files."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from shared.crypto import (
    KEY_BYTES,
    MAGIC,
    SealedFileError,
    create_key_file,
    key_id,
    load_or_create_key,
    read_header,
    read_key_file,
    seal,
    unseal,
)

PAYLOAD = b'{"weights":[0.123456789,-2.718281828]}'
HEADER = {"kind": "test", "site": "alpha"}


def _flip(blob: bytes, index: int) -> bytes:
    return blob[:index] + bytes([blob[index] ^ 0x01]) + blob[index + 1 :]


def _prefix_len(blob: bytes) -> int:
    return len(MAGIC) + 4 + int.from_bytes(blob[len(MAGIC) : len(MAGIC) + 4], "big")


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_seal_round_trip() -> None:
    """Unsealing with the right key returns the payload and the header plus reserved fields."""
    key = os.urandom(KEY_BYTES)
    header, payload = unseal(key, seal(key, PAYLOAD, HEADER), expected=HEADER)
    assert payload == PAYLOAD
    assert header["kind"] == "test" and header["site"] == "alpha"
    assert header["key-id"] == key_id(key)
    assert int(header["ciphertext-bytes"]) == len(PAYLOAD) + 16


def test_sealed_file_hides_payload_but_shows_header() -> None:
    """The payload is not in clear in the file; the header is readable without the key."""
    key = os.urandom(KEY_BYTES)
    blob = seal(key, PAYLOAD, HEADER)
    assert blob.startswith(MAGIC)
    assert b"0.123456789" not in blob
    assert read_header(blob)["site"] == "alpha"


def test_seal_uses_fresh_nonce() -> None:
    """Sealing the same payload twice gives different files."""
    key = os.urandom(KEY_BYTES)
    assert seal(key, PAYLOAD, HEADER) != seal(key, PAYLOAD, HEADER)


def test_seal_rejects_reserved_header_field() -> None:
    """A caller cannot set the reserved key-id field."""
    key = os.urandom(KEY_BYTES)
    with pytest.raises(ValueError, match="reserved"):
        seal(key, PAYLOAD, {"key-id": "0" * 16})


def test_key_id_is_short_public_fingerprint() -> None:
    """key_id is 16 hex digits, deterministic, and differs between keys."""
    key = os.urandom(KEY_BYTES)
    assert key_id(key) == key_id(key)
    assert len(key_id(key)) == 16 and int(key_id(key), 16) >= 0
    assert key_id(key) != key_id(os.urandom(KEY_BYTES))
    assert key.hex()[:16] != key_id(key)


def test_key_file_is_private_and_never_overwritten(tmp_path: Path) -> None:
    """A new key file is 0600 in 0700 folders, and creating it again is refused."""
    path = tmp_path / "a" / "b" / "site.key"
    key = create_key_file(path)
    assert len(key) == KEY_BYTES
    assert _mode(path) == 0o600
    assert _mode(path.parent) == 0o700 and _mode(path.parent.parent) == 0o700
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        create_key_file(path)
    assert read_key_file(path) == key
    assert load_or_create_key(path) == key


def test_load_or_create_key_creates_once(tmp_path: Path) -> None:
    """load_or_create_key creates a missing key, then keeps returning the same one."""
    path = tmp_path / "site.key"
    key = load_or_create_key(path)
    assert path.exists() and load_or_create_key(path) == key


def test_group_readable_key_refused(tmp_path: Path) -> None:
    """A key file readable by the group is refused with the chmod fix."""
    path = tmp_path / "site.key"
    create_key_file(path)
    path.chmod(0o640)
    with pytest.raises(PermissionError, match="chmod 600"):
        read_key_file(path)


def test_key_file_wrong_length_or_missing_refused(tmp_path: Path) -> None:
    """A missing key file and one of the wrong length are refused clearly."""
    with pytest.raises(FileNotFoundError, match="not found"):
        read_key_file(tmp_path / "none.key")
    short = tmp_path / "short.key"
    short.write_bytes(b"x" * 10)
    short.chmod(0o600)
    with pytest.raises(ValueError, match="10 bytes"):
        read_key_file(short)


def test_wrong_key_refused() -> None:
    """A file sealed with another key is refused as wrong-key naming both key ids."""
    key, other = os.urandom(KEY_BYTES), os.urandom(KEY_BYTES)
    with pytest.raises(SealedFileError) as info:
        unseal(other, seal(key, PAYLOAD, HEADER), expected={"site": "beta"})
    assert info.value.reason == "wrong-key"
    assert key_id(key) in str(info.value) and key_id(other) in str(info.value)


def test_header_mismatch_names_field_and_values() -> None:
    """An expected header value that differs is refused naming the field and both values."""
    key = os.urandom(KEY_BYTES)
    with pytest.raises(SealedFileError) as info:
        unseal(key, seal(key, PAYLOAD, HEADER), expected={"site": "beta"})
    err = info.value
    assert err.reason == "header-mismatch"
    assert (err.field, err.found, err.expected) == ("site", "alpha", "beta")
    assert "'site'" in str(err) and "alpha" in str(err) and "beta" in str(err)
    assert "0.123456789" not in str(err)


def test_flipped_ciphertext_byte_is_tampered() -> None:
    """Flipping any byte of the nonce, ciphertext or tag is refused as tampered."""
    key = os.urandom(KEY_BYTES)
    blob = seal(key, PAYLOAD, HEADER)
    for index in range(_prefix_len(blob), len(blob)):
        with pytest.raises(SealedFileError) as info:
            unseal(key, _flip(blob, index))
        assert info.value.reason == "tampered"
        assert "0.123456789" not in str(info.value)


def test_flipped_header_byte_never_succeeds() -> None:
    """Flipping any byte of the magic, length or header is refused, never accepted."""
    key = os.urandom(KEY_BYTES)
    blob = seal(key, PAYLOAD, HEADER)
    for index in range(_prefix_len(blob)):
        with pytest.raises(SealedFileError) as info:
            unseal(key, _flip(blob, index), expected=HEADER)
        if index < len(MAGIC):
            assert info.value.reason == "not-sealed"
        elif index < len(MAGIC) + 4:
            assert info.value.reason in {"truncated", "tampered"}
        else:
            # The header is only authenticated at decryption, so a flip that leaves valid
            # canonical JSON reads as what it now says: another key (key-id), a longer file
            # (ciphertext-bytes: "truncated") or another expected value. Never a success.
            allowed = {"tampered", "header-mismatch", "wrong-key", "truncated"}
            assert info.value.reason in allowed


def test_truncated_file_refused_at_every_point() -> None:
    """A file cut short anywhere is refused as truncated."""
    key = os.urandom(KEY_BYTES)
    blob = seal(key, PAYLOAD, HEADER)
    prefix = _prefix_len(blob)
    for cut in (0, 3, 8, 10, 12, prefix - 1, prefix, prefix + 5, prefix + 12, len(blob) - 1):
        with pytest.raises(SealedFileError) as info:
            unseal(key, blob[:cut])
        assert info.value.reason == "truncated", cut


def test_appended_bytes_are_tampered() -> None:
    """Bytes added after the end of a sealed file are refused as tampered."""
    key = os.urandom(KEY_BYTES)
    with pytest.raises(SealedFileError) as info:
        unseal(key, seal(key, PAYLOAD, HEADER) + b"\0")
    assert info.value.reason == "tampered"


def test_not_sealed_file_refused() -> None:
    """Plain content that is not a sealed file is refused as not-sealed."""
    with pytest.raises(SealedFileError) as info:
        unseal(os.urandom(KEY_BYTES), PAYLOAD)
    assert info.value.reason == "not-sealed"
