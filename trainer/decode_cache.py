"""What incremental decoding carries from one forward to the next.

A forward over new tokens with a cache gives the logits the full forward over the whole sequence
gives at those positions, because everything a position reads from earlier positions is here:
attention's rotated keys and values, each Engram conv's last inputs, and the last max_ngram - 1
compressed ids the next tokens' N-grams hash (RowIndexer.extend). EngramLM.new_cache makes one.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class DecodeCache:
    """State of B sequences after `position` tokens. Keys and values are allocated for
    `capacity` positions up front, so a step writes in place instead of copying the past.

    A forward that raises part way leaves the cache inconsistent: start a new one."""

    keys: list[torch.Tensor]  # per block (B, nh, capacity, hs): rotated keys, [0, position) filled
    values: list[torch.Tensor]  # per block (B, nh, capacity, hs)
    # per Engram layer (B, M*D, Engram.num_past_inputs): the conv's last normalised inputs, zeros before the start
    conv_inputs: dict[int, torch.Tensor]
    # (B, max_ngram - 1): compressed ids of the last positions, the pad id before the start; None without Engram
    recent_ids: torch.Tensor | None
    position: int = 0  # tokens seen so far: the position of the next token

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    def check_room(self, batch_size: int, num_new: int) -> None:
        """Raises ValueError unless `num_new` tokens of `batch_size` sequences fit."""
        if batch_size != self.batch_size:
            raise ValueError(f"batch of {batch_size} sequences, but the cache holds {self.batch_size}")
        if self.position + num_new > self.capacity:
            raise ValueError(f"{self.position} cached + {num_new} new tokens exceed the cache's "
                             f"capacity {self.capacity}")

    def store_kv(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Writes the new tokens' k, v (B, nh, T, hs) of block `layer` at [position, position + T)
        and returns all keys and values so far, (B, nh, position + T, hs) each."""
        end = self.position + k.shape[2]
        self.keys[layer][:, :, self.position:end] = k
        self.values[layer][:, :, self.position:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def attention_mask(self, num_new: int, device: torch.device) -> torch.Tensor | None:
        """(T, position + T) bool, True where new token i (at position + i) may attend: every
        cached position and the new ones up to itself. None for one new token (it sees all)."""
        if num_new == 1:
            return None
        end = self.position + num_new
        keys = torch.arange(end, device=device)  # (position + T,)
        queries = torch.arange(self.position, end, device=device)  # (T,)
        return keys[None, :] <= queries[:, None]
