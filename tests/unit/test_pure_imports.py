"""The scheduler side of the engine (and the HTTP side's prompt rendering and encoding) is pure
Python: it imports with torch unavailable."""

from __future__ import annotations

import subprocess
import sys

PURE_MODULES = [
    "app.engine.core.block_pool",
    "app.engine.core.kv_cache_manager",
    "app.engine.core.request",
    "app.engine.core.scheduler",
    "app.options.checks",
    "app.options.ranges",
    "app.options.registry",
    "app.options.routing",
    "app.options.params",
    "app.options.logits",
    "app.options.strategy",
    "app.options.speculative",
    "app.options.constraints",
    "app.options.class_b",
    "app.options.resolve",
    "app.options.schema",
    "app.options.docs",
    "app.engine.detokenizer",
    "app.engine.stop",
    "app.engine.spec.ngram_proposer",
    "app.engine.grammar",
    "app.engine.lanes.class_b.constraints",
    "app.prompts.encoding",
    "app.prompts.chat_template",
]


def test_pure_modules_import_without_torch() -> None:
    code = (
        "import sys; sys.modules['torch'] = None\n"  # any `import torch` now raises ImportError
        + "".join(f"import {m}\n" for m in PURE_MODULES)
        + "assert 'torch' not in [k for k, v in sys.modules.items() if v is not None]\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr


def test_the_guard_itself_catches_torch() -> None:
    code = "import sys; sys.modules['torch'] = None\nimport app.engine.sample.sampler\n"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    assert result.returncode != 0 and "torch" in result.stderr
