"""Every setting is a CLI flag, an env var, and a row of the README's configuration table."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.cli import build_parser, parse_settings
from app.config import Settings

README = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")


@pytest.mark.parametrize("name", list(Settings.model_fields))
def test_setting_is_documented_and_a_flag(name: str) -> None:
    flag = "--" + name.replace("_", "-")
    assert f"`KOGPT_{name.upper()}`" in README, f"README lacks KOGPT_{name.upper()}"
    assert flag in build_parser().format_help()


def test_cli_flags_and_env_vars_reach_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KOGPT_PORT", "9100")
    settings = parse_settings(["--max-num-seqs", "8", "--no-enable-prefix-caching"])
    assert (settings.port, settings.max_num_seqs, settings.enable_prefix_caching) == (
        9100,
        8,
        False,
    )


def test_several_models_and_adapters(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """--model repeated (KOGPT_MODEL a comma list): NAME=PATH entries or a bare path (named
    after its directory; a path holding "=" stays a path); vLLM's --lora-modules NAME=PATH
    and JSON entries with base_model_name."""
    odd = tmp_path / "run=3"
    odd.mkdir()
    settings = parse_settings(
        ["--model", "models/kogpt2-mini", "--model", "chat=/m/chat", "--model", str(odd)]
    )
    assert [(s.name, s.path, s.named) for s in settings.model_specs] == [
        ("kogpt2-mini", "models/kogpt2-mini", False),
        ("chat", "/m/chat", True),
        ("run=3", str(odd), False),
    ]
    assert settings.served_model_names == ["kogpt2-mini"]
    monkeypatch.setenv("KOGPT_MODEL", "base=/m/base, poem=/m/poem")
    settings = parse_settings(["--served-model-name", "kogpt2"])
    assert [s.name for s in settings.model_specs] == ["base", "poem"]
    assert settings.served_model_names == ["kogpt2", "base"]  # the NAME= name stays an alias
    for bad, words in (
        ("a=/x,a=/y", "two models are named"),
        ("=/x", "NAME=PATH"),
        ("a,", "empty"),
    ):
        with pytest.raises(ValueError, match=words):
            Settings(model=bad)
    modules = parse_settings(
        [
            "--lora-modules",
            "poem=/a/poem",
            '{"name": "verse", "path": "/a/v", "base_model_name": "chat"}',
        ]
    ).lora_module_paths
    assert {k: (m.path, m.base_model_name) for k, m in modules.items()} == {
        "poem": ("/a/poem", None),
        "verse": ("/a/v", "chat"),
    }
    for bad in ('{"name": "x"}', "poem", '{"name": "x", "path": "/p", "other": 1}'):
        with pytest.raises(ValueError, match="lora_modules"):
            Settings(lora_modules=bad)
