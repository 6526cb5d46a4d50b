"""The dashboard at ``/`` and the API docs at ``/docs``, both from assets shipped inside the
package (``metaserve/api/static``; no CDN, so both work on a cluster without internet).

The dashboard is one static page whose script calls the same REST API as any client, with the
user's API key from the browser's ``sessionStorage`` in an ``Authorization`` header (never in
a URL, so never in an access log or the browser history): it sees exactly what the key sees.
Live curves read the job's event stream with ``fetch`` (``EventSource`` cannot send headers).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
STATIC_PATH = "/static"

# Only this origin's scripts, styles and API; inline styles for uPlot's positioning.
DASHBOARD_CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
                 "img-src 'self' data: blob:; connect-src 'self'; frame-ancestors 'none'; "
                 "base-uri 'none'; form-action 'none'")

router = APIRouter(include_in_schema=False)


def static_files() -> StaticFiles:
    """The packaged assets, mounted at :data:`STATIC_PATH` by the app factory."""
    return StaticFiles(directory=STATIC_DIR)


@router.get("/")
async def dashboard() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html", headers={
        "Content-Security-Policy": DASHBOARD_CSP, "Cache-Control": "no-cache",
        "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"})


@router.get("/docs")
async def swagger_ui(request: Request) -> HTMLResponse:
    vendor = f"{STATIC_PATH}/vendor/swagger-ui"
    return get_swagger_ui_html(
        openapi_url=request.app.openapi_url, title=f"{request.app.title} - API docs",
        swagger_js_url=f"{vendor}/swagger-ui-bundle.js",
        swagger_css_url=f"{vendor}/swagger-ui.css",
        swagger_favicon_url=f"{vendor}/favicon-32x32.png")
