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



ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "ops" / "bench" / "results"


def _readme_blocks():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_readme", ROOT / "ops" / "bench" / "readme.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_results_file_names_its_command_and_commit():
    files = sorted(RESULTS.glob("*.md"))
    assert files
    missing = {f.name: [k for k in ("Command", "Commit") if not re.search(rf"^{k}: `[^`]+`", f.read_text(), re.M)]
               for f in files}
    assert not {name: keys for name, keys in missing.items() if keys}


def test_readme_figures_are_the_results_files_own():
    """README's result blocks hold what the results files say: a figure changes only with its file."""
    bench = _readme_blocks()
    blocks = bench.BLOCK.findall(README)
    assert len(blocks) >= 5, "README quotes its benchmark figures through result blocks"
    assert bench.render(README) == README, "run: python ops/bench/readme.py"


def test_a_result_block_takes_its_section_and_names_the_file(tmp_path):
    bench = _readme_blocks()
    (tmp_path / "r.md").write_text("# T\n\nCommand: `python x.py`  \nCommit: `abc`  \n\n## A\n\n| a |\n\n"
                                   "### inner\n\nx\n\n## B\n\nnot this\n")
    out = bench.render('<!-- results r.md "A" -->\nold\n<!-- /results -->\n', root=tmp_path)
    assert "*From [`r.md`](r.md): `python x.py`, commit `abc`.*" in out
    assert "| a |" in out and "**inner**" in out and "not this" not in out and "old" not in out
