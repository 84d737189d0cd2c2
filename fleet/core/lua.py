"""Lua scripts: kept in ``.lua`` files beside the module that owns them, loaded by one registry,
always called by SHA.

A script file may include shared fragments (``--!include <name>.lua``, resolved first beside
the script, then in ``fleet/core/lua_fragments/``): a rule written once, such as "this commit belongs to
this delivery" (``delivery.lua``), is included wherever it is needed. Each script's name says
how many keys it takes (``commit_step-3.lua``); a call with another number of keys fails at
once, not inside Redis.

Calls go by SHA (``EVALSHA``) and never send a script's text on the hot path. A Redis that does
not know a script (it restarted, or a replica was promoted) answers ``NOSCRIPT``; the script is
then loaded and the call made again, directly (:meth:`LuaScript.__call__`) or, for the script
calls queued on a pipeline, after the pipeline ran (:func:`execute`: a call that got ``NOSCRIPT``
did not run, so running it again runs it once).
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import redis
from redis.client import Pipeline
from redis.exceptions import NoScriptError

from fleet.core.replication import ReplicaWait

_SHARED = Path(__file__).with_name("lua_fragments")
_INCLUDE = re.compile(r"^--!include\s+(\S+)\s*$", re.MULTILINE)
_KEYS_IN_NAME = re.compile(r"-(\d+)\.lua$")

_registry: dict[str, "LuaScript"] = {}
_by_sha: dict[str, "LuaScript"] = {}
_lock = threading.Lock()


class LuaScript:
    """One script: its name, its text (fragments included) and its SHA."""

    def __init__(self, name: str, source: str, numkeys: int | None = None) -> None:
        self.name = name
        self.script = source  # what SCRIPT LOAD sends (redis-py's pipelines read ``script``)
        self.sha = hashlib.sha1(source.encode()).hexdigest()
        self.numkeys = numkeys

    def __repr__(self) -> str:
        return f"LuaScript({self.name})"

    def _check(self, keys: Sequence[Any]) -> None:
        if self.numkeys is not None and len(keys) != self.numkeys:
            raise ValueError(f"{self.name} takes {self.numkeys} keys, got {len(keys)}")

    def __call__(self, client: "redis.Redis | Pipeline", keys: Sequence[Any] = (), args: Sequence[Any] = ()) -> Any:
        """Run the script on ``client`` (or queue it on a pipeline: run that with :func:`execute`)."""
        self._check(keys)
        if isinstance(client, Pipeline):
            return client.evalsha(self.sha, len(keys), *keys, *args)
        try:
            return client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            client.script_load(self.script)
            return client.evalsha(self.sha, len(keys), *keys, *args)


def _expand(path: Path, seen: tuple[Path, ...] = ()) -> str:
    if path in seen:
        raise ValueError(f"Lua include cycle: {' -> '.join(p.name for p in (*seen, path))}")
    text = path.read_text()

    def include(match: re.Match[str]) -> str:
        name = match.group(1)
        for folder in (path.parent, _SHARED):
            if (folder / name).exists():
                return _expand(folder / name, (*seen, path)).rstrip("\n")
        raise FileNotFoundError(f"{path.name}: included fragment {name} not found beside it or in {_SHARED}")

    return _INCLUDE.sub(include, text)


def load(owner: str, name: str, prelude: str = "") -> LuaScript:
    """The script ``name`` from the folder of the module file ``owner`` (pass ``__file__``),
    with its included fragments and an optional ``prelude`` (constants from Python) in front.
    Loaded once per process; fails at import for a missing file or fragment."""
    path = Path(owner).with_name(name)
    key = f"{path}|{prelude}"
    with _lock:
        found = _registry.get(key)
        if found is None:
            match = _KEYS_IN_NAME.search(name)
            found = LuaScript(path.stem, prelude + _expand(path), int(match.group(1)) if match else None)
            _registry[key] = found
            _by_sha[found.sha] = found
    return found



def scripts() -> list[LuaScript]:
    """Every script loaded in this process."""
    with _lock:
        return list(_registry.values())


def execute(pipe: Pipeline, raise_on_error: bool = True, wait: "ReplicaWait | None" = None,
            what: str = "a write") -> list[Any]:
    """Run a pipeline that holds script calls: one round trip, and one more to load and run
    again, in their order, the calls that found their script unknown (``NOSCRIPT``).

    With ``wait``, each round trip ends with its barrier (:mod:`fleet.core.replication`): the
    replicas hold what the pipeline wrote before this returns (``what`` names it in the log
    when they do not).

    Raises the first error of the pipeline's replies unless ``raise_on_error`` is False.
    """
    stack = [args for args, _ in pipe.command_stack]
    barrier = wait.queue(pipe) if wait is not None else 0
    replies = _without_barrier(pipe.execute(raise_on_error=False), barrier, wait, what)
    missing = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
    if missing:
        # The pipeline was reset by its run: reuse it for the calls that did not run.
        shas = list(dict.fromkeys(stack[i][1] for i in missing))
        for sha in shas:
            script = _by_sha.get(sha)
            if script is None:
                raise RuntimeError(f"NOSCRIPT for a script this process did not load ({sha})")
            pipe.script_load(script.script)
        for i in missing:
            pipe.execute_command(*stack[i])
        barrier = wait.queue(pipe) if wait is not None else 0
        redone = _without_barrier(pipe.execute(raise_on_error=False), barrier, wait, what)[len(shas):]
        for i, reply in zip(missing, redone):
            replies[i] = reply
    if raise_on_error:
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
    return replies


def _without_barrier(replies: list[Any], barrier: int, wait: "ReplicaWait | None", what: str) -> list[Any]:
    if not barrier or wait is None:
        return replies
    wait.check(replies[-1], what)
    return replies[:-barrier]
