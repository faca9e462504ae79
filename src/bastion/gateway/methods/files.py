"""Files: send one from this machine, list those offered, fetch one through quarantine.

The gateway runs as the user who runs the front ends, so paths are this
machine's; they must be absolute (the gateway's own working folder means
nothing to a front end). A fetched file is saved only if its checks and scan
find it clean; otherwise it stays in quarantine and the answer says why. Saving
a blocked file anyway needs a person to confirm at a terminal
(``bastion file get --allow-blocked``), which no front end can stand in for.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import platformdirs

from bastion.cli.files import file_json, file_sent_json
from bastion.client import files, groups
from bastion.gateway.context import GatewayContext
from bastion.gateway.methods._base import ContextMethod
from bastion.gateway.rpc import Session


def absolute(text: str, what: str) -> Path:
    """``text`` as an absolute path; a relative one is refused with a sentence."""
    path = Path(text)
    if not path.is_absolute():
        raise ValueError(f"the {what} must be an absolute path")
    return path


async def files_send(
    ctx: GatewayContext, session: Session, params: dict[str, Any]
) -> dict[str, Any]:
    """Encrypt, upload and offer a file to a user or to every member of a group."""
    if ("to" in params) == ("group" in params):
        raise ValueError("say who gets the file: either to (a user) or group, not both")
    path = absolute(params["path"], "path")
    ctx.require_online()
    client = ctx.client
    if "group" in params:
        group = groups.resolve(client, params["group"])
        await groups.sync(client, group.group_id)
        group = groups.resolve(client, group.group_id.hex())
        sent = await files.send_file(client, group, path)
        return file_sent_json(sent, groups.conversation(group.group_id))
    sent = await files.send_file(client, params["to"], path)
    return file_sent_json(sent, params["to"])


async def files_list(
    ctx: GatewayContext, session: Session, params: dict[str, Any]
) -> list[dict[str, Any]]:
    """Every file offered to this account, with what became of it and the scan's verdict."""
    return [file_json(record) for record in files.list_files(ctx.client)]


def default_folder() -> Path:
    """Where a fetched file is saved when no folder is given: the user's downloads folder."""
    return Path(platformdirs.user_downloads_dir())


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
