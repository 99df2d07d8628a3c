"""The Triton kernels through Triton's interpreter, on CPU tensors (issue #22).

``@triton.jit`` picks the interpreter when a kernel (or triton's own ``tl.sum``, ``tl.zeros``,
...) is defined, i.e. when ``TRITON_INTERPRET=1`` is set before triton is first imported:
tests/conftest.py sets it for the whole session on a machine without CUDA. On a CUDA host
the kernels run compiled, on the GPU, in tests/gpu; the interpreter tests skip there.
"""

from __future__ import annotations

import os

import pytest

from app.modeling.paged_attention_op import triton_available


def needs_triton() -> None:
    ok, why = triton_available()
    if not ok:
        pytest.skip(f"the Triton kernel tests need triton: {why}")


def needs_interpreter() -> None:
    """Skip unless the Triton kernels run interpreted on CPU tensors in this process."""
    needs_triton()
    from triton.runtime.interpreter import InterpretedFunction

    from app.modeling import triton_attention

    if not isinstance(triton_attention._split_kernel, InterpretedFunction):
        pytest.skip(
            "the kernels are compiled for the GPU in this run (TRITON_INTERPRET="
            f"{os.environ.get('TRITON_INTERPRET')!r}): tests/gpu runs them on CUDA"
        )


@pytest.fixture
def interpreted_kernels() -> None:
    needs_interpreter()
