"""``GET /api/v2/replicas``: the alive server replicas, for owners (Coder's ``codersdk.Replica``
list, with our ``healthy`` and ``version``)."""

from __future__ import annotations

from typing import Any, Protocol

from klein import Klein

from coderstack.server.jsonhttp import HTTPRequest, write_json
from coderstack.server.records import User


class ReplicasHost(Protocol):
    """What the route needs of the API whose Klein app it joins."""

    d: Any

    async def require_owner(self, request: HTTPRequest) -> User: ...


def register(app: Klein) -> None:
    """Add the route to the API's Klein app."""

    @app.route("/api/v2/replicas", methods=["GET"])
    async def replicas(self: ReplicasHost, request: HTTPRequest) -> bytes:
        await self.require_owner(request)
        sync = self.d.replicas
        found = [] if sync is None else await sync.fetch_alive()
        return write_json(request, [r.to_json() for r in found])
