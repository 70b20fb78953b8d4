"""Development certificates for trying TLS locally (``fanout cert``).

A throwaway certificate authority and a server certificate it signed for
``localhost``, ``127.0.0.1`` and ``::1`` (plus any names given), made with
``cryptography``. Clients trust the CA file (``fanout listen --tls --ca
DIR/ca.pem``); the node serves ``DIR/cert.pem`` and ``DIR/key.pem``. Never
use these in production: the CA key sits next to them, unprotected.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_NAMES = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class DevCert:
    ca: Path        # the CA certificate clients trust
    ca_key: Path
    cert: Path      # the node's certificate (tls_cert)
    key: Path       # and its key (tls_key)


def _name(common_name: str):
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fanout development"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _alt_names(names):
    from cryptography import x509

    out = []
    for name in names:
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            out.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(out)


def _write(path: Path, data: bytes, private: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def make(directory: str | os.PathLike, names=DEFAULT_NAMES, days: int = 825) -> DevCert:
    """Write ca.pem, ca-key.pem, cert.pem and key.pem into ``directory``
    (created if needed, files replaced): a new CA and a certificate for
    ``names`` (host names and IP addresses) that it signed."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID

    names = list(dict.fromkeys(names)) or list(DEFAULT_NAMES)
    now = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(minutes=5)
    until = now + datetime.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("fanout development CA")
    ca = (x509.CertificateBuilder()
          .subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number())
          .not_valid_before(now).not_valid_after(until)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                         critical=False)
          .sign(ca_key, hashes.SHA256()))

    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(_name(names[0])).issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(until)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_alt_names(names), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))

    d = Path(directory)
    out = DevCert(ca=d / "ca.pem", ca_key=d / "ca-key.pem", cert=d / "cert.pem", key=d / "key.pem")
    pem = serialization.Encoding.PEM
    plain = serialization.NoEncryption()
    pkcs8 = serialization.PrivateFormat.PKCS8
    _write(out.ca, ca.public_bytes(pem))
    _write(out.ca_key, ca_key.private_bytes(pem, pkcs8, plain), private=True)
    _write(out.cert, cert.public_bytes(pem))
    _write(out.key, key.private_bytes(pem, pkcs8, plain), private=True)
    return out
