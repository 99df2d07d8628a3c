"""Shared fixtures: a tiny random GPT-2 with a real byte-level BPE tokenizer (fast tests)."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import settings
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

# CI replays the same examples every run (no flaky discoveries); locally hypothesis explores.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.fixture(scope="session")
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    from tests.unit.test_detokenizer import build_tokenizer

    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_model(tiny_tokenizer: PreTrainedTokenizerFast) -> GPT2LMHeadModel:
    """float64 so engine output must equal model.generate exactly."""
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=2,
        n_embd=64,
        n_head=4,
        vocab_size=len(tiny_tokenizer),
        n_positions=128,
        bos_token_id=1,
        eos_token_id=1,
        pad_token_id=3,
    )
    return GPT2LMHeadModel(config).eval().double()
