"""Fused GPU kernels (Triton) for the sparse layers, with pure-torch equivalents in `ecviz.routing`.

Triton is optional (`pip install -e ".[triton]"`; CUDA builds of PyTorch bring it). The kernels run on CUDA
tensors, and on CPU tensors under Triton's interpreter (`TRITON_INTERPRET=1`, set before Triton is first
imported), which is how the tests hold them to Algorithm 1 on a machine without a GPU.
"""

from __future__ import annotations

import functools
import os


@functools.cache
def triton_available() -> bool:
    """Whether Triton can be imported."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    """Whether Triton kernels run in its interpreter (numpy on the CPU) instead of being compiled."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
