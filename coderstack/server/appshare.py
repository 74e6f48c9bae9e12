"""Who may open a workspace app: its sharing level (``coder_app.share``, or a shared port's).

- ``owner`` (the default): the workspace's owner only. Not even a site owner opens another
  user's owner-level app through the proxy: an app runs with its owner's rights, in their browser
  origin.
- ``authenticated``: anyone logged in to this deployment.
- ``public``: anyone, logged in or not.

A template may cap the level its workspaces' ports can be shared at (``max_port_share_level``).
"""

from __future__ import annotations

import uuid
from typing import Literal

SharingLevel = Literal["owner", "authenticated", "public"]
LEVELS: tuple[SharingLevel, ...] = ("owner", "authenticated", "public")


def parse_level(text: str) -> SharingLevel:
    """A sharing level from its name (raises ValueError naming the choices)."""
    value = text.strip().lower()
    if value not in LEVELS:
        raise ValueError(f"unknown sharing level {text!r}: one of {', '.join(LEVELS)}")
    return value


def may_open(level: SharingLevel, *, viewer_id: uuid.UUID | None, workspace_owner_id: uuid.UUID) -> bool:
    """May this viewer (None: not logged in) open an app shared at ``level``?"""
    if level == "public":
        return True
    if viewer_id is None:
        return False
    return level == "authenticated" or viewer_id == workspace_owner_id


def within(level: SharingLevel, maximum: SharingLevel) -> bool:
    """Is ``level`` no wider than ``maximum``?"""
    return LEVELS.index(level) <= LEVELS.index(maximum)
