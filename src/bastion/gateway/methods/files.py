"""Files: send one from this machine, list those offered, fetch one through quarantine.

The gateway runs as the user who runs the front ends, so paths are this
machine's; they must be absolute (the gateway's own working folder means
nothing to a front end). A fetched file is saved only if its checks and scan
find it clean; otherwise it stays in quarantine and the answer says why. Saving
a blocked file anyway needs a person to confirm at a terminal
(``bastion file get --allow-blocked``), which no front end can stand in for.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import platformdirs

from bastion.cli.files import file_json, file_sent_json
from bastion.client import files, groups
from bastion.gateway.context import GatewayContext
from bastion.gateway.methods._base import ContextMethod
from bastion.gateway.rpc import MethodError, Session

UPLOADS = "web-uploads"  # in the profile folder: files on their way from the browser app
PROGRESS_EVERY_S = 0.1  # at most this often a file_progress event per transfer


def absolute(text: str, what: str) -> Path:
    """``text`` as an absolute path; a relative one is refused with a sentence."""
    path = Path(text)
    if not path.is_absolute():
        raise ValueError(f"the {what} must be an absolute path")
    return path


async def send_path(
    ctx: GatewayContext,
    path: Path,
    *,
    to: str | None,
    group: str | None,
    progress: files.Progress | None = None,
) -> dict[str, Any]:
    """Encrypt, upload and offer ``path`` to a user or to every member of a group."""
    if (to is None) == (group is None):
        raise ValueError("say who gets the file: either to (a user) or group, not both")
    recipient = to or ""
    ctx.require_online()
    client = ctx.client
    if group is not None:
        found = groups.resolve(client, group)
        await groups.sync(client, found.group_id)
        found = groups.resolve(client, found.group_id.hex())
        sent = await files.send_file(client, found, path, progress=progress)
        return file_sent_json(sent, groups.conversation(found.group_id))
    sent = await files.send_file(client, recipient, path, progress=progress)
    return file_sent_json(sent, recipient)


async def files_send(
    ctx: GatewayContext, session: Session, params: dict[str, Any]
) -> dict[str, Any]:
    """Encrypt, upload and offer a file to a user or to every member of a group."""
    path = absolute(params["path"], "path")
    return await send_path(ctx, path, to=params.get("to"), group=params.get("group"))


@dataclass(slots=True)
class WebFiles:
    """The browser app's file transfers (see :class:`bastion.gateway.http.FileTransfers`)."""

    ctx: GatewayContext
    _last: dict[str, float] = field(default_factory=dict)

    def upload_folder(self) -> Path:
        folder = self.ctx.client.profile.path / UPLOADS
        folder.mkdir(mode=0o700, exist_ok=True)
        os.chmod(folder, 0o700)
        return folder

    async def send(
        self, path: Path, *, to: str | None, group: str | None, transfer: str
    ) -> dict[str, Any]:
        hub = self.ctx.hub

        def progress(done: int, total: int) -> None:
            now = time.monotonic()
            if done < total and now - self._last.get(transfer, 0.0) < PROGRESS_EVERY_S:
                return
            self._last[transfer] = now
            hub.publish(
                {"type": "file_progress", "transfer": transfer, "done": done, "total": total}
            )

        try:
            return await send_path(self.ctx, path, to=to, group=group, progress=progress)
        finally:
            self._last.pop(transfer, None)

    def saved(self, offer_id: str) -> tuple[Path, str]:
        record = files.find_file(self.ctx.client, offer_id)
        if record.state not in ("saved", "saved_anyway") or record.saved_to is None:
            raise MethodError("not_saved", "this file was not saved: fetch it (and its scan) first")
        path = Path(record.saved_to)
        if not path.is_file():
            raise MethodError("not_found", "the saved file is no longer where it was saved")
        return path, path.name


async def files_list(
    ctx: GatewayContext, session: Session, params: dict[str, Any]
) -> list[dict[str, Any]]:
    """Every file offered to this account, with what became of it and the scan's verdict."""
    return [file_json(record) for record in files.list_files(ctx.client)]


def default_folder() -> Path:
    """Where a fetched file is saved when no folder is given: the user's downloads folder
    (made if this account has none yet, as a desktop session would)."""
    folder = Path(platformdirs.user_downloads_dir())
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    return folder


async def files_get(
    ctx: GatewayContext, session: Session, params: dict[str, Any]
) -> dict[str, Any]:
    """Download, check and scan a file in quarantine; save it only if clean.

    The answer is the file's record: ``state`` ``saved`` with ``saved_to``, or the
    verdict and its reasons with ``saved_to`` null (it stays in quarantine).
    """
    folder = absolute(params["to"], "folder") if "to" in params else default_folder()
    ctx.require_online()
    result = await files.get_file(ctx.client, params["id"], folder)
    return file_json(result.record)


METHODS: dict[str, ContextMethod] = {
    "files.send": files_send,
    "files.list": files_list,
    "files.get": files_get,
}
