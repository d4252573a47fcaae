"""Everything videoconsult keeps at rest, and for how long.

Exports the database engine helpers, the schema migrations, the data
directory and the master key, and the package's errors (see
:mod:`audit.errors` for the hierarchy). Imports neither ``signaling`` nor
``server``.
"""

from audit.datadir import prepare_data_dir
from audit.db import check_connection, create_engine, database_url, describe_url
from audit.errors import (
    AuditError,
    DatabaseError,
    DatabaseUnavailable,
    DataDirError,
    MigrationFailed,
    SchemaOutOfDate,
)
from audit.keys import DEV_MASTER_KEY_FILE, load_master_key
from audit.migrate import current_revision, head_revision, open_database, upgrade

__all__ = [
    "DEV_MASTER_KEY_FILE",
    "AuditError",
    "DataDirError",
    "DatabaseError",
    "DatabaseUnavailable",
    "MigrationFailed",
    "SchemaOutOfDate",
    "check_connection",
    "create_engine",
    "current_revision",
    "database_url",
    "describe_url",
    "head_revision",
    "load_master_key",
    "open_database",
    "prepare_data_dir",
    "upgrade",
]
