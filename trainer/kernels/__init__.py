"""The Engram layer's math around its projections: `reference` (plain PyTorch, the math stated once:
the model's PyTorch path and what the kernels are tested against) and its Triton kernels, `gating`
(the fused gate and value path, forward and backward) and `hashing` (N-gram row ids on the device).

Nothing is imported here: the kernel modules import Triton, and `triton.jit` decides at decoration
time whether a kernel is compiled or interpreted (TRITON_INTERPRET=1), so `import trainer` must not
pull them in. Import a submodule where it runs; `reference` imports neither Triton nor the project.
"""
from __future__ import annotations

import importlib.util
from functools import cache


@cache
def triton_installed() -> bool:
    """Whether the Triton kernels can run here: triton is an optional extra (`engram-memory[gpu]`);
    without it CUDA inputs take the PyTorch reference. Looks the package up without importing it."""
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # a broken or blocked install counts as none
        return False
