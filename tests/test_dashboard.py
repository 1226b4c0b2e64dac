"""grafana/dashboards/jobs.json is what grafana/dashboard.py builds, and it covers every contract metric."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_server import load_dashboard
from support import skip_or_fail

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "grafana" / "dashboard.py"
JSON_PATH = ROOT / "grafana" / "dashboards" / "jobs.json"

# The contract's Operations section.
CONTRACT_METRICS = [
    "orchestrator_jobs_total",
    "orchestrator_job_duration_seconds",
    "orchestrator_job_wait_seconds",
    "orchestrator_queue_depth",
    "orchestrator_jobs_running",
    "orchestrator_websocket_clients_connected",
    "orchestrator_websocket_messages_total",
    "orchestrator_sse_clients_connected",
    "orchestrator_webhook_deliveries_total",
    "orchestrator_event_delivery_lag_seconds",
    "orchestrator_http_request_duration_seconds",
]
HISTOGRAMS = {
    "orchestrator_job_duration_seconds",
    "orchestrator_job_wait_seconds",
    "orchestrator_event_delivery_lag_seconds",
    "orchestrator_http_request_duration_seconds",
}
# Read from RQ's registries by every API process: identical copies, so never summed.
SHARED_GAUGES = {"orchestrator_queue_depth", "orchestrator_jobs_running"}
# Recorded in Redis and exported identically by every API process: de-duplicated before any sum.
CLUSTER_METRICS = {
    "orchestrator_jobs_total",
    "orchestrator_job_duration_seconds",
    "orchestrator_job_wait_seconds",
}
DEDUP = "max without (instance, job) ("


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    data = json.loads(JSON_PATH.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    panels: list[dict[str, Any]] = []
    for panel in dashboard["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))
    return [panel for panel in panels if panel.get("type") != "row"]


def _exprs(dashboard: dict[str, Any]) -> list[str]:
    return [str(target["expr"]) for panel in _panels(dashboard) for target in panel.get("targets", [])]


def test_json_on_disk_is_what_the_code_builds() -> None:
    assert JSON_PATH.read_text(encoding="utf-8") == load_dashboard().render()
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr


def test_check_fails_on_stale_or_missing_json(tmp_path: Path) -> None:
    stale = tmp_path / "jobs.json"
    stale.write_text(JSON_PATH.read_text(encoding="utf-8").replace("Monitoring: Jobs", "Old title"))
    for output in (stale, tmp_path / "missing.json"):
        result = subprocess.run(
            [sys.executable, str(SCRIPT), "--check", "--output", str(output)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode != 0, output


def test_title_uid_and_queue_variable(dashboard: dict[str, Any]) -> None:
    assert dashboard["title"] == "Monitoring: Jobs"
    assert dashboard["uid"] == "orchestrator-jobs"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    queue = variables["queue"]
    assert queue["type"] == "query"
    assert queue["query"] == "label_values(orchestrator_jobs_total, queue)"
    assert queue["multi"] is True and queue["includeAll"] is True
    assert queue["datasource"]["uid"] == "prometheus"


def test_panels_are_well_formed(dashboard: dict[str, Any]) -> None:
    panels = _panels(dashboard)
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    datasource = yaml.safe_load((ROOT / "grafana/provisioning/datasources/prometheus.yml").read_text())
    uid = datasource["datasources"][0]["uid"]
    for panel in panels:
        assert panel.get("title") and panel.get("targets"), panel
        assert panel["datasource"]["uid"] == uid
        assert all(t["datasource"]["uid"] == uid for t in panel["targets"])
        x, w = panel["gridPos"]["x"], panel["gridPos"]["w"]
        assert 0 <= x and x + w <= 24, f"{panel['title']} overflows the grid"


def test_expected_panels(dashboard: dict[str, Any]) -> None:
    titles = {panel["title"] for panel in _panels(dashboard)}
    for needle in (
        "throughput",
        "success ratio",
        "queue depth",
        "running",
        "wait time",
        "run time",
        "websocket clients",
        "websocket messages",
        "sse clients",
        "webhook",
        "http request rate",
        "http latency",
    ):
        assert any(needle in title.lower() for title in titles), f"no panel about {needle!r}: {titles}"


def test_every_contract_metric_is_queried(dashboard: dict[str, Any]) -> None:
    exprs = "\n".join(_exprs(dashboard))
    missing = [name for name in CONTRACT_METRICS if not re.search(rf"\b{name}(_bucket|_count|_sum)?\b", exprs)]
    assert not missing, f"metrics no panel uses: {missing}"


def test_queries_aggregate_across_instances(dashboard: dict[str, Any]) -> None:
    for expr in _exprs(dashboard):
        for name in SHARED_GAUGES:
            if name in expr:
                assert re.search(rf"max by \(queue\) \({name}\b", expr), expr
        for name in HISTOGRAMS:
            if f"{name}_bucket" in expr:
                assert "histogram_quantile(" in expr and re.search(r"sum by \(le\b", expr), expr
        if "rate(" in expr:
            assert expr.startswith(("sum", "histogram_quantile(")), f"not summed over instances: {expr}"
        if 'queue=~"' in expr:
            assert 'queue=~"$queue"' in expr


def test_cluster_wide_metrics_are_deduplicated_not_summed(dashboard: dict[str, Any]) -> None:
    """Each use of a cluster-wide counter or histogram sits directly in ``max without (instance, job)``."""
    checked = 0
    for expr in _exprs(dashboard):
        for name in CLUSTER_METRICS:
            for match in re.finditer(rf"\b{name}(_bucket|_count|_sum)?\b", expr):
                checked += 1
                start = expr.rfind("rate(", 0, match.start())
                assert start >= 0 and expr[:start].endswith(DEDUP), f"{name} not de-duplicated: {expr}"
    assert checked >= 9
    # Per-process metrics carry no de-duplication: they are summed.
    for expr in _exprs(dashboard):
        if not any(name in expr for name in CLUSTER_METRICS | SHARED_GAUGES):
            assert "max" not in expr, expr


def test_queries_function(dashboard: dict[str, Any]) -> None:
    queries = load_dashboard().queries()
    assert len(queries) == len(_exprs(dashboard))
    titles = {panel["title"] for panel in _panels(dashboard)}
    for title, expr in queries:
        assert title in titles
        assert "$" not in expr, expr
    assert any('queue=~".*"' in expr for _, expr in queries)
    assert any("[1m]" in expr for _, expr in queries)


def test_queries_parse_with_promtool(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        skip_or_fail("promtool (Debian package prometheus) is not installed")
    rules = [{"record": f"dashboard:query{i}", "expr": e} for i, (_, e) in enumerate(load_dashboard().queries())]
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
