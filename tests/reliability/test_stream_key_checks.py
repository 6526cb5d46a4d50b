"""Open streams share their key checks (``api/routes/events.py``, :class:`KeyChecks`): a
user's streams whose checks fall due together cost one query, not one each (300 streams
checking every 2 s were 150 threadpool hops and queries a second in the API process:
docs/notes/hostile-load-tail.md); an answer read before a revocation is never reused past
its freshness."""

from __future__ import annotations

import asyncio

from metaserve.api.routes.events import KeyChecks
from metaserve.service import auth
from metaserve.service.orm import User
from tests.helpers import make_user


def key_hash_of(sessions, user_id: int) -> str:  # noqa: ANN001
    with sessions() as session:
        return session.get(User, user_id).key_hash


def test_a_users_streams_share_one_check(sessions) -> None:  # noqa: ANN001
    user, _ = make_user(sessions, "alice")
    key_hash = key_hash_of(sessions, user.id)
    checks = KeyChecks(sessions, fresh_s=3600)

    async def twenty_streams() -> list[str | None]:
        return await asyncio.gather(*(checks.ended(key_hash, user.id) for _ in range(20)))

    assert asyncio.run(twenty_streams()) == [None] * 20
    assert checks.queries == 1


def test_a_stale_answer_is_read_again_and_sees_the_revocation(sessions) -> None:  # noqa: ANN001
    alice, _ = make_user(sessions, "alice")
    bob, _ = make_user(sessions, "bob")
    alice_hash, bob_hash = key_hash_of(sessions, alice.id), key_hash_of(sessions, bob.id)
    checks = KeyChecks(sessions, fresh_s=0.0)  # every answer is stale at once

    async def scenario() -> tuple:
        before = await checks.ended(alice_hash, alice.id)
        with sessions() as session:
            auth.revoke_key(session=session, user_id=alice.id)
        after = await checks.ended(alice_hash, alice.id)
        other = await checks.ended(bob_hash, bob.id)
        return before, after, other

    assert asyncio.run(scenario()) == (None, auth.KEY_REVOKED, None)
    assert checks.queries == 3
