"""The Terraform provider ``coder/coder``, built on PyPI ``tf`` (plugin protocol 6).

Provider argument ``url`` (default: ``$CODER_AGENT_URL``, else ``https://mydeployment.coder.com``)
is the access URL the agents are told to use: the per-template override of the deployment's
access URL.
"""

from __future__ import annotations

import os
from urllib.parse import urlsplit

from tf import types
from tf.iface import Config, DataSource, Provider, Resource
from tf.schema import Attribute, Schema
from tf.utils import Diagnostics

from coderstack.provider.agent import AgentResource
from coderstack.provider.app import AppResource
from coderstack.provider.attached import EnvResource, ScriptResource
from coderstack.provider.host import ProvisionerDataSource
from coderstack.provider.metadata import AgentInstanceResource, MetadataResource
from coderstack.provider.parameter import ParameterDataSource
from coderstack.provider.workspace import WorkspaceDataSource, WorkspaceOwnerDataSource

DEFAULT_URL = "https://mydeployment.coder.com"
FULL_NAME = "registry.terraform.io/coder/coder"

PROVIDER_SCHEMA = Schema(
    attributes=[
        Attribute("url", types.String(), description="The URL to access Coder.", optional=True)
    ]
)


def _check_url(diags: Diagnostics, url: str) -> bool:
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 -- raises ValueError on a bad port
    except ValueError as exc:
        diags.add_error(f"invalid url {url!r}: {exc}", path=["url"])
        return False
    return True


class CoderProvider(Provider):
    def __init__(self) -> None:
        self.url: str = os.environ.get("CODER_AGENT_URL") or DEFAULT_URL

    def get_model_prefix(self) -> str:
        return "coder_"

    def full_name(self) -> str:
        return FULL_NAME

    def get_provider_schema(self, diags: Diagnostics) -> Schema:
        return PROVIDER_SCHEMA

    def validate_config(self, diags: Diagnostics, config: Config) -> None:
        url = config.get("url")
        if isinstance(url, str):
            _check_url(diags, url)

    def configure_provider(self, diags: Diagnostics, config: Config) -> None:
        url = config.get("url")
        if not isinstance(url, str):
            url = os.environ.get("CODER_AGENT_URL", DEFAULT_URL)
        if url == "":
            diags.add_error("CODER_AGENT_URL must not be empty", path=["url"])
            return
        if _check_url(diags, url):
            self.url = url

    def get_data_sources(self) -> list[type[DataSource]]:
        return [
            WorkspaceDataSource,
            WorkspaceOwnerDataSource,
            ProvisionerDataSource,
            ParameterDataSource,
        ]

    def get_resources(self) -> list[type[Resource]]:
        return [
            AgentResource,
            AppResource,
            ScriptResource,
            EnvResource,
            MetadataResource,
            AgentInstanceResource,
        ]
