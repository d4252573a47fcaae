"""Ports for the servers the tests start (nodes, nginx, coturn, receivers).

Asking the kernel for port 0 and letting it go hands out a port from the
ephemeral range (``net.ipv4.ip_local_port_range``, 32768-60999 on Debian),
which any outgoing connection on the machine may take before the server binds
it, and the server then cannot listen (the suspected cause of a proxy test's
node exiting with 1 at start, once in CI, among xdist workers that connect
to PostgreSQL, Redis and each other all the time).
The ports here come from below that range, where no outgoing connection goes,
in a block of :data:`BLOCK` per xdist worker so that two workers never hand
out the same one, and each is checked free (TCP and UDP) before it is given.
"""

from __future__ import annotations

import itertools
import os
import random
import socket

# Below the ephemeral range; the block of xdist worker N starts at
# FIRST + N * BLOCK (N modulo WORKER_BLOCKS).
FIRST = 20000
BLOCK = 1000
WORKER_BLOCKS = 12

# Inside a worker's block, candidates follow each other from a random start,
# so that two pytest runs on one machine rarely try the same port first.
_worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
_block = (int(_worker) if _worker.isdigit() else 0) % WORKER_BLOCKS
_start = random.randrange(BLOCK)
_candidates = itertools.cycle(
    FIRST + _block * BLOCK + (_start + offset) % BLOCK for offset in range(BLOCK)
)


def _free(port: int) -> bool:
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        with socket.socket(socket.AF_INET, kind) as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


def unused_port() -> int:
    """A port on 127.0.0.1 that nothing uses now (TCP and UDP) and that this
    process has not handed out in its last :data:`BLOCK` calls."""
    for _ in range(BLOCK):
        port = next(_candidates)
        if _free(port):
            return port
    raise RuntimeError(f"no free port in {FIRST + _block * BLOCK}..{FIRST + (_block + 1) * BLOCK}")
