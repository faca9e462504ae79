"""A relay that lies on purpose, for the security tests.

Run it like ``bastion server run``::

    python tests/malicious_server.py --data DIR --port N

It runs the real server entry point (store, audit log, sign-in, routing,
signals, shutdown) with one change, made through the server's seam for tests
(:class:`bastion.server.app.Overrides`): each connection is a subclass that
tampers with what it sends (its ``reply``), as chosen by the environment.

``BASTION_TEST_TAMPER``, a comma-separated list of modes:

- ``rewrite-sender``: deliver an envelope as if a device of another connected
  user (neither the sender nor the recipient) had sent it.
- ``flip-byte``: flip one byte in the middle of the ciphertext.
- ``replay``: after delivering an envelope, deliver the same ciphertext again
  under a new sequence number.
- ``redirect``: deliver the ciphertext as usual, and a copy of it to every other
  connected user.
- ``ghost-device``: add a device the server made up to every key query answer
  (well formed, with a certificate signed by a key the server holds instead of
  the account's) and a signed one-time key for it to every key claim.
- ``ghost-sender``: deliver an envelope as if the sender's ghost device sent it.
- ``forge-policy``: flip a bit of the signature on the signed policy.
- ``second-key-answer``: answer each signed-in user's first key query about
  another user named in ``BASTION_TEST_LIE_ABOUT`` truthfully, and every later one with
  an account key the server holds and the ghost device certified under it (plus
  a one-time key for the ghost in key claims).
- ``drop-link-piece``: drop the first sealed link message sent to a connection
  that is not signed in (a joining device), i.e. the first piece of history.
- ``record``: change nothing (recording follows ``BASTION_TEST_RECORD`` alone).

``BASTION_TEST_TAMPER_ONLY``: comma-separated 1-based numbers of the deliveries
to tamper with, counted over the whole process; all of them when unset.

``BASTION_TEST_RECORD``: a file to which every frame the server receives or
sends is appended as a line ``in HEX`` or ``out HEX``.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import logging
import os
import sys
import time
from pathlib import Path
from typing import ClassVar

import msgspec
from picows import WSFrame, WSMsgType, WSTransport

from bastion.crypto.device import DeviceCertificate
from bastion.crypto.olm import OlmDevice
from bastion.crypto.signing import AccountIdentity
from bastion.protocol import frames
from bastion.server import main as server_main
from bastion.server.app import Overrides
from bastion.server.net.connection import ClientConnection

SCRIPT = [sys.executable, str(Path(__file__).resolve())]
TAMPER_ENV = "BASTION_TEST_TAMPER"
ONLY_ENV = "BASTION_TEST_TAMPER_ONLY"
RECORD_ENV = "BASTION_TEST_RECORD"
MODES = frozenset(
    {
        "rewrite-sender",
        "flip-byte",
        "replay",
        "redirect",
        "ghost-device",
        "ghost-sender",
        "forge-policy",
        "second-key-answer",
        "drop-link-piece",
        "record",
    }
)
LIE_ABOUT_ENV = "BASTION_TEST_LIE_ABOUT"
# Sequence numbers of injected deliveries: far above anything the store hands out.
INJECTED_SEQ_BASE = 2**62

log = logging.getLogger("bastion.server.tamper")


@dataclasses.dataclass(frozen=True)
class TamperPlan:
    """What to lie about, and when."""

    modes: frozenset[str]
    only: frozenset[int] | None
    record: Path | None

    @classmethod
    def from_env(cls) -> TamperPlan:
        """Read the plan from the environment; exits with an error on an unknown mode."""
        modes = frozenset(m for m in os.environ.get(TAMPER_ENV, "").split(",") if m)
        if not modes <= MODES:
            sys.exit(f"unknown tamper mode(s): {sorted(modes - MODES)}")
        only_text = os.environ.get(ONLY_ENV, "")
        only = frozenset(int(n) for n in only_text.split(",") if n) if only_text else None
        record = os.environ.get(RECORD_ENV)
        return cls(modes, only, Path(record) if record else None)

    def applies_to(self, delivery: int) -> bool:
        """Whether the ``delivery``-th delivery of this process is tampered with."""
        return self.only is None or delivery in self.only


class GhostDevice:
    """A device the server invents: real keys it holds, certified by the wrong account key."""

    def __init__(self) -> None:
        self.device = OlmDevice.create()
        self.forger = AccountIdentity.generate()
        self.created_at = time.time_ns() // 1_000_000

    @property
    def device_id(self) -> str:
        """The ghost's id, correctly derived from its keys."""
        return self.device.device_id

    def keys_for(self, user: str) -> frames.DeviceKeys:
        """The ghost as a device of ``user``, with a certificate under the server's key."""
        cert = DeviceCertificate.issue(
            self.forger,
            username=user,
            ed25519=self.device.ed25519,
            curve25519=self.device.curve25519,
            created_at=self.created_at,
        )
        return frames.DeviceKeys(
            device_id=cert.device_id,
            ed25519=cert.ed25519,
            curve25519=cert.curve25519,
            created_at=cert.created_at,
            certificate=cert.signature,
        )

    def claimed_key(self) -> frames.ClaimedKey:
        """A fresh one-time key of the ghost, signed by the ghost's device key."""
        [key] = self.device.new_one_time_keys(1)
        return frames.ClaimedKey(
            device_id=self.device_id, key=key.key, signature=key.signature, fallback=False
        )


class TamperingConnection(ClientConnection):
    """The real connection, except for what it sends (see the module docstring).

    It hooks the two public faces of a connection: the picows callback that
    reads frames (to record them) and :meth:`reply`, through which every frame
    a connection sends leaves, deliveries included.
    """

    plan: ClassVar[TamperPlan] = TamperPlan(frozenset(), None, None)
    ghost: ClassVar[GhostDevice | None] = None
    deliveries: ClassVar[itertools.count[int]] = itertools.count(1)
    injected: ClassVar[itertools.count[int]] = itertools.count(INJECTED_SEQ_BASE)
    answered: ClassVar[set[tuple[str, str]]] = set()  # (asker, user) told the truth once
    dropped_link_piece: ClassVar[bool] = False

    # --- recording ----------------------------------------------------------------------------

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type is WSMsgType.BINARY:
            self._record("in", frame.get_payload_as_bytes())
        super().on_ws_frame(transport, frame)

    def _record(self, direction: str, data: bytes) -> None:
        if self.plan.record is not None:
            with self.plan.record.open("a") as out:
                out.write(f"{direction} {data.hex()}\n")

    # --- sending ------------------------------------------------------------------------------

    def reply(self, frame: frames.Frame) -> None:
        if (
            "drop-link-piece" in self.plan.modes
            and isinstance(frame, frames.LinkPush)
            and self.session.username is None
            and not TamperingConnection.dropped_link_piece
        ):
            TamperingConnection.dropped_link_piece = True
            log.warning("tamper.dropped", extra={"mode": "drop-link-piece"})
            return
        if isinstance(frame, frames.Deliver) and frame.seq < INJECTED_SEQ_BASE:
            self._deliver(frame)
        else:
            self._send_out(frame)

    def _send_out(self, frame: frames.Frame) -> None:
        if "second-key-answer" in self.plan.modes and self.ghost is not None:
            frame = self._second_answer(frame, self.ghost)
        elif self.ghost is not None:
            frame = self._add_ghost(frame, self.ghost)
        if "forge-policy" in self.plan.modes and isinstance(frame, frames.PolicyInfo):
            forged = bytes([frame.signature[0] ^ 1]) + frame.signature[1:]
            frame = msgspec.structs.replace(frame, signature=forged)
        if not self.closed and self.transport is not None:
            self._record("out", frames.encode(frame))
        super().reply(frame)

    def _second_answer(self, frame: frames.Frame, ghost: GhostDevice) -> frames.Frame:
        lie_about = set(os.environ.get(LIE_ABOUT_ENV, "").split(","))
        asker = self.session.username
        if (
            isinstance(frame, frames.KeysResult)
            and frame.user in lie_about
            and asker
            and asker != frame.user  # the lie is told to others; a device checking its own list
        ):
            if (asker, frame.user) not in self.answered:
                self.answered.add((asker, frame.user))
                return frame
            return msgspec.structs.replace(
                frame,
                identity_key=ghost.forger.public_bytes,
                devices=[ghost.keys_for(frame.user)],
            )
        if isinstance(frame, frames.ClaimResult) and frame.user in lie_about:
            return msgspec.structs.replace(frame, keys=[*frame.keys, ghost.claimed_key()])
        return frame

    @staticmethod
    def _add_ghost(frame: frames.Frame, ghost: GhostDevice) -> frames.Frame:
        if isinstance(frame, frames.KeysResult):
            return msgspec.structs.replace(
                frame, devices=[*frame.devices, ghost.keys_for(frame.user)]
            )
        if isinstance(frame, frames.ClaimResult):
            return msgspec.structs.replace(frame, keys=[*frame.keys, ghost.claimed_key()])
        return frame

    def _deliver(self, delivery: frames.Deliver) -> None:
        """A delivery from this device's queue (the cursor already counts its real seq)."""
        modes = self.plan.modes
        if not self.plan.applies_to(next(self.deliveries)):
            self._send_out(delivery)
            return
        if "rewrite-sender" in modes:
            impostor = self._bystander(delivery)
            if impostor is None:
                log.warning("tamper.skipped", extra={"mode": "rewrite-sender"})
            else:
                delivery = msgspec.structs.replace(
                    delivery, sender=impostor[0], sender_device=impostor[1]
                )
        if "ghost-sender" in modes and self.ghost is not None:
            delivery = msgspec.structs.replace(delivery, sender_device=self.ghost.device_id)
        if "flip-byte" in modes and delivery.body:
            body = bytearray(delivery.body)
            body[len(body) // 2] ^= 0x01
            delivery = msgspec.structs.replace(delivery, body=bytes(body))
        self._send_out(delivery)
        if "replay" in modes:
            self._send_out(self._injected(delivery))
        if "redirect" in modes:
            for other in self._bystander_connections(delivery):
                other._send_out(self._injected(delivery))

    # --- helpers ------------------------------------------------------------------------------

    def _injected(self, delivery: frames.Deliver) -> frames.Deliver:
        """The same delivery outside the real queue (so the cursor is untouched)."""
        return msgspec.structs.replace(delivery, seq=next(self.injected))

    def _bystander_connections(self, delivery: frames.Deliver) -> list[TamperingConnection]:
        """Signed-in connections of users who are neither the sender nor the recipient."""
        return sorted(
            (
                conn
                for conn in self.server.connections
                if isinstance(conn, TamperingConnection)
                and conn.session.username not in (None, delivery.sender, self.session.username)
                and conn.session.device_id is not None
            ),
            key=lambda conn: (conn.session.username or "", conn.session.device_id or ""),
        )

    def _bystander(self, delivery: frames.Deliver) -> tuple[str, str] | None:
        for conn in self._bystander_connections(delivery):
            if conn.session.username is not None and conn.session.device_id is not None:
                return conn.session.username, conn.session.device_id
        return None


def read_record(path: Path) -> list[tuple[str, bytes]]:
    """The frames a ``BASTION_TEST_RECORD`` file holds, as (``in``/``out``, raw bytes)."""
    if not path.exists():
        return []
    result = []
    for line in path.read_text().splitlines():
        direction, _, data = line.partition(" ")
        result.append((direction, bytes.fromhex(data)))
    return result


def main() -> None:
    """Parse ``--data`` and ``--port``, then run the real server entry point, tampering."""
    parser = argparse.ArgumentParser(description="a relay server that tampers, for tests")
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    plan = TamperPlan.from_env()
    TamperingConnection.plan = plan
    if plan.modes & {"ghost-device", "ghost-sender", "second-key-answer"}:
        TamperingConnection.ghost = GhostDevice()
    # Everything else (store, audit log, signals, shutdown, output) is the real server's.
    server_main.run(
        args.data, "127.0.0.1", args.port, overrides=Overrides(connection=TamperingConnection)
    )


if __name__ == "__main__":
    main()
