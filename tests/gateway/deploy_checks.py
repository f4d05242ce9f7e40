"""Readers for deploy/: every Kubernetes document, every PromQL query (dashboard, KEDA, rules), the metric
names they use, and the metric names a Prometheus text exposition exports. Shared by the deploy tests.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import promql_parser
import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
DASHBOARD = DEPLOY / "grafana" / "tokenmill-dashboard.json"
# Grafana template variables → values that keep the PromQL valid for the parser.
GRAFANA_VARS = {"$__rate_interval": "5m", "${datasource}": "prometheus", "$model": ".*"}


def k8s_documents() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        docs += [(path.name, d) for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def _substitute(expr: str) -> str:
    for var, value in GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    return expr


def dashboard_queries() -> list[str]:
    board = json.loads(DASHBOARD.read_text())
    queries = [t["expr"] for panel in board["panels"] for t in panel.get("targets", [])]
    queries += [a["expr"] for a in board["annotations"]["list"] if "expr" in a]
    return [_substitute(q) for q in queries]


def scaler_queries() -> list[str]:
    return [
        trigger["metadata"]["query"]
        for _, doc in k8s_documents()
        if doc["kind"] == "ScaledObject"
        for trigger in doc["spec"]["triggers"]
    ]


def rule_queries() -> list[str]:
    rules = yaml.safe_load((DEPLOY / "tokenmill-rules.yml").read_text())
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


def metric_names(expr: str) -> set[str]:
    """Metric names selected by one PromQL expression (raises ValueError when it does not parse)."""
    names: set[str] = set()

    def visit(node: object) -> None:
        if isinstance(node, promql_parser.VectorSelector) and node.name:
            names.add(node.name)

    promql_parser.walk(promql_parser.parse(expr), visit)
    return names


def queried_metric_names() -> set[str]:
    """tokenmill: metrics read by the dashboard, KEDA and the rules (recorded series excluded)."""
    recorded = {r.get("record") for g in yaml.safe_load((DEPLOY / "tokenmill-rules.yml").read_text())["groups"]
                for r in g["rules"]}  # fmt: skip
    names: set[str] = set()
    for query in dashboard_queries() + scaler_queries() + rule_queries():
        names |= metric_names(query)
    return {n for n in names if n.startswith("tokenmill:") and n not in recorded}


def exported_metric_names(text: str) -> set[str]:
    """Sample names a Prometheus text exposition can produce, from its # TYPE lines (even with no samples)."""
    suffixes = {
        "counter": ["_total"],
        "histogram": ["_bucket", "_sum", "_count"],
        "gauge": [""],
        "summary": ["_sum", "_count", ""],
    }
    names: set[str] = set()
    for match in re.finditer(r"^# TYPE (\S+) (\w+)$", text, re.MULTILINE):
        base, kind = match.group(1), match.group(2)
        base = base.removesuffix("_total") if kind == "counter" else base
        names |= {base + s for s in suffixes.get(kind, [""])}
    return names
