"""The device arena: a table's rows and optimizer state in torch tensors on a device (a GPU when there
is one), so the rows a hot shard serves are gathered where they live.

It is the DRAM arena (dram.py) with the payload moved: ids, last steps, dirty flags and the slot index
stay on the host (numpy; the index is probed there anyway), rows (cap, width) and state
(cap, state_width) are device tensors, gathered with `index_select` and written with
`index_copy_` on the device. numpy arrays cross at the boundary: one host->device copy of the slots
and of written rows, one device->host copy of gathered rows.
"""
from __future__ import annotations

import numpy as np
import torch

from memory_service.storage.tiers.dram import DramTier
from memory_service.storage.usage import DEVICE_TIER


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class DeviceTier(DramTier):
    """A table's records with rows and state on `device` (default: CUDA if available, else CPU)."""

    name = DEVICE_TIER

    def __init__(self, width: int, state_width: int, max_rows: int | None = None,
                 device: str | torch.device | None = None) -> None:
        self.device = torch.device(device) if device is not None else default_device()
        super().__init__(width, state_width, max_rows)

    def _alloc_payload(self, capacity: int) -> None:
        used = len(self)
        rows = torch.empty((capacity, self.width), dtype=torch.float32, device=self.device)
        state = torch.empty((capacity, self.state_width), dtype=torch.float32, device=self.device)
        if used:
            rows[:used], state[:used] = self._rows[:used], self._state[:used]
        self._rows, self._state = rows, state

    def _slots(self, slots: np.ndarray) -> torch.Tensor:
        """Host slots (m,) -> a device index tensor (m,) int64."""
        return torch.from_numpy(np.ascontiguousarray(slots, dtype=np.int64)).to(self.device)

    def _to_device(self, values: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).to(self.device)

    def _move_payload(self, src: np.ndarray, dst: np.ndarray) -> None:
        # src and dst never overlap (holes lie below the new end, movers at or above it).
        src_t, dst_t = self._slots(src), self._slots(dst)
        self._rows.index_copy_(0, dst_t, self._rows.index_select(0, src_t))
        self._state.index_copy_(0, dst_t, self._state.index_select(0, src_t))

    @property
    def payload_nbytes(self) -> int:
        return (self._rows.numel() + self._state.numel()) * 4

    @property
    def state_nbytes(self) -> int:
        return self._state.numel() * 4

    def rows_at(self, slots: np.ndarray) -> np.ndarray:
        return self.rows_tensor(slots).cpu().numpy()

    def rows_tensor(self, slots: np.ndarray) -> torch.Tensor:
        """Rows at `slots` (m,) as a (m, width) tensor on the device (no host copy)."""
        return self._rows.index_select(0, self._slots(slots))

    def records_at(self, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        index = self._slots(slots)
        rows = self._rows.index_select(0, index).cpu().numpy()
        state = self._state.index_select(0, index).cpu().numpy()
        return rows, state, self._last[slots]

    def write_at(self, slots: np.ndarray, rows: np.ndarray, state: np.ndarray, last: np.ndarray) -> None:
        index = self._slots(slots)
        n = len(index)
        self._rows.index_copy_(0, index, self._to_device(rows).reshape(n, self.width))
        self._state.index_copy_(0, index, self._to_device(state).reshape(n, self.state_width))
        self._last[slots] = last
