"""The roles of professional accounts (see the roles table in the design)."""

from __future__ import annotations

import enum


class Role(enum.Enum):
    # Runs consults: creates them, admits patients, ends them.
    THERAPIST = "therapist"
    # Sees pseudonymous consult metadata and the 24-hour technical log.
    SUPPORT = "support"
    # Manages accounts, roles, retention and keys of the organisation.
    ADMIN = "admin"


ROLE_NAMES = tuple(role.value for role in Role)
