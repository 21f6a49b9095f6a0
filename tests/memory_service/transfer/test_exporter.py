"""export_table -> import_table round trips bit for bit, optimizer state included: after the
re-import, training the copy with the same gradients gives the same rows, state and last steps as
training the original (each optimizer, the LMDB-backed shard and the all-DRAM one); a rows-only
export is a plain [rows, width] tensor in the table's dtype."""
from __future__ import annotations

import numpy as np
import pytest

from memory_service.config import OptimizerConfig, TableConfig
from memory_service.transfer import export_table, import_table
from memory_service.transfer import table_file
from memory_service.transfer.safetensors_file import SafetensorsReader

ROWS, WIDTH = 600, 8


def train(client, name: str, steps: range, lr_of=lambda step: 0.01 * step) -> None:
    """Pushes steps `steps` of random gradients (seeded per step: the same for every table)."""
    for step in steps:
        rng = np.random.default_rng(step)
        ids = rng.integers(0, ROWS // 2, 64)  # rows of the upper half stay never written
        client.push({name: (ids, rng.standard_normal((64, WIDTH)).astype(np.float32))}, step, lr=lr_of(step))


def records(client, name: str):
    return client.read_records(name, np.arange(ROWS))


@pytest.mark.parametrize("kind", ["adam", "sparse_adam", "adagrad", "sgd"])
def test_round_trip_continues_bit_identically(client, tmp_path, kind):
    original, copy = f"run/{kind}", f"copy/{kind}"
    client.create_table(TableConfig(original, ROWS, WIDTH, seed=7, init_scale=0.1,
                                    optimizer=OptimizerConfig(kind, lr=0.01, initial_accumulator_value=0.1)))
    train(client, original, range(1, 6))
    path = str(tmp_path / "t.safetensors")
    checksum = export_table(client, original, path, with_state=True, chunk_rows=128)
    result = import_table(client, path, table_file.ROWS, copy, chunk_rows=128)
    assert result.checksum == checksum == SafetensorsReader(path).metadata[table_file.CHECKSUM_KEY]
    assert client.table(copy).optimizer == client.table(original).optimizer
    before, after = records(client, original), records(client, copy)
    for field in ("rows", "state", "last"):
        np.testing.assert_array_equal(getattr(after, field), getattr(before, field), err_msg=field)
    train(client, original, range(6, 10))
    train(client, copy, range(6, 10))
    before, after = records(client, original), records(client, copy)
    for field in ("rows", "state", "last"):
        np.testing.assert_array_equal(getattr(after, field), getattr(before, field), err_msg=field)
    np.testing.assert_array_equal(client.fetch({copy: np.arange(ROWS)})[copy].numpy(),
                                  client.fetch({original: np.arange(ROWS)})[original].numpy())
    assert client.step_log(copy)["step"] == client.step_log(original)["step"] == 9


def test_rows_only_export_is_a_plain_tensor_in_the_tables_dtype(client, tmp_path):
    client.create_table(TableConfig("run/bf16", ROWS, WIDTH, dtype="bfloat16"))
    train(client, "run/bf16", range(1, 3), lambda step: None)
    path = str(tmp_path / "rows.safetensors")
    checksum = export_table(client, "run/bf16", path)
    imported = import_table(client, path, "rows", "copy/bf16", progress_path=str(tmp_path / "p.json"))
    assert imported.checksum == checksum  # the file's rows, as bf16 values
    reader = SafetensorsReader(path)
    assert sorted(reader.tensors) == ["rows"] and reader.tensor("rows").dtype == "BF16"
    fetched = client.fetch({"run/bf16": np.arange(ROWS)})["run/bf16"].float().numpy()
    np.testing.assert_array_equal(reader.rows("rows", 0, ROWS), fetched)


def test_state_of_another_optimizer_is_refused(client, tmp_path):
    client.create_table(TableConfig("run/other", ROWS, WIDTH, optimizer=OptimizerConfig("adagrad", lr=0.1)))
    train(client, "run/other", range(1, 3))
    path = str(tmp_path / "t.safetensors")
    export_table(client, "run/other", path, with_state=True)
    with pytest.raises(ValueError, match="optimizer state"):
        import_table(client, path, "rows", "copy/other", TableConfig("copy/other", ROWS, WIDTH),
                     progress_path=str(tmp_path / "p.json"))
    result = import_table(client, path, "rows", "copy/other", TableConfig("copy/other", ROWS, WIDTH),
                          with_state=False, progress_path=str(tmp_path / "q.json"))
    np.testing.assert_array_equal(records(client, "copy/other").rows, records(client, "run/other").rows)
    assert result.checksum is not None
