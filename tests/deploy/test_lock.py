"""The committed lock (requirements/*.lock): complete, hashed, torch-free, consistent with
pyproject's ranges, pinning the transformers whose generate the engine matches, and what
`make install` really installed."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from app.engine.transformers_version import MATCHED_TRANSFORMERS
from tests.deploy.helpers import REPO

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

LOCK_DIR = REPO / "requirements"
# The platform the lock is resolved for (Makefile UV_COMPILE): markers are read for it.
LOCK_ENV = {"python_version": "3.11", "sys_platform": "linux", "platform_machine": "x86_64"}
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)")


def read_lock(name: str) -> dict[str, str]:
    """canonical name -> pinned version; every pin must carry at least one sha256 hash."""
    pins: dict[str, str] = {}
    current: str | None = None
    hashed: set[str] = set()
    for line in (LOCK_DIR / name).read_text(encoding="utf-8").splitlines():
        if match := PIN.match(line):
            current = canonicalize_name(match.group(1))
            assert current not in pins, f"{name}: {current} pinned twice"
            pins[current] = match.group(2)
        elif current and line.strip().startswith("--hash=sha256:"):
            hashed.add(current)
    assert pins, f"{name} pins nothing"
    assert set(pins) == hashed, f"{name}: pins without a hash: {sorted(set(pins) - hashed)}"
    return pins


def project() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))


def wanted(requirements: list[str]) -> list[Requirement]:
    reqs = [Requirement(r) for r in requirements]
    return [r for r in reqs if r.marker is None or r.marker.evaluate(LOCK_ENV)]


def assert_satisfied(requirements: list[Requirement], pins: dict[str, str], lock: str) -> None:
    for req in requirements:
        name = canonicalize_name(req.name)
        if name == "torch":
            assert name not in pins, f"{lock} must not pin torch (TORCH_SPEC chooses its build)"
            continue
        assert name in pins, f"{lock} misses {req.name}"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"{lock}: {name}=={pins[name]} is outside pyproject's {req}"
        )


@pytest.mark.parametrize(
    "lock", ["runtime.lock", "dev.lock", "build.lock", "no-deps.lock", "clients.lock"]
)
def test_every_pin_is_hashed_and_torch_stays_out(lock: str) -> None:
    pins = read_lock(lock)
    assert "torch" not in pins
    # Triton has its own lock: CUDA torch pins its matched build, a CPU torch has none.
    cuda_only = [n for n in pins if n.startswith("nvidia-") or n == "triton"]
    assert not cuda_only, f"{lock} was resolved against a CUDA torch: {cuda_only}"


def test_triton_lock_holds_triton_alone() -> None:
    assert set(read_lock("triton.lock")) == {"triton"}


def test_lock_pins_the_transformers_the_engine_matches() -> None:
    assert read_lock("runtime.lock")["transformers"] == MATCHED_TRANSFORMERS
    assert read_lock("dev.lock")["transformers"] == MATCHED_TRANSFORMERS


def test_locks_satisfy_pyproject_ranges() -> None:
    meta = project()
    runtime, dev = read_lock("runtime.lock"), read_lock("dev.lock")
    assert_satisfied(wanted(meta["project"]["dependencies"]), runtime, "runtime.lock")
    extras = meta["project"]["optional-dependencies"]
    everything = meta["project"]["dependencies"] + extras["dev"] + extras["bench"]
    assert_satisfied(wanted(everything), dev, "dev.lock")
    build_system = wanted(meta["build-system"]["requires"])
    assert_satisfied(build_system, read_lock("build.lock"), "build.lock")
    assert_satisfied(build_system, dev, "dev.lock")


def test_the_image_runs_the_versions_ci_tested() -> None:
    runtime, dev = read_lock("runtime.lock"), read_lock("dev.lock")
    differ = {n: (v, dev.get(n)) for n, v in runtime.items() if dev.get(n) != v}
    assert not differ, f"runtime.lock and dev.lock disagree: {differ}"


def test_the_installed_environment_is_the_lock() -> None:
    """What `make install` put in .venv is exactly dev.lock (+ no-deps.lock, + triton.lock
    when torch brought no Triton of its own)."""
    if Path(sys.prefix).resolve() != (REPO / ".venv").resolve():
        pytest.skip("not running in the repository's .venv (make install)")
    pins = {**read_lock("dev.lock"), **read_lock("no-deps.lock")}
    if "+cpu" in version("torch"):
        pins.update(read_lock("triton.lock"))
    wrong: dict[str, tuple[str, str | None]] = {}
    for name, pinned in pins.items():
        try:
            installed: str | None = version(name)
        except PackageNotFoundError:
            installed = None
        if installed != pinned:
            wrong[name] = (pinned, installed)
    assert not wrong, f"installed versions differ from the lock (pinned, installed): {wrong}"


@pytest.mark.parametrize("doc", ["README.md", "docs/api.md", "docs/options.md"])
def test_docs_name_the_matched_transformers(doc: str) -> None:
    text = (REPO / doc).read_text(encoding="utf-8")
    assert f"transformers {MATCHED_TRANSFORMERS}" in text or MATCHED_TRANSFORMERS in text
    named = set(re.findall(r"transformers\**\s+\**(5\.\d+\.\d+)", text))
    assert named <= {MATCHED_TRANSFORMERS}, f"{doc} names another transformers: {named}"


def test_the_clients_environment_is_its_lock() -> None:
    """.venv-clients (make clients, part of make test) holds exactly clients.lock."""
    python = REPO / ".venv-clients" / "bin" / "python"
    if not python.exists():
        pytest.skip("no .venv-clients (make clients)")
    script = (
        "import json, importlib.metadata as m;"
        "print(json.dumps({d.metadata['Name']: d.version for d in m.distributions()}))"
    )
    out = subprocess.run([str(python), "-c", script], capture_output=True, text=True, check=True)
    installed = {canonicalize_name(k): v for k, v in json.loads(out.stdout).items()}
    wrong = {
        n: (v, installed.get(n))
        for n, v in read_lock("clients.lock").items()
        if installed.get(n) != v
    }
    assert not wrong, f".venv-clients differs from clients.lock (pinned, installed): {wrong}"
