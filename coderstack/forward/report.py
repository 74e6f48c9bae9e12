"""How a stream or datagram forwarder tells whoever runs it that a dial into the workspace failed."""

from __future__ import annotations

from typing import Protocol


class DialReport(Protocol):
    def dial_failed(self, network: str, dial_port: int, why: str) -> None:
        """``network`` ("tcp" | "udp") to ``dial_port`` in the workspace could not be reached."""
