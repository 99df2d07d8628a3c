"""Shared by the class-B unit tests: resolve options as the server does, and run a method."""

from __future__ import annotations

from typing import Any

from app.options.class_b import CLASS_B_OPTIONS, ClassBOptions, ClassBParams, resolve_class_b
from app.options.resolve import resolve_sampling_params


def class_b_params(model: Any, prompt_len: int, **options: Any) -> ClassBParams:
    """The request's options through the server's validation (as build_params runs it)."""
    class_b = {k: options.pop(k) for k in list(options) if k in CLASS_B_OPTIONS}
    config = model.config
    params = resolve_sampling_params(
        options,
        model.generation_config.to_dict(),
        config.n_positions,
        prompt_len,
        vocab_size=config.vocab_size,
    )
    resolved = resolve_class_b(
        class_b, params, num_layers=config.n_layer, vocab_size=config.vocab_size
    )
    assert isinstance(resolved, ClassBParams)
    return resolved


def unchecked(model: Any, prompt_len: int, method: ClassBOptions, **options: Any) -> ClassBParams:
    """A method with values validation refuses (e.g. one beam group), to compare limits."""
    params = resolve_sampling_params(
        options, model.generation_config.to_dict(), model.config.n_positions, prompt_len
    )
    base = {name: getattr(params, name) for name in params.__dataclass_fields__}
    return ClassBParams(**base, class_b=method)
