"""deploy/ checked by real validators: Kubernetes schemas (kubernetes-validate), PromQL (promql-parser), the
Grafana dashboard model (grafana-foundation-sdk), and the contracts between the files (labels, ports, names).
"""

from __future__ import annotations

import copy
import json
import re

import kubernetes_validate
import pytest
import yaml
from deploy_checks import (
    DASHBOARD,
    DEPLOY,
    dashboard_queries,
    exported_metric_names,
    k8s_documents,
    metric_names,
    queried_metric_names,
    rule_queries,
    scaler_queries,
)

from tokenmill.gateway.config import parse_config
from tokenmill.gateway.metrics import GatewayMetrics

K8S_VERSIONS = ("1.29", kubernetes_validate.latest_version())
CRD_KINDS = {"ScaledObject", "ServiceMonitor"}  # not in the Kubernetes schemas: validated by their CRD models


def docs_of(kind: str) -> list[dict]:
    return [d for _, d in k8s_documents() if d["kind"] == kind]


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_builtin_manifests_pass_the_kubernetes_schema(version):
    validated = set()
    for filename, doc in k8s_documents():
        if doc["kind"] in CRD_KINDS:
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)  # strict: unknown fields are errors too
        except kubernetes_validate.ValidationError as err:
            raise AssertionError(
                f"deploy/k8s/{filename}: {doc['kind']} {doc['metadata']['name']}: {err}"
            ) from err
        validated.add(doc["kind"])
    assert {
        "Deployment",
        "Service",
        "ConfigMap",
        "HorizontalPodAutoscaler",
        "PersistentVolumeClaim",
    } <= validated


def _unknown_fields(given: object, kept: object, path: str = "") -> list[str]:
    """Keys in ``given`` that a schema model dropped (it ignores unknown fields; the API server would not)."""
    if isinstance(given, dict) and isinstance(kept, dict):
        missing = [f"{path}.{k}" for k in given if k not in kept]
        return missing + [
            p for k in given if k in kept for p in _unknown_fields(given[k], kept[k], f"{path}.{k}")
        ]
    if isinstance(given, list) and isinstance(kept, list):
        return [
            p
            for i, (g, k) in enumerate(zip(given, kept, strict=False))
            for p in _unknown_fields(g, k, f"{path}[{i}]")
        ]
    return []


def _validate_crd(doc: dict) -> None:
    from cloudcoil.models.keda.v1alpha1 import ScaledObject
    from cloudcoil.models.prometheus_operator.v1 import ServiceMonitor

    # Pydantic models generated from the KEDA and prometheus-operator CRD schemas (cloudcoil-models-*).
    model = {"ScaledObject": ScaledObject, "ServiceMonitor": ServiceMonitor}[doc["kind"]]
    parsed = model.model_validate(doc)
    kept = parsed.model_dump(by_alias=True, exclude_unset=True, mode="json")
    unknown = _unknown_fields(doc, kept)
    assert not unknown, f"{doc['kind']} has fields its CRD schema does not know: {unknown}"


def test_crds_pass_their_crd_schemas():
    checked = [doc["kind"] for _, doc in k8s_documents() if doc["kind"] in CRD_KINDS]
    for _, doc in k8s_documents():
        if doc["kind"] in CRD_KINDS:
            _validate_crd(doc)
    assert sorted(checked) == ["ScaledObject", "ServiceMonitor"]
    broken = copy.deepcopy(docs_of("ScaledObject")[0])
    broken["spec"]["maxReplicaCount"] = "many"
    with pytest.raises(ValueError):  # pydantic's ValidationError is a ValueError
        _validate_crd(broken)
    typo = copy.deepcopy(docs_of("ServiceMonitor")[0])
    typo["spec"]["endpoints"][0]["intervall"] = "15s"
    with pytest.raises(AssertionError, match=r"spec.endpoints\[0\].intervall"):
        _validate_crd(typo)


def test_the_validator_rejects_a_broken_deployment():
    deployment = copy.deepcopy(docs_of("Deployment")[0])
    deployment["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[-1], strict=True)
    deployment = copy.deepcopy(docs_of("Deployment")[0])
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGett"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[-1], strict=True)


def _model_server() -> dict:
    return next(
        d
        for d in docs_of("Deployment")
        if d["metadata"]["labels"]["app.kubernetes.io/component"] == "model-server"
    )


def _flag(args: list[str], name: str) -> str:
    return next(a.split("=", 1)[1] for a in args if a.startswith(f"--{name}="))


def test_model_server_requests_a_gpu_probes_health_and_drains_in_time():
    pod = _model_server()["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["requests"]["nvidia.com/gpu"] == "1"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert container[probe]["httpGet"]["path"] == "/health"
    drain_s = float(_flag(container["args"], "drain-timeout"))
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    # SIGTERM comes after preStop; the drain must then fit before the kubelet's SIGKILL.
    assert pod["terminationGracePeriodSeconds"] >= float(pre_stop[1]) + drain_s
    port = container["ports"][0]["containerPort"]
    assert _flag(container["args"], "port") == str(port)


def test_services_select_their_deployments_and_ports():
    deployments = {d["metadata"]["name"]: d for d in docs_of("Deployment")}
    for svc in docs_of("Service"):
        target = deployments[svc["metadata"]["name"]]
        pod_labels = target["spec"]["template"]["metadata"]["labels"]
        assert svc["spec"]["selector"].items() <= pod_labels.items()
        port_names = {p["name"] for p in target["spec"]["template"]["spec"]["containers"][0]["ports"]}
        assert {p["targetPort"] for p in svc["spec"]["ports"]} <= port_names


def test_keda_scaled_object_scales_the_server_on_queue_depth():
    (scaled,) = docs_of("ScaledObject")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    spec = scaled["spec"]
    assert spec["scaleTargetRef"]["name"] == _model_server()["metadata"]["name"]
    assert 0 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "prometheus"
    meta = trigger["metadata"]
    assert re.match(r"^https?://", meta["serverAddress"])
    assert float(meta["threshold"]) > 0 and isinstance(meta["threshold"], str)  # KEDA wants strings here
    assert "tokenmill:num_requests_waiting" in metric_names(meta["query"])
    # KEDA passes `advanced.horizontalPodAutoscalerConfig.behavior` to the HPA it creates: validate it as one.
    hpa = copy.deepcopy(docs_of("HorizontalPodAutoscaler")[0])
    hpa["spec"]["behavior"] = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    kubernetes_validate.validate(hpa, K8S_VERSIONS[-1], strict=True)


def test_hpa_metric_is_what_the_adapter_rule_produces():
    (hpa,) = docs_of("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == _model_server()["metadata"]["name"]
    metric = hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]
    adapter = next(d for d in docs_of("ConfigMap") if d["metadata"]["name"].startswith("prometheus-adapter"))
    (rule,) = yaml.safe_load(adapter["data"]["config.yaml"])["rules"]
    series = re.match(r"^([\w:]+)\{", rule["seriesQuery"]).group(1)
    renamed = re.sub(rule["name"]["matches"], rule["name"]["as"].replace("${1}", r"\1"), series)
    assert series == "tokenmill:num_requests_waiting" and renamed == metric


def test_service_monitor_scrapes_every_tokenmill_service():
    (monitor,) = docs_of("ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    selector = monitor["spec"]["selector"]["matchLabels"]
    ports = {e["port"] for e in monitor["spec"]["endpoints"]}
    assert all(e["path"] == "/metrics" for e in monitor["spec"]["endpoints"])
    for svc in docs_of("Service"):
        assert selector.items() <= svc["metadata"]["labels"].items()
        assert ports <= {p["name"] for p in svc["spec"]["ports"]}


def test_gateway_configmap_holds_a_valid_gateway_config():
    cm = next(d for d in docs_of("ConfigMap") if d["metadata"]["name"] == "tokenmill-gateway")
    config = parse_config(yaml.safe_load(cm["data"]["gateway.yaml"]), "deploy/k8s/gateway.yaml")
    assert {p.kind for p in config.models} == {"external"}  # on Kubernetes, KEDA/HPA own the replica count
    gateway = next(d for d in docs_of("Deployment") if d["metadata"]["name"] == "tokenmill-gateway")
    container = gateway["spec"]["template"]["spec"]["containers"][0]
    assert container["ports"][0]["containerPort"] == config.port
    # /health is 503 while any one model cannot serve; the probes must not take the whole gateway out for that.
    assert container["readinessProbe"]["httpGet"]["path"] == "/livez"
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"


def test_prometheus_config_and_rules():
    prom = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    jobs = [job["job_name"] for job in prom["scrape_configs"]]
    assert len(jobs) == len(set(jobs))
    for job in prom["scrape_configs"]:
        assert job.get("static_configs") or job.get("kubernetes_sd_configs"), job["job_name"]
        for static in job.get("static_configs", []):
            assert all(re.match(r"^[\w.-]+:\d+$", t) for t in static["targets"])
    for rule_file in prom["rule_files"]:
        assert (DEPLOY / rule_file).is_file()
    for expr in rule_queries():
        metric_names(expr)  # raises ValueError on invalid PromQL


def test_grafana_dashboard_decodes_into_the_grafana_model():
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.cog.plugins import register_default_plugins
    from grafana_foundation_sdk.models import dashboard, prometheus

    register_default_plugins()
    raw = json.loads(DASHBOARD.read_text())
    model = dashboard.Dashboard.from_json(raw)
    again = json.loads(JSONEncoder().encode(model))
    assert again["uid"] == raw["uid"] and again["schemaVersion"] == raw["schemaVersion"]
    ids = [p.id_val for p in model.panels]
    assert len(ids) == len(set(ids)) and None not in ids
    for panel, raw_panel in zip(model.panels, raw["panels"], strict=True):
        assert (panel.grid_pos.x, panel.grid_pos.y, panel.grid_pos.w, panel.grid_pos.h) == tuple(
            raw_panel["gridPos"][k] for k in "xywh"
        )
        assert panel.grid_pos.x + panel.grid_pos.w <= 24
        if raw_panel["type"] == "row":
            continue
        assert panel.datasource.type_val == "prometheus" and panel.datasource.uid == "${datasource}"
        assert panel.targets and all(isinstance(t, prometheus.Dataquery) for t in panel.targets)
        ref_ids = [t.ref_id for t in panel.targets]
        assert len(ref_ids) == len(set(ref_ids))
    variables = {v.name for v in model.templating.list_val}
    assert {"datasource", "model"} <= variables


def test_grafana_panels_do_not_overlap():
    cells: set[tuple[int, int]] = set()
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        g = panel["gridPos"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & mine, panel["title"]
        cells |= mine


def test_dashboard_queries_parse_and_cover_what_the_issue_asks():
    names = set()
    for expr in dashboard_queries() + scaler_queries():
        names |= metric_names(expr)
    wanted = {
        "tokenmill:num_requests_waiting", "tokenmill:num_requests_running", "tokenmill:kv_cache_usage_perc",
        "tokenmill:generation_tokens_total", "tokenmill:time_to_first_token_seconds_bucket",
        "tokenmill:inter_token_latency_seconds_bucket", "tokenmill:gateway_routed_requests_total",
        "tokenmill:gateway_scale_events_total",
    }  # fmt: skip
    assert wanted <= names


def test_gateway_metrics_queried_by_deploy_exist():
    exported = exported_metric_names(GatewayMetrics().render().decode())
    gateway_names = {n for n in queried_metric_names() if n.startswith("tokenmill:gateway_")}
    assert gateway_names and gateway_names <= exported, sorted(gateway_names - exported)
