"""docker/compose.yaml and the Prometheus / Grafana files it mounts, checked against the server's
real settings, CLI, port and routes (parsed with PyYAML; no docker daemon)."""

from __future__ import annotations

import fnmatch
from pathlib import Path, PurePosixPath
from typing import Any

import pytest

from app.cli import build_parser
from tests.deploy.helpers import (
    COMPOSE_FILE,
    DASHBOARD_FILE,
    DOCKER_DIR,
    REPO,
    default_setting,
    dockerfile_stages,
    interpolate,
    interpolation_names,
    load_yaml,
    settings_from_env,
    unknown_settings,
)

SERVERS = {"kogpt": "gpu", "kogpt-cpu": "cpu"}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_yaml(COMPOSE_FILE)


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def env_of(service: dict[str, Any]) -> dict[str, str | None]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] if "=" in item else (item, None) for item in env)
    return {k: (None if v is None else str(interpolate(v))) for k, v in env.items()}


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """container path -> host source (relative to docker/, as compose resolves it)."""
    out = {}
    for volume in service.get("volumes", []):
        source, target = interpolate(volume).split(":")[:2]
        out[target] = source
    return out


def container_port(service: dict[str, Any]) -> int:
    (mapping,) = service["ports"]
    return int(interpolate(mapping).rsplit(":", 1)[1].split("/")[0])


def dockerfile_runtime():
    return dockerfile_stages()[1][-1]


def test_profiles_gpu_default_and_cpu(services: dict[str, dict[str, Any]]) -> None:
    for name, profile in SERVERS.items():
        assert services[name]["profiles"] == [profile]
    dotenv = dict(
        line.split("=", 1)
        for line in (DOCKER_DIR / ".env").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    )
    assert dotenv["COMPOSE_PROFILES"] == "gpu"
    for name in ("prometheus", "grafana"):
        assert "profiles" not in services[name], f"{name} runs with either server"


def test_servers_build_this_repository(services: dict[str, dict[str, Any]]) -> None:
    variants = {}
    for name in SERVERS:
        build = services[name]["build"]
        context = (DOCKER_DIR / build["context"]).resolve()
        assert context == REPO
        assert (context / build["dockerfile"]).resolve() == (REPO / "Dockerfile")
        variants[name] = build["args"]["TORCH_VARIANT"]
    assert variants["kogpt-cpu"] == "cpu"
    assert variants["kogpt"].startswith("cu")
    build_args = dockerfile_stages()[1][0].args()
    assert set(services["kogpt"]["build"]["args"]) <= set(build_args)


def test_servers_run_kogpt_serve_with_valid_flags(services: dict[str, dict[str, Any]]) -> None:
    entrypoint = dockerfile_runtime().all("ENTRYPOINT")[-1].json_or_words()
    assert entrypoint == ["kogpt-serve"]
    parser = build_parser()
    for name in SERVERS:
        service = services[name]
        assert service.get("entrypoint", ["kogpt-serve"]) in (["kogpt-serve"], "kogpt-serve")
        command = service.get("command", [])
        command = command.split() if isinstance(command, str) else command
        parser.parse_args([str(interpolate(arg)) for arg in command])  # SystemExit if invalid


@pytest.mark.parametrize("name", sorted(SERVERS))
def test_server_env_names_are_real_settings(
    services: dict[str, dict[str, Any]], name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = env_of(services[name])
    assert not unknown_settings(env), f"not kogpt-serve settings: {unknown_settings(env)}"
    settings = settings_from_env(monkeypatch, {**dockerfile_runtime().env(), **env})
    assert settings.host == "0.0.0.0"
    assert settings.device == ("cpu" if SERVERS[name] == "cpu" else "cuda")
    assert container_port(services[name]) == settings.port == default_setting("port")
    # the model default is the one baked into the image
    assert settings.model == dockerfile_runtime().env()["KOGPT_MODEL"]
    # `docker compose stop` must outlast the server's drain
    stop = float(str(services[name]["stop_grace_period"]).rstrip("s"))
    assert stop >= settings.shutdown_grace_seconds + 5


def test_interpolated_kogpt_variables_are_settings() -> None:
    names = interpolation_names(COMPOSE_FILE.read_text(encoding="utf-8"))
    kogpt = {n for n in names if n.startswith("KOGPT_")}
    assert not unknown_settings(kogpt), (
        f"host-side compose variables must not look like settings: {unknown_settings(kogpt)}"
    )


def test_gpu_reservation_only_on_the_gpu_server(services: dict[str, dict[str, Any]]) -> None:
    (device,) = services["kogpt"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert "deploy" not in services["kogpt-cpu"]


def test_checkpoint_volume_and_network_alias(services: dict[str, dict[str, Any]]) -> None:
    for name in SERVERS:
        service = services[name]
        volumes = mounts(service)
        assert "/models" in volumes, "real checkpoints are mounted at /models"
        assert (DOCKER_DIR / volumes["/models"]).resolve() == (REPO / "models")
        assert "kogpt" in service["networks"]["default"]["aliases"]


def test_prometheus_scrapes_the_server(services: dict[str, dict[str, Any]]) -> None:
    prometheus = services["prometheus"]
    volumes = mounts(prometheus)
    config_path = DOCKER_DIR / volumes["/etc/prometheus/prometheus.yml"]
    config = load_yaml(config_path)
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "kogpt-serve"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    (target,) = job["static_configs"][0]["targets"]
    host, port = target.split(":")
    assert host == "kogpt" and int(port) == container_port(services["kogpt"])
    # the rule files glob resolves to the mounted rules directory, which has rules
    (pattern,) = config["rule_files"]
    mounted_dir = PurePosixPath(pattern).parent.as_posix()
    rules_dir = DOCKER_DIR / volumes[mounted_dir]
    matched = [p for p in rules_dir.iterdir() if fnmatch.fnmatch(p.name, Path(pattern).name)]
    assert matched
    for rule_file in matched:
        assert load_yaml(rule_file)["groups"]


def test_grafana_provisioning(services: dict[str, dict[str, Any]]) -> None:
    grafana = services["grafana"]
    volumes = mounts(grafana)
    for source in volumes.values():
        if source.startswith("."):
            assert (DOCKER_DIR / source).exists(), source
    provisioning = DOCKER_DIR / volumes["/etc/grafana/provisioning"]
    (datasource,) = load_yaml(provisioning / "datasources" / "prometheus.yml")["datasources"]
    assert datasource["type"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090"
    assert "prometheus" in services
    (provider,) = load_yaml(provisioning / "dashboards" / "kogpt.yml")["providers"]
    dashboards_in_container = provider["options"]["path"]
    assert (DOCKER_DIR / volumes[dashboards_in_container]).resolve() == DASHBOARD_FILE.parent
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert PurePosixPath(home).parent.as_posix() == dashboards_in_container
    assert (DASHBOARD_FILE.parent / PurePosixPath(home).name).is_file()


def test_named_volumes_are_declared(compose: dict[str, Any]) -> None:
    declared = set(compose.get("volumes", {}))
    for service in compose["services"].values():
        for source in mounts(service).values():
            if not source.startswith((".", "/", "~")):
                assert source in declared, f"volume {source} is not declared"
