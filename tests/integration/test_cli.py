"""The ``fleet`` command as a user runs it: real processes, real Redis and Triton."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.integration
CLI = [sys.executable, "-m", "fleet.surfaces.cli"]


def run_cli(fleet, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, **fleet.env}
    return subprocess.run([*CLI, *args], env=env, capture_output=True, text=True, timeout=120, check=check)


def test_agents_lists_steps_schema_and_example(fleet):
    out = json.loads(run_cli(fleet, "agents", "--json").stdout)
    calc = out["agents"]["calculator"]
    assert [s["name"] for s in calc["steps"]] == ["plan", "act", "answer"]
    assert calc["input_schema"]["required"] == ["question"]
    assert calc["example"] == {"question": "What is 12 * 7 + 3?"}
    solver = out["agents"]["solver"]
    assert {s["loop"] for s in solver["steps"]} == {"solve"}
    text = run_cli(fleet, "agents").stdout
    assert "calculator:" in text and "plan(llm) -> act(tool) -> answer(llm)" in text


def test_submit_wait_and_show(fleet):
    done = run_cli(fleet, "submit", "calculator", "--input", '{"question": "What is 9 * 9?"}',
                   "--priority", "batch", "--wait", "--json")
    run = json.loads(done.stdout)
    assert run["status"] == "succeeded" and run["result"] == "The answer is 81."
    assert run["priority"] == "batch" and run["tokens_out"] > 0
    shown = json.loads(run_cli(fleet, "runs", "show", run["id"], "--json").stdout)
    assert shown["id"] == run["id"] and [s["key"] for s in shown["steps"]] == ["plan", "act", "answer"]
    human = run_cli(fleet, "runs", "show", run["id"]).stdout
    assert f"run {run['id']}" in human and "result: The answer is 81." in human


def test_bad_input_exits_2_naming_the_field(fleet):
    bad = run_cli(fleet, "submit", "calculator", "--input", '{"question": 42, "x": 1}', "--json", check=False)
    assert bad.returncode == 2
    assert json.loads(bad.stdout)["field"].startswith("input.")
    not_json = run_cli(fleet, "submit", "calculator", "--input", "{oops", check=False)
    assert not_json.returncode == 2 and "--input is not valid JSON" in not_json.stderr
    missing = run_cli(fleet, "runs", "show", "0" * 32, "--json", check=False)
    assert missing.returncode == 1 and "no run" in json.loads(missing.stdout)["error"]


def test_status_reports_redis_triton_queues_and_workers(fleet):
    report = json.loads(run_cli(fleet, "status", "--json").stdout)
    assert report["redis"]["up"] is True
    assert report["triton"]["server_ready"] and report["triton"]["model_ready"]
    queues = {q["name"]: q for q in report["queues"]}
    assert set(queues) == {f"{fleet.settings.queue_prefix}{k}.{c}" for k in ("llm", "tool")
                           for c in ("interactive", "batch")}
    assert all(q["depth"] == 0 for q in queues.values())
    assert set(fleet.nodes.values()) <= set(report["workers"])
    assert set(report["inflight"]) == {"interactive", "batch"}
    assert report["admission"]["interactive"]["threads"] >= 8  # the module's inference worker announced itself
    (replica,) = report["pool"]["replicas"]
    assert replica["model_ready"] and replica["state"] == "up" and replica["capacity"] == 64  # the model's own


def _tree(pid: int) -> set[int]:
    """A process and every descendant of it."""
    return {pid} | {p.pid for p in psutil.Process(pid).children(recursive=True)}


def _alive(pids: set[int]) -> list[int]:
    alive = []
    for pid in sorted(pids):
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.NoSuchProcess:
            pass
    return alive


def _check_stack_secured(root: Path, output: str) -> dict[str, object]:
    """What a local process without the stack's secrets can do to the running stack."""
    import base64
    import re
    import urllib.error
    import urllib.request

    import redis

    found: dict[str, object] = {}
    env_file = root / ".fleet" / "stack.env"
    found["stack.env mode"] = oct(env_file.stat().st_mode & 0o777)
    stack_env = dict(line.split("=", 1) for line in env_file.read_text().splitlines() if "=" in line)
    url = stack_env["FLEET_REDIS_URL"]
    bare = redis.Redis(host="127.0.0.1", port=int(url.rsplit(":", 1)[1].split("/")[0]), socket_timeout=5)
    try:
        bare.ping()
        found["redis without password"] = "answers"
    except redis.AuthenticationError:
        found["redis without password"] = "refused"
    found["redis with password"] = "answers" if redis.Redis.from_url(url, socket_timeout=5).ping() else "?"
    flower_url, login = re.search(r"flower\s+(http://\S+)\s+\(login (\S+)\)", output).groups()
    try:
        urllib.request.urlopen(flower_url + "/api/workers", timeout=10)
        found["flower api without login"] = 200
    except urllib.error.HTTPError as exc:
        found["flower api without login"] = exc.code
    req = urllib.request.Request(flower_url + "/api/workers?refresh=1",
                                 headers={"Authorization": "Basic " + base64.b64encode(login.encode()).decode()})
    with urllib.request.urlopen(req, timeout=30) as resp:
        workers = json.loads(resp.read())
    found["flower api with login"] = "lists workers" if any(w.startswith("tools@") for w in workers) else workers
    flower = [p for p in psutil.process_iter(["cmdline"]) if "flower" in (p.info["cmdline"] or [])]
    found["flower login on its command line"] = any(login.split(":")[1] in " ".join(p.info["cmdline"]) for p in flower)
    http = stack_env["FLEET_TRITON_HTTP_URL"]
    load = urllib.request.Request(f"http://{http}/v2/repository/models/medium_sim/load", data=b"{}", method="POST")
    try:
        urllib.request.urlopen(load, timeout=10)
        found["triton model load"] = "allowed"
    except urllib.error.HTTPError:
        found["triton model load"] = "refused"
    return found


def _demo_runs_found(cwd: Path, env: dict[str, str], output: str) -> dict[str, int]:
    """What a new user does with the demo's lines: each 8-character id shown (with its timeline)
    by the CLI beside the stack, listed by ``fleet runs list``, and its page in the console."""
    import re
    import urllib.request

    short = re.findall(r" out  ([0-9a-f]{8})  ", output)
    gateway = re.search(r"^gateway    (http://\S+)", output, flags=re.MULTILINE).group(1)  # type: ignore[union-attr]

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*CLI, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)

    shown = [json.loads(cli("runs", "show", s, "--json").stdout)["id"] for s in short]
    timelines = [cli("runs", "show", s, "--timeline").stdout for s in short]
    listed = {r["id"] for r in json.loads(cli("runs", "list", "--json").stdout)["runs"]}
    pages = [urllib.request.urlopen(f"{gateway}/console/runs/{s}", timeout=10).read().decode() for s in short]
    return {"shown": sum(full.startswith(s) for full, s in zip(shown, short)),
            "timelines": sum("legend:" in t and f"run {full}" in t for t, full in zip(timelines, shown)),
            "listed": len(listed & set(shown)),
            "console pages": sum(f'<code id="run-id">{full}</code>' in p and 'class="waterfall"' in p
                                 for p, full in zip(pages, shown))}


def test_fleet_up_runs_the_demo_and_leaves_no_process_behind(tmp_path: Path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    env.update(FLEET_FLOWER_PORT="0", FLEET_GATEWAY_PORT="0")  # any free ports
    proc = subprocess.Popen([*CLI, "up", "--demo"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    try:
        for line in proc.stdout:  # type: ignore[union-attr]
            lines.append(line)
            if line.startswith("fleet is up"):
                break
        started = _tree(proc.pid)  # fleet up's own tree, nothing else the suite runs
        secured = _check_stack_secured(tmp_path, "".join(lines))
        found = _demo_runs_found(tmp_path, env, "".join(lines))
        assert len(started) >= 6  # fleet up, redis, triton (+stubs), workers, flower, gateway
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        rest, _ = proc.communicate(timeout=60)
        lines.append(rest)
    finally:
        if proc.poll() is None:
            proc.kill()
    output = "".join(lines)
    assert proc.returncode == 0, output
    assert "demo       all runs succeeded" in output
    for agent, priority in (("calculator", "interactive"), ("solver", "interactive"), ("writer", "batch"),
                            ("multicalc", "interactive"), ("fanout", "interactive"), ("triage", "interactive"),
                            ("approval", "interactive")):
        assert any(agent in line and priority in line and "succeeded" in line for line in output.splitlines())
    assert "is waiting; signalling 'approve'" in output  # the approval run parked until the demo approved it
    assert "The answer is 87." in output
    assert "flower     http://127.0.0.1:" in output and "gateway    http://127.0.0.1:" in output
    assert "stopped." in output
    assert secured == {"stack.env mode": "0o600", "redis without password": "refused",
                       "redis with password": "answers", "flower api without login": 401,
                       "flower api with login": "lists workers", "triton model load": "refused",
                       "flower login on its command line": False}, secured
    assert found == {"shown": 10, "timelines": 10, "listed": 10, "console pages": 10}, found
    alive = _alive(started - {proc.pid})
    assert alive == [], f"left behind: {alive}"
    assert not (tmp_path / ".fleet" / "stack.env").exists()


def test_runs_signal_resumes_a_run_waiting_for_it(fleet):
    run_id = fleet.client.submit("approval", {"request": "Refund order 7"}, deadline_s=120)
    for _ in range(300):
        if fleet.client.get(run_id).status == "waiting":
            break
        time.sleep(0.1)
    shown = run_cli(fleet, "runs", "show", run_id[:8]).stdout
    assert "waiting for signal 'approve'" in shown
    out = json.loads(run_cli(fleet, "runs", "signal", run_id[:8], "approve", "--payload", '{"note": "yes"}',
                             "--json").stdout)
    assert out["outcome"] == "resumed" and out["run_id"] == run_id
    run = fleet.client.wait(run_id, timeout=60)
    assert run.status == "succeeded" and run.outputs["approval"] == {"note": "yes"}
    bad = run_cli(fleet, "runs", "signal", run_id, "approve", "--payload", "{nope", check=False)
    assert bad.returncode == 2 and "--payload is not valid JSON" in bad.stderr


def test_runs_list_filters_pages_and_its_short_ids_are_taken_back(fleet):
    ok = json.loads(run_cli(fleet, "submit", "calculator", "--input", '{"question": "What is 3 * 3?"}',
                            "--wait", "--json").stdout)
    bad = run_cli(fleet, "submit", "doomed", "--input", '{"value": "7"}', "--wait", "--json", check=False)
    failed = json.loads(bad.stdout)
    assert ok["status"] == "succeeded" and failed["status"] == "dead_lettered"
    listed = json.loads(run_cli(fleet, "runs", "list", "--since", "10m", "--limit", "500", "--json").stdout)
    assert set(listed) == {"runs", "next_cursor", "scanned", "backlog"}
    ids = [r["id"] for r in listed["runs"]]
    assert ok["id"] in ids and failed["id"] in ids
    assert [r["created_at"] for r in listed["runs"]] == sorted((r["created_at"] for r in listed["runs"]), reverse=True)
    only = json.loads(run_cli(fleet, "runs", "list", "--status", "dead_lettered,failed", "--agent", "doomed",
                              "--json").stdout)
    assert failed["id"] in [r["id"] for r in only["runs"]] and {r["status"] for r in only["runs"]} == {"dead_lettered"}
    first = json.loads(run_cli(fleet, "runs", "list", "--limit", "1", "--json").stdout)
    second = json.loads(run_cli(fleet, "runs", "list", "--limit", "1", "--cursor", first["next_cursor"],
                                "--json").stdout)
    assert [r["id"] for r in first["runs"] + second["runs"]] == ids[:2]
    # The table prints short ids, and each is taken back by runs show.
    table = run_cli(fleet, "runs", "list", "--agent", "doomed").stdout.splitlines()
    assert table[0].split()[:3] == ["id", "created", "tenant"]
    short = next(line.split()[0] for line in table[1:] if "dead_lettered" in line)
    assert len(short) >= 8 and failed["id"].startswith(short)
    shown = json.loads(run_cli(fleet, "runs", "show", short, "--json").stdout)
    assert shown["id"] == failed["id"] and shown["status"] == "dead_lettered"
    bad_since = run_cli(fleet, "runs", "list", "--since", "yesterday", "--json", check=False)
    assert bad_since.returncode == 2 and json.loads(bad_since.stdout)["field"] == "since"
    bad_status = run_cli(fleet, "runs", "list", "--status", "finished", "--json", check=False)
    assert bad_status.returncode == 2 and json.loads(bad_status.stdout)["field"].startswith("status")
    too_short = run_cli(fleet, "runs", "show", short[:4], "--json", check=False)
    assert too_short.returncode == 2 and json.loads(too_short.stdout)["field"] == "run_id"


def test_fleet_up_ha_serves_on_after_its_primary_is_killed(tmp_path: Path):
    """``fleet up --ha``: a primary, two replicas and three Sentinels behind the whole stack;
    the primary killed with ``kill -9``, the stack's own processes serve the next run from the
    promoted replica, and Ctrl-C leaves nothing behind."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    env.update(FLEET_FLOWER_PORT="0", FLEET_GATEWAY_PORT="0")
    proc = subprocess.Popen([*CLI, "up", "--ha"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    try:
        for line in proc.stdout:  # type: ignore[union-attr]
            lines.append(line)
            if line.startswith("fleet is up"):
                break
        started = _tree(proc.pid)
        stack_env = dict(line.split("=", 1) for line in (tmp_path / ".fleet" / "stack.env").read_text().splitlines())
        cli_env = {**env, "PYTHONPATH": os.environ.get("PYTHONPATH", "")}

        def cli(*args: str) -> dict:
            out = subprocess.run([*CLI, *args], cwd=tmp_path, env=cli_env, capture_output=True, text=True, timeout=120)
            assert out.returncode == 0, out.stdout + out.stderr
            return json.loads(out.stdout)

        before = cli("status", "--json")["redis"]
        port = int(before["primary"].rsplit(":", 1)[1])
        # redis-server names itself by its address (its process title), among the stack's processes.
        titles = {p: " ".join(psutil.Process(p).cmdline()).split() for p in started}
        servers = [p for p, title in titles.items() if f"127.0.0.1:{port}" in title and "[sentinel]" not in title]
        assert len(servers) == 1, (port, titles)
        server = servers[0]
        os.kill(server, signal.SIGKILL)
        run = cli("submit", "calculator", "--input", '{"question": "What is 6 * 7?"}', "--wait", "--json")
        after = cli("status", "--json")["redis"]
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
        lines.append(rest)
    finally:
        if proc.poll() is None:
            proc.kill()
    output = "".join(lines)
    assert "FLEET_REDIS_SENTINELS" in stack_env and "FLEET_REDIS_URL" not in stack_env
    assert "redis      primary 127.0.0.1:" in output and len(stack_env["FLEET_REDIS_SENTINELS"].split(",")) == 3
    assert before["up"] and after["up"] and after["primary"] != before["primary"]
    assert "exited; the Sentinels promote a replica, the stack goes on" in output
    assert (run["status"], run["result"]) == ("succeeded", "The answer is 42.")
    assert proc.returncode == 0, output
    assert _alive(started - {proc.pid}) == [], "left behind"
