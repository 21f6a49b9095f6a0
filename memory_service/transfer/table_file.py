"""The layout of a table exported to safetensors (export_table writes it, import_table reads it).

    rows       [num_rows, width]        F32, or the table's dtype (BF16) for a rows-only export
    state      [num_rows, state_width]  F32: each row's optimizer state (absent when width 0)
    last       [num_rows]               I64: the step each row was last brought up to date;
                                        NEVER_WRITTEN (-1) for a row the table never stored
    log_steps  [k]                      I64: the steps of the table's step log
    log_lrs    [k]                      F64: their learning rates
__metadata__: "engram.format" = FORMAT, "engram.table_config" = the TableConfig as JSON,
"engram.step" = the table's step, "engram.checksum" = checksum.py's checksum of the rows.
Another engine reads "rows" alone, a plain [rows, width] tensor.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import numpy as np

from memory_service.config import OptimizerConfig, TableConfig
from memory_service.transfer.safetensors_file import SafetensorsReader

FORMAT = "engram-table-1"
FORMAT_KEY, CONFIG_KEY, STEP_KEY, CHECKSUM_KEY = "engram.format", "engram.table_config", "engram.step", "engram.checksum"
ROWS, STATE, LAST, LOG_STEPS, LOG_LRS = "rows", "state", "last", "log_steps", "log_lrs"
NEVER_WRITTEN = -1


def config_to_json(cfg: TableConfig) -> str:
    return json.dumps(dataclasses.asdict(cfg), sort_keys=True)


def config_of(reader: SafetensorsReader) -> TableConfig | None:
    """The table config an export stored in the file's metadata, or None (not an export)."""
    if CONFIG_KEY not in reader.metadata:
        return None
    fields = json.loads(reader.metadata[CONFIG_KEY])
    return TableConfig(**{**fields, "optimizer": OptimizerConfig(**fields["optimizer"])})


@dataclass(frozen=True)
class StateTensors:
    """The optimizer state an export holds beside its rows."""

    state_width: int

    def rows(self, reader: SafetensorsReader, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """(state (n, state_width) float32, last (n,) int64) of rows [start, stop)."""
        n = stop - start
        state = reader.rows(STATE, start, stop) if self.state_width else np.empty((n, 0), np.float32)
        return np.ascontiguousarray(state), np.array(reader.stored(LAST, start, stop), np.int64)

    @staticmethod
    def log(reader: SafetensorsReader) -> dict[str, np.ndarray]:
        """The step log {"step", "steps", "lrs"} (optimizer.log_state()'s form)."""
        steps = np.array(reader.stored(LOG_STEPS, 0, reader.tensor(LOG_STEPS).shape[0]), np.int64)
        lrs = np.array(reader.stored(LOG_LRS, 0, reader.tensor(LOG_LRS).shape[0]), np.float64)
        return {"step": np.int64(int(reader.metadata.get(STEP_KEY, "0"))), "steps": steps, "lrs": lrs}


def state_of(reader: SafetensorsReader) -> StateTensors | None:
    """The state tensors of an export made with its optimizer state, else None; ValueError when
    their shapes do not match the rows'."""
    if LAST not in reader.tensors:
        return None
    num_rows = reader.tensor(ROWS).shape[0]
    width = reader.tensor(STATE).shape[1] if STATE in reader.tensors else 0
    if reader.tensor(LAST).shape != (num_rows,) or (width and reader.tensor(STATE).shape[0] != num_rows):
        raise ValueError(f"{reader.path}: state tensors do not match {num_rows} rows")
    return StateTensors(width)
