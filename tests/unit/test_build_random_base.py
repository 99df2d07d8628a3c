"""models/build_random_base.py writes a loadable checkpoint of skt/kogpt2-base-v2's shape."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

from app.modeling.loader import load_model

SCRIPT = Path(__file__).resolve().parents[2] / "models" / "build_random_base.py"


def test_build_random_base(tmp_path: Path) -> None:
    # In-process (the script is not a package module): saves a second transformers import.
    spec = importlib.util.spec_from_file_location("build_random_base", SCRIPT)
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "kogpt2-base-random"
    assert script.main(["--out", str(out), "--seed", "0"]) == 0

    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    shape = {k: config[k] for k in ("n_layer", "n_embd", "n_head", "vocab_size", "n_positions")}
    assert shape == {
        "n_layer": 12,
        "n_embd": 768,
        "n_head": 12,
        "vocab_size": 51200,
        "n_positions": 1024,
    }
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 1, 3)
    assert config["model_type"] == "gpt2"

    loaded = load_model(str(out), device="cpu")
    assert sum(p.numel() for p in loaded.model.parameters()) > 120_000_000
    assert loaded.tokenizer.pad_token_id == 3 and loaded.tokenizer.eos_token_id == 1
    ids = loaded.tokenizer("대한민국은", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = loaded.model(ids).logits
    assert logits.shape == (1, ids.shape[1], 51200)
