"""Stock OpenSSH through the real tunnel: ``ssh``/``sftp -F <config-ssh output> coder.WS``.

A real server, a real agent and the ``coderstack`` CLI as OpenSSH's ProxyCommand (``ssh --stdio``):
an interactive session under tmux (prompt, PTY, resize, exit status), sftp of 10 MiB each way
byte-exact, and the same relayed through DERP with ``--disable-direct-connections`` (checked on
the relay's byte counter). The workspace "machine" is this host: the agent shares its filesystem,
so files put by sftp are read back directly.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess

from twisted.internet import utils
from twisted.trial import unittest

from tests.integration.tunnel_support import relayed_bytes, ssh_config, user_env, workspace
from tests.support.processes import pid_alive, sleep
from tests.support.waiting import wait_until

SSH = shutil.which("ssh")
SFTP = shutil.which("sftp")
TMUX = shutil.which("tmux")
SFTP_SIZE = 10 << 20


class Tmux:
    """A private tmux server (its own socket file) running one session; stopped by PID."""

    def __init__(self, testcase: unittest.TestCase, socket_path: str, env: dict[str, str]) -> None:
        self.socket = socket_path
        self.env = env
        self.pid: int | None = None
        testcase.addCleanup(self.stop)

    def tmux(self, *args: str) -> str:
        return subprocess.run([TMUX, "-S", self.socket, *args], env=self.env, check=True,
                              capture_output=True, text=True).stdout

    def start(self, session: str, command: str, width: int, height: int) -> None:
        # remain-on-exit keeps the dead pane, so its exit status can be read afterwards.
        self.tmux("-f", "/dev/null", "new-session", "-d", "-s", session, "-x", str(width), "-y", str(height),
                  command, ";", "set-option", "-w", "-t", session, "remain-on-exit", "on")
        self.pid = int(self.tmux("display-message", "-p", "-t", session, "#{pid}").strip())

    def screen(self, session: str) -> str:
        return self.tmux("capture-pane", "-p", "-t", session)

    def keys(self, session: str, text: str) -> None:
        self.tmux("send-keys", "-t", session, "-l", text)
        self.tmux("send-keys", "-t", session, "Enter")

    async def showing(self, session: str, needle: str, timeout: float = 20.0) -> str:
        """The screen, once it shows ``needle``."""
        def shown() -> str | None:
            screen = self.screen(session)
            return screen if needle in screen else None

        return await wait_until(shown, lambda: f"{needle!r} on the screen:\n{self.screen(session)}",
                                timeout=timeout, interval=0.05)

    async def stop(self) -> None:
        if self.pid is None:
            return
        subprocess.run([TMUX, "-S", self.socket, "kill-server"], env=self.env, capture_output=True)
        for _ in range(100):
            if not pid_alive(self.pid):
                return
            await sleep(0.05)
        os.kill(self.pid, signal.SIGKILL)


class OpenSSHThroughTunnelTests(unittest.TestCase):
    timeout = 120

    def setUp(self) -> None:
        if SSH is None or SFTP is None:
            raise unittest.SkipTest("openssh-client is not installed (.ci/run installs it)")

    async def test_interactive_session_under_tmux(self) -> None:
        if TMUX is None:
            raise unittest.SkipTest("tmux is not installed (.ci/run installs it)")
        d, alice, _agent = await workspace(self)
        config = await ssh_config(d, alice)
        tmux = Tmux(self, os.path.join(d.dir, "tmux.sock"), user_env(d, alice))
        tmux.start("cstc", f"{SSH} -F {config} coder.box", 80, 24)
        # The shell's first prompt (root's "#" or a user's "$"), then one we can recognise: typed
        # as 'cs''tc> ' so that the echoed command line never matches it (capture-pane drops the
        # trailing blank).
        await wait_until(lambda: any(line.rstrip().endswith(("#", "$")) for line in tmux.screen("cstc").splitlines()),
                         lambda: f"the shell's first prompt:\n{tmux.screen('cstc')}", timeout=60, interval=0.05)
        tmux.keys("cstc", "PS1='cs''tc> '")
        await tmux.showing("cstc", "cstc>")
        tmux.keys("cstc", 'echo "tty=$(tty) term=$TERM size=$(stty size)"')
        term = tmux.tmux("show-options", "-gv", "default-terminal").strip()
        screen = await tmux.showing("cstc", "size=24 80")
        self.assertRegex(screen, rf"tty=/dev/pts/\d+ term={term} size=24 80")
        # A window change travels as an SSH window-change request to the agent's PTY.
        tmux.tmux("resize-window", "-t", "cstc", "-x", "100", "-y", "30")
        tmux.keys("cstc", "echo size=$(stty size)")
        await tmux.showing("cstc", "size=30 100")
        tmux.keys("cstc", "exit 5")

        def pane() -> str:
            return tmux.tmux("display-message", "-p", "-t", "cstc", "#{pane_dead} #{pane_dead_status}").strip()

        await wait_until(lambda: pane() == "1 5",
                         lambda: f"ssh to exit with status 5 (pane dead, status: {pane()!r}); the screen:\n"
                                 f"{tmux.screen('cstc')}", interval=0.05)

    async def sftp_both_ways(self, d: object, alice: object, config: str, **env: str) -> None:
        """put then get 10 MiB with ``sftp -b``; both copies byte-exact."""
        data = os.urandom(SFTP_SIZE)
        src, up, down = (os.path.join(alice.home, n) for n in ("src.bin", "up.bin", "down.bin"))
        with open(src, "wb") as f:
            f.write(data)
        batch = os.path.join(alice.home, "batch")
        with open(batch, "w") as f:
            f.write(f"put {src} {up}\nget {up} {down}\n")
        out, err, code = await utils.getProcessOutputAndValue(
            SFTP, ["-F", config, "-q", "-b", batch, "coder.box"], env=user_env(d, alice, **env), path=alice.home)
        self.assertEqual(code, 0, err.decode())
        digest = hashlib.sha256(data).hexdigest()
        for path in (up, down):
            with open(path, "rb") as f:
                self.assertEqual(hashlib.sha256(f.read()).hexdigest(), digest, path)

    async def test_sftp_10_mib_both_ways(self) -> None:
        d, alice, _agent = await workspace(self)
        config = await ssh_config(d, alice)
        before = await relayed_bytes(d, alice)
        await self.sftp_both_ways(d, alice, config)
        # Direct: at most the first packets (before the path is trusted) went through DERP too.
        self.assertLess(await relayed_bytes(d, alice) - before, SFTP_SIZE)

    async def test_relayed_with_disable_direct_connections(self) -> None:
        """The client refuses direct paths (the deployment allows them): everything goes through
        the embedded DERP relay, for ssh via config-ssh, sftp and ``coderstack ssh``."""
        d, alice, _agent = await workspace(self)
        config = await ssh_config(d, alice)
        relayed = await relayed_bytes(d, alice)
        # OpenSSH runs the ProxyCommand with its own environment: the variable reaches our CLI.
        relay_env = {"CODER_DISABLE_DIRECT_CONNECTIONS": "true"}
        await self.sftp_both_ways(d, alice, config, **relay_env)
        after_sftp = await relayed_bytes(d, alice)
        self.assertGreater(after_sftp - relayed, 2 * SFTP_SIZE)
        out, err, code = await utils.getProcessOutputAndValue(
            SSH, ["-F", config, "coder.box", "head -c 1048576 /dev/zero | wc -c; exit 4"],
            env=user_env(d, alice, **relay_env), path=alice.home)
        self.assertEqual((code, out.decode().strip()), (4, "1048576"), err.decode())
        after_ssh = await relayed_bytes(d, alice)
        self.assertGreater(after_ssh - after_sftp, 0)
        # The flag on `coderstack ssh` must reach the ProxyCommand it gives OpenSSH.
        code, out, err = await alice.run("ssh", "box", "--disable-direct-connections", "--",
                                         "head -c 2097152 /dev/zero")
        self.assertEqual((code, len(out)), (0, 2 << 20), err)
        self.assertGreater(await relayed_bytes(d, alice) - after_ssh, 2 << 20)
