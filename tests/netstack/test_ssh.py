"""Conch (SSH) over netstack endpoints: what the agent will run on its tunnel address."""

from cryptography.hazmat.primitives.asymmetric import ec
from twisted.conch.avatar import ConchUser
from twisted.conch.ssh import channel, common, connection, factory, keys, transport, userauth
from twisted.cred import checkers, portal
from twisted.internet import defer, protocol, task
from twisted.trial import unittest
from zope.interface import implementer

from coderstack.netstack.endpoints import Netstack, NetstackClientEndpoint, NetstackServerEndpoint
from coderstack.netstack.testing import NetstackPair


class ExecEcho(channel.SSHChannel):
    """Server session channel: ``exec CMD`` answers ``ran: CMD`` and closes."""

    name = b"session"

    def request_exec(self, data):
        command = common.getNS(data)[0]
        self.write(b"ran: " + command)
        self.conn.sendEOF(self)
        self.loseConnection()
        return 1


class Avatar(ConchUser):
    def __init__(self, username):
        super().__init__()
        self.username = username
        self.channelLookup[b"session"] = ExecEcho


@implementer(portal.IRealm)
class Realm:
    def requestAvatar(self, avatar_id, mind, *interfaces):
        return interfaces[0], Avatar(avatar_id), lambda: None


class ClientTransport(transport.SSHClientTransport):
    def verifyHostKey(self, host_key, fingerprint):
        self.factory.host_key = host_key
        return defer.succeed(True)

    def connectionSecure(self):
        self.requestService(Auth(b"coder", ClientConnection(self.factory.result)))


class Auth(userauth.SSHUserAuthClient):
    def getPassword(self, prompt=None):
        return defer.succeed(b"hunter2")

    def getPublicKey(self):
        return None


class ClientConnection(connection.SSHConnection):
    def __init__(self, result):
        super().__init__()
        self.result = result

    def serviceStarted(self):
        self.openChannel(Exec(conn=self))


class Exec(channel.SSHChannel):
    name = b"session"

    def channelOpen(self, data):
        self.got = b""
        self.conn.sendRequest(self, b"exec", common.NS(b"uptime"), wantReply=False)

    def dataReceived(self, data):
        self.got += data

    def closed(self):
        self.conn.result.callback(self.got)
        self.conn.transport.loseConnection()


class SSHTests(unittest.TestCase):
    def test_exec_over_netstack(self):
        clock = task.Clock()
        pair = NetstackPair(clock, lambda addr, send: Netstack(addr, send, clock))
        host_key = keys.Key(ec.generate_private_key(ec.SECP256R1()))
        server = factory.SSHFactory()
        server.portal = portal.Portal(Realm(), [checkers.InMemoryUsernamePasswordDatabaseDontUse(coder=b"hunter2")])
        server.publicKeys = {b"ecdsa-sha2-nistp256": host_key.public()}
        server.privateKeys = {b"ecdsa-sha2-nistp256": host_key}
        port = []
        NetstackServerEndpoint(pair.b, 22).listen(server).addCallback(port.append)
        client = protocol.ClientFactory.forProtocol(ClientTransport)
        client.result = defer.Deferred()
        out = []
        client.result.addCallback(out.append)
        NetstackClientEndpoint(pair.a, "fd7a:115c:a1e0::b", 22).connect(client)
        pair.pump(until=lambda: out)
        self.assertEqual(out, [b"ran: uptime"])
        self.assertEqual(client.host_key, host_key.public().blob())
        port[0].stopListening()
