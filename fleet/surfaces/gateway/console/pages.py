"""The run console's HTML: Python string templates, every value from a run, a tenant or a
request escaped (:func:`esc`) before it reaches a page."""

from __future__ import annotations

import html
import json
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

from fleet.run.deadletter import DeadLetter
from fleet.run.records import TERMINAL, RunRecord
from fleet.run.usage import UsageReport
from fleet.surfaces.timeline import GENERATION, OTHER, QUEUE, TOOL, TTFT, Timeline, segments, timeline
from fleet.surfaces.views import RunList, RunRow, TenantReport

STATUSES = ("queued", "running", "waiting", "succeeded", "failed", "dead_lettered", "cancelled", "expired", "budget_exceeded")
#: Choices of the list's time filter: label -> seconds back from now.
SINCE = {"any time": None, "15 minutes": 900, "1 hour": 3600, "24 hours": 86400, "7 days": 7 * 86400}
_MARK_CLASS = {QUEUE: "queue", TTFT: "ttft", GENERATION: "gen", TOOL: "tool", OTHER: "other"}


def esc(value: Any) -> str:
    """Text for HTML (element content or a quoted attribute)."""
    return html.escape("" if value is None else str(value), quote=True)


@dataclass(frozen=True)
class Viewer:
    """Who looks at a page: their tenant, whether they are an operator, the page's CSRF token
    (empty without keys) and whether they logged in (keys set)."""

    tenant: str
    admin: bool
    csrf: str
    keyed: bool


def _when(ts: float | None) -> str:
    return "-" if ts is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}s"


def layout(title: str, body: str, viewer: Viewer, active: str = "") -> str:
    """A whole page: its head, the navigation, ``body``."""
    links = [("runs", "/console/runs", "Runs"), ("dead-letters", "/console/dead-letters", "Dead letters"),
             ("tenants", "/console/tenants", "Tenants")]
    nav = "".join(f'<a href="{href}"{" class=active" if key == active else ""}>{label}</a>'
                  for key, href, label in links)
    who = f"{esc(viewer.tenant)}{' (operator)' if viewer.admin else ''}"
    out = ('<form method="post" action="/console/logout" class="logout"><button type="submit">Log out</button></form>'
           if viewer.keyed else "")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(title)} · fleet console</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="fleet-csrf" content="{esc(viewer.csrf)}">
<link rel="stylesheet" href="/console/static/console.css"></head>
<body><header><strong>fleet</strong><nav>{nav}</nav><span class="who">{who}</span>{out}</header>
<main><h1>{esc(title)}</h1>
{body}
</main><script src="/console/static/console.js"></script></body></html>"""


def login_page(error: str = "", next_url: str = "/console/runs") -> str:
    """The form that takes an API key (kept in an HttpOnly cookie, never by the page)."""
    message = f'<p class="error" role="alert">{esc(error)}</p>' if error else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Log in · fleet console</title>
<link rel="stylesheet" href="/console/static/console.css"></head>
<body><main class="login"><h1>fleet console</h1>{message}
<form method="post" action="/console/login">
<label>API key <input type="password" name="key" autocomplete="current-password" required autofocus></label>
<input type="hidden" name="next" value="{esc(next_url)}">
<button type="submit">Log in</button></form></main></body></html>"""


# --- runs ------------------------------------------------------------------------------------

def _status(status: str) -> str:
    return f'<span class="status s-{esc(status)}">{esc(status)}</span>'


def run_rows(page: RunList, short: dict[str, str]) -> str:
    """The rows of a listing (what the page refreshes)."""
    if not page.runs:
        return '<tr><td colspan="8" class="empty">No runs match.</td></tr>'
    return "\n".join(_run_row(r, short.get(r.id, r.id[:8])) for r in page.runs)


def _run_row(r: RunRow, short: str) -> str:
    error = f"{r.error.get('type', '')}: {r.error.get('message', '')}" if r.error else ""
    return (f'<tr data-run="{esc(r.id)}"><td class="id"><a href="/console/runs/{esc(r.id)}">{esc(short)}</a></td>'
            f'<td class="when">{_when(r.created_at)}</td><td>{esc(r.tenant)}</td><td>{esc(r.agent)}</td>'
            f"<td>{esc(r.priority)}</td><td>{_status(r.status)}</td><td class=num>{_seconds(r.latency_s)}</td>"
            f'<td class="error-text">{esc(error[:120])}</td></tr>')


def _options(values: Iterable[str], chosen: str | None, any_label: str) -> str:
    items = [f'<option value="">{esc(any_label)}</option>']
    items += [f'<option value="{esc(v)}"{" selected" if v == chosen else ""}>{esc(v)}</option>' for v in values]
    return "".join(items)


def filters_form(q: dict[str, Any], agents: list[str], tenants: list[str], viewer: Viewer) -> str:
    """The list's filters, sent back to the same page as a query string."""
    boxes = "".join(
        f'<label class="box"><input type="checkbox" name="status" value="{s}"'
        f'{" checked" if s in (q.get("status") or []) else ""}>{s}</label>' for s in STATUSES)
    since = "".join(f'<option value="{esc(v or "")}"{" selected" if str(v or "") == str(q.get("since") or "") else ""}>'
                    f"{esc(k)}</option>" for k, v in SINCE.items())
    tenant = (f'<label>Tenant <select name="tenant">{_options(tenants, q.get("tenant"), "every tenant")}</select>'
              "</label>" if viewer.admin else "")
    return f"""<form method="get" action="/console/runs" class="filters" id="filters">
<fieldset><legend>Status</legend>{boxes}</fieldset>
<label>Agent <select name="agent">{_options(agents, q.get("agent"), "any agent")}</select></label>
<label>Class <select name="priority">{_options(("interactive", "batch"), q.get("priority"), "any class")}
</select></label>
{tenant}<label>Created in the last <select name="since">{since}</select></label>
<label>Error contains <input type="search" name="error" value="{esc(q.get("error") or "")}"></label>
<button type="submit">Filter</button> <a href="/console/runs">clear</a></form>"""


def runs_page(page: RunList, short: dict[str, str], q: dict[str, Any], agents: list[str], tenants: list[str],
              viewer: Viewer) -> str:
    query = urlencode([(k, v) for k, vs in q.items() if k != "cursor" for v in (vs if isinstance(vs, list) else [vs])
                       if v not in (None, "")])
    more = ""
    if page.next_cursor:
        older = f"/console/runs?{query}&cursor={quote(page.next_cursor)}"
        more = f'<a class="next" href="{esc(older)}">Older runs</a>'
    live = "" if q.get("cursor") else f' data-src="/console/runs/rows?{esc(query)}"'
    backlog = (f'<p class="note">{page.backlog} batch runs wait in the backlog: they are listed once dispatched.</p>'
               if page.backlog else "")
    body = f"""{filters_form(q, agents, tenants, viewer)}
<table class="runs"><thead><tr><th>id</th><th>created</th><th>tenant</th><th>agent</th><th>class</th>
<th>status</th><th>latency</th><th>error</th></tr></thead>
<tbody id="runs-rows"{live}>{run_rows(page, short)}</tbody></table>
{more}{backlog}"""
    return layout("Runs", body, viewer, "runs")


def waterfall(t: Timeline) -> str:
    """The run's timeline as a waterfall: a row per step, bars on one time axis from submission."""
    ends = [s.finished_at_s for s in t.steps if s.finished_at_s is not None]
    span = max([t.latency_s or 0.0, *ends, 1e-3])
    rows = []
    for s in t.steps:
        bars = "".join(
            f'<span class="seg {_MARK_CLASS[mark]}" style="left:{100 * start / span:.2f}%;'
            f'width:{max(0.4, 100 * (end - start) / span):.2f}%" title="{_MARK_CLASS[mark]} {end - start:.3f}s"></span>'
            for start, end, mark in segments(s))
        rows.append(
            f'<tr class="step" data-step="{esc(s.key)}"><th scope="row">{esc(s.key)}</th>'
            f'<td class="track">{bars}</td><td>{_status(s.status)}</td><td class=num>{_seconds(s.queue_s)}</td>'
            f"<td class=num>{_seconds(s.ttft_s)}</td><td class=num>{_seconds(s.generation_s)}</td>"
            f"<td class=num>{_seconds(s.tool_s)}</td><td class=num>{s.retries}</td><td class=num>{s.preemptions}</td>"
            f"<td class=num>{s.tokens_in}/{s.tokens_out}</td><td class=num>{s.cost:.4g}</td></tr>")
    legend = "".join(f'<span class="key"><span class="seg {c}"></span>{label}</span>' for c, label in (
        ("queue", "queue wait"), ("ttft", "time to first token"), ("gen", "generation"), ("tool", "tool"),
        ("other", "other (load, commit)")))
    return f"""<table class="waterfall"><thead><tr><th>step</th><th class="axis">0s … {span:.3f}s</th><th>status</th>
<th>queue</th><th>ttft</th><th>gen</th><th>tool</th><th>retries</th><th>preempt</th><th>tokens</th><th>cost</th>
</tr></thead>
<tbody>{"".join(rows) or '<tr><td colspan="11" class="empty">No step has started.</td></tr>'}</tbody></table>
<p class="legend">{legend}</p>
<p class="totals">total: queue {_seconds(t.queue_s)} · model {_seconds(t.model_s)} · tool {_seconds(t.tool_s)}
· tokens {t.tokens_in} in / {t.tokens_out} out · cost {t.cost:.4g}</p>"""


def _facts(run: RunRecord, trace_url: str | None) -> str:
    trace = "-"
    if run.trace_id:
        trace = (f'<a href="{esc(trace_url.replace("{trace_id}", run.trace_id))}" rel="noopener" target="_blank">'
                 f"{esc(run.trace_id)}</a>" if trace_url else esc(run.trace_id))
    facts = [("id", f'<code id="run-id">{esc(run.id)}</code>'),
             ("status", f'<span id="run-status">{_status(run.status)}</span>'),
             ("agent", esc(run.agent)), ("class", esc(run.priority)), ("tenant", esc(run.tenant)),
             ("created", _when(run.created_at)), ("latency", _seconds(run.latency_s)),
             ("tokens", f"{run.tokens_in} in / {run.tokens_out} out"), ("cost", f"{run.cost:.4g}"), ("trace", trace)]
    if run.batch:
        facts.append(("batch", esc(run.batch)))
    if run.dead_letter_id:
        facts.append(("dead letter", f'<a href="/console/dead-letters#dl-{esc(run.dead_letter_id)}">'
                                     f"{esc(run.dead_letter_id)}</a>"))
    return "<dl class=facts>" + "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in facts) + "</dl>"


def _actions(run: RunRecord, viewer: Viewer) -> str:
    if not viewer.admin:
        return ""
    buttons = []
    if run.status not in TERMINAL:
        buttons.append(f'<button type="button" data-action="cancel" data-method="DELETE" '
                       f'data-url="/v1/runs/{esc(run.id)}">Cancel run</button>')
    if run.status == "dead_lettered" and run.dead_letter_id:
        buttons.append(f'<button type="button" data-action="replay" data-method="POST" '
                       f'data-url="/v1/dead-letters/{esc(run.dead_letter_id)}/replay">'
                       "Replay from the dead letter</button>")
    return f'<p class="actions">{"".join(buttons)}<span class="outcome" role="status"></span></p>' if buttons else ""


def _event_text(fields: dict[str, str]) -> str:
    if fields.get("type") == "status":
        return f"status {fields.get('status')}" + (" (replay)" if fields.get("replay") else "")
    duration = fields.get("duration_s")
    return f"step {fields.get('step')} {fields.get('status')}" + (f" in {float(duration):.3f}s" if duration else "")


def run_page(run: RunRecord, viewer: Viewer, trace_url: str | None,
             events: list[dict[str, str]] | None = None) -> str:
    """A run's page; ``events``: those of a run that ended (a live one's stream in the page)."""
    ending = ""
    if run.error:
        ending = f'<p class="error">{esc(run.error.get("type"))}: {esc(run.error.get("message"))}</p>'
    if run.result is not None:
        result = run.result if isinstance(run.result, str) else json.dumps(run.result, indent=2)
        ending += f'<h2>Result</h2><pre class="result">{esc(result)}</pre>'
    live = "" if run.status in TERMINAL else f' data-src="/v1/runs/{esc(run.id)}/events"'
    shown = [e for e in events or [] if e.get("type") in ("status", "step")]
    past = "".join(f"<li>{esc(_event_text(e))}</li>" for e in shown)
    body = f"""{_facts(run, trace_url)}{_actions(run, viewer)}{ending}
<h2>Where the time went</h2>{waterfall(timeline(run))}
<h2>Events</h2><ol id="events" class="events"{live}>{past}</ol><pre id="tokens" class="tokens"></pre>
<h2>Input</h2><pre>{esc(json.dumps(run.input, indent=2, ensure_ascii=False))}</pre>"""
    return layout(f"Run {run.id[:8]}", body, viewer, "runs")


# --- dead letters and tenants ----------------------------------------------------------------

def dead_letters_page(entries: list[DeadLetter], viewer: Viewer) -> str:
    rows = []
    for e in entries:
        button = (f'<button type="button" data-action="replay" data-method="POST" '
                  f'data-url="/v1/dead-letters/{esc(e.id)}/replay">Replay</button><span class="outcome" role="status">'
                  "</span>" if viewer.admin else "")
        rows.append(
            f'<tr id="dl-{esc(e.id)}" data-entry="{esc(e.id)}"><td><code>{esc(e.id)}</code></td>'
            f"<td>{_when(e.last_failure_at)}</td><td>{esc(e.tenant)}</td><td>{esc(e.agent)}.{esc(e.step_key)}</td>"
            f'<td>{esc(e.priority)}</td><td><a href="/console/runs/{esc(e.run_id)}">{esc(e.run_id[:8])}</a></td>'
            f'<td class="error-text">{esc(e.error_type)}: {esc(e.error_message[:160])}</td>'
            f"<td class=num>{e.attempts}</td>"
            f"<td class=num>{len(e.replays)}</td><td>{button}</td></tr>")
    table = (f"""<table class="dead-letters"><thead><tr><th>entry</th><th>last failure</th><th>tenant</th><th>step</th>
<th>class</th><th>run</th><th>error</th><th>attempts</th><th>replays</th><th></th></tr></thead>
<tbody>{"".join(rows)}</tbody></table>""" if rows else '<p class="empty">No dead letters.</p>')
    return layout("Dead letters", table, viewer, "dead-letters")


def tenants_page(report: TenantReport, usage: UsageReport, viewer: Viewer) -> str:
    def of(used: float, limit: float | None) -> str:
        return f"{used:g}" if limit is None else f"{used:g} / {limit:g}"

    rows = "".join(
        f'<tr data-tenant="{esc(r.name)}"><th scope="row">{esc(r.name)}</th><td class=num>{r.weight:g}</td>'
        f"<td class=num>{of(r.active['interactive'], r.quotas.max_active_interactive)}</td>"
        f"<td class=num>{of(r.active['batch'], r.quotas.max_active_batch)}</td><td class=num>{r.backlog}</td>"
        f"<td class=num>{r.model_s['interactive']:.1f} / {r.model_s['batch']:.1f}</td>"
        f"<td class=num>{'-' if r.batch_share is None else f'{100 * r.batch_share:.1f}%'}</td>"
        f"<td class=num>{of(r.tokens_today, r.quotas.tokens_per_day)}</td></tr>" for r in report.tenants)
    used = "".join(
        f"<tr><th scope=row>{esc(u.key)}</th><td class=num>{u.runs}</td><td class=num>{u.steps}</td>"
        f"<td class=num>{u.tokens_in}</td><td class=num>{u.tokens_out}</td><td class=num>{u.model_s:.2f}</td>"
        f"<td class=num>{u.queue_s:.2f}</td><td class=num>{u.tool_s:.2f}</td><td class=num>{u.cost:.4f}</td></tr>"
        for u in [*usage.rows, usage.total])
    body = f"""<h2>Runs and quotas (model time over the last {report.window_s / 60:g} minutes)</h2>
<table class="tenants"><thead><tr><th>tenant</th><th>weight</th><th>interactive</th><th>batch</th><th>backlog</th>
<th>model s (interactive / batch)</th><th>batch share</th><th>tokens today</th></tr></thead>
<tbody>{rows}</tbody></table>
<h2>Usage over the last 24 hours</h2>
<table class="usage"><thead><tr><th>tenant</th><th>runs</th><th>steps</th><th>tokens in</th><th>tokens out</th>
<th>model s</th><th>queue s</th><th>tool s</th><th>cost</th></tr></thead><tbody>{used}</tbody></table>"""
    return layout("Tenants", body, viewer, "tenants")
