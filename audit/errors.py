"""Errors raised by the audit package (everything kept at rest).

    AuditError
     ├── DataDirError          the data directory cannot be created, read or written
     └── DatabaseError
          ├── DatabaseUnavailable   the database cannot be reached in time
          └── MigrationFailed       a schema migration failed; nothing was applied

Messages name the place (a path, a URL without its password) and the cause;
they never carry personal data, so the edge may show them as they are.
"""


class AuditError(Exception):
    """Base of every error the audit package raises."""


class DataDirError(AuditError):
    """The data directory cannot be used."""


class DatabaseError(AuditError):
    """The database cannot be used."""


class DatabaseUnavailable(DatabaseError):
    """The database did not answer, refused the connection or the login.

    ``reason`` is the cause alone, without the URL, for public answers such
    as ``/readyz``.
    """

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class MigrationFailed(DatabaseError):
    """A schema migration failed and was rolled back."""
