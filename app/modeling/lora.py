"""LoRA adapters in peft's format for GPT-2's Conv1D layers, applied per row in a mixed batch.

A batch can hold rows of several adapters and of the base model. The base matmul runs once
over every row (app/modeling/linear.py); each adapter present then adds its low-rank update
to its own rows only: ``add_lora``, one pair of small matmuls per adapter over the rows it
owns (the segmented gather of punica / S-LoRA: on a CPU one gathered matmul per adapter
beats a per-row weight gather, which would copy an [in, r] matrix per row), or with several
adapters in a step ``StepLoRA``'s stacked update, one pair of matmuls for all of them (the
forward's hook, app/modeling/gpt2.py; tests/benchmarks/lora.py measures both).

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
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from app.modeling.batch_invariant import row_invariant
from app.modeling.linear import Linear

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


class _MatmulBy:
    """``x @ weight`` with app/modeling/linear.py's Linear call signature."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        return torch.matmul(x, self.weight, out=out)


@dataclass
class LoRAAdapter:
    """A loaded adapter: its name, rank and the updates of the layers it targets."""

    name: str
    path: str
    rank: int
    weights: dict[tuple[int, str], LoRAWeights] = field(default_factory=dict)
    base_model_name_or_path: str | None = None
    # Batch-invariant mode: each layer's two matmuls wrapped row-invariant, built on first use.
    _invariant: dict[tuple[int, str], tuple[Linear, Linear]] = field(
        default_factory=dict, repr=False, compare=False
    )

    def invariant_matmuls(self, layer: int, module: str) -> tuple[Linear, Linear]:
        """``x @ a`` and ``h @ b`` of one layer as RowInvariantLinear calls (the call-size
        policy that app/modeling/batch_invariant.py's probe picks for their shapes): a
        row's update then has the same bits however many rows share the adapter."""
        pair = self._invariant.get((layer, module))
        if pair is None:
            w = self.weights[(layer, module)]
            (fan_in, r), fan_out = w.a.shape, w.b.shape[1]
            pair = (
                row_invariant(_MatmulBy(w.a), fan_in, r, w.a.dtype),
                row_invariant(_MatmulBy(w.b), r, fan_out, w.b.dtype),
            )
            self._invariant[(layer, module)] = pair
        return pair

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


@torch.no_grad()
def merge_lora(hf_model: torch.nn.Module, adapter: LoRAAdapter) -> None:
    """Add the adapter's update into a GPT2LMHeadModel's Conv1D weights in place, as peft's
    ``merge_and_unload`` does it (``delta = (B @ A).T * scaling`` for a fan_in_fan_out
    layer, computed in that order, then added): the merged model is the adapter's model."""
    blocks = hf_model.transformer.h
    for (layer, module), w in adapter.weights.items():
        conv = blocks[layer].get_submodule(module)
        delta = (w.b.T @ w.a.T).T * w.scaling  # [in, out] like Conv1D.weight
        conv.weight.add_(delta.to(conv.weight.dtype))


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
    y: torch.Tensor,
    x: torch.Tensor,
    plan: list[LoRARows],
    layer: int,
    module: str,
    invariant: bool = False,
) -> torch.Tensor:
    """``y[rows] += lora_B(lora_A(x[rows])) * scaling`` for each adapter's rows, in place
    (``y`` is the base Conv1D's output for ``x``, both ``[T, *]``). ``invariant``
    (batch-invariant mode): the two matmuls run row-invariant (LoRAAdapter.invariant_matmuls),
    so a row's update does not depend on how many rows share its adapter in the step (a
    plain matmul's blocking may follow the row count)."""
    for group in plan:
        weights = group.adapter.weights.get((layer, module))
        if weights is None:
            continue
        if invariant:
            a, b = group.adapter.invariant_matmuls(layer, module)
            rows_x = x if group.rows is None else x.index_select(0, group.rows)
            update = b(a(rows_x)) * weights.scaling
            if group.rows is None:
                y.add_(update)
            else:
                y.index_add_(0, group.rows, update)
        elif group.rows is None:
            y.add_(((x @ weights.a) @ weights.b) * weights.scaling)
        else:
            update = ((x.index_select(0, group.rows) @ weights.a) @ weights.b) * weights.scaling
            y.index_add_(0, group.rows, update)
    return y


class LoRAStacks:
    """Concatenated weights of a set of adapters, per layer and module, for the stacked
    update (StepLoRA): built on first use and kept for the last few adapter sets (a steady
    mix of running requests has the same set step after step). Holding the adapters keeps
    their ids unique while cached."""

    def __init__(self, max_sets: int = 4) -> None:
        self.max_sets = max_sets
        self._sets: OrderedDict[tuple[int, ...], tuple[tuple[LoRAAdapter, ...], dict]] = (
            OrderedDict()
        )

    def get(self, adapters: tuple[LoRAAdapter, ...], layer: int, module: str) -> _Stack | None:
        key = tuple(id(a) for a in adapters)
        entry = self._sets.get(key)
        if entry is None:
            entry = self._sets[key] = (adapters, {})
            while len(self._sets) > self.max_sets:
                self._sets.popitem(last=False)
        else:
            self._sets.move_to_end(key)
        stacks = entry[1]
        if (layer, module) not in stacks:
            stacks[(layer, module)] = _Stack.build(adapters, layer, module)
        return stacks[(layer, module)]


@dataclass(frozen=True)
class _Stack:
    """One layer's module for a set of adapters: A's side by side [in, R], B's stacked
    [R, out], and per column of R its adapter (position in the set) and scaling."""

    a: torch.Tensor
    b: torch.Tensor
    owner: torch.Tensor  # [R] long
    scale: torch.Tensor  # [R] in the weights' dtype
    layout: tuple[tuple[int, int, float], ...]  # (adapter position, rank, scaling) per part

    @classmethod
    def build(cls, adapters: tuple[LoRAAdapter, ...], layer: int, module: str) -> _Stack | None:
        parts = [(k, a.weights.get((layer, module))) for k, a in enumerate(adapters)]
        present = [(k, w) for k, w in parts if w is not None]
        if not present:
            return None
        a = torch.cat([w.a for _, w in present], dim=1)
        b = torch.cat([w.b for _, w in present], dim=0)
        owner = torch.cat([torch.full((w.a.shape[1],), k, dtype=torch.long) for k, w in present])
        scale = torch.cat(
            [torch.full((w.a.shape[1],), w.scaling, dtype=a.dtype) for _, w in present]
        )
        layout = tuple((k, int(w.a.shape[1]), w.scaling) for k, w in present)
        return cls(a, b, owner.to(a.device), scale.to(a.device), layout)


@dataclass
class StepLoRA:
    """One step's LoRA work, shared by every layer: the rows of each adapter present
    (``groups``) and each row's adapter position (``row_index``, -1: the base model).

    With two or more adapters in the step the update is stacked: one matmul of every row by
    all present adapters' A side by side, a mask that keeps each row's own adapter's columns
    (times its scaling), and one matmul by the B's stacked: two matmuls per layer and module
    whatever the number of adapters (a row also multiplies the other adapters' A: rank x
    adapters extra columns, cheap next to the per-adapter calls it saves). Exact zeros
    outside a row's columns add nothing; the sum's rounding differs from peft's per-adapter
    forward at the last bit, as the merged model's does. Batch-invariant mode uses the
    per-adapter update (add_lora, row-invariant): the stacked width follows the batch."""

    groups: list[LoRARows]
    adapters: tuple[LoRAAdapter, ...]
    row_index: torch.Tensor  # [T] long
    stacks: LoRAStacks
    _masks: dict[tuple, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def build(
        cls,
        row_adapters: Iterable[LoRAAdapter | None],
        device: torch.device | str,
        stacks: LoRAStacks | None = None,
    ) -> StepLoRA | None:
        """None when no row has an adapter (the forward then does no LoRA work at all)."""
        rows = list(row_adapters)
        groups = plan_lora_rows(rows, device)
        if not groups:
            return None
        adapters = tuple(g.adapter for g in groups)
        position = {id(a): k for k, a in enumerate(adapters)}
        index = [-1 if a is None else position[id(a)] for a in rows]
        row_index = torch.tensor(index, dtype=torch.long, device=device)
        return cls(groups, adapters, row_index, stacks or LoRAStacks())

    def add(
        self, y: torch.Tensor, x: torch.Tensor, layer: int, module: str, invariant: bool = False
    ) -> torch.Tensor:
        """``y += `` each row's adapter update for ``x`` (in place; base rows unchanged)."""
        if invariant or len(self.adapters) == 1:
            return add_lora(y, x, self.groups, layer, module, invariant)
        stack = self.stacks.get(self.adapters, layer, module)
        if stack is None:
            return y
        mask = self._masks.get(stack.layout)
        if mask is None:  # per layout, once per step (usually one layout for all layers)
            keep = self.row_index[:, None] == stack.owner[None, :]
            mask = self._masks[stack.layout] = keep.to(stack.scale.dtype) * stack.scale
        h = x @ stack.a
        h.mul_(mask)
        return y.addmm_(h, stack.b)
