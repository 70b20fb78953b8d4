"""The one-login-per-user-and-device-class rule: which session holds each
(user, device class). A second login replaces the first, which the caller
kicks with ``DUPLICATE_LOGIN``."""

from __future__ import annotations


class LoginRegistry:
    def __init__(self) -> None:
        self._logins: dict[tuple[str, str], str] = {}

    def __len__(self) -> int:
        return len(self._logins)

    def login(self, user: str, device_class: str, session: str) -> str | None:
        """Record ``session``; returns the session it replaces, if any."""
        key = (user, device_class)
        previous = self._logins.get(key)
        self._logins[key] = session
        return previous if previous != session else None

    def logout(self, user: str, device_class: str, session: str) -> None:
        key = (user, device_class)
        if self._logins.get(key) == session:
            del self._logins[key]
