"""``coderstack ping`` and ``coderstack ssh`` through NATs: the real server, agent and CLI
(tests/netlab/user_lab.py; needs root for the namespaces — CI runs as root).

The magicsock NAT scenarios (issue 6) with what users actually run: the agent behind NAT A, the
CLI behind NAT B, ``twistd coderstack-server`` with its DERP and STUN on the wan.
"""

from __future__ import annotations

import os
import re
import shutil

from twisted.trial import unittest

from tests.netlab.magicsock_lab import LAB_WAIT, sleep
from tests.netlab.user_lab import NAT_IPS, REGION_NAME, WORKSPACE, Session, UserLab, available
from tests.support.waiting import wait_until

WS = WORKSPACE
P2P_PONG = re.compile(rf"^pong from {WS} p2p via ([0-9.]+):(\d+) in [0-9.]+(µs|ms|s)$", re.M)
DERP_PONG = re.compile(rf"^pong from {WS} proxied via DERP\({re.escape(REGION_NAME)}\) in [0-9.]+(µs|ms|s)$", re.M)


class UserCommandsThroughNATTests(unittest.TestCase):
    timeout = 120

    async def lab(self, nat: str = "easy", *server_args: str, **kw) -> UserLab:
        why = available()
        if why:
            raise unittest.SkipTest(why)
        if shutil.which("ssh") is None or shutil.which("curl") is None:
            raise unittest.SkipTest("OpenSSH's client and curl are needed (.ci/run installs them)")
        lab = UserLab(self, nat, *server_args, **kw)
        await lab.start()
        return lab

    async def test_easy_nats_ping_goes_p2p_and_ssh_works(self) -> None:
        lab = await self.lab("easy")
        alice = lab.user
        code, out, err = await alice.run("ping", WS, "-n", "5", "--wait", "100ms")
        self.assertEqual(code, 0, err)
        pongs = [line for line in out.splitlines() if line.startswith("pong from")]
        self.assertEqual(len(pongs), 5, out)
        last = P2P_PONG.match(pongs[-1])
        self.assertIsNotNone(last, out)
        self.assertEqual(last.group(1), NAT_IPS["a"], out)  # the agent's NAT's public mapping
        self.assertIn("✔ You are connected directly (p2p)", err)
        code, out, err = await alice.run("ssh", WS, "--", "echo", "ok")
        self.assertEqual((code, out.strip()), (0, "ok"), err)
        code, out, err = await alice.run("ssh", WS, "--", "exit", "7")
        self.assertEqual(code, 7, err)
        # Stock OpenSSH with config-ssh's block.
        config = os.path.join(alice.home, "ssh_config")
        await alice.ok("config-ssh", "--ssh-config-file", config, "--yes")
        code, out, err = await alice.run_program("ssh", "-F", config, f"coder.{WS}", "echo ok; exit 3")
        self.assertEqual((code, out.strip()), (3, "ok"), err)

    async def test_disable_direct_connections_uses_derp_for_ping_and_ssh(self) -> None:
        lab = await self.lab("easy")
        alice = lab.user
        lab.count_direct("b")
        code, out, err = await alice.run("--disable-direct-connections", "ping", WS, "-n", "3", "--wait", "100ms")
        self.assertEqual(code, 0, err)
        self.assertEqual(len(DERP_PONG.findall(out)), 3, out)
        self.assertIn("❗ Direct connections are disabled locally", err)
        self.assertIn("❗ You are connected via a DERP relay, not directly (p2p)", err)
        self.assertEqual(lab.udp_forwarded("b"), 0)
        code, out, err = await alice.run("--disable-direct-connections", "ssh", WS, "--", "echo", "relayed")
        self.assertEqual((code, out.strip()), (0, "relayed"), err)
        # Not one UDP packet went from the CLI's NAT to the agent's: everything was relayed.
        self.assertEqual(lab.udp_forwarded("b"), 0)

    async def test_hard_nats_relay_ping_and_ssh_and_say_why(self) -> None:
        lab = await self.lab("hard")  # the server's own STUN only, with its default two ports
        alice = lab.user
        code, out, err = await alice.run("ping", WS, "-n", "3", "--wait", "100ms", "-v")
        self.assertEqual(code, 0, err)
        self.assertEqual(len(DERP_PONG.findall(out)), 3, out)
        self.assertNotIn("p2p", out)
        # Both sides saw their mapping vary between the two STUN ports, and ping says so.
        self.assertIn("Possible client-side issues with direct connection:\n\n"
                      " - Client is potentially behind a hard NAT", err)
        self.assertIn("Possible agent-side issues with direct connections:\n\n"
                      " - Agent is potentially behind a hard NAT", err)
        self.assertIn("❗ You are connected via a DERP relay, not directly (p2p)\n"
                      "   Why: both sides are behind hard NATs", err)
        code, out, err = await alice.run("ssh", WS, "--", "echo", "relayed", ";", "exit", "5")
        self.assertEqual((code, out.strip()), (5, "relayed"), err)
        self.assertNotIn("now direct via", lab.agent.log())

    async def test_udp_blocked_at_the_client_relays_and_says_why(self) -> None:
        lab = await self.lab("easy")
        lab.block_udp("b")
        alice = lab.user
        code, out, err = await alice.run("ping", WS, "-n", "3", "--wait", "100ms", "-v")
        self.assertEqual(code, 0, err)
        self.assertEqual(len(DERP_PONG.findall(out)), 3, out)
        self.assertIn(" - Client could not connect to STUN over UDP", err)
        self.assertNotIn("Agent could not connect to STUN", err)
        self.assertIn("❗ You are connected via a DERP relay, not directly (p2p)", err)
        code, out, err = await alice.run("ssh", WS, "--", "echo", "ok")
        self.assertEqual((code, out.strip()), (0, "ok"), err)
        self.assertNotIn("now direct via", lab.agent.log())

    async def echo_session(self, lab: UserLab) -> Session:
        """``coderstack ssh box`` running a line echo, held open; waits until it answers."""
        # OpenSSH joins the words of a remote command with spaces: one string, as a user types it.
        s = lab.session("ssh", WS, "--", "while read x; do echo got $x; done")
        s.write(b"hello\n")
        await s.wait_output(b"got hello\n")
        return s

    async def roundtrip(self, s: Session, word: str) -> None:
        s.write(word.encode() + b"\n")
        await s.wait_output(f"got {word}\n".encode())

    async def test_mid_session_udp_blocked_then_allowed(self) -> None:
        lab = await self.lab("easy")
        s = await self.echo_session(lab)
        await wait_until(lambda: lab.agent.log().count("now direct via") >= 1, "the agent to go direct", timeout=LAB_WAIT, interval=0.05)
        await sleep(2.0)  # the session in use for a moment
        lab.block_udp("b")
        # Someone keeps typing. Nothing comes back on the direct path, three disco pings to it go
        # unanswered (about 1.5 s), WireGuard goes on over DERP and the in-tunnel TCP recovers
        # what was lost; the same ssh session answers.
        typed = await self.type_until_echoed(s, "blocked")
        # The agent logged the change at info, naming the address that stopped answering.
        fell_back = re.compile(rf"path to \S+ now DERP\({re.escape(REGION_NAME)}\) "
                               rf"\(direct {re.escape(NAT_IPS['b'])}:\d+ stopped answering\)")
        await wait_until(lambda: fell_back.search(lab.agent.log()), "the agent to log the fall back to DERP",
                         timeout=LAB_WAIT, interval=0.05)
        lab.block_udp("b", on=False)
        # The next discovery pings find the direct path again while the session goes on.
        typed += await self.type_until_echoed(s, "allowed", lambda: lab.agent.log().count("now direct via") >= 2)
        await self.roundtrip(s, "back-p2p")
        # Every line came back, once and in order.
        self.assertEqual(s.out.decode().splitlines(), ["got hello", *(f"got {w}" for w in typed), "got back-p2p"])
        s.close_stdin()
        self.assertEqual(await s.ended, 0, s.err)

    async def type_until_echoed(self, s: Session, word: str, also=lambda: True) -> list[str]:
        """A line every 0.2 s until one of them came back (and ``also()`` holds); all echoed."""
        typed: list[str] = []
        while not (f"got {word}-".encode() in s.out and also()):
            typed.append(f"{word}-{len(typed)}")
            s.write(typed[-1].encode() + b"\n")
            await sleep(0.2)
        await s.wait_output(f"got {typed[-1]}\n".encode())
        return typed

    async def test_direct_session_survives_a_server_restart_and_can_still_fall_back(self) -> None:
        lab = await self.lab("easy")
        s = await self.echo_session(lab)
        await wait_until(lambda: lab.agent.log().count("now direct via") >= 1, "the agent to go direct", timeout=LAB_WAIT, interval=0.05)
        await lab.d.stop_server()
        # Coordinator and DERP are gone; WireGuard goes on directly between the NATs.
        # Longer than the 6.5 s a pong is trusted: disco heartbeats keep the direct path alive
        # without the server.
        for i in range(8):
            await self.roundtrip(s, f"server-down-{i}")
            await sleep(1.0)
        # Meanwhile a new command cannot find the workspace: one clear line.
        code, out, err = await lab.user.run("ssh", WS, "--", "true")
        self.assertEqual(code, 1, err)
        self.assertRegex(err, r"^error: cannot reach the server at http://203\.0\.113\.2:3000 \(.*refused.*\)\n$")
        sessions = lab.agent.log().count("coordinator connected; node sent")
        await lab.d.start_server()
        # The agent finds the server again by itself, and new connections work.
        await wait_until(lambda: lab.agent.log().count("coordinator connected; node sent") > sessions, "the agent's next coordinator session", timeout=LAB_WAIT, interval=0.05)
        await lab.user.wait_status(WS, "connected", watch=[lab.agent])
        code, out, err = await lab.user.run("ssh", WS, "--", "echo", "after-restart")
        self.assertEqual((code, out.strip()), (0, "after-restart"), err)
        await self.roundtrip(s, "server-back")
        # The old session's CLI is known to the new coordinator again, so the relay forwards
        # its packets: when the direct path then dies, it falls back to DERP.
        lab.block_udp("b")
        await self.roundtrip(s, "relayed-after-restart")
        s.close_stdin()
        self.assertEqual(await s.ended, 0, s.err)
