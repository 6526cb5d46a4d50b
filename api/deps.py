"""Route dependencies as ``Annotated`` aliases: a route's signature says what it needs.

Both dependencies are ``async`` on purpose: a sync dependency costs a trip through the
threadpool (two for a generator), which at tens of requests per second per core is a large
part of a status poll. The session is created here (no connection is taken until the route's
first query, in the route's own thread) and closed here when the route left no transaction
open (closing is then pure Python); the key check hits an in-process cache of
:class:`metaserve.service.auth.KeyCache` and only goes to the database, in the threadpool, on a miss.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Path, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from metaserve.service import auth
from metaserve.service.exceptions import Unauthorized
from metaserve.service.orm import User
from metaserve.service.settings import Settings

# Text a client may send in a path, query or header: anything but control characters, which
# ControlCharacterMiddleware refuses with a 422 naming the field; stated in the schema so a
# client (or a schema fuzzer) knows.
NO_CONTROL_CHARACTERS = r"^[^\x00-\x1f\x7f-\x9f]*$"
PathText = Annotated[str, Path(pattern=NO_CONTROL_CHARACTERS)]

_bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer ms_...`")


def get_app_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_session(request: Request) -> AsyncIterator[Session]:
    session = request.app.state.session_factory()
    try:
        yield session
    finally:
        if session.in_transaction():
            await run_in_threadpool(session.close)  # rolls back over the connection
        else:
            session.close()


SettingsDep = Annotated[Settings, Depends(get_app_settings)]
SessionDep = Annotated[Session, Depends(get_session)]


async def get_current_user(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> User:
    key = credentials.credentials if credentials and credentials.scheme.lower() == "bearer" else None
    user = await user_of_key(request.app, key)
    request.state.key_hash = auth.hash_key(key)  # for streams that re-check it while open
    return user


async def user_of_key(app, key: str | None) -> User:  # noqa: ANN001
    """The user ``key`` authenticates (:class:`~metaserve.service.auth.KeyCache` first, the
    database on a miss); :class:`Unauthorized` if none."""
    if not key:
        raise Unauthorized()
    cache: auth.KeyCache = app.state.key_cache
    key_hash = auth.hash_key(key)
    user = cache.get(key_hash)
    if user is None:
        user = cache.put(key_hash, await run_in_threadpool(
            _authenticate, app.state.session_factory, key))
    return user


def _authenticate(factory, key: str) -> User:  # noqa: ANN001
    with factory() as session:
        return auth.authenticate(session=session, key=key)


CurrentUser = Annotated[User, Depends(get_current_user)]
