"""Groups: membership as a signed, hash-chained sequence of changes.

The server stores and forwards the chain; every member checks it, so the server
cannot add a member. No I/O here.
"""
