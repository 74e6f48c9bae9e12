"""``coderstack config-ssh``: the managed block, idempotency, dry-run diff, other entries kept."""

from __future__ import annotations

import io
import os
import shutil
import sys
import tempfile

from twisted.internet import defer
from twisted.trial import unittest

from coderstack.cli import config_ssh
from coderstack.cli.config_ssh import ConfigSSHError, merge_options, parse_option, split_section
from coderstack.sdk import SDKError

USER_ENTRIES = "Host github.com\n\tUser git\n\nHost *\n\tServerAliveInterval 30\n"


class FakeAPI:
    def __init__(self, deployment=None, workspaces=("dev",)):
        self.deployment = deployment
        self.workspaces = [{"name": n} for n in workspaces]

    async def get(self, path):
        if path == "/api/v2/deployment/ssh":
            if self.deployment is None:
                raise SDKError("not found", 404)
            return self.deployment
        if path == "/api/v2/workspaces":
            return {"workspaces": self.workspaces}
        raise AssertionError(path)


class FakeConfig:
    path = "/home/u/.config/coderstack"


class FakeCtx:
    def __init__(self, api, environ=None, stdin=""):
        self.api = api
        self.environ = environ or {}
        self.stdout, self.stderr, self.stdin = io.StringIO(), io.StringIO(), io.StringIO(stdin)
        self.config = FakeConfig()

    def err(self, line=""):
        self.stderr.write(line + "\n")


def expected_block(options=(), option_lines=(), prefix="coder."):
    header = ""
    if option_lines:
        header = "#\n# Last config-ssh options:\n" + "".join(f"# :{x}\n" for x in option_lines)
    body = "".join(f"\t{o}\n" for o in options)
    return (
        "# ------------START-CODER-----------\n"
        "# This section is managed by coder. DO NOT EDIT.\n"
        "#\n"
        "# You should not hand-edit this section unless you are removing it, all\n"
        '# changes will be lost when running "coder config-ssh".\n'
        f"{header}"
        "#\n"
        f"Host {prefix}*\n"
        f"{body}"
        "\tConnectTimeout=0\n"
        "\tStrictHostKeyChecking=no\n"
        "\tUserKnownHostsFile=/dev/null\n"
        "\tLogLevel ERROR\n"
        f"\tProxyCommand {os.path.abspath(sys.executable)} -m coderstack --global-config "
        f"/home/u/.config/coderstack ssh --stdio --ssh-host-prefix {prefix} %h\n"
        "# ------------END-CODER------------\n"
    )


class ConfigSSHCommandTests(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="usercmds-cfg-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.path = os.path.join(self.dir, "config")

    def run_cmd(self, args, api=None, environ=None, stdin=""):
        ctx = FakeCtx(api or FakeAPI({"hostname_prefix": "coder.", "hostname_suffix": "", "ssh_config_options": {}}),
                      environ, stdin)
        opts = config_ssh.Options()
        opts.parseOptions(["--ssh-config-file", self.path, *args])
        code = self.successResultOf(defer.ensureDeferred(config_ssh.run(None, opts, ctx)))
        return code, ctx.stdout.getvalue(), ctx.stderr.getvalue()

    def read(self):
        with open(self.path) as f:
            return f.read()

    def write(self, text):
        with open(self.path, "w") as f:
            f.write(text)

    def test_appends_block_keeps_entries_and_is_idempotent(self):
        self.write(USER_ENTRIES)
        code, out, _ = self.run_cmd(["-y"])
        self.assertEqual(code, 0)
        self.assertEqual(self.read(), USER_ENTRIES + "\n" + expected_block())
        self.assertEqual(out, f'Updated "{self.path}"\nYou should now be able to ssh into your workspace.\n'
                              "For example, try running:\n\n\t$ ssh coder.dev\n")
        code, out, _ = self.run_cmd(["-y"])
        self.assertEqual((code, out), (0, "No changes to make.\n"))
        self.assertEqual(self.read(), USER_ENTRIES + "\n" + expected_block())

    def test_new_file_has_only_the_block_0600(self):
        code, _, _ = self.run_cmd(["--yes"], api=FakeAPI(None, workspaces=()))  # 404: prefix coder.
        self.assertEqual(code, 0)
        self.assertEqual(self.read(), expected_block())
        self.assertEqual(os.stat(self.path).st_mode & 0o777, 0o600)

    def test_block_in_the_middle_is_replaced_in_place(self):
        old_block = "# ------------START-CODER-----------\nHost coder.*\n\tUser old\n# ------------END-CODER------------\n"
        self.write("Host a\n\tUser a\n\n" + old_block + "\nHost b\n\tUser b\n")
        self.run_cmd(["-y"])
        self.assertEqual(self.read(), "Host a\n\tUser a\n\n" + expected_block() + "\nHost b\n\tUser b\n")

    def test_dry_run_prints_unified_diff_and_changes_nothing(self):
        self.write(USER_ENTRIES)
        code, out, err = self.run_cmd(["--dry-run"])
        self.assertEqual(code, 0)
        self.assertEqual(self.read(), USER_ENTRIES)
        self.assertEqual(err, "Dry run, the following changes would be made to your SSH configuration:\n\n"
                              f"  * Update the coder section in {self.path}\n\n")
        lines = out.splitlines()
        self.assertEqual(lines[:2], [f"--- {self.path}", f"+++ {self.path}"])
        self.assertTrue(lines[2].startswith("@@ "))
        self.assertIn("+# ------------START-CODER-----------", lines)
        self.assertIn("+Host coder.*", lines)
        self.assertIn(" \tServerAliveInterval 30", lines)  # context line kept

    def test_ssh_options_recorded_first_and_changes_ask(self):
        self.run_cmd(["-y", "-o", "ForwardAgent=yes", "--ssh-option", "LogLevel DEBUG"])
        self.assertEqual(self.read(), expected_block(
            ["ForwardAgent=yes", "LogLevel DEBUG"],
            ["ssh-option=ForwardAgent=yes", "ssh-option=LogLevel DEBUG"]).replace("\tLogLevel ERROR\n", ""))
        # Same options again: nothing to do.
        code, out, _ = self.run_cmd(["-y", "-o", "ForwardAgent=yes", "-o", "LogLevel DEBUG"])
        self.assertEqual(out, "No changes to make.\n")
        # No options now: the old ones differ; answering "no" keeps them.
        code, out, err = self.run_cmd([], stdin="no\n")
        self.assertIn("New options differ from previous options:\n\n  New options: none\n\n  Previous options:\n"
                      "    * ssh-option: ForwardAgent=yes\n    * ssh-option: LogLevel DEBUG\n\n  Use new options?", err)
        self.assertIn("ForwardAgent=yes", self.read())
        # --use-previous-options keeps them without asking.
        code, out, err = self.run_cmd(["--use-previous-options"])
        self.assertEqual(out, "No changes to make.\n")
        # With -y the new (empty) options win.
        code, out, err = self.run_cmd(["-y"])
        self.assertEqual(self.read(), expected_block())

    def test_declining_the_prompt_writes_nothing(self):
        self.write(USER_ENTRIES)
        code, out, err = self.run_cmd([], stdin="n\n")
        self.assertEqual(code, 0)
        self.assertIn("Continue? (yes/no)", err)
        self.assertEqual(self.read(), USER_ENTRIES)

    def test_deployment_options_and_empty_value_removes(self):
        api = FakeAPI({"hostname_prefix": "cs.", "ssh_config_options": {"ForwardX11": "no", "StrictHostKeyChecking": "yes"}})
        self.run_cmd(["-y", "-o", "ConnectTimeout="], api=api)
        text = self.read()
        self.assertIn("Host cs.*\n\tForwardX11 no\n\tStrictHostKeyChecking yes\n\tUserKnownHostsFile=/dev/null\n", text)
        self.assertNotIn("ConnectTimeout", text.split("Host cs.*")[1])
        self.assertIn("--ssh-host-prefix cs. %h", text)

    def test_hostname_suffix(self):
        api = FakeAPI({"hostname_prefix": "coder.", "hostname_suffix": "coder"})
        code, out, _ = self.run_cmd(["-y"], api=api)
        text = self.read()
        self.assertIn("Host *.coder\n", text)
        self.assertIn("ssh --stdio --ssh-hostname-suffix coder %h", text)
        self.assertIn("\t$ ssh dev.coder\n", out)

    def test_env_config_file_and_malformed(self):
        other = os.path.join(self.dir, "other")
        with open(other, "w") as f:
            f.write("# ------------START-CODER-----------\n")
        ctx = FakeCtx(FakeAPI({"hostname_prefix": "coder."}), {"CODER_SSH_CONFIG_FILE": other})
        opts = config_ssh.Options()
        opts.parseOptions(["-y"])
        code = self.successResultOf(defer.ensureDeferred(config_ssh.run(None, opts, ctx)))
        self.assertEqual(code, 1)
        self.assertEqual(ctx.stderr.getvalue(),
                         "error: Malformed config: ssh config has start header, but missing end header\n")


class PureTests(unittest.TestCase):
    def test_parse_option(self):
        self.assertEqual(parse_option("A=b c"), ("A", "b c"))
        self.assertEqual(parse_option("A b=c"), ("A", "b=c"))
        self.assertEqual(parse_option("A="), ("A", ""))
        for bad in ("A", "=b", ""):
            self.assertRaises(ConfigSSHError, parse_option, bad)

    def test_merge_first_wins_case_insensitive(self):
        self.assertEqual(merge_options(["loglevel DEBUG"], ["LogLevel ERROR", "X=1"]), ["loglevel DEBUG", "X=1"])
        self.assertEqual(merge_options(["X="], ["X=1", "Y 2"]), ["Y 2"])

    def test_split_errors(self):
        s, e = config_ssh.START, config_ssh.END
        for text in (f"{s}\n{s}\n{e}\n", f"{e}\n", f"{e}\n{s}\n"):
            self.assertRaises(ConfigSSHError, split_section, text)
        self.assertEqual(split_section("a\n"), ("a\n", "", ""))
        self.assertEqual(split_section(f"a\n{s}\nx\n{e}\nb\n"), ("a", f"\n{s}\nx\n{e}\n", "b\n"))

    def test_exec_escape(self):
        self.assertEqual(config_ssh.exec_escape("/a b/c"), '"/a b/c"')
        self.assertEqual(config_ssh.exec_escape('/a"b'), '/a\\"b')
        self.assertRaises(ConfigSSHError, config_ssh.exec_escape, "/a\nb")


class FuzzTests(unittest.TestCase):
    def test_garbage_configs_only_raise_config_error(self):
        from hypothesis import given
        from hypothesis import strategies as st

        pieces = st.sampled_from([config_ssh.START, config_ssh.END, "\n", "Host x\n", "# :ssh-option=A=b\n",
                                  "# :wait=yes\n", "# :\n", "\tUser y\n", ""])

        @given(st.lists(pieces, max_size=8), st.text(max_size=30))
        def check(parts, noise):
            text = "".join(parts) + noise
            try:
                before, block, after = split_section(text)
            except ConfigSSHError:
                return
            self.assertEqual(before + block + after, text)
            config_ssh.parse_last_options(block)
        check()
