"""Shared steps of the through-the-tunnel tests: a workspace with a connected agent, the
``config-ssh`` file for stock OpenSSH, the relay's byte counter (proof that a "relayed" test
really went through DERP), and waiting on a long-running CLI's log."""

from __future__ import annotations

import os
import re

import treq

from tests.support.processes import CLIUser, Deployment, Process

RELAYED_METRIC = re.compile(r"^coderstack_derp_bytes_relayed_total (\d+)$", re.MULTILINE)


async def workspace(testcase: object, *server_args: str, name: str = "box") -> tuple[Deployment, CLIUser, Process]:
    """A server, a first user ``alice`` logged in, workspace ``name`` and its connected agent."""
    d = Deployment(testcase, *server_args)
    await d.start_server()
    alice = d.user("alice")
    await alice.login_first("alice")
    token = await alice.create(name)
    agent = d.start_agent(token)
    await alice.wait_status(name, "connected", watch=[agent])
    return d, alice, agent


async def ssh_config(d: Deployment, user: CLIUser) -> str:
    """A fresh ssh_config holding only the block ``coderstack config-ssh`` writes."""
    path = os.path.join(user.home, "ssh_config")
    open(path, "w").close()
    await user.ok("config-ssh", "--ssh-config-file", path, "--yes")
    return path


def user_env(d: Deployment, user: CLIUser, **extra: str) -> dict[str, str]:
    """The environment OpenSSH (and so its ProxyCommand) runs with for ``user``."""
    return d.env(user.home, CODER_CONFIG_DIR=user.config_dir, **extra)


async def relayed_bytes(d: Deployment, user: CLIUser) -> int:
    """The embedded DERP relay's ``bytes_relayed_total`` from the owner-only ``/metrics``."""
    resp = await treq.get(f"{d.url}/metrics", headers={"Coder-Session-Token": user.session_token()},
                          persistent=False)
    text = (await resp.content()).decode()
    if resp.code != 200:
        raise AssertionError(f"/metrics answered {resp.code}: {text}")
    m = RELAYED_METRIC.search(text)
    if m is None:
        raise AssertionError(f"no relayed-bytes counter in /metrics:\n{text}")
    return int(m.group(1))
