"""NgramHasher against an independent, loop-by-loop derivation of DeepSeek's NgramHashMapping.

The hand reference below uses Python ints (arbitrary precision) reduced to signed 64 bits, explicit
loops over positions, trial-division primes and Python's `%`; it shares no code with the module, so
a vectorisation slip (shift direction, column order, pad handling, prime search) shows up as a diff.
"""
import dataclasses

import numpy as np
import pytest
import torch

from trainer.hashing import NgramHashConfig, NgramHasher, is_prime

INT64_MAX = 2**63 - 1


def wrap64(v: int) -> int:
    """Python int -> the value a wrapping signed int64 would hold."""
    v &= (1 << 64) - 1
    return v - (1 << 64) if v >= 1 << 63 else v


def prime_by_trial_division(n: int) -> bool:
    return n >= 2 and all(n % d for d in range(2, int(n**0.5) + 1))


def hand_primes(cfg: NgramHashConfig) -> dict[int, list[list[int]]]:
    seen, out = set(), {}
    for layer in cfg.layer_ids:
        out[layer] = []
        for size in cfg.table_sizes:
            heads, c = [], size - 1
            for _ in range(cfg.heads_per_ngram):
                c += 1
                while not prime_by_trial_division(c) or c in seen:
                    c += 1
                seen.add(c)
                heads.append(c)
            out[layer].append(heads)
    return out


def hand_multipliers(cfg: NgramHashConfig, layer: int) -> list[int]:
    half_bound = max(1, (INT64_MAX // cfg.vocab_size) // 2)
    rng = np.random.default_rng(cfg.seed + 10007 * layer)
    return [2 * int(r) + 1 for r in rng.integers(low=0, high=half_bound, size=(cfg.max_ngram,), dtype=np.int64)]


def hand_hash(cfg: NgramHashConfig, ids: list[list[int]], layer: int) -> list[list[list[int]]]:
    """out[b][t] = [row of (n=2, head 0), (n=2, head 1), ..., (n=max_ngram, last head)]."""
    m, primes = hand_multipliers(cfg, layer), hand_primes(cfg)[layer]
    out = []
    for row in ids:
        out.append([])
        for t in range(len(row)):
            cols = []
            for n in range(2, cfg.max_ngram + 1):
                mix = 0
                for k in range(n):  # k-th previous token times the k-th multiplier
                    tok = row[t - k] if t - k >= 0 else cfg.pad_id
                    mix = wrap64(mix ^ wrap64(tok * m[k]))
                cols += [mix % p for p in primes[n - 2]]
            out[-1].append(cols)
    return out


def random_ids(cfg: NgramHashConfig, B: int, T: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, size=(B, T), dtype=np.int64)


CONFIGS = [
    NgramHashConfig(vocab_size=3, table_sizes=(10, 20), heads_per_ngram=2, layer_ids=(0, 1), pad_id=2),
    NgramHashConfig(vocab_size=1, table_sizes=(7,), max_ngram=2, heads_per_ngram=3, layer_ids=(5,), pad_id=0),
    NgramHashConfig(vocab_size=17, table_sizes=(50, 60, 70), max_ngram=4, heads_per_ngram=3, layer_ids=(2, 0), seed=3),
    NgramHashConfig(vocab_size=129280, table_sizes=(1000, 2000), heads_per_ngram=4, layer_ids=(1, 15)),
]


# ---- primes ----------------------------------------------------------------------------------

def test_primes_small_config_literal():
    cfg = NgramHashConfig(vocab_size=3, table_sizes=(10, 20), heads_per_ngram=2, layer_ids=(0, 1))
    # Layer 1 must skip 11, 13 and 23, 29: layer 0 took them and `seen` spans all layers.
    assert NgramHasher(cfg).primes == {0: [[11, 13], [23, 29]], 1: [[17, 19], [31, 37]]}


def test_primes_follow_configured_layer_order():
    cfg = NgramHashConfig(vocab_size=3, table_sizes=(10, 20), heads_per_ngram=2, layer_ids=(1, 0))
    assert NgramHasher(cfg).primes == {1: [[11, 13], [23, 29]], 0: [[17, 19], [31, 37]]}


def test_prime_search_starts_at_size_minus_one():
    # A configured size that is itself prime is used (search starts strictly above size - 1).
    cfg = NgramHashConfig(vocab_size=5, table_sizes=(11, 2), heads_per_ngram=3, layer_ids=(0,))
    assert NgramHasher(cfg).primes == {0: [[11, 13, 17], [2, 3, 5]]}


@pytest.mark.parametrize("cfg", CONFIGS)
def test_primes_and_table_sizes_match_hand_search(cfg):
    hasher, expected = NgramHasher(cfg), hand_primes(cfg)
    assert hasher.primes == expected
    for layer in cfg.layer_ids:
        assert hasher.table_sizes(layer) == [p for heads in expected[layer] for p in heads]
    all_primes = [p for layer in cfg.layer_ids for p in hasher.table_sizes(layer)]
    assert len(set(all_primes)) == len(all_primes)


def test_is_prime_matches_trial_division_and_known_hard_cases():
    assert [n for n in range(3000) if is_prime(n)] == [n for n in range(3000) if prime_by_trial_division(n)]
    assert is_prime(2**61 - 1) and is_prime(2**64 - 59) and is_prime(1_000_000_007)
    # Carmichael numbers and strong pseudoprimes to the first several bases.
    for composite in (561, 3215031751, 3825123056546413051, 2**61 + 1, (2**31 - 1) * (2**31 - 1)):
        assert not is_prime(composite)


# ---- multipliers -----------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", CONFIGS)
def test_multipliers_are_rng_draws_for_seed_plus_10007_layer(cfg):
    hasher = NgramHasher(cfg)
    for layer in cfg.layer_ids:
        m = hasher.multipliers[layer]
        assert m.dtype == np.int64 and m.shape == (cfg.max_ngram,)
        assert m.tolist() == hand_multipliers(cfg, layer)
        assert all(v % 2 == 1 for v in m.tolist())


def test_multipliers_literal_vocab3_seed0():
    # Pinned so a change in numpy's PCG64 stream or the seeding rule cannot pass unnoticed.
    hasher = NgramHasher(CONFIGS[0])
    assert hasher.multipliers[0].tolist() == MULTIPLIERS_VOCAB3_LAYER0
    assert hasher.multipliers[1].tolist() == MULTIPLIERS_VOCAB3_LAYER1


# ---- row ids ---------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("B,T", [(1, 1), (1, 9), (3, 1), (2, 13)])
def test_hash_matches_hand_reference(cfg, B, T):
    hasher, ids = NgramHasher(cfg), random_ids(cfg, B, T, seed=B * 100 + T)
    for layer in cfg.layer_ids:
        out = hasher.hash(ids, layer)
        assert out.dtype == np.int64
        assert out.shape == (B, T, (cfg.max_ngram - 1) * cfg.heads_per_ngram)
        assert out.tolist() == hand_hash(cfg, ids.tolist(), layer)
        assert (out >= 0).all()


def test_hash_literal_vocab3():
    cfg = CONFIGS[0]
    out = NgramHasher(cfg).hash(np.array([[0, 1, 2, 1]], dtype=np.int64), layer=0)
    assert out.tolist() == ROWS_VOCAB3_LAYER0


def test_pad_fills_positions_before_sequence_start():
    cfg = NgramHashConfig(vocab_size=11, table_sizes=(100, 100, 100), max_ngram=4, heads_per_ngram=2,
                          layer_ids=(0,), pad_id=7)
    hasher, (m0, m1, m2, m3) = NgramHasher(cfg), hand_multipliers(cfg, 0)
    (p2, _), (p3, _), (p4, _) = hand_primes(cfg)[0]
    x0, x1 = 3, 5
    out = hasher.hash(np.array([[x0, x1]], dtype=np.int64), 0)  # (1, 2, 6)
    # t = 0: every earlier token is the pad; t = 1: only tokens before x0 are.
    assert out[0, 0, 0] == (x0 * m0 ^ 7 * m1) % p2
    assert out[0, 0, 2] == (x0 * m0 ^ 7 * m1 ^ 7 * m2) % p3
    assert out[0, 1, 2] == (x1 * m0 ^ x0 * m1 ^ 7 * m2) % p3
    assert out[0, 1, 4] == (x1 * m0 ^ x0 * m1 ^ 7 * m2 ^ 7 * m3) % p4
    # Changing the pad changes order n only at t < n - 1.
    other = NgramHasher(dataclasses.replace(cfg, pad_id=1))
    ids = random_ids(cfg, 2, 8)
    a, b = hasher.hash(ids, 0), other.hash(ids, 0)
    for n in (2, 3, 4):
        cols = slice((n - 2) * 2, (n - 1) * 2)
        assert (a[:, n - 1:, cols] == b[:, n - 1:, cols]).all()
        assert (a[:, : n - 1, cols] != b[:, : n - 1, cols]).any()


def test_products_reach_the_int64_limit_without_wrapping():
    # vocab_size = 3 makes the multipliers ~ (2**63 - 1) / 3, the largest the rule allows.
    # half_bound keeps m * id < 2**63 for every id < V', so with in-range ids no product wraps
    # (checked here as the design bound); they still use all 63 bits, so any narrower or float
    # arithmetic would change the rows. The hand reference wraps anyway, as the reference would.
    cfg = CONFIGS[0]
    products = [tok * m for layer in cfg.layer_ids for m in hand_multipliers(cfg, layer) for tok in range(3)]
    assert 2**62 < max(products) <= INT64_MAX
    assert all(wrap64(p) == p for p in products)
    big = NgramHasher(dataclasses.replace(cfg, vocab_size=2**62 + 1, pad_id=0))
    assert big.multipliers[0].tolist() == [1, 1, 1]  # half_bound = max(1, 0) = 1 → r = 0


def test_column_order_is_n2_heads_then_n3_heads():
    cfg = NgramHashConfig(vocab_size=9, table_sizes=(30, 40), heads_per_ngram=3, layer_ids=(4,))
    hasher, ids = NgramHasher(cfg), random_ids(cfg, 2, 6)
    m, primes = hasher.multipliers[4], hasher.primes[4]
    x, x1, x2 = ids, np.pad(ids, ((0, 0), (1, 0)), constant_values=cfg.pad_id)[:, :6], \
        np.pad(ids, ((0, 0), (2, 0)), constant_values=cfg.pad_id)[:, :6]
    mix2, mix3 = x * m[0] ^ x1 * m[1], x * m[0] ^ x1 * m[1] ^ x2 * m[2]
    out = hasher.hash(ids, 4)
    for j in range(3):
        assert (out[..., j] == mix2 % primes[0][j]).all()
        assert (out[..., 3 + j] == mix3 % primes[1][j]).all()


def test_hash_all_covers_every_layer():
    cfg, ids = CONFIGS[2], random_ids(CONFIGS[2], 2, 5)
    hasher = NgramHasher(cfg)
    result = hasher.hash_all(ids)
    assert list(result) == list(cfg.layer_ids)
    for layer, rows in result.items():
        assert (rows == hasher.hash(ids, layer)).all()


# ---- torch path ------------------------------------------------------------------------------

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("B,T", [(1, 1), (1, 17), (5, 1), (4, 33)])
def test_torch_equals_numpy(cfg, B, T, device):
    hasher, ids = NgramHasher(cfg), random_ids(cfg, B, T, seed=T)
    for layer in cfg.layer_ids:
        rows = hasher.hash_torch(torch.from_numpy(ids).to(device), layer)
        assert rows.device.type == device and rows.dtype == torch.int64
        assert (rows.cpu().numpy() == hasher.hash(ids, layer)).all()


def test_torch_caches_constants_per_device():
    hasher, ids = NgramHasher(CONFIGS[0]), torch.zeros(1, 3, dtype=torch.int64)
    hasher.hash_torch(ids, 0)
    cached = hasher._torch_cache[(0, ids.device)]
    hasher.hash_torch(ids, 0)
    assert hasher._torch_cache[(0, ids.device)] is cached


# ---- validation ------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,match", [
    (dict(vocab_size=0), "vocab_size=0"),
    (dict(max_ngram=1, table_sizes=()), "max_ngram=1"),
    (dict(table_sizes=(10,)), r"table_sizes=\(10,\).*max_ngram - 1 = 2"),
    (dict(table_sizes=(10, 1)), r"table_sizes=\(10, 1\).*>= 2"),
    (dict(heads_per_ngram=0), "heads_per_ngram=0"),
    (dict(pad_id=5), r"pad_id=5.*vocab_size=5"),
    (dict(pad_id=-1), "pad_id=-1"),
    (dict(layer_ids=(1, 1)), r"layer_ids=\(1, 1\)"),
    (dict(layer_ids=(-2,)), r"layer_ids=\(-2,\)"),
    (dict(layer_ids=()), r"layer_ids=\(\)"),
    (dict(seed=-1), "seed=-1"),
])
def test_config_rejects_bad_values(kwargs, match):
    base = dict(vocab_size=5, table_sizes=(10, 20), pad_id=2)
    with pytest.raises(ValueError, match=match):
        NgramHashConfig(**{**base, **kwargs})


def test_config_accepts_lists_and_is_frozen():
    cfg = NgramHashConfig(vocab_size=5, table_sizes=[10, 20], layer_ids=[3, 1])
    assert cfg.table_sizes == (10, 20) and cfg.layer_ids == (3, 1)
    assert hash(cfg) == hash(NgramHashConfig(vocab_size=5, table_sizes=(10, 20), layer_ids=(3, 1)))
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.vocab_size = 7


@pytest.mark.parametrize("ids,match", [
    (np.zeros((2, 3), dtype=np.int32), "int32"),
    (np.zeros(3, dtype=np.int64), r"shape \(3,\)"),
    ([[0, 1]], "list"),
    (np.array([[0, 3]], dtype=np.int64), r"\[0, 3\].*vocab_size=3"),
    (np.array([[-1, 0]], dtype=np.int64), r"\[-1, 0\]"),
])
def test_hash_rejects_bad_ids(ids, match):
    with pytest.raises(ValueError, match=match):
        NgramHasher(CONFIGS[0]).hash(ids, 0)


def test_hash_torch_rejects_bad_ids():
    hasher = NgramHasher(CONFIGS[0])
    with pytest.raises(ValueError, match="int32"):
        hasher.hash_torch(torch.zeros(2, 3, dtype=torch.int32), 0)
    with pytest.raises(ValueError, match=r"shape \(2, 3, 1\)"):
        hasher.hash_torch(torch.zeros(2, 3, 1, dtype=torch.int64), 0)


def test_unknown_layer_names_the_configured_layers():
    hasher = NgramHasher(CONFIGS[0])
    for call in (lambda: hasher.hash(np.zeros((1, 2), dtype=np.int64), 7),
                 lambda: hasher.hash_torch(torch.zeros(1, 2, dtype=torch.int64), 7),
                 lambda: hasher.table_sizes(7)):
        with pytest.raises(KeyError, match=r"layer=7.*\(0, 1\)"):
            call()


# Written down once from the hand reference above (seed 0, vocab_size 3) and pinned.
MULTIPLIERS_VOCAB3_LAYER0 = [1958311538462845711, 829447743881541935, 125971351641499337]
MULTIPLIERS_VOCAB3_LAYER1 = [2531209220471544413, 159864333946207753, 1187771949822987911]
ROWS_VOCAB3_LAYER0 = [[[3, 1, 5, 28], [2, 2, 2, 25], [4, 4, 7, 16], [7, 0, 0, 10]]]  # primes 11, 13 | 23, 29
