"""LoRA adapters (app/modeling/lora.py) against peft itself, in float64 on the embedded model:
the per-row update equals peft's LoRA layer, a batch mixing adapters and the base equals each
adapter's merged model row by row, and adapters that cannot serve this base are refused at
load with the reason. The adapters are made here by peft with random weights
(``init_lora_weights=False``); no hub."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel

from app.modeling.lora import (
    GPT2_LORA_MODULES,
    LoRAAdapter,
    LoRALoadError,
    add_lora,
    load_lora_adapter,
    plan_lora_rows,
)
from tests import lora_helpers
from tests.lora_helpers import EMBEDDED, base_model, merged_model

ADAPTERS = {
    # name: (rank, alpha, target modules, rslora)
    "poem": (4, 8, ["c_attn"], False),
    "chat": (16, 8, ["c_attn", "c_proj", "c_fc"], True),
    "wide": (64, 32, ["c_attn", "c_proj", "c_fc"], False),
}


def make_adapter(
    folder: Path, seed: int, rank: int, alpha: int, targets: list[str], rslora: bool
) -> Path:
    return lora_helpers.make_adapter(folder, seed, rank, alpha, targets, use_rslora=rslora)


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lora")
    return {
        name: make_adapter(root / name, seed, *spec)
        for seed, (name, spec) in enumerate(ADAPTERS.items())
    }


@pytest.fixture(scope="module")
def loaded(adapter_dirs: dict[str, Path]) -> dict[str, LoRAAdapter]:
    config = GPT2Config.from_pretrained(EMBEDDED)
    return {
        name: load_lora_adapter(name, path, config).to("cpu", torch.float64)
        for name, path in adapter_dirs.items()
    }


def test_loaded_shapes_ranks_and_scaling(loaded: dict[str, LoRAAdapter]) -> None:
    assert loaded["poem"].rank == 4 and loaded["wide"].rank == 64
    assert {module for _, module in loaded["poem"].weights} == {"attn.c_attn"}
    assert {module for _, module in loaded["chat"].weights} == set(GPT2_LORA_MODULES)
    assert loaded["poem"].weights[(0, "attn.c_attn")].scaling == 8 / 4
    assert loaded["chat"].weights[(0, "mlp.c_fc")].scaling == pytest.approx(8 / 16**0.5)


@pytest.mark.parametrize("module", GPT2_LORA_MODULES)
def test_update_equals_peft_lora_layer(
    adapter_dirs: dict[str, Path], loaded: dict[str, LoRAAdapter], module: str
) -> None:
    peft_model = PeftModel.from_pretrained(base_model(), adapter_dirs["chat"]).eval()
    block = peft_model.base_model.model.transformer.h[1]
    layer = block.get_submodule(module)
    fan_in = layer.base_layer.weight.shape[0]
    x = torch.randn(5, fan_in, dtype=torch.float64)
    with torch.no_grad():
        expected = layer(x)
        y = layer.base_layer(x)
    plan = plan_lora_rows([loaded["chat"]] * 5, "cpu")
    torch.testing.assert_close(add_lora(y, x, plan, 1, module), expected, rtol=0, atol=1e-12)


class _HookedBase:
    """The base model with ``add_lora`` hooked after every Conv1D, for one row plan."""

    def __init__(self, model: GPT2LMHeadModel) -> None:
        self.model = model
        self.plan: list = []
        for index, block in enumerate(model.transformer.h):
            for module in GPT2_LORA_MODULES:
                block.get_submodule(module).register_forward_hook(self._hook(index, module))

    def _hook(self, layer: int, module: str):
        def hook(
            _mod: torch.nn.Module, inputs: tuple[torch.Tensor], output: torch.Tensor
        ) -> torch.Tensor:
            x = inputs[0]
            flat_x, flat_y = (
                x.reshape(-1, x.shape[-1]),
                output.reshape(-1, output.shape[-1]).clone(),
            )
            return add_lora(flat_y, flat_x, self.plan, layer, module).reshape(output.shape)

        return hook


@pytest.fixture(scope="module")
def hooked() -> Iterator[_HookedBase]:
    yield _HookedBase(base_model())


def test_mixed_batch_equals_each_merged_model(
    adapter_dirs: dict[str, Path], loaded: dict[str, LoRAAdapter], hooked: _HookedBase
) -> None:
    """Four rows (base, poem, chat, wide) through one forward: each row's logits equal its
    own adapter's merged model (peft merge_and_unload), the base row the base model's."""
    torch.manual_seed(0)
    ids = torch.randint(5, 1000, (4, 12))
    names: list[str | None] = [None, "poem", "chat", "wide"]
    row_adapters = [loaded[n] if n else None for n in names for _ in range(ids.shape[1])]
    hooked.plan = plan_lora_rows(row_adapters, "cpu")
    with torch.no_grad():
        mixed = hooked.model(ids).logits
        for row, name in enumerate(names):
            reference = merged_model(adapter_dirs[name]) if name else base_model()
            expected = reference(ids[row : row + 1]).logits[0]
            torch.testing.assert_close(mixed[row], expected, rtol=0, atol=1e-9)


def test_one_adapter_for_every_row_needs_no_gather(loaded: dict[str, LoRAAdapter]) -> None:
    plan = plan_lora_rows([loaded["poem"]] * 3, "cpu")
    assert len(plan) == 1 and plan[0].rows is None
    assert plan_lora_rows([None, None], "cpu") == []
    mixed = plan_lora_rows([None, loaded["poem"], loaded["chat"], loaded["poem"]], "cpu")
    assert [(g.adapter.name, g.rows.tolist()) for g in mixed] == [("poem", [1, 3]), ("chat", [2])]


def test_not_a_peft_adapter(tmp_path: Path) -> None:
    with pytest.raises(LoRALoadError, match=r"no adapter_config\.json"):
        load_lora_adapter("x", tmp_path, GPT2Config.from_pretrained(EMBEDDED))
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "PROMPT_TUNING"}))
    with pytest.raises(LoRALoadError, match="not LORA"):
        load_lora_adapter("x", tmp_path, GPT2Config.from_pretrained(EMBEDDED))


def test_adapter_of_another_base_shape_is_refused(tmp_path: Path) -> None:
    other = GPT2LMHeadModel(GPT2Config(n_embd=128, n_layer=2, n_head=4, vocab_size=100))
    peft_model = get_peft_model(
        other, LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True)
    )
    peft_model.save_pretrained(tmp_path)
    with pytest.raises(LoRALoadError, match="another base model"):
        load_lora_adapter("x", tmp_path, GPT2Config.from_pretrained(EMBEDDED))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"use_dora": True}, "DoRA"),
        ({"bias": "all"}, "bias='all'"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"r": 128, "lora_alpha": 128}, "ranks 1..64"),
    ],
)
def test_unsupported_adapter_configs_are_refused(
    tmp_path: Path, adapter_dirs: dict[str, Path], change: dict, message: str
) -> None:
    if change.get("r") == 128:
        folder = make_adapter(tmp_path / "big", 9, 128, 128, ["c_attn"], False)
    else:
        folder = tmp_path / "edited"
        folder.mkdir()
        source = adapter_dirs["poem"]
        config = json.loads((source / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps({**config, **change}))
        (folder / "adapter_model.safetensors").write_bytes(
            (source / "adapter_model.safetensors").read_bytes()
        )
    with pytest.raises(LoRALoadError, match=message):
        load_lora_adapter("x", folder, GPT2Config.from_pretrained(EMBEDDED))
