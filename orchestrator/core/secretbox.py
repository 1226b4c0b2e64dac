"""Webhook secrets at rest: AES-256-GCM under a key derived (HKDF-SHA256) from the server's
signing key (ORCH_SECRET_KEY, else the data dir's `secret.key`), bound to the user's id.

A database dump alone gives no webhook secret; whoever holds the signing key as well can still
open them, as every API process must (it signs deliveries with the real secret). A value without
the `enc1:` prefix is a plain secret written before this existed and is used as it is."""

from __future__ import annotations

import base64
import os
from functools import lru_cache

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

PREFIX = "enc1:"
NONCE_BYTES = 12


class SecretUnreadable(Exception):
    """The stored value was sealed under another signing key (or altered)."""


@lru_cache(maxsize=8)
def _cipher(signing_key: str) -> AESGCM:
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"orchestrator webhook secrets v1").derive(
        signing_key.encode()
    )
    return AESGCM(key)


def seal(signing_key: str, user_id: str, secret: str) -> str:
    nonce = os.urandom(NONCE_BYTES)
    sealed = _cipher(signing_key).encrypt(nonce, secret.encode(), user_id.encode())
    return PREFIX + base64.urlsafe_b64encode(nonce + sealed).decode()


def unseal(signing_key: str, user_id: str, stored: str) -> str:
    if not stored.startswith(PREFIX):
        return stored
    raw = base64.urlsafe_b64decode(stored[len(PREFIX) :])
    try:
        return _cipher(signing_key).decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:], user_id.encode()).decode()
    except Exception as exc:
        raise SecretUnreadable("webhook secret sealed under another signing key") from exc
