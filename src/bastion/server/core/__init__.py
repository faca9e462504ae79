"""The relay's rules with no I/O: contacts, link slots, delivery, recipient checks."""
