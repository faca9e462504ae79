"""Bastion: end-to-end encrypted instant messaging."""

__version__ = "0.1.0"
