"""Per-row loops of the table service compiled to C (setup.py builds them with the package).

`_kernels`: the storage floor's batch loops (slot lookup, row gather, optimizer steps), run with
the GIL released; `_arena`: the same-host reader of a shard's shared-memory arena. Each has a numpy
reference beside its caller, which the tests compare with bit for bit, and which runs where the
extension is not built (`compiled.AVAILABLE` False; e.g. a source tree used without `pip install`).
"""
