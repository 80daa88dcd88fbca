"""Operations API accounts in the state store (issue 10; tables of migration 0003).

Portable SQL mixed into :class:`~dicom_node.store.sql_store.SqlStore` (it uses that class's
``_transaction``, ``_db_time`` and ``_py_time`` hooks), kept apart from the DICOM state.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from dicom_node.store.base import (
    API_ROLES,
    ApiAccountStore,
    ApiSession,
    ApiToken,
    ApiUser,
    StoreConflict,
)
from dicom_node.store.sql_common import placeholders, require_aware, utc_now

_USER_COLUMNS = "name, role, password_hash, disabled, created_at, password_changed_at, must_change_password"
_TOKEN_COLUMNS = "id, user_name, label, created_at, last_used_at, revoked_at"


class ApiAccountSql(ApiAccountStore):
    """Portable SQL for :class:`~dicom_node.store.base.ApiAccountStore` (uses SqlStore's hooks)."""

    def _user(self, row: tuple) -> ApiUser:
        name, role, password_hash, disabled, created, changed, must_change = row
        return ApiUser(name, role, password_hash, bool(disabled), self._py_time(created), self._py_time(changed), bool(must_change))

    def _token(self, row: tuple) -> ApiToken:
        id_, user, label, created, used, revoked = row
        return ApiToken(
            int(id_), user, label, self._py_time(created), None if used is None else self._py_time(used),
            None if revoked is None else self._py_time(revoked),
        )  # fmt: skip

    def add_api_user(self, user: ApiUser) -> None:
        if user.role not in API_ROLES:
            raise ValueError(f"role {user.role!r}: use one of {', '.join(API_ROLES)}")
        with self._transaction(write=True) as tx:
            if tx.one("SELECT 1 FROM api_users WHERE name = ?", (user.name,)):
                raise StoreConflict(f"an account named {user.name!r} already exists")
            tx.execute(
                f"INSERT INTO api_users ({_USER_COLUMNS}) VALUES ({placeholders(7)})",
                (user.name, user.role, user.password_hash, bool(user.disabled), self._db_time(require_aware("created_at", user.created_at)),
                 self._db_time(require_aware("password_changed_at", user.password_changed_at)), bool(user.must_change_password)),
            )  # fmt: skip

    def get_api_user(self, name: str) -> ApiUser | None:
        with self._transaction(write=False) as tx:
            row = tx.one(f"SELECT {_USER_COLUMNS} FROM api_users WHERE name = ?", (name,))
        return None if row is None else self._user(row)

    def list_api_users(self) -> list[ApiUser]:
        with self._transaction(write=False) as tx:
            return [self._user(row) for row in tx.all(f"SELECT {_USER_COLUMNS} FROM api_users ORDER BY name")]

    def update_api_user(
        self,
        name: str,
        role: str | None = None,
        disabled: bool | None = None,
        password_hash: str | None = None,
        must_change_password: bool | None = None,
        keep_session: str | None = None,
    ) -> bool:
        """Change an account; a new password, a role or disabling ends its sessions (but the one
        whose id hash is ``keep_session``: the user who changed their own password stays logged in)."""
        if role is not None and role not in API_ROLES:
            raise ValueError(f"role {role!r}: use one of {', '.join(API_ROLES)}")
        sets: list[str] = []
        params: list[Any] = []
        if role is not None:
            sets.append("role = ?")
            params.append(role)
        if disabled is not None:
            sets.append("disabled = ?")
            params.append(bool(disabled))
        if password_hash is not None:
            sets += ["password_hash = ?", "password_changed_at = ?"]
            params += [password_hash, self._db_time(utc_now())]
        if must_change_password is not None:
            sets.append("must_change_password = ?")
            params.append(bool(must_change_password))
        with self._transaction(write=True) as tx:
            if tx.one("SELECT 1 FROM api_users WHERE name = ?", (name,)) is None:
                return False
            if sets:
                tx.execute(f"UPDATE api_users SET {', '.join(sets)} WHERE name = ?", (*params, name))
            if password_hash is not None or disabled or role is not None:
                tx.execute("DELETE FROM api_sessions WHERE user_name = ? AND id_hash <> ?", (name, keep_session or ""))
            return True

    def remove_api_user(self, name: str) -> bool:
        with self._transaction(write=True) as tx:
            tx.execute("DELETE FROM api_sessions WHERE user_name = ?", (name,))
            tx.execute("DELETE FROM api_tokens WHERE user_name = ?", (name,))
            return tx.execute("DELETE FROM api_users WHERE name = ?", (name,)) > 0

    def add_api_token(self, user_name: str, label: str, token_hash: str, at: datetime) -> ApiToken:
        created = self._db_time(require_aware("at", at))
        with self._transaction(write=True) as tx:
            if tx.one("SELECT 1 FROM api_users WHERE name = ?", (user_name,)) is None:
                raise KeyError(user_name)
            tx.execute("INSERT INTO api_tokens (user_name, label, token_hash, created_at) VALUES (?, ?, ?, ?)",
                       (user_name, label, token_hash, created))  # fmt: skip
            row = tx.one(f"SELECT {_TOKEN_COLUMNS} FROM api_tokens WHERE token_hash = ?", (token_hash,))
        return self._token(row)

    def find_api_token(self, token_hash: str, now: datetime) -> ApiToken | None:
        with self._transaction(write=True) as tx:
            row = tx.one(f"SELECT {_TOKEN_COLUMNS} FROM api_tokens WHERE token_hash = ? AND revoked_at IS NULL", (token_hash,))
            if row is None:
                return None
            tx.execute("UPDATE api_tokens SET last_used_at = ? WHERE id = ?", (self._db_time(require_aware("now", now)), row[0]))
        return self._token(row)

    def list_api_tokens(self, user_name: str | None = None) -> list[ApiToken]:
        where, params = ("WHERE user_name = ? ", [user_name]) if user_name is not None else ("", [])
        with self._transaction(write=False) as tx:
            return [self._token(r) for r in tx.all(f"SELECT {_TOKEN_COLUMNS} FROM api_tokens {where}ORDER BY id", params)]

    def revoke_api_token(self, token_id: int, at: datetime) -> bool:
        with self._transaction(write=True) as tx:
            return tx.execute("UPDATE api_tokens SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
                              (self._db_time(require_aware("at", at)), int(token_id))) > 0  # fmt: skip

    def add_api_session(self, session: ApiSession) -> None:
        with self._transaction(write=True) as tx:
            tx.execute("DELETE FROM api_sessions WHERE expires_at < ?", (self._db_time(utc_now()),))
            tx.execute(
                "INSERT INTO api_sessions (id_hash, user_name, csrf_token, created_at, expires_at) VALUES (?, ?, ?, ?, ?)",
                (session.id_hash, session.user_name, session.csrf_token, self._db_time(require_aware("created_at", session.created_at)),
                 self._db_time(require_aware("expires_at", session.expires_at))),
            )  # fmt: skip

    def get_api_session(self, id_hash: str, now: datetime) -> ApiSession | None:
        with self._transaction(write=False) as tx:
            row = tx.one("SELECT id_hash, user_name, csrf_token, created_at, expires_at FROM api_sessions WHERE id_hash = ? AND expires_at > ?",
                         (id_hash, self._db_time(require_aware("now", now))))  # fmt: skip
        if row is None:
            return None
        return ApiSession(row[0], row[1], row[2], self._py_time(row[3]), self._py_time(row[4]))

    def remove_api_session(self, id_hash: str) -> None:
        with self._transaction(write=True) as tx:
            tx.execute("DELETE FROM api_sessions WHERE id_hash = ?", (id_hash,))

    # ---- cheap aggregates for /metrics and /api/status -------------------------------------------
    def count_studies_by_state(self) -> dict[str, int]:
        with self._transaction(write=False) as tx:
            return {state: int(n) for state, n in tx.all("SELECT state, COUNT(*) FROM studies GROUP BY state")}

    def count_current_deliveries(self) -> list[tuple[str, str, int, int]]:
        with self._transaction(write=False) as tx:
            rows = tx.all(
                "SELECT d.destination, d.status, COUNT(*), COALESCE(SUM(d.attempts), 0) FROM deliveries d "
                "JOIN studies s ON s.study_instance_uid = d.study_instance_uid AND s.version = d.study_version "
                "GROUP BY d.destination, d.status ORDER BY d.destination, d.status"
            )
        return [(dest, status, int(n), int(attempts)) for dest, status, n, attempts in rows]
