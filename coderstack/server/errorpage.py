"""The HTML page a browser sees when a workspace app cannot be reached.

A small self-contained page (inline style, no script, no outside resource) with the status, a
title and a detail, both HTML-escaped. It is served with ``Cache-Control: no-store`` (the app may
be back a moment later) and a Content-Security-Policy that allows nothing but that inline style.
Never a traceback: callers pass words meant for the user.
"""

from __future__ import annotations

import html

from twisted.web.server import Request

_CSP = (
    b"default-src 'none'; style-src 'unsafe-inline'; img-src 'none'; "
    b"base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)

_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{status} {title}</title>
<style>
body {{ font-family: system-ui, sans-serif; background: #f6f6f6; color: #222; margin: 0; }}
main {{ max-width: 36rem; margin: 12vh auto; padding: 2rem; background: #fff;
        border-radius: 8px; box-shadow: 0 1px 4px rgba(0, 0, 0, .15); }}
.status {{ color: #888; font-size: .9rem; margin: 0; }}
h1 {{ font-size: 1.4rem; margin: .3rem 0 1rem; }}
p {{ line-height: 1.5; }}
</style>
</head>
<body>
<main>
<p class="status">{status}</p>
<h1>{title}</h1>
<p>{detail}</p>
</main>
</body>
</html>
"""


def error_page_html(status: int, title: str, detail: str) -> bytes:
    """The page's bytes (UTF-8), with ``title`` and ``detail`` escaped."""
    return _PAGE.format(
        status=int(status), title=html.escape(title), detail=html.escape(detail)
    ).encode("utf-8")


def render_error_page(request: Request, status: int, title: str, detail: str) -> bytes:
    """Set the status and headers on ``request`` and return the page's body."""
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
    request.setHeader(b"Cache-Control", b"no-store")
    request.setHeader(b"Content-Security-Policy", _CSP)
    request.setHeader(b"X-Content-Type-Options", b"nosniff")
    body = error_page_html(status, title, detail)
    request.setHeader(b"Content-Length", b"%d" % len(body))
    return body
