"""The WebSocket signaling protocol, consult rooms and the message broker.

Empty until the signaling issue: it will hold the protocol schemas, the
consult state machine and the broker (in-process, Redis). Imports ``audit``
and ``config``, never ``server``.
"""

__all__: list[str] = []
