"""The TLS profile shared by server and clients, and certificate fingerprints.

TLS 1.2 and 1.3 only; on 1.2, only ECDHE key exchange with AEAD suites
(AES-GCM, ChaCha20-Poly1305); no compression, no renegotiation.
"""

from __future__ import annotations

import hashlib
import ssl

TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"


def fingerprint(cert_der: bytes) -> str:
    """The ``SHA256:<64 hex>`` fingerprint of a DER certificate."""
    return "SHA256:" + hashlib.sha256(cert_der).hexdigest()


def harden(ctx: ssl.SSLContext) -> None:
    """Apply the profile to a context."""
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(TLS12_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION | ssl.OP_CIPHER_SERVER_PREFERENCE


def pinning_client_context() -> ssl.SSLContext:
    """A client context whose trust anchor is the pinned fingerprint, not a CA.

    The caller must compare the peer certificate's fingerprint with the pin
    right after the handshake and before sending anything.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    harden(ctx)
    ctx.check_hostname = False  # trust is the pinned fingerprint, checked after the handshake
    ctx.verify_mode = ssl.CERT_NONE  # no CA: the pin is the trust anchor (see docstring)
    return ctx
