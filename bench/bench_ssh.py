"""The agent's conch SSH server beside OpenSSH's sshd, on loopback, measured in the same run.

Run: ``python bench/bench_ssh.py`` (quick: 32 MiB per transfer, 3 runs) or ``--full`` (128 MiB,
5 runs). Needs root (sshd runs in a private mount namespace so it can have its own /run/sshd
without touching the host's) and openssh-server/-client. Prints a Markdown table of medians.

Measured with the stock ``ssh`` client against each server, same client options and cipher:

* time to first byte of ``ssh host true`` (connect, key exchange, auth, exec, exit status);
* download: ``ssh host 'head -c N /dev/zero' > /dev/null``;
* upload: ``ssh host 'cat > /dev/null' < N bytes``;
* ``ssh -L`` forwarding (direct-tcpip): N bytes pushed through the forward to a local sink.

Both servers run as separate processes; everything is cleaned up by PID.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from datetime import UTC, datetime

from loopback_ssh import CIPHER, client_key, forward_with, ssh_args, start_sshd, stop, timed

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")

CONCH_SERVER = """
import sys
from twisted.internet import reactor
from coderstack.agent.ssh import ssh_factory
port = reactor.listenTCP(0, ssh_factory(sys.argv[1]), interface="127.0.0.1")
print(port.getHost().port, flush=True)
reactor.run()
"""


def start_conch(tmp: str) -> tuple[subprocess.Popen, int]:
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.Popen([sys.executable, "-c", CONCH_SERVER, os.path.join(tmp, "conch")],
                            stdout=subprocess.PIPE, env=env)
    port = int(proc.stdout.readline())
    return proc, port


def measure(port: int, key: str, size: int, runs: int) -> dict[str, float]:
    base = ssh_args(port, key)
    out: dict[str, list[float]] = {"ttfb": [], "down": [], "up": [], "fwd": []}
    payload = os.path.join(tempfile.gettempdir(), f"bench-ssh-{os.getpid()}.bin")
    with open(payload, "wb") as f:
        f.write(b"\0" * size)
    try:
        for _ in range(runs):
            out["ttfb"].append(timed(lambda: subprocess.run([*base, "127.0.0.1", "true"], check=True)))
            out["down"].append(size / timed(lambda: subprocess.run(
                [*base, "127.0.0.1", f"head -c {size} /dev/zero"], stdout=subprocess.DEVNULL, check=True)))
            with open(payload, "rb") as stdin:
                out["up"].append(size / timed(lambda: subprocess.run(
                    [*base, "127.0.0.1", "cat > /dev/null"], stdin=stdin, check=True)))
            out["fwd"].append(size / forward_once(base, size))
    finally:
        os.unlink(payload)
    return {k: statistics.median(v) for k, v in out.items()}


def forward_once(base: list[str], size: int) -> float:
    """Seconds to push ``size`` bytes through ``ssh -L`` into a sink that acknowledges the end."""
    return forward_with(lambda local, sink_port: subprocess.Popen(
        [*base, "-N", "-L", f"127.0.0.1:{local}:127.0.0.1:{sink_port}", "127.0.0.1"]), size)


PORT_FORWARD = """
import sys
from twisted.internet import reactor
from coderstack.forward.forwarder import Forwarder
from coderstack.forward.spec import parse_forwards
from tests.support.loopbackforward import loopback_tcp_endpoint
f = Forwarder(reactor, loopback_tcp_endpoint(reactor), None, lambda line: None, ipv6=False)
f.start(parse_forwards([sys.argv[1]], []))
reactor.run()
"""


def port_forward_once(size: int) -> float:
    """The same push through ``coderstack port-forward``'s machinery with a plain TCP dialer."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    return forward_with(lambda local, sink_port: subprocess.Popen(
        [sys.executable, "-c", PORT_FORWARD, f"127.0.0.1:{local}:{sink_port}"], env=env), size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="32 MiB, 3 runs (the default)")
    parser.add_argument("--full", action="store_true", help="128 MiB, 5 runs")
    args = parser.parse_args()
    size, runs = (128 << 20, 5) if args.full else (32 << 20, 3)
    tmp = tempfile.mkdtemp(prefix="bench-ssh-")
    procs: list[subprocess.Popen] = []
    try:
        key = client_key(tmp)
        conch, conch_port = start_conch(tmp)
        procs.append(conch)
        sshd, sshd_port = start_sshd(tmp, key)
        procs.append(sshd)
        results = {"coderstack conch": measure(conch_port, key, size, runs),
                   "OpenSSH sshd": measure(sshd_port, key, size, runs)}
        plain = statistics.median(size / port_forward_once(size) for _ in range(runs))
    finally:
        for p in procs:  # by PID, ours only
            stop(p)
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"## SSH server on loopback ({datetime.now(UTC):%Y-%m-%d %H:%M} UTC, "
          f"{platform.machine()}, {os.cpu_count()} CPUs, {size >> 20} MiB, median of {runs}, "
          f"client `ssh -c {CIPHER}`)\n")
    print("| server | `ssh host true` | download (exec) | upload (exec) | `ssh -L` forward |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['ttfb'] * 1000:.0f} ms | {r['down'] * 8 / 1e6:.0f} Mbit/s | "
              f"{r['up'] * 8 / 1e6:.0f} Mbit/s | {r['fwd'] * 8 / 1e6:.0f} Mbit/s |")
    print(f"| coderstack port-forward machinery, plain TCP dialer (no SSH, no tunnel) | | | | "
          f"{plain * 8 / 1e6:.0f} Mbit/s |")


if __name__ == "__main__":
    main()
