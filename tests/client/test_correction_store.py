"""Tests of client.correction_store: the site's encrypted correction store and its refusals."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import stat
from pathlib import Path
from typing import Any

import pytest

from client.correction_store import (
    CorrectionRefused,
    SiteDirError,
    check_writable,
    correction_path,
    key_path,
    load_correction,
    save_correction,
)
from shared.crypto import MAGIC, create_key_file

SOURCE = hashlib.sha256(b"source model v1").hexdigest()
OTHER_SOURCE = hashlib.sha256(b"source model v2").hexdigest()
SECRETS = ("0.123456789", "2.718281828", "cohort-XJ42")
CORRECTION: dict[str, Any] = {
    "weights": [0.123456789, -2.718281828],
    "bias": 0.5,
    "label": "cohort-XJ42",
}


def _flip(blob: bytes, index: int) -> bytes:
    return blob[:index] + bytes([blob[index] ^ 0x01]) + blob[index + 1 :]


def _prefix_len(blob: bytes) -> int:
    return len(MAGIC) + 4 + int.from_bytes(blob[len(MAGIC) : len(MAGIC) + 4], "big")


def _refusal(site_dir: Path, site: str = "alpha", source: str = SOURCE, **kw: Any) -> Any:
    with pytest.raises(CorrectionRefused) as info:
        load_correction(site_dir, site, source, **kw)
    for secret in SECRETS:
        assert secret not in str(info.value)
    return info.value


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_round_trip(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A saved correction loads back unchanged; files are private; nothing secret is logged."""
    site = tmp_path / "alpha"
    with caplog.at_level(logging.DEBUG):
        path = save_correction(site, "alpha", SOURCE, CORRECTION)
        assert load_correction(site, "alpha", SOURCE) == CORRECTION
    assert path == correction_path(site, SOURCE)
    assert path.name == f"correction-{SOURCE[:16]}.enc"
    assert _mode(path) == 0o600 and _mode(key_path(site)) == 0o600 and _mode(site) == 0o700
    blob = path.read_bytes()
    assert all(secret.encode() not in blob for secret in SECRETS)
    assert all(secret not in caplog.text for secret in SECRETS)


def test_save_replaces_atomically(tmp_path: Path) -> None:
    """Saving again replaces the file, keeps the key and leaves no temporary file."""
    site = tmp_path / "alpha"
    save_correction(site, "alpha", SOURCE, CORRECTION)
    key = key_path(site).read_bytes()
    path = save_correction(site, "alpha", SOURCE, {"bias": 1.0})
    assert load_correction(site, "alpha", SOURCE) == {"bias": 1.0}
    assert key_path(site).read_bytes() == key
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


def test_save_rejects_nan_without_showing_values(tmp_path: Path) -> None:
    """A correction holding NaN is not saved, and the error shows no payload value."""
    site = tmp_path / "alpha"
    with pytest.raises(ValueError, match="NaN") as info:
        save_correction(site, "alpha", SOURCE, {**CORRECTION, "bias": float("nan")})
    assert all(secret not in str(info.value) for secret in SECRETS)
    assert not correction_path(site, SOURCE).exists()


def test_save_rejects_non_json_values(tmp_path: Path) -> None:
    """A correction holding a value JSON cannot store is not saved."""
    with pytest.raises(ValueError, match="tolist"):
        save_correction(tmp_path / "alpha", "alpha", SOURCE, {"w": {1, 2}})


def test_malformed_digest_rejected(tmp_path: Path) -> None:
    """A source digest that is not 64 lowercase hex digits is rejected (no path tricks)."""
    with pytest.raises(ValueError, match="SHA-256"):
        save_correction(tmp_path / "alpha", "alpha", "../../etc/passwd", CORRECTION)


def test_flipped_ciphertext_byte_tampered(tmp_path: Path) -> None:
    """One flipped byte in the ciphertext is refused as tampered."""
    site = tmp_path / "alpha"
    path = save_correction(site, "alpha", SOURCE, CORRECTION)
    blob = path.read_bytes()
    for index in (_prefix_len(blob), _prefix_len(blob) + 20, len(blob) - 20, len(blob) - 1):
        path.write_bytes(_flip(blob, index))
        assert _refusal(site).reason == "tampered"


def test_flipped_header_byte_never_loads(tmp_path: Path) -> None:
    """One flipped byte anywhere in the header is refused, never loaded."""
    site = tmp_path / "alpha"
    path = save_correction(site, "alpha", SOURCE, CORRECTION)
    blob = path.read_bytes()
    allowed = {
        "tampered",
        "truncated",  # a flip in the recorded ciphertext length
        "header-mismatch",
        "foreign-site",
        "other-source-model",
        "wrong-key",
    }
    for index in range(len(MAGIC) + 4, _prefix_len(blob)):
        path.write_bytes(_flip(blob, index))
        assert _refusal(site).reason in allowed


def test_truncated_file_refused(tmp_path: Path) -> None:
    """A correction file cut short at several points is refused as truncated."""
    site = tmp_path / "alpha"
    path = save_correction(site, "alpha", SOURCE, CORRECTION)
    blob = path.read_bytes()
    for cut in (0, 5, 11, _prefix_len(blob) - 3, _prefix_len(blob) + 4, len(blob) - 1):
        path.write_bytes(blob[:cut])
        assert _refusal(site).reason == "truncated", cut


def test_other_sites_file_refused_as_foreign(tmp_path: Path) -> None:
    """Another site's correction copied into this site's folder is refused as foreign-site."""
    alpha, beta = tmp_path / "alpha", tmp_path / "beta"
    theirs = save_correction(beta, "beta", SOURCE, CORRECTION)
    save_correction(alpha, "alpha", SOURCE, {"bias": 0.0})
    shutil.copyfile(theirs, correction_path(alpha, SOURCE))
    err = _refusal(alpha)
    assert err.reason == "foreign-site"
    assert "'beta'" in str(err) and "'alpha'" in str(err)


def test_wrong_key_refused(tmp_path: Path) -> None:
    """A correction read with a different site key is refused as wrong-key."""
    site = tmp_path / "alpha"
    save_correction(site, "alpha", SOURCE, CORRECTION)
    key_path(site).unlink()
    create_key_file(key_path(site))
    assert _refusal(site).reason == "wrong-key"


def test_missing_key_refused(tmp_path: Path) -> None:
    """A missing site key is refused as wrong-key with a message saying it is missing."""
    site = tmp_path / "alpha"
    save_correction(site, "alpha", SOURCE, CORRECTION)
    key_path(site).unlink()
    err = _refusal(site)
    assert err.reason == "wrong-key" and "missing" in str(err)


def test_other_source_model_refused(tmp_path: Path) -> None:
    """A correction fitted on another source model is refused and asks to adapt again."""
    site = tmp_path / "alpha"
    path = save_correction(site, "alpha", SOURCE, CORRECTION)
    err = _refusal(site, source=OTHER_SOURCE, path=path)
    assert err.reason == "other-source-model"
    assert SOURCE[:16] in str(err) and OTHER_SOURCE[:16] in str(err)
    assert "adapt phase again" in str(err)
    # Renamed to where the new source model's correction would be: still refused.
    shutil.copyfile(path, correction_path(site, OTHER_SOURCE))
    assert _refusal(site, source=OTHER_SOURCE).reason == "other-source-model"


def test_not_sealed_file_refused(tmp_path: Path) -> None:
    """A plain JSON file in place of the correction is refused as not-sealed."""
    site = tmp_path / "alpha"
    path = save_correction(site, "alpha", SOURCE, CORRECTION)
    path.write_text('{"bias": 0.5}')
    assert _refusal(site).reason == "not-sealed"


def test_missing_file_refused(tmp_path: Path) -> None:
    """No correction for the current source model is refused as missing."""
    site = tmp_path / "alpha"
    save_correction(site, "alpha", SOURCE, CORRECTION)
    err = _refusal(site, source=OTHER_SOURCE)
    assert err.reason == "missing" and "adapt phase" in str(err)
    assert _refusal(tmp_path / "never-adapted").reason == "missing"


def test_group_readable_key_refused(tmp_path: Path) -> None:
    """A group-readable site key stops loading with the chmod fix."""
    site = tmp_path / "alpha"
    save_correction(site, "alpha", SOURCE, CORRECTION)
    key_path(site).chmod(0o640)
    with pytest.raises(PermissionError, match="chmod 600"):
        load_correction(site, "alpha", SOURCE)


def test_check_writable_creates_folders(tmp_path: Path) -> None:
    """check_writable creates the site folder (0700) and leaves no probe behind."""
    site = tmp_path / "a" / "alpha"
    check_writable(site)
    assert _mode(site) == 0o700
    assert [p.name for p in site.iterdir()] == ["corrections"]
    assert list((site / "corrections").iterdir()) == []


def test_check_writable_under_regular_file(tmp_path: Path) -> None:
    """A site folder that is, or lies under, a regular file is refused (even for root)."""
    blocker = tmp_path / "blocker"
    blocker.write_text("not a folder")
    for site in (blocker, blocker / "alpha", blocker / "sub" / "alpha"):
        with pytest.raises(SiteDirError, match=r"[Nn]ot a directory") as info:
            check_writable(site)
        assert isinstance(info.value, OSError)
        assert not isinstance(info.value, CorrectionRefused)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_check_writable_read_only_folder(tmp_path: Path) -> None:
    """A read-only site folder is refused before training starts."""
    site = tmp_path / "alpha"
    site.mkdir()
    (site / "corrections").mkdir()
    site.chmod(0o500)
    (site / "corrections").chmod(0o500)
    try:
        with pytest.raises(SiteDirError, match="cannot write"):
            check_writable(site)
    finally:
        (site / "corrections").chmod(0o700)
        site.chmod(0o700)


def test_check_writable_write_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A folder that refuses new files (read-only mount, permissions) is reported clearly."""
    real_open = os.open

    def refuse(path: Any, flags: int, mode: int = 0o777) -> int:
        if Path(path).name.startswith(".write-probe-"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, mode)

    monkeypatch.setattr("client.correction_store.os.open", refuse)
    with pytest.raises(SiteDirError, match="cannot write in the site folder") as info:
        check_writable(tmp_path / "alpha")
    assert "Permission denied" in str(info.value)


def test_check_writable_low_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Less than 1 MiB free on the site's disk is refused."""
    real = shutil.disk_usage

    def tiny(path: Any) -> Any:
        usage = real(path)
        return type(usage)(usage.total, usage.used, 1000)

    monkeypatch.setattr("client.correction_store.shutil.disk_usage", tiny)
    with pytest.raises(SiteDirError, match="free"):
        check_writable(tmp_path / "alpha")
