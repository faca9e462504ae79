"""The chat screen: the conversation list, the open conversation, sending and receiving.

Network work runs in Textual workers on the app's event loop; the profile is only
touched from that loop. Nothing here knows the wire format or the crypto.
"""

from __future__ import annotations

import asyncio
from typing import ClassVar

from textual import events, on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widgets import Footer, Input, Label, ListView, ProgressBar

from bastion.client import (
    UNANSWERED,
    Backoff,
    ConnectionStateEvent,
    DevicesChangedEvent,
    Event,
    FeatureEvent,
    HistoryRecord,
    KeyChangedEvent,
    MessageEvent,
    SendRefusedError,
    WarningEvent,
    contacts,
    files,
    groups,
    outbox,
    presence,
    receipts,
    search,
    verification,
)
from bastion.errors import BastionError, KeyChangedError, ServerRefusedError
from bastion.tui.base import PAGE
from bastion.tui.conversations import (
    GROUP_PREFIX,
    conversation_history,
    group_state,
    is_group,
    matches,
    safe_text,
    send_to,
)
from bastion.tui.find import FIND_LIMIT, FindScreen
from bastion.tui.people import PeopleActions
from bastion.tui.screens import HelpScreen
from bastion.tui.transfers import FileActions, offer_text
from bastion.tui.widgets import (
    ContactBar,
    ConversationItem,
    MessageInput,
    MessageLine,
    NoticeLine,
)

SEARCH_LIMIT = 5000
NOTICES_KEPT = 200  # per conversation, for as long as the app runs
RECONNECT_CAP_S = 30.0  # the longest pause between two connection attempts
SENT_AWAY = "sent_away"  # the server closed the connection for another one of this device


class ChatScreen(PeopleActions, FileActions):
    """Conversation list on the left, the open conversation on the right."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("ctrl+n", "new_chat", "New chat", priority=True),
        Binding("ctrl+t", "verify", "Verify", priority=True),
        Binding("ctrl+y", "answer_request", "Answer request", show=False, priority=True),
        Binding("ctrl+r", "search", "Search", priority=True),
        Binding("ctrl+f", "find", "Search all", show=False, priority=True),
        Binding("question_mark", "help", "Keys", priority=True),
        Binding("f1", "help", "Keys", show=False),
        Binding("ctrl+o", "send_file", "File", show=False, priority=True),
        Binding("ctrl+g", "get_file", "Get file", show=False, priority=True),
        Binding("ctrl+p", "presence", "Presence", show=False, priority=True),
        Binding("ctrl+up", "cycle(-1)", "Previous", show=False, priority=True),
        Binding("ctrl+down", "cycle(1)", "Next", show=False, priority=True),
        Binding("pageup", "page_up", show=False, priority=True),
        Binding("pagedown", "page_down", show=False, priority=True),
        Binding("escape", "close_search", show=False),
    ]

    # --- layout -------------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        account = self.client.account
        yield Label(f"Bastion · {account.username}", id="status", markup=False)
        with Horizontal():
            with Vertical(id="sidebar"):
                yield Label("Requests", id="requests-title", classes="section")
                yield ListView(id="requests")  # pending contact requests (contacts feature)
                yield Label("Chats", classes="section")
                yield ListView(id="conversations")
            with Vertical(id="conversation"):
                yield ContactBar("Press Ctrl+N to start a chat.", id="contact")
                yield Input(placeholder="search this conversation", id="search")
                yield VerticalScroll(id="messages")
                yield ProgressBar(id="transfer", show_eta=False)
                yield MessageInput(placeholder="Ctrl+N starts a chat", id="message", disabled=True)
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#search").display = False
        self.query_one("#transfer").display = False
        self.show_requests()
        self.refresh_list()
        ordered = self.index.ordered()
        if ordered:
            self.open_conversation(ordered[0].peer)
        self.stay_connected()

    def on_descendant_focus(self, event: events.DescendantFocus) -> None:
        """Show which pane has the keys: its heading or frame lights up."""
        for pane in ("#sidebar", "#conversation"):
            widget = self.query_one(pane)
            inside = any(node is widget for node in event.widget.ancestors_with_self)
            widget.set_class(inside, "-focused")

    def set_status(self, text: str) -> None:
        """The top line: who is signed in and the connection state."""
        self.query_one("#status", Label).update(
            f"Bastion · {self.client.account.username} · {text}"
        )

    def refresh_list(self) -> None:
        """Redraw the conversation list from the index."""
        view = self.query_one("#conversations", ListView)
        highlighted = view.highlighted_child
        # While the person moves in the list, a redraw keeps their place.
        keep = (
            highlighted.entry.peer
            if view.has_focus and isinstance(highlighted, ConversationItem)
            else self.current
        )
        view.clear()
        selected = None
        for position, entry in enumerate(self.index.ordered()):
            view.append(ConversationItem(entry, presence=self.presence_of(entry.peer)))
            if entry.peer == keep:
                selected = position
        if selected is not None:
            view.index = selected

    # --- a conversation ----------------------------------------------------------------------

    def open_conversation(self, peer: str) -> None:
        """Show ``peer``'s conversation from the local history and focus the input."""
        changed = self.current != peer
        previous = self.current
        self.current = peer
        message = self.query_one("#message", Input)
        if changed:
            self.limit = PAGE
            self.close_search()
            # A draft belongs to its conversation: never carried into another one.
            if previous is not None and message.value:
                self.drafts[previous] = message.value
            message.value = self.drafts.pop(peer, "")
        if self.index.find(peer) is None:
            self.index.touch(peer, at=0, title=self.title_of(peer))
            self.index.save(self.client)
        if self.index.mark_read(peer):
            self.index.save(self.client)
        self.refresh_list()
        self.show_contact()
        self.load_messages()
        if not message.disabled:
            message.focus()

    def title_of(self, peer: str) -> str | None:
        """A group's name (None for a person: their username is the title)."""
        state = group_state(self.client, peer) if is_group(peer) else None
        return None if state is None else state.name

    def show_contact(self) -> None:
        """The contact bar and whether the input is open (it is not while a key change waits)."""
        if self.current is None:
            return
        message = self.query_one("#message", Input)
        if is_group(self.current):
            state = group_state(self.client, self.current)
            member = state is not None and self.client.account.username in state.members
            self.query_one("#contact", ContactBar).show_group(state)
            message.disabled = not member
            name = state.name if state is not None else "this group"
            message.placeholder = f"Message #{name} (Enter sends)"
            return
        contact = self.client.contact(self.current)
        self.query_one("#contact", ContactBar).show(
            self.current, contact, extra=self.relation(self.current)
        )
        blocked = contact is not None and contact.trust == "changed"
        message.disabled = blocked
        asked = contacts.buddy(self.client, self.current)
        if blocked:
            message.placeholder = "Blocked until you review the key change (Ctrl+T)"
        elif asked is not None and asked.state == "pending_out":
            message.placeholder = f"You can write once {self.current} accepts your request"
        else:
            message.placeholder = f"Message {self.current} (Enter sends)"

    def load_messages(self, *, keep: MessageLine | None = None) -> None:
        """(Re)fill the message pane with the last ``limit`` messages."""
        if self.current is None:
            return
        pane = self.query_one("#messages", VerticalScroll)
        pane.remove_children()
        records = conversation_history(self.client, self.current, limit=self.limit)
        now = self.settings.clock()
        query = self.search_query()
        lines = [MessageLine(r, now_ms=now, tz=self.settings.tz) for r in records]
        for line in lines:
            line.display = matches(line.record, query)
        since = (records[0].server_ts or records[0].sent_at) if len(records) >= self.limit else 0
        timed: list[tuple[int, MessageLine | NoticeLine]] = [
            (line.record.server_ts or line.record.sent_at, line) for line in lines
        ]
        timed += [
            (at, NoticeLine(text)) for at, text in self.notices_of(self.current) if at >= since
        ]
        pane.mount_all([line for _, line in sorted(timed, key=lambda x: x[0])])
        if keep is not None:
            anchor = next((x for x in lines if x.record.id == keep.record.id), None)
            if anchor is not None:
                self.call_after_refresh(pane.scroll_to_widget, anchor, top=True, animate=False)
                return
        self.call_after_refresh(pane.scroll_end, animate=False)

    def load_earlier(self) -> bool:
        """Load another page of older messages; False if everything is shown already."""
        if self.current is None:
            return False
        pane = self.query_one("#messages", VerticalScroll)
        shown = list(pane.query(MessageLine))
        if len(shown) < self.limit:
            return False
        self.limit += PAGE
        self.load_messages(keep=shown[0] if shown else None)
        return True

    def add_line(self, record: HistoryRecord) -> None:
        """Show a new or updated message of the open conversation."""
        pane = self.query_one("#messages", VerticalScroll)
        for line in pane.query(MessageLine):
            if line.record.id == record.id:
                line.set_record(record)
                return
        line = MessageLine(record, now_ms=self.settings.clock(), tz=self.settings.tz)
        line.display = matches(record, self.search_query())
        at_end = pane.is_vertical_scroll_end or pane.max_scroll_y == 0
        pane.mount(line)
        if at_end:
            self.call_after_refresh(pane.scroll_end, animate=False)

    def add_notice(self, peer: str, text: str, *, keep: bool = True) -> None:
        """Say something inside ``peer``'s conversation (if open) and as a notification.

        Kept notices come back when the conversation is reloaded (search, reopen);
        ``keep=False`` is for notices the conversation rebuilds from the store itself.
        """
        if keep:
            log = self.notice_log.setdefault(peer, [])
            log.append((self.settings.clock(), text))
            del log[:-NOTICES_KEPT]
        if peer == self.current:
            self.query_one("#messages", VerticalScroll).mount(NoticeLine(text))
        self.notify(safe_text(text), severity="warning", timeout=8, markup=False)

    def notices_of(self, peer: str) -> list[tuple[int, str]]:
        """What was said inside ``peer``'s conversation, with file offers from the store."""
        said = list(self.notice_log.get(peer, []))
        if not is_group(peer):
            said += [
                (offer.received_at, offer_text(offer))
                for offer in files.list_files(self.client)
                if offer.sender == peer
            ]
        return sorted(said, key=lambda x: x[0])

    # --- search -------------------------------------------------------------------------------

    def search_query(self) -> str:
        """What the search field holds ('' when closed)."""
        field = self.query_one("#search", Input)
        return field.value if field.display else ""

    def action_search(self) -> None:
        """Open the search field; searching covers the whole stored conversation."""
        if self.current is None:
            return
        field = self.query_one("#search", Input)
        field.display = True
        field.focus()
        if self.limit < SEARCH_LIMIT:
            self.limit = SEARCH_LIMIT
            self.load_messages()

    @on(Input.Changed, "#search")
    def filter_messages(self, event: Input.Changed) -> None:
        """Show only the messages that match."""
        shown = 0
        for line in self.query(MessageLine):
            line.display = matches(line.record, event.value)
            shown += int(line.display)
        extra = f"search: {shown} found" if event.value.strip() else ""
        if self.current is not None:
            self.query_one("#contact", ContactBar).show(
                self.current, self.client.contact(self.current), extra=extra
            )

    def close_search(self) -> None:
        """Hide the search field and show every message again."""
        field = self.query_one("#search", Input)
        if not field.display:
            return
        field.value = ""
        field.display = False
        for line in self.query(MessageLine):
            line.display = True
        self.show_contact()
        message = self.query_one("#message", Input)
        if not message.disabled:
            message.focus()

    def action_close_search(self) -> None:
        """Esc: close the search."""
        self.close_search()

    def action_find(self) -> None:
        """Ctrl+F: search every conversation; the one chosen opens, filtered to the text."""

        def chosen(found: tuple[str, str] | None) -> None:
            if found is None:
                return
            peer, text = found
            self.open_conversation(peer)
            self.action_search()
            self.query_one("#search", Input).value = text

        self.app.push_screen(
            FindScreen(
                lambda text: search.messages(self.client, text, limit=FIND_LIMIT),
                self.name_of,
                now_ms=self.settings.clock(),
                tz=self.settings.tz,
            ),
            chosen,
        )

    def name_of(self, peer: str) -> str:
        """How the conversation list names a conversation: a username, or ``#`` and a group."""
        if not is_group(peer):
            return peer
        return "#" + (self.title_of(peer) or "unknown group")

    # --- keys ---------------------------------------------------------------------------------

    def action_help(self) -> None:
        """``?`` (on an empty message line, or anywhere else) and F1 show the keys."""
        self.app.push_screen(HelpScreen())

    def action_cycle(self, step: int) -> None:
        """Open the previous or next conversation in the list."""
        ordered = [e.peer for e in self.index.ordered()]
        if not ordered:
            return
        position = ordered.index(self.current) if self.current in ordered else -step
        self.open_conversation(ordered[(position + step) % len(ordered)])

    def action_page_up(self) -> None:
        """Scroll up; at the top, load older messages from the local store."""
        pane = self.query_one("#messages", VerticalScroll)
        if pane.scroll_y <= 0 and self.load_earlier():
            return
        pane.scroll_page_up(animate=False)

    def action_page_down(self) -> None:
        """Scroll down."""
        self.query_one("#messages", VerticalScroll).scroll_page_down(animate=False)

    @on(ListView.Selected, "#conversations")
    def select_conversation(self, event: ListView.Selected) -> None:
        """Open the chosen conversation."""
        if isinstance(event.item, ConversationItem):
            self.open_conversation(event.item.entry.peer)

    # --- sending ------------------------------------------------------------------------------

    @on(Input.Submitted, "#message")
    def submit(self, event: Input.Submitted) -> None:
        """Enter: send what was typed to the open conversation."""
        text = event.value.strip()
        if not text or self.current is None:
            return
        event.input.value = ""
        self.send(self.current, text)

    @work(group="send")
    async def send(self, peer: str, text: str) -> None:
        """Encrypt and send; the line shows 'sending…' until the server stored it."""
        async with self.send_lock:
            try:
                record = await send_to(self.client, peer, text)
            except KeyChangedError as exc:
                self.restore_draft(peer, text)
                self.show_contact()
                self.review_key_change(exc.user)
                return
            except SendRefusedError as exc:
                # Shown as NOT SENT in the conversation; Enter on the draft retries it.
                self.restore_draft(peer, text)
                if peer == self.current:
                    self.add_line(exc.record)
                self.notify(
                    f"Not sent to {peer}: {exc}. The text is back in {peer}'s input.",
                    severity="error",
                    timeout=12,
                    markup=False,
                )
                return
            except (BastionError, ValueError) as exc:
                kept = self.kept_copy(exc, peer, text)
                if kept is not None:
                    # Sent again on its own when the connection is back: no retyping.
                    if peer == self.current:
                        self.add_line(kept)
                    self.notify(
                        "The connection dropped before the server confirmed this message; "
                        "it is kept and goes out when the connection is back.",
                        severity="warning",
                        timeout=8,
                    )
                    return
                self.restore_draft(peer, text)
                self.notify(
                    f"Not sent to {peer}: {exc}. The text is back in {peer}'s input.",
                    severity="error",
                    timeout=12,
                    markup=False,
                )
                return
            finally:
                self.flush_notices()
        self.index.touch(peer, at=record.server_ts or record.sent_at)
        self.index.save(self.client)
        if peer == self.current:
            self.add_line(record)
        self.refresh_list()

    def kept_copy(self, exc: Exception, peer: str, text: str) -> HistoryRecord | None:
        """The kept message if ``exc`` means the server never answered, else None."""
        if not isinstance(exc, ServerRefusedError) or exc.code not in UNANSWERED:
            return None
        kept = [r for r in outbox.kept_messages(self.client) if r.peer == peer and r.text == text]
        return kept[-1] if kept else None

    def open_latest(self) -> None:
        """With no conversation open yet (a new or freshly linked device), open the latest."""
        ordered = self.index.ordered()
        if self.current is None and ordered:
            self.open_conversation(ordered[0].peer)

    def ring(self, peer: str) -> None:
        """The terminal bell for news in a conversation that is not on screen (if on)."""
        if self.settings.bell and peer != self.current:
            self.app.bell()

    def flush_notices(self) -> None:
        """Show what the client library noted while sending (e.g. a group member's warning)."""
        while self.client.notices:
            self.handle(self.client.notices.pop(0))

    def add_groups(self) -> None:
        """List every group this device knows."""
        for state in groups.groups(self.client):
            key = groups.conversation(state.group_id)
            entry = self.index.find(key)
            if entry is None or entry.title != state.name:
                self.index.touch(key, at=0, title=state.name)
        self.index.save(self.client)
        self.refresh_list()

    def restore_draft(self, peer: str, text: str) -> None:
        """Put an unsent message back into its own conversation's input; nothing is lost.

        If another conversation is open, it waits as that conversation's draft.
        """
        message = self.query_one("#message", Input)
        if peer == self.current:
            message.value = f"{text} {message.value}" if message.value else text
        else:
            old = self.drafts.get(peer, "")
            self.drafts[peer] = f"{text} {old}" if old else text

    # --- receiving ----------------------------------------------------------------------------

    def reconnect(self) -> None:
        """Drop the connection and sign in again."""
        self.stay_connected()

    @work(exclusive=True, group="network")
    async def stay_connected(self) -> None:
        """Sign in, receive, and sign in again after a lost connection, with growing pauses.

        The pauses start at the ``reconnect_delay_s`` setting and grow to a cap
        (:class:`~bastion.client.Backoff`). A server that is not the pinned one,
        or a refused sign-in, stops it: never retried into (fail closed).
        """
        client = self.client
        receipts.enable(client)  # tell contacts when their messages arrived
        base = self.settings.reconnect_delay_s
        backoff = Backoff(base_s=base, cap_s=max(RECONNECT_CAP_S, base))
        self.set_status("connecting…")
        while True:
            try:
                async for event in client.stay_connected(backoff=backoff):
                    if isinstance(event, ConnectionStateEvent):
                        await self.connection_changed(event)
                    else:
                        self.handle(event)
            except ServerRefusedError as exc:
                if exc.code != SENT_AWAY:
                    self.not_connecting(exc)
                    return
                # Another connection of this device took over (another bastion command on
                # this profile): come back after a pause, which grows if it keeps happening.
                delay = backoff.next_delay()
                self.set_status(f"offline ({exc}); reconnecting in {delay:.1f} s")
                await asyncio.sleep(delay)
            except BastionError as exc:
                self.not_connecting(exc)
                return

    def not_connecting(self, exc: BastionError) -> None:
        """The connection cannot come back by trying again: say why, and stop."""
        self.set_status("not connected")
        self.notify(f"Not connecting: {exc}", severity="error", timeout=30, markup=False)

    async def connection_changed(self, event: ConnectionStateEvent) -> None:
        """Show the connection's state; once signed in, catch up on what the server knows."""
        if event.state == "reconnecting":
            self.set_status(f"offline ({event.reason}); reconnecting in {event.retry_in_s:.1f} s")
            return
        self.set_status("online")
        await self.sync_contacts()
        self.add_groups()
        self.open_latest()
        for record in event.failed:
            self.add_notice(record.peer, f"A message to {record.peer} could not be sent.")
        for record in event.sent:  # kept messages the server has now confirmed
            if record.peer == self.current:
                self.add_line(record)

    def handle(self, event: Event) -> None:
        """Show one event from the client library."""
        if isinstance(event, MessageEvent):
            record = event.record
            incoming = record.direction == "in"
            self.index.touch(
                record.peer,
                at=record.server_ts or record.sent_at,
                unread=incoming and record.peer != self.current,
                title=self.title_of(record.peer),
            )
            self.index.save(self.client)
            if record.peer == self.current:
                self.add_line(record)
            elif incoming:
                self.ring(record.peer)
            self.refresh_list()
            self.open_latest()
        elif isinstance(event, KeyChangedEvent):
            self.index.touch(event.user, at=event.at)
            self.index.save(self.client)
            self.refresh_list()
            if event.user == self.current:
                self.show_contact()
            self.add_notice(
                event.user,
                f"{event.user}'s account key changed. Messages are held until you review it "
                "(Ctrl+T).",
            )
            self.review_key_change(event.user)
        elif isinstance(event, WarningEvent):
            self.add_notice(
                event.sender,
                f"A message claiming to be from {event.sender} was rejected: {event.reason}",
            )
        elif isinstance(event, DevicesChangedEvent):
            parts = [f"added {', '.join(event.added)}"] if event.added else []
            parts += [f"removed {', '.join(event.removed)}"] if event.removed else []
            self.add_notice(event.user, f"{event.user}'s devices changed: {'; '.join(parts)}")
            if event.own_account and event.added:
                self.notify(
                    f"A new device was added to YOUR account: {', '.join(event.added)}. "
                    "If this was not you, someone holds your account key: revoke it "
                    f"(bastion devices revoke {event.added[0]}) and move to a new account.",
                    severity="error",
                    timeout=60,
                )
        elif isinstance(event, contacts.ContactRequestEvent):
            self.show_requests()
            self.notify(
                f"{event.user} asks to be your contact: press Ctrl+Y to answer.", timeout=15
            )
            self.ring(event.user)
        elif isinstance(event, contacts.ContactChangedEvent | presence.PresenceEvent):
            if isinstance(event, contacts.ContactChangedEvent):
                self.notify(safe_text(event.describe()), timeout=8, markup=False)
                if event.state == "accepted":
                    if self.index.find(event.user) is None:
                        self.index.touch(event.user, at=event.at)
                        self.index.save(self.client)
                    self.resync_contacts()
            self.show_requests()
            self.refresh_list()
            self.show_contact()
        elif isinstance(event, files.FileEvent):
            self.index.touch(event.sender, at=event.at, unread=event.sender != self.current)
            self.index.save(self.client)
            self.refresh_list()
            self.ring(event.sender)
            offer = next((f for f in files.list_files(self.client) if f.id == event.id), None)
            if offer is not None:
                self.add_notice(event.sender, offer_text(offer), keep=False)
        elif isinstance(event, verification.VerificationRequestEvent):
            self.add_notice(
                event.user,
                f"{event.user} asks to verify live: press Ctrl+T in your chat with "
                f"{event.user}, then Compare emoji live.",
            )
            self.ring(event.user)
        elif isinstance(event, groups.GroupChangeEvent):
            self.add_groups()
            self.add_notice(GROUP_PREFIX + event.group_id, event.describe())
        elif isinstance(event, receipts.DeliveredEvent):
            if event.peer == self.current:
                self.load_messages()  # 'sent' becomes 'delivered'
        elif isinstance(event, FeatureEvent):
            self.notify(safe_text(event.describe()), timeout=8, markup=False)
