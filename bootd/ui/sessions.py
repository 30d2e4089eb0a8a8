"""Dashboard logins kept on the server: a random session id in a cookie, a CSRF token per session, an idle
and an absolute limit. Nothing here knows HTTP; the clock is explicit so tests step it.

Kept in memory: a restart of bootd ends every login (the admin logs in again), which is also what makes a
stolen cookie worthless after one.
"""
from __future__ import annotations

import hmac
import secrets
import time
from dataclasses import dataclass
from typing import Callable, Optional

Clock = Callable[[], float]


@dataclass
class Session:
    id: str
    user: str
    csrf: str
    created: float
    seen: float


class SessionBook:
    def __init__(self, idle: float, max_age: float, clock: Clock = time.time, max_sessions: int = 10000):
        self.idle = idle
        self.max_age = max_age
        self.clock = clock
        self.max_sessions = max_sessions  # oldest dropped beyond this: a login loop cannot grow memory
        self._by_id: dict[str, Session] = {}

    def create(self, user: str) -> Session:
        now = self.clock()
        self._expire(now)
        while len(self._by_id) >= self.max_sessions:
            del self._by_id[next(iter(self._by_id))]
        session = Session(secrets.token_urlsafe(32), user, secrets.token_urlsafe(32), now, now)
        self._by_id[session.id] = session
        return session

    def get(self, session_id: Optional[str]) -> Optional[Session]:
        """The live session with this id, its idle clock restarted; None if unknown or expired."""
        if not session_id:
            return None
        session = self._by_id.get(session_id)
        if session is None:
            return None
        now = self.clock()
        if now - session.seen > self.idle or now - session.created > self.max_age:
            del self._by_id[session_id]
            return None
        session.seen = now
        return session

    @staticmethod
    def csrf_ok(session: Session, token: Optional[str]) -> bool:
        return bool(token) and hmac.compare_digest(session.csrf, str(token))

    def drop(self, session_id: str) -> None:
        self._by_id.pop(session_id, None)

    def drop_user(self, user: str) -> int:
        gone = [sid for sid, s in self._by_id.items() if s.user == user]
        for sid in gone:
            del self._by_id[sid]
        return len(gone)

    def __len__(self) -> int:
        return len(self._by_id)

    def _expire(self, now: float) -> None:
        for sid in [sid for sid, s in self._by_id.items()
                    if now - s.seen > self.idle or now - s.created > self.max_age]:
            del self._by_id[sid]
