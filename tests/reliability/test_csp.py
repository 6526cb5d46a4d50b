"""Security headers on every answer: every HTML page (the dashboard at each path it is served
at, ``/docs``) has a Content-Security-Policy that allows only this origin's scripts and no
framing; ``/docs`` allows its one inline script by hash, never ``'unsafe-inline'``; every
answer — JSON, refusals and files too — has ``X-Content-Type-Options: nosniff``. Before, the
dashboard at ``/static/index.html`` and ``/docs`` had no CSP."""

from __future__ import annotations

import base64
import hashlib
import re

import pytest

from tests.helpers import bearer

HTML_PATHS = ["/", "/static/index.html", "/docs"]


def directives(policy: str) -> dict[str, list[str]]:
    parsed = {}
    for part in policy.split(";"):
        name, *values = part.split()
        parsed[name] = values
    return parsed


@pytest.mark.parametrize("path", HTML_PATHS)
def test_every_html_page_has_a_csp_allowing_only_this_origins_scripts(client, path):
    response = client.get(path)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    policy = directives(response.headers["content-security-policy"])
    assert policy["frame-ancestors"] == ["'none'"]
    assert policy["default-src"] == ["'self'"]
    assert policy["object-src"] == ["'none'"]
    assert policy["script-src"][0] == "'self'"
    assert all(source.startswith("'sha256-") for source in policy["script-src"][1:])
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["x-frame-options"] == "DENY"


def test_the_docs_page_allows_exactly_its_inline_script_by_hash(client):
    response = client.get("/docs")
    scripts = re.findall(r"<script>(.*?)</script>", response.text, re.DOTALL)
    assert len(scripts) == 1  # Swagger UI's start-up; its bundle is a vendored file
    digest = base64.b64encode(hashlib.sha256(scripts[0].encode()).digest()).decode()
    script_src = directives(response.headers["content-security-policy"])["script-src"]
    assert script_src == ["'self'", f"'sha256-{digest}'"]
    # What the page loads is this origin's (vendored), so 'self' covers it.
    for url in re.findall(r'(?:src|href)="([^"]+)"', response.text):
        assert url.startswith("/static/vendor/swagger-ui/")


def test_redoc_is_not_served(client):
    assert client.get("/redoc").status_code == 404


@pytest.mark.parametrize(("path", "status"), [
    ("/v1/jobs", 401), ("/healthz", 200), ("/openapi.json", 200), ("/redoc", 404),
    ("/static/app.js", 200)])
def test_every_other_answer_is_nosniff_and_never_framed(client, path, status):
    response = client.get(path)
    assert response.status_code == status
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["content-security-policy"] == "default-src 'none'; frame-ancestors 'none'"


def test_a_route_that_sets_nosniff_itself_has_it_once(client, alice_key):
    response = client.get("/", headers=bearer(alice_key))
    assert response.headers.get_list("x-content-type-options") == ["nosniff"]
    assert len(response.headers.get_list("content-security-policy")) == 1


# In a browser: the pages still work under their policies (a blocked script would leave them
# empty). Chromium and the live server of the dashboard test.
from tests.e2e.test_dashboard import browser, site, wait  # noqa: E402, F401


@pytest.mark.server
def test_the_docs_page_renders_every_operation_under_its_csp(browser, site):  # noqa: F811
    browser.get(f"{site['url']}/docs")
    wait(browser, lambda b: len(b.find_elements("css selector", ".opblock")) >= 20, 30,
         "Swagger UI to render the operations")


@pytest.mark.server
@pytest.mark.parametrize("path", ["/", "/static/index.html"])
def test_the_dashboard_runs_its_script_under_its_csp_at_each_path(browser, site, path):  # noqa: F811
    browser.get(f"{site['url']}{path}")
    wait(browser, lambda b: b.execute_script("return window.metaserveDashboard !== undefined"),
         30, "the dashboard's script to run")
