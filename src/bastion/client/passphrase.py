"""Rules for the passphrase that locks a new profile.

A passphrase shorter than :data:`MIN_PASSPHRASE_CHARS` is refused. A longer one
that the zxcvbn estimator still finds easy to guess is allowed with a warning:
the profile's Argon2id key derivation slows guessing down, it does not stop a
guess that is on every list.
"""

from __future__ import annotations

from collections.abc import Sequence

from zxcvbn import zxcvbn

from bastion.errors import ProfileError

MIN_PASSPHRASE_CHARS = 10
WEAK_SCORE = 3  # zxcvbn scores 0 to 4; below 3 is guessable offline with modest effort


def check_new_passphrase(passphrase: str) -> None:
    """Raise :class:`ProfileError` if ``passphrase`` may not lock a new profile."""
    if len(passphrase) < MIN_PASSPHRASE_CHARS:
        raise ProfileError(
            f"the passphrase must be at least {MIN_PASSPHRASE_CHARS} characters long; "
            "a few unrelated words are easy to remember and hard to guess"
        )


def weakness(passphrase: str, *, user_inputs: Sequence[str] = ()) -> str | None:
    """A sentence saying why ``passphrase`` is easy to guess, or None if it is not."""
    result = zxcvbn(passphrase, user_inputs=list(user_inputs))
    if int(result["score"]) >= WEAK_SCORE:
        return None
    feedback = result.get("feedback") or {}
    why = str(feedback.get("warning") or "").rstrip(".")
    hint = " ".join(str(s) for s in feedback.get("suggestions") or [])
    reason = f" ({why})" if why else ""
    return f"this passphrase is easy to guess{reason}. {hint}".strip()
