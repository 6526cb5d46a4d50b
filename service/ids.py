"""Sortable job ids: 26-character, ULID-shaped (48-bit millisecond time + 80 bits),
Crockford base32, monotonic within one process so that ``ORDER BY id`` is creation order."""

from __future__ import annotations

import secrets
import threading
import time

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_RANDOM_BITS = 80
_lock = threading.Lock()
_last = (0, 0)


def _encode(value: int, length: int) -> str:
    chars = []
    for _ in range(length):
        value, digit = divmod(value, 32)
        chars.append(_ALPHABET[digit])
    return "".join(reversed(chars))


def new_id() -> str:
    """A new id greater than every id this process made before."""
    global _last
    with _lock:
        millis = time.time_ns() // 1_000_000
        last_millis, last_random = _last
        if millis <= last_millis:
            millis, randomness = last_millis, last_random + 1
            if randomness >= 1 << _RANDOM_BITS:
                millis, randomness = last_millis + 1, secrets.randbits(_RANDOM_BITS - 1)
        else:
            randomness = secrets.randbits(_RANDOM_BITS - 1)
        _last = (millis, randomness)
    return _encode(millis, 10) + _encode(randomness, 16)
