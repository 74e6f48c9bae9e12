"""A real server (``makeService``) on 127.0.0.1 port 0 inside the test process, and the CLI run
in-process against it.

The server runs on the global reactor exactly as ``twistd coderstack-server`` builds it; only the
listening port is picked by the kernel, so the access URL is set to the real port once it is known.
"""

from __future__ import annotations

import io
import os
from typing import Any

from twisted.internet import reactor, task

from coderstack.cli.main import run as cli_run
from coderstack.server.options import ServerOptions
from coderstack.server.service import ServerService, makeService
from tests.support.tempdirs import made_dir


async def start_server(testcase: Any, *argv: str, environ: dict[str, str] | None = None) -> tuple[ServerService, str]:
    """Start a server; returns it and its URL. Stopped at the test's cleanup."""
    data = made_dir(testcase)
    opts = ServerOptions(environ=environ or {})
    opts.parseOptions(["--http-address", "127.0.0.1:0", "--data-dir", os.path.join(data, "server"), *argv])
    svc = makeService(opts.as_dict(), reactor)
    svc.startService()
    testcase.addCleanup(svc.stopService)
    await svc.ready
    port = svc.ports[0].getHost().port
    url = f"http://127.0.0.1:{port}"
    assert svc.deployment is not None
    svc.deployment.access_url = url
    return svc, url


class CLI:
    """Runs ``coderstack ...`` in-process with its own config dir; returns (exit code, out, err)."""

    def __init__(self, testcase: Any, environ: dict[str, str] | None = None) -> None:
        self.home = made_dir(testcase)
        self.config_dir = os.path.join(self.home, "config")
        self.environ = {"HOME": self.home, "CODER_CONFIG_DIR": self.config_dir, **(environ or {})}

    async def __call__(self, *argv: str, stdin: str = "", **env: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        code = await cli_run(reactor, list(argv), environ={**self.environ, **env},
                             stdout=out, stderr=err, stdin=io.StringIO(stdin))
        # Let the HTTP pool's closed connections finish closing before the test looks on.
        await task.deferLater(reactor, 0, lambda: None)
        return code, out.getvalue(), err.getvalue()

    def read_config(self, name: str) -> str | None:
        try:
            with open(os.path.join(self.config_dir, name)) as f:
                return f.read().strip()
        except FileNotFoundError:
            return None
