"""``GET /v1/keys`` and ``DELETE /v1/keys/{id}``: list and revoke API keys (admin keys only).

A key is one user (``metaserve keys create NAME``); its id is the user's id. Revoking keeps the
user's jobs. The revocation is effective at once on this server process (its key cache forgets
the user); on other processes within their key cache's TTL (5 minutes,
:class:`metaserve.service.auth.KeyCache`). Rotation hands out a new secret, so it is a command
of the server's operator (``metaserve keys rotate ID``), not an API response.
"""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter, Request
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from metaserve.api.deps import CurrentUser
from metaserve.api.schemas import ErrorResponse
from metaserve.service import auth
from metaserve.service.exceptions import AdminOnly
from metaserve.service.orm import User

router = APIRouter(prefix="/v1/keys", tags=["keys"], responses={
    401: {"model": ErrorResponse, "description": "Missing or invalid API key"},
    403: {"model": ErrorResponse, "description": "Not an admin key"},
})


class KeyPublic(BaseModel):
    id: int
    name: str
    is_admin: bool
    revoked: bool
    created_at: datetime


class KeysPublic(BaseModel):
    data: list[KeyPublic]


def key_public(user: User) -> KeyPublic:
    return KeyPublic(id=user.id, name=user.name, is_admin=user.is_admin,
                     revoked=auth.is_revoked(user), created_at=user.created_at)


def _require_admin(user: User) -> None:
    if not user.is_admin:
        raise AdminOnly()


@router.get("")
async def list_keys(request: Request, user: CurrentUser) -> KeysPublic:
    """Every API key (never the secret: only its hash is stored) and whether it is revoked."""
    _require_admin(user)

    def work() -> KeysPublic:
        with request.app.state.session_factory() as session:
            return KeysPublic(data=[key_public(u) for u in auth.list_keys(session=session)])

    return await run_in_threadpool(work)


@router.delete("/{key_id}", responses={
    404: {"model": ErrorResponse, "description": "No such key"}})
async def revoke_key(key_id: int, request: Request, user: CurrentUser) -> KeyPublic:
    """Revoke a key: it authenticates no more (at once on this server, within 5 minutes on
    others); the user's jobs stay."""
    _require_admin(user)

    def work() -> KeyPublic:
        with request.app.state.session_factory() as session:
            return key_public(auth.revoke_key(session=session, user_id=key_id))

    revoked = await run_in_threadpool(work)
    request.app.state.key_cache.forget_user(key_id)
    return revoked
