"""CDKTF (0.21, JSON output) constructs for coderstack templates.

``CoderProvider``     the ``coder`` provider block (``url``: the per-template access-URL override)
                      and ``required_providers.coder = coder/coder``.
``CoderWorkspace``    data source ``coder_workspace`` (``start_count``, ``transition``, ...).
``CoderWorkspaceOwner`` data source ``coder_workspace_owner``.
``CoderAgent``        resource ``coder_agent`` (``id``, ``token``, ``init_script`` references).
``CoderApp``          resource ``coder_app``.
``LocalProcessWorkspace`` a ``terraform_data`` whose create-time ``local-exec`` runs the agent's
                      ``init_script`` (the bootstrap) on this machine with ``CODER_AGENT_TOKEN``
                      set, and whose destroy-time ``local-exec`` stops the agent by its pidfile.

``synth_template(build, out_file)`` runs a stack through cdktf and writes its ``cdk.tf.json``
with the local-backend block removed (no absolute state path: the provisioner keeps the state
in the workspace's build directory).

Attributes are emitted by overriding jsii's protected ``_synthesize_attributes`` (so there are
no generated bindings and no ``cdktf get``); Terraform expressions are plain ``${...}`` strings.
"""

from __future__ import annotations

from coderstack.cdk.resources import (
    CoderAgent,
    CoderApp,
    CoderProvider,
    CoderWorkspace,
    CoderWorkspaceOwner,
    LocalProcessWorkspace,
    terraform_escape,
)
from coderstack.cdk.synth import synth_template

__all__ = [
    "CoderAgent",
    "CoderApp",
    "CoderProvider",
    "CoderWorkspace",
    "CoderWorkspaceOwner",
    "LocalProcessWorkspace",
    "synth_template",
    "terraform_escape",
]
