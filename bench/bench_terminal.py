#!/usr/bin/env python3
"""The web terminal in a real browser: keystroke-to-echo latency and output throughput, through
our dashboard's terminal (the server's tunnel to the agent, direct and relayed) beside
JupyterLab's terminal (terminado + xterm.js) on loopback, in one run.

Both pages are real: ours at ``/workspaces/bench/box/main/terminal``, JupyterLab's a terminal
opened from its launcher. Both run ``/bin/sh``. Measured inside the page, in headless Chromium (Debian's, through Playwright):

- **echo latency**: from a key's ``keydown`` (a trusted key press) to the echoed character
  arriving on the page's websocket, median of 3 × 40 keys;
- **throughput**: from the Enter that runs ``cat`` of a 20 MB text file to the end marker after it
  arriving on the page's websocket, in MB/s (median of 3).

Both are taken where the page receives the bytes, not where xterm.js has drawn them: JupyterLab
draws on a canvas that a page cannot observe, and both pages hand the bytes to xterm.js the same
way.

Needs PyPI ``jupyterlab`` (``pip install 'jupyterlab>=4,<5'``), Playwright, ``/usr/bin/chromium`` and
``web/node_modules`` (``npm ci --prefix web``).

Usage: python bench/bench_terminal.py
"""

from __future__ import annotations

import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from loopback_ssh import free_port, stop, wait_port
from tunnel_deployment import TunnelDeployment

CHROMIUM = "/usr/bin/chromium"
ROUNDS, KEYS = 3, 40
CAT_MB = 20

#: Runs in each page before its scripts: every websocket's incoming text (terminado's JSON
#: frames, our binary ones) is decoded into a rolling tail; the first time the tail holds
#: ``window.__want`` after a ``keydown``, the delay since that keydown is recorded.
WATCH = """
(() => {
  window.__lat = [];
  window.__net = [];
  window.__t0 = 0;
  window.__sent = 0;
  window.__want = null;
  let tail = "";
  const decoder = new TextDecoder();
  document.addEventListener("keydown", () => { window.__t0 = performance.now(); window.__sent = 0; tail = ""; }, true);
  const Native = window.WebSocket;
  window.WebSocket = class extends Native {
    constructor(...args) {
      super(...args);
      this.addEventListener("message", (ev) => {
        const text = typeof ev.data === "string" ? ev.data : decoder.decode(ev.data, {stream: true});
        tail = (tail + text).slice(-256);
        if (window.__want !== null && tail.includes(window.__want)) {
          const now = performance.now();
          window.__lat.push(now - window.__t0);
          window.__net.push(window.__sent ? now - window.__sent : NaN);
          window.__want = null;
        }
      });
    }
    send(data) {
      if (!window.__sent) { window.__sent = performance.now(); }
      return super.send(data);
    }
  };
})();
"""


def measure_page(page, focus: str, cat_file: str) -> tuple[float, float, float]:
    """(median keydown→echo ms, median send→echo ms, cat MB/s) on a terminal page showing a prompt."""
    page.click(focus)
    latencies: list[float] = []
    sends: list[float] = []
    for r in range(ROUNDS):
        typed = f": r{r}x"
        page.keyboard.type(typed)
        time.sleep(0.3)
        page.evaluate("() => { window.__lat = []; window.__net = []; }")
        for i in range(KEYS):
            ch = "abcdefghij"[i % 10]
            typed += ch
            page.evaluate("(w) => { window.__want = w; }", ch)
            page.keyboard.press(ch)
            page.wait_for_function("() => window.__want === null", timeout=30000)
        latencies += page.evaluate("() => window.__lat")
        sends += page.evaluate("() => window.__net")
        page.keyboard.press("Control+U")
        time.sleep(0.2)
    speeds = []
    for r in range(3):
        marker = f"END-{r}-$((6*7))"
        page.keyboard.type(f"cat {cat_file}; echo {marker}")
        done = f"END-{r}-42"
        page.evaluate("(w) => { window.__want = w; }", done)
        page.keyboard.press("Enter")
        page.wait_for_function("() => window.__want === null", timeout=300000)
        seconds = page.evaluate("() => window.__lat[window.__lat.length - 1]") / 1000
        speeds.append(CAT_MB / seconds)
        page.keyboard.type("clear")
        page.keyboard.press("Enter")
        time.sleep(0.5)
    return statistics.median(latencies), statistics.median(sends), statistics.median(speeds)


def ours(p, tmp: str, cat_file: str, *server_args: str) -> tuple[float, float, float]:
    dep = TunnelDeployment(tmp, *server_args)
    try:
        dep.start()
        token = open(os.path.join(dep.config_dir, "session")).read().strip()
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            context = browser.new_context(viewport={"width": 1400, "height": 900})
            context.add_cookies([{"name": "coder_session_token", "value": token, "url": dep.url}])
            page = context.new_page()
            page.add_init_script(WATCH)
            page.goto(dep.url + "/workspaces/bench/box/main/terminal?command=/bin/sh")
            page.wait_for_function(
                "() => document.getElementById('terminal-state').textContent === 'connected'", timeout=60000)
            time.sleep(1)
            return measure_page(page, "#terminal", cat_file)
        finally:
            browser.close()
    finally:
        dep.close()


def jupyterlab_terminal(p, tmp: str, cat_file: str) -> tuple[float, float, float]:
    port = free_port()
    os.makedirs(os.path.join(tmp, "lab-settings"))
    env = {**os.environ, "JUPYTERLAB_SETTINGS_DIR": os.path.join(tmp, "lab-settings"),
           "JUPYTER_RUNTIME_DIR": os.path.join(tmp, "rt"), "JUPYTER_CONFIG_DIR": os.path.join(tmp, "cfg"),
           "JUPYTER_DATA_DIR": os.path.join(tmp, "data")}
    log = open(os.path.join(tmp, "jupyterlab.log"), "wb")
    lab = subprocess.Popen([sys.executable, "-m", "jupyter", "lab", "--allow-root", "--no-browser",
                            "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}", "--IdentityProvider.token=",
                            "--ServerApp.password=", "--ServerApp.disable_check_xsrf=True",
                            "--ServerApp.terminado_settings={'shell_command': ['/bin/sh']}",
                            f"--ServerApp.root_dir={tmp}"], env=env, cwd=tmp, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_port(port, deadline=60)
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.add_init_script(WATCH)
            page.goto(f"http://127.0.0.1:{port}/lab")
            page.click('.jp-LauncherCard:has-text("Terminal")', timeout=120000)
            page.wait_for_selector(".jp-Terminal .xterm-screen", timeout=120000)
            time.sleep(3)
            return measure_page(page, ".jp-Terminal .xterm-screen", cat_file)
        finally:
            browser.close()
    finally:
        stop(lab)
        log.close()


def main() -> int:
    try:
        import jupyterlab  # noqa: F401  # only to learn whether it is installed
        from playwright.sync_api import sync_playwright
    except ImportError as e:
        print(f"{e.name} is not installed (pip install 'jupyterlab>=4,<5' playwright)", file=sys.stderr)
        return 1
    tmp = tempfile.mkdtemp(prefix="bench-terminal-")
    rows: dict[str, tuple[float, float, float]] = {}
    try:
        cat_file = os.path.join(tmp, "20mb.txt")
        line = ("0123456789abcdefghijklmnopqrstuvwxyz" * 2 + "\n").encode()
        with open(cat_file, "wb") as f:
            f.write(line * (CAT_MB * 1_000_000 // len(line)))
        with sync_playwright() as p:
            lab_dir = os.path.join(tmp, "lab")
            os.makedirs(lab_dir)
            rows["JupyterLab terminal (loopback)"] = jupyterlab_terminal(p, lab_dir, cat_file)
            print(f"  JupyterLab: {rows['JupyterLab terminal (loopback)']}", flush=True)
            for name, args in (("coderstack terminal, direct", ()),
                               ("coderstack terminal, relayed", ("--block-direct-connections",))):
                where = os.path.join(tmp, name.split(",")[1].strip())
                os.makedirs(where)
                rows[name] = ours(p, where, cat_file, *args)
                print(f"  {name}: {rows[name]}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\n{time.strftime('%Y-%m-%d')}, {platform.machine()}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f} at the end\n")
    print("| terminal | keydown → echo (median) | websocket send → echo (median) | `cat` 20 MB |")
    print("|---|---:|---:|---:|")
    for name, (lat, net, mbps) in rows.items():
        print(f"| {name} | {lat:.1f} ms | {net:.1f} ms | {mbps:.1f} MB/s |")
    lab = rows["JupyterLab terminal (loopback)"][0]
    for name in ("coderstack terminal, direct", "coderstack terminal, relayed"):
        print(f"\n{name} / JupyterLab echo latency: {rows[name][0] / lab:.2f}×", end="")
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
