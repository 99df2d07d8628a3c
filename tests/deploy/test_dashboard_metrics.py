"""The Grafana dashboard, the alert rules and the autoscaling queries only use metrics (and labels)
the server really exports: checked against a live server's /metrics after one request."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.deploy.helpers import (
    DASHBOARD_FILE,
    DOCKER_DIR,
    PROMETHEUS_SERIES,
    SCRAPE_LABELS,
    PromQuery,
    alert_queries,
    autoscaling_queries,
    dashboard_queries,
    load_yaml,
    parse_promql,
)
from tests.integration.conftest import LiveServer, live_server  # noqa: F401

# What the dashboard must show (the deployment issue's list), by words in panel titles.
REQUIRED_PANELS = {
    "throughput": "throughput",
    "time to first token": "time to first token",
    "inter-token latency": "inter-token latency",
    "running and waiting": "running and waiting",
    "kv cache usage": "kv cache usage",
    "prefix cache hit rate": "prefix cache hit rate",
    "preemptions": "preemptions",
    "errors": "errors",
}


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD_FILE.read_text(encoding="utf-8"))


def all_queries(dashboard: dict[str, Any]) -> list[PromQuery]:
    return [*dashboard_queries(dashboard), *alert_queries(), *autoscaling_queries()]


def leaf_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            yield from panel.get("panels", [])
        else:
            yield panel


# -- offline ---------------------------------------------------------------------------------
def test_promql_reader_finds_metrics_and_labels() -> None:
    query = parse_promql(
        'histogram_quantile(0.9, sum by (le, model) (rate(kogpt_ttft_bucket{endpoint=~"/g|a"}'
        "[$__rate_interval]))) / clamp_min(sum(rate(kogpt_other_total[5m])), 1e-9) > 0.05",
        "example",
    )
    assert query.metrics == {"kogpt_ttft_bucket", "kogpt_other_total"}
    assert query.selector_labels == {"kogpt_ttft_bucket": {"endpoint"}}
    assert query.grouping_labels == {"le", "model"}
    variable = parse_promql('label_values(kogpt_x{model=~"$model"}, instance)', "variable")
    assert variable.metrics == {"kogpt_x"} and variable.grouping_labels == {"instance"}
    adapter = parse_promql("max(<<.Series>>{<<.LabelMatchers>>}) by (<<.GroupBy>>)", "adapter")
    assert adapter.metrics == set()


def test_dashboard_structure(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] == "kogpt-serve" and dashboard["title"] == "kogpt-serve"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    titles = " | ".join(p["title"].lower() for p in leaf_panels(dashboard))
    missing = [name for name, words in REQUIRED_PANELS.items() if words not in titles]
    assert not missing, f"dashboard lacks panels for: {missing}"
    (datasource_var,) = [v for v in dashboard["templating"]["list"] if v["type"] == "datasource"]
    provisioned = load_yaml(DOCKER_DIR / "grafana/provisioning/datasources/prometheus.yml")
    assert datasource_var["current"]["value"] == provisioned["datasources"][0]["uid"]
    for panel in leaf_panels(dashboard):
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], f"panel {panel['title']!r} has no query"


def test_dashboard_panels_do_not_overlap(dashboard: dict[str, Any]) -> None:
    cells: dict[tuple[int, int], str] = {}
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = panel["title"]


def test_queries_name_only_kogpt_metrics(dashboard: dict[str, Any]) -> None:
    for query in all_queries(dashboard):
        assert query.metrics, f"{query.source}: no metric found in {query.expr!r}"
        for metric in query.metrics:
            assert metric.startswith("kogpt_") or metric in PROMETHEUS_SERIES, (
                f"{query.source}: unexpected name {metric!r} in {query.expr!r}"
            )


# -- against the live server -------------------------------------------------------------------
@pytest.fixture(scope="module")
def exported(live_server: LiveServer) -> dict[str, set[str]]:  # noqa: F811
    """Sample name -> label names, from /metrics after one generation request."""
    with httpx.Client(base_url=live_server.base_url, timeout=60) as client:
        response = client.post(
            "/generate", json={"inputs": "대한민국은", "parameters": {"max_new_tokens": 4}}
        )
        assert response.status_code == 200, response.text
        live_server.wait_idle()
        metrics = client.get("/metrics")
        assert metrics.status_code == 200
    samples: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(metrics.text):
        for sample in family.samples:
            samples.setdefault(sample.name, set()).update(sample.labels)
    return samples


def test_every_queried_metric_is_exported(
    dashboard: dict[str, Any], exported: dict[str, set[str]]
) -> None:
    missing = sorted(
        f"{query.source}: {metric}"
        for query in all_queries(dashboard)
        for metric in query.metrics
        if metric not in exported and metric not in PROMETHEUS_SERIES
    )
    assert not missing, "metrics the server does not export:\n" + "\n".join(missing)


def test_every_queried_label_is_exported(
    dashboard: dict[str, Any], exported: dict[str, set[str]]
) -> None:
    problems = []
    for query in all_queries(dashboard):
        used = set()
        for metric, labels in query.selector_labels.items():
            available = exported.get(metric, set()) | SCRAPE_LABELS
            used |= exported.get(metric, set())
            problems += [
                f"{query.source}: {metric} has no label {lb!r}" for lb in labels - available
            ]
        for metric in query.metrics:
            used |= exported.get(metric, set())
        unknown = query.grouping_labels - used - SCRAPE_LABELS
        problems += [f"{query.source}: grouping by unknown label {lb!r}" for lb in unknown]
    assert not problems, "\n".join(problems)
