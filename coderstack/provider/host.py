"""Data source ``coder_provisioner``: the OS and architecture of the machine running Terraform,
in Go's spelling (``runtime.GOOS``/``GOARCH``), which Coder templates feed to ``coder_agent``."""

from __future__ import annotations

import platform
import uuid

from tf import types
from tf.iface import Config, ReadDataContext, State
from tf.schema import Attribute, Schema

from coderstack.provider.resource import ProviderDataSource

_GOARCH = {
    "x86_64": "amd64",
    "amd64": "amd64",
    "i386": "386",
    "i686": "386",
    "aarch64": "arm64",
    "arm64": "arm64",
    "armv7l": "arm",
    "armv6l": "arm",
    "ppc64le": "ppc64le",
    "s390x": "s390x",
    "riscv64": "riscv64",
}

PROVISIONER_SCHEMA = Schema(
    description="Use this data source to get information about the Coder provisioner.",
    attributes=[
        Attribute("id", types.String(), description="A random UUID.", computed=True),
        Attribute(
            "os", types.String(), description="The host's operating system (GOOS).", computed=True
        ),
        Attribute(
            "arch", types.String(), description="The host's architecture (GOARCH).", computed=True
        ),
    ],
)


def go_os(system: str | None = None) -> str:
    return (system or platform.system()).lower()


def go_arch(machine: str | None = None) -> str:
    machine = (machine or platform.machine()).lower()
    return _GOARCH.get(machine, machine)


class ProvisionerDataSource(ProviderDataSource):
    NAME = "provisioner"
    SCHEMA = PROVISIONER_SCHEMA

    def read(self, ctx: ReadDataContext, config: Config) -> State:
        return {"id": str(uuid.uuid4()), "os": go_os(), "arch": go_arch()}
