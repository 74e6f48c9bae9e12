"""Shared by the SSH benchmarks: a throwaway OpenSSH sshd on 127.0.0.1, the stock ``ssh`` client's
options, and "push N bytes through a TCP forward into a sink" timing.

The sshd runs as root in a private mount namespace (so it can have its own /run/sshd without
touching the host's), on a free port, with its own host key and authorized_keys in the caller's
temp dir. The caller stops it by PID.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable

CIPHER = "aes128-ctr"  # the fastest cipher both conch and OpenSSH offer (conch has no chacha20/GCM)


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


def client_key(tmp: str) -> str:
    """A fresh ed25519 client key in ``tmp``; returns its path."""
    key = os.path.join(tmp, "id_ed25519")
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", key], check=True)
    return key


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


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def exit_on_sigterm() -> None:
    """Make SIGTERM run the caller's ``finally`` blocks (which stop its processes by PID)."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def stop(proc: subprocess.Popen, grace: float = 5.0) -> None:
    """SIGTERM by PID, SIGKILL if it lingers."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def forward_with(start: Callable[[int, int], subprocess.Popen], size: int) -> float:
    """Seconds to push ``size`` bytes through a forward into a sink that acknowledges the end.

    ``start(local_port, sink_port)`` starts the forwarder (listening on ``local_port``, dialing
    ``127.0.0.1:sink_port``); it is stopped by PID afterwards.
    """
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
        wait_port(local, deadline=30.0)
        block = b"\0" * (1 << 20)
        with socket.create_connection(("127.0.0.1", local)) as c:
            c.settimeout(300)  # a stuck forward fails the run instead of hanging it
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
        stop(proc)
        sink.close()
