"""Fixtures of the ops suite: a test PKI (made with `cryptography`)."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass
class Pki:
    ca: Path  # the CA the nodes trust
    cert: Path  # node certificate: IP SANs 127.0.0.1-3 (three "boxes"), DNS localhost, server+client auth
    key: Path
    client_cert: Path  # a client certificate signed by the same CA
    client_key: Path
    other_ca: Path  # a CA that signed nothing here
    other_cert: Path  # a client certificate from the other CA
    other_key: Path


def _make_pki(root: Path) -> Pki:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    root.mkdir(parents=True, exist_ok=True)

    def write_key(key, path: Path) -> Path:
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        return path

    def write_cert(cert, path: Path) -> Path:
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return path

    def name(cn: str):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def make_ca(cn: str):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(name(cn))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(key, hashes.SHA256())
        )
        return key, cert

    def make_leaf(ca_key, ca_cert, cn: str, *, server: bool):
        key = ec.generate_private_key(ec.SECP256R1())
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH] + ([ExtendedKeyUsageOID.SERVER_AUTH] if server else [])
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [
                        *(x509.IPAddress(ipaddress.ip_address(f"127.0.0.{i}")) for i in (1, 2, 3)),
                        x509.DNSName("localhost"),
                    ]
                ),
                critical=False,
            )
        return key, builder.sign(ca_key, hashes.SHA256())

    ca_key, ca_cert = make_ca("groupcache test CA")
    node_key, node_cert = make_leaf(ca_key, ca_cert, "groupcache node", server=True)
    client_key, client_cert = make_leaf(ca_key, ca_cert, "groupcache client", server=False)
    other_ca_key, other_ca_cert = make_ca("some other CA")
    other_key, other_cert = make_leaf(other_ca_key, other_ca_cert, "stranger", server=False)
    return Pki(
        ca=write_cert(ca_cert, root / "ca.pem"),
        cert=write_cert(node_cert, root / "node.pem"),
        key=write_key(node_key, root / "node-key.pem"),
        client_cert=write_cert(client_cert, root / "client.pem"),
        client_key=write_key(client_key, root / "client-key.pem"),
        other_ca=write_cert(other_ca_cert, root / "other-ca.pem"),
        other_cert=write_cert(other_cert, root / "stranger.pem"),
        other_key=write_key(other_key, root / "stranger-key.pem"),
    )


@pytest.fixture(scope="session")
def pki(tmp_path_factory) -> Pki:
    return _make_pki(tmp_path_factory.mktemp("pki"))
