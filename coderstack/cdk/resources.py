"""The constructs (see the package docstring)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

# jsii prints a boxed warning on Node 20 for every process; it is noise in template builds.
os.environ.setdefault("JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION", "20")

import jsii
from cdktf import (
    TerraformDataSource,
    TerraformProvider,
    TerraformProviderGeneratorMetadata,
    TerraformResource,
    TerraformStack,
)
from constructs import Construct

from coderstack.provider.bootstrap import linux_stop_script

PROVIDER_SOURCE = "coder/coder"
PROVIDER_VERSION = ">= 2.0.0"
_META = TerraformProviderGeneratorMetadata(provider_name="coder")


def terraform_escape(text: str) -> str:
    """Make ``text`` a literal inside a Terraform string (``${`` and ``%{`` start templates)."""
    return text.replace("${", "$${").replace("%{", "%%{")


def _clean(attrs: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in attrs.items() if v is not None}


class CoderProvider(TerraformProvider):
    """``provider "coder" { url = ... }``; ``url=None`` keeps the deployment's access URL."""

    def __init__(
        self, scope: Construct, id: str, *, url: str | None = None, version: str = PROVIDER_VERSION
    ):
        super().__init__(
            scope, id, terraform_resource_type="coder", terraform_generator_metadata=_META
        )
        self.url = url
        TerraformStack.of(self).add_override(
            "terraform.required_providers.coder", {"source": PROVIDER_SOURCE, "version": version}
        )

    @jsii.member(jsii_name="synthesizeAttributes")
    def _synthesize_attributes(self) -> Mapping[str, Any]:
        return _clean({"url": self.url})


class _Resource(TerraformResource):
    def __init__(
        self, scope: Construct, id: str, type_name: str, attrs: Mapping[str, Any], meta: bool = True
    ):
        super().__init__(
            scope,
            id,
            terraform_resource_type=type_name,
            terraform_generator_metadata=_META if meta else None,
        )
        self._attrs = _clean(attrs)

    @jsii.member(jsii_name="synthesizeAttributes")
    def _synthesize_attributes(self) -> Mapping[str, Any]:
        return self._attrs

    @property
    def address(self) -> str:
        return f"{self.terraform_resource_type}.{self.friendly_unique_id}"


class _DataSource(TerraformDataSource):
    def __init__(self, scope: Construct, id: str, type_name: str):
        super().__init__(
            scope, id, terraform_resource_type=type_name, terraform_generator_metadata=_META
        )

    @jsii.member(jsii_name="synthesizeAttributes")
    def _synthesize_attributes(self) -> Mapping[str, Any]:
        return {}


class CoderWorkspace(_DataSource):
    def __init__(self, scope: Construct, id: str = "me"):
        super().__init__(scope, id, "coder_workspace")

    @property
    def start_count(self) -> str:
        return f"${{data.coder_workspace.{self.friendly_unique_id}.start_count}}"

    @property
    def access_url(self) -> str:
        return self.get_string_attribute("access_url")

    @property
    def name(self) -> str:
        return self.get_string_attribute("name")


class CoderWorkspaceOwner(_DataSource):
    def __init__(self, scope: Construct, id: str = "me"):
        super().__init__(scope, id, "coder_workspace_owner")

    @property
    def name(self) -> str:
        return self.get_string_attribute("name")


class CoderAgent(_Resource):
    """``resource "coder_agent"``; arguments as terraform-provider-coder's.  ``metadata`` is a
    list of dicts (key, script, interval, ...), ``display_apps`` a dict of booleans."""

    def __init__(
        self,
        scope: Construct,
        id: str,
        *,
        os: str = "linux",
        arch: str = "amd64",
        auth: str | None = None,
        dir: str | None = None,
        env: Mapping[str, str] | None = None,
        startup_script: str | None = None,
        startup_script_behavior: str | None = None,
        shutdown_script: str | None = None,
        connection_timeout: int | None = None,
        troubleshooting_url: str | None = None,
        motd_file: str | None = None,
        order: int | None = None,
        api_key_scope: str | None = None,
        metadata: Sequence[Mapping[str, Any]] | None = None,
        display_apps: Mapping[str, bool] | None = None,
    ):
        super().__init__(
            scope,
            id,
            "coder_agent",
            {
                "os": os,
                "arch": arch,
                "auth": auth,
                "dir": dir,
                "env": dict(env) if env else None,
                "startup_script": startup_script,
                "startup_script_behavior": startup_script_behavior,
                "shutdown_script": shutdown_script,
                "connection_timeout": connection_timeout,
                "troubleshooting_url": troubleshooting_url,
                "motd_file": motd_file,
                "order": order,
                "api_key_scope": api_key_scope,
                "metadata": [dict(m) for m in metadata] if metadata else None,
                "display_apps": [dict(display_apps)] if display_apps else None,
            },
        )

    @property
    def agent_id(self) -> str:
        return f"${{{self.address}.id}}"

    @property
    def token(self) -> str:
        return f"${{{self.address}.token}}"

    @property
    def init_script(self) -> str:
        return f"${{{self.address}.init_script}}"


class CoderApp(_Resource):
    """``resource "coder_app"`` attached to ``agent``; ``healthcheck`` is a dict
    (url, interval, threshold)."""

    def __init__(
        self,
        scope: Construct,
        id: str,
        *,
        agent: CoderAgent,
        slug: str,
        display_name: str | None = None,
        url: str | None = None,
        command: str | None = None,
        icon: str | None = None,
        subdomain: bool | None = None,
        share: str | None = None,
        external: bool | None = None,
        healthcheck: Mapping[str, Any] | None = None,
        group: str | None = None,
        order: int | None = None,
        hidden: bool | None = None,
        open_in: str | None = None,
        tooltip: str | None = None,
    ):
        super().__init__(
            scope,
            id,
            "coder_app",
            {
                "agent_id": agent.agent_id,
                "slug": slug,
                "display_name": display_name,
                "url": url,
                "command": command,
                "icon": icon,
                "subdomain": subdomain,
                "share": share,
                "external": external,
                "healthcheck": [dict(healthcheck)] if healthcheck else None,
                "group": group,
                "order": order,
                "hidden": hidden,
                "open_in": open_in,
                "tooltip": tooltip,
            },
        )


class LocalProcessWorkspace(_Resource):
    """Runs ``agent``'s bootstrap on the machine that runs Terraform.

    ``count`` follows ``workspace.start_count`` (so a stop build stops the agent); the agent's
    pidfile and log live in ``<build dir>/.coderstack/agents/<agent id>``.  The resource is
    replaced (old agent stopped, new one started) when the agent or its init_script changes,
    e.g. after a change of the provider ``url``."""

    def __init__(
        self,
        scope: Construct,
        id: str,
        *,
        agent: CoderAgent,
        workspace: CoderWorkspace,
        shell: str = "/bin/sh",
    ):
        super().__init__(
            scope,
            id,
            "terraform_data",
            {
                "input": {
                    "agent_dir": f"${{abspath(path.root)}}/.coderstack/agents/${{{agent.address}.id}}",
                },
                "triggers_replace": [agent.agent_id, f"${{sha256({agent.address}.init_script)}}"],
            },
            meta=False,
        )
        self.add_override("count", workspace.start_count)
        self.add_override(
            "provisioner",
            [
                {
                    "local-exec": {
                        "interpreter": [shell, "-c"],
                        "command": agent.init_script,
                        "environment": {
                            "CODER_AGENT_TOKEN": agent.token,
                            "CODERSTACK_AGENT_DIR": "${self.input.agent_dir}",
                        },
                    }
                },
                {
                    "local-exec": {
                        "when": "destroy",
                        "interpreter": [shell, "-c"],
                        "command": terraform_escape(linux_stop_script()),
                        "environment": {"CODERSTACK_AGENT_DIR": "${self.output.agent_dir}"},
                    }
                },
            ],
        )
