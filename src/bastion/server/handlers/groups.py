"""Group frames on the relay: store and forward each group's signed chain, fan out messages.

The relay applies every posted change to the verified state it keeps at the
chain's head (one signature per post, however long the chain), so its member
list is the chain's. It checks, as a courtesy, that members enter with the
account keys it holds; members' clients remain the authority and never take a
member list from the server. A group message is one Megolm ciphertext, queued
once per joined member device.

Consent (docs/protocol.md §8.7): a member the chain names joins only when they
agreed. Added by an accepted contact (and never in that group before), they
join at once; otherwise they get an invitation and nothing else of the group
until they accept it. Added by someone they blocked, they get nothing at all
(to the group it looks like an invitation never answered). Nothing of the
group, room keys included, reaches a member from a member they blocked.
"""

from __future__ import annotations

from bastion.errors import ProtocolError
from bastion.groups.chain import (
    AddMember,
    CreateGroup,
    GroupChange,
    GroupState,
    Leave,
    RemoveMember,
    apply_change,
    decode_change,
    verify_chain,
)
from bastion.protocol import frames
from bastion.protocol.codes import ErrorCode
from bastion.server.core.contact_rules import ACCEPTED, BLOCKED, ContactError, state_of
from bastion.server.handlers._context import Route, Services
from bastion.server.handlers._request import Request
from bastion.server.handlers._services import GroupService
from bastion.server.storage.group_heads import decode_head, encode_head
from bastion.server.storage.groups import (
    PENDING,
    WITHHELD,
    Appended,
    GroupConflictError,
    GroupStore,
)

CHAIN_PAGE = 128
CHAIN_PAGE_BYTES = 160 * 1024
MAX_DEPARTURES_KEPT = 4096


async def load_state(store: GroupStore, group_id: bytes, *, max_members: int) -> GroupState | None:
    """Replay the stored chain (None if the group does not exist)."""
    raw: list[bytes] = []
    while True:
        page = await store.changes(group_id, len(raw) - 1, CHAIN_PAGE)
        raw += page
        if len(page) < CHAIN_PAGE:
            break
    if not raw:
        return None
    return verify_chain((decode_change(r) for r in raw), max_members=max_members)


async def head_state(store: GroupStore, group_id: bytes, *, max_members: int) -> GroupState | None:
    """The verified state at the group's head (None if the group does not exist).

    Read from the stored head; a chain stored before heads were kept is replayed
    once and its head stored.
    """
    stored = await store.head(group_id)
    if stored is not None:
        return decode_head(stored)
    state = await load_state(store, group_id, max_members=max_members)
    if state is not None:
        await store.set_head(group_id, state.seq, encode_head(state))
    return state


async def _take(services: Services, limit: str, key: str, per_hour: float, burst: int) -> bool:
    if await services.bus.take(limit, key, per_hour / 3600.0, burst):
        return True
    services.limit_log.hit(limit, key)
    return False


async def _within_change_limits(
    request: Request,
    services: Services,
    req: int,
    groups: GroupService,
    change: GroupChange,
    *,
    size: int,
) -> bool:
    """Size, chain length and rate of changes; refuses the post and says False if over."""
    user = change.author
    limits = services.limits
    if size > limits.group_max_change_bytes:
        request.refuse(
            req,
            ErrorCode.GROUP_CHANGE_REJECTED,
            f"a group change may have at most {limits.group_max_change_bytes} bytes",
        )
        return False
    if change.seq >= limits.group_max_chain_changes:
        request.refuse(
            req,
            ErrorCode.GROUP_CHANGE_REJECTED,
            f"the group's chain is full ({limits.group_max_chain_changes} changes);"
            " start a new group",
        )
        return False
    if isinstance(change.args, CreateGroup) and not groups.creations.allow(
        user, services.clock.monotonic()
    ):
        services.limit_log.hit("group_creations", user)
        request.refuse(req, ErrorCode.RATE_LIMITED, "too many new groups; try again later")
        return False
    if not await _take(
        services,
        "group_changes_per_account",
        user,
        limits.group_changes_per_account_per_hour,
        limits.group_changes_per_account_burst,
    ) or not await _take(
        services,
        "group_changes_per_group",
        change.group_id.hex(),
        limits.group_changes_per_group_per_hour,
        limits.group_changes_per_group_burst,
    ):
        request.refuse(req, ErrorCode.RATE_LIMITED, "too many changes to groups; try again later")
        return False
    return True


def _entering(change: GroupChange) -> list[tuple[str, bytes]]:
    """Who a change brings into the group, with the account key it names."""
    if isinstance(change.args, CreateGroup):
        return [(m.user, m.key) for m in change.args.members]
    if isinstance(change.args, AddMember):
        return [(change.args.user, change.args.key)]
    return []


async def _entry_states(
    services: Services, groups: GroupService, change: GroupChange, users: list[str]
) -> list[tuple[str, str]]:
    """The not-joined state of each entering user (those who join at once are left out).

    Raises :class:`ContactError` (``rate_limited``) when an invitation would
    break the recipient's flood limits, which are the contact requests' own.
    """
    limits = services.limits
    book = services.contacts
    adder = change.author
    states: list[tuple[str, str]] = []
    for user in users:
        pair = await book.store.pair(user, adder)
        if state_of(pair.mine) == BLOCKED:
            states.append((user, WITHHELD))
            continue
        contact = state_of(pair.mine) == ACCEPTED and state_of(pair.theirs) == ACCEPTED
        before = await groups.store.membership(change.group_id, user)
        if contact and before is None:
            continue  # an accepted contact who never was in this group joins at once
        waiting = await groups.store.pending_invites(user, limits.contact_requests_pending_max)
        if len(waiting) >= limits.contact_requests_pending_max:
            raise ContactError(
                ErrorCode.RATE_LIMITED, f"{user} has too many open invitations; try again later"
            )
        if not await _take(
            services,
            "contact_requests_per_recipient",
            user,
            limits.contact_requests_per_recipient_per_hour,
            limits.contact_requests_per_recipient_burst,
        ):
            raise ContactError(
                ErrorCode.RATE_LIMITED, f"{user} is receiving too many invitations; try again later"
            )
        states.append((user, PENDING))
    return states


async def post_change(request: Request, services: Services, frame: frames.GroupPost) -> None:
    """Check a change against the stored head, append it, notify members and invitees."""
    user, device = request.signed_in()
    groups = services.groups
    limits = services.limits
    change = decode_change(frame.change)
    if change.author != user:
        request.refuse(
            frame.req, ErrorCode.GROUP_CHANGE_REJECTED, "a change must be signed by its poster"
        )
        return
    if not await _within_change_limits(
        request, services, frame.req, groups, change, size=len(frame.change)
    ):
        return
    state = None
    if not isinstance(change.args, CreateGroup):
        state = await head_state(
            groups.store, change.group_id, max_members=limits.group_max_members
        )
        if state is None:
            request.refuse(frame.req, ErrorCode.UNKNOWN_GROUP, "there is no such group")
            return
    after = apply_change(state, change, max_members=limits.group_max_members)
    entering = _entering(change)
    creator = [(user, change.args.creator_key)] if isinstance(change.args, CreateGroup) else []
    for name, key in [*entering, *creator]:
        account = await services.storage.relay.get_account(name)
        if account is None or account.identity_key != key:
            request.refuse(
                frame.req, ErrorCode.UNKNOWN_USER, f"{name} has no account with that key"[:200]
            )
            return
    invites = await _entry_states(services, groups, change, [name for name, _ in entering])
    before_active = await groups.store.active_members(change.group_id) if state else []
    old_not_joined = await groups.store.not_joined(change.group_id) if state else {}
    not_joined = {u: s for u, s in old_not_joined.items() if u in after.members}
    not_joined.update(invites)
    members = sorted(m for m in after.members if m not in not_joined)
    notify = sorted(set(members) | set(before_active))
    now = services.clock.now_ms()
    invite = frames.GroupInvite(
        group_id=change.group_id,
        name=after.name,
        inviter=user,
        members=len(after.members),
        at=now,
    )
    try:
        envelopes = await groups.store.append_change(
            group_id=change.group_id,
            seq=change.seq,
            change=frame.change,
            appended=Appended(
                head=encode_head(after),
                members=members,
                named=sorted(after.members),
                invites=invites,
                inviter=user,
                invite_item=frames.encode_item(frames.GroupInviteItem(invite=invite)),
            ),
            notify=notify,
            sender=user,
            sender_device=device,
            server_ts=now,
            item=frames.encode_item(
                frames.GroupChangeItem(group_id=change.group_id, seq=change.seq)
            ),
        )
    except GroupConflictError as exc:
        request.refuse(frame.req, ErrorCode.GROUP_CONFLICT, str(exc))
        return
    request.reply(
        frames.GroupPosted(
            req=frame.req, seq=change.seq, members=members, invited=sorted(not_joined)
        )
    )
    for envelope in envelopes:
        services.bus.publish(envelope.user, envelope.device_id, envelope)


async def _departure(store: GroupStore, group_id: bytes, user: str) -> int:
    """The seq of the change that ended ``user``'s membership (the last one, if several)."""
    after, found = -1, -1
    while True:
        page = await store.changes(group_id, after, CHAIN_PAGE)
        for raw in page:
            if _removes(raw, user):
                found = decode_change(raw).seq
        if len(page) < CHAIN_PAGE:
            return found
        after = decode_change(page[-1]).seq


async def _departure_seen(groups: GroupService, group_id: bytes, user: str, head_seq: int) -> int:
    """:func:`_departure`, scanned once per (group, user) until the chain grows again."""
    key = (group_id, user)
    kept = groups.departures.get(key)
    if kept is not None and kept[0] == head_seq:
        return kept[1]
    found = await _departure(groups.store, group_id, user)
    if len(groups.departures) >= MAX_DEPARTURES_KEPT:
        del groups.departures[next(iter(groups.departures))]
    groups.departures[key] = (head_seq, found)
    return found


def _removes(raw: bytes, user: str) -> bool:
    """Whether a stored change ends ``user``'s membership (removed, or left)."""
    try:
        change = decode_change(raw)
    except ProtocolError:
        return False
    if isinstance(change.args, RemoveMember):
        return change.args.user == user
    return isinstance(change.args, Leave) and change.author == user


async def fetch_chain(request: Request, services: Services, frame: frames.GroupFetch) -> None:
    """Send a page of a group's chain to a current or former member."""
    user, _ = request.signed_in()
    groups = services.groups
    membership = await groups.store.membership(frame.group_id, user)
    if membership is None:
        request.refuse(frame.req, ErrorCode.UNKNOWN_GROUP, "there is no such group you belong to")
        return
    page = await groups.store.changes(frame.group_id, frame.after_seq, CHAIN_PAGE)
    if not membership:
        # A former member sees the chain up to their own departure, nothing after it.
        head = await head_state(
            groups.store, frame.group_id, max_members=services.limits.group_max_members
        )
        head_seq = -1 if head is None else head.seq
        last = await _departure_seen(groups, frame.group_id, user, head_seq)
        page = [raw for raw in page if decode_change(raw).seq <= last]
    changes: list[bytes] = []
    size = 0
    for raw in page:
        if changes and size + len(raw) > CHAIN_PAGE_BYTES:
            break
        changes.append(raw)
        size += len(raw)
    more = len(changes) < len(page) or len(page) == CHAIN_PAGE
    members = await groups.store.active_members(frame.group_id) if membership else []
    invited = sorted(await groups.store.not_joined(frame.group_id)) if membership else []
    request.reply(
        frames.GroupChain(
            req=frame.req,
            group_id=frame.group_id,
            changes=changes,
            more=more,
            members=members,
            invited=invited,
        )
    )


async def send_message(request: Request, services: Services, frame: frames.GroupSend) -> None:
    """Fan one group ciphertext out to every member device, once per client message id."""
    user, device = request.signed_in()
    groups = services.groups
    if not services.message_rates.allow((user, device), services.clock.monotonic()):
        services.limit_log.hit("messages_per_device", f"{user}/{device}")
        request.refuse(frame.req, ErrorCode.RATE_LIMITED, "sending too fast; slow down")
        return
    members = await groups.store.active_members(frame.group_id)
    if user not in members:
        request.refuse(frame.req, ErrorCode.NOT_A_MEMBER, "you are not a member of that group")
        return
    # Nothing reaches a member from someone they blocked; the sender is not told.
    blocked_me = await groups.store.blocked_by(user)
    item = frames.GroupMessageItem(group_id=frame.group_id, ciphertext=frame.ciphertext)
    server_ts, envelopes = await groups.store.fan_out(
        members=[m for m in members if m not in blocked_me],
        sender=user,
        sender_device=device,
        client_msg_id=frame.client_msg_id,
        server_ts=services.clock.now_ms(),
        item=frames.encode_item(item),
    )
    invited = sorted(await groups.store.not_joined(frame.group_id))
    request.reply(
        frames.GroupSent(req=frame.req, server_ts=server_ts, members=members, invited=invited)
    )
    if envelopes:
        services.metrics.count_messages()
    for envelope in envelopes:
        services.bus.publish(envelope.user, envelope.device_id, envelope)


async def room_key_may_pass(
    services: Services, sender: str, to: str, group_id: bytes, *, blocked_by_recipient: bool
) -> bool:
    """Whether an Olm message on ``group_id``'s room-key path is stored (True) or dropped.

    Both must be joined members of that group. Raises :class:`ContactError`:
    ``not_a_member`` when either is not, ``not_joined`` when ``to`` is named by
    the chain but has not joined (a pending, declined or withheld invitation look
    alike). A recipient who blocked the sender gets nothing; the sender is not told.
    """
    groups = services.groups
    if await groups.store.membership(group_id, sender) is not True:
        raise ContactError(ErrorCode.NOT_A_MEMBER, "you are not a member of that group")
    if await groups.store.membership(group_id, to) is not True:
        if to in await groups.store.not_joined(group_id):
            raise ContactError(ErrorCode.NOT_JOINED, f"{to} has not joined the group yet")
        raise ContactError(ErrorCode.NOT_A_MEMBER, f"{to} is not a member of that group")
    return not blocked_by_recipient


ROUTES = (
    Route(frames.GroupPost, post_change),
    Route(frames.GroupFetch, fetch_chain),
    Route(frames.GroupSend, send_message),
)
