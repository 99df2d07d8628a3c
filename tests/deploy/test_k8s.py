"""Kubernetes manifests: strict schema validation (kubernetes-validate, offline) and their
wiring against each other and against the server (settings, port, probes, drain)."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest

from tests.deploy.helpers import (
    K8S_DIR,
    default_setting,
    dockerfile_stages,
    load_yaml,
    load_yaml_docs,
    settings_from_env,
    unknown_settings,
)

# The oldest Kubernetes minor these manifests target; kubernetes-validate ships its schemas.
K8S_VERSION = "1.30.0"
NOT_APPLIED = {"kustomization.yaml", "secret.example.yaml"}


@pytest.fixture(scope="module")
def kustomization() -> dict[str, Any]:
    return load_yaml(K8S_DIR / "kustomization.yaml")


@pytest.fixture(scope="module")
def resources(kustomization: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """kind -> resource, for everything the kustomization applies."""
    out: dict[str, dict[str, Any]] = {}
    for name in kustomization["resources"]:
        for doc in load_yaml_docs(K8S_DIR / name):
            assert doc["kind"] not in out, f"two {doc['kind']} resources; extend the tests"
            out[doc["kind"]] = doc
    return out


@pytest.fixture(scope="module")
def container(resources: dict[str, dict[str, Any]]) -> dict[str, Any]:
    (main,) = resources["Deployment"]["spec"]["template"]["spec"]["containers"]
    return main


def pod_labels(resources: dict[str, dict[str, Any]]) -> dict[str, str]:
    return resources["Deployment"]["spec"]["template"]["metadata"]["labels"]


def seconds(value: Any) -> float:
    return float(value)


def test_schemas_for_the_target_version_are_shipped() -> None:
    from kubernetes_validate.utils import all_versions, major_minor

    shipped = {major_minor(v) for v in all_versions()}
    assert major_minor(K8S_VERSION) in shipped, (
        f"kubernetes-validate {kubernetes_validate.__version__} no longer ships Kubernetes "
        f"{K8S_VERSION} schemas (has {sorted(shipped)}): raise K8S_VERSION or pin the package"
    )


def test_every_manifest_is_listed_and_exists(kustomization: dict[str, Any]) -> None:
    listed = set(kustomization["resources"])
    on_disk = {p.name for p in K8S_DIR.glob("*.yaml")} - NOT_APPLIED
    assert listed == on_disk
    assert all((K8S_DIR / name).is_file() for name in listed)


@pytest.mark.parametrize(
    "path",
    sorted(p for p in K8S_DIR.glob("*.yaml") if p.name != "kustomization.yaml"),
    ids=lambda p: p.name,
)
def test_manifest_is_valid_kubernetes(path: Path) -> None:
    for doc in load_yaml_docs(path):
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            location = "/".join(str(p) for p in exc.path)
            pytest.fail(f"{path.name}: {doc['kind']} {location}: {exc.message}")


def test_the_validator_rejects_a_misspelt_field(resources: dict[str, dict[str, Any]]) -> None:
    broken = copy.deepcopy(resources["Deployment"])
    broken["spec"]["template"]["spec"]["terminationGracePeriod"] = 45
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_one_namespace(kustomization: dict[str, Any], resources: dict[str, dict[str, Any]]) -> None:
    namespace = kustomization["namespace"]
    assert resources["Namespace"]["metadata"]["name"] == namespace
    for kind, doc in resources.items():
        if kind != "Namespace":
            assert doc["metadata"]["namespace"] == namespace, kind


def test_configmap_holds_real_settings(
    resources: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    data = resources["ConfigMap"]["data"]
    assert not unknown_settings(data), f"not kogpt-serve settings: {unknown_settings(data)}"
    assert all(name.startswith("KOGPT_") for name in data)
    settings = settings_from_env(monkeypatch, data)
    assert settings.host == "0.0.0.0"
    assert settings.device == "cuda"


def test_container_port_and_image(
    resources: dict[str, dict[str, Any]], container: dict[str, Any], kustomization: dict[str, Any]
) -> None:
    (port,) = container["ports"]
    data = resources["ConfigMap"]["data"]
    assert port["containerPort"] == int(data["KOGPT_PORT"]) == default_setting("port")
    assert port["name"] == "http"
    assert container["image"] in {image["name"] for image in kustomization["images"]}
    assert any(ref["configMapRef"]["name"] == "kogpt-config" for ref in container["envFrom"])
    assert resources["ConfigMap"]["metadata"]["name"] == "kogpt-config"


def test_probes_match_the_server_endpoints(container: dict[str, Any]) -> None:
    startup, readiness, liveness = (
        container["startupProbe"],
        container["readinessProbe"],
        container["livenessProbe"],
    )
    assert startup["httpGet"]["path"] == "/health"
    assert readiness["httpGet"]["path"] == "/ready"
    assert liveness["httpGet"]["path"] == "/health"
    for probe in (startup, readiness, liveness):
        assert probe["httpGet"]["port"] == "http"
    # the startup probe covers loading (or downloading) a real checkpoint: >= 5 minutes
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300
    from app.api.routes.admin import router

    paths = {route.path for route in router.routes}
    assert {"/health", "/ready", "/metrics"} <= paths


def test_termination_grace_covers_prestop_and_the_drain(
    resources: dict[str, dict[str, Any]], container: dict[str, Any]
) -> None:
    pod = resources["Deployment"]["spec"]["template"]["spec"]
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = seconds(command[1])
    data = resources["ConfigMap"]["data"]
    default_grace = default_setting("shutdown_grace_seconds")
    grace = seconds(data.get("KOGPT_SHUTDOWN_GRACE_SECONDS", default_grace))
    # preStop, then SIGTERM and the drain, then ~2 s to cut what is left, plus slack
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + grace + 5
    assert pod["terminationGracePeriodSeconds"] <= pre_stop + grace + 30, "needlessly long"


def test_gpu_security_and_secret(
    resources: dict[str, dict[str, Any]], container: dict[str, Any]
) -> None:
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    pod = resources["Deployment"]["spec"]["template"]["spec"]
    _, stages = dockerfile_stages()
    image_uid = int(stages[-1].all("USER")[-1].args.split(":")[0])
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == image_uid
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    # writable places the server needs: /tmp and HOME (HF_HOME is under it)
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    env = stages[-1].env()
    assert "/tmp" in mounts and any(env["HF_HOME"].startswith(m + "/") for m in mounts)
    (secret,) = load_yaml_docs(K8S_DIR / "secret.example.yaml")
    (api_key,) = [e for e in container["env"] if e["name"] == "KOGPT_API_KEY"]
    ref = api_key["valueFrom"]["secretKeyRef"]
    assert ref["name"] == secret["metadata"]["name"]
    assert ref["key"] in secret["stringData"]
    assert not ref.get("optional", False), "fail closed: no pod without its API key"


def test_service_pdb_and_hpa_select_the_deployment(resources: dict[str, dict[str, Any]]) -> None:
    labels = pod_labels(resources)
    deployment = resources["Deployment"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    service = resources["Service"]
    assert service["spec"]["selector"].items() <= labels.items()
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] == "http"
    pdb = resources["PodDisruptionBudget"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    hpa = resources["HorizontalPodAutoscaler"]
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"


def test_hpa_metrics_are_served_by_the_adapter(resources: dict[str, dict[str, Any]]) -> None:
    adapter = load_yaml(K8S_DIR / "prometheus-adapter" / "values.yaml")
    served = {rule["name"]["as"] for rule in adapter["rules"]["custom"]}
    for rule in adapter["rules"]["custom"]:
        assert re.fullmatch(rule["name"]["matches"], rule["name"]["as"])
        assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
    metrics = resources["HorizontalPodAutoscaler"]["spec"]["metrics"]
    names = {m["pods"]["metric"]["name"] for m in metrics if m["type"] == "Pods"}
    assert "kogpt_requests_waiting" in names, "autoscale on queue depth"
    assert names <= served


def test_extras_target_the_same_pods(resources: dict[str, dict[str, Any]]) -> None:
    labels = pod_labels(resources)
    deployment = resources["Deployment"]["metadata"]["name"]
    (keda,) = load_yaml_docs(K8S_DIR / "extras" / "keda-scaledobject.yaml")
    assert keda["spec"]["scaleTargetRef"]["name"] == deployment
    assert "kogpt_requests_waiting" in keda["spec"]["triggers"][0]["metadata"]["query"]
    (monitor,) = load_yaml_docs(K8S_DIR / "extras" / "podmonitor.yaml")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert (endpoint["port"], endpoint["path"]) == ("http", "/metrics")
    template = resources["Deployment"]["spec"]["template"]
    annotations = template["metadata"]["annotations"]
    assert annotations["prometheus.io/path"] == "/metrics"
    assert int(annotations["prometheus.io/port"]) == default_setting("port")
