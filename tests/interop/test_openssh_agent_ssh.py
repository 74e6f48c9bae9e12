"""The agent's conch SSH server against stock OpenSSH (ssh, sftp, ssh-agent) and tmux, on 127.0.0.1."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import tempfile

from twisted.internet import defer, reactor, threads, utils
from twisted.trial import unittest

from coderstack.agent.ssh import HOST_KEY_NAME, load_or_create_host_key, ssh_factory
from tests.support.waiting import wait_until, wait_until_blocking

SSH = shutil.which("ssh")
SFTP = shutil.which("sftp")
TMUX = shutil.which("tmux")


class OpenSSHAgentServerTests(unittest.TestCase):
    timeout = 60

    def setUp(self) -> None:
        if SSH is None or SFTP is None:  # CI installs openssh-client
            raise unittest.SkipTest("openssh-client is not installed")
        self.dir = tempfile.mkdtemp(prefix="usercmds-ssh-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.port = reactor.listenTCP(0, ssh_factory(os.path.join(self.dir, "data")), interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        self.opts = [
            "-p", str(self.port.getHost().port), "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes", "-o", "LogLevel=ERROR",
        ]

    def ssh(self, *args: str, env: dict[str, str] | None = None) -> defer.Deferred:
        return utils.getProcessOutputAndValue(SSH, [*self.opts, *args], env=env or dict(os.environ))

    @defer.inlineCallbacks
    def test_exec_output_and_exit_status(self):
        out, err, code = yield self.ssh("127.0.0.1", "echo ok; echo oops >&2; exit 3")
        self.assertEqual((out, err, code), (b"ok\n", b"oops\n", 3))

    @defer.inlineCallbacks
    def test_environment_setenv_and_sendenv(self):
        env = dict(os.environ, USERCMDS_SENT="from-client")
        out, _err, code = yield self.ssh(
            "-o", "SetEnv=USERCMDS_SET=hello", "-o", "SendEnv=USERCMDS_SENT", "127.0.0.1",
            'echo "$USERCMDS_SET $USERCMDS_SENT"; test -z "$SSH_TTY" && echo notty; echo "$SSH_CONNECTION"',
            env=env,
        )
        lines = out.decode().splitlines()
        self.assertEqual(code, 0)
        self.assertEqual(lines[0], "hello from-client")
        self.assertEqual(lines[1], "notty")
        self.assertTrue(lines[2].startswith("127.0.0.1 "), lines[2])
        self.assertTrue(lines[2].endswith(f" 127.0.0.1 {self.port.getHost().port}"), lines[2])

    @defer.inlineCallbacks
    def test_exec_with_pty(self):
        out, _err, code = yield self.ssh("-tt", "127.0.0.1", "tty; echo $TERM; exit 5")
        lines = out.decode().replace("\r", "").splitlines()
        self.assertEqual(code, 5)
        self.assertTrue(lines[0].startswith("/dev/pts/"), lines)

    @defer.inlineCallbacks
    def test_stdin_reaches_command(self):
        path = os.path.join(self.dir, "stdin")
        with open(path, "wb") as f:
            f.write(b"line one\nline two\n")
        with open(path, "rb") as stdin:
            proc = subprocess.Popen([SSH, *self.opts, "127.0.0.1", "wc -l"], stdin=stdin, stdout=subprocess.PIPE)
        # communicate() blocks: run it in a thread so the reactor keeps serving the session.
        out, _ = yield threads.deferToThread(proc.communicate)
        self.assertEqual(out.strip(), b"2")

    @defer.inlineCallbacks
    def test_sftp_10_mib_byte_exact(self):
        src = os.path.join(self.dir, "src.bin")
        data = os.urandom(10 * 1024 * 1024)
        with open(src, "wb") as f:
            f.write(data)
        up, down = os.path.join(self.dir, "up.bin"), os.path.join(self.dir, "down.bin")
        batch = os.path.join(self.dir, "batch")
        with open(batch, "w") as f:
            f.write(f"put {src} {up}\nget {up} {down}\n")
        sftp_opts = ["-P" if o == "-p" else o for o in self.opts]
        out, err, code = yield utils.getProcessOutputAndValue(SFTP, ["-q", "-b", batch, *sftp_opts, "127.0.0.1"])
        self.assertEqual(code, 0, err)
        with open(up, "rb") as f:
            self.assertEqual(f.read(), data)
        with open(down, "rb") as f:
            self.assertEqual(f.read(), data)

    @defer.inlineCallbacks
    def test_agent_forwarding(self):
        agent_dir = tempfile.mkdtemp(prefix="usercmds-agent-")
        self.addCleanup(shutil.rmtree, agent_dir, True)
        sock = os.path.join(agent_dir, "sock")
        agent = subprocess.Popen(["ssh-agent", "-D", "-a", sock], stdout=subprocess.DEVNULL)
        self.addCleanup(agent.wait)
        self.addCleanup(agent.terminate)
        key = os.path.join(agent_dir, "id")
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "usercmds-test", "-f", key], check=True)
        yield defer.ensureDeferred(wait_until(lambda: os.path.exists(sock), "ssh-agent's socket",
                                              timeout=5, interval=0.05))
        env = dict(os.environ, SSH_AUTH_SOCK=sock)
        yield utils.getProcessValue("ssh-add", ["-q", key], env=env)
        out, _err, code = yield self.ssh("-A", "127.0.0.1", 'test -S "$SSH_AUTH_SOCK" && ssh-add -l', env=env)
        self.assertEqual(code, 0)
        self.assertIn(b"usercmds-test", out)
        out, _err, code = yield self.ssh("127.0.0.1", 'echo "[$SSH_AUTH_SOCK]"', env=env)
        self.assertEqual(out, b"[]\n")

    def test_host_key_kept_0600(self):
        data = os.path.join(self.dir, "data")
        path = os.path.join(data, HOST_KEY_NAME)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        self.assertEqual(load_or_create_host_key(data).fingerprint(),
                         load_or_create_host_key(data).fingerprint())

    @defer.inlineCallbacks
    def test_interactive_pty_under_tmux(self):
        if TMUX is None:
            raise unittest.SkipTest("tmux is not installed")
        sock = f"usercmds-{os.getpid()}-{id(self)}"
        status = os.path.join(self.dir, "status")
        cmd = " ".join([SSH, "-tt", *self.opts, "127.0.0.1"]) + f"; echo $? > {status}"
        subprocess.run([TMUX, "-L", sock, "-f", "/dev/null", "new-session", "-d", "-s", "t",
                        "-x", "80", "-y", "24", cmd], check=True)
        self.addCleanup(subprocess.run, [TMUX, "-L", sock, "kill-server"], stderr=subprocess.DEVNULL)

        def keys(text):
            subprocess.run([TMUX, "-L", sock, "send-keys", "-t", "t", text, "Enter"], check=True)

        def screen():
            return subprocess.run([TMUX, "-L", sock, "capture-pane", "-p", "-t", "t"],
                                  capture_output=True, text=True).stdout

        def on_screen(needle):
            return defer.ensureDeferred(wait_until(
                lambda: needle in screen(), lambda: f"{needle!r} on the screen:\n{screen()}",
                interval=0.05))

        def exit_status():
            return os.path.exists(status) and open(status).read().strip()

        keys("PS1='usercmds$ '")
        yield on_screen("usercmds$")
        keys("echo size=$(stty size)")
        yield on_screen("size=24 80")
        subprocess.run([TMUX, "-L", sock, "resize-window", "-t", "t", "-x", "100", "-y", "30"], check=True)
        keys("echo size=$(stty size)")
        yield on_screen("size=30 100")
        keys("exit 7")
        yield defer.ensureDeferred(wait_until(exit_status, "the ssh exit status", interval=0.05))
        self.assertEqual(open(status).read().strip(), "7")


class OpenSSHForwardingTests(unittest.TestCase):
    """``ssh -L`` through the agent (direct-tcpip), including the client's half-close."""

    timeout = 30

    def setUp(self) -> None:
        if SSH is None:  # CI installs openssh-client
            raise unittest.SkipTest("openssh-client is not installed")
        self.dir = tempfile.mkdtemp(prefix="usercmds-fwd-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.port = reactor.listenTCP(0, ssh_factory(os.path.join(self.dir, "data")), interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)

    @defer.inlineCallbacks
    def test_forward_carries_data_and_half_close(self):
        sink = socket.socket()
        sink.bind(("127.0.0.1", 0))
        sink.listen(2)
        self.addCleanup(sink.close)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            local = s.getsockname()[1]
        proc = subprocess.Popen([SSH, "-p", str(self.port.getHost().port), "-o", "StrictHostKeyChecking=no",
                                 "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes", "-o", "LogLevel=ERROR",
                                 "-N", "-L", f"127.0.0.1:{local}:127.0.0.1:{sink.getsockname()[1]}", "127.0.0.1"])
        self.addCleanup(proc.wait)
        self.addCleanup(proc.terminate)

        def forward_open():
            try:
                return socket.create_connection(("127.0.0.1", local))
            except OSError:
                return None

        def exchange():
            # (In a thread: a blocking wait is fine here.)
            client = wait_until_blocking(forward_open, "ssh to listen for the forward", timeout=10,
                                         interval=0.05)
            client.settimeout(10)
            sink.settimeout(10)
            payload = os.urandom(1 << 20)
            client.sendall(payload)
            client.shutdown(socket.SHUT_WR)  # EOF must reach the target
            conn, _ = sink.accept()
            got = b""
            while True:
                chunk = conn.recv(1 << 16)
                if not chunk:
                    break
                got += chunk
            conn.sendall(b"reply after eof")
            conn.close()
            answer = b""
            while True:
                chunk = client.recv(1024)
                if not chunk:
                    break
                answer += chunk
            client.close()
            return got == payload, answer
        same, answer = yield threads.deferToThread(exchange)
        self.assertTrue(same)
        self.assertEqual(answer, b"reply after eof")
