"""The sans-I/O protocol core: bytes in, frames and events out.

No sockets, no asyncio, no clock and no database in here (tests/test_layout.py
checks the imports). Time and randomness are passed in by the caller.
"""
