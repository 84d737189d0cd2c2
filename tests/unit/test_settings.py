"""The settings object: checked at load, read from the environment."""

from __future__ import annotations

import pytest

from fleet.settings import Settings


def test_settings_refuse_a_visibility_timeout_shorter_than_a_step():
    with pytest.raises(ValueError, match="must exceed FLEET_STEP_TIME_LIMIT_S"):
        Settings(_env_file=None, step_time_limit_s=600, visibility_timeout_s=300)


def test_settings_from_environment(monkeypatch):
    monkeypatch.setenv("FLEET_INTERACTIVE_DEADLINE_S", "12.5")
    monkeypatch.setenv("FLEET_TOOL_MODULES", '["a.b"]')
    s = Settings(_env_file=None)
    assert s.deadline_s("interactive") == 12.5
    assert s.tool_modules == ["a.b"]
    assert s.triton_priority("interactive") < s.triton_priority("batch")
