"""What every ``coder_*`` resource and data source of this provider does the same way.

A resource here only records its arguments: create mints its UUIDs (``id``, for the agent also
``token``) and fills the SDK defaults of attributes left unknown, update keeps the minted values,
read returns the state, delete does nothing.  A resource adds its checks on the planned values
(``check``) and the values derived anew on every create, read and update (``derive``).
"""

from __future__ import annotations

import uuid
from typing import Any, ClassVar

from tf import types
from tf.iface import (
    Config,
    CreateContext,
    DataSource,
    DeleteContext,
    ReadContext,
    Resource,
    State,
    UpdateContext,
)
from tf.schema import Attribute, Schema
from tf.utils import Diagnostics

from coderstack.provider.context import ProviderContext

#: An optional argument whose change replaces the resource (ForceNew in the SDK).
FORCE_NEW: dict[str, Any] = {"optional": True, "requires_replace": True}


def attr(name: str, t: types.TfType, desc: str, **kw: Any) -> Attribute:
    return Attribute(name, t, description=desc, **kw)


def check_choice(diags: Diagnostics, config: Config, key: str, choices: tuple[str, ...]) -> None:
    value = config.get(key)
    if isinstance(value, str) and value not in choices:
        diags.add_error(
            f"invalid {key} {value!r}",
            f"{key} must be one of: {', '.join(choices)}",
            path=[key],
        )


def check_unique_keys(diags: Diagnostics, items: object, block: str, what: str) -> None:
    """An error for each ``key`` repeated among the items of a list-nested block."""
    if not isinstance(items, list):
        return
    seen: set[str] = set()
    for item in items:
        key = item.get("key") if isinstance(item, dict) else None
        if isinstance(key, str):
            if key in seen:
                diags.add_error(f"duplicate {what} key {key!r}", path=[block])
            seen.add(key)


class _Declared:
    """Named ``coder_`` + ``NAME``, described by ``SCHEMA``, reading the provider's settings."""

    NAME: ClassVar[str]
    SCHEMA: ClassVar[Schema]

    def __init__(self, provider: ProviderContext):
        self.provider = provider

    @classmethod
    def get_name(cls) -> str:
        return cls.NAME

    @classmethod
    def get_schema(cls) -> Schema:
        return cls.SCHEMA


class RecordedResource(_Declared, Resource):
    """A resource whose state is its arguments plus values minted at create."""

    #: Computed attributes given a fresh UUID at create and kept for the resource's life.
    MINTED: ClassVar[tuple[str, ...]] = ("id",)

    def check(self, diags: Diagnostics, state: State) -> None:
        """Checks that need the planned values (defaults filled in)."""

    def derive(self, state: State) -> State:
        """Fill the values computed from the others; called on every create, read and update."""
        return state

    def create(self, ctx: CreateContext, planned: State) -> State:
        state = dict(planned)
        for key in self.MINTED:
            state[key] = str(uuid.uuid4())
        for a in self.SCHEMA.attributes:
            if state.get(a.name) is types.Unknown:
                state[a.name] = a.default if a.default is not types.Unknown else None
        self.check(ctx.diagnostics, state)
        return self.derive(state)

    def read(self, ctx: ReadContext, current: State) -> State:
        return self.derive(dict(current))

    def update(self, ctx: UpdateContext, current: State, planned: State) -> State:
        state = dict(planned)
        for key in self.MINTED:
            state[key] = current[key]
        return self.derive(state)

    def delete(self, ctx: DeleteContext, current: State) -> None:
        return None


class ProviderDataSource(_Declared, DataSource):
    """A data source; subclasses write ``read``."""
