"""What the resources and data sources read from the configured provider.

Terraform builds each resource with the provider instance; the resources depend on this
Protocol rather than on the provider class, which itself lists them.
"""

from __future__ import annotations

from typing import Protocol


class ProviderContext(Protocol):
    @property
    def url(self) -> str:
        """The access URL the agents are told to use (the provider's ``url`` argument)."""
        ...
