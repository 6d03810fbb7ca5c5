"""The monthly report of an EUO, or of a partner's customers: accesses by role and data set,
refusals, break-glass grants with their purpose and ticket, data-subject requests and
whether each met its 30-day deadline, alerts and their acknowledgements. Aggregated in
PostgreSQL (sql/queries.sql, report_*), so its cost does not grow with the rows in memory;
given as JSON, CSV or a printable HTML page with its charts drawn in SVG (no script, no
external asset). GET /v1/reports/monthly (scoped like /v1/audit) and `gateway report`."""

from __future__ import annotations

import csv
import html
import io
import re
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson
from aiohttp import web

from ..db import query
from ..endpoints import api, only
from ..errors import Denied
from ..principal import Principal, scope
from ..reads import READS
from .api import _cell
from .writer import AuditRow

MONTH = re.compile(r"(\d{4})-(0[1-9]|1[0-2])")
FORMATS = ("json", "csv", "html")
SECTIONS = ("accesses", "refusals", "break_glass", "requests", "alerts")


def month_window(text: str | None) -> tuple[datetime, datetime]:
    """[start, end) of a month given as YYYY-MM (UTC); Denied(400 bad_report) otherwise."""
    m = MONTH.fullmatch(text or "")
    if m is None:
        raise Denied("bad_report", "month must be YYYY-MM")
    year, month = int(m.group(1)), int(m.group(2))
    if not 1 <= year <= 9998:
        raise Denied("bad_report", "month must be YYYY-MM")
    start = datetime(year, month, 1, tzinfo=UTC)
    end = datetime(year + month // 12, month % 12 + 1, 1, tzinfo=UTC)
    return start, end


async def monthly(conn: asyncpg.Connection, month: str, euo: str | None,
                  partner: str | None) -> dict[str, Any]:
    """The report's content for the month, about `euo` or `partner`'s customers."""
    start, end = month_window(month)
    args = (start, end, euo, partner)

    def plain(r) -> dict[str, Any]:
        return {k: (v.isoformat() if isinstance(v, datetime) else str(v) if k == "id" else v)
                for k, v in dict(r).items()}
    out: dict[str, Any] = {"month": month, "euo": euo, "partner": partner,
                           "generated_at": datetime.now(UTC).isoformat()}
    for section in SECTIONS:
        out[section] = [plain(r) for r in await conn.fetch(query(f"report_{section}"), *args)]
    return out


def as_csv(report: dict[str, Any]) -> str:
    """One table: section, role, item (data set, reason, type, rule), count, when, detail;
    every cell neutralised as the audit CSV's are (a spreadsheet runs none)."""
    out = io.StringIO()
    writer = csv.writer(out)

    def row(*cells) -> None:
        writer.writerow([_cell(c) for c in cells])
    row("section", "role", "item", "count", "when", "detail")
    for section in ("accesses", "refusals"):
        for r in report[section]:
            row(section, r["role"], r["item"], r["count"], "", "")
    for g in report["break_glass"]:
        row("break_glass", g["actor_role"], g["euo_id"], 1, g["created_at"],
            f"{g['purpose']} (ticket {g['ticket']})")
    met = {True: "met", False: "missed", None: "pending"}
    for r in report["requests"]:
        row("requests", "", r["type"], 1, r["created_at"],
            f"{r['status']}; deadline {met[r['met_deadline']]}")
    for a in report["alerts"]:
        ack = f"acknowledged: {a['ack_note']}" if a["acked_at"] else "not acknowledged"
        row("alerts", "", a["rule"], a["observed"], a["raised_at"], ack)
    return out.getvalue()


def _bars(title: str, counts: dict[str, int]) -> str:
    """A horizontal bar chart in SVG, drawn here (no script, no external asset)."""
    if not counts:
        return f"<p>{html.escape(title)}: none.</p>"
    top = max(counts.values())
    rows = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:20]
    height = 22 * len(rows) + 10
    bars = []
    for i, (label, n) in enumerate(rows):
        y, width = 5 + 22 * i, max(1, round(300 * n / top))
        bars.append(f'<text x="0" y="{y + 14}" font-size="12">{html.escape(label)}</text>'
                    f'<rect x="210" y="{y}" width="{width}" height="16" fill="#3b6ea5"/>'
                    f'<text x="{215 + width}" y="{y + 13}" font-size="12">{n}</text>')
    return (f'<figure><figcaption>{html.escape(title)}</figcaption>'
            f'<svg xmlns="http://www.w3.org/2000/svg" role="img" width="560" height="{height}" '
            f'aria-label="{html.escape(title)}">{"".join(bars)}</svg></figure>')


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    if not rows:
        return "<p>None.</p>"
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape('' if c is None else str(c))}</td>"
                                    for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def as_html(report: dict[str, Any]) -> str:
    """A printable page: charts of accesses by role and by data set, then every section."""
    about = (f"EUO {report['euo']}" if report["euo"] else "") + \
        (f"partner {report['partner']}'s customers" if report["partner"] else "")
    by_role: dict[str, int] = {}
    by_data_set: dict[str, int] = {}
    for r in report["accesses"]:
        by_role[r["role"]] = by_role.get(r["role"], 0) + r["count"]
        by_data_set[r["item"]] = by_data_set.get(r["item"], 0) + r["count"]
    met = {True: "met", False: "missed", None: "pending"}
    parts = [
        f"<h1>Access report, {html.escape(report['month'])}</h1>",
        f"<p>{html.escape(about or 'everything')}; generated {html.escape(report['generated_at'])}.</p>",
        "<h2>Accesses</h2>",
        _bars("Accesses by role", by_role), _bars("Accesses by data set", by_data_set),
        _table(["role", "data set", "accesses"],
               [[r["role"], r["item"], r["count"]] for r in report["accesses"]]),
        "<h2>Refusals</h2>",
        _table(["role", "reason", "refusals"],
               [[r["role"], r["item"], r["count"]] for r in report["refusals"]]),
        "<h2>Break-glass grants</h2>",
        _table(["opened", "role", "EUO", "user", "purpose", "ticket", "until", "ended"],
               [[g["created_at"], g["actor_role"], g["euo_id"], g["user_sub"], g["purpose"],
                 g["ticket"], g["ends_at"], g["ended_at"]] for g in report["break_glass"]]),
        "<h2>Data-subject requests</h2>",
        _table(["filed", "EUO", "user", "type", "status", "due", "30-day deadline"],
               [[r["created_at"], r["euo_id"], r["user_sub"], r["type"], r["status"],
                 r["due_at"], met[r["met_deadline"]]] for r in report["requests"]]),
        "<h2>Alerts</h2>",
        _table(["raised", "rule", "observed", "limit", "acknowledged", "by", "note"],
               [[a["raised_at"], a["rule"], a["observed"], a["limit_value"], a["acked_at"],
                 a["acked_by"], a["ack_note"]] for a in report["alerts"]]),
    ]
    style = ("body{font-family:sans-serif;margin:2em;max-width:60em}table{border-collapse:"
             "collapse;margin:.5em 0 1.5em}td,th{border:1px solid #999;padding:.2em .5em;"
             "text-align:left}figure{margin:1em 0}@media print{h2{break-before:auto}}")
    return ("<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>Access report {html.escape(report['month'])}</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>")


def render(report: dict[str, Any], fmt: str) -> tuple[bytes, str]:
    """The report's bytes and content type in a format of FORMATS."""
    if fmt == "csv":
        return as_csv(report).encode(), "text/csv"
    if fmt == "html":
        return as_html(report).encode(), "text/html"
    return orjson.dumps(report), "application/json"


async def report_scope(conn, principal: Principal, month: str, euo: str | None,
                       partner: str | None) -> tuple[str | None, str | None]:
    """The (EUO, partner) a caller's report is about: an EUO admin's own EUO; a partner's
    own customers (one of them with `euo`, one it held that month); anything for the
    Provider's roles, which name an EUO or a partner. Denied(403 report_out_of_scope)."""
    my_euo, my_partner = scope(principal)
    if my_euo is not None:
        if partner is not None or euo not in (None, my_euo):
            raise Denied("report_out_of_scope", "an EUO's report is about that EUO only")
        return my_euo, None
    if my_partner is not None:
        if partner not in (None, my_partner):
            raise Denied("report_out_of_scope", "a partner's report is about its customers only")
        if euo is not None:
            start, end = month_window(month)
            if not await conn.fetchval(query("report_partner_held"), my_partner, euo, start, end):
                raise Denied("report_out_of_scope",
                             "that EUO was not this partner's customer that month")
        return euo, my_partner
    if euo is None and partner is None:
        raise Denied("bad_report", "name the report's euo or partner")
    return euo, partner


@api("/v1/reports/monthly", "audit")
async def monthly_report(request: web.Request, principal: Principal, row: AuditRow):
    """?month=YYYY-MM[&euo=][&partner=][&format=json|csv|html]: the month's report in the
    caller's scope."""
    params = request.query
    only(params, ("month", "euo", "partner", "format"))
    fmt = params.get("format", "json")
    if fmt not in FORMATS:
        raise Denied("bad_report", "format must be json, csv or html")
    month = params.get("month")
    month_window(month)
    async with request.app[READS].acquire(request) as conn:
        euo, partner = await report_scope(conn, principal, month, params.get("euo"),
                                          params.get("partner"))
        row.subject_euo = euo
        body, content_type = render(await monthly(conn, month, euo, partner), fmt)
    return web.Response(body=body, content_type=content_type,
                        headers={"Content-Disposition": f'inline; filename="report-{month}.{fmt}"'}
                        if fmt != "json" else None)


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/reports/monthly", monthly_report)

