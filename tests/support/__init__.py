"""What the tests share, so no test module imports another.

- ``services``: reaching PostgreSQL, Redis, Chromium; skip, or fail under CI=true.
- ``databases``: databases migrated once per session, copied for each test.
- ``settings``: the settings factory's type and cheap password hashing.
- ``harness``: the real app driven over HTTP and WebSocket, accounts, consults.
- ``cli``: running the ``videoconsult`` command line.
- ``processes``: a server in a process of its own.
- ``webrtc``: aiortc peers and a signalling client.
- ``recording``: a recorded call and reading its encrypted file.
- ``browser``: Chromium through Playwright, and the pages' common steps.
- ``deploy``: reading the nginx config of deploy/.
- ``deliveries``: a receiver that keeps what a broker delivered, for broker tests.
- ``webhooks``: a record system's webhook receiver that verifies every signature.
- ``tcp_proxy``: a TCP proxy to a real server that a test can cut (a database or Redis outage).
- ``own_postgres``: a PostgreSQL server of a test's own, to stop and restart (the fault drill).
- ``frames``: random and malformed signaling frames, and what protocol.md says of each.
- ``consult_machine``: the protocol fuzz's state machine over the consult life cycle.
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
"""The repository's root folder."""
