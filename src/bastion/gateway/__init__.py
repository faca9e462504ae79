"""The gateway: one local process per profile that holds the unlocked keys and stays connected.

Every front end talks to it on the same machine, and it secures everything that
leaves the machine (seed 000's "application-aware gateway", DESIGN §1). It
unlocks the profile once, keeps one connection to the server
(:meth:`bastion.client.Client.stay_connected`), queues what is sent while the
server cannot be reached, and serves the local doors:

- JSON-RPC 2.0 on a Unix socket in the profile folder (:mod:`.unix`), the door the
  command line uses;
- JSON-RPC 2.0 over HTTP and WebSocket on 127.0.0.1 when enabled (:mod:`.http`);
- IRC on 127.0.0.1 when enabled (:mod:`.irc`).

The methods (:mod:`.methods`) and their schema (``schema.json``, an OpenRPC
document) are the same behind every door; docs/gateway.md describes them.
"""
