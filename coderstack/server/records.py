"""What the store's rows mean in Python: frozen records, and the functions that make them from
rows.

Times are UTC and timezone-aware everywhere; SQLite hands back naive datetimes, which
:func:`aware` marks as UTC.  A user's roles are one comma-separated column; suspension is the
:data:`SUSPENDED` marker among them.  A template version's files are stored as one JSON object
``{file name: base64 content}`` (:func:`encode_files`).
"""

from __future__ import annotations

import base64
import json
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, overload


def now() -> datetime:
    return datetime.now(UTC)


@overload
def aware(value: datetime) -> datetime: ...
@overload
def aware(value: None) -> None: ...
@overload
def aware(value: datetime | None) -> datetime | None: ...
def aware(value: datetime | None) -> datetime | None:
    # SQLite hands back naive datetimes; everything we store is UTC.
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


#: A suspended user carries this marker among its roles (the users table keeps the status there).
SUSPENDED = "suspended"


@dataclass(frozen=True)
class User:
    id: uuid.UUID
    username: str
    email: str
    name: str
    roles: tuple[str, ...]
    created_at: datetime

    @property
    def is_owner(self) -> bool:
        return "owner" in self.roles

    @property
    def is_suspended(self) -> bool:
        return SUSPENDED in self.roles

    def to_json(self) -> dict[str, Any]:
        return {
            "id": str(self.id),
            "username": self.username,
            "email": self.email,
            "name": self.name,
            "roles": [{"name": r} for r in self.roles if r != SUSPENDED],
            "created_at": self.created_at.isoformat(),
            "status": "suspended" if self.is_suspended else "active",
        }


@dataclass(frozen=True)
class Agent:
    id: uuid.UUID
    workspace_id: uuid.UUID
    name: str
    os: str
    arch: str
    directory: str
    created_at: datetime
    first_connected_at: datetime | None
    last_connected_at: datetime | None
    disconnected_at: datetime | None
    #: The URL the agent was given by its template's build (None: created without a template).
    access_url: str | None = None
    #: Coder's lifecycle state as the agent last reported it, and when it started / got ready.
    lifecycle_state: str = "created"
    started_at: datetime | None = None
    ready_at: datetime | None = None


@dataclass(frozen=True)
class Build:
    """One workspace build: a terraform run with a transition (start, stop, destroy)."""

    id: uuid.UUID
    workspace_id: uuid.UUID
    number: int
    transition: str
    status: str  # pending | running | succeeded | failed
    template_version_id: uuid.UUID | None
    created_at: datetime
    completed_at: datetime | None
    error: str

    @property
    def done(self) -> bool:
        return self.status in ("succeeded", "failed")

    def to_json(self) -> dict[str, Any]:
        return {
            "id": str(self.id),
            "workspace_id": str(self.workspace_id),
            "build_number": self.number,
            "transition": self.transition,
            "status": self.status,
            "template_version_id": str(self.template_version_id) if self.template_version_id else None,
            "created_at": self.created_at.isoformat(),
            "completed_at": self.completed_at.isoformat() if self.completed_at else None,
            "error": self.error,
        }


@dataclass(frozen=True)
class TemplateVersion:
    id: uuid.UUID
    template_id: uuid.UUID
    number: int
    created_at: datetime
    #: The template's files by name (only loaded when asked for).
    files: dict[str, bytes] | None = None


@dataclass(frozen=True)
class Template:
    id: uuid.UUID
    name: str
    created_by: uuid.UUID
    created_at: datetime
    updated_at: datetime
    active_version: TemplateVersion | None

    def to_json(self) -> dict[str, Any]:
        v = self.active_version
        return {
            "id": str(self.id),
            "name": self.name,
            "created_by": str(self.created_by),
            "created_at": self.created_at.isoformat(),
            "updated_at": self.updated_at.isoformat(),
            "active_version_id": str(v.id) if v else None,
            "active_version": v.number if v else None,
        }


@dataclass(frozen=True)
class AgentRecord:
    """An agent as a build found it in the Terraform state (what ``sync_agents`` stores)."""

    id: uuid.UUID
    name: str
    token_hash: bytes = field(repr=False)
    os: str
    arch: str
    directory: str
    access_url: str
    #: The agent's part of the manifest (agentspec.py); None leaves what is stored.
    spec: dict[str, Any] | None = None


@dataclass(frozen=True)
class Workspace:
    id: uuid.UUID
    owner_id: uuid.UUID
    owner_name: str
    name: str
    template_id: uuid.UUID | None
    created_at: datetime
    updated_at: datetime
    agents: tuple[Agent, ...] = ()
    template_name: str | None = None
    latest_build: Build | None = None



class DictRow:
    """Attribute access over a dict, so freshly inserted rows share the row converters."""

    def __init__(self, d: dict[str, Any]) -> None:
        self.__dict__.update(d)


def user_from_row(row: Any) -> User:
    return User(
        id=row.id,
        username=row.username,
        email=row.email,
        name=row.name,
        roles=tuple(r for r in row.roles.split(",") if r),
        created_at=aware(row.created_at),
    )


def agent_from_row(row: Any) -> Agent:
    """An agent from a row of ``workspace_agents``, joined (or not) with its access URL and
    its lifecycle state."""
    return Agent(
        id=row.id,
        workspace_id=row.workspace_id,
        name=row.name,
        os=row.os,
        arch=row.arch,
        directory=row.directory,
        created_at=aware(row.created_at),
        first_connected_at=aware(row.first_connected_at),
        last_connected_at=aware(row.last_connected_at),
        disconnected_at=aware(row.disconnected_at),
        access_url=getattr(row, "access_url", None),
        lifecycle_state=getattr(row, "lifecycle_state", None) or "created",
        started_at=aware(getattr(row, "started_at", None)),
        ready_at=aware(getattr(row, "ready_at", None)),
    )


def build_from_row(row: Any) -> Build:
    return Build(
        id=row.id,
        workspace_id=row.workspace_id,
        number=row.number,
        transition=row.transition,
        status=row.status,
        template_version_id=row.template_version_id,
        created_at=aware(row.created_at),
        completed_at=aware(row.completed_at),
        error=row.error or "",
    )


def encode_files(files: dict[str, bytes]) -> bytes:
    return json.dumps(
        {name: base64.b64encode(content).decode() for name, content in sorted(files.items())}
    ).encode()


def decode_files(blob: bytes) -> dict[str, bytes]:
    return {name: base64.b64decode(text) for name, text in json.loads(blob).items()}

