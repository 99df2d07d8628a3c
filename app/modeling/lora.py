"""LoRA adapters in peft's format for GPT-2's Conv1D layers, applied per row in a mixed batch.

A batch can hold rows of several adapters and of the base model. The base matmul runs once
over every row (app/modeling/linear.py); each adapter present then adds its low-rank update
to its own rows only, one pair of small matmuls per adapter over the rows it owns (the
segmented gather of punica / S-LoRA: on a CPU one gathered matmul per adapter beats a
per-row weight gather, which would copy an [in, r] matrix per row).

The update is peft's unmerged LoRA forward, op for op: ``y + lora_B(lora_A(x)) * scaling``
with ``scaling = lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``), per-module ranks and
alphas from ``rank_pattern`` / ``alpha_pattern``. peft stores ``lora_A.weight`` as
``[r, in]`` and ``lora_B.weight`` as ``[out, r]`` for GPT-2's Conv1D too (``fan_in_fan_out``
only concerns the base weight), so the update is ``(x @ A.T) @ B.T * scaling``.

Not supported, refused at load with the reason: DoRA, LoRA biases (``bias`` other than
"none", ``lora_bias``), ``modules_to_save``, trainable tokens, ranks above
``MAX_LORA_RANK``, target modules that are not GPT-2's Conv1D layers.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

# GPT-2's Conv1D layers, as peft names them under ``transformer.h.<i>.``.
GPT2_LORA_MODULES = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
MAX_LORA_RANK = 64
_KEY = re.compile(
    r"^(?:base_model\.model\.)?transformer\.h\.(\d+)\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)"
    r"\.lora_([AB])(?:\.[^.]+)?\.weight$"
)


class LoRALoadError(ValueError):
    """The path is not a usable peft LoRA adapter for this base model (message: why)."""


@dataclass(frozen=True)
class LoRAWeights:
    """One Conv1D layer's update: ``(x @ a) @ b * scaling``."""

    a: torch.Tensor  # [in, r]: peft's lora_A.weight transposed
    b: torch.Tensor  # [r, out]: peft's lora_B.weight transposed
    scaling: float


@dataclass
class LoRAAdapter:
    """A loaded adapter: its name, rank and the updates of the layers it targets."""

    name: str
    path: str
    rank: int
    weights: dict[tuple[int, str], LoRAWeights] = field(default_factory=dict)
    base_model_name_or_path: str | None = None

    @property
    def nbytes(self) -> int:
        return sum(w.a.nbytes + w.b.nbytes for w in self.weights.values())

    def to(self, device: torch.device | str, dtype: torch.dtype) -> LoRAAdapter:
        moved = {
            key: LoRAWeights(w.a.to(device, dtype), w.b.to(device, dtype), w.scaling)
            for key, w in self.weights.items()
        }
        return LoRAAdapter(self.name, self.path, self.rank, moved, self.base_model_name_or_path)


def _module_pattern_value(pattern: Mapping[str, Any], layer: int, module: str, default: Any) -> Any:
    """peft's rank_pattern / alpha_pattern: a key matches a module name's suffix or regex."""
    name = f"transformer.h.{layer}.{module}"
    for key, value in pattern.items():
        if re.fullmatch(rf"(.*\.)?{key}", name) or name.endswith(key):
            return value
    return default


def _expected_shapes(config: Any) -> dict[str, tuple[int, int]]:
    """(in, out) of each Conv1D layer of a GPT-2 config."""
    n_embd = int(config.n_embd)
    n_inner = int(getattr(config, "n_inner", None) or 4 * n_embd)
    return {
        "attn.c_attn": (n_embd, 3 * n_embd),
        "attn.c_proj": (n_embd, n_embd),
        "mlp.c_fc": (n_embd, n_inner),
        "mlp.c_proj": (n_inner, n_embd),
    }


def _read_config(path: Path) -> dict[str, Any]:
    config_file = path / "adapter_config.json"
    if not path.is_dir() or not config_file.is_file():
        raise LoRALoadError(f"{path} is not a peft adapter: no adapter_config.json in it")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise LoRALoadError(f"{config_file} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        found = config.get("peft_type") if isinstance(config, dict) else None
        raise LoRALoadError(f"{path} is a peft adapter of type {found!r}, not LORA")
    refusals = {
        "use_dora": "DoRA adapters are not supported",
        "lora_bias": "LoRA biases (lora_bias) are not supported",
        "modules_to_save": "modules_to_save (fully trained extra modules) is not supported",
        "trainable_token_indices": "trainable token embeddings are not supported",
        "target_parameters": "target_parameters (LoRA on raw parameters) is not supported",
    }
    for key, reason in refusals.items():
        if config.get(key):
            raise LoRALoadError(f"{path}: {reason}")
    if config.get("bias", "none") != "none":
        raise LoRALoadError(f"{path}: bias={config['bias']!r} is not supported (only 'none')")
    return config


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    safetensors_file = path / "adapter_model.safetensors"
    if safetensors_file.is_file():
        from safetensors.torch import load_file

        return load_file(str(safetensors_file))
    bin_file = path / "adapter_model.bin"
    if bin_file.is_file():
        state = torch.load(bin_file, map_location="cpu", weights_only=True)
        if isinstance(state, dict):
            return state
    raise LoRALoadError(f"{path} has no adapter_model.safetensors or adapter_model.bin")


def load_lora_adapter(name: str, path: str | Path, base_config: Any) -> LoRAAdapter:
    """Read a peft LoRA adapter directory for a GPT-2 base with ``base_config``: every
    tensor's shape is checked against the base, so a mismatched adapter fails here."""
    folder = Path(path)
    config = _read_config(folder)
    state = _read_state_dict(folder)
    shapes = _expected_shapes(base_config)
    default_r = int(config.get("r", 8))
    default_alpha = float(config.get("lora_alpha", default_r))
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    rslora = bool(config.get("use_rslora", False))
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        match = _KEY.match(key)
        if match is None:
            raise LoRALoadError(
                f"{folder}: tensor {key!r} is not a LoRA weight of GPT-2's Conv1D layers "
                f"({', '.join(GPT2_LORA_MODULES)})"
            )
        layer, module, side = int(match.group(1)), match.group(2), match.group(3)
        if layer >= int(base_config.n_layer):
            raise LoRALoadError(
                f"{folder}: {key} targets layer {layer}; the base model has "
                f"{base_config.n_layer} layers"
            )
        pairs.setdefault((layer, module), {})[side] = tensor
    if not pairs:
        raise LoRALoadError(f"{folder}: the adapter holds no LoRA weights")
    weights: dict[tuple[int, str], LoRAWeights] = {}
    max_rank = 0
    for (layer, module), sides in sorted(pairs.items()):
        if set(sides) != {"A", "B"}:
            raise LoRALoadError(f"{folder}: layer {layer} {module} lacks lora_A or lora_B")
        a, b = sides["A"], sides["B"]
        fan_in, fan_out = shapes[module]
        r = int(_module_pattern_value(rank_pattern, layer, module, default_r))
        alpha = float(_module_pattern_value(alpha_pattern, layer, module, default_alpha))
        if a.shape != (r, fan_in) or b.shape != (fan_out, r):
            raise LoRALoadError(
                f"{folder}: layer {layer} {module} has lora_A {tuple(a.shape)} and lora_B "
                f"{tuple(b.shape)}; this base needs ({r}, {fan_in}) and ({fan_out}, {r}) "
                "(was the adapter trained on another base model?)"
            )
        if not 1 <= r <= MAX_LORA_RANK:
            raise LoRALoadError(
                f"{folder}: layer {layer} {module} has rank {r}; ranks 1..{MAX_LORA_RANK} "
                "are supported"
            )
        scaling = alpha / math.sqrt(r) if rslora else alpha / r
        weights[(layer, module)] = LoRAWeights(a.t().contiguous(), b.t().contiguous(), scaling)
        max_rank = max(max_rank, r)
    return LoRAAdapter(
        name=name,
        path=str(folder),
        rank=max_rank,
        weights=weights,
        base_model_name_or_path=config.get("base_model_name_or_path"),
    )


@dataclass(frozen=True)
class LoRARows:
    """One step's rows of one adapter: ``rows`` indexes the step's flat token rows (None:
    every row of the step uses this adapter, so no gather is needed)."""

    adapter: LoRAAdapter
    rows: torch.Tensor | None


def plan_lora_rows(
    row_adapters: Iterable[LoRAAdapter | None], device: torch.device | str
) -> list[LoRARows]:
    """Group a step's rows by adapter (None: the base model, no update). Built once per
    step and shared by every layer."""
    groups: dict[int, tuple[LoRAAdapter, list[int]]] = {}
    count = 0
    for index, adapter in enumerate(row_adapters):
        count += 1
        if adapter is not None:
            groups.setdefault(id(adapter), (adapter, []))[1].append(index)
    plan: list[LoRARows] = []
    for adapter, rows in groups.values():
        if len(rows) == count:
            plan.append(LoRARows(adapter, None))
        else:
            plan.append(LoRARows(adapter, torch.tensor(rows, dtype=torch.long, device=device)))
    return plan


def add_lora(
    y: torch.Tensor, x: torch.Tensor, plan: list[LoRARows], layer: int, module: str
) -> torch.Tensor:
    """``y[rows] += lora_B(lora_A(x[rows])) * scaling`` for each adapter's rows, in place
    (``y`` is the base Conv1D's output for ``x``, both ``[T, *]``)."""
    for group in plan:
        weights = group.adapter.weights.get((layer, module))
        if weights is None:
            continue
        if group.rows is None:
            y.add_(((x @ weights.a) @ weights.b) * weights.scaling)
        else:
            update = ((x.index_select(0, group.rows) @ weights.a) @ weights.b) * weights.scaling
            y.index_add_(0, group.rows, update)
    return y
