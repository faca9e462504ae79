"""The hash-chained audit log: writing records, their format, and verifying a log."""
