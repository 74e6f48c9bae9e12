"""Helpers for the tests that run the real ``terraform`` with our provider."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from coderstack.provider.launcher import write_provider_executable
from coderstack.server.tfworkdir import prepare_work_dir

TERRAFORM = shutil.which("terraform")
#: terraform is not a Debian package: it comes with this machine kind (CI runs on it), not from .ci/run.
SKIP_NO_TERRAFORM = None if TERRAFORM else "terraform is not on PATH (it comes with the machine; .ci/run does not install it)"
REPO = Path(__file__).resolve().parents[2]
EXAMPLE_TEMPLATE = REPO / "terraform" / "templates" / "local"
FAKE_TWISTD = Path(__file__).resolve().parent / "fake_twistd.py"


def fake_twistd_argv() -> list[str]:
    """A stand-in for ``twistd``: daemonizes, writes the pidfile, logs its agent env."""
    return [sys.executable, str(FAKE_TWISTD)]


class TerraformDir:
    """A directory with our provider installed through a filesystem mirror, as builds do."""

    def __init__(self, root: str):
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.provider = write_provider_executable(self.root / "bin")
        self.work = self.root / "work"
        self.work.mkdir(exist_ok=True)
        self.rc = prepare_work_dir(self.work, self.provider, None)

    def write(self, name: str, text: str) -> None:
        (self.work / name).write_text(text)

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CODER_", "TF_"))}
        env.update(TF_CLI_CONFIG_FILE=str(self.rc), CHECKPOINT_DISABLE="1", TF_IN_AUTOMATION="1")
        env.update(extra)
        return env

    def tf(self, *args: str, check: bool = True, **env: str) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            [TERRAFORM, *args, "-no-color"] if args[0] != "output" else [TERRAFORM, *args],
            cwd=self.work, env=self.env(**env), capture_output=True, text=True,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"terraform {args[0]} failed:\n{proc.stdout}\n{proc.stderr}")
        return proc

    def state(self) -> dict:
        return json.loads((self.work / "terraform.tfstate").read_text())

    def outputs(self) -> dict:
        out = self.tf("output", "-json")
        return {k: v["value"] for k, v in json.loads(out.stdout).items()}

    def resource(self, type_name: str, name: str) -> dict:
        for res in self.state()["resources"]:
            if res["type"] == type_name and res["name"] == name:
                return res["instances"][0]["attributes"]
        raise KeyError(f"{type_name}.{name}")


def kill_pidfiles(root: Path) -> None:
    """Cleanup: end any fake agent still named by a pidfile under ``root`` (by PID)."""
    for pidfile in root.rglob("agent.pid"):
        try:
            pid = int(pidfile.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if str(pidfile).encode() in cmdline:
            os.kill(pid, signal.SIGKILL)


def alive(pid: int) -> bool:
    """True if ``pid`` runs (a zombie waiting for its reaper counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
