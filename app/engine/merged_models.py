"""Merged copies of a model and a LoRA adapter, for the adapter's requests that run on
transformers' model rather than the paged forward: the exclusive lanes (class-B methods,
output_attentions / output_hidden_states), token healing and their prompt log-probs.

A copy costs the base model's weights once more (~500 MB for kogpt2-base in float32), so at
most ``max_copies`` are kept (least recently used dropped first); a running lane keeps its
own reference, so dropping one here never pulls it from under a request. Building one takes
a copy and one small matmul per layer (app/modeling/lora.py ``merge_lora``, peft's order).
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Any

import torch

from app.modeling.lora import merge_lora

DEFAULT_MAX_COPIES = 1


class MergedModels:
    def __init__(self, base_models: list[torch.nn.Module], max_copies: int = DEFAULT_MAX_COPIES):
        self.base_models = base_models
        self.max_copies = max_copies
        self._copies: OrderedDict[int, torch.nn.Module] = OrderedDict()  # by cache salt

    def get(self, served: Any) -> torch.nn.Module:
        """The merged model of a served adapter (lora_registry.ServedLoRA: its adapter, base
        model index and cache salt, which is unique per load)."""
        merged = self._copies.get(served.cache_salt)
        if merged is not None:
            self._copies.move_to_end(served.cache_salt)
            return merged
        merged = copy.deepcopy(self.base_models[served.base])
        merge_lora(merged, served.adapter)
        merged.eval()
        self._copies[served.cache_salt] = merged
        while len(self._copies) > self.max_copies:
            self._copies.popitem(last=False)
        return merged

    def __len__(self) -> int:
        return len(self._copies)
