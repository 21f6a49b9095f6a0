"""Compiled parts of the table service (memory_service/native/): plain C over the CPython API and
the buffer protocol, so a build needs only a C compiler, no numpy headers and no binding library.
Everything else about the package is in pyproject.toml."""
from setuptools import Extension, setup

# -ffp-contract=off: no fused multiply-adds, so the optimizer's float32 arithmetic rounds exactly
# as numpy's does (the numpy path is the reference the tests compare with, bit for bit).
# -fno-math-errno: sqrt need not set errno, so its loops vectorise (results unchanged).
FLAGS = ["-O3", "-ffp-contract=off", "-fno-fast-math", "-fno-math-errno", "-std=c11"]

setup(ext_modules=[
    Extension("memory_service.native._kernels", ["memory_service/native/kernels.c"], extra_compile_args=FLAGS),
    Extension("memory_service.native._arena", ["memory_service/native/arena.c"], extra_compile_args=FLAGS),
    Extension("memory_service.native._philox", ["memory_service/native/philox.c"], extra_compile_args=FLAGS),
    Extension("memory_service.native._routing", ["memory_service/native/routing.c"], extra_compile_args=FLAGS),
])
