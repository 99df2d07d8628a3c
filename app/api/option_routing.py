"""The routes' import point for the option routing, which lives in app/options/routing.py
(generated from the option registry)."""

from app.options.routing import OptionSplit, exact_outputs, split_options

__all__ = ["OptionSplit", "exact_outputs", "split_options"]
