"""The relay's router: one route per client frame, and the refusals of frames it cannot take."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import cast, get_args

import pytest

from bastion.protocol import frames
from bastion.server.app import HANDLER_MODULES, build_relay_router
from bastion.server.config import Limits, ServerConfig
from bastion.server.handlers._context import NullMetrics, Route, Router, build_router
from bastion.server.net.connection import ClientConnection
from bastion.server.net.listener import RelayServer

CLIENT_FRAMES = set(get_args(frames.ClientFrame))


def test_every_frame_a_client_may_send_has_exactly_one_route() -> None:
    router = build_relay_router()
    assert set(router.routes) == CLIENT_FRAMES
    routed = [route.frame for module in HANDLER_MODULES for route in module.ROUTES]
    assert sorted(t.__name__ for t in routed) == sorted(t.__name__ for t in CLIENT_FRAMES)
    assert all(router.routes[route.frame] is route for m in HANDLER_MODULES for route in m.ROUTES)


def test_only_the_frames_of_signing_in_and_the_policy_are_routed_before_sign_in() -> None:
    early = {t for t, route in build_relay_router().routes.items() if route.before_signin}
    assert early == {
        frames.GetPolicy,
        frames.Register,
        frames.SignIn,
        frames.AddDevice,
        frames.LinkJoin,
    }


def test_only_messages_and_acknowledgements_skip_the_task() -> None:
    inline = {t for t, route in build_relay_router().routes.items() if route.inline}
    assert inline == {frames.Send, frames.Ack}


def test_a_frame_routed_twice_is_refused_when_the_router_is_built() -> None:
    async def handler(*_: object) -> None:
        return None

    module = SimpleNamespace(ROUTES=(Route(frames.ContactList, handler),))
    with pytest.raises(ValueError, match="ContactList has two routes"):
        build_router([module, module])  # type: ignore[list-item]


class Probe(ClientConnection):
    """A connection with no socket that keeps what it would send."""

    def __init__(self, server: RelayServer) -> None:
        super().__init__(server)
        self.sent: list[frames.Frame] = []

    def reply(self, frame: frames.Frame) -> None:
        self.sent.append(frame)


def probe(tmp_path: Path, router: Router, *, signed_in: bool) -> Probe:
    server = SimpleNamespace(
        services=SimpleNamespace(metrics=NullMetrics()),
        router=router,
        limits=Limits(),
        config=ServerConfig(data_dir=tmp_path, server_name="relay.test"),
    )
    conn = Probe(cast(RelayServer, server))
    if signed_in:
        conn.session.authenticated("alice", "phone")
    return conn


@pytest.mark.parametrize(
    ("frame", "signed_in", "expected"),
    [
        (
            frames.ContactList(req=7),
            True,
            frames.Error(req=7, code="bad_frame", message="this server does not handle that"),
        ),
        (
            frames.ContactList(req=7),
            False,
            frames.Error(req=7, code="not_signed_in", message="sign in first"),
        ),
        (
            frames.Ack(seqs=[1]),
            False,
            frames.Error(req=None, code="not_signed_in", message="sign in first"),
        ),
        (
            frames.Ack(seqs=[1]),
            True,
            frames.Error(req=None, code="bad_frame", message="this server does not handle that"),
        ),
    ],
)
async def test_a_frame_without_a_route_is_refused_as_before(
    tmp_path: Path, frame: frames.Frame, signed_in: bool, expected: frames.Error
) -> None:
    conn = probe(tmp_path, Router([]), signed_in=signed_in)
    conn.dispatch(frames.encode(frame))
    assert conn.sent == [expected]


async def test_a_signed_in_route_refuses_a_connection_not_signed_in(tmp_path: Path) -> None:
    conn = probe(tmp_path, build_relay_router(), signed_in=False)
    conn.dispatch(frames.encode(frames.QueryKeys(req=3, user="bob")))
    assert conn.sent == [frames.Error(req=3, code="not_signed_in", message="sign in first")]
