"""Errors of authentication, translated to HTTP answers by the views.

AuthError
 ├── LoginRefused          the login failed; deliberately says no more (401)
 ├── LoginLocked           too many failures; retry after a while (429)
 └── PasswordPolicyError   a new password does not meet the policy (422)
"""

from __future__ import annotations


class AuthError(Exception):
    """Base of every error the auth package raises."""


class LoginRefused(AuthError):
    """The login failed; deliberately says no more."""


class LoginLocked(AuthError):
    """Too many failures: no login is tried until ``retry_after_s`` have passed."""

    def __init__(self, retry_after_s: float) -> None:
        super().__init__("too many failed logins")
        self.retry_after_s = retry_after_s


class PasswordPolicyError(AuthError):
    """The password does not meet the policy; the message says what to change."""
