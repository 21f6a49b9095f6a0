"""Generation from imported tables: a model's tables trained through the service, exported (rows
only, as another engine would take them) and imported under another prefix, generate the same
tokens as the original tables (the `engram generate --prefix` path: infer.service_tables)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from memory_service.client import MemoryClient
from memory_service.config import OptimizerConfig
from memory_service.server.servicer import serve
from memory_service.shard.shard import Shard
from memory_service.transfer import export_table, import_table
from trainer.engram import EngramConfig
from trainer.infer import generate, service_tables
from trainer.model import EngramLM, ModelConfig
from trainer.remote_tables import RemoteTables
from trainer.row_indexer import RowIndexer, identity_compression

VOCAB = 97
E = EngramConfig(hidden_size=32, num_branches=2, max_ngram=3, heads_per_ngram=2, d_mem=16,
                 table_sizes=(101, 103), layer_ids=(0, 2), init_scale=0.1)
CFG = ModelConfig(vocab_size=VOCAB, hidden_size=32, num_layers=3, num_heads=4, mlp_hidden=64, context=40,
                  num_branches=2, engram=E)


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    from memory_service.config import StorageConfig

    shards = [Shard(0, 2, StorageConfig(path=str(tmp_path_factory.mktemp("lmdb")))), Shard(1, 2)]
    servers = [serve(shard) for shard in shards]
    with MemoryClient([server.address for server in servers]) as client:
        yield client
    for server in servers:
        server.stop(None)
    for shard in shards:
        shard.close()


def model_of(client, indexer, prefix: str) -> EngramLM:
    model = EngramLM(CFG, service_tables(client, prefix)(E, indexer.table_sizes()), seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def test_generation_from_imported_tables_equals_the_original(client, tmp_path):
    indexer = RowIndexer(E, identity_compression(VOCAB), raw_pad_id=0)
    trained = RemoteTables(client, E, indexer.table_sizes(), OptimizerConfig("adam", lr=0.05), prefix="run").create()
    rng = np.random.default_rng(0)
    for step in (1, 2, 3):  # move the rows away from their initial values
        client.push({cfg.name: (rng.integers(0, cfg.num_rows, 50), rng.standard_normal((50, cfg.width)))
                     for cfg in trained.configs}, step)
    for cfg in trained.configs:
        path = str(tmp_path / f"{cfg.name.replace('/', '_')}.safetensors")
        export_table(client, cfg.name, path)
        served = cfg.name.replace("run/", "served/", 1)
        assert import_table(client, path, "rows", served, progress_path=path + ".progress").checksum
    prompt = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        original = generate(model_of(client, indexer, "run"), indexer, prompt, 12)
        imported = generate(model_of(client, indexer, "served"), indexer, prompt, 12)
    assert torch.equal(imported, original)
    fetched = {p: client.fetch({f"{p}/layer0/head0": np.arange(101)})[f"{p}/layer0/head0"] for p in ("run", "served")}
    assert torch.equal(fetched["run"], fetched["served"]) and not torch.equal(
        fetched["run"], RemoteTables(client, E, indexer.table_sizes(), OptimizerConfig(), prefix="fresh").create()
        .client.fetch({"fresh/layer0/head0": np.arange(101)})["fresh/layer0/head0"])


def test_generation_from_imported_tables_frozen_and_quantized(client, tmp_path):
    """The `engram generate` path on tables imported and then frozen: frozen as they are, the
    tokens are the original's; frozen to int8, generation runs on rows within the int8 bound of
    the original's (|x - q(x)| <= amax / 254 per row), and a quantized table exports its
    dequantized rows, which import again as a frozen table of those values."""
    from memory_service.errors import FailedPrecondition

    indexer = RowIndexer(E, identity_compression(VOCAB), raw_pad_id=0)
    trained = RemoteTables(client, E, indexer.table_sizes(), OptimizerConfig("sparse_adam", lr=0.05),
                           prefix="qrun").create()
    rng = np.random.default_rng(1)
    for step in (1, 2):
        client.push({cfg.name: (rng.integers(0, cfg.num_rows, 50), rng.standard_normal((50, cfg.width)))
                     for cfg in trained.configs}, step)
    for cfg in trained.configs:
        path = str(tmp_path / f"{cfg.name.replace('/', '_')}.safetensors")
        export_table(client, cfg.name, path)
        for prefix, kind in (("frozen", "none"), ("int8", "int8")):
            name = cfg.name.replace("qrun/", f"{prefix}/", 1)
            import_table(client, path, "rows", name, progress_path=f"{path}.{prefix}.progress")
            assert client.freeze_table(name, kind).frozen
    prompt = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        original = generate(model_of(client, indexer, "qrun"), indexer, prompt, 12)
        assert torch.equal(generate(model_of(client, indexer, "frozen"), indexer, prompt, 12), original)
        quantized = generate(model_of(client, indexer, "int8"), indexer, prompt, 12)
    assert quantized.shape == original.shape and torch.equal(quantized[:, :6], prompt)
    name = "layer2/head3"
    want = client.fetch({f"qrun/{name}": np.arange(103)})[f"qrun/{name}"].numpy()
    got = client.fetch({f"int8/{name}": np.arange(103)})[f"int8/{name}"].numpy()
    bound = np.abs(want).max(axis=1, keepdims=True) / 254 * (1 + 2**-20) + 2**-149
    assert (np.abs(got - want) <= bound).all() and not np.array_equal(got, want)
    with pytest.raises(FailedPrecondition):  # codes are not records
        client.read_records(f"int8/{name}", np.arange(3))
    path = str(tmp_path / "int8.safetensors")
    export_table(client, f"int8/{name}", path)
    import_table(client, path, "rows", f"again/{name}", progress_path=path + ".progress")
    again = client.table(f"again/{name}")
    assert again.frozen and again.quantization == "none"
    np.testing.assert_array_equal(client.fetch({f"again/{name}": np.arange(103)})[f"again/{name}"].numpy(), got)
