"""ProxyCommand for the tests: ``coderstack ssh --stdio`` with a loopback "tunnel" (port 1 -> $USERCMDS_SSH_PORT)."""

import os
import sys

from twisted.internet import defer, task

from coderstack.cli import ssh
from tests.support.loopback import LoopbackConnection, loopback_connect


class Ctx:
    environ: dict[str, str] = {}
    stdin = sys.stdin
    stdout = sys.stdout


def main(reactor):
    opts = ssh.Options()
    # No server here to ask about startup scripts: connect at once.
    opts.parseOptions(["--stdio", "--wait=no", "--ssh-host-prefix", "coder.", sys.argv[1]])
    conn = LoopbackConnection(reactor, {1: int(os.environ["USERCMDS_SSH_PORT"])})
    return defer.ensureDeferred(ssh.run_with(reactor, opts, Ctx(), loopback_connect(conn, expect="dev")))


task.react(main)
