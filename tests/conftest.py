"""Shared fixtures: a tiny random GPT-2 with a real byte-level BPE tokenizer (fast tests)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

# Without CUDA, Triton kernels run through Triton's interpreter on CPU tensors (the GPU decode
# attention's tests, issue #22). @triton.jit picks the interpreter when a kernel is defined,
# and importing transformers' models imports triton: so here, before that import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

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


# A small random GPT-2 with a peaky distribution (top-k / top-p and penalties remove real
# probability mass), in float64 so sampler results must equal generate's exactly.
PEAKY_VOCAB, PEAKY_POSITIONS, PEAKY_EOS = 300, 128, 1


@pytest.fixture(scope="session")
def peaky_model() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=2,
        n_embd=64,
        n_head=4,
        vocab_size=PEAKY_VOCAB,
        n_positions=PEAKY_POSITIONS,
        bos_token_id=PEAKY_EOS,
        eos_token_id=PEAKY_EOS,
        initializer_range=0.2,
    )
    return GPT2LMHeadModel(config).double().eval()


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """The tiny models are dominated by thread overhead, badly so on a shared 2-core box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
