"""The scheduled batch job in ops/batch: its script, its example input, its schedules."""

from __future__ import annotations

import configparser
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from fleet.errors import InvalidSubmission
from fleet.run.agent import load_agents
from fleet.surfaces.batch import parse_line

OPS = Path(__file__).resolve().parents[3] / "ops" / "batch"


@pytest.fixture
def fake_fleet(tmp_path: Path) -> Path:
    """A stand-in for the fleet CLI that records its arguments, one per line."""
    stub = tmp_path / "fleet-stub"
    stub.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "$STUB_ARGS"\n')
    stub.chmod(0o755)
    return stub


def _run_script(tmp_path: Path, stub: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(OPS / "nightly-writer.sh"), *args], capture_output=True, text=True, timeout=30,
        env={"PATH": os.environ["PATH"], "FLEET_BIN": str(stub), "FLEET_BATCH_DIR": str(tmp_path / "batch"),
             "STUB_ARGS": str(tmp_path / "args"), **env},
    )


def test_nightly_script_runs_the_dated_file_under_a_dated_batch_id(tmp_path, fake_fleet):
    (tmp_path / "batch" / "in").mkdir(parents=True)
    (tmp_path / "batch" / "in" / "writer-2026-05-01.jsonl").write_text('{"topic": "a"}\n')
    done = _run_script(tmp_path, fake_fleet, "2026-05-01", FLEET_BATCH_RUN_DEADLINE_S="3600")
    assert done.returncode == 0, done.stderr
    args = (tmp_path / "args").read_text().splitlines()
    batch = tmp_path / "batch"
    assert args == ["batch", "run", str(batch / "in" / "writer-2026-05-01.jsonl"), "--agent", "writer",
                    "--out", str(batch / "out" / "writer-2026-05-01.results.jsonl"),
                    "--batch-id", "writer-2026-05-01", "--max-in-flight", "64", "--deadline", "3600"]
    assert (batch / "out").is_dir()


def test_nightly_script_without_input_does_nothing(tmp_path, fake_fleet):
    done = _run_script(tmp_path, fake_fleet, "2026-05-02")
    assert done.returncode == 0 and "nothing to do" in done.stdout
    assert not (tmp_path / "args").exists()
    assert _run_script(tmp_path, fake_fleet, "yesterday").returncode == 2


def test_example_input_has_one_line_the_writer_rejects():
    writer = load_agents(None)["writer"]
    rejected = []
    for n, text in enumerate((OPS / "example-input.jsonl").read_text().splitlines(), 1):
        item = parse_line(n, text)
        assert item.error is None, item.error
        try:
            writer.validate_input(item.input)
        except InvalidSubmission:
            rejected.append(n)
    assert len(rejected) == 1


def test_cronjob_never_runs_two_at_once():
    docs = [d for d in yaml.safe_load_all((OPS / "cronjob.yaml").read_text()) if d]
    cron = next(d for d in docs if d["kind"] == "CronJob")
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    script = "\n".join(pod["containers"][0]["args"])
    assert "fleet batch run" in script and '--batch-id "writer-$date_"' in script
    assert pod["securityContext"]["runAsNonRoot"] is True
    claim = pod["volumes"][0]["persistentVolumeClaim"]["claimName"]
    assert any(d["kind"] == "PersistentVolumeClaim" and d["metadata"]["name"] == claim for d in docs)


def test_systemd_timer_starts_the_oneshot_service():
    service = configparser.ConfigParser(strict=False, interpolation=None)
    service.read(OPS / "fleet-nightly-writer.service")
    assert service["Service"]["Type"] == "oneshot"
    assert service["Service"]["KillSignal"] == "SIGINT"  # stops between two lines
    assert service["Service"]["ExecStart"].endswith("ops/batch/nightly-writer.sh")
    timer = configparser.ConfigParser(strict=False, interpolation=None)
    timer.read(OPS / "fleet-nightly-writer.timer")
    assert timer["Timer"]["OnCalendar"] and timer["Timer"]["Persistent"] == "true"
