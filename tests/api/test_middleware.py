"""The body limit, driven as plain ASGI so the test sees how much of the body was read."""

from __future__ import annotations

import asyncio
import json

from metaserve.api.middleware import BodySizeLimitMiddleware

LIMIT = 100


async def _echo_length(scope, receive, send) -> None:  # noqa: ANN001 - an ASGI app
    body = b""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        body += message.get("body", b"")
        if not message.get("more_body", False):
            break
    payload = json.dumps({"length": len(body)}).encode()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": payload})


def run_request(chunks: list[bytes], headers: list[tuple[bytes, bytes]]) -> tuple[list[dict], int]:
    """Send a chunked request; returns the response messages and how many chunks were read."""
    pending = list(chunks)
    sent: list[dict] = []

    async def receive() -> dict:
        chunk = pending.pop(0)
        return {"type": "http.request", "body": chunk, "more_body": bool(pending)}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/", "headers": headers}
    asyncio.run(BodySizeLimitMiddleware(_echo_length, max_body_bytes=LIMIT)(scope, receive, send))
    return sent, len(chunks) - len(pending)


def test_declared_content_length_above_limit_is_refused_before_reading():
    sent, chunks_read = run_request([b"x" * 10] * 20, [(b"content-length", b"200")])
    assert chunks_read == 0
    assert sent[0]["status"] == 413
    assert json.loads(sent[1]["body"])["error"]["code"] == "payload_too_large"


def test_streamed_body_is_refused_as_soon_as_it_passes_the_limit():
    sent, chunks_read = run_request([b"x" * 30] * 100, [(b"transfer-encoding", b"chunked")])
    assert chunks_read == 4  # 120 bytes > 100: stop; the other 96 chunks are never read
    assert [m.get("status") for m in sent if m["type"] == "http.response.start"] == [413]
    assert len(sent) == 2  # the app's own response after the disconnect was dropped


def test_body_within_limit_passes_through():
    sent, chunks_read = run_request([b"x" * 25] * 4, [(b"content-length", b"100")])
    assert chunks_read == 4
    assert (sent[0]["status"], json.loads(sent[1]["body"])) == (200, {"length": 100})
