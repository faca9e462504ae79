"""The people part of the chat screen: contact requests, presence, verification, key changes."""

from __future__ import annotations

import asyncio

from textual import on, work
from textual.widgets import Input, ListView

from bastion.client import comparison, contacts, presence, trust, verification
from bastion.errors import BastionError, KeyChangedError, StateError
from bastion.tui.base import ChatScreenBase
from bastion.tui.conversations import is_group
from bastion.tui.screens import (
    KeyChangeScreen,
    NewChatScreen,
    PresenceScreen,
    RequestScreen,
    SasScreen,
)
from bastion.tui.verify_screens import VerifyScreen
from bastion.tui.widgets import RequestItem


class PeopleActions(ChatScreenBase):
    """Who you talk to: requests, presence, safety numbers and changed keys."""

    def show_requests(self) -> None:
        """The pending contact requests on top of the list; hidden while there are none."""
        view = self.query_one("#requests", ListView)
        view.clear()
        pending = [c for c in contacts.local_contacts(self.client) if c.state == "pending-in"]
        for contact in pending:
            view.append(RequestItem(contact.user, contact.note))
        view.display = bool(pending)
        if pending:
            view.index = 0
        self.query_one("#requests-title").display = bool(pending)

    def presence_of(self, user: str) -> str | None:
        """online / away / busy / offline for an accepted contact, None for anyone else."""
        record = contacts.buddy(self.client, user)
        if record is None or record.state != "accepted":
            return None
        state, _status = contacts.combined(record, contacts.presence_record(self.client, user))
        return state

    def relation(self, user: str) -> str:
        """What the contact bar adds about the contact relation, if anything."""
        record = contacts.buddy(self.client, user)
        if record is None:
            return "Not a contact yet: Ctrl+N sends a request."
        if record.state == "pending_out":
            return "Request sent; you can write once they accept."
        if record.state == "pending_in":
            return "They asked to be your contact: answer on the left."
        if record.state == "blocked":
            return "Blocked."
        presence_state = self.presence_of(user)
        status = contacts.presence_record(self.client, user).status
        return f"{presence_state}" + (
            f": {status}" if status and presence_state != "offline" else ""
        )

    def action_presence(self) -> None:
        """Ctrl+P: set presence and the status line."""
        mine = presence.own(self.client)

        def chosen(choice: tuple[str, str | None] | None) -> None:
            if choice is not None:
                self.set_presence(*choice)

        self.app.push_screen(PresenceScreen(mine.state, mine.status), chosen)

    @work(group="presence")
    async def set_presence(self, state: str, status: str | None) -> None:
        """Tell the server and every accepted contact."""
        try:
            missed = await presence.set_presence(self.client, state, status)
        except (BastionError, ValueError) as exc:
            self.notify(f"Presence not changed: {exc}", severity="error")
            return
        self.notify(f"You are {state}." + (f" Not told: {', '.join(missed)}." if missed else ""))

    @on(ListView.Selected, "#requests")
    def answer_request(self, event: ListView.Selected) -> None:
        """Open a pending contact request."""
        item = event.item
        if isinstance(item, RequestItem):
            self.open_request(item.user, item.note)

    def action_answer_request(self) -> None:
        """Ctrl+Y: open the newest pending contact request, wherever the focus is."""
        pending = [c for c in contacts.local_contacts(self.client) if c.state == "pending-in"]
        if not pending:
            self.notify("No contact request is waiting.")
            return
        newest = pending[-1]
        self.open_request(newest.user, newest.note)

    def open_request(self, user: str, note: str) -> None:
        """The accept / decline / later dialog for ``user``'s request."""

        def decided(action: str | None) -> None:
            if action is not None:
                self.act_on_request(user, action)

        self.app.push_screen(RequestScreen(user, note), decided)

    @work(group="contacts")
    async def act_on_request(self, user: str, action: str) -> None:
        """Accept or decline a request; an accepted contact's chat opens."""
        try:
            await contacts.act(self.client, user, action)
        except (BastionError, ValueError) as exc:
            self.notify(f"Could not {action} {user}: {exc}", severity="error")
            return
        self.show_requests()
        if action == "accept":
            self.open_conversation(user)
            self.resync_contacts()  # their online state comes with the list

    @work(group="contacts")
    async def resync_contacts(self) -> None:
        """Fetch the contact list (states and who is online) and redraw."""
        try:
            await contacts.sync(self.client)
        except BastionError as exc:
            self.notify(f"Contacts not updated: {exc}", severity="warning")
            return
        self.show_requests()
        self.refresh_list()
        self.show_contact()

    def action_new_chat(self) -> None:
        """Ctrl+N: ask for a username, then open (and pin their key, when online)."""

        def chosen(choice: tuple[str, str] | None) -> None:
            if choice is None:
                return
            user, note = choice
            if user == self.client.account.username:
                self.notify("That is you: pick someone else.")
                return
            self.start_chat(user, note)

        self.app.push_screen(NewChatScreen(), chosen)

    @work(group="keys")
    async def start_chat(self, user: str, note: str = "") -> None:
        """Pin ``user``'s key and ask them to be a contact if they are not, then open the chat.

        Someone already asked is not asked again; someone who asked us gets their
        request shown to answer.
        """
        if self.client.connected:
            try:
                await trust.pinned_contact(self.client, user)
            except KeyChangedError:
                pass  # the badge and the block say what to do
            except BastionError as exc:
                self.notify(f"Cannot start a chat with {user}: {exc}", severity="error")
                return
            record = contacts.buddy(self.client, user)
            if record is not None and record.state == "pending_out":
                self.notify(f"You asked {user} already; you can write once they accept.")
            elif record is not None and record.state == "pending_in":
                self.open_conversation(user)
                self.open_request(user, record.note)
                return
            elif record is None or record.state != "accepted":
                try:
                    state = await contacts.request(self.client, user, note)
                except (BastionError, ValueError) as exc:
                    self.notify(f"Contact request not sent: {exc}", severity="error")
                else:
                    if state == "pending_out":
                        self.notify(
                            f"Contact request sent to {user}; you can write once they accept."
                        )
                    elif state == "accepted":
                        self.notify(f"{user} is your contact now.")
        self.open_conversation(user)

    def action_verify(self) -> None:
        """Ctrl+T: safety number and QR, or the key-change review if a change waits."""
        if self.current is None:
            self.notify("Open a conversation first.")
            return
        if is_group(self.current):
            self.notify("Verify members one by one, in your chat with each of them.")
            return
        contact = self.client.contact(self.current)
        if contact is not None and contact.trust == "changed":
            self.review_key_change(self.current)
            return
        self.show_safety_number(self.current)

    @work(group="keys")
    async def show_safety_number(self, user: str) -> None:
        """Compute the safety number (pinning the key first if needed) and show it."""
        try:
            number = await trust.safety_number_with(self.client, user)
        except KeyChangedError:
            self.show_contact()
            self.review_key_change(user)
            return
        except BastionError as exc:
            self.notify(f"Cannot verify {user} now: {exc}", severity="error")
            return
        contact = self.client.contact(user)
        verified = contact is not None and contact.trust == "verified"

        def confirm(typed: str) -> None:
            comparison.confirm_last_group(self.client, number, typed)

        def decided(choice: str | None) -> None:
            if choice == "sas":
                self.compare_live(user)
            elif choice == "verified":
                self.notify(f"{user} is verified.")
                self.show_contact()

        asked = verification.pending_request(self.client, user) is not None
        screen = VerifyScreen(user, number, verified=verified, confirm=confirm, asked_live=asked)
        self.app.push_screen(screen, decided)

    @work(group="sas")
    async def compare_live(self, user: str) -> None:
        """Interactive verification: both sides see short codes and say whether they match."""

        async def compare(codes: verification.SasCodes) -> bool:
            answer: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
            self.app.push_screen(
                SasScreen(user, str(codes)), lambda same: answer.set_result(bool(same))
            )
            return await answer

        self.notify(f"Waiting for {user} to take part…")
        try:
            await verification.verify_interactively(self.client, user, compare)
        except (BastionError, TimeoutError) as exc:
            self.notify(f"{user} is not verified: {exc}", severity="error", timeout=8)
            return
        self.notify(f"{user} is verified.")
        self.show_contact()

    def review_key_change(self, user: str) -> None:
        """Show the key-change screen for ``user`` (once at a time)."""
        if user in self.key_change_open:
            return
        try:
            number = trust.pending_safety_number(self.client, user)
            contact = self.client.contact(user)
            if contact is None or contact.pending_key is None:
                raise StateError(f"no key change is waiting for {user}")
        except BastionError as exc:
            self.notify(str(exc), severity="error")
            return
        fingerprint = trust.key_fingerprint(contact.pending_key)
        self.key_change_open.add(user)

        def decided(accept: bool | None) -> None:
            self.key_change_open.discard(user)
            if not accept:
                self.show_contact()
                return
            try:
                # Exactly the key whose number was on screen; refused if it changed since.
                trust.accept_new_key(self.client, user, number.digits)
            except BastionError as exc:
                self.notify(str(exc), severity="error")
                return
            self.notify(f"Accepted {user}'s new key. Compare safety numbers again (Ctrl+T).")
            self.show_contact()
            if user == self.current:
                self.query_one("#message", Input).focus()
            self.reconnect()  # the held messages are delivered again on a new sign-in

        self.app.push_screen(KeyChangeScreen(user, str(number), fingerprint), decided)

    async def sync_contacts(self) -> None:
        """Ask for contact and presence pushes and show the list as the server has it."""
        try:
            await presence.watch(self.client)
        except BastionError as exc:
            self.notify(f"Contacts not updated: {exc}", severity="warning")
            return
        for user in contacts.accepted(self.client):
            if self.index.find(user) is None:
                self.index.touch(user, at=0)
        self.index.save(self.client)
        self.show_requests()
        self.refresh_list()
        self.show_contact()
