"""A tiny NAT lab in network namespaces for the STUN/netcheck tests (names prefixed ``csst``).

    client ns  c0 10.77.<n>.2/24 ── n0 10.77.<n>.1/24  NAT ns  n1 203.0.113.1/24 ── s0 203.0.113.2/24
                                                                                  + 203.0.113.3/24
                                                                                  server ns

The NAT namespace masquerades out of ``n1`` and is a stateful firewall (baselines-and-real-peers.md):
from the wan side only ESTABLISHED/RELATED is forwarded or accepted. Processes are started with
``ip netns exec`` and the worktree/repo root on PYTHONPATH; everything is removed by the cleanup
the test registers (processes by PID, then the namespaces).
"""

from __future__ import annotations

import os
import select
import shutil
import subprocess
import sys
import uuid

from tests.support.processes import die_with_parent

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PYTHON = sys.executable
SERVER_IPS = ("203.0.113.2", "203.0.113.3")
NAT_PUBLIC_IP = "203.0.113.1"


def available() -> str | None:
    """None when the lab can run, else why not (CI runs as root with iproute2 and iptables)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "iptables"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    return None


def sh(*cmd: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    full = (["ip", "netns", "exec", ns] if ns else []) + list(cmd)
    return subprocess.run(full, check=check, capture_output=True, text=True, timeout=30)


class NATLab:
    def __init__(self, nat: str = "easy", block_udp: bool = False) -> None:
        tag = f"{os.getpid() % 100000}{uuid.uuid4().hex[:4]}"
        self.client = f"csst-c{tag}"
        self.nat = f"csst-n{tag}"
        self.server = f"csst-s{tag}"
        self.subnet = 1 + int(uuid.uuid4().hex[:2], 16) % 250
        self.procs: list[subprocess.Popen] = []
        self.namespaces: list[str] = []
        self._build(nat, block_udp)

    def _build(self, nat: str, block_udp: bool) -> None:
        for ns in (self.client, self.nat, self.server):
            sh("ip", "netns", "add", ns)
            self.namespaces.append(ns)
            sh("ip", "link", "set", "lo", "up", ns=ns)
        sh("ip", "link", "add", "c0", "netns", self.client, "type", "veth",
           "peer", "name", "n0", "netns", self.nat)
        sh("ip", "link", "add", "n1", "netns", self.nat, "type", "veth",
           "peer", "name", "s0", "netns", self.server)
        lan = f"10.77.{self.subnet}"
        sh("ip", "addr", "add", f"{lan}.2/24", "dev", "c0", ns=self.client)
        sh("ip", "link", "set", "c0", "up", ns=self.client)
        sh("ip", "route", "add", "default", "via", f"{lan}.1", ns=self.client)
        sh("ip", "addr", "add", f"{lan}.1/24", "dev", "n0", ns=self.nat)
        sh("ip", "addr", "add", f"{NAT_PUBLIC_IP}/24", "dev", "n1", ns=self.nat)
        for dev in ("n0", "n1"):
            sh("ip", "link", "set", dev, "up", ns=self.nat)
        for ip in SERVER_IPS:
            sh("ip", "addr", "add", f"{ip}/24", "dev", "s0", ns=self.server)
        sh("ip", "link", "set", "s0", "up", ns=self.server)
        sh("sysctl", "-qw", "net.ipv4.ip_forward=1", ns=self.nat)
        masq = ["iptables", "-t", "nat", "-A", "POSTROUTING", "-o", "n1", "-j", "MASQUERADE"]
        if nat == "hard":
            masq.append("--random-fully")
        sh(*masq, ns=self.nat)
        ipt = ["iptables"]
        if block_udp:
            sh(*ipt, "-A", "FORWARD", "-p", "udp", "-j", "DROP", ns=self.nat)
        est = ["-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT"]
        sh(*ipt, "-A", "FORWARD", "-i", "n1", *est, ns=self.nat)
        sh(*ipt, "-A", "FORWARD", "-i", "n1", "-j", "DROP", ns=self.nat)
        sh(*ipt, "-A", "INPUT", "-i", "n1", *est, ns=self.nat)
        sh(*ipt, "-A", "INPUT", "-i", "n1", "-j", "DROP", ns=self.nat)

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = REPO_ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        return env

    def start_servers(self, http: int = 8080, https: int = 8443, stun: int = 3478) -> None:
        cmd = ["ip", "netns", "exec", self.server, PYTHON, "-m", "tests.tailnet.derp_endpoints",
               "--http", str(http), "--https", str(https)]
        for ip in SERVER_IPS:
            cmd += ["--stun", f"{ip}:{stun}"]
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=self.env(), cwd=REPO_ROOT, preexec_fn=die_with_parent)
        self.procs.append(p)
        ready, _, _ = select.select([p.stdout], [], [], 20)
        line = p.stdout.readline() if ready else ""
        if line.strip() != "ready":
            raise RuntimeError(f"server did not start: {line!r} {p.stderr.read() if p.poll() is not None else ''}")

    def start_embedded_stun(self, data_dir: str, http: int = 8080) -> str:
        """The server's STUN with its default options on ``SERVER_IPS[0]`` (and no other STUN
        server); returns the DERP map it would hand out (tests/netlab/embedded_stun.py)."""
        cmd = ["ip", "netns", "exec", self.server, PYTHON, "-m", "tests.netlab.embedded_stun",
               f"{SERVER_IPS[0]}:{http}", data_dir]
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=self.env(), cwd=REPO_ROOT, preexec_fn=die_with_parent)
        self.procs.append(p)
        ready, _, _ = select.select([p.stdout], [], [], 20)
        line = p.stdout.readline().strip() if ready else ""
        if not line.startswith("{"):
            raise RuntimeError(f"embedded STUN did not start: {line!r} {p.stderr.read() if p.poll() is not None else ''}")
        return line

    def run_client(self, *args: str, timeout: float = 30) -> str:
        r = subprocess.run(
            ["ip", "netns", "exec", self.client, PYTHON, "-m", "tests.netlab.stun_probe", *args],
            capture_output=True, text=True, timeout=timeout, env=self.env(), cwd=REPO_ROOT)
        if r.returncode != 0:
            raise RuntimeError(f"client failed ({r.returncode}): {r.stderr}")
        return r.stdout.strip().splitlines()[-1]

    def cleanup(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
            for f in (p.stdout, p.stderr):
                if f:
                    f.close()
        for ns in reversed(self.namespaces):
            sh("ip", "netns", "del", ns, check=False)
