"""The two clients offer the same thing: every public method of the synchronous client exists on
the asyncio client with the same parameters (awaitable, or an async iterator for streams)."""

from __future__ import annotations

import inspect

from fleet import AsyncFleetClient, FleetClient
from fleet.scheduling.submission import OPTIONS, Submission


def _public(cls: type) -> dict[str, inspect.Signature]:
    return {name: inspect.signature(member) for name, member in vars(cls).items()
            if not name.startswith("_") and callable(member)}


def test_the_async_client_has_every_method_of_the_sync_one_with_the_same_parameters():
    sync, aio = _public(FleetClient), _public(AsyncFleetClient)
    assert sorted(sync) == sorted(aio)
    for name, sig in sync.items():
        assert list(sig.parameters) == list(aio[name].parameters), name
        for param, spec in sig.parameters.items():
            other = aio[name].parameters[param]
            assert (spec.kind, spec.default) == (other.kind, other.default), (name, param)


def test_every_async_method_is_awaitable_or_an_async_stream():
    for name in _public(AsyncFleetClient):
        member = getattr(AsyncFleetClient, name)
        if name in ("scoped",):
            continue  # a view of the client, made at once
        assert inspect.iscoroutinefunction(member) or inspect.isasyncgenfunction(member), name


def test_submission_options_are_the_submission_models_fields():
    assert set(OPTIONS) | {"agent", "input"} == set(Submission.model_fields)
