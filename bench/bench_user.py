"""What users run, through the real tunnel on loopback: a real server, agent and CLI, beside
OpenSSH's own sshd in the same run.

Run: ``python bench/bench_user.py`` (quick: 2 s speedtests, 32 MiB forwards, 3 runs; 5 ssh
dials) or ``--full`` (5 s, 128 MiB, 5 runs; 10 dials). Needs root (the throwaway sshd runs in a
private mount namespace, see ``loopback_ssh.py``) and openssh-server/-client.

Measured, each direct (WireGuard over loopback UDP) and relayed (``--disable-direct-connections``:
WireGuard through the server's embedded DERP relay):

* ``coderstack speedtest box`` download and upload;
* ``ssh -F <config-ssh output> coder.box true``, cold (every run dials a new tunnel in its
  ProxyCommand): time until ``echo x`` prints its byte, and total time of ``true``; beside plain
  ``ssh`` to the throwaway sshd on 127.0.0.1 with the same cipher;
* port-forward throughput: N bytes pushed through ``coderstack port-forward box --tcp`` into a
  sink on the workspace's loopback, beside ``ssh -L`` through the throwaway sshd (and ``ssh -L``
  through ``coder.box``: the agent's conch inside the tunnel).

Every process is stopped by PID at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime

from loopback_ssh import (
    CIPHER,
    client_key,
    exit_on_sigterm,
    forward_with,
    ssh_args,
    start_sshd,
    stop,
)
from tunnel_deployment import TunnelDeployment

RELAY = "--disable-direct-connections"


def speedtest(dep: TunnelDeployment, direction: str, seconds: float, relayed: bool) -> float:
    flags = [RELAY] if relayed else []
    doc = json.loads(dep.cli(*flags, "speedtest", "box", "-t", f"{seconds:g}s", "--direction", direction,
                             "-o", "json"))
    return doc["overall"]["throughput_mbits"]


def ssh_times(argv: list[str], env: dict[str, str] | None = None) -> tuple[float, float]:
    """(seconds until ``echo x`` prints, seconds until ``true`` exits): two cold dials."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([*argv, "echo x"], stdout=subprocess.PIPE, env=env)
    first = proc.stdout.read(1)
    first_byte = time.perf_counter() - t0
    proc.stdout.read()
    if proc.wait() != 0 or first != b"x":
        raise RuntimeError(f"{argv} failed")
    t0 = time.perf_counter()
    subprocess.run([*argv, "true"], env=env, check=True)
    return first_byte, time.perf_counter() - t0


def tunnel_ssh(dep: TunnelDeployment) -> list[str]:
    return ["ssh", "-F", dep.ssh_config, "-c", CIPHER, "-o", "Compression=no", "-o", "BatchMode=yes"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 s, 32 MiB, 3 runs (the default)")
    parser.add_argument("--full", action="store_true", help="5 s, 128 MiB, 5 runs")
    args = parser.parse_args()
    seconds, size, runs, dials = (5.0, 128 << 20, 5, 10) if args.full else (2.0, 32 << 20, 3, 5)
    exit_on_sigterm()
    tmp = tempfile.mkdtemp(prefix="bench-user-")
    dep = TunnelDeployment(tmp)
    sshd = None
    results: dict[str, dict[str, float]] = {"direct": {}, "relayed": {}, "openssh": {}}
    try:
        key = client_key(tmp)
        sshd, sshd_port = start_sshd(tmp, key)
        dep.start()
        for path in ("direct", "relayed"):
            relayed = path == "relayed"
            r = results[path]
            r["down"] = statistics.median(speedtest(dep, "down", seconds, relayed) for _ in range(runs))
            r["up"] = statistics.median(speedtest(dep, "up", seconds, relayed) for _ in range(runs))
            env = dep.cli_env(**({"CODER_DISABLE_DIRECT_CONNECTIONS": "true"} if relayed else {}))
            times = [ssh_times([*tunnel_ssh(dep), "coder.box"], env) for _ in range(dials)]
            r["first_byte"] = statistics.median(t[0] for t in times)
            r["total"] = statistics.median(t[1] for t in times)
            flags = [RELAY] if relayed else []
            r["fwd"] = statistics.median(size / forward_with(lambda local, sink, flags=flags: dep.spawn(
                "port-forward", [sys.executable, "-m", "coderstack", *flags, "port-forward", "box",
                                 "--tcp", f"127.0.0.1:{local}:{sink}"], dep.cli_env(), dep.cli_home), size)
                for _ in range(runs))
            r["ssh_l"] = statistics.median(size / forward_with(lambda local, sink, env=env: subprocess.Popen(
                [*tunnel_ssh(dep), "-N", "-L", f"127.0.0.1:{local}:127.0.0.1:{sink}", "coder.box"], env=env), size)
                for _ in range(runs))
        base = ssh_args(sshd_port, key)
        times = [ssh_times([*base, "127.0.0.1"]) for _ in range(dials)]
        results["openssh"]["first_byte"] = statistics.median(t[0] for t in times)
        results["openssh"]["total"] = statistics.median(t[1] for t in times)
        results["openssh"]["ssh_l"] = statistics.median(size / forward_with(lambda local, sink: subprocess.Popen(
            [*base, "-N", "-L", f"127.0.0.1:{local}:127.0.0.1:{sink}", "127.0.0.1"]), size) for _ in range(runs))
    finally:
        dep.close()
        if sshd is not None:
            stop(sshd)
        shutil.rmtree(tmp, ignore_errors=True)

    d, r, o = results["direct"], results["relayed"], results["openssh"]

    def mbit(v: float) -> str:
        return f"{v:.0f} Mbit/s"

    def bps(v: float) -> str:
        return mbit(v * 8 / 1e6)

    def ms(v: float) -> str:
        return f"{v * 1000:.0f} ms"

    print(f"## User commands through the tunnel on loopback ({datetime.now(UTC):%Y-%m-%d %H:%M} UTC, "
          f"{platform.machine()}, {os.cpu_count()} CPUs; medians of {runs} runs, {dials} ssh dials; "
          f"{seconds:g} s speedtests, {size >> 20} MiB forwards; `ssh -c {CIPHER}`)\n")
    print("| measurement | coderstack direct | coderstack relayed (DERP) | OpenSSH sshd on loopback |")
    print("|---|---|---|---|")
    print(f"| `coderstack speedtest` download | {mbit(d['down'])} | {mbit(r['down'])} | |")
    print(f"| `coderstack speedtest` upload | {mbit(d['up'])} | {mbit(r['up'])} | |")
    print(f"| `ssh coder.box 'echo x'`: first byte (cold dial) | {ms(d['first_byte'])} | {ms(r['first_byte'])} | "
          f"{ms(o['first_byte'])} |")
    print(f"| `ssh coder.box true`: total (cold dial) | {ms(d['total'])} | {ms(r['total'])} | {ms(o['total'])} |")
    print(f"| `coderstack port-forward --tcp` throughput | {bps(d['fwd'])} | {bps(r['fwd'])} | |")
    print(f"| `ssh -L` throughput | {bps(d['ssh_l'])} | {bps(r['ssh_l'])} | {bps(o['ssh_l'])} |")


if __name__ == "__main__":
    main()
