"""The Gateway API Inference Extension example (docker/k8s/inference-pool/): the InferencePool
against the vendored CRD's schema, the built-in kinds against Kubernetes' own (offline), the
wiring between them and the base, and the endpoint picker's metric names against what the
server exports; then the model-server protocol's gauges on a live server under load."""

from __future__ import annotations

import copy
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import kubernetes_validate
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.deploy.helpers import K8S_DIR, load_yaml, load_yaml_docs
from tests.integration.conftest import (  # noqa: F401
    LiveServer,
    live_server,
    side_state,
    start_server,
    stop_server,
)

POOL_DIR = K8S_DIR / "inference-pool"
VENDOR_DIR = Path(__file__).resolve().parent / "vendor" / "gateway-api-inference-extension"
CRD_FILE = VENDOR_DIR / "inference.networking.k8s.io_inferencepools.yaml"
CRD_VERSION = "v1.6.0"
K8S_VERSION = "1.30.0"  # as tests/deploy/test_k8s.py
# Kinds neither Kubernetes nor the vendored CRD define (the Gateway API's HTTPRoute): checked
# for their wiring only.
NOT_SCHEMA_CHECKED = {"HTTPRoute"}
# The picker's metric specs: gauge names, and the labels the info-style ones must carry.
SPEC_LABELS = {
    "queuedRequestsSpec": set(),
    "runningRequestsSpec": set(),
    "kvUsageSpec": set(),
    "loraSpec": {"running_lora_adapters", "waiting_lora_adapters", "max_lora"},
    "cacheInfoSpec": set(),  # the label names come from cacheBlockSizeLabelName etc.
}


# -- the vendored CRD -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def crd() -> dict[str, Any]:
    return load_yaml(CRD_FILE)


def strict(schema: Any) -> Any:
    """The schema with unknown fields rejected, as `kubectl apply` (strict field validation)
    does: every object with `properties` and no additionalProperties gets `false`."""
    if isinstance(schema, dict):
        out = {key: strict(value) for key, value in schema.items()}
        if (
            "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    return schema


@pytest.fixture(scope="module")
def pool_schema(crd: dict[str, Any]) -> dict[str, Any]:
    (version,) = [v for v in crd["spec"]["versions"] if v["served"] and v["storage"]]
    assert version["name"] == "v1"
    schema = strict(version["schema"]["openAPIV3Schema"])
    schema["properties"]["metadata"] = {"type": "object"}  # ObjectMeta: checked by kubectl
    return schema


def test_the_vendored_crd_is_the_stated_release(crd: dict[str, Any]) -> None:
    annotations = crd["metadata"]["annotations"]
    assert annotations["inference.networking.k8s.io/bundle-version"] == CRD_VERSION
    assert crd["metadata"]["name"] == "inferencepools.inference.networking.k8s.io"
    readme = (VENDOR_DIR / "README.md").read_text(encoding="utf-8")
    assert CRD_VERSION in readme
    licence = (VENDOR_DIR / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in licence and "Version 2.0" in licence
    # The kustomization's install line points at the same release.
    assert f"download/{CRD_VERSION}/manifests.yaml" in (POOL_DIR / "kustomization.yaml").read_text()


# -- the manifests ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def kustomization() -> dict[str, Any]:
    return load_yaml(POOL_DIR / "kustomization.yaml")


@pytest.fixture(scope="module")
def docs(kustomization: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    """(kind, name) -> resource, for everything the kustomization applies."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for file in kustomization["resources"]:
        for doc in load_yaml_docs(POOL_DIR / file):
            key = (doc["kind"], doc["metadata"]["name"])
            assert key not in out, f"{key} twice"
            out[key] = doc
    return out


def one(docs: dict[tuple[str, str], dict[str, Any]], kind: str) -> dict[str, Any]:
    (doc,) = [d for (k, _), d in docs.items() if k == kind]
    return doc


def test_every_manifest_is_listed(kustomization: dict[str, Any]) -> None:
    on_disk = {p.name for p in POOL_DIR.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == on_disk


def test_the_pool_is_valid_against_the_crd(
    docs: dict[tuple[str, str], dict[str, Any]], pool_schema: dict[str, Any]
) -> None:
    pool = one(docs, "InferencePool")
    assert pool["apiVersion"] == "inference.networking.k8s.io/v1"
    jsonschema.validate(pool, pool_schema)
    # The CRD's two CEL rules (x-kubernetes-validations), which jsonschema does not run.
    numbers = [p["number"] for p in pool["spec"]["targetPorts"]]
    assert len(numbers) == len(set(numbers)), "port number must be unique"
    picker = pool["spec"]["endpointPickerRef"]
    assert picker.get("kind", "Service") != "Service" or "port" in picker


@pytest.mark.parametrize(
    "change",
    [
        lambda p: p["spec"].__setitem__("targetPort", [{"number": 8000}]),  # misspelt
        lambda p: p["spec"]["targetPorts"][0].__setitem__("number", 70000),
        lambda p: p["spec"]["endpointPickerRef"].__setitem__("failureMode", "Open"),
        lambda p: p["spec"].pop("selector"),
    ],
    ids=["unknown-field", "port-range", "enum", "required"],
)
def test_the_crd_schema_rejects_a_broken_pool(
    docs: dict[tuple[str, str], dict[str, Any]], pool_schema: dict[str, Any], change: Any
) -> None:
    broken = copy.deepcopy(one(docs, "InferencePool"))
    change(broken)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, pool_schema)


def test_built_in_kinds_are_valid_kubernetes(docs: dict[tuple[str, str], dict[str, Any]]) -> None:
    checked = 0
    for (kind, name), doc in docs.items():
        if kind in NOT_SCHEMA_CHECKED or kind == "InferencePool":
            continue
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            location = "/".join(str(p) for p in exc.path)
            pytest.fail(f"{kind} {name} {location}: {exc.message}")
        checked += 1
    assert checked >= 6  # ServiceAccount, Role, RoleBinding, ConfigMap, Deployment, Service


def test_the_pool_selects_the_base_deployment_and_its_port(
    docs: dict[tuple[str, str], dict[str, Any]],
) -> None:
    base = {d["kind"]: d for f in ("deployment.yaml",) for d in load_yaml_docs(K8S_DIR / f)}
    template = base["Deployment"]["spec"]["template"]
    (container,) = template["spec"]["containers"]
    pool = one(docs, "InferencePool")
    assert pool["spec"]["selector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
    ports = {p["containerPort"] for p in container["ports"]}
    assert [p["number"] for p in pool["spec"]["targetPorts"]] == sorted(ports)
    namespace = load_yaml(K8S_DIR / "kustomization.yaml")["namespace"]
    for doc in docs.values():
        assert doc["metadata"]["namespace"] == namespace


def test_the_picker_is_wired(docs: dict[tuple[str, str], dict[str, Any]]) -> None:
    pool = one(docs, "InferencePool")
    service, deployment = one(docs, "Service"), one(docs, "Deployment")
    ref = pool["spec"]["endpointPickerRef"]
    assert ref["name"] == service["metadata"]["name"]
    by_port = {p["port"]: p for p in service["spec"]["ports"]}
    assert by_port[ref["port"]["number"]]["appProtocol"] == "kubernetes.io/h2c"
    pod = deployment["spec"]["template"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    (epp,) = pod["spec"]["containers"]
    named = {p["name"] for p in epp["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= named
    args = epp["args"]
    assert args[args.index("--pool-name") + 1] == pool["metadata"]["name"]
    assert args[args.index("--pool-group") + 1] == "inference.networking.k8s.io"
    config_path = Path(args[args.index("--config-file") + 1])
    (mount,) = [m for m in epp["volumeMounts"] if Path(m["mountPath"]) == config_path.parent]
    (volume,) = [v for v in pod["spec"]["volumes"] if v["name"] == mount["name"]]
    configmap = one(docs, "ConfigMap")
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    assert config_path.name in configmap["data"]
    role = one(docs, "Role")
    resources = {r for rule in role["rules"] for r in rule["resources"]}
    assert {"pods", "inferencepools"} <= resources
    assert one(docs, "RoleBinding")["subjects"][0]["name"] == pod["spec"]["serviceAccountName"]
    route = one(docs, "HTTPRoute")
    (backend,) = route["spec"]["rules"][0]["backendRefs"]
    assert (backend["group"], backend["kind"], backend["name"]) == (
        "inference.networking.k8s.io",
        "InferencePool",
        pool["metadata"]["name"],
    )


@pytest.fixture(scope="module")
def engine_config(docs: dict[tuple[str, str], dict[str, Any]]) -> dict[str, Any]:
    """The picker's metric specs for kogpt-serve pods (its default engine)."""
    configmap = one(docs, "ConfigMap")
    (text,) = configmap["data"].values()
    config = yaml.safe_load(text)
    assert config["kind"] == "EndpointPickerConfig"
    (extractor,) = [p for p in config["plugins"] if p["type"] == "core-metrics-extractor"]
    params = extractor["parameters"]
    (engine,) = [e for e in params["engineConfigs"] if e["name"] == params["defaultEngine"]]
    scorers = {p["pluginRef"] for prof in config["schedulingProfiles"] for p in prof["plugins"]}
    assert {"queue-scorer", "kv-cache-utilization-scorer", "prefix-cache-scorer"} <= scorers
    return engine


def metric_name(spec: str) -> str:
    """`name` of a picker metric spec `name{label=value,...}`."""
    match = re.fullmatch(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})?", spec)
    assert match, f"not a metric spec: {spec!r}"
    return match.group(1)


def test_every_protocol_metric_is_configured(engine_config: dict[str, Any]) -> None:
    assert set(SPEC_LABELS) <= engine_config.keys()
    assert all(engine_config[key] for key in SPEC_LABELS), "a protocol metric left disabled"


# -- the server's side (live) -----------------------------------------------------------------
def families(url: str) -> dict[str, Any]:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {family.name: family for family in text_string_to_metric_families(text)}


def test_the_configured_metrics_are_exported_as_gauges(
    live_server: LiveServer,  # noqa: F811
    engine_config: dict[str, Any],
) -> None:
    exported = families(live_server.base_url)
    for key, labels in SPEC_LABELS.items():
        name = metric_name(engine_config[key])
        assert name in exported, f"{key}: {name} is not exported by the server"
        family = exported[name]
        assert family.type == "gauge", f"{key}: {name} is a {family.type}, the picker reads gauges"
        (sample,) = family.samples
        assert labels <= sample.labels.keys(), f"{name} lacks labels {labels}"
    cache = exported[metric_name(engine_config["cacheInfoSpec"])].samples[0].labels
    block_size = cache[engine_config["cacheBlockSizeLabelName"]]
    blocks = cache[engine_config["cacheNumBlocksLabelName"]]
    settings = live_server.state.settings
    assert int(block_size) == settings.block_size
    assert int(blocks) == settings.num_kv_blocks
    lora = exported[metric_name(engine_config["loraSpec"])].samples[0]
    # No adapter requests run: empty lists, max_lora --max-loras, the value a timestamp.
    assert lora.labels["running_lora_adapters"] == lora.labels["waiting_lora_adapters"] == ""
    assert lora.labels["max_lora"] == str(settings.max_loras)
    assert lora.value > 1e9


@pytest.fixture(scope="module")
def one_slot_server(live_server: LiveServer) -> Iterator[LiveServer]:  # noqa: F811
    """The live server's weights with a batch of one and a queue of four, so requests wait."""
    state = side_state(live_server.state, max_num_seqs=1, max_waiting=4, num_blocks=128)
    live = start_server(live_server.state.settings, state)
    try:
        yield live
    finally:
        stop_server(live)
        state.engine.stop()


def gauges(url: str, names: dict[str, str]) -> dict[str, float]:
    exported = families(url)
    out = {}
    for key, name in names.items():
        family = exported[name]
        assert family.type == "gauge"
        (sample,) = family.samples
        out[key] = sample.value
    return out


def test_protocol_gauges_under_load(
    one_slot_server: LiveServer, engine_config: dict[str, Any]
) -> None:
    """One request runs (a long stream), two wait: the picker's gauges say so, KV usage is a
    fraction in (0, 1]; when all are done they are back to 0."""
    live = one_slot_server
    names = {
        "queued": metric_name(engine_config["queuedRequestsSpec"]),
        "running": metric_name(engine_config["runningRequestsSpec"]),
        "kv": metric_name(engine_config["kvUsageSpec"]),
    }
    long_body = {"model": "any", "prompt": "대한민국은", "max_tokens": 900, "min_tokens": 900}
    short_body = {"model": "any", "prompt": "서울은", "max_tokens": 4}
    url = live.base_url
    statuses: list[int] = []

    def post(body: dict[str, Any]) -> None:
        statuses.append(httpx.post(f"{url}/v1/completions", json=body, timeout=120).status_code)

    seen: list[dict[str, float]] = []
    stream_body = {**long_body, "stream": True}
    with (
        httpx.Client(base_url=url, timeout=120) as client,
        client.stream("POST", "/v1/completions", json=stream_body) as resp,
    ):
        assert resp.status_code == 200
        lines = resp.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))  # it is running
        waiters = [threading.Thread(target=post, args=(short_body,)) for _ in range(2)]
        for thread in waiters:
            thread.start()
        # Until both are in the queue; they cannot finish before the long stream (one slot).
        while not seen or seen[-1]["queued"] < 2:
            assert not statuses, "a waiting request finished before the long one"
            seen.append(gauges(url, names))
            assert seen[-1]["running"] <= 1
        tail = [line for line in lines if line.startswith("data:")]  # the rest of the stream
    assert tail[-1] == "data: [DONE]"
    for thread in waiters:
        thread.join(120)
    assert statuses == [200, 200]
    live.wait_idle()
    loaded = seen[-1]
    assert loaded["queued"] == 2 and loaded["running"] == 1
    assert all(0.0 <= s["kv"] <= 1.0 for s in seen)
    assert 0.0 < loaded["kv"] <= 1.0
    idle = gauges(url, names)
    assert idle == {"queued": 0.0, "running": 0.0, "kv": 0.0}
