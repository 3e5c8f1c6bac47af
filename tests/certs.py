"""Throwaway PKI for TLS tests, made with `cryptography`: a CA, a server certificate, client certificates.

`make_pki(dir)` writes PEM files and returns their paths. The server certificate
names localhost and 127.0.0.1, so clients dial 127.0.0.1:PORT and verify it.
EC P-256 keys keep generation to milliseconds.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Pki:
    ca_cert: str
    server_cert: str
    server_key: str
    client_cert: str
    """Signed by the CA; common name CLIENT_CN."""
    client_key: str
    rogue_cert: str
    """Signed by a different CA that the server does not trust."""
    rogue_key: str


CLIENT_CN = "radiology-workstation-7"


def make_pki(directory: Path) -> Pki:
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca = _ca("MedHallGuard test CA")
    rogue_ca_key, rogue_ca = _ca("Somebody else's CA")
    server_key, server = _leaf("localhost", ca_key, ca, server=True)
    client_key, client = _leaf(CLIENT_CN, ca_key, ca, server=False)
    rogue_key, rogue = _leaf(CLIENT_CN, rogue_ca_key, rogue_ca, server=False)
    paths = {}
    for name, obj in [("ca_cert", ca), ("server_cert", server), ("client_cert", client), ("rogue_cert", rogue),
                      ("server_key", server_key), ("client_key", client_key), ("rogue_key", rogue_key)]:
        path = directory / f"{name}.pem"
        path.write_bytes(_pem(obj))
        paths[name] = str(path)
    return Pki(**paths)


def _pem(obj) -> bytes:
    if isinstance(obj, x509.Certificate):
        return obj.public_bytes(serialization.Encoding.PEM)
    return obj.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _builder(subject: str, issuer: x509.Name, public_key) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )


def _ca(name: str):
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        _builder(name, subject, key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _leaf(common_name: str, ca_key, ca: x509.Certificate, server: bool):
    key = ec.generate_private_key(ec.SECP256R1())
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        _builder(common_name, ca.subject, key.public_key())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
    return key, builder.sign(ca_key, hashes.SHA256())
