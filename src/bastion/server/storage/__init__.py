"""Where the relay keeps its data: the interfaces and the SQLite and PostgreSQL adapters."""
