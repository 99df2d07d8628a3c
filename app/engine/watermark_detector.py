"""transformers' own WatermarkDetector for the served model's config and device.

Generation with `watermarking_config` runs transformers' WatermarkLogitsProcessor on the
model's device (app/engine/sample/logits_processors.py); the detector builds the same processor
(vocab size from the model config, the same device), so its greenlists are the ones the text
was generated with and its numbers are exactly what `WatermarkDetector(...)(ids)` returns. It
is tensor math over token ids (no model forward): callers run it in a worker thread, not on
the engine. Each sequence is scored alone, as the detector scores a batch of one.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

import torch
from transformers.generation.watermarking import WatermarkDetector

OUTPUT_FIELDS = (
    "num_tokens_scored",
    "num_green_tokens",
    "green_fraction",
    "z_score",
    "p_value",
    "prediction",
    "confidence",
)


class DetectorCache:
    """A few detectors by (config, flag): building one draws a 1M-entry hashing table (about
    0.1 s on CPU). A detector reseeds its own generator for every n-gram, so each has a
    lock: two requests never interleave on one."""

    def __init__(self, max_size: int = 8) -> None:
        self._entries: OrderedDict[tuple[Any, ...], tuple[WatermarkDetector, threading.Lock]]
        self._entries = OrderedDict()
        self._lock = threading.Lock()
        self._max_size = max_size

    def get(
        self, model_config: Any, device: torch.device, cfg: dict[str, Any], ignore_repeats: bool
    ) -> tuple[WatermarkDetector, threading.Lock]:
        key = (id(model_config), str(device), tuple(sorted(cfg.items())), ignore_repeats)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                return entry
        detector = WatermarkDetector(
            model_config=model_config,
            device=str(device),
            watermarking_config=cfg,
            ignore_repeated_ngrams=ignore_repeats,
        )
        with self._lock:
            entry = self._entries.setdefault(key, (detector, threading.Lock()))
            self._entries.move_to_end(key)
            while len(self._entries) > self._max_size:
                self._entries.popitem(last=False)
        return entry


DETECTORS = DetectorCache()


def detect_watermark(
    model_config: Any,
    device: torch.device,
    cfg: dict[str, Any],
    ignore_repeats: bool,
    z_threshold: float,
    seqs: list[list[int]],
) -> dict[str, list[Any]]:
    """WatermarkDetector over each sequence; the per-field lists of its outputs."""
    detector, lock = DETECTORS.get(model_config, device, cfg, ignore_repeats)
    out: dict[str, list[Any]] = {name: [] for name in OUTPUT_FIELDS}
    with lock:
        for ids in seqs:
            tensor = torch.tensor([ids], dtype=torch.long, device=device)
            result = detector(tensor, z_threshold=z_threshold, return_dict=True)
            for name in OUTPUT_FIELDS:
                out[name].append(getattr(result, name)[0].item())
    return out
