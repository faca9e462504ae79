"""The Bastion relay server."""
