"""The SQLite adapters, for a single server."""
