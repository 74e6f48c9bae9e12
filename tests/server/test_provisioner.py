"""The build runner's pieces that need no terraform: env, CLI config, state reading, the
process protocol, and error reporting through a fake process reactor."""

from __future__ import annotations

from pathlib import Path

from twisted.internet import defer, error
from twisted.python.failure import Failure
from twisted.trial import unittest

from coderstack.provider.launcher import write_provider_executable
from coderstack.provider.parameter import parameter_env_name
from coderstack.server.provisioner import (
    META_DIR,
    BuildError,
    TemplateError,
    TerraformRunner,
    WorkspaceInfo,
    cli_config_text,
    copy_template,
    prepare_work_dir,
    read_agent_url,
    read_agents,
    read_parameters,
    read_resource_metadata,
    read_resources,
    terraform_env,
)

WS = WorkspaceInfo(id="wid", name="dev", owner_id="oid", owner_name="alice",
                   owner_email="a@example.com", owner_full_name="Alice", owner_session_token="st",
                   owner_groups=("g1",), template_id="tid", template_name="local",
                   template_version="v3", build_id="bid")


def state_doc() -> dict:
    agent = {"id": "agent-1", "token": "s3cr3t-agent-token", "os": "linux", "arch": "amd64", "auth": "token",
             "env": {"A": "1"}, "startup_script": "echo", "connection_timeout": 30,
             "startup_script_behavior": "blocking", "api_key_scope": "all", "init_script": "sh",
             "display_apps": [{"vscode": False, "web_terminal": None}],
             "metadata": [{"key": "k", "script": "s", "interval": 5, "timeout": None,
                           "display_name": None, "order": None}], "order": None}
    app = {"id": "app-1", "agent_id": "agent-1", "slug": "web", "url": "http://localhost:1",
           "share": "owner", "external": False, "hidden": False, "open_in": "slim-window",
           "subdomain": None, "healthcheck": [{"url": "http://localhost:1/h", "interval": 2,
                                               "threshold": 3}]}
    return {"version": 4, "resources": [
        {"mode": "data", "type": "coder_workspace", "name": "me", "instances": [{"attributes": {}}]},
        {"mode": "managed", "type": "coder_agent", "name": "main", "instances": [{"attributes": agent}]},
        {"mode": "managed", "type": "coder_app", "name": "web", "instances": [{"attributes": app}]},
        {"mode": "managed", "type": "terraform_data", "name": "p",
         "instances": [{"index_key": 0, "attributes": {}}]},
    ]}


class EnvTests(unittest.TestCase):
    def test_coder_provision_env(self):
        env = terraform_env(cli_config=Path("/rc"), access_url="http://h:1", transition="start",
                            workspace=WS, agent_scripts={"CODER_AGENT_SCRIPT_linux_amd64": "x"},
                            base_env={"PATH": "/bin", "HOME": "/root", "CODER_AGENT_TOKEN": "leak",
                                      "CODER_SESSION_TOKEN": "leak", "AWS_SECRET": "leak"})
        self.assertEqual(env["TF_CLI_CONFIG_FILE"], "/rc")
        self.assertEqual((env["CHECKPOINT_DISABLE"], env["TF_IN_AUTOMATION"]), ("1", "1"))
        self.assertEqual(env["CODER_AGENT_URL"], "http://h:1")
        self.assertEqual(env["CODER_WORKSPACE_TRANSITION"], "start")
        self.assertEqual(env["CODER_WORKSPACE_OWNER"], "alice")
        self.assertEqual(env["CODER_WORKSPACE_OWNER_NAME"], "Alice")
        self.assertEqual(env["CODER_WORKSPACE_OWNER_GROUPS"], '["g1"]')
        self.assertEqual(env["CODER_WORKSPACE_TEMPLATE_VERSION"], "v3")
        self.assertEqual(env["CODER_AGENT_SCRIPT_linux_amd64"], "x")
        self.assertEqual(env["PATH"], "/bin")
        self.assertNotIn("CODER_AGENT_TOKEN", env)
        self.assertNotIn("CODER_SESSION_TOKEN", env)
        self.assertNotIn("AWS_SECRET", env)

    def test_parameters(self):
        env = terraform_env(cli_config=Path("/rc"), access_url="http://h", transition="start",
                            workspace=None, agent_scripts={}, base_env={},
                            parameters={"region": "eu"})
        self.assertEqual(env[parameter_env_name("region")], "eu")

    def test_destroy_is_a_stop_for_the_data_source(self):
        env = terraform_env(cli_config=Path("/rc"), access_url="http://h", transition="destroy",
                            workspace=None, agent_scripts={}, base_env={})
        self.assertEqual(env["CODER_WORKSPACE_TRANSITION"], "stop")

    def test_cli_config(self):
        text = cli_config_text(Path("/m i/rror"))
        self.assertIn('path    = "/m i/rror"', text)
        self.assertIn('include = ["registry.terraform.io/coder/coder"]', text)
        self.assertIn('exclude = ["registry.terraform.io/coder/coder"]', text)


class StateTests(unittest.TestCase):
    def test_agents(self):
        (agent,) = read_agents(state_doc())
        self.assertEqual((agent.id, agent.name, agent.token), ("agent-1", "main", "s3cr3t-agent-token"))
        self.assertEqual(agent.env, {"A": "1"})
        self.assertEqual(agent.connection_timeout, 30)
        self.assertEqual(agent.startup_script_behavior, "blocking")
        self.assertEqual(agent.display_apps["vscode"], False)
        self.assertEqual(agent.display_apps["web_terminal"], True)  # null flag: Coder's default
        self.assertEqual(agent.metadata[0].key, "k")
        (app,) = agent.apps
        self.assertEqual((app.slug, app.url, app.subdomain), ("web", "http://localhost:1", False))
        self.assertEqual(app.healthcheck.threshold, 3)
        self.assertNotIn("s3cr3t", repr(agent))

    def test_scripts_and_env(self):
        doc = state_doc()

        def add(type_name, resource_name, **attrs):
            doc["resources"].append({"mode": "managed", "type": type_name, "name": resource_name,
                                     "instances": [{"attributes": {"agent_id": "agent-1", **attrs}}]})

        add("coder_script", "b", id="s2", display_name="zz", script="echo b", cron="0 * * * * *")
        add("coder_script", "a", id="s1", display_name="aa", script="echo a", run_on_start=True,
            start_blocks_login=True, timeout=30)
        add("coder_env", "path1", id="e1", name="PATH", value="/opt/a", merge_strategy="append")
        add("coder_env", "path0", id="e0", name="PATH", value="/usr/bin", merge_strategy="replace")
        add("coder_env", "pre", id="e2", name="PATH", value="/first", merge_strategy="prepend")
        add("coder_env", "own", id="e3", name="A", value="from coder_env")
        (agent,) = read_agents(doc)
        self.assertEqual([s.display_name for s in agent.scripts], ["aa", "zz"])
        self.assertEqual((agent.scripts[0].run_on_start, agent.scripts[0].start_blocks_login,
                          agent.scripts[0].timeout), (True, True, 30))
        self.assertEqual(agent.scripts[1].cron, "0 * * * * *")
        # Ordered by address: path0 (replace), path1 (append), pre (prepend).
        self.assertEqual(agent.env["PATH"], "/first:/usr/bin:/opt/a")
        self.assertEqual(agent.env["A"], "1")  # the agent's own env wins

    def test_resource_metadata_names_the_described_resource(self):
        doc = state_doc()
        doc["resources"][3]["instances"][0]["attributes"]["id"] = "box-id"
        doc["resources"].append({"mode": "managed", "type": "coder_metadata", "name": "m",
                                 "instances": [{"attributes": {
                                     "id": "m1", "resource_id": "box-id", "daily_cost": 2,
                                     "hide": None, "icon": "/i.svg", "item": [
                                         {"key": "a", "value": "b", "sensitive": None},
                                         {"key": "n", "value": None, "sensitive": None},
                                         {"key": "s", "value": "x", "sensitive": True}]}}]})
        (meta,) = read_resource_metadata(doc)
        self.assertEqual((meta.resource, meta.resource_type, meta.daily_cost, meta.hide),
                         ("terraform_data.p[0]", "terraform_data", 2, False))
        self.assertEqual([(i.key, i.value, i.sensitive, i.is_null) for i in meta.items],
                         [("a", "b", False, False), ("n", None, False, True), ("s", "x", True, False)])

    def test_agent_spec_in_coders_script_order(self):
        from coderstack.server.agentspec import agent_spec, script_source_id

        doc = state_doc()
        doc["resources"][1]["instances"][0]["attributes"].update(
            id="6c487d0d-0167-48c2-b93b-1cd6da3baeda", shutdown_script="echo bye", dir="/p")
        doc["resources"][2]["instances"][0]["attributes"]["agent_id"] = (
            "6c487d0d-0167-48c2-b93b-1cd6da3baeda")
        doc["resources"].append({"mode": "managed", "type": "coder_script", "name": "s",
                                 "instances": [{"attributes": {
                                     "id": "s1", "agent_id": "6c487d0d-0167-48c2-b93b-1cd6da3baeda",
                                     "display_name": "Backup", "script": "b", "cron": "@hourly"}}]})
        (agent,) = read_agents(doc)
        spec = agent_spec(agent)
        names = [(s["display_name"], s["run_on_start"], s["run_on_stop"], s["start_blocks_login"])
                 for s in spec["scripts"]]
        self.assertEqual(names, [("Startup Script", True, False, True),
                                 ("Shutdown Script", False, True, False),
                                 ("Backup", False, False, False)])
        self.assertEqual(spec["scripts"][0]["log_source_id"],
                         script_source_id(agent.id, "Startup Script"))
        self.assertEqual([s["id"] for s in spec["log_sources"]],
                         [s["log_source_id"] for s in spec["scripts"]])
        self.assertEqual(spec["scripts"][2]["cron"], "@hourly")
        self.assertEqual((spec["directory"], spec["environment_variables"]), ("/p", {"A": "1"}))
        self.assertEqual(spec["apps"][0]["healthcheck"],
                         {"url": "http://localhost:1/h", "interval": 2, "threshold": 3})
        self.assertEqual(spec["metadata"][0]["display_name"], "k")
        self.assertNotIn("s3cr3t", repr(spec))

    def test_env_error_strategy(self):
        doc = state_doc()
        for name, strategy in (("x", "error"), ("y", "replace")):
            doc["resources"].append({"mode": "managed", "type": "coder_env", "name": name, "instances": [
                {"attributes": {"agent_id": "agent-1", "id": name, "name": "V", "value": name,
                                "merge_strategy": strategy}}]})
        self.assertRaises(BuildError, read_agents, doc)

    def test_resources(self):
        self.assertEqual(read_resources(state_doc()),
                         ("coder_agent.main", "coder_app.web", "terraform_data.p[0]"))

    def test_parameters(self):
        doc = state_doc()
        doc["resources"].append({"mode": "data", "type": "coder_parameter", "name": "r",
                                 "instances": [{"attributes": {"name": "region", "value": "eu"}}]})
        self.assertEqual(read_parameters(doc), {"region": "eu"})

    def test_agent_url(self):
        doc = state_doc()
        self.assertIsNone(read_agent_url(doc))
        doc["resources"][0]["instances"][0]["attributes"]["access_url"] = "http://override:1"
        self.assertEqual(read_agent_url(doc), "http://override:1")

    def test_empty(self):
        self.assertEqual(read_agents({}), ())

    def test_duplicate_agent_names(self):
        doc = state_doc()
        res = doc["resources"][1]
        res["instances"].append({"index_key": 1, "attributes": dict(res["instances"][0]["attributes"],
                                                                    id="agent-2")})
        self.assertRaises(BuildError, read_agents, doc)


class WorkDirTests(unittest.TestCase):
    def setUp(self):
        self.root = Path(self.mktemp())
        self.root.mkdir()
        self.provider = write_provider_executable(self.root / "bin")

    def test_template_copy_replaces_old_version(self):
        v1, v2, work = self.root / "v1", self.root / "v2", self.root / "work"
        for d in (v1, v2, work):
            d.mkdir()
        (v1 / "main.tf").write_text("# v1")
        (v1 / "old.tf").write_text("# only in v1")
        (v1 / "notes.txt").write_text("not a template file")
        (v2 / "main.tf.json").write_text("{}")
        (work / META_DIR).mkdir()
        copy_template(v1, work)
        self.assertEqual(sorted(p.name for p in work.glob("*.tf")), ["main.tf", "old.tf"])
        self.assertFalse((work / "notes.txt").exists())
        (work / "terraform.tfstate").write_text("{}")
        copy_template(v2, work)
        self.assertEqual(sorted(p.name for p in work.iterdir() if p.is_file()),
                         ["main.tf.json", "terraform.tfstate"])

    def test_template_from_mapping(self):
        work = self.root / "w"
        prepare_work_dir(work, self.provider, {"main.tf": "# a", "vars.auto.tfvars": b"x = 1",
                                                "README.md": "ignored"})
        self.assertEqual((work / "main.tf").read_text(), "# a")
        self.assertTrue((work / "vars.auto.tfvars").exists())
        self.assertFalse((work / "README.md").exists())
        for bad in ("../evil.tf", "sub/x.tf", ".hidden.tf"):
            self.assertRaises(TemplateError, prepare_work_dir, work, self.provider, {bad: "", "m.tf": ""})

    def test_no_terraform_files(self):
        empty = self.root / "empty"
        empty.mkdir()
        (empty / "README").write_text("x")
        self.assertRaises(TemplateError, prepare_work_dir, self.root / "w", self.provider, empty)

    def test_mirror_and_lock(self):
        work = self.root / "w"
        rc = prepare_work_dir(work, self.provider, None)
        mirror = work / ".coderstack" / "mirror" / "registry.terraform.io" / "coder" / "coder"
        self.assertIn("terraform-provider-coder_2.999.0_linux_amd64.zip", {p.name for p in mirror.iterdir()})
        self.assertIn(str(work / ".coderstack" / "mirror"), rc.read_text())
        # An unchanged provider keeps the lock file; a changed one drops it.
        (work / ".terraform.lock.hcl").write_text("lock")
        prepare_work_dir(work, self.provider, None)
        self.assertTrue((work / ".terraform.lock.hcl").exists())
        write_provider_executable(self.root / "bin", python="/other/python")
        prepare_work_dir(work, self.provider, None)
        self.assertFalse((work / ".terraform.lock.hcl").exists())





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
