"""app.modeling.loader on the embedded model, and each ModelLoadError it promises."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from app.modeling.loader import (
    DEFAULT_MODEL_DIR,
    KOGPT2_SPECIAL_TOKENS,
    LoadedModel,
    ModelLoadError,
    load_model,
    resolve_device,
    resolve_dtype,
)

KOGPT2_IDS = {"<s>": 0, "</s>": 1, "<usr>": 2, "<pad>": 3, "<sys>": 4, "<unk>": 5, "<mask>": 6}
HANGUL = re.compile(r"[가-힣]")


@pytest.fixture(scope="session")
def embedded() -> LoadedModel:
    return load_model(str(DEFAULT_MODEL_DIR), device="cpu")


@pytest.fixture
def model_copy(tmp_path: Path) -> Path:
    """A writable copy of the embedded model (weights linked, not copied)."""
    dst = tmp_path / "model"
    dst.mkdir()
    for src in DEFAULT_MODEL_DIR.iterdir():
        if src.name == "model.safetensors":
            (dst / src.name).symlink_to(src)
        elif src.is_file():
            shutil.copyfile(src, dst / src.name)
    return dst


def edit_json(path: Path, change: Callable[[dict], None]) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    change(data)
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")


# --------------------------------------------------------------------------- embedded model


def test_embedded_special_tokens(embedded: LoadedModel) -> None:
    tok = embedded.tokenizer
    assert {t: tok.convert_tokens_to_ids(t) for t in KOGPT2_IDS} == KOGPT2_IDS
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 1, 3)
    assert (tok.unk_token_id, tok.mask_token_id) == (5, 6)
    cfg, gen = embedded.config, embedded.generation_config
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (1, 1, 3)
    assert (gen.bos_token_id, gen.eos_token_id, gen.pad_token_id) == (1, 1, 3)
    assert len(tok) <= cfg.vocab_size


def test_embedded_config_device_dtype(embedded: LoadedModel) -> None:
    assert embedded.config.model_type == "gpt2"
    assert embedded.config.n_positions == 1024
    assert embedded.name == "kogpt2-mini"
    assert embedded.device == torch.device("cpu")
    assert embedded.dtype == torch.float32
    assert next(embedded.model.parameters()).dtype == torch.float32
    assert not embedded.model.training
    assert embedded.model.config is embedded.config


def test_model_card_and_auto_tokenizer_agree(embedded: LoadedModel) -> None:
    """The model card's call, AutoTokenizer and the loader give the same tokenizer."""
    text = "대한민국의 주권은 국민에게 있고, 모든 권력은 국민으로부터 나온다."
    card = PreTrainedTokenizerFast.from_pretrained(DEFAULT_MODEL_DIR, **KOGPT2_SPECIAL_TOKENS)
    auto = AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR)
    for tok in (card, auto):
        assert tok(text).input_ids == embedded.tokenizer(text).input_ids
        assert tok.decode(tok(text).input_ids) == text
        for attr in ("bos", "eos", "unk", "pad", "mask"):
            assert getattr(tok, f"{attr}_token") == KOGPT2_SPECIAL_TOKENS[f"{attr}_token"]
        assert len(tok) == len(embedded.tokenizer)


@pytest.mark.parametrize("no_repeat_ngram_size", [3, None])
def test_embedded_greedy_continues_in_korean(
    embedded: LoadedModel, no_repeat_ngram_size: int | None
) -> None:
    tok = embedded.tokenizer
    ids = tok("대한민국은", return_tensors="pt").input_ids
    with torch.no_grad():
        out = embedded.model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=40,
            no_repeat_ngram_size=no_repeat_ngram_size,
        )
    text = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert "\ufffd" not in text, text
    assert len(HANGUL.findall(text)) >= 10, text


# --------------------------------------------------------------------------- errors


def test_vocab_larger_than_config(model_copy: Path) -> None:
    edit_json(model_copy / "config.json", lambda c: c.update(vocab_size=1000))
    with pytest.raises(ModelLoadError, match=r"(?s)vocab_size 1000.*KoGPT-2 v1.*config\.json"):
        load_model(str(model_copy), device="cpu")


def drop_pad(tok: dict) -> None:
    """Rename <pad> in tokenizer.json (ids stay dense) and drop it from added_tokens."""
    tok["added_tokens"] = [t for t in tok["added_tokens"] if t["content"] != "<pad>"]
    tok["model"]["vocab"]["<nopad>"] = tok["model"]["vocab"].pop("<pad>")


def test_missing_pad_token(model_copy: Path) -> None:
    edit_json(model_copy / "tokenizer.json", drop_pad)
    edit_json(model_copy / "tokenizer_config.json", lambda c: c.pop("pad_token", None))
    edit_json(model_copy / "special_tokens_map.json", lambda c: c.pop("pad_token", None))
    with pytest.raises(ModelLoadError, match=r"tokenizer\.json has no pad token"):
        load_model(str(model_copy), device="cpu")


def test_pad_token_only_in_tokenizer_config_is_rejected(model_copy: Path) -> None:
    """tokenizer_config.json still names <pad>: from_pretrained would add it with a new
    id past the embedding matrix; the loader reports the missing pad token instead."""
    edit_json(model_copy / "tokenizer.json", drop_pad)
    with pytest.raises(ModelLoadError, match="no pad token"):
        load_model(str(model_copy), device="cpu")


def test_unknown_model_type(model_copy: Path) -> None:
    edit_json(model_copy / "config.json", lambda c: c.update(model_type="llama"))
    with pytest.raises(ModelLoadError, match=r"model_type 'llama' is not supported"):
        load_model(str(model_copy), device="cpu")


@pytest.mark.parametrize(
    ("remove", "expected"),
    [
        ("config.json", "config.json"),
        ("model.safetensors", "weights"),
        ("tokenizer.json", "tokenizer.json"),
    ],
)
def test_missing_files(model_copy: Path, remove: str, expected: str) -> None:
    (model_copy / remove).unlink()
    with pytest.raises(ModelLoadError, match=rf"is missing .*{re.escape(expected)}"):
        load_model(str(model_copy), device="cpu")


def test_weights_missing_a_tensor(model_copy: Path) -> None:
    weights = model_copy / "model.safetensors"
    tensors = load_file(weights)
    del tensors["transformer.h.0.mlp.c_fc.weight"]
    weights.unlink()  # a link to the embedded model's file: never write through it
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"lack or mis-shape .*h\.0\.mlp\.c_fc\.weight"):
        load_model(str(model_copy), device="cpu")


@pytest.mark.parametrize("spec", ["/no/such/dir", "./missing-model", "not a hub id!", "a/b/c"])
def test_neither_directory_nor_hub_id(spec: str) -> None:
    with pytest.raises(ModelLoadError, match="neither an existing directory nor"):
        load_model(spec, device="cpu")


def test_file_instead_of_directory() -> None:
    with pytest.raises(ModelLoadError, match="is a file"):
        load_model(str(DEFAULT_MODEL_DIR / "config.json"), device="cpu")


# --------------------------------------------------------------------------- device / dtype


def test_resolve_device_and_dtype() -> None:
    cpu = torch.device("cpu")
    assert resolve_device("cpu") == cpu
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("bfloat16", cpu) == torch.bfloat16
    assert resolve_dtype("float16", cpu) == torch.float16
    assert resolve_dtype("float64", cpu) == torch.float64
    assert resolve_dtype("float32", cpu) == torch.float32
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        resolve_dtype("int8", cpu)
    with pytest.raises(ModelLoadError, match="unknown device"):
        resolve_device("tpu:0")
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="CUDA is not available"):
            resolve_device("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_resolve_dtype_auto_on_gpu() -> None:
    expected = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    assert resolve_dtype("auto", torch.device("cuda")) == expected


def test_explicit_dtype_override(model_copy: Path) -> None:
    loaded = load_model(str(model_copy), device="cpu", dtype="bfloat16")
    assert loaded.dtype == torch.bfloat16
    assert next(loaded.model.parameters()).dtype == torch.bfloat16
