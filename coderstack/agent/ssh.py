"""The agent's SSH server (twisted.conch), listened on tunnel ports 1 and 22.

Who may log in: anyone whose bytes reach this server. The server only listens on the agent's
tunnel address, and a peer can only send to that address after the coordinator authorized the
tunnel (the user owns the workspace). So, like Coder's agent, we ask for no password: the
``none`` method succeeds for any user name, and so does ``publickey`` with any key whose
signature verifies (some clients never try ``none``). Every session runs as the agent's own
OS user whatever name the client gave: the agent never switches user (it usually cannot).

What a session offers (RFC 4254): ``shell`` and ``exec`` with or without a PTY (``pty-req``
terminal modes, ``window-change`` -> TIOCSWINSZ, which also delivers SIGWINCH), ``env``
(every variable accepted, as Coder's agent does), ``exit-status``/``exit-signal``, the ``sftp``
subsystem, ``direct-tcpip`` (``ssh -L``) and agent forwarding (``auth-agent-req@openssh.com``:
a private unix socket in a 0700 temporary directory is exported as SSH_AUTH_SOCK; each
connection to it opens an ``auth-agent@openssh.com`` channel back to the client).

The host key is an Ed25519 key made once and kept as ``<data_dir>/ssh_host_ed25519_key``
(OpenSSH private-key format, mode 0600), so clients see the same key across restarts.
"""

from __future__ import annotations

import fcntl
import os
import pty
import pwd
import shutil
import struct
import tempfile
import termios
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, cast

from twisted.conch import error as conch_error
from twisted.conch.avatar import ConchUser
from twisted.conch.interfaces import IConchUser, ISession, ISessionSetEnv
from twisted.conch.ssh import (
    channel,
    connection,
    factory,
    filetransfer,
    forwarding,
    keys,
    session,
    userauth,
)
from twisted.conch.ssh.filetransfer import ISFTPServer
from twisted.conch.unix import SFTPServerForUnixConchUser
from twisted.cred import checkers, credentials, portal
from twisted.cred.portal import Portal
from twisted.internet import defer, protocol
from twisted.logger import Logger
from twisted.python import components
from twisted.python.filepath import FilePath
from zope.interface import implementer

from coderstack.agent.session_env import SessionEnvironment, motd_for_login
from coderstack.twistedtypes import provides, stream_transport

log = Logger()

HOST_KEY_NAME = "ssh_host_ed25519_key"


def load_or_create_host_key(data_dir: str | os.PathLike[str]) -> keys.Key:
    """The agent's Ed25519 host key, generated on first use and stored 0600 in ``data_dir``."""
    from cryptography.hazmat.primitives.asymmetric import ed25519

    path = Path(data_dir) / HOST_KEY_NAME
    try:
        return keys.Key.fromFile(str(path))
    except FileNotFoundError:
        pass
    Path(data_dir).mkdir(parents=True, exist_ok=True)
    key = keys.Key(ed25519.Ed25519PrivateKey.generate())
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.toString("openssh"))
    os.replace(tmp, path)  # atomic: a concurrent start sees a whole key or none
    return key


# --- authentication --------------------------------------------------------------------------


class _NoneAuthServer(userauth.SSHUserAuthServer):
    """Userauth that also offers ``none`` (see the module docstring for why that is safe)."""

    interfaceToMethod = {
        **userauth.SSHUserAuthServer.interfaceToMethod,
        credentials.IAnonymous: b"none",
    }

    def auth_none(self, packet: bytes) -> defer.Deferred[Any]:
        return self.portal.login(credentials.Anonymous(), None, IConchUser)


@implementer(checkers.ICredentialsChecker)
class AnyVerifiedKey:
    """Accept any public key the client proves it holds (the tunnel already authorized it)."""

    credentialInterfaces = (credentials.ISSHPrivateKey,)

    def requestAvatarId(self, creds: Any) -> defer.Deferred[bytes]:
        try:
            key = keys.Key.fromString(creds.blob)
        except keys.BadKeyError:
            return defer.fail(conch_error.UnauthorizedLogin("bad key"))
        if creds.signature is None:
            return defer.fail(conch_error.ValidPublicKey())
        if not key.verify(creds.signature, creds.sigData):
            return defer.fail(conch_error.UnauthorizedLogin("bad signature"))
        return defer.succeed(creds.username)


class SessionReactor(Protocol):
    """What sessions need of the reactor (``IReactorProcess``, ``IReactorUNIX``)."""

    def spawnProcess(self, processProtocol: protocol.ProcessProtocol, executable: str, args: list[str],
                     env: dict[str, str] | None = None, path: str | None = None,
                     uid: int | None = None, gid: int | None = None,
                     usePTY: bool | tuple[int, int, str] = False) -> Any: ...

    def listenUNIX(self, address: str, factory: protocol.Factory, backlog: int = 50,
                   mode: int = 0o666, wantPID: bool = False) -> Any: ...


@implementer(portal.IRealm)
class AgentRealm:
    def __init__(self, reactor: SessionReactor | None = None, env: dict[str, str] | None = None,
                 session_env: SessionEnvironment | None = None):
        self.reactor = reactor
        self.env = env
        self.session_env = session_env

    def requestAvatar(self, avatar_id: Any, mind: Any, *interfaces: Any) -> Any:
        if IConchUser not in interfaces:
            raise NotImplementedError("only SSH")
        user = AgentUser(self.reactor, self.env, self.session_env)
        return IConchUser, user, user.logout


# Never hand the agent's own secrets (or its own agent socket) to the people who log in.
PRIVATE_ENV = ("CODER_AGENT_TOKEN", "CODER_AGENT_TOKEN_FILE", "CODER_SESSION_TOKEN", "SSH_AUTH_SOCK")


def session_base_env(env: dict[str, str] | Any) -> dict[str, str]:
    return {k: v for k, v in dict(env).items() if k not in PRIVATE_ENV}


# --- the avatar -------------------------------------------------------------------------------


class AgentUser(ConchUser):
    """The agent's own OS user; shells, commands and SFTP run with the agent's identity."""

    def __init__(self, reactor: SessionReactor | None = None, env: dict[str, str] | None = None,
                 session_env: SessionEnvironment | None = None):
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = cast(SessionReactor, default_reactor)
        self.reactor: SessionReactor = reactor
        entry = pwd.getpwuid(os.getuid())
        self.username = entry.pw_name
        self.home = entry.pw_dir if os.path.isdir(entry.pw_dir) else "/"
        self.shell = entry.pw_shell if os.path.exists(entry.pw_shell or "") else "/bin/sh"
        self.base_env = session_base_env(os.environ if env is None else env)
        # The workspace's environment and directory (the manifest's), when the agent has one.
        self.session_env = session_env
        self.agent_sock_dir: str | None = None
        self.agent_port: Any = None
        self.channelLookup.update({
            b"session": AgentSessionChannel,
            b"direct-tcpip": open_direct_tcpip,
        })
        self.subsystemLookup.update({b"sftp": filetransfer.FileTransferServer})

    def environment(self) -> dict[str, str]:
        """The environment a session starts from (before the client's ``env`` requests)."""
        if self.session_env is None:
            return dict(self.base_env)
        return self.session_env.environment(self.base_env)

    def workdir(self) -> str:
        return self.home if self.session_env is None else self.session_env.directory(self.home)

    # SFTPServerForUnixConchUser asks these of its avatar.
    def getHomeDir(self) -> FilePath[str]:
        return FilePath(self.home)

    def _runAsUser(self, f: Any, *args: Any, **kw: Any) -> Any:
        # We already are the user: run the call(s) as they are (conch's version switches euid).
        try:
            calls = iter(f)
        except TypeError:
            calls = iter([(f, args, kw)])
        result = None
        for call in calls:
            func = call[0]
            result = func(*(call[1] if len(call) > 1 else ()), **(call[2] if len(call) > 2 else {}))
        return result

    def logout(self) -> None:
        port, sock_dir = self.agent_port, self.agent_sock_dir
        self.agent_port = self.agent_sock_dir = None
        if sock_dir is None:
            return
        # The unix port unlinks its socket when it has stopped: remove the directory after that.
        stopped = defer.maybeDeferred(port.stopListening) if port is not None else defer.succeed(None)
        stopped.addBoth(lambda _: shutil.rmtree(sock_dir, ignore_errors=True))


# One channel carries at most a window per round trip: conch's default window (128 KiB) caps a
# channel at ~100 Mbit/s with a 10 ms RTT and ~20 Mbit/s at 50 ms. OpenSSH and Go's x/crypto/ssh
# (Coder's agent) offer 2 MiB; so do we, for sessions (exec, sftp) and ssh -L alike.
CHANNEL_WINDOW = 2 << 20


# --- ssh -L (direct-tcpip) ------------------------------------------------------------------------


class DirectTCPIPChannel(forwarding.SSHConnectForwardingChannel):
    """conch's forwarding channel plus EOF: conch drops the client's EOF, so a forwarded
    connection the client half-closed (or closed before the target answered) never ends."""

    eof_pending = False

    def eofReceived(self) -> None:
        if self.client:
            self._half_close()
        else:
            self.eof_pending = True

    def _setClient(self, client: Any) -> None:
        super()._setClient(client)
        if self.eof_pending:
            self._half_close()

    def _half_close(self) -> None:
        transport = self.client.transport
        if hasattr(transport, "loseWriteConnection"):
            transport.loseWriteConnection()
        else:
            transport.loseConnection()


def open_direct_tcpip(remoteWindow: int, remoteMaxPacket: int, data: bytes, avatar: Any) -> DirectTCPIPChannel:
    target, _origin = forwarding.unpackOpen_direct_tcpip(data)
    return DirectTCPIPChannel(target, localWindow=CHANNEL_WINDOW, remoteWindow=remoteWindow,
                              remoteMaxPacket=remoteMaxPacket, avatar=avatar)


# --- sessions ---------------------------------------------------------------------------------


@implementer(ISession, ISessionSetEnv)
class AgentSession:
    """shell/exec with optional PTY for one session channel."""

    def __init__(self, avatar: AgentUser):
        self.avatar = avatar
        self.env: dict[str, str] = {}
        self.pty_fds: tuple[int, int, str] | None = None
        self.term = "xterm"
        self.win_size = (24, 80, 0, 0)
        self.modes: list[tuple[int, int]] = []
        self.process: Any = None

    # ISessionSetEnv
    def setEnv(self, name: bytes, value: bytes) -> None:
        self.env[name.decode("utf-8", "replace")] = value.decode("utf-8", "replace")

    # ISession
    def getPty(self, term: bytes, windowSize: tuple[int, int, int, int], modes: Any) -> None:
        self.term = term.decode("ascii", "replace") or "xterm"
        self.win_size = windowSize
        self.modes = list(modes)
        master, slave = pty.openpty()
        self.pty_fds = (master, slave, os.ttyname(slave))
        _set_winsize(master, windowSize)

    def windowChanged(self, newWindowSize: tuple[int, int, int, int]) -> None:
        self.win_size = newWindowSize
        if self.pty_fds is not None:
            fd = self.process.fileno() if self.process is not None else self.pty_fds[0]
            _set_winsize(fd, newWindowSize)

    def openShell(self, proto: Any) -> None:
        shell = self.avatar.shell
        if self.avatar.session_env is not None:
            motd = motd_for_login(self.avatar.session_env.motd_path, self.avatar.home)
            if motd:
                if self.pty_fds is not None:
                    motd = motd.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
                proto.session.write(motd)
        self._spawn(proto, shell, ["-" + os.path.basename(shell)])

    def execCommand(self, proto: Any, command: bytes) -> None:
        shell = self.avatar.shell
        self._spawn(proto, shell, [shell, "-c", command.decode("utf-8", "surrogateescape")])

    def eofReceived(self) -> None:
        if self.process is not None and self.pty_fds is None:
            self.process.closeStdin()

    def closed(self) -> None:
        if self.process is not None:
            try:
                self.process.signalProcess("HUP")
            except Exception:  # already gone
                pass
            self.process.loseConnection()

    def _environment(self, proto: Any) -> dict[str, str]:
        env = self.avatar.environment()
        env.update(self.env)
        env.update(USER=self.avatar.username, LOGNAME=self.avatar.username,
                   HOME=self.avatar.home, SHELL=self.avatar.shell)
        transport = proto.session.conn.transport.transport
        peer, host = transport.getPeer(), transport.getHost()
        peer_host, peer_port = getattr(peer, "host", "0.0.0.0"), getattr(peer, "port", 0)
        host_host, host_port = getattr(host, "host", "0.0.0.0"), getattr(host, "port", 0)
        env["SSH_CLIENT"] = f"{peer_host} {peer_port} {host_port}"
        env["SSH_CONNECTION"] = f"{peer_host} {peer_port} {host_host} {host_port}"
        if self.pty_fds is not None:
            env["TERM"] = self.term
            env["SSH_TTY"] = self.pty_fds[2]
        if self.avatar.agent_sock_dir:
            env["SSH_AUTH_SOCK"] = os.path.join(self.avatar.agent_sock_dir, "agent.sock")
        return env

    def _spawn(self, proto: Any, executable: str, argv: list[str]) -> None:
        env = self._environment(proto)
        self.process = self.avatar.reactor.spawnProcess(
            proto, executable, argv, env, self.avatar.workdir(), usePTY=self.pty_fds or False,
        )
        if self.pty_fds is not None:
            _set_winsize(self.process.fileno(), self.win_size)
            _apply_modes(self.process.fileno(), self.modes)
        # Interactive keystrokes should not wait for Nagle.
        transport = proto.session.conn.transport.transport
        if hasattr(transport, "setTcpNoDelay"):
            try:
                transport.setTcpNoDelay(True)
            except OSError:
                pass


def _set_winsize(fd: int, size: tuple[int, int, int, int]) -> None:
    rows, cols, xpixel, ypixel = size
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("4H", rows, cols, xpixel, ypixel))


def _apply_modes(fd: int, modes: list[tuple[int, int]]) -> None:
    """Apply RFC 4254 §8 terminal modes the client sent (unknown opcodes are ignored)."""
    from twisted.conch import ttymodes

    if not modes:
        return
    # Opcode -> termios control character name, or (attribute index, flag name); mypy would
    # read the mixed values as Sequence[int | str].
    table = cast(dict[int, str | tuple[int, str]], ttymodes.TTYMODES)
    attr = termios.tcgetattr(fd)
    for opcode, value in modes:
        name = table.get(opcode)
        if name is None:
            continue
        if isinstance(name, tuple):
            index, flag_name = name
            flag = getattr(termios, flag_name, None)
            if flag is None:
                continue
            attr[index] = attr[index] | flag if value else attr[index] & ~flag
        elif name in ("ISPEED", "OSPEED"):
            speed = getattr(termios, f"B{value}", None)
            if speed is not None:
                attr[4 if name == "ISPEED" else 5] = speed
        else:
            cc = getattr(termios, name, None)
            if cc is not None and value < 256:
                attr[6][cc] = bytes((value,))
    termios.tcsetattr(fd, termios.TCSANOW, attr)


components.registerAdapter(AgentSession, AgentUser, ISession, ISessionSetEnv)
components.registerAdapter(SFTPServerForUnixConchUser, AgentUser, ISFTPServer)


class AgentSessionChannel(session.SSHSession):
    """A session channel that also understands OpenSSH agent forwarding."""

    #: An EOF held back while output waits for window (:class:`AgentSSHConnection`).
    eof_after_flush = False

    def __init__(self, *args: Any, **kw: Any) -> None:
        kw.setdefault("localWindow", CHANNEL_WINDOW)
        super().__init__(*args, **kw)

    def _send_held_eof(self) -> None:
        if self.eof_after_flush and not self.buf and not self.extBuf and self.conn is not None:
            self.eof_after_flush = False
            self.conn.sendEOF(self)

    def addWindowBytes(self, data: int) -> None:
        super().addWindowBytes(data)  # sends what it can; may close (after the EOF, below)
        self._send_held_eof()

    def loseConnection(self) -> None:
        # conch closes once the queue is empty: the held EOF must go out first.
        self._send_held_eof()
        super().loseConnection()

    def eofReceived(self) -> None:
        # conch hands EOF to the session object whenever one was made (an ``env`` request makes
        # one), but a subsystem (sftp) has no process to close: then the channel must close.
        session_obj = self.session
        conn = self.conn
        if (conn is not None and session_obj is not None
                and getattr(session_obj, "process", None) is None and self.client):
            conn.sendClose(self)
            return
        super().eofReceived()

    def _agent_forwarding_request(self, data: bytes) -> int:
        avatar = cast(AgentUser, self.avatar)  # AgentRealm makes every avatar an AgentUser
        conn = self.conn
        if conn is None:  # not open: nothing to forward for
            return 0
        if avatar.agent_sock_dir is None:
            sock_dir = tempfile.mkdtemp(prefix="coderstack-agent-")  # 0700
            path = os.path.join(sock_dir, "agent.sock")
            try:
                avatar.agent_port = avatar.reactor.listenUNIX(
                    path, _AgentSocketFactory(conn), mode=0o600)
            except Exception:
                log.failure("agent forwarding socket")
                shutil.rmtree(sock_dir, ignore_errors=True)
                return 0
            avatar.agent_sock_dir = sock_dir
        return 1


# conch dispatches channel requests by name with "-" replaced by "_"; the name has "@" and ".".
setattr(AgentSessionChannel, "request_auth_agent_req@openssh.com",
        AgentSessionChannel._agent_forwarding_request)


class _AgentChannel(channel.SSHChannel):
    """Channel ``auth-agent@openssh.com`` carrying one local agent-socket connection."""

    name = b"auth-agent@openssh.com"

    def __init__(self, client: _AgentSocketProtocol, **kw: Any):
        super().__init__(**kw)
        self.client = client

    def channelOpen(self, specificData: bytes) -> None:
        self.client.channel_ready(self)

    def openFailed(self, reason: Any) -> None:
        stream_transport(self.client).loseConnection()

    def dataReceived(self, data: bytes) -> None:
        stream_transport(self.client).write(data)

    def eofReceived(self) -> None:
        stream_transport(self.client).loseConnection()

    def closed(self) -> None:
        stream_transport(self.client).loseConnection()


class _AgentSocketProtocol(protocol.Protocol):
    def __init__(self, conn: connection.SSHConnection):
        self.conn = conn
        self.channel: _AgentChannel | None = None
        self.pending: list[bytes] = []

    def connectionMade(self) -> None:
        self.conn.openChannel(_AgentChannel(self, conn=self.conn))

    def channel_ready(self, chan: _AgentChannel) -> None:
        self.channel = chan
        for chunk in self.pending:
            chan.write(chunk)
        self.pending = []

    def dataReceived(self, data: bytes) -> None:
        if self.channel is None:
            self.pending.append(data)
        else:
            self.channel.write(data)

    def connectionLost(self, reason: Any = None) -> None:
        if self.channel is not None:
            self.channel.loseConnection()


class _AgentSocketFactory(protocol.Factory):
    def __init__(self, conn: connection.SSHConnection):
        self.conn = conn

    def buildProtocol(self, addr: Any) -> _AgentSocketProtocol:
        return _AgentSocketProtocol(self.conn)


# --- factory ---------------------------------------------------------------------------------


class AgentSSHConnection(connection.SSHConnection):
    """conch sends a session's EOF as soon as the command's output closes, even while output is
    still queued for lack of window; the client drops whatever arrives after EOF, so the tail of
    a large output was lost (``ssh ws 'cat' < big``). Hold the EOF until the queue is sent
    (:meth:`AgentSessionChannel.addWindowBytes`)."""

    def sendEOF(self, channel: Any) -> None:
        if getattr(channel, "buf", b"") or getattr(channel, "extBuf", []):
            channel.eof_after_flush = True
            return
        super().sendEOF(channel)


class AgentSSHFactory(factory.SSHFactory):
    services = {
        b"ssh-userauth": _NoneAuthServer,
        b"ssh-connection": AgentSSHConnection,
    }
    key_dir: Callable[[], str | os.PathLike[str]] | None = None
    portal: Portal

    def getPublicKeys(self) -> dict[bytes, keys.Key]:
        return {b"ssh-ed25519": self._host_key().public()}

    def getPrivateKeys(self) -> dict[bytes, keys.Key]:
        return {b"ssh-ed25519": self._host_key()}

    def _host_key(self) -> keys.Key:
        assert self.key_dir is not None
        return load_or_create_host_key(self.key_dir())


def ssh_factory(data_dir: str | os.PathLike[str] | Callable[[], str | os.PathLike[str]], reactor: Any = None,
                env: dict[str, str] | None = None,
                session_env: SessionEnvironment | None = None) -> factory.SSHFactory:
    """An SSH server factory for the agent; listen it on tunnel ports 1 and 22.

    ``env`` is the base environment of sessions (default: the agent's own ``os.environ``);
    ``session_env`` adds the workspace's (manifest environment, ``CODER_*``, the ``coder``
    command on PATH, the start directory and the motd of login shells).
    """
    p = Portal(provides(portal.IRealm, AgentRealm(reactor, env, session_env)))
    p.registerChecker(provides(checkers.ICredentialsChecker, checkers.AllowAnonymousAccess()))
    p.registerChecker(provides(checkers.ICredentialsChecker, AnyVerifiedKey()))
    f = AgentSSHFactory()
    f.portal = p
    if callable(data_dir):
        # The directory is known later (the agent's own, once its manifest names it): the
        # host key is loaded when the factory starts listening.
        f.key_dir = data_dir
    else:
        host_key = load_or_create_host_key(data_dir)
        f.publicKeys = {b"ssh-ed25519": host_key.public()}
        f.privateKeys = {b"ssh-ed25519": host_key}
    return f


__all__ = ["ssh_factory", "load_or_create_host_key", "AgentUser", "AgentSession", "HOST_KEY_NAME"]
