# A workspace template written the way Coder's example templates are: parameters, an agent with
# env, a startup script, metadata and display_apps, an app with a healthcheck, coder_script,
# coder_env and coder_metadata. The "machine" is this host: terraform_data runs the agent's
# init_script locally and stops the agent again when the workspace stops.
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
  description = "The workspace's directory (its scripts write here)."
}

variable "app_port" {
  type        = number
  default     = 8000
  description = "The port the workspace's web app listens on."
}

data "coder_workspace" "me" {}

data "coder_parameter" "greeting" {
  name         = "greeting"
  display_name = "Greeting"
  type         = "string"
  default      = "hello"
  mutable      = true
}

resource "coder_agent" "main" {
  os   = "linux"
  arch = "amd64"
  dir  = var.home
  env = {
    GREETING = data.coder_parameter.greeting.value
    EDITOR   = "vi"
  }
  startup_script_behavior = "blocking"
  startup_script          = <<-EOT
    set -e
    echo "startup: preparing $PWD"
    env | sort > "${var.home}/startup.env"
    echo "$GREETING" > "${var.home}/started"
    echo "startup: done"
  EOT
  shutdown_script = "echo bye > '${var.home}/stopped'"

  metadata {
    key          = "cpu"
    display_name = "CPU Usage"
    script       = "coder stat cpu"
    interval     = 1
    timeout      = 1
  }
  metadata {
    key          = "mem"
    display_name = "Memory Usage"
    script       = "coder stat mem"
    interval     = 1
    timeout      = 1
  }

  display_apps {
    vscode          = false
    vscode_insiders = false
    web_terminal    = true
    ssh_helper      = true
  }
}

resource "coder_env" "path_extra" {
  agent_id = coder_agent.main.id
  name     = "PROJECT_ROOT"
  value    = var.home
}

resource "coder_script" "dotfiles" {
  agent_id     = coder_agent.main.id
  display_name = "Dotfiles"
  run_on_start = true
  script       = "echo dotfiles installed > '${var.home}/dotfiles'"
}

resource "coder_script" "heartbeat" {
  agent_id     = coder_agent.main.id
  display_name = "Heartbeat"
  cron         = "*/2 * * * * *"
  script       = "date +%s >> '${var.home}/heartbeat'"
}

resource "coder_app" "web" {
  agent_id     = coder_agent.main.id
  slug         = "web"
  display_name = "Web"
  url          = "http://localhost:${var.app_port}"
  share        = "owner"
  healthcheck {
    url       = "http://localhost:${var.app_port}/"
    interval  = 1
    threshold = 1
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

resource "coder_metadata" "machine" {
  count       = data.coder_workspace.me.start_count
  resource_id = terraform_data.machine[0].id
  daily_cost  = 1
  item {
    key   = "host"
    value = "this machine"
  }
  item {
    key       = "secret"
    value     = "not-for-your-eyes"
    sensitive = true
  }
}
