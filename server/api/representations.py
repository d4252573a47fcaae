"""How stored things look in API answers."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from audit.accounts import Account


def iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None


def account_json(account: Account) -> dict[str, Any]:
    """An account as the API shows it: never a hash, never a secret."""
    return {
        "id": str(account.id),
        "email": account.email,
        "role": account.role.value,
        "status": account.status.value,
        "created_at": iso(account.created_at),
        "enrolled_at": iso(account.enrolled_at),
        "disabled_at": iso(account.disabled_at),
    }
