"""Scripts as real short subprocesses: outcomes, process groups, timeouts, daemons holding the
pipes, environment and directory, log files; cron scheduling on a task.Clock."""

from __future__ import annotations

import datetime as dt
import os
import signal

from twisted.internet import reactor, task
from twisted.internet.defer import Deferred
from twisted.trial import unittest

from coderstack.agent import lifecycle as lc
from coderstack.agent.process import GroupProcess
from coderstack.agent.scripts import Script, ScriptRunner
from coderstack.agent.session_env import workspace_environment
from tests.support.waiting import wait_until


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


class RecordingLogs:
    """Stands in for AgentLogs: keeps what would be sent."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str, str]] = []

    def add(self, source_id: str, output: str, level: str = "info", at: float | None = None) -> None:
        self.lines.append((source_id, output, level))

    def of(self, source_id: str) -> list[str]:
        return [o for s, o, _ in self.lines if s == source_id]


class GroupProcessTests(unittest.TestCase):
    timeout = 30

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)

    def kill_later(self, pidfile: str) -> None:
        def kill() -> None:
            try:
                os.kill(int(open(pidfile).read()), signal.SIGKILL)
            except (OSError, ValueError):
                pass
        self.addCleanup(kill)

    async def test_exit_status_and_output(self) -> None:
        out: list[bytes] = []
        exit_ = await GroupProcess(reactor, lambda fd, data: out.append(data)).start(
            ["/bin/sh", "-c", "echo hi; exit 4"], {"PATH": os.defpath}, self.dir)
        self.assertEqual((exit_.code, exit_.ok, exit_.describe()), (4, False, "exit status 4"))
        self.assertEqual(b"".join(out), b"hi\n")

    async def test_runs_in_its_own_session(self) -> None:
        out: list[bytes] = []
        proc = GroupProcess(reactor, lambda fd, data: out.append(data))
        await proc.start(["/bin/sh", "-c", "cut -d' ' -f6 /proc/$$/stat"],
                         {"PATH": os.defpath}, self.dir)
        self.assertEqual(int(b"".join(out).split()[0]), proc.pid)
        self.assertNotEqual(os.getsid(0), proc.pid)

    async def test_timeout_kills_the_whole_group(self) -> None:
        pidfile = os.path.join(self.dir, "child")
        self.kill_later(pidfile)
        proc = GroupProcess(reactor, timeout=0.5, kill_grace=0.5, pipe_grace=0.2)
        exit_ = await proc.start(["/bin/sh", "-c", f"sleep 60 & echo $! > {pidfile}; wait"],
                                 {"PATH": os.defpath}, self.dir)
        self.assertTrue(exit_.timed_out)
        self.assertEqual(exit_.describe(), "timed out")
        child = int(open(pidfile).read())
        await wait_until(lambda: not alive(child), "the script's child to be killed too", timeout=5)

    async def test_a_term_ignoring_script_gets_sigkill(self) -> None:
        proc = GroupProcess(reactor, timeout=0.3, kill_grace=0.3, pipe_grace=0.2)
        exit_ = await proc.start(["/bin/sh", "-c", "trap '' TERM; while :; do sleep 0.1; done"],
                                 {"PATH": os.defpath}, self.dir)
        self.assertEqual((exit_.timed_out, exit_.signal), (True, signal.SIGKILL))

    async def test_a_daemon_holding_stdout_does_not_keep_us_waiting(self) -> None:
        pidfile = os.path.join(self.dir, "daemon")
        self.kill_later(pidfile)
        proc = GroupProcess(reactor, pipe_grace=0.3)
        # Without the pipe grace this would wait for the daemon (60 s, past the test's timeout).
        exit_ = await proc.start(["/bin/sh", "-c", f"sleep 60 & echo $! > {pidfile}; echo started; exit 0"],
                                 {"PATH": os.defpath}, self.dir)
        self.assertEqual((exit_.code, exit_.pipes_open, exit_.ok), (0, True, False))
        self.assertEqual(exit_.describe(), "exited, but its output pipes were still open")
        self.assertTrue(alive(int(open(pidfile).read())))  # we let go of it; we did not kill it

    async def test_a_daemon_with_its_output_redirected_is_fine(self) -> None:
        pidfile = os.path.join(self.dir, "daemon")
        self.kill_later(pidfile)
        exit_ = await GroupProcess(reactor, pipe_grace=30).start(
            ["/bin/sh", "-c", f"sleep 60 > /dev/null 2>&1 & echo $! > {pidfile}"], {"PATH": os.defpath}, self.dir)
        self.assertTrue(exit_.ok)

    async def test_a_missing_directory_is_an_error_not_a_hang(self) -> None:
        exit_ = await GroupProcess(reactor).start(["/bin/true"], {}, os.path.join(self.dir, "nope"))
        self.assertFalse(exit_.ok)


class ScriptRunnerTests(unittest.TestCase):
    timeout = 30

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        self.work = os.path.join(self.dir, "work")
        os.makedirs(self.work)
        self.logs = RecordingLogs()
        self.base = {"PATH": os.environ.get("PATH", os.defpath), "HOME": self.dir,
                     "CODER_AGENT_TOKEN": "secret-token", "CODER_AGENT_TOKEN_FILE": "/x"}

    def runner(self, scripts: list[Script]) -> ScriptRunner:
        manifest = {"workspace_name": "ws", "owner_name": "o", "agent_name": "main",
                    "environment_variables": {"FOO": "bar"}}
        return ScriptRunner(reactor, scripts, self.logs, "agent-src", os.path.join(self.dir, "scripts"),
                            env=lambda: workspace_environment(self.base, manifest, "http://server"),
                            cwd=lambda: self.work, kill_grace=0.5, pipe_grace=0.2)

    async def test_all_exit_zero_is_ready_with_env_dir_and_log_file(self) -> None:
        log_path = os.path.join(self.dir, "logs", "a.log")
        a = Script("src-a", "A", "#!/bin/bash\necho \"$BASH_VERSION\" | cut -c1-1\n"
                   "echo \"$FOO $CODER ${CODER_AGENT_TOKEN:-none} ${CODER_AGENT_TOKEN_FILE:-none} $(pwd)\"\n",
                   run_on_start=True, log_path=log_path)
        b = Script("src-b", "B", "printf 'no newline'", run_on_start=True)
        c = Script("src-c", "C", "exit 9", run_on_stop=True)
        state, results = await self.runner([a, b, c]).run_start()
        self.assertEqual(state, lc.READY)
        self.assertEqual(len(results), 2)
        lines = self.logs.of("src-a")
        self.assertRegex(lines[0], r"^\d$")  # bash ran it (shebang)
        self.assertEqual(lines[1], f"bar true none none {self.work}")
        self.assertEqual(self.logs.of("src-b"), ["no newline"])
        with open(log_path) as f:
            self.assertEqual(f.read().splitlines(), lines)
        self.assertEqual(self.logs.of("agent-src"), [])

    async def test_stderr_is_error_level_and_script_dirs_are_set(self) -> None:
        s = Script("src", "S", 'echo out; echo err >&2; test -d "$CODER_SCRIPT_DATA_DIR" && '
                   'test -d "$CODER_SCRIPT_BIN_DIR" && echo "$CODER_SCRIPT_DATA_DIR"', run_on_start=True)
        state, _ = await self.runner([s]).run_start()
        self.assertEqual(state, lc.READY)
        got = sorted((o, lvl) for src, o, lvl in self.logs.lines if src == "src")
        self.assertEqual(got, sorted([("out", "info"), ("err", "error"),
                                      (os.path.join(self.dir, "scripts", "data", "src"), "info")]))

    async def test_a_daemon_holding_the_output_is_start_error_with_a_warning(self) -> None:
        pidfile = os.path.join(self.dir, "daemon")
        self.addCleanup(lambda: os.kill(int(open(pidfile).read()), signal.SIGKILL))
        s = Script("src", "Daemon", f"sleep 60 & echo $! > {pidfile}; echo started", run_on_start=True)
        state, results = await self.runner([s]).run_start()
        self.assertEqual(state, lc.START_ERROR)
        warnings = [o for src, o, lvl in self.logs.lines if src == "src" and lvl == "warn"]
        self.assertEqual(len(warnings), 1)
        self.assertIn("still held its output open", warnings[0])
        self.assertIn('"Daemon" script exited, but its output pipes were still open', self.logs.of("agent-src"))

    async def test_a_failure_is_start_error_with_exit_code_and_tail(self) -> None:
        ok = Script("s-ok", "Fine", "true", run_on_start=True)
        bad = Script("s-bad", "Broken", "for i in $(seq 1 15); do echo line $i; done; exit 2", run_on_start=True)
        state, _ = await self.runner([ok, bad]).run_start()
        self.assertEqual(state, lc.START_ERROR)
        agent = self.logs.of("agent-src")
        self.assertEqual(agent[0], '"Broken" script exit status 2')
        self.assertEqual(agent[1], "last 10 lines of its output:")
        self.assertEqual(agent[2:], [f"  line {i}" for i in range(6, 16)])
        self.assertEqual({lvl for s, _, lvl in self.logs.lines if s == "agent-src"}, {"error"})

    async def test_a_timeout_is_start_timeout(self) -> None:
        slow = Script("s-slow", "Slow", "sleep 30", run_on_start=True, timeout_seconds=0.5)
        bad = Script("s-bad", "Bad", "exit 1", run_on_start=True)
        state, _ = await self.runner([slow, bad]).run_start()
        self.assertEqual(state, lc.START_TIMEOUT)
        self.assertIn('"Slow" script timed out after 0.5s', self.logs.of("agent-src"))

    async def test_stop_scripts_and_their_outcomes(self) -> None:
        self.assertEqual((await self.runner([Script("x", "X", "true", run_on_stop=True)]).run_stop())[0], lc.OFF)
        self.assertEqual((await self.runner([Script("x", "X", "false", run_on_stop=True)]).run_stop())[0],
                         lc.SHUTDOWN_ERROR)
        slow = Script("x", "X", "sleep 30", run_on_stop=True, timeout_seconds=0.3)
        self.assertEqual((await self.runner([slow]).run_stop())[0], lc.SHUTDOWN_TIMEOUT)
        self.assertEqual((await self.runner([]).run_stop())[0], lc.OFF)

    async def test_kill_all_ends_running_scripts(self) -> None:
        runner = self.runner([Script("x", "X", "sleep 30", run_on_start=True)])
        started = Deferred.fromCoroutine(runner.run_start())
        await wait_until(lambda: runner.running, "the script to run")
        await runner.kill_all()
        state, results = await started
        self.assertTrue(results[0].exit.killed)


class CronTests(unittest.TestCase):
    def test_cron_scripts_run_on_schedule_on_the_clock_and_never_overlap(self) -> None:
        clock = task.Clock()
        clock.advance(dt.datetime(2026, 1, 1, 0, 0, 0, tzinfo=dt.UTC).timestamp() + 0.5)
        runs: list[float] = []
        logs = RecordingLogs()
        scripts = [Script("c", "Every 10s", "true", cron="*/10 * * * * *"),
                   Script("bad", "Bad cron", "true", cron="61 * * * * *")]
        runner = ScriptRunner(clock, scripts, logs, "agent-src", "/nonexistent", env=dict, cwd=str)
        hold: list = []

        async def fake_run(i: int):
            runs.append(clock.seconds())
            runner.running[i] = object()  # still running until released
            d: Deferred[None] = Deferred()
            hold.append((i, d))
            await d
            runner.running.pop(i, None)

        runner.run = fake_run  # type: ignore[method-assign]
        runner.start_cron()
        self.assertTrue(any("Bad cron: invalid cron expression" in line for line in logs.of("agent-src")))
        clock.advance(9.5)
        self.assertEqual(len(runs), 1)
        self.assertEqual(dt.datetime.fromtimestamp(runs[0], dt.UTC).second, 10)
        clock.advance(10)  # the first run is still going: skipped
        self.assertEqual(len(runs), 1)
        hold[0][1].callback(None)
        clock.advance(10)
        self.assertEqual(len(runs), 2)
        hold[1][1].callback(None)
        runner.stop_cron()
        self.assertEqual(clock.getDelayedCalls(), [])
