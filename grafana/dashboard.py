"""The "Monitoring: Jobs" Grafana dashboard, as code.

Run ``python grafana/dashboard.py`` to (re)write ``grafana/dashboards/jobs.json``;
``python grafana/dashboard.py --check`` exits 1 when the file on disk differs from what this code builds.

Prometheus scrapes every API process (and every worker that serves ``ORCH_METRICS_PORT``). Two kinds
of series come back, and the queries aggregate them differently:

- cluster-wide: ``orchestrator_jobs_total``, ``orchestrator_job_duration_seconds`` and
  ``orchestrator_job_wait_seconds`` are recorded into Redis by whichever process makes a transition, and
  ``orchestrator_queue_depth`` / ``orchestrator_jobs_running`` are read from RQ; every API process exports
  the same values at scrape time. N API processes give N identical copies, so these are de-duplicated
  with ``max without (instance, job)`` (``max by (queue)`` for the gauges) before any ``sum``;
- per process: HTTP, WebSocket, SSE, webhook and event-lag metrics, which are summed over instances.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from grafana_foundation_sdk.builders import common as common_builder
from grafana_foundation_sdk.builders import dashboard as dashboard_builder
from grafana_foundation_sdk.builders import prometheus as prometheus_builder
from grafana_foundation_sdk.builders import stat as stat_builder
from grafana_foundation_sdk.builders import timeseries as timeseries_builder
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models import dashboard as dashboard_model

from orchestrator.states import FINAL as FINAL_STATUSES
from orchestrator.states import JobStatus

TITLE = "Monitoring: Jobs"
UID = "orchestrator-jobs"
OUTPUT = Path(__file__).resolve().parent / "dashboards" / "jobs.json"

DATASOURCE = dashboard_model.DataSourceRef(type_val="prometheus", uid="prometheus")

# What the test-side query list substitutes for Grafana's template variables.
QUEUE_REGEX = ".*"
RATE_INTERVAL = "1m"

Q = 'queue=~"$queue"'
FINAL = f'status=~"{"|".join(s for s in JobStatus if s in FINAL_STATUSES)}"'
COMPLETED = f'{Q}, status="completed"'
DEDUP = "max without (instance, job)"

GREEN = "green"
YELLOW = "#EAB839"
RED = "red"


def _target(expr: str, legend: str, ref_id: str) -> prometheus_builder.Dataquery:
    return prometheus_builder.Dataquery().expr(expr).legend_format(legend).ref_id(ref_id).range().datasource(DATASOURCE)


def _thresholds(*steps: tuple[float | None, str]) -> dashboard_builder.ThresholdsConfig:
    return (
        dashboard_builder.ThresholdsConfig()
        .mode(dashboard_model.ThresholdsMode.ABSOLUTE)
        .steps([dashboard_model.Threshold(value=value, color=color) for value, color in steps])
    )


def _timeseries(
    title: str,
    description: str,
    targets: list[tuple[str, str]],
    unit: str,
    *,
    width: int = 12,
    thresholds: dashboard_builder.ThresholdsConfig | None = None,
    stacked: bool = False,
    minimum: float | None = 0,
    maximum: float | None = None,
) -> timeseries_builder.Panel:
    panel = (
        timeseries_builder.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .span(width)
        .height(8)
        .line_width(1)
        .fill_opacity(10)
        .show_points(common.VisibilityMode.NEVER)
        .legend(
            common_builder.VizLegendOptions()
            .display_mode(common.LegendDisplayMode.LIST)
            .placement(common.LegendPlacement.BOTTOM)
            .show_legend(True)
        )
        .tooltip(
            common_builder.VizTooltipOptions().mode(common.TooltipDisplayMode.MULTI).sort(common.SortOrder.DESCENDING)
        )
    )
    if minimum is not None:
        panel = panel.min(minimum)
    if maximum is not None:
        panel = panel.max(maximum)
    if stacked:
        panel = panel.stacking(common_builder.StackingConfig().mode(common.StackingMode.NORMAL))
    if thresholds is not None:
        panel = panel.thresholds(thresholds).thresholds_style(
            common_builder.GraphThresholdsStyleConfig().mode(common.GraphThresholdsStyleMode.LINE_AND_AREA)
        )
    for index, (expr, legend) in enumerate(targets):
        panel = panel.with_target(_target(expr, legend, chr(ord("A") + index)))
    return panel


def _stat(
    title: str,
    description: str,
    expr: str,
    unit: str,
    thresholds: dashboard_builder.ThresholdsConfig,
    *,
    width: int = 6,
) -> stat_builder.Panel:
    return (
        stat_builder.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .span(width)
        .height(8)
        .thresholds(thresholds)
        .color_mode(common.BigValueColorMode.BACKGROUND)
        .graph_mode(common.BigValueGraphMode.AREA)
        .reduce_options(common_builder.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
        .with_target(_target(expr, "", "A"))
    )


def _dedup(expr: str) -> str:
    """One copy of a cluster-wide series that every API process exports identically."""
    return f"{DEDUP} ({expr})"


def _jobs_rate(matchers: str) -> str:
    return f"rate(orchestrator_jobs_total{{{matchers}}}[$__rate_interval])"


def _quantiles(
    metric: str, by: str, legend: str, selector: str = "", *, cluster: bool = False
) -> list[tuple[str, str]]:
    matchers = f"{{{selector}}}" if selector else ""
    rate = f"rate({metric}_bucket{matchers}[$__rate_interval])"
    if cluster:
        rate = _dedup(rate)
    return [
        (f"histogram_quantile({q}, sum by (le, {by}) ({rate}))", f"p{round(q * 100)} {legend}")
        for q in (0.5, 0.95, 0.99)
    ]


def _queue_variable() -> dashboard_builder.QueryVariable:
    return (
        dashboard_builder.QueryVariable("queue")
        .label("Queue")
        .description("RQ queues to show (train, generate).")
        .datasource(DATASOURCE)
        .query("label_values(orchestrator_jobs_total, queue)")
        .refresh(dashboard_model.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(dashboard_model.VariableSort.ALPHABETICAL_ASC)
        .multi(True)
        .include_all(True)
        .all_value(".*")
        .current(dashboard_model.VariableOption(selected=True, text=["All"], value=["$__all"]))
    )


def build() -> dashboard_builder.Dashboard:
    """The dashboard builder; ``render()`` turns it into the JSON that is committed."""
    dash = (
        dashboard_builder.Dashboard(TITLE)
        .uid(UID)
        .description("Job throughput, queues, latencies and live-delivery health of the orchestrator.")
        .tags(["orchestrator", "jobs"])
        .editable()
        .time("now-1h", "now")
        .refresh("30s")
        .timezone("browser")
        .tooltip(dashboard_model.DashboardCursorSync.CROSSHAIR)
        .with_variable(_queue_variable())
    )

    dash = dash.with_row(dashboard_builder.Row("Jobs"))
    dash = dash.with_panel(
        _timeseries(
            "Job throughput by status and type",
            "Jobs entering each status per second, cluster-wide (recorded in Redis by every process; "
            "one copy taken from the API processes that all export it).",
            [
                (
                    f"sum by (queue, type, status) ({_dedup(_jobs_rate(Q))})",
                    "{{queue}} {{type}} {{status}}",
                )
            ],
            "ops",
        )
    )
    dash = dash.with_panel(
        _timeseries(
            "Success ratio",
            "Completed jobs divided by all jobs reaching a final status (completed, failed, cancelled, "
            "timed_out), per queue. Red below 90 %: look at the error codes of recent failed jobs.",
            [
                (
                    f"sum by (queue) ({_dedup(_jobs_rate(COMPLETED))})"
                    f" / sum by (queue) ({_dedup(_jobs_rate(f'{Q}, {FINAL}'))})",
                    "{{queue}}",
                )
            ],
            "percentunit",
            thresholds=_thresholds((None, RED), (0.9, YELLOW), (0.98, GREEN)),
            maximum=1,
        )
    )
    dash = dash.with_panel(
        _timeseries(
            "Queue depth",
            "Jobs waiting in each RQ queue (read from Redis at scrape time). A steady climb means "
            "workers cannot keep up: add worker replicas.",
            [(f"max by (queue) (orchestrator_queue_depth{{{Q}}})", "{{queue}}")],
            "short",
            thresholds=_thresholds((None, GREEN), (50, YELLOW), (200, RED)),
        )
    )
    dash = dash.with_panel(
        _timeseries(
            "Running jobs",
            "Jobs currently running per queue (RQ started registries, read at scrape time). "
            "Flat at the worker count while the queue grows: the workers are saturated.",
            [(f"max by (queue) (orchestrator_jobs_running{{{Q}}})", "{{queue}}")],
            "short",
        )
    )
    dash = dash.with_panel(
        _timeseries(
            "Wait time (queued → running)",
            "Percentiles of the time jobs spend queued before a worker starts them.",
            _quantiles("orchestrator_job_wait_seconds", "queue", "{{queue}}", Q, cluster=True),
            "s",
            thresholds=_thresholds((None, GREEN), (30, YELLOW), (300, RED)),
        )
    )
    dash = dash.with_panel(
        _timeseries(
            "Run time (running → finished)",
            "Percentiles of job run time per queue and type, all final statuses.",
            _quantiles("orchestrator_job_duration_seconds", "queue, type", "{{queue}} {{type}}", Q, cluster=True),
            "s",
        )
    )

    dash = dash.with_row(dashboard_builder.Row("Live delivery"))
    dash = dash.with_panel(
        _stat(
            "WebSocket clients",
            "Open WebSocket connections, summed over every API process.",
            "sum(orchestrator_websocket_clients_connected)",
            "short",
            _thresholds((None, GREEN)),
        )
    )
    dash = dash.with_panel(
        _stat(
            "SSE clients",
            "Open Server-Sent Events streams, summed over every API process.",
            "sum(orchestrator_sse_clients_connected)",
            "short",
            _thresholds((None, GREEN)),
        )
    )
    dash = dash.with_panel(
        _timeseries(
            "WebSocket messages per second",
            "Messages written to WebSocket clients per second, all API processes.",
            [("sum(rate(orchestrator_websocket_messages_total[$__rate_interval]))", "messages/s")],
            "ops",
        )
    )
    dash = dash.with_panel(
        _timeseries(
            "Webhook deliveries by outcome",
            "Webhook delivery attempts per second by outcome. Failures and retries rising: receivers "
            "are down or answering non-2xx; check GET /api/jobs/{id}/deliveries.",
            [
                (
                    "sum by (outcome) (rate(orchestrator_webhook_deliveries_total[$__rate_interval]))",
                    "{{outcome}}",
                )
            ],
            "ops",
            stacked=True,
        )
    )
    dash = dash.with_panel(
        _timeseries(
            "Event delivery lag by channel",
            "Time from an event being stored to it being written to a socket, stream or webhook "
            "(p50/p95/p99 per channel). Red above 1 s: the gateway is overloaded or Redis is slow.",
            _quantiles("orchestrator_event_delivery_lag_seconds", "channel", "{{channel}}"),
            "s",
            thresholds=_thresholds((None, GREEN), (0.25, YELLOW), (1, RED)),
        )
    )

    dash = dash.with_row(dashboard_builder.Row("HTTP API"))
    dash = dash.with_panel(
        _timeseries(
            "HTTP request rate by route",
            "Requests per second per route and status class, all API processes.",
            [
                (
                    "sum by (method, route, status) "
                    "(rate(orchestrator_http_request_duration_seconds_count[$__rate_interval]))",
                    "{{method}} {{route}} {{status}}",
                )
            ],
            "reqps",
        )
    )
    dash = dash.with_panel(
        _timeseries(
            "HTTP latency p95 by route",
            "95th percentile of request duration per route, all API processes.",
            [
                (
                    "histogram_quantile(0.95, sum by (le, method, route) "
                    "(rate(orchestrator_http_request_duration_seconds_bucket[$__rate_interval])))",
                    "{{method}} {{route}}",
                )
            ],
            "s",
            thresholds=_thresholds((None, GREEN), (0.5, YELLOW), (2, RED)),
        )
    )
    return dash


def render() -> str:
    """The dashboard as the exact text written to ``grafana/dashboards/jobs.json``."""
    model = build().build()
    for number, panel in enumerate(model.panels or [], start=1):
        panel.id_val = number  # stable, unique ids (links like ?viewPanel=N keep working)
    return json.dumps(model, cls=JSONEncoder, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def _panels(model: dict[str, Any]) -> list[dict[str, Any]]:
    panels: list[dict[str, Any]] = []
    for panel in model.get("panels", []):
        panels.append(panel)
        panels.extend(panel.get("panels", []))  # panels nested in collapsed rows
    return panels


def queries() -> list[tuple[str, str]]:
    """``(panel title, PromQL)`` for every panel target, template variables substituted.

    ``$queue`` becomes ``.*`` (what "All" selects) and ``$__rate_interval`` becomes ``1m``, so each
    expression can be evaluated as is through Prometheus's HTTP API.
    """
    model = json.loads(render())
    result: list[tuple[str, str]] = []
    for panel in _panels(model):
        for target in panel.get("targets", []):
            expr = str(target["expr"])
            expr = expr.replace("$__rate_interval", RATE_INTERVAL).replace("$queue", QUEUE_REGEX)
            result.append((str(panel["title"]), expr))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true", help="exit 1 if the JSON on disk is stale")
    parser.add_argument("--output", type=Path, default=OUTPUT, help=f"where to write (default {OUTPUT})")
    args = parser.parse_args(argv)
    text = render()
    output: Path = args.output
    if args.check:
        current = output.read_text(encoding="utf-8") if output.exists() else None
        if current != text:
            print(f"{output} is out of date: run python grafana/dashboard.py", file=sys.stderr)
            return 1
        print(f"{output} is up to date")
        return 0
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text, encoding="utf-8")
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
