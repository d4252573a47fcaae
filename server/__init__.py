"""The aiohttp application: app factory, HTTP routes and the command line.

Exports :func:`create_app`. Nothing else imports this package.
"""

from server.app import create_app

__all__ = ["create_app"]
