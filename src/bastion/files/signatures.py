"""Signature scanning with the YARA rules shipped in ``bastion/files/rules``.

Rules are compiled once per folder and cached. Each rule's ``description`` meta
is the phrase shown to the user. If ``yara-python`` cannot be imported or the
rules do not compile, :class:`ScannerUnavailableError` is raised: the caller
must treat the file as not scanned, never as clean.
"""

from __future__ import annotations

import functools
import importlib
from pathlib import Path
from typing import Protocol, cast

from bastion.files.errors import ScannerUnavailableError

RULES_DIR = Path(__file__).with_name("rules")
DEFAULT_TIMEOUT_SECONDS = 60


class _Match(Protocol):
    rule: str
    meta: dict[str, object]


class _CompiledRules(Protocol):
    def match(
        self, filepath: str | None = ..., *, data: bytes | None = ..., timeout: int = ...
    ) -> list[_Match]: ...


def _import_yara() -> object:
    try:
        return importlib.import_module("yara")
    except ImportError:
        raise ScannerUnavailableError(
            "signature scanning is unavailable (yara-python is not installed)"
        ) from None


@functools.lru_cache(maxsize=4)
def _compile(rules_dir: Path) -> _CompiledRules:
    yara = _import_yara()
    paths = sorted(rules_dir.glob("*.yar"))
    if not paths:
        raise ScannerUnavailableError("no signature rules were found")
    try:
        compiled = yara.compile(filepaths={p.stem: str(p) for p in paths})  # type: ignore[attr-defined]
    except Exception as exc:  # yara.Error and its subclasses
        raise ScannerUnavailableError(f"the signature rules do not compile: {exc}") from None
    return cast(_CompiledRules, compiled)


class SignatureScanner:
    """Matches files and byte strings against the compiled rule set."""

    __slots__ = ("_rules", "_timeout")

    def __init__(
        self, rules_dir: Path = RULES_DIR, *, timeout_seconds: int = DEFAULT_TIMEOUT_SECONDS
    ) -> None:
        """Compile (or reuse) the rules in ``rules_dir``.

        Raises :class:`ScannerUnavailableError` if YARA is missing or the rules
        are unusable.
        """
        self._rules = _compile(rules_dir.resolve())
        self._timeout = timeout_seconds

    def match_path(self, path: Path) -> list[str]:
        """Return the descriptions of the rules matching the file at ``path``.

        Raises :class:`ScannerUnavailableError` if the scan fails or times out.
        """
        return self._run(filepath=str(path))

    def match_bytes(self, data: bytes) -> list[str]:
        """Return the descriptions of the rules matching ``data``.

        Raises :class:`ScannerUnavailableError` if the scan fails or times out.
        """
        return self._run(data=data)

    def _run(self, *, filepath: str | None = None, data: bytes | None = None) -> list[str]:
        try:
            if filepath is not None:
                matches = self._rules.match(filepath, timeout=self._timeout)
            else:
                matches = self._rules.match(data=data, timeout=self._timeout)
        except Exception as exc:  # yara.Error, yara.TimeoutError
            raise ScannerUnavailableError(f"signature scanning failed: {exc}") from None
        return [str(m.meta.get("description", m.rule)) for m in matches]
