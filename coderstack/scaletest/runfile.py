"""The run file: which workspaces a scale test made, and their agents' tokens.

JSON, written atomically and readable by its owner only (it holds agent tokens, which the server
keeps only hashed and shows once)::

    {"version": 1, "url": "https://coder.example.com", "prefix": "scaletest-3f2a",
     "agents": [{"workspace": "scaletest-3f2a-0", "workspace_id": "...", "agent_id": "...",
                 "token": "..."}, ...]}
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from typing import Any
from uuid import UUID

VERSION = 1


class RunFileError(ValueError):
    """A run file that cannot be used, with what is wrong with it."""


@dataclass(frozen=True)
class AgentEntry:
    workspace: str
    workspace_id: str
    agent_id: str
    token: str


@dataclass(frozen=True)
class RunFile:
    url: str
    prefix: str
    agents: tuple[AgentEntry, ...]

    def to_json(self) -> dict[str, Any]:
        return {"version": VERSION, "url": self.url, "prefix": self.prefix,
                "agents": [asdict(a) for a in self.agents]}

    @classmethod
    def from_json(cls, obj: Any) -> RunFile:
        if not isinstance(obj, dict):
            raise RunFileError("a run file is a JSON object")
        if obj.get("version") != VERSION:
            raise RunFileError(f"unknown run file version {obj.get('version')!r} (this coderstack writes {VERSION})")
        url, prefix, agents = obj.get("url"), obj.get("prefix"), obj.get("agents")
        if not isinstance(url, str) or not isinstance(prefix, str) or not isinstance(agents, list):
            raise RunFileError("a run file needs url and prefix (strings) and agents (a list)")
        entries = []
        for i, a in enumerate(agents):
            if not isinstance(a, dict):
                raise RunFileError(f"agents[{i}] is not an object")
            try:
                entry = AgentEntry(**{k: a[k] for k in ("workspace", "workspace_id", "agent_id", "token")})
            except KeyError as e:
                raise RunFileError(f"agents[{i}] has no {e.args[0]}") from None
            if not all(isinstance(v, str) for v in asdict(entry).values()):
                raise RunFileError(f"agents[{i}]'s fields must be strings")
            try:
                UUID(entry.agent_id)
            except ValueError:
                raise RunFileError(f"agents[{i}].agent_id is not a UUID") from None
            entries.append(entry)
        return cls(url, prefix, tuple(entries))


def write(path: str, run: RunFile) -> None:
    tmp = f"{path}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), 0o600)
        json.dump(run.to_json(), f, indent=1)
    os.replace(tmp, path)


def read(path: str) -> RunFile:
    try:
        with open(path) as f:
            obj = json.load(f)
    except FileNotFoundError:
        raise RunFileError(f"no run file at {path} (make one with `coderstack scaletest create-workspaces`)") from None
    except (OSError, ValueError) as e:
        raise RunFileError(f"cannot read the run file {path}: {e}") from None
    return RunFile.from_json(obj)
