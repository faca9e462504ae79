"""The server's TLS: a self-signed certificate on first start, served with the profile.

Clients pin the certificate's SHA-256 fingerprint on first use, so no
certificate authority is involved (see :mod:`bastion.tlsprofile`).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from bastion.errors import ConfigError
from bastion.tlsprofile import fingerprint, harden

CERT_FILE = "server.crt"
KEY_FILE = "server.key"


def ensure_certificate(data_dir: Path, hosts: list[str], *, now: datetime.datetime) -> Path:
    """Create a self-signed certificate and key in ``data_dir`` unless one exists.

    Returns the certificate's path. The key file is created with mode 0600.
    """
    cert_path = data_dir / CERT_FILE
    key_path = data_dir / KEY_FILE
    if cert_path.exists() and key_path.exists():
        return cert_path
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [x509.DNSName("localhost")]
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            if host != "localhost":
                names.append(x509.DNSName(host))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Bastion server")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=825))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    key_bytes = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key_bytes)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path


def certificate_fingerprint(data_dir: Path) -> str:
    """The fingerprint of the certificate in ``data_dir``; raises ConfigError if absent."""
    cert_path = data_dir / CERT_FILE
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except (OSError, ValueError):
        raise ConfigError(f"no readable certificate in {data_dir}") from None
    return fingerprint(cert.public_bytes(serialization.Encoding.DER))


def server_context(data_dir: Path) -> ssl.SSLContext:
    """An SSL context with the strict profile, loaded with the data dir's certificate."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    harden(ctx)
    ctx.load_cert_chain(data_dir / CERT_FILE, data_dir / KEY_FILE)
    return ctx
