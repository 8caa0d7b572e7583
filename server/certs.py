"""``fedadapt certs``: the coordinator's CA, the SuperLink's TLS certificate, one key pair per site.

Layout written under ``out``::

    ca/ca.crt              the CA certificate        -> to every site and to `flwr` users
    ca/ca.key              the CA's private key      -> stays with the coordinator, offline
    superlink/server.pem   SuperLink certificate     -> SuperLink host
    superlink/server.key   SuperLink private key     -> SuperLink host only
    sites/<site>/auth-key      site private key      -> that site only
    sites/<site>/auth-key.pub  site public key       -> registered at the SuperLink
    WHO-GETS-WHAT.txt      the same, for people

Private keys are written with mode 0600 from the moment they exist (never world-readable, even
briefly) in folders of mode 0700. Existing keys are kept unless ``force`` is given: re-running
the command never silently replaces a key a site is already using.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from shared.files import create_private_file, ensure_private_dir
from shared.protocol import site_name_problem

log = logging.getLogger(__name__)

CURVE = ec.SECP384R1()  # NIST P-384: Flower accepts ECDSA keys on NIST curves
VALID_DAYS = 825
DEFAULT_HOSTS = ("localhost", "127.0.0.1")


@dataclass
class CertFiles:
    """Paths of everything ``make_certs`` wrote or kept."""

    out: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    site_keys: dict[str, tuple[Path, Path]] = field(default_factory=dict)
    written: list[Path] = field(default_factory=list)
    kept: list[Path] = field(default_factory=list)
    guide: Path | None = None


def site_names(n_sites: int, names: Sequence[str] | None = None) -> list[str]:
    """Site names: the given ones, or ``site-1`` ... ``site-N``."""
    if names:
        if len(names) != n_sites:
            raise ValueError(f"{len(names)} site names given for {n_sites} sites")
        problems = [p for n in names if (p := site_name_problem(n))]
        if problems:
            raise ValueError("; ".join(problems))
        if len(set(names)) != len(names):
            raise ValueError("every site needs its own name: " + ", ".join(names))
        return list(names)
    return [f"site-{i}" for i in range(1, n_sites + 1)]


def make_certs(
    out: str | Path,
    n_sites: int,
    hosts: Sequence[str] = (),
    names: Sequence[str] | None = None,
    force: bool = False,
) -> CertFiles:
    """Create (or keep) the CA, the SuperLink certificate and every site's key pair.

    Parameters
    ----------
    out : str or Path
        Folder to write into.
    n_sites : int
        Number of sites.
    hosts : sequence of str
        Names or IP addresses the SuperLink is reached by; ``localhost`` and ``127.0.0.1``
        are always added to the certificate.
    names : sequence of str, optional
        Site names (default ``site-1`` ...).
    force : bool
        Replace existing keys and certificates (sites must then get their new keys).

    Returns
    -------
    CertFiles
        What was written and what was kept.
    """
    out = Path(out)
    files = CertFiles(
        out=out, ca_cert=out / "ca" / "ca.crt", ca_key=out / "ca" / "ca.key",
        server_cert=out / "superlink" / "server.pem", server_key=out / "superlink" / "server.key",
    )
    if force or not (files.ca_key.exists() and files.ca_cert.exists()):
        ca_key = ec.generate_private_key(CURVE)
        ca_cert = _ca_certificate(ca_key)
        _write_private(files.ca_key, _pem_key(ca_key), files, force)
        _write_public(files.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), files)
        new_ca = True
    else:
        ca_key = _load_key(files.ca_key)
        ca_cert = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
        files.kept += [files.ca_key, files.ca_cert]
        new_ca = False
    all_hosts = list(dict.fromkeys([*DEFAULT_HOSTS, *hosts]))
    if force or new_ca or not (files.server_key.exists() and files.server_cert.exists()) or (
        _sans(files.server_cert) != set(all_hosts)
    ):
        server_key = ec.generate_private_key(CURVE)
        cert = _server_certificate(server_key, ca_key, ca_cert, all_hosts)
        _write_private(files.server_key, _pem_key(server_key), files, overwrite=True)
        _write_public(files.server_cert, cert.public_bytes(serialization.Encoding.PEM), files)
    else:
        files.kept += [files.server_key, files.server_cert]
    for name in site_names(n_sites, names):
        private = out / "sites" / name / "auth-key"
        public = private.with_name("auth-key.pub")
        files.site_keys[name] = (private, public)
        if private.exists() and public.exists() and not force:
            files.kept += [private, public]
            continue
        key = ec.generate_private_key(CURVE)
        _write_private(private, key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption()), files, force)
        _write_public(public, key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
            + f" fedadapt-{name}\n".encode(), files)
    files.guide = _write_guide(files, all_hosts)
    return files


def _ca_certificate(key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedadapt federation CA")])
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False, key_agreement=False,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .sign(key, hashes.SHA384())
    )


def _server_certificate(
    key: ec.EllipticCurvePrivateKey, ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate, hosts: Sequence[str],
) -> x509.Certificate:
    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA384())
    )


def _sans(cert_path: Path) -> set[str]:
    """Hosts named by an existing certificate (to reissue it when the host list changed)."""
    if not cert_path.exists():
        return set()
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return {str(v) for v in ext.get_values_for_type(x509.DNSName)} | {
        str(v) for v in ext.get_values_for_type(x509.IPAddress)
    }


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{path} is not an EC private key; re-run with --force to replace it")
    return key


def _write_private(path: Path, data: bytes, files: CertFiles, overwrite: bool) -> None:
    """Write a private key with mode 0600 from creation on."""
    if path.exists():
        if not overwrite:
            raise FileExistsError(f"{path} exists; pass --force to replace it")
        path.unlink()
    create_private_file(path, data)
    files.written.append(path)
    log.info("wrote private key %s (mode 0600)", path)


def _write_public(path: Path, data: bytes, files: CertFiles) -> None:
    ensure_private_dir(path.parent)
    path.write_bytes(data)
    path.chmod(0o644)
    files.written.append(path)


def _write_guide(files: CertFiles, hosts: Sequence[str]) -> Path:
    out = files.out
    lines = [
        "fedadapt federation: which file goes to whom",
        "",
        f"Coordinator (keeps, never sends): {files.ca_key.relative_to(out)} -- the CA's private",
        "  key. Whoever holds it can issue certificates the sites will trust. Keep it offline.",
        "",
        f"SuperLink host: {files.server_cert.relative_to(out)} and "
        f"{files.server_key.relative_to(out)} (private, 0600),",
        f"  plus {files.ca_cert.relative_to(out)}. The certificate is valid for: "
        + ", ".join(hosts) + ".",
        "  Register every site's public key at the SuperLink (flwr supernode register ...).",
        "",
        "Each site (send over a channel you trust, e.g. in person or encrypted mail):",
    ]
    for name, (private, public) in files.site_keys.items():
        lines.append(f"  {name}: {private.relative_to(out)} (private, 0600, for that site only)"
                     f" and {files.ca_cert.relative_to(out)}")
        lines.append(f"  {' ' * len(name)}  {public.relative_to(out)} is registered at the "
                     "SuperLink; it is not secret")
    lines += [
        "",
        f"Anyone who runs `flwr` against the SuperLink needs {files.ca_cert.relative_to(out)}.",
        "Keep the SuperLink's port private: anyone who reaches its control API can register",
        "nodes and submit runs.",
        "",
    ]
    path = out / "WHO-GETS-WHAT.txt"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
