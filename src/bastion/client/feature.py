"""How features plug into the client core: :class:`Feature`, :class:`Hooks`, :class:`ClientCore`.

A feature (verification, receipts, contacts, presence, files, groups...) is a
module that exposes a ``FEATURE`` object. The core calls its ``install`` once,
when a :class:`~bastion.client.client.Client` is built, with the client (seen
through the narrow :class:`ClientCore`) and the client's :class:`Hooks`; the
feature registers its handlers there and nowhere else. Nothing registers itself
at import, and no feature imports the core module: the client is handed in.

What the hooks are called with has passed every check of the core already: a
payload handler sees a payload that was decrypted, verified against the sender
device's certified key, and found not to be a replay, and it runs inside the
profile transaction that stores it (so whatever it writes is kept or dropped
with the message). A :class:`~bastion.client.events.KeyChangedEvent` is never
acknowledged, whichever hooks are installed.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Generic, Protocol, TypeVar

from bastion.client.events import Event
from bastion.client.group_keys import GroupPlaintext
from bastion.client.profile import Profile
from bastion.client.records import AccountInfo, ContactRecord, DeviceEntry, HistoryRecord
from bastion.client.transport import ServerConnection
from bastion.crypto.olm import OlmDevice
from bastion.crypto.payload import Payload
from bastion.crypto.signing import AccountIdentity
from bastion.protocol import frames

if TYPE_CHECKING:
    from collections.abc import Sequence

K = TypeVar("K")
V = TypeVar("V")

# A checked end-to-end payload of one kind, its sender device and envelope; it runs in the
# transaction that stores the message.
PayloadHandler = Callable[[Payload, DeviceEntry, frames.Deliver], Event | None]
# A server push of one frame type (not an envelope).
PushHandler = Callable[[frames.Frame], Awaitable[Event | None]]
# An envelope that is not an Olm message (``Deliver.kind`` beyond 0 and 1, and the room-key path).
EnvelopeHandler = Callable[[frames.Deliver], Awaitable[Event | None]]
# A checked group message of one kind beyond text; runs in the storing transaction.
GroupPayloadHandler = Callable[[GroupPlaintext, frames.Deliver], Event | None]
# A group item other than a message or a chain notice (an invitation, say).
GroupItemHandler = Callable[[frames.Deliver, frames.GroupItem], Event | None]
# Run right after sign-in; a failure closes the connection.
ConnectHook = Callable[[], Awaitable[None]]
# Run by receive() with the events of each stored batch, before they are shown.
BatchHook = Callable[[list[Event]], Awaitable[None]]


class Registry(Generic[K, V]):
    """Handlers by key; each key is claimed once, so two features never share a kind."""

    def __init__(self, what: str) -> None:
        self._what = what
        self._handlers: dict[K, V] = {}

    def add(self, key: K, handler: V) -> None:
        """Claim ``key`` for ``handler``; raises ValueError if another handler has it."""
        if key in self._handlers:
            raise ValueError(f"{self._what} {key!r} already has a handler")
        self._handlers[key] = handler

    def get(self, key: K) -> V | None:
        """The handler of ``key``, if one was added."""
        return self._handlers.get(key)

    def __contains__(self, key: object) -> bool:
        return key in self._handlers

    def __iter__(self) -> Iterator[K]:
        return iter(self._handlers)


@dataclass(slots=True)
class Hooks:
    """Every extension point of the client core, filled by the features' ``install``."""

    payloads: Registry[str, PayloadHandler] = field(
        default_factory=lambda: Registry("payload kind")
    )
    pushes: Registry[type[frames.Frame], PushHandler] = field(
        default_factory=lambda: Registry("push frame")
    )
    envelopes: Registry[int, EnvelopeHandler] = field(
        default_factory=lambda: Registry("envelope kind")
    )
    # Filled by features built on groups (files); read by the group feature when a message
    # of that kind arrives, so neither imports the other's receiving side.
    group_payloads: Registry[str, GroupPayloadHandler] = field(
        default_factory=lambda: Registry("group payload kind")
    )
    group_items: Registry[type[frames.GroupItem], GroupItemHandler] = field(
        default_factory=lambda: Registry("group item")
    )
    on_connect: list[ConnectHook] = field(default_factory=list)
    on_batch: list[BatchHook] = field(default_factory=list)


class ClientCore(Protocol):
    """What features use of the client, and nothing more."""

    @property
    def profile(self) -> Profile:
        """The unlocked encrypted profile."""
        ...

    @property
    def account(self) -> AccountInfo:
        """This device's account, server and device id."""
        ...

    def notify(self, *events: Event) -> None:
        """Report ``events`` ahead of the one being handled (or on the next receive)."""
        ...

    @property
    def extensions(self) -> dict[str, object]:
        """Per-client state of features, by a name each feature owns."""
        ...

    def identity(self) -> AccountIdentity:
        """The account identity key (private)."""
        ...

    def device(self) -> OlmDevice:
        """This device's Olm account (private)."""
        ...

    def contact(self, user: str) -> ContactRecord | None:
        """The pinned record of a user, if any."""
        ...

    async def devices_of(
        self, user: str, *, publish_missing_list: bool = True
    ) -> list[DeviceEntry]:
        """A user's devices whose certificates verify under the pinned account key."""
        ...

    def connection(self) -> ServerConnection:
        """The open server connection; raises ServerRefusedError ``disconnected``."""
        ...

    async def request(self, frame: frames.Frame) -> frames.ServerFrame:
        """Send ``frame`` with a fresh request number and wait for its answer."""
        ...

    async def send_payload(
        self,
        to: str,
        kind: str,
        body: str,
        *,
        history: bool = True,
        group_id: bytes | None = None,
    ) -> HistoryRecord:
        """Encrypt a signed payload of ``kind`` to every device of ``to`` and our others."""
        ...

    async def send_payload_to_devices(
        self,
        to: str,
        theirs: list[DeviceEntry],
        mine: list[DeviceEntry],
        kind: str,
        body: str,
        *,
        group_id: bytes | None = None,
    ) -> HistoryRecord:
        """Encrypt a signed payload of ``kind`` to exactly ``theirs`` and ``mine``."""
        ...


class Feature(Protocol):
    """A part of the client built on the core; its module exposes one as ``FEATURE``."""

    @property
    def name(self) -> str:
        """A short name, unique among the installed features."""
        ...

    def install(self, client: ClientCore, hooks: Hooks) -> None:
        """Register this feature's handlers for ``client`` in ``hooks``."""
        ...


@dataclass(frozen=True, slots=True)
class FeatureSpec:
    """A :class:`Feature` made of a name and an install function (what most modules need)."""

    name: str
    install: Callable[[ClientCore, Hooks], None]


def install_all(features: Sequence[Feature], client: ClientCore) -> Hooks:
    """Fresh hooks with every feature installed, in order; raises ValueError on a duplicate name."""
    hooks = Hooks()
    names: set[str] = set()
    for feature in features:
        if feature.name in names:
            raise ValueError(f"the feature {feature.name!r} is installed twice")
        names.add(feature.name)
        feature.install(client, hooks)
    return hooks
