"""Nothing in the server registers handlers at import: every handler module exports
``ROUTES`` and ``server/app.py`` lists the modules. (Which layer may import which is
tests/test_layout.py's rule.)
"""

from __future__ import annotations

from pathlib import Path

from bastion.server.app import HANDLER_MODULES

SERVER = Path(__file__).resolve().parents[2] / "src" / "bastion" / "server"


def test_every_handler_module_is_routed_by_the_app() -> None:
    on_disk = {p.stem for p in (SERVER / "handlers").glob("*.py") if not p.stem.startswith("_")}
    assert {m.__name__.rsplit(".", 1)[1] for m in HANDLER_MODULES} == on_disk
    assert all(m.ROUTES for m in HANDLER_MODULES)
