"""Imports every feature module that registers frame handlers (see :mod:`handlers`).

The relay imports this module once; adding a feature means adding its import here.
"""

from __future__ import annotations

from bastion.server import policy  # noqa: F401 - signed organisation policy
