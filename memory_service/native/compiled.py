"""The compiled modules, or None each where the package was used without being built."""
from __future__ import annotations

try:
    from memory_service.native import _arena, _kernels, _philox, _routing
    AVAILABLE = True
except ImportError:  # not built (a source tree used without `pip install`): callers use numpy
    _arena = _kernels = _philox = _routing = None
    AVAILABLE = False
