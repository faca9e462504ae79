"""The client library: profile, connection, end-to-end messaging. Front ends sit on it."""
