"""The build runner against a fake process reactor: terraform's arguments and environment,
its output as log lines, its errors, cancel, and one build at a time per directory."""

from __future__ import annotations

from pathlib import Path

from twisted.internet import defer, error
from twisted.python.failure import Failure
from twisted.trial import unittest

from coderstack.provider.launcher import write_provider_executable
from coderstack.server.provisioner import TerraformRunner
from coderstack.server.tferrors import BuildError, TemplateError
from coderstack.server.tfworkdir import WorkspaceInfo

WS = WorkspaceInfo(id="wid", name="dev", owner_id="oid", owner_name="alice")


class FakeProcessReactor:
    """Records spawnProcess calls; the test plays the child's part."""

    def __init__(self):
        self.spawned = []

    def spawnProcess(self, proto, executable, args, env=None, path=None, **kw):
        self.spawned.append((proto, args, env, path))
        proto.makeConnection(None)


class RunnerTests(unittest.TestCase):
    def setUp(self):
        root = Path(self.mktemp())
        root.mkdir()
        self.provider = write_provider_executable(root / "bin")
        self.template = root / "t"
        self.template.mkdir()
        (self.template / "main.tf").write_text("# t")
        self.work = root / "work"
        self.reactor = FakeProcessReactor()
        self.runner = TerraformRunner(self.provider, reactor=self.reactor, terraform="sh",
                                      agent_scripts={})

    def finish(self, code: int | None, out: bytes = b"", err: bytes = b"") -> None:
        proto = self.reactor.spawned[-1][0]
        if out:
            proto.childDataReceived(1, out)
        if err:
            proto.childDataReceived(2, err)
        reason = error.ProcessDone(0) if code == 0 else error.ProcessTerminated(exitCode=code)
        proto.processEnded(Failure(reason))

    def test_logs_lines_and_reports_terraform_error(self):
        lines = []
        d = self.runner.build(self.template, self.work, "start", "http://h", WS, log=lines.append)
        _, args, env, path = self.reactor.spawned[0]
        self.assertEqual(args[1:], ["init", "-input=false", "-no-color"])
        self.assertEqual(path, str(self.work))
        self.assertEqual(env["CODER_WORKSPACE_ID"], "wid")
        self.finish(0, b"Initializing...\npartial")
        _, args, _, _ = self.reactor.spawned[1]
        self.assertEqual(args[1:], ["apply", "-auto-approve", "-input=false", "-no-color"])
        self.finish(1, b"plan output\n", b"\nError: Reference to undeclared resource\n\n  on main.tf line 3\n")
        failure = self.failureResultOf(d, BuildError)
        self.assertEqual(failure.value.command, "apply")
        self.assertEqual(failure.value.exit_code, 1)
        self.assertIn("Error: Reference to undeclared resource", failure.value.message)
        self.assertIn("on main.tf line 3", str(failure.value))
        self.assertEqual(lines[:2], ["Initializing...", "partial"])
        self.assertIn("Error: Reference to undeclared resource", lines)

    def test_destroy_args(self):
        self.runner.build(self.template, self.work, "destroy", "http://h")
        self.finish(0)
        self.assertEqual(self.reactor.spawned[1][1][1:3], ["apply", "-destroy"])

    def test_failed_init_stops_the_build(self):
        d = self.runner.build(self.template, self.work, "start", "http://h")
        self.finish(1, err=b"Error: Failed to query available provider packages\n")
        self.assertEqual(len(self.reactor.spawned), 1)
        self.assertEqual(self.failureResultOf(d, BuildError).value.command, "init")

    def test_killed_terraform(self):
        d = self.runner.build(self.template, self.work, "start", "http://h")
        proto = self.reactor.spawned[-1][0]
        proto.processEnded(Failure(error.ProcessTerminated(exitCode=None, signal=9)))
        self.assertEqual(self.failureResultOf(d, BuildError).value.exit_code, -9)

    def test_builds_of_one_workspace_are_serialized(self):
        d1 = self.runner.build(self.template, self.work, "start", "http://h")
        d2 = self.runner.build(self.template, self.work, "stop", "http://h")
        self.assertEqual(len(self.reactor.spawned), 1)
        self.finish(0)
        self.finish(0)
        self.successResultOf(d1)
        self.assertEqual(len(self.reactor.spawned), 3)
        self.finish(0)
        self.finish(0)
        self.assertEqual(self.successResultOf(d2).transition, "stop")

    def test_cancel_interrupts_terraform(self):
        d = self.runner.build(self.template, self.work, "start", "http://h")
        proto = self.reactor.spawned[-1][0]
        signals = []
        proto.transport = type("T", (), {"signalProcess": lambda self, sig: signals.append(sig)})()
        d.cancel()
        self.assertEqual(signals, ["INT"])
        self.failureResultOf(d, defer.CancelledError)
        proto.processEnded(Failure(error.ProcessTerminated(exitCode=1)))  # later exit is ignored
        self.assertEqual(len(self.reactor.spawned), 1)

    def test_bad_transition(self):
        self.assertRaises(ValueError, self.runner.build, self.template, self.work, "pause", "http://h")

    def test_validate_failure_is_template_error(self):
        d = self.runner.validate(self.template)
        self.finish(0)
        self.assertEqual(self.reactor.spawned[1][1][1], "validate")
        self.finish(1, err=b"Error: Unsupported argument\n")
        self.assertIn("Unsupported argument", self.failureResultOf(d, TemplateError).value.message)
