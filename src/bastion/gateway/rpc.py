"""JSON-RPC 2.0 behind every door: parse, check against the schema, call, answer.

Transport-agnostic: a door hands :meth:`Dispatcher.handle` the text of one
request (or a batch) with the :class:`Session` of the front end that sent it,
and writes back what it returns (None for notifications only). Parameters are
by name and are checked against the method's schema in ``schema.json`` before
the method runs, so a method body sees only well-formed input; a bad request
gets a JSON-RPC error with one sentence, never a traceback.

Errors (``error.code``): the JSON-RPC ones (-32700 parse error, -32600 invalid
request, -32601 unknown method, -32602 invalid params, -32603 internal error)
and :data:`APP_ERROR` for everything Bastion refuses, with the machine-readable
reason in ``error.data.code`` (``key_changed``, ``disconnected``, a server
refusal code, ...) and, where there is one, the record in ``error.data``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import Any, Protocol

import jsonschema

from bastion.errors import BastionError, KeyChangedError, ServerRefusedError

log = logging.getLogger(__name__)

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
APP_ERROR = -32000
MAX_BATCH = 100
MAX_REQUEST_BYTES = 1 << 20  # a door refuses a longer request before parsing it


class Session(Protocol):
    """One front end's link to the gateway, as a door keeps it."""

    @property
    def subscribed(self) -> bool:
        """Whether live events go to this front end."""
        ...

    def subscribe(self, on: bool) -> None:
        """Start or stop sending live events as ``event`` notifications."""
        ...


@dataclass(slots=True)
class BasicSession:
    """A session whose door pushes events itself (subscribe only sets the flag)."""

    subscribed: bool = False

    def subscribe(self, on: bool) -> None:
        self.subscribed = on


class MethodError(BastionError):
    """A refusal of a method, with its machine-readable code and extra data."""

    def __init__(self, code: str, message: str, data: Mapping[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.data = dict(data or {})


Method = Callable[[Session, dict[str, Any]], Awaitable[Any]]


@dataclass(slots=True)
class Dispatcher:
    """The gateway's methods by name, checked against the schema document."""

    methods: dict[str, Method] = field(default_factory=dict)

    def __post_init__(self) -> None:
        described = set(method_schemas())
        missing = set(self.methods) - described
        if missing:
            raise ValueError(f"methods without a schema: {sorted(missing)}")

    async def handle(self, text: str | bytes, session: Session) -> str | None:
        """Answer one request or batch; None when nothing is to be sent back."""
        if len(text) > MAX_REQUEST_BYTES:
            return too_long()
        try:
            message = json.loads(text)
        except (ValueError, UnicodeDecodeError):
            return _dump(_error(None, PARSE_ERROR, "the request is not valid JSON"))
        if isinstance(message, list):
            if not message:
                return _dump(_error(None, INVALID_REQUEST, "an empty batch"))
            if len(message) > MAX_BATCH:
                return _dump(_error(None, INVALID_REQUEST, f"at most {MAX_BATCH} calls a batch"))
            answers = [a for a in [await self.call(m, session) for m in message] if a is not None]
            return _dump(answers) if answers else None
        answer = await self.call(message, session)
        return None if answer is None else _dump(answer)

    async def call(self, message: object, session: Session) -> dict[str, Any] | None:
        """Answer one parsed request object; None for a notification."""
        if not isinstance(message, dict) or message.get("jsonrpc") != "2.0":
            return _error(None, INVALID_REQUEST, "not a JSON-RPC 2.0 request")
        has_id = "id" in message
        req_id = message.get("id")
        if has_id and not (req_id is None or isinstance(req_id, str | int)):
            return _error(None, INVALID_REQUEST, "the id must be a string, a number or null")
        name = message.get("method")
        if not isinstance(name, str):
            return _error(req_id, INVALID_REQUEST, "the method must be a string")
        params = message.get("params", {})
        try:
            result = await self.run(name, params, session)
        except _RpcFailure as failure:
            return failure.answer(req_id) if has_id else None
        if not has_id:
            return None
        return {"jsonrpc": "2.0", "id": req_id, "result": result}

    async def run(self, name: str, params: object, session: Session) -> Any:
        """Check and run one method; raises _RpcFailure with the error to answer."""
        method = self.methods.get(name)
        if method is None:
            raise _RpcFailure(METHOD_NOT_FOUND, f"no method {name!r}")
        if not isinstance(params, dict):
            raise _RpcFailure(INVALID_PARAMS, "params must be an object (by name)")
        problem = check_params(name, params)
        if problem is not None:
            raise _RpcFailure(INVALID_PARAMS, problem)
        try:
            return await method(session, params)
        except Exception as exc:
            raise _failure(exc, name) from exc


def _failure(exc: Exception, name: str) -> _RpcFailure:
    """The JSON-RPC error for what a method raised."""
    if isinstance(exc, MethodError):
        return _RpcFailure(APP_ERROR, str(exc), {"code": exc.code, **exc.data})
    if isinstance(exc, KeyChangedError):
        return _RpcFailure(APP_ERROR, str(exc), {"code": "key_changed", "user": exc.user})
    if isinstance(exc, ServerRefusedError):
        return _RpcFailure(APP_ERROR, exc.message, {"code": exc.code})
    if isinstance(exc, BastionError):
        return _RpcFailure(APP_ERROR, str(exc), {"code": _kind(exc)})
    if isinstance(exc, ValueError):
        return _RpcFailure(INVALID_PARAMS, str(exc))
    # Never the exception's text: it may hold anything. The log names the type only.
    log.error("method %s failed: %s", name, type(exc).__name__)
    return _RpcFailure(INTERNAL_ERROR, "the gateway failed to do this")


def failure_of(exc: Exception, name: str) -> dict[str, Any]:
    """The JSON-RPC ``error`` object for ``exc`` raised by ``name`` outside the dispatcher."""
    answer: dict[str, Any] = _failure(exc, name).answer(None)["error"]
    return answer


class _RpcFailure(Exception):
    def __init__(self, code: int, message: str, data: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data

    def answer(self, req_id: object) -> dict[str, Any]:
        return _error(req_id, self.code, self.message, self.data)


def _kind(exc: BastionError) -> str:
    """``ProfileError`` → ``profile``: the machine-readable kind of a Bastion error."""
    name = type(exc).__name__.removesuffix("Error")
    return "".join("_" + c.lower() if c.isupper() else c for c in name).lstrip("_") or "error"


def _error(
    req_id: object, code: int, message: str, data: dict[str, Any] | None = None
) -> dict[str, Any]:
    error: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        error["data"] = data
    return {"jsonrpc": "2.0", "id": req_id, "error": error}


def _dump(value: object) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def too_long() -> str:
    """The answer to a request longer than :data:`MAX_REQUEST_BYTES` (its door closes after it)."""
    return _dump(_error(None, INVALID_REQUEST, "the request is too long"))


def notification(method: str, params: Mapping[str, Any]) -> str:
    """A JSON-RPC notification (no id), as a door sends live events."""
    return _dump({"jsonrpc": "2.0", "method": method, "params": dict(params)})


# --- the schema ------------------------------------------------------------------------------


@cache
def schema_document() -> dict[str, Any]:
    """The OpenRPC document of the gateway (``schema.json``, shipped with the package)."""
    text = resources.files("bastion.gateway").joinpath("schema.json").read_text("utf-8")
    document: dict[str, Any] = json.loads(text)
    return document


@cache
def method_schemas() -> dict[str, dict[str, Any]]:
    """For each method, a JSON Schema of its params object (references resolved in the document)."""
    document = schema_document()
    out: dict[str, dict[str, Any]] = {}
    for method in document["methods"]:
        properties = {p["name"]: p["schema"] for p in method.get("params", [])}
        required = [p["name"] for p in method.get("params", []) if p.get("required")]
        out[method["name"]] = {
            "type": "object",
            "properties": properties,
            "required": required,
            "additionalProperties": False,
            "components": document.get("components", {}),
        }
    return out


@cache
def _validator(name: str) -> jsonschema.protocols.Validator:
    schema = method_schemas()[name]
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    return cls(schema)


def check_params(name: str, params: dict[str, Any]) -> str | None:
    """One sentence on what is wrong with ``params`` for method ``name``, or None."""
    error = jsonschema.exceptions.best_match(_validator(name).iter_errors(params))
    if error is None:
        return None
    where = ".".join(str(p) for p in error.absolute_path)
    if error.absolute_path and error.absolute_path[0] in _secret_params(name):
        # jsonschema's message quotes the value: never a passphrase's, even back to its sender.
        return f"{where}: the value does not fit its schema ({error.validator} check)"
    return f"{where}: {error.message}" if where else error.message


@cache
def _secret_params(name: str) -> frozenset[str]:
    """The params of ``name`` marked ``writeOnly`` (secrets) in the schema."""
    properties = method_schemas()[name]["properties"]
    return frozenset(p for p, schema in properties.items() if schema.get("writeOnly"))
