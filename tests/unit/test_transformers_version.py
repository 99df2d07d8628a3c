"""The matched transformers release: named at start, warned about when another is installed."""

from __future__ import annotations

import logging

import pytest
import transformers

import app.engine.transformers_version as tv
from app.config import Settings
from app.state import build_state, info_dict


def test_no_warning_for_the_matched_release() -> None:
    assert tv.transformers_mismatch(tv.MATCHED_TRANSFORMERS) is None


def test_another_release_is_named_in_the_warning() -> None:
    message = tv.transformers_mismatch("5.99.0")
    assert message is not None
    assert "5.99.0" in message and tv.MATCHED_TRANSFORMERS in message
    assert "upstream-check" in message


def test_installed_version_is_the_importable_one() -> None:
    assert tv.installed_transformers() == transformers.__version__


@pytest.mark.parametrize("installed", [tv.MATCHED_TRANSFORMERS, "5.99.0"])
def test_start_up_logs_the_matched_release_and_still_serves(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, installed: str
) -> None:
    monkeypatch.setattr(tv, "installed_transformers", lambda: installed)
    monkeypatch.setattr("app.state.installed_transformers", lambda: installed)
    with caplog.at_level(logging.INFO, logger="kogpt.server"):
        state = build_state(Settings(num_kv_blocks=64, max_num_seqs=2))
    assert f"generate semantics of transformers {tv.MATCHED_TRANSFORMERS}" in caplog.text
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert bool(warnings) == (installed != tv.MATCHED_TRANSFORMERS)
    info = info_dict(state)
    assert info["transformers_version"] == installed
    assert info["generate_matches_transformers"] == tv.MATCHED_TRANSFORMERS
