"""Initial sequence numbers per RFC 6528: ``ISN = M + F(localip, localport, remoteip, remoteport, key)``.

M is a clock ticking every 4 microseconds (taken from the injected ``now``); F is keyed BLAKE2s
over the connection's four-tuple with a secret chosen when the stack starts, so an off-path
attacker cannot predict the ISN of another connection.
"""

from __future__ import annotations

import hashlib
import os
import struct

__all__ = ["ISNGenerator"]


class ISNGenerator:
    def __init__(self, secret: bytes | None = None) -> None:
        self._key = secret if secret is not None else os.urandom(32)

    def __call__(self, local: bytes, lport: int, remote: bytes, rport: int, now: float) -> int:
        h = hashlib.blake2s(local + remote + struct.pack("!HH", lport, rport), key=self._key, digest_size=4)
        return (int(now * 250_000) + int.from_bytes(h.digest(), "big")) & 0xFFFFFFFF
