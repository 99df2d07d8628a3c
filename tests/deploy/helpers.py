"""Shared readers for the deployment checks: Dockerfile, YAML, settings, PromQL."""

from __future__ import annotations

import json
import os
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from app.config import Settings

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
DOCKER_DIR = REPO / "docker"
COMPOSE_FILE = DOCKER_DIR / "compose.yaml"
K8S_DIR = DOCKER_DIR / "k8s"
DASHBOARD_FILE = DOCKER_DIR / "grafana" / "dashboards" / "kogpt-serve.json"
ALERTS_DIR = DOCKER_DIR / "prometheus" / "rules"
ENV_PREFIX = "KOGPT_"

# Directories never searched for YAML (virtualenvs, VCS data, build output, tool caches).
SKIP_DIRS = {
    ".git",
    ".venv",
    ".venv-clients",
    "venv",
    "node_modules",
    "build",
    "dist",
    "__pycache__",
    ".pytest_cache",
    ".ruff_cache",
    ".hypothesis",
    ".mypy_cache",
    ".tox",
}


def load_yaml(path: Path) -> Any:
    with path.open(encoding="utf-8") as f:
        return yaml.safe_load(f)


def load_yaml_docs(path: Path) -> list[Any]:
    with path.open(encoding="utf-8") as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def yaml_files() -> list[Path]:
    """Every *.yml / *.yaml file of the repository, outside the SKIP_DIRS."""
    found = []
    for root, dirs, files in os.walk(REPO):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.endswith(".egg-info"))
        found += [Path(root) / f for f in sorted(files) if f.endswith((".yml", ".yaml"))]
    return found


# -- settings --------------------------------------------------------------------------------
def setting_name(env_name: str) -> str:
    """KOGPT_MAX_NUM_SEQS -> max_num_seqs."""
    assert env_name.startswith(ENV_PREFIX), env_name
    return env_name[len(ENV_PREFIX) :].lower()


def unknown_settings(env_names: Any) -> list[str]:
    return sorted(
        name
        for name in env_names
        if name.startswith(ENV_PREFIX) and setting_name(name) not in Settings.model_fields
    )


def settings_from_env(monkeypatch: pytest.MonkeyPatch, env: dict[str, str | None]) -> Settings:
    """Build Settings exactly as the server does: from KOGPT_* environment variables only."""
    for name in list(os.environ):
        if name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)
    for name, value in env.items():
        if name.startswith(ENV_PREFIX) and value is not None:
            monkeypatch.setenv(name, value)
    return Settings()


def default_setting(name: str) -> Any:
    return Settings.model_fields[name].get_default(call_default_factory=True)


_INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}")


def interpolate(value: Any) -> Any:
    """Compose-style ${VAR:-default} with an empty environment: the defaults."""
    if not isinstance(value, str):
        return value
    return _INTERPOLATION.sub(lambda m: m.group(2) or "", value)


def interpolation_names(text: str) -> set[str]:
    return {m.group(1) for m in _INTERPOLATION.finditer(text)}


# -- Dockerfile ------------------------------------------------------------------------------
@dataclass
class Instruction:
    keyword: str
    args: str
    line: int

    def flags_and_rest(self) -> tuple[dict[str, str], str]:
        """Leading --flag=value options (COPY --from=deps ...) and the remaining text."""
        flags: dict[str, str] = {}
        rest = self.args
        while True:
            m = re.match(r"--([a-z-]+)(?:=(\S+))?\s+", rest)
            if not m:
                return flags, rest
            flags[m.group(1)] = m.group(2) or ""
            rest = rest[m.end() :]

    def json_or_words(self) -> list[str]:
        _, rest = self.flags_and_rest()
        rest = rest.strip()
        if rest.startswith("["):
            return list(json.loads(rest))
        return shlex.split(rest)


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def env(self) -> dict[str, str]:
        values: dict[str, str] = {}
        for ins in self.all("ENV"):
            for token in shlex.split(ins.args):
                key, sep, value = token.partition("=")
                assert sep, f"Dockerfile line {ins.line}: use ENV KEY=value ({ins.args!r})"
                values[key] = value
        return values

    def args(self) -> dict[str, str]:
        values = {}
        for ins in self.all("ARG"):
            key, _, value = ins.args.strip().partition("=")
            values[key] = value
        return values


def dockerfile_instructions(path: Path = DOCKERFILE) -> list[Instruction]:
    """Instructions with line continuations joined and comments dropped."""
    out: list[Instruction] = []
    buffer, start = "", 0
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not buffer):
            continue
        if not buffer:
            start = number
        if stripped.endswith("\\"):
            buffer += stripped[:-1] + " "
            continue
        buffer += stripped
        keyword, _, args = buffer.partition(" ")
        out.append(Instruction(keyword.upper(), args.strip(), start))
        buffer = ""
    assert not buffer, "Dockerfile ends inside a line continuation"
    return out


def dockerfile_stages(path: Path = DOCKERFILE) -> tuple[dict[str, str], list[Stage]]:
    """(global ARGs before the first FROM, stages in order)."""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for ins in dockerfile_instructions(path):
        if ins.keyword == "FROM":
            words = ins.args.split()
            name = words[2] if len(words) >= 3 and words[1].lower() == "as" else str(len(stages))
            stages.append(Stage(name=name, base=words[0]))
        elif not stages:
            assert ins.keyword == "ARG", f"line {ins.line}: only ARG may precede FROM"
            key, _, value = ins.args.partition("=")
            global_args[key] = value
        else:
            stages[-1].instructions.append(ins)
    return global_args, stages


# -- PromQL ----------------------------------------------------------------------------------
# Labels Prometheus (or the Kubernetes service discovery) attaches at scrape time.
SCRAPE_LABELS = {"instance", "job", "namespace", "pod", "container", "service"}
# Series Prometheus makes itself for every target.
PROMETHEUS_SERIES = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}
_KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "inf",
    "nan",
    "atan2",
}
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_SELECTOR = re.compile(r"([A-Za-z_:][A-Za-z0-9_:]*)?\s*\{([^}]*)\}")
_MATCHER = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)")
_IDENT = re.compile(r"(?<![\w$.])([A-Za-z_:][A-Za-z0-9_:]*)\b(?!\s*\()")
_LABEL_VALUES = re.compile(r"^\s*label_values\((.*),\s*([A-Za-z_][A-Za-z0-9_]*)\s*\)\s*$", re.S)
_ADAPTER_TEMPLATE = re.compile(r"<<\.[A-Za-z]+>>")


@dataclass
class PromQuery:
    """What one PromQL expression needs from the scraped series."""

    source: str
    expr: str
    metrics: set[str]
    selector_labels: dict[str, set[str]]  # metric -> labels its selectors match on
    grouping_labels: set[str]  # labels of by(...) / without(...) / on(...) clauses


def parse_promql(expr: str, source: str) -> PromQuery:
    text = expr
    m = _LABEL_VALUES.match(text)  # Grafana's label_values(selector, label) variable query
    extra_grouping = set()
    if m:
        text, label = m.group(1), m.group(2)
        extra_grouping.add(label)
    text = _ADAPTER_TEMPLATE.sub("", text)  # prometheus-adapter's <<.Series>> placeholders
    text = _STRING.sub('""', text)
    text = _RANGE.sub("", text)
    grouping = set(extra_grouping)
    for group in _GROUPING.finditer(text):
        grouping |= {g.strip() for g in group.group(1).split(",") if g.strip()}
    text = _GROUPING.sub(" ", text)
    selector_labels: dict[str, set[str]] = {}
    for sel in _SELECTOR.finditer(text):
        if sel.group(1):
            labels = set(_MATCHER.findall(sel.group(2)))
            selector_labels.setdefault(sel.group(1), set()).update(labels)
    text = _SELECTOR.sub(lambda s: f" {s.group(1) or ''} ", text)
    metrics = {name for name in _IDENT.findall(text) if name not in _KEYWORDS}
    return PromQuery(source, expr, metrics, selector_labels, grouping)


def dashboard_queries(dashboard: dict[str, Any]) -> Iterator[PromQuery]:
    def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for panel in items:
            yield panel
            yield from panels(panel.get("panels", []))

    for panel in panels(dashboard.get("panels", [])):
        for target in panel.get("targets", []):
            if target.get("expr"):
                yield parse_promql(target["expr"], f"dashboard panel {panel.get('title')!r}")
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            yield parse_promql(query, f"dashboard variable {var['name']!r}")


def alert_queries() -> Iterator[PromQuery]:
    for path in sorted(ALERTS_DIR.glob("*.yml")):
        for group in load_yaml(path)["groups"]:
            for rule in group["rules"]:
                yield parse_promql(rule["expr"], f"{path.name} rule {rule.get('alert')}")


def autoscaling_queries() -> Iterator[PromQuery]:
    adapter = load_yaml(K8S_DIR / "prometheus-adapter" / "values.yaml")
    for rule in adapter["rules"]["custom"]:
        yield parse_promql(rule["seriesQuery"], "prometheus-adapter seriesQuery")
    keda = load_yaml(K8S_DIR / "extras" / "keda-scaledobject.yaml")
    for trigger in keda["spec"]["triggers"]:
        yield parse_promql(trigger["metadata"]["query"], "KEDA trigger query")
