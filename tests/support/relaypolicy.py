"""A relay policy for tests: explicit tokens, key ownership and allowed pairs."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from coderstack.derp.policy import IRelayPolicy


@implementer(IRelayPolicy)
class StaticPolicy:
    """Tokens map to principals; a principal owns a set of keys; explicit allowed pairs.

    ``pairs`` holds unordered node-key pairs that share a tunnel.
    """

    def __init__(self) -> None:
        self.tokens: dict[str, Any] = {}
        self.owned: dict[Any, set[bytes]] = {}
        self.pairs: set[frozenset[bytes]] = set()

    def add_principal(self, token: str, principal: Any, *keys: bytes) -> None:
        self.tokens[token] = principal
        self.owned.setdefault(principal, set()).update(keys)

    def allow(self, a: bytes, b: bytes) -> None:
        self.pairs.add(frozenset((a, b)))

    def authenticate(self, token: str) -> Deferred[Any]:
        return succeed(self.tokens.get(token))

    def allows(self, principal: Any, src_key: bytes, dst_key: bytes) -> bool:
        return src_key in self.owned.get(principal, ()) and frozenset((src_key, dst_key)) in self.pairs
