"""The class-B lane's import point for its options: validated in app/options/class_b.py
(transformers 4.x's rules), routed there by the option registry."""

from app.options.class_b import (
    CLASS_B_OPTIONS,
    CONSTRAINED,
    CONTRASTIVE,
    DOLA,
    GROUP_BEAM,
    ClassBOptions,
    ClassBParams,
    resolve_class_b,
)

__all__ = [
    "CLASS_B_OPTIONS",
    "CONSTRAINED",
    "CONTRASTIVE",
    "DOLA",
    "GROUP_BEAM",
    "ClassBOptions",
    "ClassBParams",
    "resolve_class_b",
]
