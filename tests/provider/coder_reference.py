"""terraform-provider-coder's schema, as the reference describes it (names, types, flags).

Flags: R required, O optional, C computed, S sensitive.  Where the SDK gives an attribute a
``Default`` our provider declares it optional + computed ("OC*"), which the plugin protocol needs
for a default to show in the plan; that is the one deliberate difference.
"""

PROVIDER = {"url": ("string", "O")}

AGENT = {
    "id": ("string", "OC"),
    "arch": ("string", "R"),
    "os": ("string", "R"),
    "auth": ("string", "OC*"),
    "dir": ("string", "O"),
    "env": (["map", "string"], "O"),
    "startup_script": ("string", "O"),
    "shutdown_script": ("string", "O"),
    "startup_script_behavior": ("string", "OC*"),
    "connection_timeout": ("number", "OC*"),
    "troubleshooting_url": ("string", "O"),
    "motd_file": ("string", "O"),
    "order": ("number", "O"),
    "api_key_scope": ("string", "OC*"),
    "token": ("string", "CS"),
    "init_script": ("string", "C"),
}
AGENT_BLOCKS = {
    "metadata": ("list", None, {"key", "display_name", "script", "interval", "timeout", "order"}),
    "display_apps": (
        "set", 1, {"vscode", "vscode_insiders", "web_terminal", "ssh_helper", "port_forwarding_helper"},
    ),
    "resources_monitoring": ("set", 1, set()),
}

APP = {
    "id": ("string", "OC"),
    "agent_id": ("string", "R"),
    "slug": ("string", "R"),
    "display_name": ("string", "O"),
    "icon": ("string", "O"),
    "url": ("string", "O"),
    "command": ("string", "O"),
    "external": ("bool", "OC*"),
    "subdomain": ("bool", "O"),
    "share": ("string", "OC*"),
    "group": ("string", "O"),
    "order": ("number", "O"),
    "hidden": ("bool", "OC*"),
    "open_in": ("string", "OC*"),
    "tooltip": ("string", "O"),
}
APP_BLOCKS = {"healthcheck": ("set", 1, {"url", "interval", "threshold"})}

WORKSPACE = {
    "id": ("string", "C"),
    "name": ("string", "C"),
    "transition": ("string", "C"),
    "start_count": ("number", "C"),
    "access_url": ("string", "C"),
    "access_port": ("number", "C"),
    "template_id": ("string", "C"),
    "template_name": ("string", "C"),
    "template_version": ("string", "C"),
    "is_prebuild": ("bool", "C"),
    "prebuild_count": ("number", "C"),
    "is_prebuild_claim": ("bool", "C"),
}

OWNER = {
    "id": ("string", "C"),
    "name": ("string", "C"),
    "full_name": ("string", "C"),
    "email": ("string", "C"),
    "ssh_public_key": ("string", "C"),
    "ssh_private_key": ("string", "CS"),
    "groups": (["list", "string"], "C"),
    "session_token": ("string", "CS"),
    "oidc_access_token": ("string", "CS"),
    "oidc_id_token": ("string", "CS"),
    "login_type": ("string", "C"),
    "rbac_roles": (["list", ["object", {"name": "string", "org_id": "string"}]], "C"),
}


def flags(attr: dict) -> str:
    """Flags of an attribute in Terraform's ``providers schema -json`` form."""
    out = "".join(f for f, key in (("R", "required"), ("O", "optional"), ("C", "computed"))
                  if attr.get(key))
    return out + ("S" if attr.get("sensitive") else "")


def expected_flags(spec: str) -> str:
    return spec.replace("*", "")

PROVISIONER = {"id": ("string", "C"), "os": ("string", "C"), "arch": ("string", "C")}

PARAMETER = {
    "id": ("string", "C"),
    "value": ("string", "C"),
    "name": ("string", "R"),
    "display_name": ("string", "O"),
    "description": ("string", "O"),
    "type": ("string", "OC*"),
    "mutable": ("bool", "OC*"),
    "ephemeral": ("bool", "OC*"),
    "default": ("string", "O"),
    "icon": ("string", "O"),
    "order": ("number", "O"),
    "optional": ("bool", "C"),
}
PARAMETER_BLOCKS = {
    "option": ("list", 64, {"name", "description", "value", "icon"}),
    "validation": ("list", 1, {"min", "min_disabled", "max", "max_disabled", "monotonic", "regex", "error"}),
}

SCRIPT = {
    "id": ("string", "OC"),
    "agent_id": ("string", "R"),
    "display_name": ("string", "R"),
    "log_path": ("string", "O"),
    "icon": ("string", "O"),
    "script": ("string", "R"),
    "cron": ("string", "O"),
    "start_blocks_login": ("bool", "OC*"),
    "run_on_start": ("bool", "OC*"),
    "run_on_stop": ("bool", "OC*"),
    "timeout": ("number", "OC*"),
}

ENV = {
    "id": ("string", "OC"),
    "agent_id": ("string", "R"),
    "name": ("string", "R"),
    "value": ("string", "O"),
    "merge_strategy": ("string", "OC*"),
}

METADATA = {
    "id": ("string", "OC"),
    "resource_id": ("string", "R"),
    "hide": ("bool", "O"),
    "icon": ("string", "O"),
    "daily_cost": ("number", "O"),
}
METADATA_BLOCKS = {"item": ("list", None, {"key", "value", "sensitive", "is_null"})}

AGENT_INSTANCE = {
    "id": ("string", "OC"),
    "agent_id": ("string", "R"),
    "instance_id": ("string", "R"),
}
