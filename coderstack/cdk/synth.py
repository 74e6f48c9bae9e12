"""Synthesize a stack to a single, relocatable ``cdk.tf.json``."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION", "20")

from cdktf import App, TerraformStack
from constructs import Construct

STACK_NAME = "workspace"


def synth_document(build: Callable[[Construct], Any], stack_name: str = STACK_NAME) -> dict:
    """Run ``build(stack)`` inside a fresh cdktf App and return the synthesized JSON document,
    without the backend block cdktf adds (its absolute local path would tie the template to the
    machine that synthesized it)."""
    with tempfile.TemporaryDirectory(prefix="coderstack-cdktf-") as outdir:
        app = App(outdir=outdir)
        stack = TerraformStack(app, stack_name)
        build(stack)
        app.synth()
        doc = json.loads((Path(outdir) / "stacks" / stack_name / "cdk.tf.json").read_text())
    terraform = doc.get("terraform", {})
    terraform.pop("backend", None)
    meta = doc.get("//", {}).get("metadata", {})
    meta.pop("backend", None)
    return doc


def synth_template(
    build: Callable[[Construct], Any],
    out_file: str | os.PathLike[str],
    stack_name: str = STACK_NAME,
) -> Path:
    """Synthesize and write ``out_file`` (sorted keys, 2-space indent, trailing newline)."""
    doc = synth_document(build, stack_name)
    out = Path(out_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    return out
