"""The network edge: listener, WebSocket connections, PROXY protocol and TLS."""
