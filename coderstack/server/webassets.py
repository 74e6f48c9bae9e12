"""``GET /static/...``: the dashboard's browser files.

Two kinds, both read once at start-up and served from memory:

- ``/static/app/<name>``: the dashboard's own scripts and styles (``coderstack/server/static/``),
  ``Cache-Control: no-cache`` (the browser revalidates, so a new server version shows at once).
- ``/static/vendor/<sha256 prefix>/<name>``: third-party files installed by ``npm ci --prefix
  web`` (xterm.js and its fit addon, from ``web/node_modules``). The URL names the content, so
  they are ``Cache-Control: public, max-age=31536000, immutable``. Without ``web/node_modules``
  the server logs one error line naming the command that installs them and these URLs are 404;
  every other page still works.

Every response has its exact ``Content-Type`` and ``X-Content-Type-Options: nosniff``; a
HEAD answers the headers only.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path

from twisted.logger import Logger

log = Logger()

PACKAGE_STATIC = Path(__file__).resolve().parent / "static"
#: ``web/`` beside the ``coderstack`` package in a checkout (an editable install runs from it).
WEB_DIR = Path(__file__).resolve().parents[2] / "web"

#: The vendored files: public name -> path under node_modules.
VENDOR_FILES = {
    "xterm.mjs": "@xterm/xterm/lib/xterm.mjs",
    "xterm.css": "@xterm/xterm/css/xterm.css",
    "addon-fit.mjs": "@xterm/addon-fit/lib/addon-fit.mjs",
}

CONTENT_TYPES = {
    ".js": b"text/javascript; charset=utf-8",
    ".mjs": b"text/javascript; charset=utf-8",
    ".css": b"text/css; charset=utf-8",
    ".svg": b"image/svg+xml",
}

VENDOR_CACHE = b"public, max-age=31536000, immutable"
APP_CACHE = b"no-cache"


@dataclass(frozen=True)
class Asset:
    body: bytes
    content_type: bytes
    cache_control: bytes
    url: str


class Assets:
    """The files under ``/static/``, loaded from ``app_dir`` and ``node_modules``."""

    def __init__(self, app_dir: Path = PACKAGE_STATIC, node_modules: Path = WEB_DIR / "node_modules") -> None:
        self._by_path: dict[str, Asset] = {}
        #: Public vendor name -> its URL (absent when not installed).
        self.vendor_urls: dict[str, str] = {}
        for path in sorted(app_dir.iterdir()) if app_dir.is_dir() else []:
            kind = CONTENT_TYPES.get(path.suffix)
            if kind is not None and path.is_file():
                self._add(f"/static/app/{path.name}", path.read_bytes(), kind, APP_CACHE)
        missing = [rel for rel in VENDOR_FILES.values() if not (node_modules / rel).is_file()]
        if missing:
            log.error(
                "dashboard: {missing} not found under {where}; the web terminal is unavailable "
                "until 'npm ci --prefix web' installs it", missing=", ".join(missing),
                where=str(node_modules))
            return
        for name, rel in VENDOR_FILES.items():
            body = (node_modules / rel).read_bytes()
            digest = hashlib.sha256(body).hexdigest()[:16]
            url = f"/static/vendor/{digest}/{name}"
            self._add(url, body, CONTENT_TYPES[Path(name).suffix], VENDOR_CACHE)
            self.vendor_urls[name] = url

    def _add(self, url: str, body: bytes, kind: bytes, cache: bytes) -> None:
        self._by_path[url] = Asset(body, kind, cache, url)

    def get(self, url_path: str) -> Asset | None:
        return self._by_path.get(url_path)

    @property
    def terminal_available(self) -> bool:
        return set(self.vendor_urls) == set(VENDOR_FILES)


@functools.cache
def default_assets() -> Assets:
    """This checkout's files, loaded (and a missing install logged) once per process."""
    return Assets()
