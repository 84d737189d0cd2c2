"""The ``fleet`` command: run the local stack, list agents, submit and inspect runs, status.

Every command that reports takes ``--json`` and then prints exactly one JSON object.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

import click

from fleet.errors import FleetError, InvalidSubmission, RunNotFound
from fleet.settings import Settings


def _emit(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=None, default=str))


def _fail(message: str, as_json: bool, code: int = 1, **extra: Any) -> None:
    if as_json:
        _emit({"error": message, **extra})
    else:
        click.echo(f"error: {message}", err=True)
    sys.exit(code)


def _bad_option(option: str, exc: InvalidSubmission) -> str:
    """``--input is not valid JSON: ...`` / ``--input: input.q: text holds a NUL character``."""
    reason = str(exc).removeprefix(f"{option}: ")
    if exc.field == option and reason.startswith("not valid JSON"):
        return f"--{option} is {reason}"
    return f"--{option}: {exc}"


@click.group()
@click.option("--tenant", default=None, metavar="NAME",
              help="Act as this tenant only (its runs, dead letters and batches). Without it the CLI is the "
              "operator's on the fleet's host: it sees every tenant and submits as FLEET_TENANT.")
@click.pass_context
def main(ctx: click.Context, tenant: str | None) -> None:
    """fleet: a worker fleet that runs AI agents on Celery, Redis and Triton."""
    ctx.obj = {"tenant": tenant}


def _client(settings: Settings | None = None):  # noqa: ANN202 - the import stays lazy
    """A client acting as ``--tenant``, or the operator's (which sees every tenant)."""
    from fleet.surfaces.client import FleetClient

    tenant = (click.get_current_context().find_root().obj or {}).get("tenant")
    try:
        return FleetClient(settings, tenant=tenant, admin=tenant is None)
    except KeyError as exc:
        _fail(f"--tenant: {exc.args[0]}", False, code=2)


@main.command()
@click.option("--demo", is_flag=True, help="Submit interactive and batch runs once the stack is up.")
@click.option("--exit-after-demo", is_flag=True, help="Stop the stack when the demo is done.")
@click.option("--ha", is_flag=True, help="Redis as a primary, two replicas and three Sentinels (kill the primary "
              "to see a failover).")
def up(demo: bool, exit_after_demo: bool, ha: bool) -> None:
    """Start the local stack in the foreground: Redis, Triton, workers, Flower."""
    from fleet.logs import setup_logging
    from fleet.surfaces.stack import up as stack_up

    settings = Settings()
    setup_logging("WARNING")
    sys.exit(stack_up(settings, demo=demo, exit_after_demo=exit_after_demo, ha=ha))


@main.command()
@click.option("--json", "as_json", is_flag=True)
def agents(as_json: bool) -> None:
    """List agents with their steps, input schema and an example input."""
    from fleet.run.agent import load_agents
    from fleet.run.tools import load_tool_modules
    from fleet.surfaces.views import agent_infos

    settings = Settings()
    load_tool_modules(settings.tool_modules)
    described = {info.name: info.model_dump(exclude={"name"}) for info in agent_infos(load_agents(settings.agents_dir))}
    if as_json:
        _emit({"agents": described})
        return
    for name, d in described.items():
        click.echo(f"{name}: {d['description']}")
        steps = " -> ".join(
            f"{s['name']}({s['kind']})" + (f" in loop {s['loop']}" if s["loop"] else "") for s in d["steps"]
        )
        click.echo(f"  steps:   {steps}")
        fields = ", ".join(f"{k}: {v.get('type', '?')}" for k, v in d["input_schema"]["properties"].items())
        click.echo(f"  input:   {{{fields}}}")
        click.echo(f"  example: {json.dumps(d['example'])}")


def _print_run(run, timeline: bool = False) -> None:  # noqa: ANN001
    latency = f"{run.latency_s:.2f}s" if run.latency_s is not None else "-"
    click.echo(f"run {run.id}  agent {run.agent}  {run.priority}  {run.status}  latency {latency}  "
               f"tokens {run.tokens_in} in / {run.tokens_out} out  cost {run.cost:.4g}")
    if run.waiting_for:
        until = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(run.wait_until or 0))
        click.echo(f"waiting for signal {run.waiting_for!r} until {until} "
                   f"(fleet runs signal {run.id[:8]} {run.waiting_for} --payload JSON)")
    if timeline:
        from fleet.surfaces.timeline import waterfall

        for line in waterfall(run):
            click.echo(line)
        _print_ending(run)
        return
    for s in run.steps:
        dur = f"{s.duration_s:.3f}s" if s.duration_s is not None else "-"
        model = f"  model {s.model}{' (fallback)' if s.fallback else ''}" if s.model else ""
        click.echo(f"  {s.key:<16} {s.status:<8} {dur:>8}  attempts {s.attempts}  tokens {s.tokens_in}/{s.tokens_out}"
                   f"{model}")
    _print_ending(run)


def _print_ending(run) -> None:  # noqa: ANN001
    if run.result is not None:
        click.echo(f"result: {run.result if isinstance(run.result, str) else json.dumps(run.result)}")
    if run.error:
        click.echo(f"error: {run.error.get('type')}: {run.error.get('message')}")


# Flags whose name is not the Submission field's (spelled with dashes).
_FLAGS = {"deadline_s": "--deadline"}


def _click_type(annotation: Any) -> Any:
    """The click type of a Submission field: its non-None type, a choice for a Literal."""
    kind = annotation
    if get_origin(annotation) in (Union, UnionType):
        kind = next(a for a in get_args(annotation) if a is not type(None))
    if get_origin(kind) is Literal:
        return click.Choice(list(get_args(kind)))
    return kind


def submission_options(func: Any) -> Any:
    """The options of a submission, from :class:`~fleet.scheduling.submission.Submission` (its
    fields, types and descriptions): one model for the clients, the gateway and the CLI."""
    from fleet.scheduling.submission import OPTIONS, Submission

    for name in reversed(OPTIONS):
        field = Submission.model_fields[name]
        flag = _FLAGS.get(name, "--" + name.replace("_", "-"))
        kind = _click_type(field.annotation)
        if kind is bool:
            func = click.option(flag, name, is_flag=True, default=None, help=field.description)(func)
        else:
            func = click.option(flag, name, type=kind, default=None, help=field.description)(func)
    return func


@main.command()
@click.argument("agent")
@click.option("--input", "input_json", default="{}", help="The run input, a JSON object.")
@submission_options
@click.option("--wait", "wait_", is_flag=True, help="Wait for the run to end and print it.")
@click.option("--timeout", type=float, default=120.0, help="How long --wait waits, in seconds.")
@click.option("--json", "as_json", is_flag=True)
def submit(agent: str, input_json: str, wait_: bool, timeout: float, as_json: bool, **options: Any) -> None:
    """Submit a run of AGENT."""

    from fleet.core.payload import parse_json

    try:
        data = parse_json(input_json, "input")
    except InvalidSubmission as exc:
        _fail(_bad_option("input", exc), as_json, 2, field=exc.field)
    given = {name: value for name, value in options.items() if value is not None}
    try:
        with _client() as client:
            run_id = client.submit(agent, data, **given)
            if not wait_:
                _emit({"run_id": run_id}) if as_json else click.echo(run_id)
                return
            run = client.wait(run_id, timeout)
    except InvalidSubmission as exc:
        _fail(str(exc), as_json, 2, field=exc.field)
    except FleetError as exc:
        _fail(str(exc), as_json)
    if as_json:
        from fleet.surfaces.views import run_view

        _emit(run_view(run))
    else:
        _print_run(run)
    sys.exit(0 if run.status == "succeeded" else 1)


@main.group()
def runs() -> None:
    """Inspect runs."""


def _moment(value: str | None, option: str, as_json: bool) -> float | None:
    """A Unix time from ``--since`` / ``--until``: a duration back from now (``1h``, ``30m``,
    ``90``) or an ISO-8601 time (``2026-12-03T10:00``, local time unless it names its zone)."""
    if value is None:
        return None
    from datetime import datetime

    from fleet.scheduling.replay import parse_duration

    try:
        return time.time() - parse_duration(value)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(value).timestamp()
    except ValueError:
        _fail(f"--{option}: {value!r} is neither a duration (30m, 12h, 7d) nor an ISO-8601 time", as_json, 2,
              field=option)
    return None


def _run_line(row, short: str, width: int) -> str:  # noqa: ANN001
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(row.created_at))
    latency = f"{row.latency_s:.2f}s" if row.latency_s is not None else "-"
    error = f"{row.error.get('type')}: {row.error.get('message')}"[:60] if row.error else ""
    return (f"{short:<{width}}  {when}  {row.tenant:<10} {row.agent:<12} {row.priority:<11} {row.status:<15} "
            f"{latency:>8}  {error}")


@runs.command("list")
@click.option("--status", "statuses", multiple=True, metavar="STATUS",
              help="Runs in this status (repeat, or comma-separate, for several): queued, running, waiting, succeeded, "
                   "failed, dead_lettered, cancelled, expired, budget_exceeded.")
@click.option("--agent", default=None, help="Runs of this agent.")
@click.option("--priority", "--class", "priority", type=click.Choice(["interactive", "batch"]), default=None,
              help="Runs of this class.")
@click.option("--tenant", "of_tenant", default=None, metavar="NAME",
              help="Runs of this tenant (the operator's filter; a tenant sees its own runs only).")
@click.option("--since", default=None, help="Created since: a duration back from now (1h, 30m, 7d) or an ISO time.")
@click.option("--until", default=None, help="Created until: a duration back from now or an ISO time.")
@click.option("--error", "error_text", default=None, help="Runs whose error contains this text (any case).")
@click.option("--limit", type=click.IntRange(1, 500), default=20, show_default=True, help="Runs in the page.")
@click.option("--cursor", default=None, help="Go on after a page: its next cursor.")
@click.option("--json", "as_json", is_flag=True)
def runs_list(statuses: tuple[str, ...], agent: str | None, priority: str | None, of_tenant: str | None,
              since: str | None, until: str | None, error_text: str | None, limit: int, cursor: str | None,
              as_json: bool) -> None:
    """List runs, newest first, filtered (each filter narrows the others) and paged."""
    status = [s for given in statuses for s in given.split(",") if s] or None
    window = (_moment(since, "since", as_json), _moment(until, "until", as_json))
    try:
        with _client() as client:
            page = client.runs(status=status, agent=agent, priority=priority, tenant=of_tenant, since=window[0],
                               until=window[1], error=error_text, limit=limit, cursor=cursor)
            short = client.store.index.short_ids([row.id for row in page.runs])
    except InvalidSubmission as exc:
        _fail(f"--{(exc.field or 'query').split('.')[0]}: {exc}", as_json, 2, field=exc.field)
    if as_json:
        _emit(page.model_dump())
        return
    width = max([8, *(len(s) for s in short.values())])
    click.echo(f"{'id':<{width}}  {'created':<19}  {'tenant':<10} {'agent':<12} {'class':<11} {'status':<15} "
               f"{'latency':>8}  error")
    for row in page.runs:
        click.echo(_run_line(row, short[row.id], width))
    more = f"; next page: --cursor {page.next_cursor}" if page.next_cursor else ""
    click.echo(f"{len(page.runs)} shown{more}")
    if page.backlog:
        click.echo(f"{page.backlog} batch runs wait in the backlog (listed once dispatched)")


@runs.command("show")
@click.argument("run_id")
@click.option("--timeline", "as_timeline", is_flag=True,
              help="Draw where the time went: queue wait, time to first token, generation, tool time, "
                   "retries and preemptions per step.")
@click.option("--json", "as_json", is_flag=True)
def runs_show(run_id: str, as_timeline: bool, as_json: bool) -> None:
    """Show a run (RUN_ID: its id, or its first 6 or more hex digits): status, steps with
    timing, tokens and cost, result or error."""
    from fleet.surfaces.views import run_view

    try:
        with _client() as client:
            run = client.get(run_id)
    except RunNotFound as exc:
        _fail(str(exc), as_json)
    except InvalidSubmission as exc:
        _fail(str(exc), as_json, 2, field=exc.field, candidates=getattr(exc, "candidates", None))
    if as_json:
        _emit(run_view(run))
    else:
        _print_run(run, timeline=as_timeline)


@runs.command("signal")
@click.argument("run_id")
@click.argument("name")
@click.option("--payload", "payload", default="null", show_default=True, help="The signal's JSON payload.")
@click.option("--json", "as_json", is_flag=True)
def runs_signal(run_id: str, name: str, payload: str, as_json: bool) -> None:
    """Deliver the signal NAME with a JSON payload to a run (its id or a short one): a run
    waiting for it resumes; a signal that comes before its wait is kept for it."""
    try:
        value = json.loads(payload)
    except ValueError:
        _fail("--payload is not valid JSON", as_json, 2)
    with _run_errors(as_json), _client() as client:
        run_id = client.resolve(run_id)
        outcome = client.signal(run_id, name, value)
        status_now = client.get(run_id).status
    if as_json:
        _emit({"run_id": run_id, "signal": name, "outcome": outcome, "status": status_now})
    else:
        click.echo(f"run {run_id}: signal {name} {outcome} (status {status_now})")


@contextmanager
def _run_errors(as_json: bool) -> Iterator[None]:
    """A run that is not there, or a short id that names none or several: said, and the command fails."""
    try:
        yield
    except RunNotFound as exc:
        _fail(str(exc), as_json)
    except InvalidSubmission as exc:
        _fail(str(exc), as_json, 2, field=exc.field, candidates=getattr(exc, "candidates", None))


@runs.command("cancel")
@click.argument("run_id")
@click.option("--json", "as_json", is_flag=True)
def runs_cancel(run_id: str, as_json: bool) -> None:
    """Cancel a run (its id or a short one): remaining steps are skipped, an in-flight model
    call is cancelled."""

    with _run_errors(as_json), _client() as client:
        run_id = client.resolve(run_id)
        cancelled = client.cancel(run_id)
        status_now = client.get(run_id).status
    if as_json:
        _emit({"run_id": run_id, "cancelled": cancelled, "status": status_now})
    else:
        click.echo(f"run {run_id}: {'cancelled' if cancelled else f'already {status_now}'}")


@main.command()
@click.option("--window", "window", default="15m", show_default=True,
              help="How far back model time (and each tenant's part of batch model time) is read.")
@click.option("--json", "as_json", is_flag=True)
def tenants(window: str, as_json: bool) -> None:
    """Per tenant: runs queued and in flight, backlog, model time and part of batch model time,
    tokens today and quota use."""
    from fleet.scheduling.replay import parse_duration

    try:
        window_s = parse_duration(window)
    except ValueError as exc:
        _fail(f"--window: {exc}", as_json, 2, field="window")
    with _client() as client:
        report = client.tenants(window_s)
    if as_json:
        _emit(report.model_dump())
        return

    def of(used: float, limit: float | None) -> str:
        return f"{used:g}" if limit is None else f"{used:g}/{limit:g}"

    width = max([6, *(len(r.name) for r in report.tenants)])
    click.echo(f"tenants, model time over the last {window}")
    click.echo(f"{'tenant':<{width}} {'weight':>6} {'interactive':>12} {'batch':>12} {'backlog':>8} "
               f"{'model s i/b':>14} {'batch share':>11} {'tokens today':>16} {'submit/s':>8}")
    for r in report.tenants:
        q = r.quotas
        share = "-" if r.batch_share is None else f"{100 * r.batch_share:.1f}%"
        click.echo(f"{r.name:<{width}} {r.weight:>6g} {of(r.active['interactive'], q.max_active_interactive):>12} "
                   f"{of(r.active['batch'], q.max_active_batch):>12} {r.backlog:>8} "
                   f"{r.model_s['interactive']:>6.1f}/{r.model_s['batch']:<7.1f} {share:>11} "
                   f"{of(r.tokens_today, q.tokens_per_day):>16} {'-' if q.submissions_per_s is None else f'{q.submissions_per_s:g}':>8}")


@main.command()
@click.option("--by", type=click.Choice(["agent", "class", "tenant"]), default="agent", show_default=True,
              help="One row per agent, per class (interactive, batch) or per tenant.")
@click.option("--since", "since", default="24h", show_default=True, help="How far back: 30m, 24h, 7d.")
@click.option("--json", "as_json", is_flag=True)
def usage(by: str, since: str, as_json: bool) -> None:
    """Tokens, time (queue, model, tool) and estimated cost of recent runs."""
    from fleet.scheduling.replay import parse_duration

    try:
        since_s = parse_duration(since)
    except ValueError as exc:
        _fail(f"--since: {exc}", as_json, 2, field="since")
    with _client() as client:
        report = client.usage(by, since_s)  # type: ignore[arg-type]
    if as_json:
        _emit(report.model_dump())
        return
    head = by
    width = max([len(head), 5, *(len(r.key) for r in report.rows)])
    click.echo(f"usage since {time.strftime('%Y-%m-%d %H:%M', time.localtime(report.start))} ({since}), by {by}")
    click.echo(f"{head:<{width}} {'runs':>6} {'steps':>7} {'tokens in':>10} {'tokens out':>10} {'model s':>9} "
               f"{'queue s':>9} {'tool s':>9} {'cost':>10}")
    for r in [*report.rows, report.total]:
        click.echo(f"{r.key:<{width}} {r.runs:>6} {r.steps:>7} {r.tokens_in:>10} {r.tokens_out:>10} "
                   f"{r.model_s:>9.2f} {r.queue_s:>9.2f} {r.tool_s:>9.2f} {r.cost:>10.4f}")


def _cache_line(rep: dict) -> str:
    """A replica's KV cache as its engine reports it, and what the router sent it."""
    parts = []
    if rep.get("prefix_hit_rate") is not None:
        parts.append(f"prefix cache hits {rep['prefix_hit_rate']:.0%} of prompt tokens")
    if rep.get("kv_usage") is not None:
        parts.append(f"KV cache {rep['kv_usage']:.0%} used" + (f" of {rep['kv_blocks']} blocks" if rep.get("kv_blocks") else ""))
    routes = rep.get("routes") or {}
    if routes:
        parts.append("routed " + ", ".join(f"{n} {why}" for why, n in sorted(routes.items())))
    if rep.get("route_expected_hit_rate") is not None:
        parts.append(f"expected hits {rep['route_expected_hit_rate']:.0%} of prompt blocks")
    return "  ".join(parts)


@main.command()
@click.option("--json", "as_json", is_flag=True)
def status(as_json: bool) -> None:
    """Redis, Triton, Flower, queues and workers at a glance."""
    from fleet.ops.status import collect

    report = collect(Settings())
    if as_json:
        _emit(report)
        return
    r = report["redis"]
    primary = f"  primary {r['primary']}" if r.get("primary") else ""
    click.echo(f"redis   {r['url']}  {'up' if r['up'] else 'DOWN'}{primary}")
    t = report["triton"]
    pool = report["pool"]
    click.echo(f"triton  model {t['model']}, {len(pool['replicas'])} replica(s), batch policy {pool['policy']}, "
               f"routing {pool['routing']}")
    for rep in pool["replicas"]:
        ready = "model ready" if rep.get("model_ready") else ("server ready" if rep.get("server_ready") else "NOT READY")
        line = f"  {rep['name']:<22} {rep['grpc_url']:<22} {rep['state']:<7} {ready}"
        if rep.get("capacity") is not None:
            inflight = rep["inflight"]
            line += (f"  capacity {rep['capacity']} (+{rep['pipeline']} pipeline)  in flight "
                     f"{inflight['interactive']} interactive / {inflight['batch']} batch  "
                     f"preempted {rep['preempted']}")
        if rep.get("reason"):
            line += f"  ({rep['reason']})"
        click.echo(line)
        cache = _cache_line(rep)
        if cache:
            click.echo(f"  {'':<22} {cache}")
        if rep.get("batch_limit") is not None:
            click.echo(f"  {'':<22} batch takes a slot while fewer than {rep['batch_limit']} requests are in flight")
    objectives = pool.get("objectives") or {}
    if objectives:
        click.echo("objectives (interactive p99: objective / measured by the engines)")
        for name, o in objectives.items():
            goal = f"{o['objective']:.3f}s" if o["objective"] is not None else "none"
            seen = f"{o['measured']:.3f}s" if o["measured"] is not None else "-"
            click.echo(f"  {name:<12} {goal} / {seen}")
    for name, replicas in report.get("models", {}).items():
        up = sum(rep.get("state") == "up" for rep in replicas)
        states = ", ".join(f"{rep['name']} {rep.get('state')}" for rep in replicas) or "none probed yet"
        click.echo(f"model   {name}: {up} of {len(replicas)} replica(s) up ({states})")
    if "parked" in report:
        click.echo(f"parked  {report['parked']} run(s) waiting for a signal")
    click.echo(f"flower  {report['flower_url']}")
    click.echo(f"gateway {report['gateway_url']}")
    click.echo("queues")
    for q in report["queues"]:
        age = f"{q['oldest_age_s']:.1f}s" if q.get("oldest_age_s") is not None else "-"
        click.echo(f"  {q['name']:<24} depth {q['depth']:>6}  oldest {age}")
    if "backlog" in report:
        b = report["backlog"]
        queued = ", ".join(f"{t} {n}" for t, n in b["queued"].items()) or "empty"
        click.echo(f"backlog {queued}; {b['dispatched']} batch runs dispatched and unfinished")
    if "admission" in report:
        click.echo("admission")
        for cls, st in report["admission"].items():
            wait = f"{st['predicted_wait_s']:.2f}s" if st["predicted_wait_s"] is not None else "-"
            p99 = f"{st['step_p99_s']:.3f}s" if st["step_p99_s"] is not None else "-"
            click.echo(f"  {cls:<12} in flight {st['in_flight']:>4}  waiting for a slot {st['waiting_for_slot']:>4}  "
                       f"served {st['parallel']} at a time  p99 llm step {p99}  predicted wait {wait}")
    click.echo("workers")
    for w in report["workers"] or ["(none answering)"]:
        click.echo(f"  {w}")
    if not (r["up"] and t["model_ready"]):
        sys.exit(1)


@main.group()
def dlq() -> None:
    """Inspect, replay and purge dead-lettered steps."""


def _entry_line(e) -> str:  # noqa: ANN001
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.last_failure_at))
    return (f"{e.id:<16} {when}  {e.agent}.{e.step_key:<18} {e.priority:<11} run {e.run_id[:12]}  "
            f"{e.error_type}: {e.error_message[:60]}")


@dlq.command("list")
@click.option("--agent", default=None)
@click.option("--step", default=None)
@click.option("--limit", type=int, default=100)
@click.option("--json", "as_json", is_flag=True)
def dlq_list(agent: str | None, step: str | None, limit: int, as_json: bool) -> None:
    """Dead-lettered steps, newest first."""

    with _client() as client:
        entries = client.dlq_list(agent=agent, step=step, limit=limit)
        total = client.dead_letters.count()
    if as_json:
        _emit({"total": total, "entries": [e.model_dump(exclude={"state", "traceback"}) for e in entries]})
        return
    for e in entries:
        click.echo(_entry_line(e))
    click.echo(f"{len(entries)} shown, {total} in the store")


@dlq.command("show")
@click.argument("entry_id")
@click.option("--json", "as_json", is_flag=True)
def dlq_show(entry_id: str, as_json: bool) -> None:
    """One dead-letter entry: the state the step received, the error, its replays."""

    try:
        with _client() as client:
            entry, replays = client.dlq_get(entry_id)
    except RunNotFound as exc:
        _fail(str(exc), as_json)
    if as_json:
        _emit({**entry.model_dump(), "replays": replays})
        return
    click.echo(_entry_line(entry))
    click.echo(f"attempts {entry.attempts}  worker {entry.worker}  first failure "
               f"{time.strftime('%H:%M:%S', time.localtime(entry.first_failure_at))}")
    click.echo("state: " + json.dumps(entry.state, indent=2))
    if entry.traceback:
        click.echo(entry.traceback.rstrip())
    for r in replays:
        click.echo(f"replayed {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(r['replayed_at']))} "
                   f"patch {json.dumps(r['patch'])} -> {r['outcome']}")


@dlq.command("replay")
@click.argument("entry_id", required=False)
@click.option("--patch", "patch_json", default=None, help="JSON: {\"input\": {...}, \"steps\": {...}}")
@click.option("--all", "replay_all", is_flag=True, help="Replay every open entry matching the filters.")
@click.option("--agent", default=None)
@click.option("--step", default=None)
@click.option("--json", "as_json", is_flag=True)
def dlq_replay(entry_id: str | None, patch_json: str | None, replay_all: bool, agent: str | None,
               step: str | None, as_json: bool) -> None:
    """Re-run a run from its failed step with the stored state (optionally patched)."""

    if (entry_id is None) == (not replay_all):
        _fail("give an ENTRY_ID or --all (with optional --agent/--step)", as_json, 2)
    from fleet.core.payload import parse_json

    try:
        patch = parse_json(patch_json, "patch") if patch_json else None
    except InvalidSubmission as exc:
        _fail(_bad_option("patch", exc), as_json, 2, field=exc.field)
    try:
        with _client() as client:
            if replay_all:
                run_ids = client.dlq_replay_all(agent=agent, step=step, patch=patch)
            else:
                run_ids = [client.dlq_replay(entry_id, patch)]  # type: ignore[arg-type]
    except InvalidSubmission as exc:
        _fail(str(exc), as_json, 2, field=exc.field)
    except FleetError as exc:
        _fail(str(exc), as_json)
    if as_json:
        _emit({"replayed": run_ids})
    else:
        for run_id in run_ids:
            click.echo(f"replaying run {run_id}")
        click.echo(f"{len(run_ids)} replayed")


@dlq.command("purge")
@click.option("--older-than", default=None, help="Age, e.g. 7d, 12h, 30m.")
@click.option("--all", "purge_all", is_flag=True, help="Delete every entry.")
@click.option("--json", "as_json", is_flag=True)
def dlq_purge(older_than: str | None, purge_all: bool, as_json: bool) -> None:
    """Delete old dead-letter entries."""
    from fleet.scheduling.replay import parse_duration

    if (older_than is None) == (not purge_all):
        _fail("give --older-than DURATION or --all", as_json, 2)
    try:
        age = parse_duration(older_than) if older_than else None
    except ValueError as exc:
        _fail(str(exc), as_json, 2)
    with _client() as client:
        removed = client.dlq_purge(age)
    _emit({"purged": removed}) if as_json else click.echo(f"{removed} entries purged")


@main.command()
@click.option("--host", default=None, help="Address to listen on (default: FLEET_BIND_ADDRESS).")
@click.option("--port", type=int, default=None, help="Port to listen on (default: FLEET_GATEWAY_PORT).")
def gateway(host: str | None, port: int | None) -> None:
    """Serve the HTTP gateway (API keys from FLEET_API_KEYS; without keys, loopback only)."""
    from fleet.logs import setup_logging
    from fleet.ops.sentry import init_sentry
    from fleet.surfaces.gateway import InsecureBind, serve

    settings = Settings()
    setup_logging(settings.log_level, settings.log_format)
    init_sentry(settings, "gateway")
    try:
        serve(settings, host, port)
    except InsecureBind as exc:
        _fail(str(exc), False, 2)


@main.group()
def batch() -> None:
    """Run files of inputs through the fleet at batch priority."""


@batch.command("run")
@click.argument("input_path", type=click.Path(exists=True, dir_okay=False))
@click.option("--agent", required=True, help="The agent every line is an input of.")
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False),
              help="Results file (JSONL); lines already in it are skipped, so a rerun resumes.")
@click.option("--max-in-flight", type=click.IntRange(min=1), default=None,
              help="Most runs unfinished at once (default: every line is submitted up front into the backlog).")
@click.option("--deadline", "deadline_s", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Deadline of each run, in seconds from its submission (default: FLEET_BATCH_DEADLINE_S).")
@click.option("--batch-id", default="", envvar="FLEET_BATCH_ID",
              help="The batch job's id, mixed into every idempotency key: the same inputs under another id "
                   "run again (default: an id made from the agent and the file's content).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
def batch_run(input_path: str, agent: str, out_path: str, max_in_flight: int | None, deadline_s: float | None,
              batch_id: str, as_json: bool) -> None:
    """Submit every line of INPUT_PATH (JSONL) as a run of AGENT; write one result line per line.

    A line is the agent's input (a JSON object), or {"id": ..., "input": {...}}. Progress goes
    to stderr; Ctrl-C stops cleanly and running the same command again resumes.
    Exits 0 when every line has a result, 130 when interrupted.
    """
    import signal
    from pathlib import Path

    import redis

    from fleet.logs import setup_logging
    from fleet.surfaces.batch import run_batch

    def _stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # a scheduler's SIGTERM stops the job as cleanly as Ctrl-C

    signal.signal(signal.SIGTERM, _stop)
    settings = Settings()
    setup_logging("WARNING")
    try:
        with _client(settings) as client:
            if agent not in client.agents:
                _fail(f"unknown agent '{agent}' (known: {', '.join(sorted(client.agents))})", as_json, 2,
                      field="agent")
            summary = run_batch(client, Path(input_path), agent, Path(out_path), max_in_flight=max_in_flight,
                                deadline_s=deadline_s, batch_id=batch_id)
    except (FleetError, redis.RedisError) as exc:
        _fail(f"{type(exc).__name__}: {exc} (what is written stays; run again to resume)", as_json)
    if as_json:
        _emit(summary.as_dict())
    else:
        click.echo(summary.text())
        if summary.interrupted:
            click.echo("interrupted: run the same command again to resume", err=True)
    sys.exit(130 if summary.interrupted else 0)


@batch.command("status")
@click.argument("batch_id")
@click.option("--json", "as_json", is_flag=True, help="Print the status as one JSON object.")
def batch_status(batch_id: str, as_json: bool) -> None:
    """Where the runs of batch job BATCH_ID stand, counted by status."""
    from fleet.surfaces.client import FleetClient

    settings = Settings()
    try:
        with FleetClient(settings) as client:
            st = client.batch_status(batch_id)
    except FleetError as exc:
        _fail(f"{type(exc).__name__}: {exc}", as_json)
    if as_json:
        _emit(st.model_dump())
    else:
        counts = ", ".join(f"{n} {s}" for s, n in st.counts.items()) or "no runs"
        click.echo(f"batch {st.batch_id} ({st.tenant}): {st.runs} runs: {counts}; {'done' if st.done else 'running'}")


if __name__ == "__main__":  # pragma: no cover
    main()
