"""The app's other screens: unlock, first run, key change, verification, new chat, keys.

Each screen returns its result through ``dismiss``; the chat screen acts on it
with the client library.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen, Screen
from textual.widgets import Button, Input, Label, Static

from bastion.client import (
    USERNAME_RE,
    Client,
    check_new_passphrase,
    check_username,
    devices,
    link_history,
    weakness,
)
from bastion.errors import BastionError, ProfileError
from bastion.tui.conversations import ConversationIndex, safe_text


class UnlockScreen(Screen[Client]):
    """Asks for the passphrase and opens the profile with it."""

    def __init__(self, path: Path, *, error: str = "") -> None:
        super().__init__()
        self.path = path
        self.first_error = error

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label("Bastion is locked", classes="title")
            yield Static("Type the passphrase of this profile to open it.")
            yield Input(password=True, placeholder="passphrase", id="passphrase")
            yield Label(self.first_error, id="error", classes="error", markup=False)

    @on(Input.Submitted, "#passphrase")
    def unlock(self, event: Input.Submitted) -> None:
        """Unlock with what was typed (Argon2id takes a moment; say so first)."""
        if not event.value:
            return
        self.query_one("#error", Label).update("Unlocking…")
        self.call_after_refresh(self._open, event.value)

    def _open(self, passphrase: str) -> None:
        try:
            client = Client.open(self.path, passphrase)
        except ProfileError as exc:
            self.query_one("#error", Label).update(str(exc))
            self.query_one("#passphrase", Input).value = ""
            return
        self.dismiss(client)


class FirstRunScreen(Screen[Client]):
    """Creates an account, or links this machine to one, from two fields.

    The first field holds a username (register) or the link code another device of
    the account shows (link); the second the server address, optionally followed by
    its certificate fingerprint. A passphrase field appears only when none was given.
    Without a fingerprint, the first Enter fetches the server's and shows it with what
    pinning means; the next Enter pins it.
    """

    PINNING = (
        "Pinning means this device will only ever talk to a server showing this exact "
        "certificate, so nobody else can pose as it."
    )

    NEITHER = (
        "{who!r} is neither a username (3 to 32 lowercase letters, digits, '.', '_' "
        "or '-') nor a link code."
    )

    def __init__(self, path: Path, *, passphrase: str | None = None) -> None:
        super().__init__()
        self.path = path
        self.passphrase = passphrase
        self.shown_pin: tuple[str, str] | None = None  # (server, fingerprint) shown, to confirm

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label("Welcome to Bastion", classes="title")
            yield Static(
                "Pick a username to create an account, or type the link code your other "
                "device shows (bastion devices link) to add this machine to your account."
            )
            yield Input(placeholder="username or link code", id="who")
            yield Input(placeholder="server, e.g. wss://chat.example.org:8443", id="server")
            if self.passphrase is None:
                yield Input(password=True, placeholder="passphrase to lock this profile", id="pass")
            yield Label("", id="error", classes="error", markup=False)

    @on(Input.Submitted)
    def next_field(self, event: Input.Submitted) -> None:
        """Enter moves to the next empty field, then starts."""
        for field in self.query(Input):
            if not field.value:
                field.focus()
                return
        del event
        self.start()

    @work(exclusive=True)
    async def start(self) -> None:
        """Register or link, in a worker; errors stay on this screen."""
        who = self.query_one("#who", Input).value.strip()
        server, _, fingerprint = self.query_one("#server", Input).value.strip().partition(" ")
        passphrase = self.passphrase or self.query_one("#pass", Input).value
        error = self.query_one("#error", Label)
        if not server.startswith("wss://"):
            error.update("The server address starts with wss://")
            return
        if not USERNAME_RE.fullmatch(who) and not devices.is_link_code(who):
            error.update(self.NEITHER.format(who=who))
            return
        try:
            check_new_passphrase(passphrase)
        except ProfileError as exc:
            error.update(f"Could not start: {exc}")
            return
        weak = weakness(passphrase, user_inputs=[who])
        caution = f"Warning: {weak} " if weak else ""
        pin = fingerprint.strip()
        if not pin:
            if self.shown_pin is None or self.shown_pin[0] != server:
                error.update("Fetching the server's certificate…")
                try:
                    shown = await Client.server_fingerprint(server)
                except (BastionError, OSError, TimeoutError) as exc:
                    error.update(f"Could not start: {exc}")
                    return
                self.shown_pin = (server, shown)
                error.update(
                    f"{caution}The server's certificate is {self.shown_pin[1]}. {self.PINNING} "
                    "Check it with the server's operator, then press Enter to pin it."
                )
                return
            pin = self.shown_pin[1]
        error.update(f"{caution}Connecting and pinning {pin}. {self.PINNING}")
        try:
            if USERNAME_RE.fullmatch(who):
                client = await Client.register(
                    self.path,
                    passphrase,
                    username=who,
                    server_url=server,
                    fingerprint=pin,
                )
            else:
                error.update("Waiting for your other device to answer…")
                received: list[link_history.HistorySummary] = []
                client = await devices.join_with_code(
                    self.path,
                    passphrase,
                    code=who,
                    server_url=server,
                    fingerprint=pin,
                    on_history=received.append,
                )
                list_sent_conversations(client, received)
        except ValueError:
            error.update(self.NEITHER.format(who=who))
            return
        except (BastionError, OSError, TimeoutError) as exc:
            error.update(f"Could not start: {exc}")
            return
        self.dismiss(client)


def list_sent_conversations(client: Client, received: list[link_history.HistorySummary]) -> None:
    """Add the conversations the other device sent while linking to the conversation list."""
    if not received or not received[0].peers:
        return
    index = ConversationIndex.load(client)
    for peer, at in received[0].peers:
        index.touch(peer, at=at)
    index.save(client)


class KeyChangeScreen(ModalScreen[bool]):
    """Explains a changed account key; returns True if the user accepts the new key."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "dismiss(False)", "Not now")]

    def __init__(self, user: str, new_number: str, new_fingerprint: str) -> None:
        super().__init__()
        self.user = user
        self.new_number = new_number
        self.new_fingerprint = new_fingerprint

    def compose(self) -> ComposeResult:
        user = safe_text(self.user)
        with VerticalScroll(classes="dialog danger"):
            yield Label(f"{user}'s key has changed", classes="title")
            yield Static(
                Text(
                    f"Safety number with {user}'s NEW key:\n{self.new_number}\n"
                    f"Fingerprint: {self.new_fingerprint}\n"
                ),
                id="new-safety-number",
            )
            yield Static(
                Text(
                    f"The server now shows a different account key for {user}: a "
                    "reinstall, or exactly what an impersonator would cause. Messages "
                    f"to and from {user} are held until you decide.\n\n"
                    f"Ask {user} in person or on a call, and compare this number with "
                    "theirs. Accept only if it matches: exactly this key is accepted, "
                    "unverified until you verify it (Ctrl+T)."
                )
            )
            with Horizontal(classes="buttons"):
                yield Button("Accept new key", id="accept", variant="error")
                yield Button("Not now", id="later")

    @on(Button.Pressed)
    def decide(self, event: Button.Pressed) -> None:
        """Accept or postpone."""
        self.dismiss(event.button.id == "accept")


class SasScreen(ModalScreen[bool]):
    """Shows the short codes of a live verification; True if the user says they match."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "dismiss(False)", "Differ")]

    def __init__(self, user: str, codes: str) -> None:
        super().__init__()
        self.user = user
        self.codes = codes

    def compose(self) -> ComposeResult:
        user = safe_text(self.user)
        with Vertical(classes="dialog"):
            yield Label(f"Compare with {user}", classes="title")
            yield Static(Text(self.codes), id="codes")
            yield Static(f"{user} sees codes on their screen now. Are they the same?")
            with Horizontal(classes="buttons"):
                yield Button("They match", id="same", variant="success")
                yield Button("They differ", id="differ", variant="error")

    @on(Button.Pressed)
    def decide(self, event: Button.Pressed) -> None:
        """Say whether the codes match."""
        self.dismiss(event.button.id == "same")


class NewChatScreen(ModalScreen[tuple[str, str] | None]):
    """Asks whom to write to, and a note for the contact request; returns both or None."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "dismiss(None)", "Cancel")]

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label("Start a chat", classes="title")
            yield Input(placeholder="their username", id="user")
            yield Input(
                placeholder="note with your contact request (optional)",
                max_length=500,
                id="note",
            )
            yield Label("", id="error", classes="error", markup=False)
            yield Static(
                "Enter in the name field starts the chat; a new contact also gets the note.",
                classes="hint",
            )

    @on(Input.Submitted)
    def choose(self) -> None:
        """Return the username (lowercased) and note if the name is valid."""
        typed = self.query_one("#user", Input).value.strip()
        try:
            user = check_username(typed.lower())
        except ValueError as exc:
            self.query_one("#error", Label).update(str(exc))
            self.query_one("#user", Input).focus()
            return
        self.dismiss((user, self.query_one("#note", Input).value.strip()))


HELP_KEYS = (
    ("Enter", "send the message; in the list, open the chosen chat"),
    ("Ctrl+N", "start a chat (with a note for a new contact)"),
    ("Ctrl+T", "verify them (number, QR, emoji) or review a new key"),
    ("Ctrl+Y", "answer the newest contact request"),
    ("Ctrl+R", "search this conversation (Esc closes)"),
    ("Ctrl+F", "search every conversation; Enter opens the one found"),
    ("Ctrl+Up / Ctrl+Down", "previous / next conversation"),
    ("PageUp / PageDown", "scroll; PageUp at the top loads older messages"),
    ("Tab / Shift+Tab", "move between the list and the message line"),
    ("Up / Down", "in the list, move to another chat"),
    ("Ctrl+O", "offer a file to this person (with progress)"),
    ("Ctrl+G", "download and scan a file offered here"),
    ("Ctrl+P", "set presence and status"),
    ("? or F1", "this help"),
    ("Ctrl+Q", "quit"),
    ("", "Ctrl+V pastes, Ctrl+C copies, as in any text field"),
)


class HelpScreen(ModalScreen[None]):
    """Every key, in one place."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "dismiss(None)", "Close"),
        Binding("question_mark", "dismiss(None)", "Close"),
    ]

    def compose(self) -> ComposeResult:
        lines = Text()
        for key, what in HELP_KEYS:
            lines.append(f"{key:<22}", style="bold")
            lines.append(f"{what}\n")
        with Vertical(classes="dialog wide"):
            yield Label("Keys", classes="title")
            yield Static(lines)
            yield Static("Press Esc to close.", classes="hint")


class RequestScreen(ModalScreen[str | None]):
    """A pending contact request: accept, decline, or decide later."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "dismiss(None)", "Later")]

    def __init__(self, user: str, note: str) -> None:
        super().__init__()
        self.user = user
        self.note = note

    def compose(self) -> ComposeResult:
        user = safe_text(self.user)
        with Vertical(classes="dialog"):
            yield Label(f"{user} asks to be your contact", classes="title")
            note = f"Their note: {safe_text(self.note)}" if self.note else "They left no note."
            yield Static(Text(note))
            yield Static(
                "Accepting lets you write to each other and see each other's presence. "
                "Compare safety numbers (Ctrl+T) before you trust who it is."
            )
            with Horizontal(classes="buttons"):
                yield Button("Accept", id="accept", variant="success")
                yield Button("Decline", id="decline")
                yield Button("Later", id="later")

    @on(Button.Pressed)
    def decide(self, event: Button.Pressed) -> None:
        """Return the action (None for later)."""
        self.dismiss(event.button.id if event.button.id in ("accept", "decline") else None)


class PresenceScreen(ModalScreen[tuple[str, str | None] | None]):
    """Sets this account's presence and status line."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "dismiss(None)", "Cancel")]
    STATES = ("online", "away", "busy", "invisible")

    def __init__(self, state: str, status: str | None) -> None:
        super().__init__()
        self.state = state
        self.status = status

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(f"Presence (now {self.state})", classes="title")
            yield Input(self.status or "", placeholder="status line (optional)", id="status-line")
            with Horizontal(classes="buttons"):
                for state in self.STATES:
                    yield Button(state.capitalize(), id=state)
            yield Static("Invisible shows you offline to everyone.", classes="hint")

    @on(Button.Pressed)
    def choose(self, event: Button.Pressed) -> None:
        """Return the state and the status line."""
        status = self.query_one("#status-line", Input).value.strip() or None
        self.dismiss((event.button.id or "online", status))


class FileScreen(ModalScreen[str | None]):
    """Asks which file to send; returns the path as typed, or None."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "dismiss(None)", "Cancel")]

    def __init__(self, user: str) -> None:
        super().__init__()
        self.user = user

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(f"Send a file to {safe_text(self.user)}", classes="title")
            yield Input(placeholder="path of the file, e.g. ~/report.pdf", id="path")
            yield Static(
                "It is encrypted on this machine; the receiver's app scans it before "
                "they can open it.",
                classes="hint",
            )

    @on(Input.Submitted, "#path")
    def choose(self, event: Input.Submitted) -> None:
        """Return the typed path."""
        self.dismiss(event.value.strip() or None)
