"""The dashboard at ``/`` and the API docs at ``/docs``, both from assets shipped inside the
package (``metaserve/api/static``; no CDN, so both work on a cluster without internet).

The dashboard is one static page whose script calls the same REST API as any client, with the
user's API key from the browser's ``sessionStorage`` in an ``Authorization`` header (never in
a URL, so never in an access log or the browser history): it sees exactly what the key sees.
Live curves read the job's event stream with ``fetch`` (``EventSource`` cannot send headers).
"""

from __future__ import annotations

import base64
import hashlib
import re
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles

from metaserve.api.middleware import HTML_CSP

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
STATIC_PATH = "/static"

router = APIRouter(include_in_schema=False)


def static_files() -> StaticFiles:
    """The packaged assets, mounted at :data:`STATIC_PATH` by the app factory."""
    return StaticFiles(directory=STATIC_DIR)


@router.get("/")
async def dashboard() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html", headers={
        "Content-Security-Policy": HTML_CSP, "Cache-Control": "no-cache",
        "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"})


@router.get("/docs")
async def swagger_ui(request: Request) -> HTMLResponse:
    vendor = f"{STATIC_PATH}/vendor/swagger-ui"
    page = get_swagger_ui_html(
        openapi_url=request.app.openapi_url, title=f"{request.app.title} - API docs",
        swagger_js_url=f"{vendor}/swagger-ui-bundle.js",
        swagger_css_url=f"{vendor}/swagger-ui.css",
        swagger_favicon_url=f"{vendor}/favicon-32x32.png")
    page.headers["Content-Security-Policy"] = csp_with_inline_scripts(page.body.decode())
    return page


INLINE_SCRIPT = re.compile(r"<script>(.*?)</script>", re.DOTALL)


def csp_with_inline_scripts(html: str) -> str:
    """:data:`HTML_CSP` allowing exactly the inline scripts of ``html`` by their sha256
    (Swagger UI's page starts its bundle from one), and no other inline script."""
    hashes = " ".join(
        "'sha256-" + base64.b64encode(hashlib.sha256(script.encode()).digest()).decode() + "'"
        for script in INLINE_SCRIPT.findall(html))
    return HTML_CSP.replace("script-src 'self'", f"script-src 'self' {hashes}".rstrip(), 1)
