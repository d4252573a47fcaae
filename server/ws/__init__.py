"""The signaling WebSocket ``/ws``, one job a module.

- :mod:`~server.ws.endpoint`: the route; a socket from its door to its close;
- :mod:`~server.ws.admission`: who may open it (origin, ticket or login);
- :mod:`~server.ws.reader`: the read loop (rate limit, validation, errors);
- :mod:`~server.ws.outbox`: what is sent, as RFC 6455 frames written in batches;
- :mod:`~server.ws.session_check`: therapists' sockets held to their login sessions;
- :mod:`~server.ws.heartbeat`: the WebSocket pings of all sockets, in one round;
- :mod:`~server.ws.registry`: the open sockets, closed on shutdown.
"""
