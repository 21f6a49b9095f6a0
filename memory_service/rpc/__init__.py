"""Generated gRPC stubs of proto/engram_memory/v1/memory.proto.

Every file in this folder is written by `python scripts/generate_stubs.py`; never edit by hand.
Change the .proto and rerun the script (tests/memory_service/rpc/test_stubs.py fails while these files are stale).
"""
