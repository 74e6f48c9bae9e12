"""The agent bootstrap scripts the server hands Terraform as ``CODER_AGENT_SCRIPT_<os>_<arch>``.

Coder's provisioner puts one script per OS/architecture in the environment; the provider copies
the matching one into ``coder_agent.init_script`` after replacing ``${ACCESS_URL}`` (the provider
``url`` with path ``/``) and ``${AUTH_TYPE}``.  ``${ARCH}`` is replaced here, before Terraform
runs, as Coder does.  Coder's Linux script downloads the ``coder`` binary from the access URL;
ours starts the agent of the running installation instead: ``twistd coderstack-agent``,
daemonized, with a pidfile and a log file in a per-agent directory.

The scripts use ``$VAR`` forms only (no ``${VAR:-x}``, no ``set -u``) so that the only ``${``
in them are the placeholders; the stop script has none and can be embedded literally in
Terraform configuration, where ``${`` would start an interpolation.

The bootstrap reads from its environment:

``CODER_AGENT_TOKEN``   required; the agent's token (never on a command line).
``CODERSTACK_AGENT_DIR`` where the pidfile ``agent.pid`` and log ``agent.log`` go;
                        default ``$HOME/.coderstack/agent``.
``CODER_AGENT_DATA_DIR`` the agent's key directory; default ``$CODERSTACK_AGENT_DIR/data``.

and exports ``CODER_AGENT_URL`` and ``CODER_AGENT_AUTH`` for the agent, after dropping the
provisioner's ``CODER_WORKSPACE_*``, ``CODER_AGENT_SCRIPT_*`` and ``TF_*`` variables (a local-exec
provisioner hands the bootstrap Terraform's whole environment).  A second run while the
agent is alive does nothing.  The stop script ends the process named by the pidfile, after
checking that the process really is the one started with that pidfile.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping, Sequence

from coderstack.provider.agent import ARCHITECTURES, agent_script_env_name

PIDFILE_NAME = "agent.pid"
LOGFILE_NAME = "agent.log"

_LINUX_BOOTSTRAP = """\
#!/bin/sh
# coderstack agent bootstrap (linux/${ARCH})
set -e
if [ -z "$CODER_AGENT_TOKEN" ]; then
  echo "coderstack bootstrap: CODER_AGENT_TOKEN is not set" >&2
  exit 1
fi
AGENT_DIR="$CODERSTACK_AGENT_DIR"
if [ -z "$AGENT_DIR" ]; then AGENT_DIR="$HOME/.coderstack/agent"; fi
mkdir -p "$AGENT_DIR"
chmod 700 "$AGENT_DIR"
PIDFILE="$AGENT_DIR/@PIDFILE@"
LOGFILE="$AGENT_DIR/@LOGFILE@"
if [ -s "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
  echo "coderstack bootstrap: agent already running (pid $(cat "$PIDFILE"))"
  exit 0
fi
rm -f "$PIDFILE"
# The agent needs none of the provisioner's variables, and some are secrets (the owner's
# session token): drop them before it inherits this environment.
for name in $(env | cut -d= -f1 | grep -E '^(CODER_WORKSPACE_|CODER_AGENT_SCRIPT_|TF_)[A-Za-z0-9_]*$'); do
  unset "$name"
done
export CODER_AGENT_URL="${ACCESS_URL}"
export CODER_AGENT_AUTH="${AUTH_TYPE}"
export CODER_AGENT_TOKEN
# Each agent keeps its own keys, even when several run on one host.
if [ -z "$CODER_AGENT_DATA_DIR" ]; then CODER_AGENT_DATA_DIR="$AGENT_DIR/data"; fi
export CODER_AGENT_DATA_DIR
@EXPORTS@cd "$AGENT_DIR"
# twistd forks, writes the pidfile and exits once the agent service has started.
@COMMAND@ --pidfile "$PIDFILE" --logfile "$LOGFILE" coderstack-agent
echo "coderstack bootstrap: agent started (pid $(cat "$PIDFILE"), log $LOGFILE)"
"""

_LINUX_STOP = """\
#!/bin/sh
# coderstack agent stop: end the daemon named by the pidfile in $CODERSTACK_AGENT_DIR.
AGENT_DIR="$CODERSTACK_AGENT_DIR"
if [ -z "$AGENT_DIR" ]; then AGENT_DIR="$HOME/.coderstack/agent"; fi
PIDFILE="$AGENT_DIR/@PIDFILE@"
if [ ! -s "$PIDFILE" ]; then
  echo "coderstack stop: no pidfile at $PIDFILE"
  exit 0
fi
PID="$(cat "$PIDFILE")"
case "$PID" in ''|*[!0-9]*) echo "coderstack stop: bad pidfile" >&2; rm -f "$PIDFILE"; exit 0;; esac
# Only signal the process started with this pidfile: a stale pid may belong to someone else.
if [ -r "/proc/$PID/cmdline" ] && tr '\\000' '\\n' < "/proc/$PID/cmdline" | grep -qxF "$PIDFILE"; then
  kill -TERM "$PID" 2>/dev/null || true
  i=0
  while kill -0 "$PID" 2>/dev/null && [ "$i" -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
  if kill -0 "$PID" 2>/dev/null; then kill -KILL "$PID" 2>/dev/null || true; fi
  echo "coderstack stop: agent $PID stopped"
else
  echo "coderstack stop: pid $PID is not our agent; leaving it alone"
fi
rm -f "$PIDFILE"
"""


def linux_bootstrap(
    twistd: str | Sequence[str],
    arch: str | None = None,
    extra_env: Mapping[str, str] | None = None,
) -> str:
    """The Linux bootstrap text.

    ``twistd`` is the absolute path of the installation's ``twistd`` (or an argv prefix, e.g.
    ``[python, "-m", "twisted"]``).  ``arch`` replaces ``${ARCH}`` when given; otherwise it is
    left for :func:`agent_script_env`.  ``extra_env`` is exported for the agent (e.g.
    ``PYTHONPATH`` for a source checkout).  ``${ACCESS_URL}`` and ``${AUTH_TYPE}`` stay for the
    provider to fill in."""
    argv = [twistd] if isinstance(twistd, str) else list(twistd)
    command = " ".join(shlex.quote(a) for a in argv)
    exports = "".join(
        f"export {name}={shlex.quote(value)}\n" for name, value in sorted((extra_env or {}).items())
    )
    for name in extra_env or {}:
        if not name.isidentifier():
            raise ValueError(f"not an environment variable name: {name!r}")
    text = (
        _LINUX_BOOTSTRAP.replace("@PIDFILE@", PIDFILE_NAME)
        .replace("@LOGFILE@", LOGFILE_NAME)
        .replace("@EXPORTS@", exports)
        .replace("@COMMAND@", command)
    )
    if arch is not None:
        text = text.replace("${ARCH}", arch)
    return text


def linux_stop_script() -> str:
    """Shell script that stops the agent whose pidfile is in ``$CODERSTACK_AGENT_DIR``.

    It contains no ``${`` so it can be embedded literally in Terraform configuration."""
    return _LINUX_STOP.replace("@PIDFILE@", PIDFILE_NAME)


def agent_script_env(
    twistd: str | Sequence[str], extra_env: Mapping[str, str] | None = None
) -> dict[str, str]:
    """``CODER_AGENT_SCRIPT_linux_<arch>`` for every architecture, ``${ARCH}`` filled in, ready
    to be added to Terraform's environment (as Coder's ``provisionersdk.AgentScriptEnv``)."""
    return {
        agent_script_env_name("linux", arch): linux_bootstrap(twistd, arch, extra_env)
        for arch in ARCHITECTURES
    }
