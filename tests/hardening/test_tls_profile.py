"""The TLS profile of a running server, as an outside scanner (sslyze) sees it."""

from __future__ import annotations

import pytest
from sslyze.plugins.scan_commands import ScanCommand
from sslyze.scanner.models import ServerScanRequest, ServerScanStatusEnum
from sslyze.scanner.scan_command_attempt import ScanCommandAttemptStatusEnum
from sslyze.scanner.scanner import Scanner
from sslyze.server_setting import ServerNetworkLocation

from tests.conftest import ServerProcess

pytestmark = pytest.mark.network

AEAD_MARKERS = ("_GCM_", "CHACHA20_POLY1305")


def test_only_tls12_and_13_with_aead_suites_no_compression_no_renegotiation(
    server: ServerProcess,
) -> None:
    commands = {
        ScanCommand.SSL_2_0_CIPHER_SUITES,
        ScanCommand.SSL_3_0_CIPHER_SUITES,
        ScanCommand.TLS_1_0_CIPHER_SUITES,
        ScanCommand.TLS_1_1_CIPHER_SUITES,
        ScanCommand.TLS_1_2_CIPHER_SUITES,
        ScanCommand.TLS_1_3_CIPHER_SUITES,
        ScanCommand.TLS_COMPRESSION,
        ScanCommand.SESSION_RENEGOTIATION,
        ScanCommand.HEARTBLEED,
        ScanCommand.OPENSSL_CCS_INJECTION,
        ScanCommand.TLS_FALLBACK_SCSV,
    }
    location = ServerNetworkLocation(hostname="localhost", port=server.port, ip_address="127.0.0.1")
    scanner = Scanner()
    scanner.queue_scans([ServerScanRequest(server_location=location, scan_commands=commands)])
    [result] = list(scanner.get_results())
    assert result.scan_status == ServerScanStatusEnum.COMPLETED, result.connectivity_error_trace
    scans = result.scan_result
    assert scans is not None
    for name in (c.value for c in commands):
        attempt = getattr(scans, name)
        assert attempt.status == ScanCommandAttemptStatusEnum.COMPLETED, (name, attempt.error_trace)

    def accepted(attempt: object) -> list[str]:
        suites = attempt.result.accepted_cipher_suites  # type: ignore[attr-defined]
        return [s.cipher_suite.name for s in suites]

    for old in (scans.ssl_2_0_cipher_suites, scans.ssl_3_0_cipher_suites):
        assert accepted(old) == []
    assert accepted(scans.tls_1_0_cipher_suites) == []
    assert accepted(scans.tls_1_1_cipher_suites) == []
    tls12 = accepted(scans.tls_1_2_cipher_suites)
    assert tls12, "TLS 1.2 must stay available"
    assert all(any(m in name for m in AEAD_MARKERS) for name in tls12), tls12
    assert all("ECDHE" in name for name in tls12), tls12
    assert accepted(scans.tls_1_3_cipher_suites)
    assert scans.tls_compression.result is not None
    assert scans.tls_compression.result.supports_compression is False
    renegotiation = scans.session_renegotiation.result
    assert renegotiation is not None
    assert renegotiation.is_vulnerable_to_client_renegotiation_dos is False
    assert renegotiation.supports_secure_renegotiation is True
    assert scans.heartbleed.result is not None
    assert scans.heartbleed.result.is_vulnerable_to_heartbleed is False
    assert scans.openssl_ccs_injection.result is not None
    assert scans.openssl_ccs_injection.result.is_vulnerable_to_ccs_injection is False
    assert scans.tls_fallback_scsv.result is not None
    assert scans.tls_fallback_scsv.result.supports_fallback_scsv is True
