"""A workspace's build directory and the environment terraform runs in.

What a build writes, all inside the workspace's own directory (which keeps
``terraform.tfstate`` from build to build, so stop/destroy act on what start made):

- the template's files (top level, Terraform-related suffixes), replacing those of the previous
  version (their names are kept in ``.coderstack/template-files.json``);
- ``.coderstack/mirror``: our ``coder/coder`` provider packed as a Terraform filesystem mirror
  (by ``tf.runner.install_provider``), repacked only when the executable changes;
- ``.coderstack/terraformrc``: the CLI config (``TF_CLI_CONFIG_FILE``) whose
  ``filesystem_mirror`` holds that provider, so a plain ``terraform init`` installs it and the
  unreachable registry is never asked for ``coder/coder``.

Terraform gets Coder's provisioner environment: ``CODER_AGENT_URL`` (the access URL),
``CODER_WORKSPACE_*``, ``CODER_WORKSPACE_OWNER_*``, the agent bootstraps
``CODER_AGENT_SCRIPT_<os>_<arch>`` and the ``coder_parameter`` values; of the parent's
environment only :data:`SAFE_ENV` passes.

Why a filesystem mirror and not ``dev_overrides``: with overrides Terraform warns that
``terraform init`` "may error unexpectedly", and it does: init still asks the registry for
``coder/coder`` versions and fails offline, so a template that needs init for anything else (a
module, a backend) could not build.  The mirror goes through the normal install path.  Because a
mirror must satisfy the template's ``version`` constraint, the same executable is published as
0.999.0, 1.999.0 and 2.999.0: any ``>=``, ``~> N`` or ``~> N.M`` constraint on a 0.x, 1.x or 2.x
release (what Coder templates write) is met.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from tf.runner import install_provider

from coderstack.provider.launcher import EXECUTABLE_NAME
from coderstack.provider.parameter import parameter_env_name
from coderstack.server.tferrors import TemplateError

PROVIDER_ADDRESS = "registry.terraform.io/coder/coder"
MIRROR_VERSIONS = ("0.999.0", "1.999.0", "2.999.0")
#: Our own files inside a build directory.
META_DIR = ".coderstack"
TEMPLATE_SUFFIXES = (".tf", ".tf.json", ".tfvars", ".tfvars.json", ".tftpl", ".tpl", ".sh", ".ps1")
#: Parent environment variables Terraform may inherit (Coder's safeEnviron drops CODER_*).
SAFE_ENV = (
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "SHELL",
    "LANG",
    "LC_ALL",
    "LC_CTYPE",
    "TZ",
    "TMPDIR",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
)
#: A template: a directory, or its files as {file name: content} (e.g. as pushed to the API).
TemplateSource = str | os.PathLike[str] | Mapping[str, str | bytes]


@dataclass(frozen=True)
class WorkspaceInfo:
    """What Coder's provisioner tells the provider about the build (``CODER_WORKSPACE_*``)."""

    id: str
    name: str
    owner_id: str
    owner_name: str  # the username
    owner_email: str = ""
    owner_full_name: str = ""
    owner_session_token: str = field(default="", repr=False)
    owner_groups: tuple[str, ...] = ()
    owner_login_type: str = ""
    template_id: str = ""
    template_name: str = ""
    template_version: str = ""
    build_id: str = ""


def cli_config_text(mirror_dir: Path) -> str:
    quoted = json.dumps(str(mirror_dir))
    addr = json.dumps(PROVIDER_ADDRESS)
    return (
        "# Written by coderstack for one workspace build.\n"
        "provider_installation {\n"
        f"  filesystem_mirror {{\n    path    = {quoted}\n    include = [{addr}]\n  }}\n"
        f"  direct {{\n    exclude = [{addr}]\n  }}\n"
        "}\n"
    )


def install_provider_mirror(mirror_dir: Path, provider_path: Path) -> None:
    """Pack ``provider_path`` (named terraform-provider-coder) into ``mirror_dir``."""
    if provider_path.name != EXECUTABLE_NAME:
        raise ValueError(f"the provider executable must be named {EXECUTABLE_NAME}")
    if mirror_dir.exists():
        shutil.rmtree(mirror_dir)
    for version in MIRROR_VERSIONS:
        install_provider(
            "registry.terraform.io", "coder", "coder", version, mirror_dir, provider_path
        )


def prepare_work_dir(work_dir: Path, provider_path: Path, template: TemplateSource | None) -> Path:
    """Create the build directory, refresh its copy of the template (dropping files of a
    previous version) and its provider mirror; return the CLI config path."""
    meta = work_dir / META_DIR
    meta.mkdir(parents=True, exist_ok=True)
    if template is not None:
        copy_template(template, work_dir)
    # Repack the mirror only when the provider executable changed; then the old lock file
    # (which pins the old package's hash) must go too, or init would refuse the new one.
    stamp = meta / "provider.sha256"
    digest = hashlib.sha256(provider_path.read_bytes() + repr(MIRROR_VERSIONS).encode()).hexdigest()
    if not stamp.exists() or stamp.read_text() != digest or not (meta / "mirror").exists():
        install_provider_mirror(meta / "mirror", provider_path)
        (work_dir / ".terraform.lock.hcl").unlink(missing_ok=True)
        stamp.write_text(digest)
    rc = meta / "terraformrc"
    rc.write_text(cli_config_text(meta / "mirror"))
    return rc


def template_files(template: TemplateSource) -> dict[str, bytes]:
    """The template's files (top level, Terraform-related suffixes) by name.

    Raises :class:`TemplateError` when there is no ``*.tf``/``*.tf.json`` or a name is not a
    plain file name."""
    if isinstance(template, Mapping):
        files = {}
        for name, content in template.items():
            if "/" in name or "\\" in name or name.startswith(".") or not name:
                raise TemplateError("validate", f"not a plain file name: {name!r}")
            if name.endswith(TEMPLATE_SUFFIXES):
                files[name] = content.encode() if isinstance(content, str) else bytes(content)
        where = "the template"
    else:
        where = str(template)
        files = {
            p.name: p.read_bytes()
            for p in Path(template).iterdir()
            if p.is_file() and p.name.endswith(TEMPLATE_SUFFIXES)
        }
    if not any(name.endswith((".tf", ".tf.json")) for name in files):
        raise TemplateError("validate", f"no *.tf or *.tf.json files in {where}")
    return dict(sorted(files.items()))


def copy_template(template: TemplateSource, work_dir: Path) -> None:
    """Put the template's files in ``work_dir``, removing those of the previous version."""
    files = template_files(template)
    manifest = work_dir / META_DIR / "template-files.json"
    if manifest.exists():
        for name in json.loads(manifest.read_text()):
            (work_dir / name).unlink(missing_ok=True)
    for name, content in files.items():
        (work_dir / name).write_bytes(content)
    manifest.write_text(json.dumps(list(files)))


def terraform_env(
    *,
    cli_config: Path,
    access_url: str,
    transition: str,
    workspace: WorkspaceInfo | None,
    agent_scripts: Mapping[str, str],
    base_env: Mapping[str, str] | None = None,
    parameters: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The environment of a terraform run, as Coder's ``provisionEnv`` builds it; ``parameters``
    are the workspace's ``coder_parameter`` values by name."""
    parent = os.environ if base_env is None else base_env
    env = {k: parent[k] for k in SAFE_ENV if k in parent}
    env.setdefault("PATH", os.defpath)
    env.update(
        TF_CLI_CONFIG_FILE=str(cli_config),
        CHECKPOINT_DISABLE="1",
        TF_IN_AUTOMATION="1",
        TF_INPUT="0",
        CODER_AGENT_URL=access_url,
        # Coder's data source knows start and stop; a destroy runs with the stop transition.
        CODER_WORKSPACE_TRANSITION="stop" if transition == "destroy" else transition,
    )
    if workspace is not None:
        env.update(
            CODER_WORKSPACE_ID=workspace.id,
            CODER_WORKSPACE_NAME=workspace.name,
            CODER_WORKSPACE_OWNER=workspace.owner_name,
            CODER_WORKSPACE_OWNER_ID=workspace.owner_id,
            CODER_WORKSPACE_OWNER_EMAIL=workspace.owner_email,
            CODER_WORKSPACE_OWNER_NAME=workspace.owner_full_name,
            CODER_WORKSPACE_OWNER_SESSION_TOKEN=workspace.owner_session_token,
            CODER_WORKSPACE_OWNER_GROUPS=json.dumps(list(workspace.owner_groups)),
            CODER_WORKSPACE_OWNER_LOGIN_TYPE=workspace.owner_login_type,
            CODER_WORKSPACE_TEMPLATE_ID=workspace.template_id,
            CODER_WORKSPACE_TEMPLATE_NAME=workspace.template_name,
            CODER_WORKSPACE_TEMPLATE_VERSION=workspace.template_version,
            CODER_WORKSPACE_BUILD_ID=workspace.build_id,
        )
    env.update(agent_scripts)
    for name, value in (parameters or {}).items():
        env[parameter_env_name(name)] = value
    return env
