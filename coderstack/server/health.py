"""The deployment health report (``GET /api/v2/debug/health``, the dashboard's health page).

What Coder's health check looks at, in the shape of its ``HealthcheckReport``::

    {"time": ISO 8601, "healthy": bool, "severity": "ok" | "warning" | "error",
     "coder_version": str,
     "access_url": {"healthy", "severity", "warnings", "dismissed", "access_url": str,
                    "reachable": bool, "status_code": int, "healthz_response": str, "error": str|null},
     "database":   {"healthy", "severity", "warnings", "dismissed", "reachable": bool,
                    "latency": Go duration, "latency_ms": int, "threshold_ms": int, "error": str|null},
     "websocket":  {"healthy", "severity", "warnings", "dismissed", "body": str, "code": int,
                    "error": str|null},
     "derp": DERPHealthReport (see :mod:`coderstack.tailnet.netcheck.health`)}

Each check runs from the server process itself, as a client would: ``/healthz`` fetched through
the access URL (so a wrong ``--access-url`` shows), a database round trip timed against a
threshold, a websocket echo through the access URL (a proxy that drops upgrades shows), and a
full netcheck against the deployment's own DERP map (every relay node's latency, every STUN
server answering). The checks run at once; each has its own time limit and failure text, and
one failing never hides the others.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from coderstack.tailnet.netcheck.health import go_duration

#: A database round trip slower than this is a warning (Coder's default).
DATABASE_THRESHOLD_MS = 15
CHECK_TIMEOUT = 10.0
_RANK = {"ok": 0, "warning": 1, "error": 2}

CODE_ACCESS_URL_NOT_OK = "EACS03"
CODE_ACCESS_URL_UNREACHABLE = "EACS04"
CODE_DATABASE_SLOW = "EDB02"
CODE_DATABASE_UNREACHABLE = "EDB01"
CODE_WEBSOCKET_DIAL = "EWS01"
CODE_WEBSOCKET_ECHO = "EWS02"


def _warning(code: str, message: str) -> dict[str, str]:
    return {"code": code, "message": message}


def _section(severity: str, warnings: list[dict[str, str]], **fields: Any) -> dict[str, Any]:
    return {"healthy": severity != "error", "severity": severity, "warnings": warnings,
            "dismissed": False, **fields}


@dataclass(frozen=True)
class Fetched:
    """What a GET of the access URL's ``/healthz`` gave."""

    status: int | None
    body: str
    error: str | None


def access_url_section(access_url: str, got: Fetched) -> dict[str, Any]:
    if got.error is not None or got.status is None:
        return _section("error", [_warning(CODE_ACCESS_URL_UNREACHABLE,
                                           f"The server cannot reach its access URL: {got.error}")],
                        access_url=access_url, reachable=False, status_code=0, healthz_response="",
                        error=got.error)
    if got.status != 200:
        return _section("error", [_warning(CODE_ACCESS_URL_NOT_OK,
                                           f"{access_url}/healthz answered HTTP {got.status}")],
                        access_url=access_url, reachable=True, status_code=got.status,
                        healthz_response=got.body[:200], error=None)
    return _section("ok", [], access_url=access_url, reachable=True, status_code=got.status,
                    healthz_response=got.body[:200], error=None)


def database_section(latency: float | None, error: str | None,
                     threshold_ms: int = DATABASE_THRESHOLD_MS) -> dict[str, Any]:
    if error is not None or latency is None:
        return _section("error", [_warning(CODE_DATABASE_UNREACHABLE, f"The database did not answer: {error}")],
                        reachable=False, latency="", latency_ms=0, threshold_ms=threshold_ms, error=error)
    ms = round(latency * 1000)
    warnings = []
    if ms > threshold_ms:
        warnings.append(_warning(CODE_DATABASE_SLOW,
                                 f"A database round trip took {ms} ms (more than {threshold_ms} ms)"))
    return _section("warning" if warnings else "ok", warnings, reachable=True,
                    latency=go_duration(latency), latency_ms=ms, threshold_ms=threshold_ms, error=None)


def websocket_section(echoed: str | None, sent: str, error: str | None) -> dict[str, Any]:
    if error is not None:
        return _section("error", [_warning(CODE_WEBSOCKET_DIAL, f"A websocket through the access URL failed: {error}")],
                        body="", code=0, error=error)
    if echoed != sent:
        return _section("error", [_warning(CODE_WEBSOCKET_ECHO, "The websocket echo came back different")],
                        body=(echoed or "")[:200], code=101, error="echo mismatch")
    return _section("ok", [], body=echoed, code=101, error=None)


def report(*, version: str, access_url: dict[str, Any], database: dict[str, Any],
           websocket: dict[str, Any], derp: dict[str, Any], now: datetime | None = None) -> dict[str, Any]:
    sections = (access_url, database, websocket, derp)
    severity = max((s["severity"] for s in sections), key=_RANK.__getitem__)
    return {"time": (now or datetime.now(UTC)).isoformat(), "healthy": severity != "error",
            "severity": severity, "coder_version": version, "access_url": access_url,
            "database": database, "websocket": websocket, "derp": derp}


async def timed(run: Callable[[], Awaitable[Any]],
                clock: Callable[[], float] = time.monotonic) -> tuple[float | None, str | None]:
    """(seconds taken, None) or (None, why it failed) for one call."""
    start = clock()
    try:
        await run()
    except Exception as err:  # any failure is the check's answer, said in one line
        return None, why(err)
    return clock() - start, None


def why(err: BaseException) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {text}"[:300] if text else type(err).__name__
