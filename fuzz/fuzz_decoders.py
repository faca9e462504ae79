"""Coverage-guided fuzzing of everything that decodes untrusted bytes (atheris, libFuzzer).

The first input byte picks a decoder; the rest is its input. Only each decoder's
documented error may escape: anything else is a crash that libFuzzer saves.

    python fuzz/fuzz_decoders.py -max_total_time=60 [corpus folder]
"""

from __future__ import annotations

import sys

import atheris  # type: ignore[import-untyped]

with atheris.instrument_imports():
    from bastion.errors import ConfigError, FrameError
    from bastion.protocol import frames
    from bastion.server.audit.log import AuditRecordError, parse_record
    from bastion.server.config import parse_config


def _client_frame(data: bytes) -> None:
    try:
        frame = frames.decode_client_frame(data)
    except FrameError:
        return
    # Whatever decodes must encode and decode to the same frame.
    if frames.decode_client_frame(frames.encode(frame)) != frame:
        raise AssertionError("client frame does not round-trip")


def _server_frame(data: bytes) -> None:
    try:
        frames.decode_server_frame(data)
    except FrameError:
        return


def _config(data: bytes) -> None:
    try:
        parse_config(data)
    except ConfigError:
        return


def _audit_record(data: bytes) -> None:
    try:
        parse_record(data)
    except AuditRecordError:
        return


TARGETS = (_client_frame, _server_frame, _config, _audit_record)


def test_one_input(data: bytes) -> None:
    """Feed one input to the decoder its first byte selects."""
    if not data:
        return
    TARGETS[data[0] % len(TARGETS)](data[1:])


def main() -> None:
    """Run libFuzzer with the command-line arguments."""
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
