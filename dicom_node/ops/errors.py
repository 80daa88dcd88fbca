"""The one error type for a mistake a user can fix (a bad value, an unknown name, a refused action)."""

from __future__ import annotations


class UserError(RuntimeError):
    """A user-facing error: one line that says what was wrong. The CLI prints it and exits with
    ``code``; the API answers it as a problem detail."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code
