"""Secrets: session tokens, agent tokens and passwords, and how they are checked.

- A session token is ``<id>-<secret>`` like Coder's API keys: a 10-character id used to find the
  row, and a 22-character secret of which only a SHA-256 is stored. Sent in the
  ``Coder-Session-Token`` header.
- An agent token is a random UUID (as terraform-provider-coder makes them); only its SHA-256 is
  stored, and the hash is the lookup key.
- Passwords are hashed with scrypt (hashlib) and a per-user salt; hashing runs off the reactor.

The random parts carry 128+ bits, so a plain SHA-256 is the right strength for tokens (a slow
hash would only make every request slower).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import string
import uuid

SESSION_HEADER = "Coder-Session-Token"
_ALPHABET = string.ascii_letters + string.digits

# scrypt cost: ~50 ms and 16 MiB here; stored with the hash so it can be raised later.
_SCRYPT_N, _SCRYPT_R, _SCRYPT_P = 2**14, 8, 1


def _random_text(n: int) -> str:
    return "".join(secrets.choice(_ALPHABET) for _ in range(n))


def new_session_token() -> tuple[str, str, bytes]:
    """Returns (token, key id, hashed secret)."""
    key_id, secret = _random_text(10), _random_text(22)
    return f"{key_id}-{secret}", key_id, hash_secret(secret)


def split_session_token(token: str) -> tuple[str, str] | None:
    key_id, sep, secret = token.partition("-")
    if not sep or len(key_id) != 10 or len(secret) != 22:
        return None
    if not (key_id.isalnum() and secret.isalnum()):
        return None
    return key_id, secret


def hash_secret(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def secret_matches(secret: str, hashed: bytes) -> bool:
    return hmac.compare_digest(hash_secret(secret), hashed)


def new_agent_token() -> tuple[str, bytes]:
    token = str(uuid.uuid4())
    return token, hash_agent_token(token)


def hash_agent_token(token: str) -> bytes:
    return hashlib.sha256(token.strip().lower().encode()).digest()


def looks_like_agent_token(token: str) -> bool:
    try:
        uuid.UUID(token)
    except ValueError:
        return False
    return True


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(
        password.encode(), salt=salt, n=_SCRYPT_N, r=_SCRYPT_R, p=_SCRYPT_P, dklen=32
    )
    b64 = base64.b64encode
    return f"scrypt${_SCRYPT_N}${_SCRYPT_R}${_SCRYPT_P}${b64(salt).decode()}${b64(digest).decode()}"


def verify_password(password: str, stored: str) -> bool:
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        expected = base64.b64decode(digest)
        got = hashlib.scrypt(
            password.encode(), salt=base64.b64decode(salt), n=int(n), r=int(r), p=int(p),
            dklen=len(expected),
        )
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, expected)
