"""yamllint over every YAML file of the repository, with the repository's .yamllint."""

from __future__ import annotations

import pytest
from yamllint import linter
from yamllint.config import YamlLintConfig

from tests.deploy.helpers import DOCKER_DIR, REPO, yaml_files


@pytest.fixture(scope="module")
def config() -> YamlLintConfig:
    return YamlLintConfig(file=str(REPO / ".yamllint"))


def test_the_deployment_yaml_is_found() -> None:
    files = {p.relative_to(REPO).as_posix() for p in yaml_files()}
    expected = {p.relative_to(REPO).as_posix() for p in DOCKER_DIR.rglob("*.y*ml")}
    assert "docker/compose.yaml" in expected
    assert expected <= files


def test_yamllint_is_clean(config: YamlLintConfig) -> None:
    findings = []
    for path in yaml_files():
        relative = path.relative_to(REPO).as_posix()
        if config.is_file_ignored(relative):
            continue
        text = path.read_text(encoding="utf-8")
        for problem in linter.run(text, config, relative):
            findings.append(
                f"{relative}:{problem.line}:{problem.column} [{problem.level}] "
                f"{problem.desc} ({problem.rule})"
            )
    assert not findings, "yamllint:\n" + "\n".join(findings)
