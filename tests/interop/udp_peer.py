"""A UDP peer run inside a network namespace by tests/interop/test_wireguard_go.py.

usage: udp_peer.py ADDRESS PORT. Prints "ready" once bound. Datagrams (first byte = kind):
  D seq(4) data   go-back-N data; answered with A next-expected(4)
  F               answered with H sha256(32) length(8) of the data received in order
  S n(8) seed(8) size(2)   send n bytes of random.Random(seed) data back go-back-N, then E
  Q               exit
"""

import hashlib
import random
import socket
import struct
import sys

sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
sock.bind((sys.argv[1], int(sys.argv[2])))
print("ready", flush=True)
received: list[bytes] = []
while True:
    data, peer = sock.recvfrom(65535)
    kind = data[:1]
    if kind == b"D":
        if int.from_bytes(data[1:5], "big") == len(received):
            received.append(data[5:])
        sock.sendto(b"A" + len(received).to_bytes(4, "big"), peer)
    elif kind == b"F":
        blob = b"".join(received)
        sock.sendto(b"H" + hashlib.sha256(blob).digest() + len(blob).to_bytes(8, "big"), peer)
    elif kind == b"S":
        n, seed, size = struct.unpack(">QQH", data[1:19])
        blob = random.Random(seed).randbytes(n)
        pieces = [blob[i : i + size] for i in range(0, n, size)]
        base = sent = 0
        sock.settimeout(0.3)
        while base < len(pieces):
            while sent < min(base + 64, len(pieces)):
                sock.sendto(b"D" + sent.to_bytes(4, "big") + pieces[sent], peer)
                sent += 1
            try:
                ack = sock.recv(64)
            except TimeoutError:
                sent = base  # go back N
                continue
            if ack[:1] == b"A":
                base = max(base, int.from_bytes(ack[1:5], "big"))
        sock.settimeout(None)
        sock.sendto(b"E", peer)
    elif kind == b"Q":
        break
