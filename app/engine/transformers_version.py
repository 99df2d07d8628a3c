"""The transformers release whose `model.generate` the engine reproduces.

The engine mirrors generate step by step (beam sampling's candidate order, processor order,
seeded draws), and transformers changes such details between releases (5.25 began ranking
sampled beam candidates by log-probability). The conformance suite pins the behaviour to
one release: the one in requirements/*.lock, named here. `make upstream-check` runs the
suite against the newest release before this number moves.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

MATCHED_TRANSFORMERS = "5.25.0"


def installed_transformers() -> str:
    try:
        return version("transformers")
    except PackageNotFoundError:  # a source tree on sys.path, not an installed release
        import transformers

        return str(transformers.__version__)


def transformers_mismatch(installed: str | None = None) -> str | None:
    """A warning when the installed transformers is not the matched release, else None."""
    installed = installed or installed_transformers()
    if installed == MATCHED_TRANSFORMERS:
        return None
    return (
        f"transformers {installed} is installed, but the engine reproduces the `generate` of "
        f"transformers {MATCHED_TRANSFORMERS} (the locked version): outputs may differ from "
        f"this installation's model.generate for options whose behaviour changed between the "
        f"two releases (run `make upstream-check` to list them). Serving anyway."
    )
