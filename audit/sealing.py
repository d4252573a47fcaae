"""Small secrets at rest, sealed under keys derived from the master key.

Each purpose ("totp-secret", "login-failure") gets its own key, derived with
HKDF, so a key never serves two purposes. :func:`seal` is AES-256-GCM with
a random nonce and the record's id as associated data, so a sealed value
copied onto another row does not open. :func:`keyed_hash` is HMAC-SHA-256:
a stable pseudonym for counting (failed logins per e-mail or client address)
that cannot be read back.

Sealed layout: version byte (1) ‖ 12-byte nonce ‖ ciphertext and tag.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from audit.errors import AuditError

_VERSION = b"\x01"
_NONCE_BYTES = 12


class SealError(AuditError):
    """A sealed value does not open: wrong key, wrong record, or altered."""


def derive_key(master_key: bytes, purpose: str) -> bytes:
    """Return the 32-byte key for ``purpose``."""
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_info(purpose))
    return hkdf.derive(master_key)


def seal(master_key: bytes, purpose: str, plaintext: bytes, *, bound_to: str) -> bytes:
    """Encrypt ``plaintext`` for ``purpose``, bound to the record ``bound_to``."""
    nonce = os.urandom(_NONCE_BYTES)
    aead = AESGCM(derive_key(master_key, purpose))
    return _VERSION + nonce + aead.encrypt(nonce, plaintext, bound_to.encode())


def unseal(master_key: bytes, purpose: str, sealed: bytes, *, bound_to: str) -> bytes:
    """Decrypt what :func:`seal` made; raise :class:`SealError` if it does not open."""
    if len(sealed) < 1 + _NONCE_BYTES + 16 or sealed[:1] != _VERSION:
        raise SealError(f"sealed {purpose} has an unknown format")
    nonce, body = sealed[1 : 1 + _NONCE_BYTES], sealed[1 + _NONCE_BYTES :]
    try:
        return AESGCM(derive_key(master_key, purpose)).decrypt(nonce, body, bound_to.encode())
    except InvalidTag:
        raise SealError(f"sealed {purpose} does not open with this master key") from None


# A key of a record's own (sealed_under_own_key): AES-256.
_OWN_KEY_BYTES = 32


def seal_under_own_key(
    master_key: bytes, key_purpose: str, purpose: str, plaintext: bytes, *, bound_to: str
) -> tuple[bytes, bytes]:
    """Seal ``plaintext`` under a new random key, and that key under the master
    key: ``(wrapped_key, sealed)``, both bound to ``bound_to``. Deleting the
    two destroys the value for good (a derived key could be derived again)."""
    data_key = secrets.token_bytes(_OWN_KEY_BYTES)
    return (
        seal(master_key, key_purpose, data_key, bound_to=bound_to),
        seal(data_key, purpose, plaintext, bound_to=bound_to),
    )


def unseal_under_own_key(
    master_key: bytes,
    key_purpose: str,
    purpose: str,
    wrapped_key: bytes,
    sealed: bytes,
    *,
    bound_to: str,
) -> bytes:
    """Open what :func:`seal_under_own_key` made; :class:`SealError` if it does not open."""
    data_key = unseal(master_key, key_purpose, wrapped_key, bound_to=bound_to)
    return unseal(data_key, purpose, sealed, bound_to=bound_to)


def keyed_hash(master_key: bytes, purpose: str, value: str) -> str:
    """Return the hex HMAC-SHA-256 of ``value`` under the key for ``purpose``."""
    return hmac.new(derive_key(master_key, purpose), value.encode(), hashlib.sha256).hexdigest()


# What every random token we hand out looks like (secrets.token_urlsafe(32)
# gives 43 characters): a session id, an enrolment link's or invite's token,
# a patient's ticket. Anything else is refused before it is looked up.
TOKEN_PATTERN = r"[A-Za-z0-9_-]{20,100}"  # noqa: S105 - a pattern, not a secret
_TOKEN = re.compile(TOKEN_PATTERN)


def looks_like_token(text: str) -> bool:
    """Whether ``text`` could be one of our tokens (and so is safe to hash or look up)."""
    return _TOKEN.fullmatch(text) is not None


def token_hash(token: str) -> str:
    """Return the SHA-256 hex of a random token (enrolment link, session id).

    The tokens carry 256 random bits, so a plain hash suffices: nothing to
    guess, and a leaked table yields no usable token.
    """
    return hashlib.sha256(token.encode()).hexdigest()


def _info(purpose: str) -> bytes:
    return f"videoconsult/{purpose}".encode()
