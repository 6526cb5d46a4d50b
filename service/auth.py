"""API keys: random 32-byte urlsafe tokens prefixed ``ms_``; only their sha256 is stored."""

from __future__ import annotations

import hashlib
import os
import secrets
import threading
import time
from collections import OrderedDict
from pathlib import Path

from sqlalchemy.orm import Session

from metaserve.service import store
from metaserve.service.exceptions import Unauthorized
from metaserve.service.models import User

KEY_PREFIX = "ms_"


def generate_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(*, session: Session, name: str, is_admin: bool = False) -> tuple[User, str]:
    """Create a user with a fresh key; returns the user and the key (shown once, never stored)."""
    key = generate_key()
    user = store.create_user(session=session, name=name, key_hash=hash_key(key), is_admin=is_admin)
    session.commit()
    return user, key


def authenticate(*, session: Session, key: str | None) -> User:
    if not key:
        raise Unauthorized()
    user = store.get_user_by_key_hash(session=session, key_hash=hash_key(key))
    if user is None:
        raise Unauthorized()
    return user


class KeyCache:
    """Key hash → the user it authenticates, for ``ttl_s`` seconds, at most ``size`` entries
    (least recently used evicted first): a status poll then costs no authentication query.
    Only successful lookups are kept, so a wrong key always reaches the database. The users
    kept are transient copies (id, name, is_admin), safe to share between requests; keys are
    never revoked or reassigned (a user row is immutable), so an entry cannot go stale."""

    def __init__(self, ttl_s: float = 300.0, size: int = 10_000) -> None:
        self.ttl_s = ttl_s
        self.size = size
        self._entries: OrderedDict[str, tuple[float, User]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key_hash: str) -> User | None:
        with self._lock:
            entry = self._entries.get(key_hash)
            if entry is None:
                return None
            if entry[0] < time.monotonic():
                del self._entries[key_hash]
                return None
            self._entries.move_to_end(key_hash)
            return entry[1]

    def put(self, key_hash: str, user: User) -> User:
        copy = User(id=user.id, name=user.name, is_admin=user.is_admin)
        with self._lock:
            self._entries[key_hash] = (time.monotonic() + self.ttl_s, copy)
            self._entries.move_to_end(key_hash)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)
        return copy


def ensure_admin_key(*, session: Session, path: Path) -> Path | None:
    """With no user in the database, create an admin key and write it to ``path`` (mode 0600).
    Returns the path when a key was written, None when users already existed."""
    if store.count_users(session=session) > 0:
        return None
    _, key = create_key(session=session, name="admin", is_admin=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(key + "\n")
    os.chmod(path, 0o600)
    return path
