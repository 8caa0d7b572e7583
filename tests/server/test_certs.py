"""The coordinator's certificates and site keys: valid chain, right names, private, kept."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import (
    load_pem_private_key,
    load_ssh_private_key,
    load_ssh_public_key,
)

from server.certs import make_certs


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_chain_names_and_site_keys(tmp_path: Path) -> None:
    """The CA signs the SuperLink certificate for every host; site keys are OpenSSH ECDSA."""
    files = make_certs(tmp_path, 2, hosts=["fl.example.org", "10.0.0.7"])
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(sans.get_values_for_type(x509.DNSName)) == {"localhost", "fl.example.org"}
    assert set(sans.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("10.0.0.7")}
    assert isinstance(load_pem_private_key(files.server_key.read_bytes(), None),
                      ec.EllipticCurvePrivateKey)
    assert sorted(files.site_keys) == ["site-1", "site-2"]
    for private, public in files.site_keys.values():
        key = load_ssh_private_key(private.read_bytes(), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        assert isinstance(key.curve, ec.SECP384R1)
        assert public.read_text().startswith("ecdsa-sha2-nistp384 ")
        loaded = load_ssh_public_key(public.read_bytes())
        assert isinstance(loaded, ec.EllipticCurvePublicKey)
        assert loaded.public_numbers() == key.public_key().public_numbers()


def test_private_keys_are_private(tmp_path: Path) -> None:
    """Every private key is 0600 in a 0700 folder; certificates and public keys are readable."""
    files = make_certs(tmp_path, 2)
    privates = [files.ca_key, files.server_key, *(p for p, _ in files.site_keys.values())]
    for path in privates:
        assert _mode(path) == 0o600, path
        assert _mode(path.parent) == 0o700, path.parent
    for path in [files.ca_cert, files.server_cert, *(p for _, p in files.site_keys.values())]:
        assert _mode(path) == 0o644, path


def test_rerun_keeps_keys_unless_forced(tmp_path: Path) -> None:
    """A second run keeps every key; --force replaces them; a new host reissues the server cert."""
    first = make_certs(tmp_path, 2)
    before = {p: p.read_bytes() for p in [first.ca_key, *(k for k, _ in first.site_keys.values())]}
    second = make_certs(tmp_path, 2)
    assert all(p.read_bytes() == data for p, data in before.items())
    assert first.ca_key in second.kept
    third = make_certs(tmp_path, 2, hosts=["fl.example.org"])
    assert third.server_cert in third.written and third.ca_key in third.kept
    forced = make_certs(tmp_path, 2, force=True)
    assert all(p.read_bytes() != data for p, data in before.items())
    assert forced.ca_key in forced.written


def test_guide_says_who_gets_what(tmp_path: Path) -> None:
    """The text names each site's private key and warns to keep the CA key."""
    files = make_certs(tmp_path, 2, names=["north", "south"])
    assert files.guide is not None
    text = files.guide.read_text()
    assert "sites/north/auth-key" in text and "sites/south/auth-key" in text
    assert "ca/ca.key" in text and "offline" in text


def test_bad_site_names_are_refused(tmp_path: Path) -> None:
    """Names must be plain site names and match the number of sites."""
    with pytest.raises(ValueError, match="not allowed"):
        make_certs(tmp_path, 1, names=["../evil"])
    with pytest.raises(ValueError, match="2 site names given for 3 sites"):
        make_certs(tmp_path, 3, names=["a", "b"])
