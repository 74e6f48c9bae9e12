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
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
CIPHER = "aes128-ctr"  # the fastest cipher both conch and OpenSSH offer (conch has no chacha20/GCM)

CONCH_SERVER = """
import sys
from twisted.internet import reactor
from coderstack.agent.ssh import ssh_factory
port = reactor.listenTCP(0, ssh_factory(sys.argv[1]), interface="127.0.0.1")
print(port.getHost().port, flush=True)
reactor.run()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, deadline: float = 10.0) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")


def start_conch(tmp: str) -> tuple[subprocess.Popen, int]:
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.Popen([sys.executable, "-c", CONCH_SERVER, os.path.join(tmp, "conch")],
                            stdout=subprocess.PIPE, env=env)
    port = int(proc.stdout.readline())
    return proc, port


def start_sshd(tmp: str, client_key: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    host_key = os.path.join(tmp, "sshd_host_ed25519")
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", host_key], check=True)
    auth = os.path.join(tmp, "authorized_keys")
    shutil.copy(client_key + ".pub", auth)
    os.chmod(auth, 0o600)
    config = os.path.join(tmp, "sshd_config")
    with open(config, "w") as f:
        f.write(f"ListenAddress 127.0.0.1\nPort {port}\nHostKey {host_key}\nAuthorizedKeysFile {auth}\n"
                f"PidFile none\nUsePAM no\nPermitRootLogin yes\nStrictModes no\nPasswordAuthentication no\n"
                f"AllowTcpForwarding yes\nSubsystem sftp internal-sftp\n")
    script = ("mount -t tmpfs tmpfs /run && mkdir -m755 /run/sshd && "
              f"exec /usr/sbin/sshd -D -e -f {config}")
    proc = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                            stderr=subprocess.DEVNULL)
    wait_port(port)
    return proc, port


def ssh_args(port: int, key: str) -> list[str]:
    return ["ssh", "-p", str(port), "-i", key, "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes", "-o", "LogLevel=ERROR",
            "-o", "IdentitiesOnly=yes", "-c", CIPHER, "-o", "Compression=no"]


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


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
                out["up"].append(size / timed(lambda: subprocess.run(  # noqa: B023
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
from coderstack.cli.portforward import Forwarder, loopback_tcp_endpoint, parse_forwards
f = Forwarder(reactor, loopback_tcp_endpoint(reactor), None, lambda line: None, ipv6=False)
f.start(parse_forwards([sys.argv[1]], []))
reactor.run()
"""


def port_forward_once(size: int) -> float:
    """The same push through ``coderstack port-forward``'s machinery with a plain TCP dialer."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    return forward_with(lambda local, sink_port: subprocess.Popen(
        [sys.executable, "-c", PORT_FORWARD, f"127.0.0.1:{local}:{sink_port}"], env=env), size)


def forward_with(start, size: int) -> float:
    sink = socket.socket()
    sink.bind(("127.0.0.1", 0))
    sink.listen(1)
    sink_port = sink.getsockname()[1]
    done = threading.Event()

    def drain() -> None:
        while True:  # the readiness probe through the forward arrives first, empty: skip it
            conn, _ = sink.accept()
            got = 0
            while got < size:
                chunk = conn.recv(1 << 20)
                if not chunk:
                    break
                got += len(chunk)
            if got:
                break
            conn.close()
        conn.sendall(b"k")
        conn.close()
        done.set()

    threading.Thread(target=drain, daemon=True).start()
    local = free_port()
    proc = start(local, sink_port)
    try:
        wait_port(local)
        block = b"\0" * (1 << 20)
        with socket.create_connection(("127.0.0.1", local)) as c:
            t0 = time.perf_counter()
            sent = 0
            while sent < size:
                c.sendall(block[: min(len(block), size - sent)])
                sent += min(len(block), size - sent)
            c.recv(1)
            elapsed = time.perf_counter() - t0
        done.wait(10)
        return elapsed
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait()
        sink.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="32 MiB, 3 runs (the default)")
    parser.add_argument("--full", action="store_true", help="128 MiB, 5 runs")
    args = parser.parse_args()
    size, runs = (128 << 20, 5) if args.full else (32 << 20, 3)
    tmp = tempfile.mkdtemp(prefix="bench-ssh-")
    procs: list[subprocess.Popen] = []
    try:
        key = os.path.join(tmp, "id_ed25519")
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", key], check=True)
        conch, conch_port = start_conch(tmp)
        procs.append(conch)
        sshd, sshd_port = start_sshd(tmp, key)
        procs.append(sshd)
        results = {"coderstack conch": measure(conch_port, key, size, runs),
                   "OpenSSH sshd": measure(sshd_port, key, size, runs)}
        plain = statistics.median(size / port_forward_once(size) for _ in range(runs))
    finally:
        for p in procs:  # by PID, ours only
            p.terminate()
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
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
