"""The tables, as SQLAlchemy Core metadata. Alembic migrations create them.

Every change here comes with a new revision in ``audit/migrations/versions``;
``tests/test_database.py`` fails when the two drift apart.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from audit.roles import ROLE_NAMES


class UtcDateTime(sa.TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on every backend.

    SQLite keeps no offset and hands back naive values; this type refuses
    naive input and always returns aware UTC, so comparisons never mix the two.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given; use an aware UTC datetime")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# Stable constraint names, so that migrations can refer to them on every backend.
metadata = sa.MetaData(
    naming_convention={
        "ix": "ix_%(column_0_label)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

# A practice or clinic. Every professional account belongs to exactly one,
# and every view is limited to the viewer's own organisation.
organisations = sa.Table(
    "organisations",
    metadata,
    sa.Column("id", sa.Uuid(), primary_key=True),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("created_at", UtcDateTime(), nullable=False),
    sa.UniqueConstraint("name"),
)

# An autoincrementing 64-bit key on PostgreSQL; SQLite only autoincrements INTEGER.
_BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


# A professional: therapist, support or admin, of exactly one organisation.
# Enrolled once a password and a confirmed TOTP secret are set.
accounts = sa.Table(
    "accounts",
    metadata,
    sa.Column("id", sa.Uuid(), primary_key=True),
    sa.Column(
        "organisation_id",
        sa.Uuid(),
        sa.ForeignKey("organisations.id", ondelete="RESTRICT"),
        nullable=False,
        index=True,
    ),
    # Normalised: ASCII, lower case (see audit.accounts.normalise_email).
    sa.Column("email", sa.String(254), nullable=False),
    sa.Column("role", sa.String(16), nullable=False),
    sa.Column("password_hash", sa.String(255), nullable=True),
    # AES-GCM under a key derived from the master key; see audit.sealing.
    sa.Column("totp_secret_sealed", sa.LargeBinary(), nullable=True),
    # The last TOTP time step accepted: a code is good once.
    sa.Column("totp_last_step", sa.BigInteger(), nullable=True),
    sa.Column("created_at", UtcDateTime(), nullable=False),
    sa.Column("enrolled_at", UtcDateTime(), nullable=True),
    sa.Column("disabled_at", UtcDateTime(), nullable=True),
    # The practice's record system's id for the person (set by an admin):
    # webhooks name the therapist by it instead of the pseudonym.
    sa.Column("external_id", sa.String(64), nullable=True),
    sa.UniqueConstraint("email"),
    sa.CheckConstraint(f"role IN {ROLE_NAMES!r}", name="role"),
    # One account per external id within a practice (NULLs do not clash).
    sa.Index("ix_accounts_external_id", "organisation_id", "external_id", unique=True),
)

# A one-time link to set a password and enrol a TOTP app. Only the token's
# hash is kept. The password and secret chosen in the first step wait here
# until a valid code confirms them.
enrolment_links = sa.Table(
    "enrolment_links",
    metadata,
    sa.Column("token_hash", sa.String(64), primary_key=True),
    sa.Column(
        "account_id",
        sa.Uuid(),
        sa.ForeignKey("accounts.id", ondelete="CASCADE"),
        nullable=False,
        index=True,
    ),
    sa.Column("created_at", UtcDateTime(), nullable=False),
    sa.Column("expires_at", UtcDateTime(), nullable=False),
    sa.Column("used_at", UtcDateTime(), nullable=True),
    sa.Column("pending_password_hash", sa.String(255), nullable=True),
    sa.Column("pending_totp_secret_sealed", sa.LargeBinary(), nullable=True),
)

# Something the account holder must be told at their next login, such as
# that an admin or the operator reset their credentials. Deleted once they
# dismiss it, or with the account.
account_notices = sa.Table(
    "account_notices",
    metadata,
    sa.Column("id", _BigId, primary_key=True, autoincrement=True),
    sa.Column(
        "account_id",
        sa.Uuid(),
        sa.ForeignKey("accounts.id", ondelete="CASCADE"),
        nullable=False,
        index=True,
    ),
    sa.Column("kind", sa.String(32), nullable=False),
    sa.Column("created_at", UtcDateTime(), nullable=False),
    # Who did it: an admin's account (null for the operator at the console,
    # or once that account is erased), and the role they acted in.
    sa.Column(
        "by_account_id",
        sa.Uuid(),
        sa.ForeignKey("accounts.id", ondelete="SET NULL"),
        nullable=True,
    ),
    sa.Column("by_role", sa.String(16), nullable=False),
)

# A logged-in browser. Only the hash of the cookie's value is kept.
sessions = sa.Table(
    "sessions",
    metadata,
    sa.Column("id_hash", sa.String(64), primary_key=True),
    sa.Column(
        "account_id",
        sa.Uuid(),
        sa.ForeignKey("accounts.id", ondelete="CASCADE"),
        nullable=False,
        index=True,
    ),
    sa.Column("created_at", UtcDateTime(), nullable=False),
    sa.Column("last_seen_at", UtcDateTime(), nullable=False),
)

# Failed logins, for lockouts. Neither the e-mail address nor the client
# address is kept: both are keyed hashes (HMAC under a key derived from the
# master key), enough to count, useless to read back.
login_failures = sa.Table(
    "login_failures",
    metadata,
    sa.Column("id", _BigId, primary_key=True, autoincrement=True),
    sa.Column("subject_hash", sa.String(64), nullable=False, index=True),
    sa.Column("client_hash", sa.String(64), nullable=False, index=True),
    sa.Column("failed_at", UtcDateTime(), nullable=False, index=True),
)

# Who looked at or changed what (NEN 7513 fields). Append-only: the code
# has no update or delete path for it.
access_log = sa.Table(
    "access_log",
    metadata,
    sa.Column("id", _BigId, primary_key=True, autoincrement=True),
    sa.Column("at", UtcDateTime(), nullable=False),
    sa.Column("organisation_id", sa.Uuid(), nullable=True, index=True),
    sa.Column("actor_id", sa.Uuid(), nullable=True),
    sa.Column("actor_role", sa.String(16), nullable=False),
    sa.Column("action", sa.String(64), nullable=False),
    sa.Column("object_type", sa.String(32), nullable=False),
    # Indexed: a patient's receipt lists the records about one consult.
    sa.Column("object_id", sa.String(64), nullable=True, index=True),
    sa.Column("outcome", sa.String(16), nullable=False),
    sa.Column("client_type", sa.String(16), nullable=False),
    # The hash chains (audit/access_log.py): one per organisation (its id) and
    # one for the installation; position in the chain, the predecessor's hash,
    # and this record's own hash.
    sa.Column("chain", sa.String(40), nullable=False),
    sa.Column("seq", sa.BigInteger(), nullable=False),
    sa.Column("prev_hash", sa.String(64), nullable=False),
    sa.Column("hash", sa.String(64), nullable=False, index=True),
    sa.UniqueConstraint("chain", "seq"),
)

# Where a chain continues after retention purged its oldest records: the
# last purged record's position and hash.
access_log_checkpoints = sa.Table(
    "access_log_checkpoints",
    metadata,
    sa.Column("id", _BigId, primary_key=True, autoincrement=True),
    sa.Column("chain", sa.String(40), nullable=False, index=True),
    sa.Column("through_seq", sa.BigInteger(), nullable=False),
    sa.Column("through_hash", sa.String(64), nullable=False),
    sa.Column("created_at", UtcDateTime(), nullable=False),
    sa.Column("records_purged", sa.BigInteger(), nullable=False),
)

# Connection diagnostics and failed logins, for technical support. Entries
# may hold personal data (IP address, browser) and are readable for 24 hours
# only; a purge task deletes them after that.
technical_log = sa.Table(
    "technical_log",
    metadata,
    sa.Column("id", _BigId, primary_key=True, autoincrement=True),
    sa.Column("at", UtcDateTime(), nullable=False, index=True),
    sa.Column("kind", sa.String(64), nullable=False),
    # A pseudonymous id: account or consult UUID, never a name or address.
    sa.Column("subject", sa.String(64), nullable=True, index=True),
    sa.Column("detail", sa.JSON(), nullable=False),
)

# A consult: who ran it, when it was scheduled, started and ended, how long
# it lasted, and nothing else (the promise "metadata only"; a time is not
# personal data; tests/test_signaling.py fails if another column appears).
# The therapist link is cut on erasure of the account; the record stays,
# pseudonymous, until its retention ends.
consults = sa.Table(
    "consults",
    metadata,
    sa.Column("id", sa.Uuid(), primary_key=True),
    sa.Column(
        "therapist_id",
        sa.Uuid(),
        sa.ForeignKey("accounts.id", ondelete="SET NULL"),
        nullable=True,
        index=True,
    ),
    sa.Column("created_at", UtcDateTime(), nullable=False),
    sa.Column("started_at", UtcDateTime(), nullable=True),
    sa.Column("ended_at", UtcDateTime(), nullable=True),
    sa.Column("duration_s", sa.Integer(), nullable=True),
    sa.Column("status", sa.String(16), nullable=False),
    # The appointment, when the therapist gave one: the waiting room opens
    # a while before it (consults.waiting_room_opens_before_s).
    sa.Column("scheduled_at", UtcDateTime(), nullable=True),
)

# The therapist's label for the patient in the waiting room ("Mrs de Vries,
# 10:30"), apart from the consult's record: sealed (AES-GCM) under a random
# key of its own, which is kept here wrapped by a key of the master key ring
# (see audit/labels.py, audit/keyring.py). The row, key and ciphertext together, is deleted when the
# consult ends or, before it starts, no link to it works any more.
consult_labels = sa.Table(
    "consult_labels",
    metadata,
    sa.Column(
        "consult_id",
        sa.Uuid(),
        sa.ForeignKey("consults.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    sa.Column("wrapped_key", sa.LargeBinary(), nullable=False),
    sa.Column("sealed_label", sa.LargeBinary(), nullable=False),
    # The ring key that wraps wrapped_key (master_keys.id, or the root's id);
    # NULL: the root key, for rows older than the ring's cover of labels.
    sa.Column("key_id", sa.String(16), nullable=True),
)

# The practice's own reference for the consult's appointment (an opaque
# string from its record system, issue 21 item 4), apart from the consult's
# record and sealed like the label: AES-GCM under a random key of its own,
# kept here wrapped by a key of the ring (audit/references.py). The row, key
# and ciphertext together, is deleted once the consult is over and no
# message about it is still to be sent; with the record at the latest.
appointment_references = sa.Table(
    "appointment_references",
    metadata,
    sa.Column(
        "consult_id",
        sa.Uuid(),
        sa.ForeignKey("consults.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    sa.Column("wrapped_key", sa.LargeBinary(), nullable=False),
    sa.Column("sealed_reference", sa.LargeBinary(), nullable=False),
    # As consult_labels.key_id.
    sa.Column("key_id", sa.String(16), nullable=True),
)

# The patient's way in. Only the token's hash is kept; the row goes when the
# consult ends.
invites = sa.Table(
    "invites",
    metadata,
    sa.Column("token_hash", sa.String(64), primary_key=True),
    sa.Column(
        "consult_id",
        sa.Uuid(),
        sa.ForeignKey("consults.id", ondelete="CASCADE"),
        nullable=False,
        index=True,
    ),
    sa.Column("created_at", UtcDateTime(), nullable=False),
    sa.Column("expires_at", UtcDateTime(), nullable=False),
    sa.Column("first_used_at", UtcDateTime(), nullable=True),
    sa.Column("revoked_at", UtcDateTime(), nullable=True),
    # The therapist marked the patient as under 16: a parent or guardian
    # consents too. A property of the link, not of the consult record.
    sa.Column("guardian_consent", sa.Boolean(), nullable=False, server_default=sa.false()),
)


# The patient's receipt of a consult (audit/receipts.py): a link that shows
# the consult's times and who looked at its record. Only the token's hash is
# kept, tied to the consult and nothing else: no time (when the patient's
# page asked for it is the patient's, not the consult's), only an order, so
# that a consult keeps its newest few. The row goes with the consult's
# record (retention), and the receipt then no longer opens.
receipts = sa.Table(
    "receipts",
    metadata,
    sa.Column("id", _BigId, primary_key=True, autoincrement=True),
    sa.Column("token_hash", sa.String(64), nullable=False),
    sa.Column(
        "consult_id",
        sa.Uuid(),
        sa.ForeignKey("consults.id", ondelete="CASCADE"),
        nullable=False,
        index=True,
    ),
    sa.UniqueConstraint("token_hash"),
)

# A recording destroyed while its consult's record stays (deleted by its
# therapist, or its shorter retention ran out): its id and consult only, so
# that the receipt can still say the consult was recorded and list the
# access records about the recording (they name it by id). Goes with the
# consult's record.
destroyed_recordings = sa.Table(
    "destroyed_recordings",
    metadata,
    sa.Column("recording_id", sa.Uuid(), primary_key=True),
    sa.Column(
        "consult_id",
        sa.Uuid(),
        sa.ForeignKey("consults.id", ondelete="CASCADE"),
        nullable=False,
        index=True,
    ),
)

# An organisation's retention (the "central setting"), in days; without a
# row the installation's defaults (settings [retention]) apply.
retention_settings = sa.Table(
    "retention_settings",
    metadata,
    sa.Column(
        "organisation_id",
        sa.Uuid(),
        sa.ForeignKey("organisations.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    sa.Column("consult_days", sa.Integer(), nullable=False),
    sa.Column("recording_days", sa.Integer(), nullable=False),
    sa.Column("access_log_days", sa.Integer(), nullable=False),
    sa.Column("updated_at", UtcDateTime(), nullable=False),
)


# What a practice sets for itself (the admin console); without a row the
# installation's settings apply. It can only narrow them: recording needs
# the server's recording.enabled too, and the invite validity is at most the
# server's consults.invite_validity_s (NULL: the server's).
practice_settings = sa.Table(
    "practice_settings",
    metadata,
    sa.Column(
        "organisation_id",
        sa.Uuid(),
        sa.ForeignKey("organisations.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    sa.Column("recording_allowed", sa.Boolean(), nullable=False),
    sa.Column("invite_validity_s", sa.Integer(), nullable=True),
    sa.Column("updated_at", UtcDateTime(), nullable=False),
    # Its therapists may attach the practice's appointment reference to a
    # consult (off unless the practice turns it on).
    sa.Column(
        "appointment_reference_allowed", sa.Boolean(), nullable=False, server_default=sa.false()
    ),
)

# A recording of a consult in the encrypted file store (audit/filestore.py):
# the file holds only ciphertext; its data key lives here, wrapped by the
# master key named by key_id. Deleting the row destroys the key
# (crypto-shredding); the file goes after that.
recordings = sa.Table(
    "recordings",
    metadata,
    sa.Column("id", sa.Uuid(), primary_key=True),
    sa.Column(
        "consult_id",
        sa.Uuid(),
        sa.ForeignKey("consults.id", ondelete="RESTRICT"),
        nullable=False,
        index=True,
    ),
    sa.Column("created_at", UtcDateTime(), nullable=False),
    sa.Column("ended_at", UtcDateTime(), nullable=True),
    # recording, complete or incomplete (the writer died before the end).
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("key_id", sa.String(16), nullable=False),
    sa.Column("wrapped_key", sa.LargeBinary(), nullable=False),
    sa.Column("file_name", sa.String(64), nullable=False),
    sa.Column("plaintext_bytes", sa.BigInteger(), nullable=True),
    # The consent it was made under: when the therapist asked, when the
    # patient (or, for a patient under 16, the guardian) agreed, and who.
    # No name: "patient" or "guardian" is all that is known of them.
    sa.Column("requested_at", UtcDateTime(), nullable=True),
    sa.Column("consented_at", UtcDateTime(), nullable=True),
    sa.Column("consent_by", sa.String(16), nullable=True),
    # Why it stopped: stopped_by_therapist, stopped_by_patient, storage_full,
    # participant_left, consult_ended, recorder_failed, server_restart.
    sa.Column("stop_reason", sa.String(32), nullable=True),
)


# The master key ring (audit/keyring.py): keys that wrap recordings', labels'
# and appointment references' data keys, each sealed by the configured root
# key. The newest is current; ``videoconsult keys rotate`` adds one and
# re-wraps every data key under it;
# an old one is retired (its row deleted) once no data key needs it.
master_keys = sa.Table(
    "master_keys",
    metadata,
    sa.Column("id", sa.String(16), primary_key=True),
    sa.Column("wrapped_key", sa.LargeBinary(), nullable=False),
    sa.Column("created_at", UtcDateTime(), nullable=False),
)


# Where an organisation's record system wants to hear of its consults and
# recordings (audit/webhooks.py): an https URL, the events it takes (a JSON
# list), and its signing secret (Standard Webhooks), sealed under a key
# derived from the master key and bound to the endpoint's id. After a
# rotation the previous secret signs too, until previous_expires_at.
webhook_endpoints = sa.Table(
    "webhook_endpoints",
    metadata,
    sa.Column("id", sa.Uuid(), primary_key=True),
    sa.Column(
        "organisation_id",
        sa.Uuid(),
        sa.ForeignKey("organisations.id", ondelete="CASCADE"),
        nullable=False,
        index=True,
    ),
    sa.Column("url", sa.String(2000), nullable=False),
    sa.Column("events", sa.JSON(), nullable=False),
    sa.Column("secret_sealed", sa.LargeBinary(), nullable=False),
    sa.Column("previous_secret_sealed", sa.LargeBinary(), nullable=True),
    sa.Column("previous_expires_at", UtcDateTime(), nullable=True),
    sa.Column("created_at", UtcDateTime(), nullable=False),
    sa.Column("secret_rotated_at", UtcDateTime(), nullable=True),
    # What consult events are sent as: "standard" (Standard Webhooks' JSON) or
    # "fhir" (a FHIR R4 Encounter, audit/fhir.py).
    sa.Column("payload", sa.String(16), nullable=False, server_default="standard"),
)

# The transactional outbox (audit/outbox.py): an event, written in the same
# transaction as the change it tells of, for an organisation that has an
# endpoint taking it. Its id is the message's webhook-id. ``data`` holds
# times, statuses and ids only; the therapist appears in the message as a
# pseudonym made when it is sent (from therapist_id, cut on erasure). Both
# are cleared once no delivery of the event is pending.
webhook_events = sa.Table(
    "webhook_events",
    metadata,
    sa.Column("id", sa.Uuid(), primary_key=True),
    sa.Column(
        "organisation_id",
        sa.Uuid(),
        sa.ForeignKey("organisations.id", ondelete="CASCADE"),
        nullable=False,
        index=True,
    ),
    sa.Column("type", sa.String(32), nullable=False),
    # The consult or recording the event is about.
    sa.Column("subject_id", sa.Uuid(), nullable=False),
    sa.Column(
        "therapist_id",
        sa.Uuid(),
        sa.ForeignKey("accounts.id", ondelete="SET NULL"),
        nullable=True,
    ),
    sa.Column("data", sa.JSON(), nullable=False),
    sa.Column("created_at", UtcDateTime(), nullable=False),
)

# One event to one endpoint: pending until a 2xx answer (delivered) or until
# the retries run out (failed). A node claims a due delivery by moving
# next_attempt_at past the time its send may take (PostgreSQL: FOR UPDATE
# SKIP LOCKED), so no two nodes send it at once; one that dies leaves it due
# again when that runs out.
webhook_deliveries = sa.Table(
    "webhook_deliveries",
    metadata,
    sa.Column("id", _BigId, primary_key=True, autoincrement=True),
    sa.Column(
        "event_id",
        sa.Uuid(),
        sa.ForeignKey("webhook_events.id", ondelete="CASCADE"),
        nullable=False,
        index=True,
    ),
    sa.Column(
        "endpoint_id",
        sa.Uuid(),
        sa.ForeignKey("webhook_endpoints.id", ondelete="CASCADE"),
        nullable=False,
        index=True,
    ),
    # pending, delivered or failed.
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("attempts", sa.Integer(), nullable=False),
    sa.Column("next_attempt_at", UtcDateTime(), nullable=True, index=True),
    sa.Column("last_attempt_at", UtcDateTime(), nullable=True),
    # The last attempt's HTTP status, or what went wrong before one came.
    sa.Column("last_status_code", sa.Integer(), nullable=True),
    sa.Column("last_error", sa.String(200), nullable=True),
    sa.Column("finished_at", UtcDateTime(), nullable=True),
    sa.UniqueConstraint("event_id", "endpoint_id"),
)
