"""Our WireGuard core against wireguard-go, the reference userspace implementation.

wireguard-go runs on a TUN device inside a fresh network namespace, joined to the host by a veth
pair on a random 10.x/30. Our Device runs in this process on the host end of the veth (through
tests/support/wgudp.py). Inside the tunnel: fdc5:<random>::1 is us, ::2 is the namespace's
kernel, which answers ICMPv6 echo, and tests/interop/udp_peer.py is a UDP socket there.

Needs root (namespaces, TUN) and wireguard-go/wg on PATH; CI has both.
"""

from __future__ import annotations

import base64
import collections
import hashlib
import os
import random
import shutil
import subprocess
import sys

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from coderstack.wire import wireguard
from coderstack.wire.wireguard import Device, generate_private_key, public_key
from tests.interop import ipv6
from tests.support.processes import die_with_parent
from tests.support.waiting import wait_until, wait_until_blocking
from tests.support.wgudp import WireGuardUDP

HERE = os.path.dirname(os.path.abspath(__file__))
WG_PORT = 51820
UDP_PORT = 7000
CHUNK = 1200
TEN_MIB = 10 << 20
WAIT = 20.0  # a liveness guard for network waits, far above what any step takes
# The type fields of a WireGuard handshake initiation and response.
HANDSHAKE_TYPES = {(1).to_bytes(4, "little"), (2).to_bytes(4, "little")}


def b64(key: bytes) -> str:
    return base64.b64encode(key).decode()


class Namespace:
    """A namespace with wireguard-go on a TUN, joined to the host by veth. Cleans up by PID."""

    def __init__(self, case: unittest.TestCase) -> None:
        suffix = f"{os.getpid() % 10000}{random.randrange(16**3):03x}"
        self.name = f"cswg{suffix}"
        self.host_if = f"cswgh{suffix}"
        self.ns_if = f"cswgn{suffix}"
        self.tun = f"cswgt{suffix}"
        a, b = random.randrange(100, 250), random.randrange(64) * 4
        self.host_addr = f"10.{a}.{b}.1"
        self.ns_addr = f"10.{a}.{b}.2"
        prefix = f"fdc5:{random.randrange(1, 0xFFFF):x}"
        self.our_ip = f"{prefix}::1"
        self.their_ip = f"{prefix}::2"
        self.private_key = generate_private_key()
        self.public_key = public_key(self.private_key)
        self.case = case
        self.tmp = case.mktemp()
        os.makedirs(self.tmp)
        self._start()

    def run(self, *args: str) -> str:
        return subprocess.run(
            ["ip", "netns", "exec", self.name, *args], check=True, capture_output=True, text=True
        ).stdout

    def _start(self) -> None:
        sh = lambda *a: subprocess.run(a, check=True, capture_output=True)  # noqa: E731
        sh("ip", "netns", "add", self.name)
        self.case.addCleanup(subprocess.run, ["ip", "netns", "del", self.name], capture_output=True)
        sh("ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if)
        self.case.addCleanup(
            subprocess.run, ["ip", "link", "del", self.host_if], capture_output=True
        )
        sh("ip", "link", "set", self.ns_if, "netns", self.name)
        sh("ip", "addr", "add", f"{self.host_addr}/30", "dev", self.host_if)
        sh("ip", "link", "set", self.host_if, "up")
        self.run("ip", "addr", "add", f"{self.ns_addr}/30", "dev", self.ns_if)
        self.run("ip", "link", "set", self.ns_if, "up")
        self.run("ip", "link", "set", "lo", "up")
        # -f keeps it in the foreground, so the PID we hold is wireguard-go itself.
        self.wg_go = subprocess.Popen(
            ["ip", "netns", "exec", self.name, "wireguard-go", "-f", self.tun],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=die_with_parent,
        )
        self.case.addCleanup(self._stop, self.wg_go)
        sock = f"/var/run/wireguard/{self.tun}.sock"
        wait_until_blocking(lambda: os.path.exists(sock), "wireguard-go to create its UAPI socket",
                            timeout=5, interval=0.025)
        self.run("ip", "-6", "addr", "add", f"{self.their_ip}/64", "dev", self.tun, "nodad")
        self.run("ip", "link", "set", self.tun, "up")

    @staticmethod
    def _stop(proc: subprocess.Popen) -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def configure(
        self,
        peer_key: bytes,
        endpoint: tuple[str, int] | None,
        preshared_key: bytes | None = None,
        private_key: bytes | None = None,
    ) -> None:
        key_file = os.path.join(self.tmp, "private")
        with open(os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            f.write(b64(private_key or self.private_key))
        args = ["wg", "set", self.tun, "private-key", key_file, "listen-port", str(WG_PORT)]
        args += ["peer", b64(peer_key), "allowed-ips", f"{self.our_ip}/128"]
        if endpoint is not None:
            args += ["endpoint", f"{endpoint[0]}:{endpoint[1]}"]
        if preshared_key is not None:
            psk_file = os.path.join(self.tmp, "psk")
            with open(os.open(psk_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
                f.write(b64(preshared_key))
            args += ["preshared-key", psk_file]
        self.run(*args)

    def latest_handshake(self) -> int:
        out = self.run("wg", "show", self.tun, "latest-handshakes").split()
        return int(out[1]) if len(out) >= 2 else 0

    def send_udp(self, data: bytes, port: int) -> None:
        """Send one UDP datagram from the namespace to us (makes wireguard-go initiate)."""
        code = (
            "import socket,sys; s=socket.socket(socket.AF_INET6, socket.SOCK_DGRAM);"
            "s.sendto(bytes.fromhex(sys.argv[1]), (sys.argv[2], int(sys.argv[3])))"
        )
        self.run(sys.executable, "-c", code, data.hex(), self.our_ip, str(port))

    def start_udp_peer(self) -> None:
        proc = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                self.name,
                sys.executable,
                os.path.join(HERE, "udp_peer.py"),
                self.their_ip,
                str(UDP_PORT),
            ],
            stdout=subprocess.PIPE,
            text=True,
            preexec_fn=die_with_parent,
        )
        self.case.addCleanup(self._stop, proc)
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError("udp_peer.py did not start")


class Ours:
    """Our end of the tunnel: Device + UDP adapter, with received IPv6 packets demultiplexed."""

    def __init__(
        self,
        case: unittest.TestCase,
        ns: Namespace,
        preshared_key: bytes | None = None,
        peer_key: bytes | None = None,
    ) -> None:
        self.ns = ns
        self.device = Device(generate_private_key())
        self.peer = self.device.add_peer(peer_key or ns.public_key, preshared_key=preshared_key)
        self.proto = WireGuardUDP(
            self.device, self.peer.public_key, (ns.ns_addr, WG_PORT), reactor, self._packet
        )
        self.port = reactor.listenUDP(0, self.proto, interface=ns.host_addr)
        case.addCleanup(self.port.stopListening)
        self.address = (ns.host_addr, self.port.getHost().port)
        self.packets: list[bytes] = []
        self.on_udp = None  # callable(data) for UDP datagrams to our port UDP_PORT
        self.echo_replies: list[tuple[int, bytes]] = []

    def _packet(self, packet: bytes) -> None:
        self.packets.append(packet)
        next_header, _src, _dst, payload = ipv6.parse(packet)
        assert ipv6.verify(packet), "bad checksum from the kernel?"
        if next_header == ipv6.ICMPV6:
            kind, _ident, seq, data = ipv6.parse_echo(payload)
            if kind == ipv6.ECHO_REPLY:
                self.echo_replies.append((seq, data))
        elif next_header == ipv6.UDP and self.on_udp is not None:
            _sport, dport, data = ipv6.parse_udp(payload)
            if dport == UDP_PORT:
                self.on_udp(data)

    def udp(self, data: bytes) -> None:
        self.proto.send(ipv6.udp6(self.ns.our_ip, self.ns.their_ip, UDP_PORT, UDP_PORT, data))

    def ping(self, seq: int, data: bytes) -> None:
        self.proto.send(ipv6.echo_request(self.ns.our_ip, self.ns.their_ip, 0x4353, seq, data))


class WireGuardGoTests(unittest.TestCase):
    def setUp(self) -> None:
        if os.geteuid() != 0:
            raise unittest.SkipTest("needs root for network namespaces and TUN (CI runs as root)")
        for tool in ("wireguard-go", "wg", "ip"):
            if shutil.which(tool) is None:
                raise unittest.SkipTest(f"{tool} not installed (CI installs it)")
        self.ns = Namespace(self)

    def connect(self, preshared_key: bytes | None = None) -> Ours:
        """Our end and wireguard-go configured for each other (same PSK if any)."""
        ours = Ours(self, self.ns, preshared_key=preshared_key)
        self.ns.configure(ours.device.public_key, ours.address, preshared_key=preshared_key)
        return ours

    async def test_we_initiate(self):
        ours = self.connect()
        d = ours.proto.when_handshake_complete()
        ours.proto.initiate()
        event = await d.addTimeout(WAIT, reactor)
        self.assertTrue(event.initiator)
        self.assertEqual(event.peer_key, self.ns.public_key)
        await wait_until(lambda: self.ns.latest_handshake() != 0, "wireguard-go to record the handshake", timeout=WAIT, interval=0.01)
        self.assertEqual(ours.device.drops, {})

    async def test_they_initiate(self):
        psk = os.urandom(32)
        ours = self.connect(preshared_key=psk)
        got = []
        ours.on_udp = got.append
        d = ours.proto.when_handshake_complete()
        self.ns.send_udp(b"hello from wireguard-go", UDP_PORT)
        event = await d.addTimeout(WAIT, reactor)
        self.assertFalse(event.initiator)
        await wait_until(lambda: got, "the datagram from wireguard-go", timeout=WAIT, interval=0.01)
        self.assertEqual(got, [b"hello from wireguard-go"])

    async def test_icmpv6_echo_answered_by_kernel(self):
        ours = self.connect()
        payloads = [os.urandom(n) for n in (0, 1, 15, 16, 100, 1200)]
        for seq, data in enumerate(payloads):
            ours.ping(seq, data)  # the first one waits for the handshake in the staged queue
        await wait_until(lambda: len(ours.echo_replies) == len(payloads), "every echo reply", timeout=WAIT, interval=0.01)
        self.assertEqual(sorted(ours.echo_replies), list(enumerate(payloads)))

    async def test_udp_ten_mib_each_way(self):
        ours = self.connect()
        self.ns.start_udp_peer()
        # Upstream: go-back-N over our tunnel to the socket in the namespace.
        blob = random.Random(1).randbytes(TEN_MIB)
        pieces = [blob[i : i + CHUNK] for i in range(0, len(blob), CHUNK)]
        state = {"base": 0, "sent": 0, "progress": 0.0, "digest": None, "down": [], "end": False}

        def pump() -> None:
            while state["sent"] < min(state["base"] + 64, len(pieces)):
                seq = state["sent"]
                ours.udp(b"D" + seq.to_bytes(4, "big") + pieces[seq])
                state["sent"] += 1

        def on_udp(data: bytes) -> None:
            kind = data[:1]
            if kind == b"A":
                ack = int.from_bytes(data[1:5], "big")
                if ack > state["base"]:
                    state["base"], state["progress"] = ack, reactor.seconds()
                    pump()
            elif kind == b"H":
                state["digest"] = data[1:]
            elif kind == b"D":  # downstream data for us
                if int.from_bytes(data[1:5], "big") == len(state["down"]):
                    state["down"].append(data[5:])
                ours.udp(b"A" + len(state["down"]).to_bytes(4, "big"))
            elif kind == b"E":
                state["end"] = True

        def retransmit() -> None:
            if state["base"] < len(pieces) and reactor.seconds() - state["progress"] > 0.3:
                state["sent"] = state["base"]
                state["progress"] = reactor.seconds()
                pump()

        ours.on_udp = on_udp
        state["progress"] = reactor.seconds()
        rto = task.LoopingCall(retransmit)
        rto.start(0.1, now=False)
        self.addCleanup(lambda: rto.running and rto.stop())
        pump()
        await wait_until(lambda: state["base"] == len(pieces), "the upstream 10 MiB acknowledged", timeout=WAIT, interval=0.01)
        rto.stop()
        ours.udp(b"F")
        await wait_until(lambda: state["digest"] is not None, "the upstream digest", timeout=WAIT, interval=0.01)
        self.assertEqual(
            state["digest"], hashlib.sha256(blob).digest() + len(blob).to_bytes(8, "big")
        )
        # Downstream: the namespace sends 10 MiB of seeded random data to us.
        ours.udp(
            b"S" + TEN_MIB.to_bytes(8, "big") + (2).to_bytes(8, "big") + CHUNK.to_bytes(2, "big")
        )
        await wait_until(lambda: state["end"], "the downstream 10 MiB", timeout=WAIT, interval=0.01)
        down = b"".join(state["down"])
        self.assertEqual(len(down), TEN_MIB)
        self.assertEqual(down, random.Random(2).randbytes(TEN_MIB))
        ours.udp(b"Q")
        self.assertEqual(ours.device.drops, {})

    async def test_forced_rekey_keeps_traffic_flowing(self):
        # A short REKEY_AFTER_TIME (and rate limit) on our side: we re-handshake every ~0.3 s
        # while pinging every 10 ms, and every echo must come back.
        self.patch(wireguard, "REKEY_AFTER_TIME", 0.3)
        self.patch(wireguard, "REKEY_TIMEOUT", 0.2)
        ours = self.connect()
        seq = 0

        def ping() -> None:
            nonlocal seq
            ours.ping(seq, seq.to_bytes(4, "big") * 8)
            seq += 1

        loop = task.LoopingCall(ping)
        loop.start(0.01)
        self.addCleanup(lambda: loop.running and loop.stop())
        await wait_until(lambda: ours.proto.handshakes >= 6, "six handshakes", timeout=WAIT, interval=0.01)
        loop.stop()
        await wait_until(lambda: len(ours.echo_replies) == seq, "every echo reply", timeout=WAIT, interval=0.01)
        self.assertEqual(sorted(s for s, _ in ours.echo_replies), list(range(seq)))
        self.assertEqual(ours.device.drops, {})
        # The old keypair was retired each time: at most previous + current remain.
        self.assertLessEqual(len(ours.peer.keypairs()), 2)

    async def test_cookie_reply_under_load(self):
        # We claim to be under load: wireguard-go's first initiation gets a cookie reply, and
        # its retransmission (REKEY_TIMEOUT later) must carry a mac2 made with that cookie.
        ours = Ours(self, self.ns)
        ours.device.handshake_load_threshold = 0
        self.ns.configure(ours.device.public_key, ours.address)
        d = ours.proto.when_handshake_complete()
        self.ns.send_udp(b"knock", UDP_PORT)
        event = await d.addTimeout(WAIT, reactor)
        self.assertFalse(event.initiator)
        self.assertEqual(ours.device.drops["cookie-required"], 1)

    async def _never_completes(self, ours: Ours, expected_drop: str):
        d = ours.proto.when_handshake_complete()
        d.addErrback(lambda f: None)
        self.addCleanup(d.cancel)
        # Count wireguard-go's handshake messages as they reach our socket.
        handshakes: collections.Counter[bytes] = collections.Counter()
        received = ours.proto.datagramReceived

        def counting(data: bytes, addr: tuple[str, int]) -> None:
            if data[:4] in HANDSHAKE_TYPES:
                handshakes[data[:4]] += 1
            received(data, addr)

        ours.proto.datagramReceived = counting
        # We initiate ...
        ours.proto.initiate()
        # ... and wireguard-go initiates, because the namespace has a packet for us.
        self.ns.send_udp(b"x", UDP_PORT)
        await wait_until(lambda: ours.device.drops[expected_drop] > 0, "the expected drop", timeout=WAIT, interval=0.01)
        # A second handshake message of one kind from wireguard-go comes only after REKEY_TIMEOUT
        # (5 s), when one side retries because the first round completed on neither: by then
        # both sides have handled everything of the first round.
        await wait_until(lambda: max(handshakes.values(), default=0) >= 2, "a second handshake round",
                         timeout=WAIT, interval=0.01)
        self.assertFalse(d.called)
        self.assertEqual(ours.proto.handshakes, 0)
        self.assertEqual(self.ns.latest_handshake(), 0)
        self.assertEqual(ours.packets, [])

    def test_wrong_preshared_key_never_completes(self):
        ours = Ours(self, self.ns, preshared_key=os.urandom(32))
        self.ns.configure(ours.device.public_key, ours.address, preshared_key=os.urandom(32))
        # Initiations authenticate (the PSK enters only at the response), responses do not.
        return defer.ensureDeferred(self._never_completes(ours, "bad-response"))

    def test_wrong_static_key_never_completes(self):
        # wireguard-go knows a different key for us, so it cannot identify our initiations,
        # and its initiations name a static key we did not configure.
        ours = Ours(self, self.ns)
        self.ns.configure(public_key(generate_private_key()), ours.address)
        return defer.ensureDeferred(self._never_completes(ours, "bad-mac1"))

    def test_we_have_the_wrong_key_never_completes(self):
        # We address a key wireguard-go does not hold: it drops our initiations (mac1), and its
        # initiations carry a static key we do not know.
        ours = Ours(self, self.ns, peer_key=public_key(generate_private_key()))
        self.ns.configure(ours.device.public_key, ours.address)
        return defer.ensureDeferred(self._never_completes(ours, "unknown-peer"))
