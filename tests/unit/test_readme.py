"""README.md stays true to the code: every setting is in its configuration table."""

from __future__ import annotations

import re
from pathlib import Path

from fleet.settings import Settings

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def test_every_setting_is_in_the_configuration_table_and_nothing_else():
    table = README.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `(FLEET_[A-Z0-9_]+)` \|", table, flags=re.MULTILINE))
    settings = {f"FLEET_{name.upper()}" for name in Settings.model_fields}
    assert documented == settings, {"missing": sorted(settings - documented), "stale": sorted(documented - settings)}


def test_the_two_commands_are_the_ones_ci_runs():
    ci = (Path(__file__).resolve().parents[2] / ".ci" / "run").read_text()
    assert "make test" in README and "make run" in README
    assert re.search(r"^make test$", ci, flags=re.MULTILINE)

