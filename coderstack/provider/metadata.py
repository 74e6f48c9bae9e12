"""``coder_metadata`` and ``coder_agent_instance``: facts about other resources, for the UI.

``coder_metadata`` attaches key/value ``item`` blocks (and an icon, a daily cost, a hidden flag)
to another resource of the build, named by its ``id`` in ``resource_id``; the server shows them
with the workspace (``sensitive`` values masked).  ``coder_agent_instance`` ties an agent to a
cloud instance id (used by instance-identity auth).  Both only record their arguments plus a
UUID ``id``; every argument forces replacement, as in terraform-provider-coder.

``item.is_null`` is declared as in terraform-provider-coder but left null in the state: the
plugin library plans a create's nested blocks exactly as configured, so a provider-filled value
would be an "inconsistent result after apply".  The server derives it from ``value`` being null.
"""

from __future__ import annotations

from tf import types
from tf.iface import Config
from tf.schema import Block, Schema
from tf.utils import Diagnostics

from coderstack.provider.attached import agent_id_attribute, uuid_attribute
from coderstack.provider.resource import FORCE_NEW as _FN
from coderstack.provider.resource import RecordedResource, check_unique_keys
from coderstack.provider.resource import attr as _attr
from coderstack.provider.schema import ListBlock

_ITEM = ListBlock(
    "item",
    Block(
        attributes=[
            _attr("key", types.String(), "The key of this metadata item.", required=True,
                  requires_replace=True),
            _attr("value", types.String(), "The value of this metadata item.", **_FN),
            _attr("sensitive", types.Bool(), "Hide the value in the UI.", **_FN),
            _attr("is_null", types.Bool(), "Whether the value is null.", optional=True,
                  computed=True, requires_replace=True),
        ]
    ),
)


class MetadataResource(RecordedResource):
    NAME = "metadata"
    SCHEMA = Schema(
        version=1,
        description="Use this resource to attach metadata to a resource; the UI shows it.",
        attributes=[
            uuid_attribute(),
            _attr("resource_id", types.String(), "The `id` of the resource to describe.",
                  required=True, requires_replace=True),
            _attr("hide", types.Bool(), "Hide the resource in the UI.", **_FN),
            _attr("icon", types.String(), "A URL to an icon shown with the resource.", **_FN),
            _attr("daily_cost", types.Number(), "Quota units the resource costs per day.", **_FN),
        ],
        block_types=[_ITEM],
    )

    def validate(self, diags: Diagnostics, type_name: str, config: Config) -> None:
        super().validate(diags, type_name, config)
        items = config.get("item")
        if isinstance(items, list):
            if not items:
                diags.add_error("at least one `item` block is required", path=["item"])
            check_unique_keys(diags, items, "item", "metadata")
        cost = config.get("daily_cost")
        if isinstance(cost, int | float) and (cost < 0 or cost != int(cost)):
            diags.add_error("daily_cost must be a whole number of at least 0", path=["daily_cost"])


class AgentInstanceResource(RecordedResource):
    NAME = "agent_instance"
    SCHEMA = Schema(
        version=1,
        description="Use this resource to tie an agent to a cloud instance (instance-identity "
        "authentication).",
        attributes=[
            uuid_attribute(),
            agent_id_attribute(),
            _attr("instance_id", types.String(), "The instance id of the agent's machine.",
                  required=True, requires_replace=True),
        ],
    )
