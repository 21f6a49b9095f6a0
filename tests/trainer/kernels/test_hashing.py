"""trainer/kernels/hashing.py: the N-gram row-id kernel equals NgramHasher.hash (numpy) bit for bit.

Without CUDA the kernel runs in Triton's interpreter: TRITON_INTERPRET is read when a kernel is
defined, so it is set before trainer.kernels is imported. With CUDA the kernel compiles and runs on
the GPU.
"""
import os

import torch

INTERPRET = os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from trainer.hashing import NgramHashConfig, NgramHasher  # noqa: E402
from trainer.kernels.hashing import BLOCK_TOKENS, hash_layer, ngram_rows  # noqa: E402


def kernel_rows(hasher: NgramHasher, ids: np.ndarray, layer: int) -> np.ndarray:
    return hash_layer(hasher, torch.from_numpy(ids).to(DEVICE), layer).cpu().numpy()


@pytest.mark.parametrize("max_ngram,heads", [(2, 1), (3, 8), (4, 3)])
@pytest.mark.parametrize("shape", [(3, 500), (2, 1), (1, 2), (5, 3)])
def test_rows_equal_numpy_reference(max_ngram, heads, shape):
    """Every layer, pad ids before each sequence start (T < max_ngram included), and B*T = 1500
    spanning two programs with a ragged last one."""
    cfg = NgramHashConfig(vocab_size=129280, table_sizes=(1000, 5000, 70000)[:max_ngram - 1],
                          max_ngram=max_ngram, heads_per_ngram=heads, layer_ids=(1, 15), pad_id=2, seed=3)
    hasher = NgramHasher(cfg)
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, shape)
    for layer in cfg.layer_ids:
        expected = hasher.hash(ids, layer)
        got = kernel_rows(hasher, ids, layer)
        assert got.dtype == np.int64
        np.testing.assert_array_equal(got, expected)
    assert 3 * 500 > BLOCK_TOKENS


def test_wrapping_products_and_negative_mix_match_numpy():
    """Multipliers near 2**62 make the int64 products wrap and the XOR negative, which the
    reference's own multipliers never do: the remainder must still be numpy's (non-negative)."""
    hasher = NgramHasher(NgramHashConfig(vocab_size=1 << 20, table_sizes=(1009, 2003), layer_ids=(0,)))
    hasher.multipliers[0] = np.array([(1 << 62) + 1, (1 << 62) + 2**40 + 3, (1 << 61) + 5], dtype=np.int64)
    ids = np.random.default_rng(1).integers(0, 1 << 20, (4, 300))
    mix = ids[:, 1:] * hasher.multipliers[0][0] ^ ids[:, :-1] * hasher.multipliers[0][1]
    assert (mix < 0).any() and (mix > 0).any()  # the case this test is for
    np.testing.assert_array_equal(kernel_rows(hasher, ids, 0), hasher.hash(ids, 0))


def test_pad_id_one():
    """pad_id 1 is an integer Triton may specialise to a constant."""
    hasher = NgramHasher(NgramHashConfig(vocab_size=50, table_sizes=(7, 11), heads_per_ngram=2, layer_ids=(0,),
                                         pad_id=1))
    ids = np.random.default_rng(2).integers(0, 50, (2, 9))
    np.testing.assert_array_equal(kernel_rows(hasher, ids, 0), hasher.hash(ids, 0))


def test_inputs_are_checked():
    ids = torch.zeros(2, 3, dtype=torch.int64, device=DEVICE)
    m = torch.ones(3, dtype=torch.int64, device=DEVICE)
    primes = torch.full((4,), 7, dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match=r"ids must be a \(B, T\) int64 tensor, got \(2, 3\) torch.int32"):
        ngram_rows(ids.int(), m, primes, 0, 2)
    with pytest.raises(ValueError, match="primes must be .* = 6 int64 values, got 4"):
        ngram_rows(ids, m, primes, 0, 3)
    hasher = NgramHasher(NgramHashConfig(vocab_size=50, table_sizes=(7, 11), layer_ids=(0,)))
    with pytest.raises(KeyError, match="layer=4 is not an Engram layer"):
        hash_layer(hasher, ids, 4)


@pytest.mark.gpu
def test_rows_on_cuda_equal_numpy_reference_at_training_size():
    cfg = NgramHashConfig(vocab_size=129280, table_sizes=(129280 * 5, 129280 * 5))
    hasher = NgramHasher(cfg)
    ids = np.random.default_rng(4).integers(0, cfg.vocab_size, (8, 4096))
    got = hash_layer(hasher, torch.from_numpy(ids).cuda(), 15)
    assert got.is_cuda
    np.testing.assert_array_equal(got.cpu().numpy(), hasher.hash(ids, 15))
