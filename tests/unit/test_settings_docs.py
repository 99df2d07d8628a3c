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
