"""Errors raised by the audit package (everything kept at rest).

    AuditError
     ├── DataDirError          the data directory cannot be created, read or written
     ├── DatabaseError
     │    ├── DatabaseUnavailable   the database cannot be reached in time
     │    ├── AccessLogNotWritten   a batch of access records failed to commit (audit.access_writer)
     │    ├── MigrationFailed       a schema migration failed; nothing was applied
     │    └── SchemaOutOfDate       the schema is older than the code and may not be migrated
     ├── NotFound              no such record (or not in the asker's organisation)
     │    ├── InviteInvalid         an invite link cannot be used; says why (audit.consults)
     │    └── ReceiptUnknown        a receipt link is unknown, or its consult gone (audit.receipts)
     ├── Conflict              the change breaks a storage rule (e-mail taken, last admin)
     │    └── ConsultNotStarted     a receipt asked for before the consult started (audit.receipts)
     ├── InvalidValue          a value is not acceptable (e.g. a malformed e-mail address)
     ├── SealError             a sealed secret does not open (audit.sealing)
     └── StoreError            an encrypted file does not open (audit.filestore)
          ├── Tampered              a chunk or the header fails authentication
          └── Truncated             the file ends without its final chunk (the writer died)

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


class AccessLogNotWritten(DatabaseError):
    """The transaction meant to append an access record failed: the record is
    not in the log, so the read it records must not be answered."""


class MigrationFailed(DatabaseError):
    """A schema migration failed and was rolled back."""


class SchemaOutOfDate(DatabaseError):
    """The database's schema is not the one this code needs."""


class NotFound(AuditError):
    """The thing asked for does not exist, or not for this asker.

    Deliberately the same answer for both, so that nobody learns what exists
    in another organisation.
    """


class Conflict(AuditError):
    """The change would break a rule about what is stored (a taken e-mail
    address, an organisation without an admin)."""


class InvalidValue(AuditError):
    """A value offered for storage is not acceptable; the message says why."""
