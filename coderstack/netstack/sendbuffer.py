"""The send buffer: the bytes the application wrote that the peer has not acknowledged yet.

``data[0]`` has the (unwrapped) sequence number ``seq``; what follows it up to ``end`` is either
in flight or not sent yet.  Once the application closes its side, ``fin`` is the sequence number
our FIN takes: directly after the last byte.
"""

from __future__ import annotations

__all__ = ["SendBuffer"]


class SendBuffer:
    __slots__ = ("data", "fin", "seq")

    def __init__(self, seq: int) -> None:
        self.data = bytearray()
        self.seq = seq
        self.fin: int | None = None

    def __len__(self) -> int:
        return len(self.data)

    @property
    def end(self) -> int:
        """The sequence number after the last byte written."""
        return self.seq + len(self.data)

    def append(self, data: bytes) -> None:
        self.data += data

    def close(self) -> None:
        """No more data: the FIN follows the last byte."""
        self.fin = self.seq + len(self.data)

    def take(self, seq: int, n: int) -> bytes:
        """A copy of the ``n`` bytes from ``seq`` (to send; the buffer keeps them)."""
        off = seq - self.seq
        return bytes(self.data[off : off + n])

    def acknowledge(self, ack: int) -> None:
        """The peer holds everything before ``ack``: forget it."""
        n = ack - self.seq
        if n > 0:
            data = self.data
            if n >= len(data):
                self.seq += len(data)
                data.clear()
            else:
                del data[:n]
                self.seq = ack
