"""Cryptography: signatures, device certificates, Olm sessions, storage at rest.

Everything here is built on audited libraries (vodozemac and PyCA cryptography);
nothing in this package implements a primitive. No asyncio, no sqlite3.
"""
