"""``create-workspaces N`` and ``cleanup``: a scale test's workspaces, made and removed through the
server's API like anyone's (no template: their agents are the simulated ones).

Names are ``scaletest-{run}-{i}`` with a random run id, so ``cleanup`` removes exactly the
workspaces scale tests made (all runs, or one ``--prefix``) and never a person's.
"""

from __future__ import annotations

import functools
import re
import secrets
from collections.abc import Callable, Coroutine, Iterable
from typing import Any, Protocol, TypeVar, cast

from twisted.internet import defer
from twisted.python.failure import Failure

from coderstack.scaletest.runfile import AgentEntry, RunFile

NAME_PREFIX = "scaletest"
#: What a scale test's workspace is called; cleanup matches nothing else.
NAME_RE = re.compile(rf"^{NAME_PREFIX}-[0-9a-f]{{6}}-\d+$")

T = TypeVar("T")


class API(Protocol):
    url: str

    async def get(self, path: str) -> Any: ...
    async def post(self, path: str, body: Any = None) -> Any: ...
    async def delete(self, path: str) -> Any: ...


def new_prefix() -> str:
    return f"{NAME_PREFIX}-{secrets.token_hex(3)}"


async def bounded(jobs: Iterable[Callable[[], Coroutine[Any, Any, T]]],
                  concurrency: int) -> list[T | BaseException]:
    """Run the jobs, at most ``concurrency`` at once; each one's result or exception, in order."""
    lock = defer.DeferredSemaphore(max(1, concurrency))
    done = await defer.DeferredList([lock.run(job) for job in jobs], consumeErrors=True)
    return [result if ok else cast(Failure, result).value for ok, result in done]


async def create_workspaces(api: API, count: int, *, prefix: str | None = None,
                            concurrency: int = 8,
                            progress: Callable[[int], None] = lambda done: None) -> tuple[RunFile, list[str]]:
    """``count`` workspaces for the signed-in user; the run file and an error line per failure."""
    prefix = prefix or new_prefix()
    done = 0

    async def make(i: int) -> AgentEntry:
        nonlocal done
        ws = await api.post("/api/v2/users/me/workspaces", {"name": f"{prefix}-{i}"})
        done += 1
        progress(done)
        return AgentEntry(ws["name"], ws["id"], ws["agents"][0]["id"], ws["agent_token"])

    got = await bounded([functools.partial(make, i) for i in range(count)], concurrency)
    entries = tuple(r for r in got if isinstance(r, AgentEntry))
    errors = [f"{prefix}-{i}: {r}" for i, r in enumerate(got) if isinstance(r, BaseException)]
    return RunFile(api.url, prefix, entries), errors


async def cleanup(api: API, prefix: str | None = None, *, concurrency: int = 8) -> tuple[list[str], list[str]]:
    """Delete the signed-in user's scale-test workspaces (those of one run with ``prefix``);
    the names deleted, and an error line per failure."""
    listed = (await api.get("/api/v2/workspaces"))["workspaces"]
    mine = [w for w in listed if NAME_RE.match(w["name"])
            and (prefix is None or w["name"].startswith(prefix + "-"))]

    async def remove(w: dict[str, Any]) -> str:
        await api.delete(f"/api/v2/workspaces/{w['id']}")
        return str(w["name"])

    got = await bounded([functools.partial(remove, w) for w in mine], concurrency)
    deleted = [r for r in got if isinstance(r, str)]
    errors = [f"{w['name']}: {r}" for w, r in zip(mine, got, strict=True) if isinstance(r, BaseException)]
    return deleted, errors
