"""The verification dialogs: the safety number, its QR code, and the typed check.

Marking a contact verified is a comparison, never one click: the person types
the last group of five digits the other side reads out (or compares emoji live).
The first focus is the digits field, so Tab and Enter reach no button that marks
anything by itself. Everything fits an 80x24 terminal; the QR code has a screen
of its own because it is as tall as the terminal.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Static

from bastion.client import comparison
from bastion.errors import BastionError
from bastion.tui.conversations import safe_text

# Checks the typed last group and marks verified; raises ValueError or BastionError.
ConfirmGroup = Callable[[str], None]


class VerifyScreen(ModalScreen[str | None]):
    """The safety number, the five-digit check, and the other ways to compare.

    Returns ``"verified"`` once the typed digits matched (``confirm`` marked the
    contact), ``"sas"`` to compare emoji live, None to close.
    """

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "dismiss(None)", "Close")]

    def __init__(
        self,
        user: str,
        number: comparison.SafetyNumber,
        *,
        verified: bool,
        confirm: ConfirmGroup,
        asked_live: bool = False,
    ) -> None:
        super().__init__()
        self.user = user
        self.number = number
        self.verified = verified
        self.confirm = confirm
        self.asked_live = asked_live

    def compose(self) -> ComposeResult:
        user = safe_text(self.user)
        with Vertical(classes="dialog wide", id="verify"):
            yield Label(f"Verify {user}", classes="title")
            state = "verified" if self.verified else "not verified yet"
            yield Static(
                Text(f"Safety number with {user} ({user} is {state}):\n\n{self.number}\n"),
                id="number",
            )
            if self.asked_live:
                yield Static(
                    f"{user} asks to compare emoji live now: choose Compare emoji live.",
                    classes="hint",
                )
            elif not self.verified:
                yield Static(
                    f"On a call or in person, read the number together. Then type the "
                    f"last five digits as {user} reads them out, or compare emoji live.",
                    classes="hint",
                )
            if not self.verified:
                yield Input(placeholder="the last 5 digits", max_length=7, id="digits")
                yield Static("", id="verify-error", classes="error", markup=False)
            with Horizontal(classes="buttons"):
                if not self.verified:
                    yield Button("Mark verified", id="match", variant="success")
                yield Button("Compare emoji live", id="sas", variant="primary")
                yield Button("QR code", id="qr")
                yield Button("Close", id="close")

    def on_mount(self) -> None:
        if self.asked_live or self.verified:
            self.query_one("#sas", Button).focus()
        else:
            self.query_one("#digits", Input).focus()

    @on(Input.Submitted, "#digits")
    def typed(self) -> None:
        """Enter in the digits field checks them."""
        self.check_digits()

    @on(Button.Pressed)
    def decide(self, event: Button.Pressed) -> None:
        """Check the typed digits, start a live comparison, show the QR code, or close."""
        event.stop()
        if event.button.id == "match":
            self.check_digits()
        elif event.button.id == "sas":
            self.dismiss("sas")
        elif event.button.id == "qr":
            self.app.push_screen(QrScreen(self.user, self.number))
        else:
            self.dismiss(None)

    def check_digits(self) -> None:
        """Mark verified only if the typed digits are the number's last group."""
        field = self.query_one("#digits", Input)
        error = self.query_one("#verify-error", Static)
        if not field.value.strip():
            error.update(
                f"Type the last five digits {self.user} reads out from their screen first."
            )
            field.focus()
            return
        try:
            self.confirm(field.value)
        except (ValueError, BastionError) as exc:
            error.update(str(exc))
            field.value = ""
            field.focus()
            return
        self.dismiss("verified")


class QrScreen(ModalScreen[None]):
    """The safety number as a QR code, for the other side to photograph.

    They check it with ``bastion verify USER --qr-image PHOTO``.
    """

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "dismiss(None)", "Close"),
        Binding("enter", "dismiss(None)", "Close", show=False),
    ]

    def __init__(self, user: str, number: comparison.SafetyNumber) -> None:
        super().__init__()
        self.user = user
        self.number = number

    def compose(self) -> ComposeResult:
        code = comparison.render_qr_text(self.number.qr_payload())
        hint = Static(
            Text(
                f"{safe_text(self.user)} photographs this, then runs: bastion verify "
                f"{safe_text(self.number.my_user)} --qr-image PHOTO. Esc closes."
            ),
            classes="hint",
        )
        hint.styles.width = len(code.splitlines()[0])  # as wide as the code, no wider
        with Vertical(id="qr-screen"):
            yield Static(code, classes="qr")
            yield hint
