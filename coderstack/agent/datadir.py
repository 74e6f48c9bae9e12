"""Where an agent keeps its keys: one directory per agent, never shared.

An agent's WireGuard, disco and SSH host keys are its identity on the tunnel; two agents with
the same keys knock each other off the coordinator. So:

- the default data dir is ``<base>/<agent id>/`` (base ``~/.local/share/coderstack/agent``),
  chosen once the first manifest names the agent, so any number of agents run by one user
  each get their own keys;
- a data dir given with ``--data-dir`` / ``CODER_AGENT_DATA_DIR`` is used as it is, but the
  first agent to use it writes its id to ``agent-id`` there, and a different agent refuses it
  (:class:`DataDirInUse`) instead of taking that agent's keys.

Directories are made 0700. Keys left in the base directory by older versions are not moved:
a new agent id starts with new keys.
"""

from __future__ import annotations

import os
from uuid import UUID

MARKER = "agent-id"


class DataDirInUse(Exception):
    """The data dir belongs to another agent."""


def agent_data_dir(base: str, agent_id: UUID, per_agent: bool) -> str:
    """The directory for this agent's keys, created 0700 and claimed for ``agent_id``."""
    path = os.path.join(base, str(agent_id)) if per_agent else base
    os.makedirs(path, mode=0o700, exist_ok=True)
    os.chmod(path, 0o700)
    if per_agent:
        os.chmod(base, 0o700)
    marker = os.path.join(path, MARKER)
    try:
        fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        with open(marker) as f:
            owner = f.read().strip()
        if owner != str(agent_id):
            raise DataDirInUse(
                f"data dir {path} holds the keys of agent {owner}, not of agent {agent_id}; "
                "give this agent its own --data-dir (CODER_AGENT_DATA_DIR), or leave it unset"
            ) from None
    else:
        with os.fdopen(fd, "w") as f:
            f.write(f"{agent_id}\n")
    return path
