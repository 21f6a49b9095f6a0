"""safetensors files for the transfer tests, written from the format's description alone."""
from __future__ import annotations

import json
import struct

import numpy as np


def write_by_hand(path, tensors: dict[str, tuple[str, np.ndarray]], metadata=None) -> None:
    """A safetensors file assembled byte by byte from the format's description (no code of ours)."""
    header, blobs, offset = ({"__metadata__": metadata} if metadata else {}), [], 0
    for name, (dtype, values) in tensors.items():
        raw = np.ascontiguousarray(values).tobytes()
        header[name] = {"dtype": dtype, "shape": list(values.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    head = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head + b"".join(blobs))
