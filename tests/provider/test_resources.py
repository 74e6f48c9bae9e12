"""coder_agent, coder_app and the data sources, driven directly (no terraform)."""

from __future__ import annotations

import os
import uuid

from tf.iface import CreateContext, ReadContext, ReadDataContext
from tf.types import Unknown
from tf.utils import Diagnostics
from twisted.trial import unittest

from coderstack.provider.agent import AgentResource, render_init_script
from coderstack.provider.app import AppResource
from coderstack.provider.attached import EnvResource, ScriptResource
from coderstack.provider.host import ProvisionerDataSource, go_arch, go_os
from coderstack.provider.metadata import AgentInstanceResource, MetadataResource
from coderstack.provider.provider import DEFAULT_URL, CoderProvider
from coderstack.provider.workspace import (
    WorkspaceDataSource,
    WorkspaceOwnerDataSource,
    access_port,
)

SCRIPT = "#!/bin/sh\nurl=${ACCESS_URL} auth=${AUTH_TYPE} arch=amd64\n"


def configured(url: str | None) -> CoderProvider:
    provider = CoderProvider()
    diags = Diagnostics()
    provider.configure_provider(diags, {"url": url})
    assert not diags.has_errors(), str(diags)
    return provider


def errors(diags: Diagnostics) -> list[str]:
    return [d.summary for d in diags.diagnostics if d.severity == "error"]


class InitScriptTests(unittest.TestCase):
    def test_substitution(self):
        env = {"CODER_AGENT_SCRIPT_linux_amd64": SCRIPT}
        got = render_init_script("https://coder.example.com:8443/some/path?x=1", "linux", "amd64",
                                 "token", env)
        self.assertEqual(got, "#!/bin/sh\nurl=https://coder.example.com:8443/ auth=token arch=amd64\n")

    def test_auth_type(self):
        env = {"CODER_AGENT_SCRIPT_linux_arm64": "${AUTH_TYPE}"}
        got = render_init_script("http://h", "linux", "arm64", "aws-instance-identity", env)
        self.assertEqual(got, "aws-instance-identity")

    def test_no_script_for_platform(self):
        env = {"CODER_AGENT_SCRIPT_linux_amd64": SCRIPT}
        self.assertEqual(render_init_script("http://h", "windows", "amd64", "token", env), "")


class ProviderConfigTests(unittest.TestCase):
    def test_explicit_url_wins(self):
        self.patch(os, "environ", {"CODER_AGENT_URL": "http://from-env:1"})
        self.assertEqual(configured("http://override:2").url, "http://override:2")

    def test_env_default(self):
        self.patch(os, "environ", {"CODER_AGENT_URL": "http://from-env:1"})
        self.assertEqual(configured(None).url, "http://from-env:1")

    def test_builtin_default(self):
        self.patch(os, "environ", {})
        self.assertEqual(configured(None).url, DEFAULT_URL)

    def test_empty_url_rejected(self):
        diags = Diagnostics()
        CoderProvider().configure_provider(diags, {"url": ""})
        self.assertTrue(diags.has_errors())

    def test_bad_port_rejected(self):
        diags = Diagnostics()
        CoderProvider().validate_config(diags, {"url": "http://h:notaport"})
        self.assertTrue(diags.has_errors())


class AgentTests(unittest.TestCase):
    def setUp(self):
        self.patch(os, "environ", {"CODER_AGENT_SCRIPT_linux_amd64": SCRIPT})
        self.provider = configured("http://10.1.2.3:7080")
        self.agent = AgentResource(self.provider)

    def planned(self, **kw):
        plan = {a.name: None for a in AgentResource.get_schema().attributes}
        plan.update(id=Unknown, token=Unknown, init_script=Unknown, os="linux", arch="amd64",
                    auth="token", connection_timeout=120, api_key_scope="all",
                    startup_script_behavior="non-blocking", metadata=[], display_apps=[],
                    resources_monitoring=[])
        plan.update(kw)
        return plan

    def test_create(self):
        state = self.agent.create(CreateContext(Diagnostics(), "coder_agent"), self.planned())
        uuid.UUID(state["id"])
        uuid.UUID(state["token"])
        self.assertNotEqual(state["id"], state["token"])
        self.assertIn("url=http://10.1.2.3:7080/ auth=token", state["init_script"])

    def test_tokens_differ_per_agent(self):
        ctx = CreateContext(Diagnostics(), "coder_agent")
        a = self.agent.create(ctx, self.planned())
        b = self.agent.create(ctx, self.planned())
        self.assertNotEqual(a["token"], b["token"])

    def test_read_follows_url_and_keeps_token(self):
        state = self.agent.create(CreateContext(Diagnostics(), "coder_agent"), self.planned())
        moved = AgentResource(configured("http://192.0.2.9:1234"))
        again = moved.read(ReadContext(Diagnostics(), "coder_agent"), dict(state))
        self.assertEqual(again["token"], state["token"])
        self.assertEqual(again["id"], state["id"])
        self.assertIn("url=http://192.0.2.9:1234/", again["init_script"])

    def validate(self, **config) -> list[str]:
        diags = Diagnostics()
        self.agent.validate(diags, "coder_agent", config)
        return errors(diags)

    def test_validate_ok(self):
        self.assertEqual(self.validate(os="linux", arch="arm64", auth="token"), [])

    def test_validate_choices(self):
        self.assertEqual(len(self.validate(os="plan9", arch="amd64")), 1)
        self.assertEqual(len(self.validate(os="linux", arch="mips")), 1)
        self.assertEqual(len(self.validate(os="linux", arch="amd64", auth="password")), 1)
        self.assertEqual(len(self.validate(os="linux", arch="amd64",
                                           startup_script_behavior="sometimes")), 1)

    def test_validate_unknown_values_pass(self):
        # Values computed elsewhere are unknown at validation time.
        self.assertEqual(self.validate(os=Unknown, arch=Unknown, connection_timeout=Unknown), [])

    def test_validate_negative_timeout(self):
        self.assertEqual(len(self.validate(os="linux", arch="amd64", connection_timeout=-1)), 1)

    def test_validate_duplicate_metadata(self):
        item = {"key": "cpu", "script": "x", "interval": 1}
        self.assertIn("duplicate agent metadata key 'cpu'",
                      self.validate(os="linux", arch="amd64", metadata=[item, dict(item)]))

    def test_validate_volume_path(self):
        mon = [{"memory": [], "volume": [{"path": "home", "enabled": True, "threshold": 9}]}]
        self.assertEqual(len(self.validate(os="linux", arch="amd64", resources_monitoring=mon)), 1)

    def test_validate_computed_only_fields(self):
        self.assertTrue(self.validate(os="linux", arch="amd64", token="mine"))


class AppTests(unittest.TestCase):
    def setUp(self):
        self.app = AppResource(configured("http://h"))

    def validate(self, **config) -> list[str]:
        diags = Diagnostics()
        self.app.validate(diags, "coder_app", {"agent_id": "a", **config})
        return errors(diags)

    def test_slugs(self):
        for good in ("code-server", "a", "app1", "a-b-c"):
            self.assertEqual(self.validate(slug=good), [], good)
        for bad in ("-a", "a-", "a--b", "Code", "a_b", ""):
            self.assertEqual(len(self.validate(slug=bad)), 1, bad)

    def test_share_and_open_in(self):
        self.assertEqual(self.validate(slug="a", share="public", open_in="tab"), [])
        self.assertEqual(len(self.validate(slug="a", share="everyone")), 1)
        self.assertEqual(len(self.validate(slug="a", open_in="popup")), 1)

    def test_conflicts(self):
        self.assertTrue(self.validate(slug="a", url="http://localhost:1", command="top"))
        self.assertTrue(self.validate(slug="a", command="top", subdomain=True))
        self.assertTrue(self.validate(slug="a", external=True, share="public"))
        self.assertEqual(self.validate(slug="a", external=True, url="https://example.com"), [])
        self.assertEqual(self.validate(slug="a", command="top", subdomain=False), [])

    def test_create_defaults(self):
        plan = {a.name: None for a in AppResource.get_schema().attributes}
        plan.update(id=Unknown, agent_id="a", slug="s", share=Unknown, hidden=Unknown,
                    external=Unknown, open_in=Unknown, healthcheck=[])
        state = self.app.create(CreateContext(Diagnostics(), "coder_app"), plan)
        uuid.UUID(state["id"])
        self.assertEqual((state["share"], state["hidden"], state["external"], state["open_in"]),
                         ("owner", False, False, "slim-window"))

    def test_hidden_warnings(self):
        plan = {a.name: None for a in AppResource.get_schema().attributes}
        plan.update(agent_id="a", slug="s", hidden=True, display_name="x", healthcheck=[])
        ctx = CreateContext(Diagnostics(), "coder_app")
        self.app.create(ctx, plan)
        self.assertTrue(ctx.diagnostics.has_warnings())


class DataSourceTests(unittest.TestCase):
    ENV = {
        "CODER_WORKSPACE_TRANSITION": "stop",
        "CODER_WORKSPACE_ID": "ws-id",
        "CODER_WORKSPACE_NAME": "dev",
        "CODER_WORKSPACE_TEMPLATE_ID": "tid",
        "CODER_WORKSPACE_TEMPLATE_NAME": "local",
        "CODER_WORKSPACE_TEMPLATE_VERSION": "v1",
        "CODER_WORKSPACE_OWNER": "alice",
        "CODER_WORKSPACE_OWNER_ID": "owner-id",
        "CODER_WORKSPACE_OWNER_NAME": "Alice A",
        "CODER_WORKSPACE_OWNER_EMAIL": "alice@example.com",
        "CODER_WORKSPACE_OWNER_SESSION_TOKEN": "sess",
        "CODER_WORKSPACE_OWNER_GROUPS": '["dev", "ops"]',
        "CODER_WORKSPACE_OWNER_RBAC_ROLES": '[{"name": "member", "org_id": "o"}]',
    }

    def test_workspace_from_env(self):
        self.patch(os, "environ", dict(self.ENV))
        ds = WorkspaceDataSource(configured("https://coder.example.com"))
        got = ds.read(ReadDataContext(Diagnostics(), "coder_workspace"), {})
        self.assertEqual(got["transition"], "stop")
        self.assertEqual(got["start_count"], 0)
        self.assertEqual((got["id"], got["name"]), ("ws-id", "dev"))
        self.assertEqual((got["access_url"], got["access_port"]), ("https://coder.example.com", 443))
        self.assertEqual(got["template_name"], "local")
        self.assertFalse(got["is_prebuild"])

    def test_workspace_defaults(self):
        self.patch(os, "environ", {})
        got = WorkspaceDataSource(configured("http://h:8080")).read(
            ReadDataContext(Diagnostics(), "coder_workspace"), {})
        self.assertEqual((got["transition"], got["start_count"], got["name"]), ("start", 1, "default"))
        self.assertEqual(got["access_port"], 8080)
        uuid.UUID(got["id"])

    def test_access_port(self):
        self.assertEqual(access_port("http://h"), 80)
        self.assertEqual(access_port("https://h"), 443)
        self.assertEqual(access_port("http://[::1]:9"), 9)

    def test_owner(self):
        self.patch(os, "environ", dict(self.ENV))
        got = WorkspaceOwnerDataSource(configured("http://h")).read(
            ReadDataContext(Diagnostics(), "coder_workspace_owner"), {})
        self.assertEqual((got["id"], got["name"], got["full_name"]), ("owner-id", "alice", "Alice A"))
        self.assertEqual(got["groups"], ["dev", "ops"])
        self.assertEqual(got["rbac_roles"], [{"name": "member", "org_id": "o"}])
        self.assertEqual(got["session_token"], "sess")

    def test_provisioner_platform_names(self):
        self.assertEqual(go_arch("x86_64"), "amd64")
        self.assertEqual(go_arch("aarch64"), "arm64")
        self.assertEqual(go_arch("armv7l"), "arm")
        self.assertEqual(go_os("Linux"), "linux")
        got = ProvisionerDataSource(configured("http://h")).read(
            ReadDataContext(Diagnostics(), "coder_provisioner"), {})
        self.assertEqual((got["os"], got["arch"]), (go_os(), go_arch()))

    def test_owner_bad_groups(self):
        self.patch(os, "environ", {"CODER_WORKSPACE_OWNER_GROUPS": "not json"})
        ctx = ReadDataContext(Diagnostics(), "coder_workspace_owner")
        WorkspaceOwnerDataSource(configured("http://h")).read(ctx, {})
        self.assertTrue(ctx.diagnostics.has_errors())


class AttachedTests(unittest.TestCase):
    def planned(self, klass, **kw):
        plan = {a.name: (Unknown if a.computed else None) for a in klass.get_schema().attributes}
        plan.update(kw)
        return plan

    def create(self, klass, **kw):
        ctx = CreateContext(Diagnostics(), "coder_x")
        state = klass(configured("http://h")).create(ctx, self.planned(klass, **kw))
        return state, errors(ctx.diagnostics)

    def test_script_defaults_and_rules(self):
        state, errs = self.create(ScriptResource, agent_id="a", display_name="d", script="s",
                                  run_on_start=True)
        self.assertEqual(errs, [])
        uuid.UUID(state["id"])
        self.assertEqual((state["run_on_stop"], state["start_blocks_login"], state["timeout"]),
                         (False, False, 0))
        _, errs = self.create(ScriptResource, agent_id="a", display_name="d", script="s")
        self.assertIn("at least one of `run_on_start`, `run_on_stop`, or `cron` must be set", errs)
        _, errs = self.create(ScriptResource, agent_id="a", display_name="d", script="s",
                              run_on_stop=True, start_blocks_login=True)
        self.assertTrue(errs)

    def test_script_validate(self):
        diags = Diagnostics()
        ScriptResource(configured("http://h")).validate(
            diags, "coder_script", {"cron": "every day", "timeout": 0})
        self.assertEqual(len(errors(diags)), 2)

    def test_script_cron_is_parsed_as_coder_does(self):
        def cron_errors(cron):
            diags = Diagnostics()
            ScriptResource(configured("http://h")).validate(
                diags, "coder_script", {"cron": cron, "display_name": "Backup"})
            return errors(diags)

        for good in ("0 */5 * * * *", "0 0 3 * * mon-fri", "@hourly", "@every 90s"):
            self.assertEqual(cron_errors(good), [], good)
        # Six fields that the old field-count check let through, and a bad descriptor.
        for bad in ("61 * * * * *", "0 0 25 * * *", "* * * * * funday", "@fortnightly"):
            got = cron_errors(bad)
            self.assertEqual(len(got), 1, bad)
            self.assertIn("coder_script 'Backup'", got[0])

    def test_env(self):
        state, errs = self.create(EnvResource, agent_id="a", name="EDITOR", value="vi")
        self.assertEqual((errs, state["merge_strategy"]), ([], "replace"))
        diags = Diagnostics()
        EnvResource(configured("http://h")).validate(
            diags, "coder_env", {"name": "1BAD", "merge_strategy": "mix"})
        self.assertEqual(len(errors(diags)), 2)


class MetadataTests(unittest.TestCase):
    def validate(self, klass, config):
        diags = Diagnostics()
        klass(configured("http://h")).validate(diags, "coder_x", config)
        return errors(diags)

    def test_metadata_create_keeps_items(self):
        items = [{"key": "a", "value": "b", "sensitive": None, "is_null": None}]
        ctx = CreateContext(Diagnostics(), "coder_metadata")
        plan = {"id": Unknown, "resource_id": "r", "hide": None, "icon": None, "daily_cost": 3,
                "item": items}
        state = MetadataResource(configured("http://h")).create(ctx, plan)
        uuid.UUID(state["id"])
        self.assertEqual((state["item"], state["resource_id"], errors(ctx.diagnostics)),
                         (items, "r", []))

    def test_metadata_validate(self):
        ok = {"resource_id": "r", "item": [{"key": "a"}, {"key": "b"}], "daily_cost": 0}
        self.assertEqual(self.validate(MetadataResource, ok), [])
        self.assertEqual(len(self.validate(MetadataResource, dict(ok, item=[]))), 1)
        dup = dict(ok, item=[{"key": "a"}, {"key": "a"}])
        self.assertIn("duplicate metadata key 'a'", self.validate(MetadataResource, dup))
        for cost in (-1, 1.5):
            self.assertEqual(len(self.validate(MetadataResource, dict(ok, daily_cost=cost))), 1)

    def test_agent_instance(self):
        ctx = CreateContext(Diagnostics(), "coder_agent_instance")
        state = AgentInstanceResource(configured("http://h")).create(
            ctx, {"id": Unknown, "agent_id": "a", "instance_id": "i-1"})
        self.assertEqual((state["agent_id"], state["instance_id"]), ("a", "i-1"))
        uuid.UUID(state["id"])
