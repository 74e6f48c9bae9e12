"""Reading a build's agents, apps, scripts, env, metadata and parameters from a state document."""

from __future__ import annotations

from twisted.trial import unittest

from coderstack.server.tferrors import BuildError
from coderstack.server.tfstate import (
    read_agent_url,
    read_agents,
    read_parameters,
    read_resource_metadata,
    read_resources,
)


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
