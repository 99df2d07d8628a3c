"""The LoRA adapters an engine serves: name -> adapter on the model's device and dtype.

Loaded at start (``--lora-modules``) or at run time (``POST /v1/load_lora_adapter``), from
any thread: the table is guarded by a lock, and a request takes its adapter object when it is
admitted (``LLMEngine.add_request``). Unloading removes the name at once, so new requests for
it are refused, while admitted requests keep their own reference to the adapter and finish
with it (its tensors are freed when the last one ends).

Each load gets a fresh ``cache_salt`` (a positive int, never reused): the prefix cache keys
blocks by it (app/engine/core/kv_cache_manager.py), so KV computed under one adapter, or under
an adapter unloaded and loaded again with other weights, is never reused by another.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from app.modeling.lora import MAX_LORA_RANK, LoRAAdapter, LoRALoadError, load_lora_adapter


class LoRANameError(ValueError):
    """A name that cannot be loaded: already served, or the base model's."""


class LoRABaseError(ValueError):
    """The base model named for an adapter is not served."""


class LoRANotFoundError(LookupError):
    """No adapter of that name is served (the message lists the served ones)."""


class LoRALimitError(ValueError):
    """--max-loras adapters are loaded already."""


@dataclass(frozen=True)
class ServedLoRA:
    adapter: LoRAAdapter
    cache_salt: int
    base: int = 0  # the index of the full model it adapts (0: the default model)


class LoRARegistry:
    def __init__(
        self,
        base_configs: Sequence[Any],
        device: torch.device,
        dtype: torch.dtype,
        max_loras: int = 8,
        max_lora_rank: int = MAX_LORA_RANK,
        reserved_names: tuple[str, ...] = (),
        *,
        salts: Iterator[int] | None = None,
        model_names: Sequence[str] = (),
    ) -> None:
        """``base_configs``: the served full models' configs, the default model's first;
        ``model_names``: their names, which ``load``'s ``base`` takes (the first: default).
        ``salts``: the engine's source of prefix-cache namespaces (shared with its models).
        """
        if max_loras < 0:
            raise ValueError(f"max_loras must be >= 0, got {max_loras}")
        if not 1 <= max_lora_rank <= MAX_LORA_RANK:
            raise ValueError(f"max_lora_rank must be in 1..{MAX_LORA_RANK}, got {max_lora_rank}")
        self.base_configs = list(base_configs)
        self.model_names = list(model_names)
        self.device = device
        self.dtype = dtype
        self.max_loras = max_loras
        self.max_lora_rank = max_lora_rank
        # Names the base model answers to: an adapter may not take one.
        self.reserved_names = frozenset(reserved_names) | {n for n in self.model_names if n}
        self._served: dict[str, ServedLoRA] = {}
        self._salts = salts if salts is not None else itertools.count(1)
        self._lock = threading.Lock()

    def names(self) -> list[str]:
        with self._lock:
            return list(self._served)

    def served(self) -> dict[str, ServedLoRA]:
        with self._lock:
            return dict(self._served)

    def __contains__(self, name: object) -> bool:
        with self._lock:
            return name in self._served

    def get(self, name: str) -> ServedLoRA:
        with self._lock:
            served = self._served.get(name)
            known = list(self._served)
        if served is None:
            raise LoRANotFoundError(
                f"no LoRA adapter named {name!r} is served; served: {', '.join(known) or 'none'}"
            )
        return served

    def base_index(self, base: str | None) -> int:
        """The full model an adapter is for, by name (None: the default model)."""
        if base is None or (self.model_names and base == self.model_names[0]):
            return 0
        if base not in self.model_names:
            served = ", ".join(n for n in self.model_names if n) or "the default model"
            raise LoRABaseError(f"base_model_name {base!r} is no served model; served: {served}")
        return self.model_names.index(base)

    def load(
        self, name: str, path: str | Path, base: str | None = None, replace: bool = False
    ) -> LoRAAdapter:
        """Read, check and move an adapter of the full model named ``base`` (None: the
        default); LoRALoadError (the path), LoRANameError (the name), LoRABaseError (the
        base) or LoRALimitError (max_loras reached) with the reason. ``replace``: an adapter
        already loaded under ``name`` is swapped for this one (running requests keep theirs;
        the new one gets a fresh prefix-cache salt)."""
        if not name or name in self.reserved_names:
            raise LoRANameError(f"{name!r} cannot name a LoRA adapter (a served model's name)")
        if name in self and not replace:
            raise LoRANameError(f"a LoRA adapter named {name!r} is already loaded")
        index = self.base_index(base)
        adapter = load_lora_adapter(name, path, self.base_configs[index])
        if adapter.rank > self.max_lora_rank:
            raise LoRALoadError(
                f"{path}: rank {adapter.rank} is over --max-lora-rank {self.max_lora_rank}"
            )
        adapter = adapter.to(self.device, self.dtype)
        with self._lock:
            if name in self._served and not replace:  # loaded by another caller meanwhile
                raise LoRANameError(f"a LoRA adapter named {name!r} is already loaded")
            if name not in self._served and len(self._served) >= self.max_loras:
                raise LoRALimitError(
                    f"{len(self._served)} LoRA adapters are loaded, the limit of --max-loras; "
                    "unload one first"
                )
            self._served[name] = ServedLoRA(adapter, next(self._salts), index)
        return adapter

    def unload(self, name: str) -> None:
        """Stop serving ``name``: new requests for it are refused; running ones finish."""
        with self._lock:
            if self._served.pop(name, None) is None:
                known = ", ".join(self._served) or "none"
                raise LoRANotFoundError(
                    f"no LoRA adapter named {name!r} is loaded; loaded: {known}"
                )


__all__ = [
    "LoRABaseError",
    "LoRALimitError",
    "LoRALoadError",
    "LoRANameError",
    "LoRANotFoundError",
    "LoRARegistry",
    "ServedLoRA",
]
