"""RemoteTables over frozen quantized tables: the rows come packed and are dequantized on the ids'
device (torch), to the same bits as the client's numpy path (MemoryClient.fetch). Real shards over
gRPC; on CPU here (the GPU path dequantizes on the copy stream, the same function)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from memory_service import quantization
from memory_service.client import MemoryClient
from memory_service.config import OptimizerConfig
from memory_service.server.servicer import serve
from memory_service.shard.shard import Shard
from trainer.engram import EngramConfig
from trainer.remote_tables import RemoteTables, dequantize_packed

ENGRAM = EngramConfig(hidden_size=32, num_branches=1, max_ngram=2, heads_per_ngram=2, d_mem=16,
                      table_sizes=(257,), layer_ids=(1,))
SIZES = {1: [257, 263]}


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["fp8_e4m3", "int8"])
def test_torch_dequantize_matches_numpy(kind, device):
    rows = np.random.default_rng(0).standard_normal((3, 5, 24)).astype(np.float32)
    rows[0, 0] = 0  # a zero row (scale 0)
    rows[1, 1] *= 1e-40  # subnormals
    packed = quantization.quantize(rows.reshape(15, 24), kind)  # (15, 7) words
    codes = torch.from_numpy(packed.view(np.uint8).reshape(3, 5, 28).copy()).to(device)
    got = dequantize_packed(codes, 24, kind)  # (3, 5, 24) on `device`
    assert got.device.type == device
    np.testing.assert_array_equal(got.cpu().numpy(), quantization.dequantize(packed, 24, kind).reshape(3, 5, 24))


@pytest.mark.gpu
def test_fp8_codes_agree_with_cuda_within_range():
    """The shard's (numpy) encoder against torch's CUDA conversion, over every float32 in [-448, 448]
    on a stride (what quantize ever encodes: scaled values stay within 448)."""
    bits = np.arange(0, 0x43E00001, 61, dtype=np.uint32)  # 0 .. 448.0
    values = np.concatenate([bits.view(np.float32), -bits.view(np.float32)])
    want = torch.from_numpy(values).cuda().to(torch.float8_e4m3fn).view(torch.uint8).cpu().numpy()
    np.testing.assert_array_equal(quantization.fp8_e4m3_bits(values), want)


@pytest.mark.parametrize("kind", ["fp8_e4m3", "int8"])
def test_remote_tables_read_frozen_quantized_tables(kind):
    servers = [serve(Shard(k, 2)) for k in range(2)]
    try:
        with MemoryClient([s.address for s in servers]) as client:
            tables = RemoteTables(client, ENGRAM, SIZES, OptimizerConfig(), prefix="frozen", read_only=True).create()
            for cfg in tables.configs:
                client.freeze_table(cfg.name, kind)
            # (B, T, H): past the decode-sized path, so rows come packed
            ids = torch.from_numpy(np.random.default_rng(1).integers(0, 257, (8, 300, 2)))
            assert not tables._decode_sized({1: ids})
            with torch.no_grad():
                rows = tables.lookup(1, ids)  # (B, T, H * w)
            want = client.fetch({name: ids[..., h].numpy() for h, name in enumerate(tables.names[1])})
            np.testing.assert_array_equal(rows.numpy(), torch.cat(list(want.values()), dim=-1).numpy())
            assert rows.dtype == torch.float32 and rows.shape == (8, 300, 2 * ENGRAM.d_mem // ENGRAM.heads_per_ngram)
            tables.close()
    finally:
        for server in servers:
            server.stop(grace=None)
