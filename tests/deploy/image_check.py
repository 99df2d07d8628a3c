"""`make image-check`: the container image built from this repository's Dockerfile and run for
real (opt-in, never in CI; docs/deployment.md, "Built and run for real").

    python -m tests.deploy.image_check [--engine docker|podman] [--no-cache] [--skip-compose]

1. An engine: docker when its daemon answers, else podman with runc (apt-get installs podman,
   runc and mmdebstrap when missing; docker/podman/containers.conf picks runc and the ulimits).
2. A base: python:3.11-slim-bookworm when it is present or can be pulled, else a Debian
   bookworm base made with mmdebstrap (python3, python3-venv, ca-certificates, plus the
   host's extra CA certificates from /usr/local/share/ca-certificates, so that pip reaches
   PyPI through a TLS-intercepting proxy) and imported as localhost/kogpt-serve-base:bookworm.
3. The CPU image, `--build-arg TORCH_VARIANT=cpu`; the CPU torch wheel from TORCH_WHEELS is
   handed to the build through docker/wheels/ when it is there (then torch's own
   dependencies come from PyPI). Built twice: the second build shows the layer cache.
4. Two containers, each published on 127.0.0.1 only: the embedded model, and a real
   checkpoint (models/kogpt2-base-random, `make random-base`) mounted read-only with
   KOGPT_MODEL. Each: its HEALTHCHECK reports healthy (docker's scheduler; podman without
   systemd runs the image's check through `podman healthcheck run`), a Korean /generate, a
   streamed /generate_stream, a /v1/completions, the server process's uid (PID 1, non-root),
   then a stop while streams are in flight: they finish, new requests get 503, exit code 0
   within the drain's grace period.
5. The compose stack (docker/compose.yaml, `--profile cpu`): the server and Prometheus
   (prom/prometheus when it can be pulled, else Debian's prometheus package in a local
   image); Prometheus scrapes the server, loads the alert rules, and answers every query of
   the Grafana dashboard. Grafana itself is only started when its image is at hand.

Figures (image size, build times, cold start, first response) are printed and written to
build/image-check/report.json. All traffic goes to 127.0.0.1; every loop is bounded.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
WORK = REPO / "build" / "image-check"
DOCKERFILE = REPO / "Dockerfile"
WHEELS_DIR = REPO / "docker" / "wheels"
PODMAN_CONF = REPO / "docker" / "podman" / "containers.conf"
COMPOSE_LOCK = REPO / "docker" / "podman" / "compose.lock"
COMPOSE_FILE = REPO / "docker" / "compose.yaml"
DASHBOARD = REPO / "docker" / "grafana" / "dashboards" / "kogpt-serve.json"
RULES_DIR = REPO / "docker" / "prometheus" / "rules"
CHECKPOINT = REPO / "models" / "kogpt2-base-random"

PYTHON_IMAGE = "docker.io/library/python:3.11-slim-bookworm"
DEBIAN_BASE = "localhost/kogpt-serve-base:bookworm"
PROMETHEUS_IMAGE = "docker.io/prom/prometheus:v3.5.0"
DEBIAN_PROMETHEUS = "localhost/kogpt-serve-prometheus:debian"
GRAFANA_IMAGE = "docker.io/grafana/grafana:12.2.0"
# podman and its runtime, network stack (netavark with aardvark-dns: compose's service names)
# and init (compose's `init: true`); mmdebstrap for the Debian-made images.
APT_PACKAGES = ("podman", "runc", "netavark", "aardvark-dns", "iptables", "catatonit", "mmdebstrap")
# Dashboard panels allowed to be empty after the check's traffic (no 5xx happens).
EXPECTED_EMPTY_PANELS = {"5xx error ratio"}
CONTAINER_UID = 10001
GRACE_SECONDS = 30.0  # KOGPT_SHUTDOWN_GRACE_SECONDS' default
STOP_TIMEOUT = 40  # docker/podman stop -t: longer than the grace period
PROMPT = "대한민국은"
HANGUL = re.compile(r"[\uac00-\ud7a3]")


class CheckFailed(Exception):
    pass


def log(message: str) -> None:
    print(f"[image-check] {message}", flush=True)


def ensure(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


def sh(
    cmd: list[str],
    *,
    check: bool = True,
    capture: bool = False,
    timeout: float | None = None,
    env: dict[str, str] | None = None,
    quiet: bool = False,
) -> subprocess.CompletedProcess[str]:
    if not quiet:
        log("$ " + shlex.join(cmd))
    result = subprocess.run(
        cmd,
        text=True,
        capture_output=capture,
        timeout=timeout,
        env=env,
        check=False,
        cwd=REPO,
    )
    if check and result.returncode != 0:
        detail = (result.stderr or "")[-3000:] if capture else ""
        raise CheckFailed(f"exit {result.returncode}: {shlex.join(cmd)}\n{detail}")
    return result


# -- engine ------------------------------------------------------------------------------------
@dataclass
class Engine:
    name: str  # docker | podman
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))

    def __call__(self, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return sh([self.name, *args], env=self.env, **kwargs)

    def out(self, *args: str, timeout: float = 60) -> str:
        result = self(*args, capture=True, timeout=timeout, quiet=True)
        return result.stdout.strip()

    def has_image(self, ref: str) -> bool:
        return self("image", "inspect", ref, check=False, capture=True, quiet=True).returncode == 0

    def pull(self, ref: str, timeout: float) -> bool:
        try:
            return self("pull", ref, check=False, capture=True, timeout=timeout).returncode == 0
        except subprocess.TimeoutExpired:
            return False

    def logs(self, name: str) -> str:
        """The container's output (the server logs to stderr), without podman's systemd notes."""
        result = subprocess.run(
            [self.name, "logs", name],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=60,
            check=False,
        )
        lines = result.stdout.splitlines()
        return "\n".join(line for line in lines if "systemd connection" not in line)

    def remove_container(self, name: str) -> None:
        self("rm", "-f", name, check=False, capture=True, quiet=True)


def docker_works() -> bool:
    if not shutil.which("docker"):
        return False
    try:
        return (
            sh(["docker", "info"], check=False, capture=True, timeout=20, quiet=True).returncode
            == 0
        )
    except subprocess.TimeoutExpired:
        return False


def missing_packages(packages: tuple[str, ...]) -> list[str]:
    if not shutil.which("dpkg-query"):
        return [p for p in packages if not shutil.which(p)]
    missing = []
    for package in packages:
        query = ["dpkg-query", "-W", "-f=${Status}", package]
        status = sh(query, check=False, capture=True, quiet=True).stdout
        if status != "install ok installed":
            missing.append(package)
    return missing


def apt_install(packages: tuple[str, ...] | list[str]) -> None:
    ensure(
        os.geteuid() == 0 and bool(shutil.which("apt-get")),
        f"install {' '.join(packages)} (needs root and apt-get)",
    )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    sh(["apt-get", "update", "-qq"], timeout=600, env=env)
    sh(["apt-get", "install", "-y", "-qq", *packages], timeout=1200, env=env)


def choose_engine(wanted: str) -> Engine:
    if wanted in ("auto", "docker") and docker_works():
        return Engine("docker", {**os.environ, "DOCKER_BUILDKIT": "1"})
    ensure(wanted != "docker", "docker was asked for but its daemon does not answer")
    missing = missing_packages(APT_PACKAGES)
    if missing:
        apt_install(missing)
    env = dict(os.environ)
    env.setdefault("CONTAINERS_CONF", str(PODMAN_CONF))  # runc, ulimits (see the file)
    return Engine("podman", env)


# -- base image ----------------------------------------------------------------------------------
def mmdebstrap_import(
    engine: Engine, tag: str, include: list[str], changes: list[str], hooks: list[str]
) -> None:
    if not shutil.which("mmdebstrap"):
        apt_install(("mmdebstrap",))
    WORK.mkdir(parents=True, exist_ok=True)
    tar = WORK / (tag.rsplit("/", 1)[-1].replace(":", "-") + ".tar")
    cmd = ["mmdebstrap", "--quiet", "--variant=minbase", "--include=" + ",".join(include)]
    cmd += [f"--customize-hook={hook}" for hook in hooks]
    sh([*cmd, "bookworm", str(tar)], timeout=900)
    import_cmd = ["import"]
    for change in changes:
        import_cmd += ["--change", change]
    engine(*import_cmd, str(tar), tag, capture=True, timeout=300)
    tar.unlink()


def debian_base(engine: Engine, rebuild: bool) -> str:
    if engine.has_image(DEBIAN_BASE) and not rebuild:
        log(f"base: {DEBIAN_BASE} (made earlier; --rebuild-base to make it anew)")
        return DEBIAN_BASE
    log("base: making a Debian bookworm base with mmdebstrap")
    hooks = []
    extra_cas = sorted(Path("/usr/local/share/ca-certificates").glob("*.crt"))
    if extra_cas:  # e.g. a TLS-intercepting proxy's CA: pip in the build must trust it
        log(f"base: adding the host's CA certificates {[p.name for p in extra_cas]}")
        hooks.append(
            'cp /usr/local/share/ca-certificates/*.crt "$1/usr/local/share/ca-certificates/"'
        )
        hooks.append('chroot "$1" update-ca-certificates')
    started = time.monotonic()
    mmdebstrap_import(
        engine,
        DEBIAN_BASE,
        ["python3", "python3-venv", "ca-certificates"],
        [
            "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "ENV LANG=C.UTF-8",
            'CMD ["python3"]',
        ],
        hooks,
    )
    log(f"base: made in {time.monotonic() - started:.0f} s")
    return DEBIAN_BASE


def choose_base(engine: Engine, base: str, rebuild: bool) -> str:
    if base in ("auto", "python"):
        if engine.has_image(PYTHON_IMAGE):
            log(f"base: {PYTHON_IMAGE} (present)")
            return PYTHON_IMAGE
        log(f"base: trying to pull {PYTHON_IMAGE}")
        if engine.pull(PYTHON_IMAGE, timeout=180):
            return PYTHON_IMAGE
        ensure(base == "auto", f"{PYTHON_IMAGE} cannot be pulled")
        log("base: no registry reachable; using the Debian-made base")
    return debian_base(engine, rebuild)


# -- build ---------------------------------------------------------------------------------------
def dockerfile_arg(name: str) -> str:
    match = re.search(rf"^ARG {name}=(\S+)", DOCKERFILE.read_text(encoding="utf-8"), re.M)
    ensure(match is not None, f"ARG {name} not in the Dockerfile")
    return match.group(1)


def torch_build_args(context: Path, torch_wheels: Path, index_url: str) -> list[str]:
    version = dockerfile_arg("TORCH_VERSION")
    wheels = sorted(torch_wheels.glob(f"torch-{version}+cpu-cp311-cp311-*linux*_x86_64.whl"))
    if not wheels:
        log(
            f"torch: no CPU wheel of {version} in {torch_wheels}; "
            "the build uses the PyTorch CPU index"
        )
        return []
    wheel = wheels[-1]
    target = context / WHEELS_DIR.relative_to(REPO) / wheel.name
    if not (target.exists() and target.stat().st_size == wheel.stat().st_size):
        target.unlink(missing_ok=True)
        try:
            os.link(wheel, target)
        except OSError:
            shutil.copy2(wheel, target)
    log(
        f"torch: {wheel.name} handed to the build through docker/wheels/; "
        f"its dependencies from {index_url}"
    )
    return [
        "--build-arg",
        f"TORCH_VERSION={version}+cpu",
        "--build-arg",
        f"TORCH_INDEX_URL={index_url}",
    ]


def build(
    engine: Engine,
    context: Path,
    tag: str,
    base: str,
    torch_args: list[str],
    no_cache: bool,
    log_name: str,
) -> float:
    cmd = ["build", "-t", tag, "--build-arg", "TORCH_VARIANT=cpu", *torch_args]
    if base != PYTHON_IMAGE or engine.name == "podman":
        cmd += ["--build-arg", f"PYTHON_IMAGE={base}"]
    if engine.name == "podman":
        cmd += ["--format", "docker"]  # the OCI format has no HEALTHCHECK
    if no_cache:
        cmd.append("--no-cache")
    WORK.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    build_log = WORK / log_name
    with build_log.open("w", encoding="utf-8") as out:
        log("$ " + shlex.join([engine.name, *cmd, "."]) + f"   (log: {build_log})")
        result = subprocess.run(
            [engine.name, *cmd, "."],
            cwd=context,
            env=engine.env,
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=3600,
        )
    elapsed = time.monotonic() - started
    ensure(result.returncode == 0, f"build failed (exit {result.returncode}); see {build_log}")
    return elapsed


# -- HTTP ----------------------------------------------------------------------------------------
def http(method: str, url: str, body: Any = None, timeout: float = 120) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            raw = response.read()
            status = response.status
    except urllib.error.HTTPError as error:
        raw, status = error.read(), error.code
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


def stream(url: str, body: Any, on_token: Any = None, timeout: float = 300) -> dict[str, Any]:
    """POST an SSE request; returns status, token texts and the last event."""
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    out: dict[str, Any] = {"status": None, "tokens": [], "last": None, "error": None}
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            out["status"] = response.status
            for raw in response:
                line = raw.decode("utf-8").strip()
                if not line.startswith("data:") or line == "data: [DONE]":
                    continue
                event = json.loads(line[5:])
                out["last"] = event
                if event.get("token"):
                    out["tokens"].append(event["token"]["text"])
                    if on_token:
                        on_token()
    except urllib.error.HTTPError as error:
        out["status"], out["error"] = error.code, error.read().decode(errors="replace")
    except (OSError, ValueError) as error:
        out["error"] = repr(error)
    return out


def wait_http(url: str, seconds: float) -> float | None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return time.monotonic()
        except (OSError, ValueError):
            pass
        time.sleep(0.2)
    return None


# -- one container -------------------------------------------------------------------------------
@dataclass
class Scenario:
    label: str
    run_args: list[str]
    model_id: str
    hangul: bool  # the embedded model writes Korean; random weights write noise


def container_state(engine: Engine, name: str) -> tuple[str, str]:
    fmt = "{{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}}"
    status, _, health = engine.out("inspect", "--format", fmt, name).partition(" ")
    return status, health


def healthcheck_interval(engine: Engine, image: str) -> float:
    text = engine.out("image", "inspect", "--format", "{{json .Config.Healthcheck}}", image)
    ensure(
        text not in ("", "null"), f"{image} has no HEALTHCHECK (podman: build with --format docker)"
    )
    return json.loads(text).get("Interval", 15_000_000_000) / 1e9


def wait_healthy(
    engine: Engine, name: str, base: str, started: float, limit: float
) -> dict[str, float]:
    """Seconds from `run` until /health answers and until the engine reports healthy."""
    times: dict[str, float] = {}
    deadline = started + limit
    while time.monotonic() < deadline:
        if "http_health_s" not in times:
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=1) as response:
                    if response.status == 200:
                        times["http_health_s"] = time.monotonic() - started
            except (OSError, ValueError):
                pass
        if engine.name == "podman":  # no systemd timer here: run the image's own check now
            engine("healthcheck", "run", name, check=False, capture=True, quiet=True, timeout=30)
        status, health = container_state(engine, name)
        if status not in ("running", "created", "starting"):
            raise CheckFailed(
                f"{name} is {status} before it became healthy:\n{engine.logs(name)[-3000:]}"
            )
        if health == "healthy":
            times["healthy_s"] = time.monotonic() - started
            times.setdefault("http_health_s", times["healthy_s"])
            return times
        ensure(health != "unhealthy", f"{name} reports unhealthy")
        time.sleep(0.5 if engine.name == "docker" else 1.0)
    raise CheckFailed(f"{name} not healthy within {limit:.0f} s:\n{engine.logs(name)[-3000:]}")


def check_requests(base: str, scenario: Scenario) -> dict[str, Any]:
    """Random weights write tokens past the tokenizer's vocabulary (empty text): counts then."""
    figures: dict[str, Any] = {}
    params = {"max_new_tokens": 24, "min_new_tokens": 24, "details": True}
    started = time.monotonic()
    status, body = http("POST", f"{base}/generate", {"inputs": PROMPT, "parameters": params})
    figures["first_response_s"] = time.monotonic() - started
    ensure(status == 200 and isinstance(body, dict), f"/generate: {status} {body}")
    text = body["generated_text"]
    ensure(
        isinstance(text, str) and body["details"]["generated_tokens"] == 24, f"/generate: {body}"
    )
    if scenario.hangul:
        ensure(bool(HANGUL.search(text)), f"/generate wrote no Hangul: {text!r}")
    log(f"/generate ({figures['first_response_s']:.2f} s, first request): {PROMPT}{text!r}")

    started = time.monotonic()
    http("POST", f"{base}/generate", {"inputs": PROMPT, "parameters": {"max_new_tokens": 24}})
    figures["second_response_s"] = time.monotonic() - started

    body = {
        "inputs": PROMPT,
        "parameters": {"max_new_tokens": 32, "min_new_tokens": 32, "details": True},
    }
    started = time.monotonic()
    result = stream(f"{base}/generate_stream", body)
    elapsed = time.monotonic() - started
    last = result["last"] or {}
    ensure(result["status"] == 200 and not result["error"], f"/generate_stream: {result}")
    ensure(
        len(result["tokens"]) == 32, f"/generate_stream sent {len(result['tokens'])} tokens, not 32"
    )
    ensure(
        "".join(result["tokens"]) == last.get("generated_text"), "stream tokens != generated_text"
    )
    figures["stream_tokens_per_s"] = 32 / elapsed
    log(f"/generate_stream: 32 tokens in {elapsed:.2f} s, {last['generated_text'][:40]!r}...")

    status, models = http("GET", f"{base}/v1/models")
    ensure(
        status == 200 and models["data"][0]["id"] == scenario.model_id,
        f"/v1/models: {status} {models}",
    )
    status, body = http(
        "POST",
        f"{base}/v1/completions",
        {"model": scenario.model_id, "prompt": PROMPT, "max_tokens": 16, "temperature": 0},
    )
    ensure(status == 200 and isinstance(body, dict), f"/v1/completions: {status} {body}")
    choice = body["choices"][0]
    ensure(
        isinstance(choice["text"], str) and choice["finish_reason"] in ("length", "stop"), f"{body}"
    )
    ensure(body["usage"]["completion_tokens"] >= 1, f"/v1/completions usage: {body['usage']}")
    log(f"/v1/completions: {choice['text']!r} ({choice['finish_reason']})")
    return figures


def check_non_root(engine: Engine, name: str) -> None:
    status_text = engine.out("exec", name, "cat", "/proc/1/status")
    uids = re.search(r"^Uid:\s+(.*)$", status_text, re.M)
    ensure(uids is not None, "no Uid line in /proc/1/status")
    values = {int(v) for v in uids.group(1).split()}
    cmdline = engine.out("exec", name, "cat", "/proc/1/cmdline").replace("\0", " ")
    ensure("kogpt-serve" in cmdline, f"PID 1 is not the server: {cmdline!r}")
    ensure(values == {CONTAINER_UID}, f"the server runs as uids {values}, not {CONTAINER_UID}")
    log(
        f"non-root: PID 1 ({cmdline.strip()}) runs as uid {CONTAINER_UID} "
        "(real, effective, saved, fs)"
    )


def check_drain(
    engine: Engine, name: str, base: str, tokens_per_s: float, max_total: int
) -> dict[str, Any]:
    """Stop the container while streams run: they finish, new requests get 503, exit 0 in time."""
    # Long enough to be mid-stream at SIGTERM (about 8 s), never past the model's context.
    new_tokens = int(min(max(64, tokens_per_s * 8), max_total - 32))
    body = {
        "inputs": PROMPT,
        "parameters": {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens},
    }
    count = 3
    results: list[dict[str, Any]] = [{} for _ in range(count)]
    first_token = [threading.Event() for _ in range(count)]

    def worker(i: int) -> None:
        results[i] = stream(f"{base}/generate_stream", body, on_token=first_token[i].set)
        first_token[i].set()

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(count)]
    for thread in threads:
        thread.start()
    for event in first_token:
        ensure(event.wait(120), "the streams never started")
    started = time.monotonic()
    stopper = subprocess.Popen(
        [engine.name, "stop", "-t", str(STOP_TIMEOUT), name],
        env=engine.env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(1.0)
    try:
        probe_status, _ = http("POST", f"{base}/generate", {"inputs": PROMPT}, timeout=10)
    except OSError as error:  # the drain may be over already
        probe_status = repr(error)
    in_flight_at_probe = sum(thread.is_alive() for thread in threads)
    stopper.wait(STOP_TIMEOUT + 30)
    stop_s = time.monotonic() - started
    for thread in threads:
        thread.join(60)
    exit_code = int(engine.out("inspect", "--format", "{{.State.ExitCode}}", name))
    logs = engine.logs(name)
    for i, result in enumerate(results):
        last = result.get("last") or {}
        ensure(
            result.get("status") == 200 and not result.get("error"),
            f"in-flight stream {i} was cut: {result.get('status')} {result.get('error')}",
        )
        ensure(
            len(result["tokens"]) == new_tokens,
            f"stream {i}: {len(result['tokens'])}/{new_tokens} tokens",
        )
        ensure((last.get("details") or {}).get("finish_reason") == "length", f"stream {i}: {last}")
    if in_flight_at_probe:
        ensure(probe_status == 503, f"a new request during the drain got {probe_status}, not 503")
    ensure("SIGTERM: draining" in logs, "no drain in the server log")
    ensure(exit_code == 0, f"exit code {exit_code} after the drain")
    ensure(
        stop_s < GRACE_SECONDS + 5,
        f"stop took {stop_s:.1f} s, past the {GRACE_SECONDS:.0f} s grace",
    )
    log(
        f"drain: {count} streams of {new_tokens} tokens in flight at SIGTERM all finished; "
        "new request "
        f"-> {probe_status}; exit code {exit_code} after {stop_s:.1f} s"
    )
    return {"drain_stop_s": stop_s, "drain_tokens": new_tokens, "drain_probe": probe_status}


def run_scenario(engine: Engine, image: str, scenario: Scenario, port: int) -> dict[str, Any]:
    name = f"kogpt-image-check-{scenario.label}"
    base = f"http://127.0.0.1:{port}"
    engine.remove_container(name)
    log(f"--- {scenario.label}")
    started = time.monotonic()
    engine(
        "run",
        "-d",
        "--name",
        name,
        "-p",
        f"127.0.0.1:{port}:8000",
        "--stop-timeout",
        str(STOP_TIMEOUT),
        *scenario.run_args,
        image,
        capture=True,
        timeout=120,
    )
    try:
        figures = wait_healthy(engine, name, base, started, limit=240)
        log(
            f"/health answers {figures['http_health_s']:.1f} s after run; "
            f"healthy at {figures['healthy_s']:.1f} s"
        )
        status, info = http("GET", f"{base}/info")
        ensure(status == 200, f"/info: {status}")
        figures.update(check_requests(base, scenario))
        check_non_root(engine, name)
        if any(arg.endswith(":ro") for arg in scenario.run_args):
            denied = engine(
                "exec",
                name,
                "touch",
                f"{info['model_path']}/x",
                check=False,
                capture=True,
                quiet=True,
            )
            ensure(denied.returncode != 0, "the checkpoint mount is writable")
            log(f"checkpoint: {info['model_path']} ({info['config']}) mounted read-only")
        figures.update(
            check_drain(
                engine, name, base, figures["stream_tokens_per_s"], info["max_total_tokens"]
            )
        )
        return figures
    finally:
        WORK.mkdir(parents=True, exist_ok=True)
        (WORK / f"{scenario.label}.log").write_text(engine.logs(name) + "\n", encoding="utf-8")
        engine.remove_container(name)


def readable_checkpoint(path: Path) -> None:
    """uid 10001 must read the mounted files: transformers writes model.safetensors 0600."""
    ensure((path / "config.json").is_file(), f"{path} is missing: run `make random-base` first")
    private = [p for p in path.rglob("*") if p.is_file() and not p.stat().st_mode & 0o004]
    if private:
        log(
            f"checkpoint: making {[p.name for p in private]} world-readable (chmod a+r) "
            f"for uid {CONTAINER_UID}"
        )
        for p in private:
            p.chmod(p.stat().st_mode | 0o044)


# -- compose -------------------------------------------------------------------------------------
def compose_command(engine: Engine) -> list[str]:
    if engine.name == "docker":
        return ["docker", "compose"]
    tools = WORK / "tools"
    binary = tools / "bin" / "podman-compose"
    if not binary.exists():
        sh([sys.executable, "-m", "venv", str(tools)])
        sh(
            [
                str(tools / "bin" / "pip"),
                "install",
                "-q",
                "--require-hashes",
                "-r",
                str(COMPOSE_LOCK),
            ],
            timeout=600,
        )
    return [str(binary)]


def prometheus_image(engine: Engine) -> str:
    if engine.has_image(PROMETHEUS_IMAGE) or engine.pull(PROMETHEUS_IMAGE, timeout=120):
        return PROMETHEUS_IMAGE
    if engine.has_image(DEBIAN_PROMETHEUS):
        return DEBIAN_PROMETHEUS
    log(
        "compose: prom/prometheus cannot be pulled; making a Prometheus image from Debian's package"
    )
    started = time.monotonic()
    mmdebstrap_import(
        engine,
        DEBIAN_PROMETHEUS,
        ["prometheus", "ca-certificates"],
        [
            'ENTRYPOINT ["/usr/bin/prometheus"]',
            "USER 65534:65534",
            "WORKDIR /prometheus",
            "EXPOSE 9090",
        ],
        ['mkdir -p "$1/prometheus" && chown 65534:65534 "$1/prometheus"'],
    )
    log(f"compose: {DEBIAN_PROMETHEUS} made in {time.monotonic() - started:.0f} s")
    return DEBIAN_PROMETHEUS


def dashboard_exprs() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    out = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            for target in panel.get("targets", []):
                if target.get("expr"):
                    out.append((f"{panel.get('title')} [{target.get('refId')}]", target["expr"]))
            walk(panel.get("panels", []))

    walk(dashboard.get("panels", []))
    return out


def grafana_vars(expr: str) -> str:
    for var, value in (
        ("$__rate_interval", "1m"),
        ("$__interval", "15s"),
        ("$__range", "5m"),
        ("${model:regex}", ".*"),
        ("${instance:regex}", ".*"),
        ("$model", ".*"),
        ("$instance", ".*"),
        ("${model}", ".*"),
        ("${instance}", ".*"),
    ):
        expr = expr.replace(var, value)
    return expr


def prometheus_query(prom: str, expr: str) -> tuple[str, int, str]:
    url = f"{prom}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    status, body = http("GET", url, timeout=30)
    if status != 200 or not isinstance(body, dict):
        return "error", 0, str(body)[:300]
    return body["status"], len(body["data"]["result"]), body.get("error", "")


def check_compose(engine: Engine, image: str, api_port: int, prom_port: int) -> dict[str, Any]:
    log("--- compose")
    compose = compose_command(engine)
    prom_image = prometheus_image(engine)
    env = {
        **engine.env,
        "COMPOSE_PROFILES": "cpu",
        "API_PORT": f"127.0.0.1:{api_port}",
        "PROMETHEUS_PORT": str(prom_port),
        "PROMETHEUS_IMAGE": prom_image,
    }
    project = ["-p", "kogpt-image-check", "-f", str(COMPOSE_FILE), "--profile", "cpu"]
    services = ["kogpt-cpu", "prometheus"]
    grafana = engine.has_image(GRAFANA_IMAGE) or engine.pull(GRAFANA_IMAGE, timeout=120)
    if grafana:
        env["GRAFANA_IMAGE"] = GRAFANA_IMAGE
        services.append("grafana")
    else:
        log(
            "compose: grafana/grafana cannot be pulled (and Debian has no Grafana): "
            "Grafana is not started"
        )
    api, prom = f"http://127.0.0.1:{api_port}", f"http://127.0.0.1:{prom_port}"
    sh([*compose, *project, "down", "-v"], check=False, capture=True, env=env, timeout=300)
    figures: dict[str, Any] = {"prometheus_image": prom_image, "grafana": grafana}
    try:
        started = time.monotonic()
        sh(
            [*compose, *project, "up", "-d", "--no-build", *services],
            env=env,
            capture=True,
            timeout=600,
        )
        ensure(
            wait_http(f"{api}/health", 240) is not None,
            "compose: the server never answered /health",
        )
        figures["compose_up_to_health_s"] = time.monotonic() - started
        ensure(
            wait_http(f"{prom}/-/ready", 120) is not None, "compose: Prometheus never became ready"
        )
        version = http("GET", f"{prom}/api/v1/status/buildinfo")[1]["data"]["version"]
        log(
            f"compose: server healthy after {figures['compose_up_to_health_s']:.1f} s; "
            f"Prometheus {version} ready"
        )

        deadline = time.monotonic() + 60
        health = None
        while time.monotonic() < deadline:
            targets = http("GET", f"{prom}/api/v1/targets")[1]["data"]["activeTargets"]
            health = [t["health"] for t in targets if t["labels"].get("job") == "kogpt-serve"]
            if health == ["up"]:
                break
            time.sleep(1)
        ensure(health == ["up"], f"compose: Prometheus scrape of kogpt:8000 is {health}")
        log("compose: Prometheus scrapes the server (target kogpt:8000 up)")

        # Bounded traffic, so that every panel has data: generations, a stream, an OpenAI
        # completion, and one rejected request (the errors panel).
        for _ in range(3):
            http(
                "POST", f"{api}/generate", {"inputs": PROMPT, "parameters": {"max_new_tokens": 16}}
            )
        stream(f"{api}/generate_stream", {"inputs": PROMPT, "parameters": {"max_new_tokens": 16}})
        http("POST", f"{api}/v1/completions", {"prompt": PROMPT, "max_tokens": 8})
        http("POST", f"{api}/generate", {"inputs": PROMPT, "parameters": {"max_new_tokens": -1}})
        time.sleep(12)  # two scrapes (every 5 s) after the traffic, for rate() and increase()
        http("POST", f"{api}/generate", {"inputs": PROMPT, "parameters": {"max_new_tokens": 16}})
        time.sleep(11)

        answered, empty, errors = 0, [], []
        queries = dashboard_exprs()
        for title, expr in queries:
            status, series, error = prometheus_query(prom, grafana_vars(expr))
            if status != "success":
                errors.append(f"{title}: {error}")
            elif series == 0:
                empty.append(title)
            else:
                answered += 1
        ensure(not errors, "compose: dashboard queries Prometheus rejects:\n" + "\n".join(errors))
        dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
        for var in dashboard.get("templating", {}).get("list", []):
            if var.get("type") != "query":
                continue
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            match = re.match(r"label_values\((.*),\s*(\w+)\)$", query.strip())
            ensure(match is not None, f"variable {var['name']}: {query}")
            selector = grafana_vars(match.group(1))
            url = f"{prom}/api/v1/label/{match.group(2)}/values?" + urllib.parse.urlencode(
                {"match[]": selector}
            )
            values = http("GET", url)[1]["data"]
            ensure(bool(values), f"dashboard variable {var['name']}: no values for {query}")
            log(f"compose: dashboard variable {var['name']} = {values}")
        rules = http("GET", f"{prom}/api/v1/rules")[1]["data"]["groups"]
        bad = [r["name"] for g in rules for r in g["rules"] if r.get("health") == "err"]
        expected = sum(
            len(re.findall(r"^\s*- alert:", p.read_text(encoding="utf-8"), re.M))
            for p in RULES_DIR.glob("*.yml")
        )
        loaded = sum(len(g["rules"]) for g in rules)
        ensure(
            loaded == expected and not bad,
            f"compose: {loaded}/{expected} alert rules loaded, failing: {bad}",
        )
        log(
            f"compose: {answered}/{len(queries)} dashboard queries return series; "
            f"empty: {empty or 'none'}"
        )
        log(f"compose: {loaded} alert rules loaded and evaluated without error")
        unexpected = [t for t in empty if t.rsplit(" [", 1)[0] not in EXPECTED_EMPTY_PANELS]
        ensure(not unexpected, f"compose: dashboard panels without data: {unexpected}")
        figures.update(
            dashboard_queries=len(queries), dashboard_answered=answered, dashboard_empty=empty
        )

        container = engine.out(
            "ps",
            "-a",
            "--filter",
            "label=com.docker.compose.service=kogpt-cpu",
            "--format",
            "{{.Names}}",
        )
        if not container:  # podman-compose labels
            container = engine.out(
                "ps", "-a", "--filter", "name=kogpt-image-check_kogpt-cpu", "--format", "{{.Names}}"
            )
        sh([*compose, *project, "stop", "kogpt-cpu"], env=env, capture=True, timeout=120)
        exit_code = engine.out(
            "inspect", "--format", "{{.State.ExitCode}}", container.splitlines()[0]
        )
        ensure(exit_code == "0", f"compose: the server exited with {exit_code}")
        log("compose: `stop` drains the server: exit code 0")
        return figures
    finally:
        sh([*compose, *project, "down", "-v"], check=False, capture=True, env=env, timeout=300)


# -- main ----------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", choices=("auto", "docker", "podman"), default="auto")
    parser.add_argument("--base", choices=("auto", "python", "debian"), default="auto")
    parser.add_argument("--tag", default="kogpt-serve:cpu")
    parser.add_argument(
        "--context",
        type=Path,
        default=REPO,
        help="build context with the Dockerfile (default: this checkout)",
    )
    parser.add_argument(
        "--torch-wheels", type=Path, default=Path(os.environ.get("TORCH_WHEELS", "/opt/wheels"))
    )
    parser.add_argument(
        "--index-url",
        default="https://pypi.org/simple",
        help="torch's dependencies, with --torch-wheels",
    )
    parser.add_argument("--no-cache", action="store_true", help="a cold build (the base stays)")
    parser.add_argument("--rebuild-base", action="store_true")
    parser.add_argument("--checkpoint", type=Path, default=CHECKPOINT)
    parser.add_argument("--skip-checkpoint", action="store_true")
    parser.add_argument("--skip-compose", action="store_true")
    parser.add_argument("--port", type=int, default=18080, help="first of the 127.0.0.1 ports used")
    args = parser.parse_args(argv)

    report: dict[str, Any] = {"load_average_at_start": os.getloadavg()[0]}
    started = time.monotonic()
    try:
        engine = choose_engine(args.engine)
        report["engine"] = engine.out("--version")
        log(f"engine: {report['engine']}")
        base = choose_base(engine, args.base, args.rebuild_base)
        report["base"] = base
        torch_args = torch_build_args(args.context, args.torch_wheels, args.index_url)
        report["build_s"] = build(
            engine, args.context, args.tag, base, torch_args, args.no_cache, "build.log"
        )
        report["build_cold"] = args.no_cache
        log(
            f"build: {report['build_s']:.0f} s "
            f"({'--no-cache' if args.no_cache else 'with the layer cache'})"
        )
        report["rebuild_cached_s"] = build(
            engine, args.context, args.tag, base, torch_args, False, "rebuild.log"
        )
        log(f"build again (layer cache): {report['rebuild_cached_s']:.1f} s")
        report["image_bytes"] = int(
            engine.out("image", "inspect", "--format", "{{.Size}}", args.tag)
        )
        log(f"image: {args.tag}, {report['image_bytes'] / 1e9:.2f} GB")
        healthcheck_interval(engine, args.tag)

        scenarios = [Scenario("embedded", [], "kogpt2-mini", hangul=True)]
        if not args.skip_checkpoint:
            checkpoint = args.checkpoint.resolve()
            readable_checkpoint(checkpoint)
            mount = f"/models/{checkpoint.name}"
            scenarios.append(
                Scenario(
                    "checkpoint",
                    ["-v", f"{checkpoint}:{mount}:ro", "-e", f"KOGPT_MODEL={mount}"],
                    checkpoint.name,
                    hangul=False,
                )
            )
        for i, scenario in enumerate(scenarios):
            report[scenario.label] = run_scenario(engine, args.tag, scenario, args.port + i)
        if not args.skip_compose:
            report["compose"] = check_compose(engine, args.tag, args.port + 10, args.port + 11)
    except CheckFailed as failure:
        log(f"FAILED: {failure}")
        return 1
    finally:
        report["total_s"] = time.monotonic() - started
        report["load_average_at_end"] = os.getloadavg()[0]
        WORK.mkdir(parents=True, exist_ok=True)
        (WORK / "report.json").write_text(
            json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )
    log("passed; figures in " + str(WORK / "report.json"))
    print(json.dumps(report, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
