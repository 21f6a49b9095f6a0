"""The Engram module against independent computations of ENGRAM.md §3."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from memory_service.rows import init_rows, table_seed
from trainer.engram import Engram, EngramConfig, LocalTables


def small_cfg(num_branches: int, **kw) -> EngramConfig:
    return EngramConfig(hidden_size=12, num_branches=num_branches, max_ngram=3, heads_per_ngram=2,
                        d_mem=6, table_sizes=(11, 13), layer_ids=(0,), init_scale=0.5, **kw)


SIZES = {0: [11, 13, 17, 19]}


def rms(x, w, eps=1e-6):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def reference(module: Engram, hidden, rows):
    """ENGRAM.md §3 written out with explicit loops over branches and taps."""
    cfg = module.cfg
    B, T, M, D = hidden.shape
    W = module.proj.weight.view(M + 1, D, -1)
    v = rows @ W[0].T  # (B, T, D)
    out = torch.empty_like(hidden)
    for m in range(M):
        if cfg.use_gate:
            k = rows @ W[1 + m].T
            dot = (rms(hidden[:, :, m], module.query_norms[m].weight) * rms(k, module.key_norms[m].weight)).sum(-1)
            x = dot / math.sqrt(D)
            alpha = torch.sigmoid(torch.sign(x) * torch.sqrt(torch.clamp(x.abs(), min=1e-6)))[..., None]
        else:
            alpha = 1.0
        gated = alpha * v  # (B, T, D)
        normed = rms(gated, module.value_norms[m].weight)
        w = module.conv.weight[m * D:(m + 1) * D, 0]  # (D, K)
        conv = torch.zeros_like(normed)
        for tap in range(cfg.kernel_size):  # tap K-1 is the current position
            shift = (cfg.kernel_size - 1 - tap) * cfg.max_ngram
            if shift < T:
                conv[:, shift:] += normed[:, : T - shift] * w[:, tap]
        out[:, :, m] = F.silu(conv) + gated
    return out


def randomize(module: Engram, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3 + (1.0 if p.ndim == 1 else 0.0))
    return module


def inputs(cfg, B=2, T=10, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, cfg.num_branches, cfg.hidden_size, generator=g, dtype=dtype)
    rows = torch.randn(B, T, cfg.retrieved_width, generator=g, dtype=dtype)
    return hidden, rows


@pytest.mark.parametrize("M", [1, 4])
def test_zero_conv_output_is_gated_value(M):
    cfg = small_cfg(M)
    module = Engram(cfg)
    hidden, rows = inputs(cfg)
    out = module(hidden, rows)
    torch.testing.assert_close(out, reference(module, hidden, rows), rtol=1e-5, atol=1e-6)
    # zero conv: SiLU(0) = 0, so Y is exactly alpha * v
    W = module.proj.weight.view(M + 1, cfg.hidden_size, -1)
    v = rows @ W[0].T
    alpha = out / v.unsqueeze(2)
    assert torch.all((alpha > 0) & (alpha < 1))
    assert torch.allclose(alpha, alpha[..., :1].expand_as(alpha), atol=1e-5)


@pytest.mark.parametrize("M", [1, 4])
@pytest.mark.parametrize("use_gate", [True, False])
def test_nonzero_conv_matches_independent_conv1d(M, use_gate):
    cfg = small_cfg(M, use_gate=use_gate)
    module = randomize(Engram(cfg))
    hidden, rows = inputs(cfg, T=14)
    out = module(hidden, rows)
    torch.testing.assert_close(out, reference(module, hidden, rows), rtol=1e-4, atol=1e-5)
    # and against torch's own conv1d with explicit causal padding
    B, T, _, D = hidden.shape
    W = module.proj.weight.view(M + 1, D, -1)
    v = (rows @ W[0].T).unsqueeze(2)
    if use_gate:
        k = torch.einsum("bte,mde->btmd", rows, W[1:])
        q = torch.stack([rms(hidden[:, :, m], module.query_norms[m].weight) for m in range(M)], 2)
        kn = torch.stack([rms(k[:, :, m], module.key_norms[m].weight) for m in range(M)], 2)
        x = (q * kn).sum(-1, keepdim=True) / math.sqrt(D)
        gated = torch.sigmoid(torch.sign(x) * x.abs().clamp_min(1e-6).sqrt()) * v
    else:
        gated = v.expand(B, T, M, D)
    normed = torch.cat([rms(gated[:, :, m], module.value_norms[m].weight) for m in range(M)], -1)
    pad = (cfg.kernel_size - 1) * cfg.max_ngram
    conv = F.conv1d(F.pad(normed.transpose(1, 2), (pad, 0)), module.conv.weight,
                    dilation=cfg.max_ngram, groups=M * D)
    expected = F.silu(conv).transpose(1, 2).reshape(B, T, M, D) + gated
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("M", [1, 4])
def test_future_positions_do_not_change_the_past(M):
    cfg = small_cfg(M)
    module = randomize(Engram(cfg))
    hidden, rows = inputs(cfg, T=16)
    out = module(hidden, rows)
    hidden2, rows2 = hidden.clone(), rows.clone()
    hidden2[:, 9:] += 3.0
    rows2[:, 9:] -= 2.0
    out2 = module(hidden2, rows2)
    torch.testing.assert_close(out2[:, :9], out[:, :9], rtol=0, atol=0)
    assert not torch.allclose(out2[:, 9:], out[:, 9:])


@pytest.mark.parametrize("M", [1, 4])
@pytest.mark.parametrize("use_gate", [True, False])
def test_gradcheck_whole_module_float64(M, use_gate):
    """Gradients of every parameter (tables, W_K, W_V, norms, conv) and the hidden state."""
    cfg = small_cfg(M, use_gate=use_gate)
    module = randomize(Engram(cfg).double())
    tables = LocalTables(cfg, SIZES, sparse=False, dtype=torch.float64)
    hidden, _ = inputs(cfg, B=1, T=8, dtype=torch.float64)
    row_ids = torch.stack([torch.randint(0, s, (1, 8)) for s in SIZES[0]], dim=-1)  # (1, 8, H)
    params = {**{f"m.{k}": v for k, v in module.named_parameters()},
              **{f"t.{k}": v for k, v in tables.named_parameters()}}
    names = list(params)

    def fn(h, *values):
        p = dict(zip(names, values))
        mp = {k[2:]: v for k, v in p.items() if k.startswith("m.")}
        tp = {k[2:]: v for k, v in p.items() if k.startswith("t.")}
        rows = torch.func.functional_call(tables, tp, (0, row_ids))  # (1, 8, E)
        return torch.func.functional_call(module, mp, (h, rows))

    values = [params[n].detach().clone().requires_grad_(True) for n in names]
    h = hidden.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(fn, (h, *values), eps=1e-6, atol=1e-5, rtol=1e-4)


def test_local_table_rows_equal_init_function():
    cfg = small_cfg(4)
    tables = LocalTables(cfg, SIZES)
    for head, size in enumerate(SIZES[0]):
        ids = np.array([0, 3, size - 1])
        expected = init_rows(table_seed(cfg.seed, 0, head), ids, cfg.head_width, cfg.init_scale)
        row_ids = torch.zeros(1, 3, len(SIZES[0]), dtype=torch.int64)  # (1, 3, H)
        row_ids[0, :, head] = torch.from_numpy(ids)
        got = tables.lookup(0, row_ids)[0]  # (3, H * w)
        w = cfg.head_width
        np.testing.assert_array_equal(got[:, head * w:(head + 1) * w].detach().numpy(), expected)


def test_config_errors_name_the_value():
    with pytest.raises(ValueError, match="d_mem 6 must be a multiple of heads_per_ngram 4"):
        EngramConfig(d_mem=6, heads_per_ngram=4, table_sizes=(5, 5))
    with pytest.raises(ValueError, match="table_sizes"):
        EngramConfig(table_sizes=(5,), max_ngram=3)
    with pytest.raises(ValueError, match="unknown Engram preset 'huge'"):
        EngramConfig.from_name("huge")
    cfg = small_cfg(2)
    with pytest.raises(ValueError, match="does not match M=2"):
        Engram(cfg)(torch.zeros(1, 3, 4, 12), torch.zeros(1, 3, cfg.retrieved_width))
