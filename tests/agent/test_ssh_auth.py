"""Agent SSH authentication: ``none`` and any key whose signature verifies (OpenSSH always
succeeds with ``none`` first, so the key path is tested here directly)."""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric import ed25519
from twisted.conch import error
from twisted.conch.ssh import keys
from twisted.cred import credentials
from twisted.trial import unittest

from coderstack.agent.ssh import AnyVerifiedKey


class AnyVerifiedKeyTests(unittest.TestCase):
    def setUp(self):
        self.key = keys.Key(ed25519.Ed25519PrivateKey.generate())
        self.blob = self.key.public().blob()

    def creds(self, sig_data, signature):
        return credentials.SSHPrivateKey(b"anyone", b"ssh-ed25519", self.blob, sig_data, signature)

    def test_signed_request_is_accepted(self):
        data = b"session id and request"
        got = self.successResultOf(AnyVerifiedKey().requestAvatarId(self.creds(data, self.key.sign(data))))
        self.assertEqual(got, b"anyone")

    def test_query_without_signature_says_key_is_acceptable(self):
        self.failureResultOf(AnyVerifiedKey().requestAvatarId(self.creds(None, None)), error.ValidPublicKey)

    def test_bad_signature_and_bad_blob_are_refused(self):
        other = keys.Key(ed25519.Ed25519PrivateKey.generate())
        self.failureResultOf(AnyVerifiedKey().requestAvatarId(self.creds(b"x", other.sign(b"x"))),
                             error.UnauthorizedLogin)
        bad = credentials.SSHPrivateKey(b"anyone", b"ssh-ed25519", b"garbage", b"x", b"sig")
        self.failureResultOf(AnyVerifiedKey().requestAvatarId(bad), error.UnauthorizedLogin)


class SessionEnvTests(unittest.TestCase):
    def test_agent_secrets_do_not_reach_sessions(self):
        from coderstack.agent.ssh import AgentUser

        user = AgentUser(env={"PATH": "/bin", "CODER_AGENT_TOKEN": "secret", "CODER_SESSION_TOKEN": "s2",
                              "SSH_AUTH_SOCK": "/tmp/agent.sock", "LANG": "C.UTF-8"})
        self.assertEqual(user.base_env, {"PATH": "/bin", "LANG": "C.UTF-8"})
