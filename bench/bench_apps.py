#!/usr/bin/env python3
"""Workspace apps: the same app reached five ways, in one run.

The app (Tornado, on this machine's loopback — the workspace's, for the agent) serves a small page
(``/small``, 1 KiB), a 100 MiB download (``/big``, streamed in 256 KiB writes) and a websocket echo
(``/ws``). It is reached:

1. through the server's app proxy on its port subdomain (``PORT--main--box--bench.apps.localhost``),
   the server tailnet going direct to the agent;
2. the same with ``--block-direct-connections`` (the server tailnet relays through the embedded
   DERP, in memory);
3. through ``coderstack port-forward`` (the CLI's own tunnel to the agent);
4. straight to the app on localhost;
5. behind nginx (Debian) as a plain reverse proxy on loopback (keep-alive upstream, websocket
   upgrade headers), the yardstick for a proxy's own overhead.

Measured: requests/s for ``/small`` at 16 concurrent keep-alive clients (``wrk -t2 -c16``), MB/s for
``/big`` (curl, median of 3), and the websocket echo round trip (Tornado client, median of 300).
Needs Debian's ``wrk``, ``nginx`` and ``curl``, and Tornado (installed with jupyter-server).

Usage: python bench/bench_apps.py [--full]      (--full: 15 s wrk runs instead of 5 s)
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from loopback_ssh import free_port, stop, wait_port
from tunnel_deployment import TunnelDeployment

WILDCARD = "apps.localhost"
APP = textwrap.dedent('''
    import sys
    import tornado.ioloop, tornado.web, tornado.websocket

    SMALL = b"x" * 1024
    CHUNK = b"y" * (256 * 1024)

    class Small(tornado.web.RequestHandler):
        def get(self):
            self.write(SMALL)

    class Big(tornado.web.RequestHandler):
        async def get(self):
            self.set_header("Content-Length", str(100 * 1024 * 1024))
            for _ in range(400):
                self.write(CHUNK)
                await self.flush()

    class Echo(tornado.websocket.WebSocketHandler):
        def check_origin(self, origin):
            return True
        def on_message(self, message):
            self.write_message(message, binary=isinstance(message, bytes))

    tornado.web.Application([(r"/small", Small), (r"/big", Big), (r"/ws", Echo)]).listen(
        int(sys.argv[1]), address="127.0.0.1")
    tornado.ioloop.IOLoop.current().start()
''')
WS_CLIENT = textwrap.dedent('''
    import json, statistics, sys, time
    import tornado.httpclient, tornado.ioloop, tornado.websocket

    async def main(url, headers, n):
        req = tornado.httpclient.HTTPRequest(url, headers=json.loads(headers))
        ws = await tornado.websocket.websocket_connect(req)
        times = []
        for i in range(int(n) + 20):
            t = time.perf_counter()
            await ws.write_message(b"p" * 32, binary=True)
            await ws.read_message()
            if i >= 20:
                times.append(time.perf_counter() - t)
        ws.close()
        print(statistics.median(times) * 1e6)

    tornado.ioloop.IOLoop.current().run_sync(lambda: main(*sys.argv[1:]))
''')
NGINX = textwrap.dedent('''
    worker_processes 1;
    pid {tmp}/nginx.pid;
    error_log {tmp}/nginx-error.log;
    events {{ worker_connections 1024; }}
    http {{
        access_log off;
        client_body_temp_path {tmp}/body;
        proxy_temp_path {tmp}/proxy;
        fastcgi_temp_path {tmp}/fastcgi;
        uwsgi_temp_path {tmp}/uwsgi;
        scgi_temp_path {tmp}/scgi;
        upstream app {{ server 127.0.0.1:{app}; keepalive 32; }}
        map $http_upgrade $connection_upgrade {{ default upgrade; "" ""; }}
        server {{
            listen 127.0.0.1:{port};
            location / {{
                proxy_pass http://app;
                proxy_http_version 1.1;
                proxy_set_header Host $host;
                proxy_set_header Upgrade $http_upgrade;
                proxy_set_header Connection $connection_upgrade;
                proxy_set_header X-Forwarded-For $remote_addr;
                # Buffer in memory only (no temp files): responses stream at the client's pace.
                proxy_max_temp_file_size 0;
            }}
        }}
    }}
''')


class Target:
    def __init__(self, name: str, base: str, headers: dict[str, str]) -> None:
        self.name, self.base, self.headers = name, base, headers


def wrk(target: Target, seconds: int) -> float:
    args = ["wrk", "-t2", "-c16", f"-d{seconds}s"]
    for k, v in target.headers.items():
        args += ["-H", f"{k}: {v}"]
    out = subprocess.run(args + [target.base + "/small"], capture_output=True, text=True, check=True).stdout
    found = re.search(r"Requests/sec:\s+([\d.]+)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if found is None or non2xx is not None:
        raise RuntimeError(f"wrk against {target.name} failed:\n{out}")
    return float(found.group(1))


def download(target: Target) -> float:
    runs = []
    for _ in range(3):
        args = ["curl", "-sS", "-o", "/dev/null", "-w", "%{speed_download} %{size_download} %{http_code}"]
        for k, v in target.headers.items():
            args += ["-H", f"{k}: {v}"]
        speed, size, code = subprocess.run(args + [target.base + "/big"], capture_output=True, text=True,
                                           check=True).stdout.split()
        if code != "200" or int(size) != 100 * 1024 * 1024:
            raise RuntimeError(f"download through {target.name}: HTTP {code}, {size} bytes")
        runs.append(float(speed) / 1e6)
    return statistics.median(runs)


def ws_rtt(target: Target, tmp: str, n: int) -> float:
    script = os.path.join(tmp, "ws_client.py")
    with open(script, "w") as f:
        f.write(WS_CLIENT)
    url = target.base.replace("http://", "ws://") + "/ws"
    out = subprocess.run([sys.executable, script, url, json.dumps(target.headers), str(n)],
                         capture_output=True, text=True, check=True).stdout
    return float(out.strip())


def subdomain_target(name: str, dep: TunnelDeployment, app_port: int) -> Target:
    """The app's port subdomain on the server, with the owner's session and its app ticket (a
    browser holds the ticket cookie after its first request)."""
    token = open(os.path.join(dep.config_dir, "session")).read().strip()
    host = f"{app_port}--main--box--bench.{WILDCARD}:{dep.port}"
    headers = {"Host": host, "Coder-Session-Token": token}
    req = urllib.request.Request(dep.url + "/small", headers=headers)
    with urllib.request.urlopen(req, timeout=30) as resp:
        if resp.status != 200:
            raise RuntimeError(f"{name}: HTTP {resp.status}")
        ticket = [c.split(";")[0] for c in resp.headers.get_all("Set-Cookie") or []
                  if c.startswith("coder_signed_app_token=")]
    if ticket:
        headers["Cookie"] = ticket[0]
    return Target(name, dep.url, headers)


def measure(target: Target, tmp: str, seconds: int) -> dict[str, float]:
    row = {"rps": wrk(target, seconds), "mbps": download(target), "ws_us": ws_rtt(target, tmp, 300)}
    print(f"  {target.name}: {row['rps']:.0f} req/s, {row['mbps']:.0f} MB/s, ws {row['ws_us']:.0f} µs", flush=True)
    return row


def main(argv: list[str]) -> int:
    seconds = 15 if "--full" in argv else 5
    for tool in ("wrk", "nginx", "curl"):
        if shutil.which(tool) is None and not os.path.exists(f"/usr/sbin/{tool}"):
            print(f"{tool} is not installed (apt-get install wrk nginx curl)", file=sys.stderr)
            return 1
    tmp = tempfile.mkdtemp(prefix="bench-apps-")
    procs: list[subprocess.Popen] = []
    deployments: list[TunnelDeployment] = []
    rows: dict[str, dict[str, float]] = {}
    try:
        app_port = free_port()
        app_script = os.path.join(tmp, "app.py")
        with open(app_script, "w") as f:
            f.write(APP)
        procs.append(subprocess.Popen([sys.executable, app_script, str(app_port)], cwd=tmp))
        wait_port(app_port)

        rows["localhost"] = measure(Target("localhost", f"http://127.0.0.1:{app_port}", {}), tmp, seconds)

        nginx_port = free_port()
        conf = os.path.join(tmp, "nginx.conf")
        with open(conf, "w") as f:
            f.write(NGINX.format(tmp=tmp, app=app_port, port=nginx_port))
        procs.append(subprocess.Popen(["nginx", "-c", conf, "-g", "daemon off;"], cwd=tmp,
                                      stderr=subprocess.DEVNULL))
        wait_port(nginx_port)
        rows["nginx"] = measure(Target("nginx", f"http://127.0.0.1:{nginx_port}", {}), tmp, seconds)

        for name, extra in (("proxy, direct", ()), ("proxy, --block-direct-connections",
                                                    ("--block-direct-connections",))):
            where = os.path.join(tmp, name.split(",")[0] + str(len(deployments)))
            os.makedirs(where)
            dep = TunnelDeployment(where, "--wildcard-access-url", f"*.{WILDCARD}", *extra)
            deployments.append(dep)
            dep.start()
            rows[name] = measure(subdomain_target(name, dep, app_port), tmp, seconds)
            if not extra:
                local = free_port()
                pf = dep.spawn("port-forward", [sys.executable, "-m", "coderstack", "port-forward", "box",
                                                "--tcp", f"{local}:{app_port}"], dep.cli_env(), dep.cli_home)
                wait_port(local, deadline=60)
                rows["port-forward"] = measure(Target("port-forward", f"http://127.0.0.1:{local}", {}),
                                               tmp, seconds)
                stop(pf)
            dep.close()
    finally:
        for dep in deployments:
            dep.close()
        for proc in reversed(procs):
            stop(proc)
        shutil.rmtree(tmp, ignore_errors=True)

    load = os.getloadavg()[0]
    print(f"\n{time.strftime('%Y-%m-%d')}, {platform.machine()}, {os.cpu_count()} CPUs, "
          f"Python {platform.python_version()}, load average {load:.1f} at the end\n")
    print("| path | req/s, 1 KiB page, 16 clients | MB/s, 100 MiB download | websocket echo RTT |")
    print("|---|---:|---:|---:|")
    for name in ("localhost", "nginx", "port-forward", "proxy, direct", "proxy, --block-direct-connections"):
        r = rows.get(name)
        if r:
            print(f"| {name} | {r['rps']:,.0f} | {r['mbps']:,.0f} | {r['ws_us']:,.0f} µs |")
    if "proxy, direct" in rows and "port-forward" in rows and "nginx" in rows:
        p, f, n = rows["proxy, direct"], rows["port-forward"], rows["nginx"]
        print(f"\nport-forward / proxy (direct): {f['rps'] / p['rps']:.2f}× req/s, "
              f"{f['mbps'] / p['mbps']:.2f}× MB/s; proxy (direct) / nginx: {p['rps'] / n['rps']:.2f}× req/s, "
              f"{p['mbps'] / n['mbps']:.2f}× MB/s, {p['ws_us'] / n['ws_us']:.2f}× websocket RTT")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
