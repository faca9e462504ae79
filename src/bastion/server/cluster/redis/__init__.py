"""The Redis-backed bus, link rendezvous and shared rate limits of a cluster."""
