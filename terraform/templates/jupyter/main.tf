# A workspace with Jupyter served through the coderstack server, as Coder's Jupyter module
# sets it up: one server behind a path-based app (it must know its prefix, so the app URL
# carries it) and one behind a subdomain app (no prefix). Both run from the startup script and
# stop with the shutdown script. The "machine" is this host, as in the workspace template.
terraform {
  required_providers {
    coder = {
      source  = "coder/coder"
      version = ">= 2.0.0"
    }
  }
}

variable "home" {
  type        = string
  description = "The workspace's directory."
}

variable "python" {
  type        = string
  description = "A Python that has jupyter-server and ipykernel installed."
}

variable "path_port" {
  type    = number
  default = 18888
}

variable "subdomain_port" {
  type    = number
  default = 18889
}

variable "subdomain_share" {
  type        = string
  default     = "owner"
  description = "Who may open the subdomain Jupyter: owner, authenticated or public."
}

data "coder_workspace" "me" {}
data "coder_workspace_owner" "me" {}

locals {
  prefix = "/@${data.coder_workspace_owner.me.name}/${data.coder_workspace.me.name}.main/apps/jupyter"
  # No token (the server authorizes every request); the app host is the server's, not localhost,
  # so Jupyter's local-Host check (a DNS-rebinding guard the server's own checks replace) is off.
  jupyter = "'${var.python}' -m jupyter server --allow-root --no-browser --ServerApp.ip=127.0.0.1 --ServerApp.allow_remote_access=True --IdentityProvider.token='' --ServerApp.password='' --ServerApp.root_dir='${var.home}'"
}

resource "coder_agent" "main" {
  os                      = "linux"
  arch                    = "amd64"
  dir                     = var.home
  env = {
    # Jupyter keeps its runtime files, config and data in the workspace, not in $HOME.
    JUPYTER_RUNTIME_DIR = "${var.home}/.jupyter/runtime"
    JUPYTER_CONFIG_DIR  = "${var.home}/.jupyter/config"
    JUPYTER_DATA_DIR    = "${var.home}/.jupyter/data"
  }
  startup_script_behavior = "non-blocking"
  startup_script          = <<-EOT
    set -e
    cd '${var.home}'
    nohup ${local.jupyter} --port=${var.path_port} --ServerApp.base_url='${local.prefix}/' > jupyter-path.log 2>&1 &
    echo $! > jupyter-path.pid
    nohup ${local.jupyter} --port=${var.subdomain_port} > jupyter-subdomain.log 2>&1 &
    echo $! > jupyter-subdomain.pid
    echo "jupyter started"
  EOT
  shutdown_script         = <<-EOT
    for f in '${var.home}'/jupyter-*.pid; do kill "$(cat "$f")" 2>/dev/null || true; done
  EOT
}

resource "coder_app" "jupyter" {
  agent_id     = coder_agent.main.id
  slug         = "jupyter"
  display_name = "Jupyter"
  url          = "http://localhost:${var.path_port}${local.prefix}"
  subdomain    = false
  share        = "owner"
  healthcheck {
    url       = "http://localhost:${var.path_port}${local.prefix}/api"
    interval  = 1
    threshold = 10
  }
}

resource "coder_app" "lab" {
  agent_id     = coder_agent.main.id
  slug         = "lab"
  display_name = "Jupyter (subdomain)"
  url          = "http://localhost:${var.subdomain_port}"
  subdomain    = true
  share        = var.subdomain_share
  healthcheck {
    url       = "http://localhost:${var.subdomain_port}/api"
    interval  = 1
    threshold = 10
  }
}

resource "terraform_data" "machine" {
  count = data.coder_workspace.me.start_count
  input = {
    agent_dir = "${abspath(path.root)}/.coderstack/agents/${coder_agent.main.id}"
  }
  triggers_replace = [coder_agent.main.id, sha256(coder_agent.main.init_script)]

  provisioner "local-exec" {
    interpreter = ["/bin/sh", "-c"]
    command     = coder_agent.main.init_script
    environment = {
      CODERSTACK_AGENT_DIR = self.input.agent_dir
      CODER_AGENT_TOKEN    = coder_agent.main.token
    }
  }

  provisioner "local-exec" {
    when        = destroy
    interpreter = ["/bin/sh", "-c"]
    command     = <<-EOT
      pid="$(cat '${self.output.agent_dir}/agent.pid' 2>/dev/null)" || exit 0
      kill -TERM "$pid" 2>/dev/null || exit 0
      i=0; while kill -0 "$pid" 2>/dev/null && [ "$i" -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
      kill -KILL "$pid" 2>/dev/null || true
    EOT
  }
}
