"""API keys: random 32-byte urlsafe tokens prefixed ``ms_``; only their sha256 is stored."""

from __future__ import annotations

import hashlib
import os
import secrets
import threading
import time
from collections import OrderedDict
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from metaserve.service import job_store
from metaserve.service.exceptions import KeyNotFound, Unauthorized
from metaserve.service.orm import User

KEY_PREFIX = "ms_"
REVOKED_PREFIX = "revoked:"
"""A revoked key's ``key_hash``: this prefix and random hex, 64 characters like a sha256 hex
digest, which never holds a ``:``, so no key hashes to it (no schema change: the column and
its unique constraint stay as they are)."""


def generate_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(*, session: Session, name: str, is_admin: bool = False) -> tuple[User, str]:
    """Create a user with a fresh key; returns the user and the key (shown once, never stored)."""
    key = generate_key()
    user = job_store.create_user(session=session, name=name, key_hash=hash_key(key), is_admin=is_admin)
    session.commit()
    return user, key


def is_revoked(user: User) -> bool:
    return user.key_hash.startswith(REVOKED_PREFIX)


# Key administration. The SQL is here rather than in service/job_store.py: it touches only the
# users table, and only these three functions do.

def list_keys(*, session: Session) -> list[User]:
    """Every key holder, oldest first (their keys are never shown: only hashes are stored)."""
    return list(session.scalars(select(User).order_by(User.id)))


def _get_user(session: Session, user_id: int) -> User:
    user = session.get(User, user_id)
    if user is None:
        raise KeyNotFound(f"no API key with id {user_id}", id=user_id)
    return user


def revoke_key(*, session: Session, user_id: int) -> User:
    """Revoke the key of user ``user_id``: it authenticates no more (its jobs stay). A server
    that cached it (:class:`KeyCache`) accepts it until the entry expires, unless told
    (:meth:`KeyCache.forget_user`); revoking twice is harmless."""
    user = _get_user(session, user_id)
    if not is_revoked(user):
        user.key_hash = REVOKED_PREFIX + secrets.token_hex((64 - len(REVOKED_PREFIX)) // 2)
    session.commit()
    return user


def rotate_key(*, session: Session, user_id: int) -> tuple[User, str]:
    """A new key for user ``user_id`` (same user, same jobs); the old key, or a revoked state,
    ends with it. Returns the user and the new key (shown once)."""
    user = _get_user(session, user_id)
    key = generate_key()
    user.key_hash = hash_key(key)
    session.commit()
    return user, key


def authenticate(*, session: Session, key: str | None) -> User:
    if not key:
        raise Unauthorized()
    user = job_store.get_user_by_key_hash(session=session, key_hash=hash_key(key))
    if user is None:
        raise Unauthorized()
    return user


KEY_REVOKED = "api_key_revoked"
KEY_ROTATED = "api_key_rotated"


def key_ended(*, session: Session, key_hash: str, user_id: int) -> str | None:
    """Why the key hashing to ``key_hash`` no longer authenticates user ``user_id``:
    :data:`KEY_REVOKED` (revoked, or its user is gone), :data:`KEY_ROTATED` (the user has a
    new key); None while it still does. Read from the database, never a cache."""
    user = session.get(User, user_id, populate_existing=True)
    if user is not None and user.key_hash == key_hash:
        return None
    if user is None or is_revoked(user):
        return KEY_REVOKED
    return KEY_ROTATED


class KeyCache:
    """Key hash → the user it authenticates, for ``ttl_s`` seconds, at most ``size`` entries
    (least recently used evicted first): a status poll then costs no authentication query.
    Only successful lookups are kept, so a wrong key always reaches the database. The users
    kept are transient copies (id, name, is_admin), safe to share between requests. A key
    revoked or rotated through this process's API is forgotten at once
    (:meth:`forget_user`); through another process (another server, ``metaserve keys``) it is
    accepted here until its entry expires: at most ``ttl_s``."""

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

    def forget_user(self, user_id: int) -> None:
        """Drop every entry of ``user_id`` (its key was revoked or rotated)."""
        with self._lock:
            for key_hash in [h for h, (_, user) in self._entries.items() if user.id == user_id]:
                del self._entries[key_hash]

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
    if job_store.count_users(session=session) > 0:
        return None
    _, key = create_key(session=session, name="admin", is_admin=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(key + "\n")
    os.chmod(path, 0o600)
    return path
