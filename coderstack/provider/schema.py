"""Schema building blocks the PyPI `tf` package lacks, shaped like terraform-plugin-sdk's.

`tf` ships String/Number/Bool/List/Set/Map and set-nested blocks.  Coder's provider also uses
list-nested blocks (``coder_agent.metadata``), set blocks limited to one element
(``display_apps``, ``healthcheck``) and computed lists of objects (``rbac_roles``), so those live
here.  Types are described to Terraform in cty's JSON type notation, e.g.
``["list",["object",{"name":"string"}]]``.
"""

from __future__ import annotations

import json
from typing import Any

from tf import types
from tf.blocks import SetNestedBlock
from tf.gen import tfplugin_pb2 as pb
from tf.schema import Block


class Object(types.TfType):
    """A cty object with fixed attribute types; Python value is a dict (or None)."""

    def __init__(self, attributes: dict[str, types.TfType]):
        self.attributes = attributes

    def encode(self, value: Any) -> Any:
        if value is None or value is types.Unknown:
            return value
        return {k: t.encode(value.get(k)) for k, t in self.attributes.items()}

    def decode(self, value: Any) -> Any:
        if value is None or value is types.Unknown:
            return value
        return {k: t.decode(value.get(k)) for k, t in self.attributes.items()}

    def tf_type(self) -> bytes:
        inner = {k: json.loads(t.tf_type()) for k, t in sorted(self.attributes.items())}
        return json.dumps(["object", inner], separators=(",", ":")).encode()


class SetBlock(SetNestedBlock):
    """A set-nested block with optional item limits (SDKv2 ``TypeSet`` of ``Resource``)."""

    def __init__(self, type_name: str, block: Block, max_items: int | None = None):
        super().__init__(type_name, block)
        self.max_items = max_items


class ListBlock(SetBlock):
    """A list-nested block (SDKv2 ``TypeList`` of ``Resource``): ordered, duplicates allowed."""

    def to_pb(self) -> pb.Schema.NestedBlock:
        msg = super().to_pb()
        msg.nesting = pb.Schema.NestedBlock.NestingMode.LIST
        return msg

    def semantically_equal(self, a_decoded: Any, b_decoded: Any) -> bool:
        return a_decoded == b_decoded
