"""The Bastion terminal app (``bastion chat``), built with Textual on the client library."""
