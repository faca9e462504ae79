"""Schema migrations for the PostgreSQL store: ordered SQL files and a small runner.

Files are named ``NNNN_what.sql`` and applied in order, each version once; the
versions applied are recorded in ``schema_migrations`` inside the store's schema.
Concurrent starts of several nodes are serialised by an advisory lock, so
exactly one node applies a new version.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources

import asyncpg

from bastion.errors import StorageError

_FILE_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")
_SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


@dataclass(frozen=True, slots=True)
class Migration:
    """One ordered SQL file."""

    version: int
    name: str
    sql: str


def bundled_migrations() -> list[Migration]:
    """The migrations shipped with the package, oldest first."""
    found = []
    for entry in resources.files(__package__).iterdir():
        match = _FILE_NAME.match(entry.name)
        if match:
            found.append(Migration(int(match.group(1)), entry.name, entry.read_text("utf-8")))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise StorageError("two migrations share a version number")
    return found


def quote_schema(schema: str) -> str:
    """The schema name quoted for SQL; raises :class:`StorageError` unless it is a plain name."""
    if not _SCHEMA_NAME.match(schema):
        raise StorageError("a schema name is lower-case letters, digits and underscores")
    return f'"{schema}"'


async def migrate(
    conn: asyncpg.Connection, schema: str, migrations: list[Migration] | None = None
) -> list[int]:
    """Bring ``schema`` up to date; returns the versions applied now.

    Raises :class:`StorageError` if the database holds a version this code
    does not know (it was migrated by a newer release).
    """
    todo = bundled_migrations() if migrations is None else migrations
    quoted = quote_schema(schema)
    applied_now: list[int] = []
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"bastion:{schema}")
        await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {quoted}")
        await conn.execute(f"SET LOCAL search_path TO {quoted}")
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
        unknown = done - {m.version for m in todo}
        if unknown:
            raise StorageError(
                f"the database schema has version {max(unknown)}, newer than this server knows"
            )
        for migration in todo:
            if migration.version in done:
                continue
            await conn.execute(migration.sql)
            await conn.execute(
                "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                migration.version,
                migration.name,
            )
            applied_now.append(migration.version)
    return applied_now
