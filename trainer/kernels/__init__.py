"""Triton kernels of the Engram layer: `gating` (the fused gate and value path, forward and backward)
and `hashing` (N-gram row ids on the device).

Nothing is imported here: the submodules import Triton, and `triton.jit` decides at decoration time
whether a kernel is compiled or interpreted (TRITON_INTERPRET=1), so `import trainer` must not pull
them in. Import a submodule where a kernel runs.
"""
