"""`engram import` and `engram export` against real shards (--targets): the import prints its
checksum and the export's matches; a re-run of the same import continues (0 chunks written); bad
input is one line on stderr and exit 1."""
from __future__ import annotations

import numpy as np

from tests.memory_service.transfer.files import write_by_hand
from trainer.cli import main


def test_import_then_export(client, served, tmp_path, capsys):
    targets = ",".join(server.address for server in served[1])
    rows = np.random.default_rng(0).standard_normal((300, 6)).astype(np.float32)
    write_by_hand(tmp_path / "m.safetensors", {"emb": ("F32", rows)})
    args = ["import", str(tmp_path / "m.safetensors"), "--tensor", "emb", "--table", "cli/t", "--optimizer", "sgd",
            "--chunk-rows", "64", "--targets", targets]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "5 chunks written, 0 done before" in out
    checksum = out.split("checksum ")[1].split()[0]
    assert main(args) == 0 and "0 chunks written, 5 done before" in capsys.readouterr().out
    assert main(["export", str(tmp_path / "out.safetensors"), "--table", "cli/t", "--chunk-rows", "64",
                 "--targets", targets]) == 0
    assert capsys.readouterr().out.rstrip().endswith(checksum)
    np.testing.assert_array_equal(client.fetch({"cli/t": np.arange(300)})["cli/t"].numpy(), rows)
    assert main(["import", str(tmp_path / "m.safetensors"), "--tensor", "nope", "--table", "cli/u",
                 "--optimizer", "sgd", "--targets", targets]) == 1
    err = capsys.readouterr().err
    assert err.startswith("engram import: ") and "no tensor 'nope'" in err and len(err.splitlines()) == 1
