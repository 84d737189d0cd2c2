"""Engines of the dev model for its unit tests, stopped after each test."""

from __future__ import annotations

import pytest

from tests.support.dev_engine import engine as dev_engine


@pytest.fixture
def engine_factory():  # noqa: ANN201
    engines = []

    def make(cfg):  # noqa: ANN001, ANN202
        engine = dev_engine.Engine(cfg, name="test")
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.stop()
