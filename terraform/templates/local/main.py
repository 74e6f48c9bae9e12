"""Example template "local": one Linux agent started as a process on the coderstack host.

Regenerate ``cdk.tf.json`` next to this file (from the repository root):

    PYTHONPATH=. .venv/bin/python terraform/templates/local/main.py

The provider ``url`` comes from the template variable ``access_url_override``: empty (default) the
agent uses the deployment's access URL; set (``--url`` here, a ``*.tfvars`` file, or a template
variable at push time) it overrides it for this template's agents only.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

# Before cdktf is imported: jsii's Node 20 end-of-life banner is noise here.
os.environ.setdefault("JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION", "20")

from cdktf import TerraformVariable  # noqa: E402
from constructs import Construct  # noqa: E402

from coderstack.cdk import (  # noqa: E402
    CoderAgent,
    CoderApp,
    CoderProvider,
    CoderWorkspace,
    LocalProcessWorkspace,
    synth_template,
)

HERE = Path(__file__).resolve().parent


def build(stack: Construct, url: str | None = None) -> None:
    override = TerraformVariable(
        stack,
        "access_url_override",
        type="string",
        default=url or "",
        description="Access URL the agents use instead of the deployment's (empty: no override).",
    )
    # null leaves the provider on its default: the deployment's CODER_AGENT_URL.
    CoderProvider(
        stack,
        "coder",
        url=f'${{var.{override.friendly_unique_id} == "" ? null : '
        f"var.{override.friendly_unique_id}}}",
    )
    workspace = CoderWorkspace(stack, "me")
    agent = CoderAgent(
        stack,
        "main",
        os="linux",
        arch="amd64",
        startup_script="echo workspace started",
        metadata=[
            {
                "key": "load",
                "display_name": "Load",
                "script": "cut -d' ' -f1 /proc/loadavg",
                "interval": 10,
                "timeout": 1,
            }
        ],
    )
    CoderApp(
        stack,
        "hello",
        agent=agent,
        slug="hello",
        display_name="Hello",
        url="http://localhost:8000",
        share="owner",
        healthcheck={"url": "http://localhost:8000/", "interval": 5, "threshold": 6},
    )
    LocalProcessWorkspace(stack, "agent_process", agent=agent, workspace=workspace)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="bake this access URL override in as the variable default")
    parser.add_argument("--out", default=str(HERE / "cdk.tf.json"), help="output file")
    args = parser.parse_args()
    print(synth_template(lambda stack: build(stack, args.url), args.out))


if __name__ == "__main__":
    main()
