"""Frames the relay writes together in one TLS record are framed by hand (RFC 6455 section 5.2).

A server frame is never masked; its length takes 7 bits below 126 bytes, then a
16-bit field (marker 126), then a 64-bit field (marker 127). A client reading
several frames from one record must find each boundary exactly.
"""

from __future__ import annotations

import struct

import pytest

from bastion.server.net.connection import _binary_frame


def read_frames(data: bytes) -> list[bytes]:
    """Split a byte stream into binary frame payloads, checking each header (a reference reader)."""
    payloads = []
    while data:
        first, second = data[0], data[1]
        assert first == 0x82, "FIN set, no extension bits, binary opcode"
        assert second & 0x80 == 0, "a server frame is never masked"
        size, offset = second & 0x7F, 2
        if size == 126:
            (size,) = struct.unpack_from("!H", data, 2)
            offset = 4
            assert size >= 126, "the shortest length form must be used"
        elif size == 127:
            (size,) = struct.unpack_from("!Q", data, 2)
            offset = 10
            assert size >= 1 << 16, "the shortest length form must be used"
        payloads.append(data[offset : offset + size])
        assert len(payloads[-1]) == size, "truncated frame"
        data = data[offset + size :]
    return payloads


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65_535, 65_536, 70_000])
def test_every_length_form_round_trips_alone_and_back_to_back(size: int) -> None:
    payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
    assert read_frames(_binary_frame(payload)) == [payload]
    stream = _binary_frame(b"before") + _binary_frame(payload) + _binary_frame(b"after")
    assert read_frames(stream) == [b"before", payload, b"after"]
