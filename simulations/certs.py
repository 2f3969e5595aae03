"""TLS certificates and SuperNode key pairs for a Flower deployment, made with ``cryptography``.

What Flower 1.42 expects (read from ``flwr/superlink/cli/flower_superlink.py``,
``flwr/supernode/cli/flower_supernode.py`` and ``flwr/cli/supernode/register.py``):

- the SuperLink serves HTTPS with ``--ssl-ca-certfile/--ssl-certfile/--ssl-keyfile`` (PEM); SuperNodes,
  ``flwr`` and the SuperLink's own SuperExec verify it against the CA (``--root-certificates`` /
  ``root-certificates`` in ``config.toml``), so the server certificate names every address they dial
  (here ``127.0.0.1`` and ``localhost``);
- SuperNode authentication uses one NIST elliptic-curve key pair per SuperNode, in OpenSSH format: the
  private key stays at the hospital (``--auth-supernode-private-key``), the public key is registered at the
  SuperLink (``flwr supernode register <key.pub>``).

The CA's private key signs the server certificate only; it never leaves the consortium admin.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# Loopback only: the server certificate is valid for these names and nothing else by default.
DEFAULT_HOSTS = ("127.0.0.1", "localhost")
_SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class ServerCertificates:
    """Paths of the CA certificate and the SuperLink's certificate and key (all PEM)."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


@dataclass(frozen=True)
class SiteKeys:
    """One SuperNode's authentication key pair (OpenSSH format)."""

    site: str
    private_key: Path
    public_key: Path


def check_site_name(name: str) -> str:
    """Return ``name`` if it is usable as a folder and key comment, else raise ``ValueError``."""
    if not _SITE_NAME.match(name):
        raise ValueError(
            f"site name {name!r} is not allowed: use 1-64 letters, digits, '.', '_' or '-' "
            "(starting with a letter or digit), e.g. 'hospital-a'"
        )
    return name


def _write_private(path: Path, data: bytes) -> None:
    """Write key material readable by the owner only (0600), creating the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(path, 0o600)


def _write_public(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _san(hosts: Sequence[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def make_server_certificates(
    folder: Path,
    *,
    hosts: Sequence[str] = DEFAULT_HOSTS,
    valid_days: int = 365,
    organization: str = "DiFUSAL consortium",
    overwrite: bool = False,
) -> ServerCertificates:
    """Create a self-signed CA and a SuperLink server certificate signed by it.

    Parameters
    ----------
    folder:
        Receives ``ca.crt``, ``ca.key``, ``server.crt``, ``server.key`` (keys with mode 0600).
    hosts:
        Addresses the SuperLink is reached at; each becomes a subjectAltName (IP or DNS).
    valid_days:
        Validity of both certificates, in days (at least 1).
    overwrite:
        Replace existing files; by default existing certificates are an error, because every
        SuperNode already trusts the old CA.

    Returns
    -------
    ServerCertificates
        The four paths.
    """
    if valid_days < 1:
        raise ValueError(f"valid_days={valid_days}: certificates must be valid for at least 1 day")
    if not hosts:
        raise ValueError("hosts is empty: name at least the address SuperNodes dial, e.g. 127.0.0.1")
    folder = Path(folder)
    out = ServerCertificates(folder / "ca.crt", folder / "ca.key", folder / "server.crt", folder / "server.key")
    existing = [p for p in (out.ca_cert, out.server_cert) if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"{existing[0]} exists: every SuperNode trusts that CA; pass overwrite=True (--overwrite) to replace it"
        )
    now = dt.datetime.now(dt.timezone.utc)
    not_before, not_after = now - dt.timedelta(minutes=5), now + dt.timedelta(days=valid_days)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization),
                         x509.NameAttribute(NameOID.COMMON_NAME, f"{organization} CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                          encipher_only=False, decipher_only=False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization),
                                 x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_san(hosts), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    _write_private(out.ca_key, _pem_key(ca_key))
    _write_public(out.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM))
    _write_private(out.server_key, _pem_key(server_key))
    _write_public(out.server_cert, server_cert.public_bytes(serialization.Encoding.PEM))
    return out


def make_site_keys(folder: Path, site: str, *, overwrite: bool = False) -> SiteKeys:
    """Create one SuperNode's P-384 key pair in OpenSSH format.

    Parameters
    ----------
    folder:
        Receives ``<site>/node.key`` (mode 0600; stays at the hospital) and ``<site>/node.pub``
        (sent to the consortium admin for registration).
    site:
        The site's name (letters, digits, ``.``, ``_``, ``-``).
    overwrite:
        Replace an existing pair (the old public key must then be unregistered at the SuperLink).

    Returns
    -------
    SiteKeys
        The two paths.
    """
    check_site_name(site)
    out = SiteKeys(site, Path(folder) / site / "node.key", Path(folder) / site / "node.pub")
    if out.private_key.exists() and not overwrite:
        return out  # keep the pair the SuperLink may already have registered
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _write_private(out.private_key, private)
    _write_public(out.public_key, public + f" {site}\n".encode())
    return out


def certificate_hosts(cert_path: Path) -> list[str]:
    """The subjectAltNames (IPs and DNS names) of a PEM certificate, as strings."""
    cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(v) for v in san.get_values_for_type(x509.IPAddress)] + list(san.get_values_for_type(x509.DNSName))
