"""WireGuard data-plane throughput: 1280-byte IP packets, encrypt+send and receive+decrypt.

    python bench/bench_wireguard.py [--quick] [--runs N]

Measures (medians of N runs):
  * the bare primitive: one `cryptography` ChaCha20Poly1305.encrypt / decrypt per packet;
  * the in-process core: Device.send() and Device.receive() per packet (no sockets);
  * loopback UDP with the Twisted adapter (tests/support/wgudp.py), sender and receiver in two
    processes: the sender's encrypt+send rate and the receiver's receive+decrypt rate.
and prints them beside the 166k pkt/s ceiling from reference/baselines-and-real-peers.md (Twisted
DatagramProtocol both ends + one `cryptography` AEAD per packet, 1400 B).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305  # noqa: E402

from coderstack.wire.wireguard import Device, generate_private_key  # noqa: E402

PACKET_SIZE = 1280
CEILING = 166_000


def ip_packet(size: int = PACKET_SIZE) -> bytes:
    payload = os.urandom(size - 40)
    return (
        bytes([0x60, 0, 0, 0]) + len(payload).to_bytes(2, "big") + b"\x11\x40" + bytes(32) + payload
    )


def established_pair() -> tuple[Device, Device]:
    a, b = Device(generate_private_key()), Device(generate_private_key())
    a.add_peer(b.public_key)
    b.add_peer(a.public_key)
    for e in a.initiate(b.public_key, 0.0):
        for r in b.receive(e.datagram, 0.0, "a"):
            if hasattr(r, "datagram"):
                for c in a.receive(r.datagram, 0.0, "b"):
                    if hasattr(c, "datagram"):
                        b.receive(c.datagram, 0.0, "a")
    return a, b


def bench_primitive(n: int) -> tuple[float, float]:
    aead = ChaCha20Poly1305(os.urandom(32))
    packet = ip_packet()
    nonce = bytes(12)
    t0 = time.perf_counter()
    for _ in range(n):
        sealed = aead.encrypt(nonce, packet, None)
    t1 = time.perf_counter()
    for _ in range(n):
        aead.decrypt(nonce, sealed, None)
    t2 = time.perf_counter()
    return n / (t1 - t0), n / (t2 - t1)


def bench_core_batched(n: int, batch: int = 32) -> float:
    a, b = established_pair()
    key_b = b.public_key
    packets = [ip_packet()] * batch
    send_many = a.send_many
    t0 = time.perf_counter()
    for _ in range(n // batch):
        send_many(key_b, packets, 1.0)
    return (n // batch) * batch / (time.perf_counter() - t0)


def bench_core(n: int) -> tuple[float, float]:
    a, b = established_pair()
    key_b = b.public_key
    packet = ip_packet()
    send = a.send
    t0 = time.perf_counter()
    out = [send(key_b, packet, 1.0)[0].datagram for _ in range(n)]
    t1 = time.perf_counter()
    receive = b.receive
    for d in out:
        receive(d, 1.0, "a")
    t2 = time.perf_counter()
    assert not b.drops, b.drops
    return n / (t1 - t0), n / (t2 - t1)


# --- two processes over loopback UDP -----------------------------------------------------------


class _Plain:
    """The same harness without WireGuard: a bare DatagramProtocol (the measured-now ceiling)."""

    def __new__(cls, on_packet, address):
        from twisted.internet.protocol import DatagramProtocol

        class Plain(DatagramProtocol):
            def datagramReceived(self, data, addr):
                on_packet(data)

            def send(self, data):
                self.transport.write(data, address)

        return Plain()


def udp_receiver(own_key: str, peer_key: str) -> None:
    """Child: print our port, count decrypted packets, print 'count seconds' after 1 s idle.
    With own_key "plain", count bare UDP datagrams instead."""
    import socket

    from twisted.internet import reactor, task

    from tests.support.wgudp import WireGuardUDP

    stats = {"n": 0, "first": 0.0, "last": 0.0}

    def on_packet(data: bytes) -> None:
        if stats["n"] == 0:
            stats["first"] = time.perf_counter()
        stats["n"] += 1
        stats["last"] = time.perf_counter()

    if own_key == "plain":
        proto = _Plain(on_packet, None)
    else:
        device = Device(bytes.fromhex(own_key))
        device.add_peer(bytes.fromhex(peer_key))
        proto = WireGuardUDP(device, bytes.fromhex(peer_key), None, reactor, on_packet)
    port = reactor.listenUDP(0, proto, interface="127.0.0.1")
    port.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    print(port.getHost().port, flush=True)

    def check() -> None:
        if stats["n"] and time.perf_counter() - stats["last"] > 1.0:
            print(stats["n"], stats["last"] - stats["first"], flush=True)
            reactor.stop()

    task.LoopingCall(check).start(0.2)
    reactor.run()


def udp_sender(own_key: str, peer_key: str, port: int, seconds: float) -> None:
    """Child: handshake, then send 1280-byte packets for `seconds`; print 'count seconds'."""
    from twisted.internet import reactor

    from tests.support.wgudp import WireGuardUDP

    packet = ip_packet()
    if own_key == "plain":
        proto = _Plain(None, ("127.0.0.1", port))
        packet += bytes(32)  # the same size on the wire as a WireGuard transport message
    else:
        device = Device(bytes.fromhex(own_key))
        device.add_peer(bytes.fromhex(peer_key))
        proto = WireGuardUDP(device, bytes.fromhex(peer_key), ("127.0.0.1", port), reactor)
    reactor.listenUDP(0, proto, interface="127.0.0.1")
    stats = {"n": 0, "start": 0.0}

    def burst() -> None:
        send = proto.send
        for _ in range(256):
            send(packet)
        stats["n"] += 256
        elapsed = time.perf_counter() - stats["start"]
        if elapsed < seconds:
            reactor.callLater(0, burst)
        else:
            print(stats["n"], elapsed, flush=True)
            reactor.stop()

    def go(_: object) -> None:
        stats["start"] = time.perf_counter()
        burst()

    if own_key == "plain":
        reactor.callWhenRunning(go, None)
    else:
        proto.when_handshake_complete().addCallback(go)
        reactor.callWhenRunning(proto.initiate)
    reactor.run()


def bench_udp(seconds: float, plain: bool = False) -> tuple[float, float, float]:
    from coderstack.wire.wireguard import public_key

    key_r, key_s = generate_private_key(), generate_private_key()
    own_r, own_s = ("plain", "plain") if plain else (key_r.hex(), key_s.hex())
    script = os.path.abspath(__file__)
    recv = subprocess.Popen(
        [sys.executable, script, "--child-receiver", own_r, public_key(key_s).hex()],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert recv.stdout is not None
        port = int(recv.stdout.readline())
        sender = subprocess.run(
            [
                sys.executable,
                script,
                "--child-sender",
                own_s,
                public_key(key_r).hex(),
                str(port),
                str(seconds),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        sent, send_secs = sender.stdout.split()
        received, recv_secs = recv.stdout.readline().split()
        recv.wait(10)
    finally:
        if recv.poll() is None:
            recv.kill()
            recv.wait()
    sent_n, received_n = int(sent), int(received)
    return sent_n / float(send_secs), received_n / float(recv_secs), 1 - received_n / sent_n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the default: 3 short runs")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--child-receiver", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--child-sender", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_receiver:
        return udp_receiver(*args.child_receiver)
    if args.child_sender:
        own, peer, port, seconds = args.child_sender
        return udp_sender(own, peer, int(port), float(seconds))

    n, seconds = (50_000, 2.0) if args.runs <= 3 else (200_000, 4.0)
    prim = [bench_primitive(n) for _ in range(args.runs)]
    core = [bench_core(n) for _ in range(args.runs)]
    batched = [bench_core_batched(n) for _ in range(args.runs)]
    udp = [bench_udp(seconds) for _ in range(args.runs)]
    plain = [bench_udp(seconds, plain=True) for _ in range(args.runs)]

    def med(rows: list[tuple], i: int) -> float:
        return statistics.median(r[i] for r in rows)

    def k(x: float) -> str:
        return f"{x / 1000:.0f}k"

    def gbit(pps: float) -> str:
        return f"{pps * PACKET_SIZE * 8 / 1e9:.2f}"

    print(f"### WireGuard data plane, {PACKET_SIZE}-byte packets")
    print()
    print(
        f"{datetime.date.today()} · {platform.machine()} · nproc {os.cpu_count()} · "
        f"Python {platform.python_version()} · median of {args.runs} runs · "
        f"load average {os.getloadavg()[0]:.1f} at the end (the machine is shared)"
    )
    print()
    print("| path | encrypt+send pkt/s | receive+decrypt pkt/s | Gbit/s (of payload, recv) |")
    print("|---|---|---|---|")
    print(
        f"| `cryptography` AEAD alone, in-process | {k(med(prim, 0))} | {k(med(prim, 1))} | {gbit(med(prim, 1))} |"
    )
    print(
        f"| Device.send / Device.receive, in-process | {k(med(core, 0))} | {k(med(core, 1))} | {gbit(med(core, 1))} |"
    )
    print(
        f"| Device.send_many, batches of 32, in-process | {k(statistics.median(batched))} | – | – |"
    )
    print(
        f"| Twisted adapter over loopback UDP, 2 processes | {k(med(udp, 0))} | {k(med(udp, 1))} "
        f"| {gbit(med(udp, 1))} (loss {med(udp, 2):.1%}) |"
    )
    print(
        f"| same harness, bare Twisted UDP, no WireGuard (ceiling measured now) | {k(med(plain, 0))} "
        f"| {k(med(plain, 1))} | {gbit(med(plain, 1))} (loss {med(plain, 2):.1%}) |"
    )
    print(
        f"| ceiling (baselines doc: Twisted UDP + `cryptography` AEAD, 1400 B) | {k(CEILING)} | {k(CEILING)} | 1.86 |"
    )


if __name__ == "__main__":
    main()
