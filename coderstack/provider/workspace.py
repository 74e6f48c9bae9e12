"""Data sources ``coder_workspace`` and ``coder_workspace_owner``.

Both read the build's facts from the environment the provisioner gives Terraform
(``CODER_WORKSPACE_*``, ``CODER_WORKSPACE_OWNER_*``), as Coder's provisioner does; the access URL
and port come from the provider ``url``.  Outside a build (plain ``terraform plan``) missing
values fall back to Coder's placeholders (name "default", a random id, empty template fields).
"""

from __future__ import annotations

import json
import os
import uuid
from urllib.parse import urlsplit

from tf import types
from tf.iface import Config, ReadDataContext, State
from tf.schema import Attribute, Schema

from coderstack.provider.resource import ProviderDataSource
from coderstack.provider.schema import Object


def _c(name: str, t: types.TfType, desc: str, sensitive: bool = False) -> Attribute:
    return Attribute(name, t, description=desc, computed=True, sensitive=sensitive)


WORKSPACE_SCHEMA = Schema(
    version=1,
    description="Use this data source to get information for the active workspace build.",
    attributes=[
        _c(
            "access_url",
            types.String(),
            "The access URL of the deployment provisioning this workspace.",
        ),
        _c("access_port", types.Number(), "The access port of the deployment."),
        _c(
            "prebuild_count", types.Number(), "1 if the workspace is an unclaimed prebuild, else 0."
        ),
        _c("start_count", types.Number(), "1 if `transition` is start, else 0."),
        _c("transition", types.String(), "Either `start` or `stop`."),
        _c("id", types.String(), "UUID of the workspace."),
        _c("is_prebuild", types.Bool(), "True if the workspace is an unclaimed prebuild."),
        _c("is_prebuild_claim", types.Bool(), "True while a prebuild is being claimed."),
        _c("name", types.String(), "Name of the workspace."),
        _c("template_id", types.String(), "ID of the workspace's template."),
        _c("template_name", types.String(), "Name of the workspace's template."),
        _c("template_version", types.String(), "Version of the workspace's template."),
    ],
)


def access_port(url: str) -> int:
    """The URL's port, or the scheme's default (443 for https, else 80)."""
    parts = urlsplit(url)
    if parts.port is not None:
        return parts.port
    return 443 if parts.scheme == "https" else 80


class WorkspaceDataSource(ProviderDataSource):
    NAME = "workspace"
    SCHEMA = WORKSPACE_SCHEMA

    def read(self, ctx: ReadDataContext, config: Config) -> State:
        env = os.environ
        transition = env.get("CODER_WORKSPACE_TRANSITION") or "start"
        is_prebuild = env.get("CODER_WORKSPACE_IS_PREBUILD") == "true"
        url = self.provider.url
        try:
            port = access_port(url)
        except ValueError:
            ctx.diagnostics.add_error(f"couldn't parse the port of {url!r}")
            port = None
        return {
            "access_url": url,
            "access_port": port,
            "prebuild_count": 1 if is_prebuild else 0,
            "start_count": 1 if transition == "start" else 0,
            "transition": transition,
            "id": env.get("CODER_WORKSPACE_ID") or str(uuid.uuid4()),
            "is_prebuild": is_prebuild,
            "is_prebuild_claim": env.get("CODER_WORKSPACE_IS_PREBUILD_CLAIM") == "true",
            "name": env.get("CODER_WORKSPACE_NAME") or "default",
            "template_id": env.get("CODER_WORKSPACE_TEMPLATE_ID", ""),
            "template_name": env.get("CODER_WORKSPACE_TEMPLATE_NAME", ""),
            "template_version": env.get("CODER_WORKSPACE_TEMPLATE_VERSION", ""),
        }


_ROLE = Object({"name": types.String(), "org_id": types.String()})

OWNER_SCHEMA = Schema(
    description="Use this data source to fetch information about the workspace owner.",
    attributes=[
        _c("id", types.String(), "The UUID of the workspace owner."),
        _c("name", types.String(), "The username of the user."),
        _c("full_name", types.String(), "The full name of the user."),
        _c("email", types.String(), "The email address of the user."),
        _c("ssh_public_key", types.String(), "The user's generated SSH public key."),
        _c("ssh_private_key", types.String(), "The user's generated SSH private key.", True),
        _c("groups", types.List(types.String()), "The groups of which the user is a member."),
        _c(
            "session_token",
            types.String(),
            "Session token for the deployment, new every start.",
            True,
        ),
        _c("oidc_access_token", types.String(), "The owner's OIDC access token, if any.", True),
        _c("oidc_id_token", types.String(), "The owner's OIDC ID token, if any.", True),
        _c("login_type", types.String(), "The type of login the user has."),
        _c("rbac_roles", types.List(_ROLE), "The RBAC roles assigned to the user."),
    ],
)


def _json_env(ctx: ReadDataContext, name: str, default):
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return json.loads(raw)
    except ValueError as exc:
        ctx.diagnostics.add_error(f"invalid {name}: {exc}")
        return default


class WorkspaceOwnerDataSource(ProviderDataSource):
    NAME = "workspace_owner"
    SCHEMA = OWNER_SCHEMA

    def read(self, ctx: ReadDataContext, config: Config) -> State:
        env = os.environ
        groups = _json_env(ctx, "CODER_WORKSPACE_OWNER_GROUPS", []) or []
        roles = _json_env(ctx, "CODER_WORKSPACE_OWNER_RBAC_ROLES", []) or []
        return {
            "id": env.get("CODER_WORKSPACE_OWNER_ID") or str(uuid.uuid4()),
            "name": env.get("CODER_WORKSPACE_OWNER") or "default",
            "full_name": env.get("CODER_WORKSPACE_OWNER_NAME") or "default",
            "email": env.get("CODER_WORKSPACE_OWNER_EMAIL") or "default@example.com",
            "ssh_public_key": env.get("CODER_WORKSPACE_OWNER_SSH_PUBLIC_KEY", ""),
            "ssh_private_key": env.get("CODER_WORKSPACE_OWNER_SSH_PRIVATE_KEY", ""),
            "groups": [str(g) for g in groups],
            "session_token": env.get("CODER_WORKSPACE_OWNER_SESSION_TOKEN", ""),
            "oidc_access_token": env.get("CODER_WORKSPACE_OWNER_OIDC_ACCESS_TOKEN", ""),
            "oidc_id_token": env.get("CODER_WORKSPACE_OWNER_OIDC_ID_TOKEN", ""),
            "login_type": env.get("CODER_WORKSPACE_OWNER_LOGIN_TYPE") or None,
            "rbac_roles": [
                {"name": str(r.get("name", "")), "org_id": str(r.get("org_id", ""))}
                for r in roles
                if isinstance(r, dict)
            ],
        }
