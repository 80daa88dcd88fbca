"""Accounts, tokens, sessions and the login rate limit of the operations API.

* Passwords: argon2id (``argon2-cffi``, its default parameters), never stored or logged in clear.
* API tokens (automation) and session cookies (console): 256-bit random secrets; only their
  SHA-256 is stored (a high-entropy secret needs no slow hash), so a database dump reveals none.
* Roles are ordered: ``viewer`` < ``operator`` < ``admin``; an endpoint names the least role it needs.
* Failed logins are counted per user name and per client address in a sliding window; past
  ``http.max_failed_logins`` for the name (four times that for the address, which many users may
  share behind a proxy) the login answers 429 (with Retry-After) without checking the password.
"""

from __future__ import annotations

import hashlib
import secrets
import string
import threading
import time
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal

from dicom_node.store.base import API_ROLES, ApiSession, ApiUser

TOKEN_PREFIX = "axn_"
#: Worker tokens (analyze workers on other hosts, issue 23): read the study they claimed over DICOMweb, report analyses.
WORKER_TOKEN_PREFIX = "axw_"
#: The role of a worker token's principal: outside the account roles, it passes only the worker
#: endpoints and the DICOMweb reads (see :func:`dicom_node.api.deps.role`).
WORKER_ROLE = "worker"
SESSION_COOKIE = "anatomix_session"
CSRF_HEADER = "X-CSRF-Token"
#: A password we generate: 20 characters from letters and digits (about 119 bits).
_ALPHABET = string.ascii_letters + string.digits
MIN_PASSWORD_LENGTH = 12

_hasher = None


def hasher():  # argon2 imports lazily: the DICOM side never needs it
    global _hasher
    if _hasher is None:
        from argon2 import PasswordHasher

        _hasher = PasswordHasher()
    return _hasher


def hash_password(password: str) -> str:
    return hasher().hash(password)


def verify_password(password_hash: str, password: str) -> bool:
    from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

    try:
        return hasher().verify(password_hash, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


#: Verified against when the user name is unknown, so a login takes as long either way.
_DUMMY_HASH: str | None = None


def burn_verification(password: str) -> None:
    global _DUMMY_HASH
    if _DUMMY_HASH is None:
        _DUMMY_HASH = hash_password(secrets.token_hex(16))
    verify_password(_DUMMY_HASH, password)


def generate_password() -> str:
    return "".join(secrets.choice(_ALPHABET) for _ in range(20))


def password_problem(password: str) -> str | None:
    """Why a chosen password is unacceptable, or None."""
    if len(password) < MIN_PASSWORD_LENGTH:
        return f"a password needs at least {MIN_PASSWORD_LENGTH} characters"
    if len(password) > 1024:
        return "a password may have at most 1024 characters"
    return None


def new_secret(prefix: str = "") -> str:
    return prefix + secrets.token_urlsafe(32)


def secret_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def role_at_least(role: str, needed: str) -> bool:
    if role not in API_ROLES:  # a worker token's principal holds no account role
        return False
    return API_ROLES.index(role) >= API_ROLES.index(needed)


def new_user(name: str, role: str, password: str, must_change_password: bool = False) -> ApiUser:
    """A new account; ``must_change_password`` for a generated (one-time) password."""
    now = datetime.now(UTC)
    return ApiUser(name=name, role=role, password_hash=hash_password(password), disabled=False, created_at=now, password_changed_at=now,
                   must_change_password=must_change_password)  # fmt: skip


def new_session(user_name: str, ttl_s: float) -> tuple[str, ApiSession]:
    """(cookie value, session row)."""
    cookie = new_secret()
    now = datetime.now(UTC)
    return cookie, ApiSession(secret_hash(cookie), user_name, secrets.token_urlsafe(32), now, now + timedelta(seconds=ttl_s))


@dataclass(frozen=True)
class Principal:
    """Who is calling: the account, its role, and how it authenticated (``token`` or ``session``)."""

    user: str
    role: str
    via: Literal["token", "session"]
    session_hash: str | None = None
    csrf_token: str | None = None
    token_id: int | None = None
    #: A session of an account whose one-time password is not yet changed: it may only change it.
    must_change_password: bool = False


#: An address may fail this many times more often than one user name.
ADDRESS_FACTOR = 4


class LoginLimiter:
    """Failed logins per key (user name, client address) in a sliding window, in this process."""

    def __init__(self, max_failures: int, window_s: float) -> None:
        self.max_failures = max_failures
        self.window_s = window_s
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def _limit(self, key: str) -> int:
        return self.max_failures * (ADDRESS_FACTOR if key.startswith("addr:") else 1)

    def _recent(self, key: str, now: float) -> deque[float]:
        times = self._failures.setdefault(key, deque())
        while times and times[0] <= now - self.window_s:
            times.popleft()
        return times

    def retry_after(self, keys: list[str]) -> float:
        """Seconds until a login for these keys is allowed again (0: allowed now)."""
        now = time.monotonic()
        with self._lock:
            waits = []
            for key in keys:
                times = self._recent(key, now)
                limit = self._limit(key)
                if len(times) >= limit:
                    waits.append(times[-limit] + self.window_s - now)
            return max(waits, default=0.0)

    def failed(self, keys: list[str]) -> None:
        now = time.monotonic()
        with self._lock:
            for key in keys:
                self._recent(key, now).append(now)
            if len(self._failures) > 10_000:  # bound memory under a spray of names
                for key in [k for k, v in self._failures.items() if not v]:
                    del self._failures[key]

    def succeeded(self, keys: list[str]) -> None:
        with self._lock:
            for key in keys:
                self._failures.pop(key, None)
