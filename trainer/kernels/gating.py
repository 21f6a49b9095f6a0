"""Fused Triton kernels for the Engram block around its projections (ENGRAM.md §3).

    gate:        alpha = sigmoid(s(RMSNorm_q(h) . RMSNorm_k(k) / sqrt(D))),  gated = alpha * v
    value path:  y = SiLU(CausalDepthwiseConv(RMSNorm_v(gated))) + gated   (kernel K, dilation = max_ngram)

Outside its two GEMMs the block is memory-bound, and eager PyTorch runs it as dozens of kernels, each a
pass over HBM. Here the gate is one pass forward and one backward; the value path is one forward and two
backward (the second needs dL/dz at positions t + shift, which only the first can produce).

Layout: every tensor is token-major, (N = B*T, M, D) with D contiguous; a program owns BLOCK_N tokens
and whole rows of D in registers, so every RMSNorm reduction is local. The conv reaches back to t - j*dilation
across the flattened token axis; position t = n % T tells where a sequence starts. Norm- and
conv-weight gradients are summed per program into an fp32 partial buffer and reduced by torch:
deterministic and no atomics. The backward recomputes the norms instead of saving them.

File order: kernels, launchers (check shapes, strides and dtypes, pick the grid), autograd Functions.
The file passes our ~400-line mark on purpose: kernel, launcher and autograd wrapper of both halves
sit together (the design notes' STYLE.md, habit 5), so a stride check is read beside the kernel that relies on it.
The plain PyTorch reference the tests compare against is trainer/kernels/reference.py (`gated_value`,
`value_path`), stated once there for these kernels and for the Engram module's PyTorch path.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

TILE_ELEMS = 4096  # fp32 values of one (BLOCK_N, BLOCK_D) tile: a few of them fit in registers
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ---------------------------------------------------------------------------------------- kernels
@triton.jit
def _rms_backward(dxhat, xhat, rstd, D):
    """dL/dx of xhat = x * rstd(x), given dL/dxhat: (BLOCK_N, BLOCK_D) fp32."""
    proj = tl.sum(dxhat * xhat, axis=1) / D  # (BLOCK_N,)
    return rstd[:, None] * (dxhat - xhat * proj[:, None])


@triton.jit
def _branch_logit(h_ptr, p_ptr, wq_ptr, wk_ptr, m, rows, cols, mask, D, stride_hn, stride_hm,
                  stride_pn, stride_pm, inv_sqrt_d, eps):
    """Branch m of a token tile: h_hat, k_hat (normalized, before the weights), their rstd, the
    weights, and the logit x = (h_hat*wq) . (k_hat*wk) / sqrt(D)."""
    h = tl.load(h_ptr + rows * stride_hn + m * stride_hm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    k = tl.load(p_ptr + rows * stride_pn + (m + 1) * stride_pm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    wq = tl.load(wq_ptr + m * D + cols, mask=cols < D, other=0.0).to(tl.float32)  # (BLOCK_D,)
    wk = tl.load(wk_ptr + m * D + cols, mask=cols < D, other=0.0).to(tl.float32)  # (BLOCK_D,)
    rh = tl.rsqrt(tl.sum(h * h, axis=1) / D + eps)  # (BLOCK_N,)
    rk = tl.rsqrt(tl.sum(k * k, axis=1) / D + eps)  # (BLOCK_N,)
    h_hat = h * rh[:, None]
    k_hat = k * rk[:, None]
    x = tl.sum(h_hat * wq[None, :] * k_hat * wk[None, :], axis=1) * inv_sqrt_d  # (BLOCK_N,)
    return h_hat, k_hat, rh, rk, wq, wk, x


@triton.jit
def _signed_sqrt(x):
    """sign(x) * sqrt(max(|x|, 1e-6)), with sign(0) = 0 as torch.sign."""
    r = tl.sqrt(tl.maximum(tl.abs(x), 1e-6))
    return tl.where(x > 0, r, tl.where(x < 0, -r, 0.0))


@triton.jit
def _gate_fwd_kernel(h_ptr, p_ptr, wq_ptr, wk_ptr, out_ptr, N, D, stride_hn, stride_hm, stride_pn,
                     stride_pm, inv_sqrt_d, eps, M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_D: tl.constexpr):
    """gated[n, m] = alpha[n, m] * v[n] for BLOCK_N tokens and all M branches (v read once)."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows < N)[:, None] & (cols < D)[None, :]
    rows = rows.to(tl.int64)[:, None]  # (BLOCK_N, 1): int64 so offsets never wrap
    v = tl.load(p_ptr + rows * stride_pn + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    for m in tl.static_range(M):
        _, _, _, _, _, _, x = _branch_logit(h_ptr, p_ptr, wq_ptr, wk_ptr, m, rows, cols, mask, D,
                                            stride_hn, stride_hm, stride_pn, stride_pm, inv_sqrt_d, eps)
        alpha = tl.sigmoid(_signed_sqrt(x))  # (BLOCK_N,)
        out = alpha[:, None] * v
        tl.store(out_ptr + rows * (M * D) + m * D + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gate_bwd_kernel(dy_ptr, h_ptr, p_ptr, wq_ptr, wk_ptr, dh_ptr, dp_ptr, dwq_part_ptr, dwk_part_ptr,
                     N, D, stride_hn, stride_hm, stride_pn, stride_pm, inv_sqrt_d, eps, tiles_per_prog,
                     M: tl.constexpr, M_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """dh (N, M, D), dprojected (N, M+1, D) (slot 0: dv summed over branches, slots 1..M: dk), and
    this program's partial sums of dwq, dwk (M, D) over tiles pid, pid + G, pid + 2G, ..."""
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_D)
    branches = tl.arange(0, M_PAD)
    dwq_acc = tl.zeros((M_PAD, BLOCK_D), tl.float32)
    dwk_acc = tl.zeros((M_PAD, BLOCK_D), tl.float32)
    for i in range(tiles_per_prog):
        rows = (pid + i * num_programs) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = (rows < N)[:, None] & (cols < D)[None, :]
        rows = rows.to(tl.int64)[:, None]
        v = tl.load(p_ptr + rows * stride_pn + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
        for m in tl.static_range(M):
            h_hat, k_hat, rh, rk, wq, wk, x = _branch_logit(h_ptr, p_ptr, wq_ptr, wk_ptr, m, rows, cols, mask, D,
                                                            stride_hn, stride_hm, stride_pn, stride_pm,
                                                            inv_sqrt_d, eps)
            alpha = tl.sigmoid(_signed_sqrt(x))
            dy = tl.load(dy_ptr + rows * (M * D) + m * D + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            dv += alpha[:, None] * dy
            d_alpha = tl.sum(dy * v, axis=1)  # (BLOCK_N,)
            d_s = d_alpha * alpha * (1.0 - alpha)
            # d s/dx = 1 / (2 sqrt|x|) where the clamp is inactive, 0 where it holds (as autograd)
            abs_x = tl.maximum(tl.abs(x), 1e-6)
            d_x = tl.where(tl.abs(x) >= 1e-6, d_s * 0.5 / tl.sqrt(abs_x), 0.0) * inv_sqrt_d
            dqn = d_x[:, None] * k_hat * wk[None, :]  # dL/d(h_hat * wq)
            dkn = d_x[:, None] * h_hat * wq[None, :]  # dL/d(k_hat * wk)
            is_m = branches[:, None] == m  # (M_PAD, 1): row m of the weight-gradient accumulators
            dwq_acc += tl.where(is_m, tl.sum(dqn * h_hat, axis=0)[None, :], 0.0)
            dwk_acc += tl.where(is_m, tl.sum(dkn * k_hat, axis=0)[None, :], 0.0)
            dh = _rms_backward(dqn * wq[None, :], h_hat, rh, D)
            dk = _rms_backward(dkn * wk[None, :], k_hat, rk, D)
            tl.store(dh_ptr + rows * (M * D) + m * D + cols[None, :], dh.to(dh_ptr.dtype.element_ty), mask=mask)
            tl.store(dp_ptr + rows * ((M + 1) * D) + (m + 1) * D + cols[None, :], dk.to(dp_ptr.dtype.element_ty),
                     mask=mask)
        tl.store(dp_ptr + rows * ((M + 1) * D) + cols[None, :], dv.to(dp_ptr.dtype.element_ty), mask=mask)
    part = pid * (M * D) + branches[:, None] * D + cols[None, :]  # (M_PAD, BLOCK_D) into (G, M, D)
    part_mask = (branches < M)[:, None] & (cols < D)[None, :]
    tl.store(dwq_part_ptr + part, dwq_acc, mask=part_mask)
    tl.store(dwk_part_ptr + part, dwk_acc, mask=part_mask)


@triton.jit
def _conv_input(g_ptr, wn, m, rows, t, in_range, shift, cols, D, stride_gn, stride_gm, eps):
    """RMSNorm_m(gated) at token rows - shift, zero where that is before the sequence start:
    (BLOCK_N, BLOCK_D) fp32."""
    valid = in_range & (t >= shift)  # (BLOCK_N, 1)
    g = tl.load(g_ptr + (rows - shift) * stride_gn + m * stride_gm + cols[None, :],
                mask=valid & (cols < D)[None, :], other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(g * g, axis=1) / D + eps)
    return g * rstd[:, None] * wn[None, :]


@triton.jit
def _conv_output(g_ptr, cw_ptr, wn, m, rows, t, in_range, cols, D, stride_gn, stride_gm, eps,
                 K: tl.constexpr, DILATION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """z = causal dilated depthwise conv of RMSNorm_m(gated) at the tile's tokens: (BLOCK_N, BLOCK_D).
    Tap K-1 is the current position, tap j reaches back (K-1-j) * DILATION tokens (Conv1d's order)."""
    z = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    for tap in tl.static_range(K):
        w = tl.load(cw_ptr + (m * D + cols) * K + tap, mask=cols < D, other=0.0).to(tl.float32)  # (BLOCK_D,)
        z += _conv_input(g_ptr, wn, m, rows, t, in_range, (K - 1 - tap) * DILATION, cols, D,
                         stride_gn, stride_gm, eps) * w[None, :]
    return z


@triton.jit
def _value_fwd_kernel(g_ptr, wn_ptr, cw_ptr, y_ptr, N, T, D, stride_gn, stride_gm, eps, M: tl.constexpr,
                      K: tl.constexpr, DILATION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """y = SiLU(z) + gated for BLOCK_N tokens of branch program_id(1)."""
    m = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_D)
    in_range = (rows < N)[:, None]
    t = (rows % T)[:, None]  # position in its sequence
    rows = rows.to(tl.int64)[:, None]
    wn = tl.load(wn_ptr + m * D + cols, mask=cols < D, other=0.0).to(tl.float32)
    z = _conv_output(g_ptr, cw_ptr, wn, m, rows, t, in_range, cols, D, stride_gn, stride_gm, eps, K, DILATION,
                     BLOCK_N, BLOCK_D)
    mask = in_range & (cols < D)[None, :]
    g = tl.load(g_ptr + rows * stride_gn + m * stride_gm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    y = z * tl.sigmoid(z) + g
    tl.store(y_ptr + rows * (M * D) + m * D + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _value_dz_kernel(dy_ptr, g_ptr, wn_ptr, cw_ptr, dz_ptr, N, T, D, stride_gn, stride_gm, eps,
                     M: tl.constexpr, K: tl.constexpr, DILATION: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_D: tl.constexpr):
    """dz = dy * SiLU'(z) (fp32, (N, M, D)), z recomputed from gated."""
    m = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_D)
    in_range = (rows < N)[:, None]
    t = (rows % T)[:, None]
    rows = rows.to(tl.int64)[:, None]
    wn = tl.load(wn_ptr + m * D + cols, mask=cols < D, other=0.0).to(tl.float32)
    z = _conv_output(g_ptr, cw_ptr, wn, m, rows, t, in_range, cols, D, stride_gn, stride_gm, eps, K, DILATION,
                     BLOCK_N, BLOCK_D)
    mask = in_range & (cols < D)[None, :]
    offsets = rows * (M * D) + m * D + cols[None, :]
    dy = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(z)
    tl.store(dz_ptr + offsets, dy * sig * (1.0 + z * (1.0 - sig)), mask=mask)


@triton.jit
def _value_bwd_kernel(dy_ptr, dz_ptr, g_ptr, wn_ptr, cw_ptr, dg_ptr, dwn_part_ptr, dcw_part_ptr, N, T, D,
                      stride_gn, stride_gm, eps, tiles_per_prog, M: tl.constexpr, K: tl.constexpr,
                      K_PAD: tl.constexpr, DILATION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """dgated = dy + RMSNorm backward of dnormed, where dnormed[t] = sum_j w_j dz[t + (K-1-j) * DILATION];
    this program's partial sums of dwn (D,) and dconv (D, K) of branch program_id(1)."""
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    m = tl.program_id(1)
    cols = tl.arange(0, BLOCK_D)
    taps = tl.arange(0, K_PAD)
    wn = tl.load(wn_ptr + m * D + cols, mask=cols < D, other=0.0).to(tl.float32)
    dwn_acc = tl.zeros((BLOCK_D,), tl.float32)
    dcw_acc = tl.zeros((K_PAD, BLOCK_D), tl.float32)
    for i in range(tiles_per_prog):
        rows = (pid + i * num_programs) * BLOCK_N + tl.arange(0, BLOCK_N)
        in_range = (rows < N)[:, None]
        t = (rows % T)[:, None]
        rows = rows.to(tl.int64)[:, None]
        mask = in_range & (cols < D)[None, :]
        g = tl.load(g_ptr + rows * stride_gn + m * stride_gm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.rsqrt(tl.sum(g * g, axis=1) / D + eps)
        g_hat = g * rstd[:, None]
        normed = g_hat * wn[None, :]
        d_normed = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
        for tap in tl.static_range(K):
            shift = (K - 1 - tap) * DILATION
            ahead = in_range & (t + shift < T)  # the output this input feeds is in the same sequence
            dz = tl.load(dz_ptr + (rows + shift) * (M * D) + m * D + cols[None, :],
                         mask=ahead & (cols < D)[None, :], other=0.0)
            w = tl.load(cw_ptr + (m * D + cols) * K + tap, mask=cols < D, other=0.0).to(tl.float32)
            d_normed += dz * w[None, :]
            dcw_acc += tl.where(taps[:, None] == tap, tl.sum(dz * normed, axis=0)[None, :], 0.0)
        dwn_acc += tl.sum(d_normed * g_hat, axis=0)
        offsets = rows * (M * D) + m * D + cols[None, :]
        dy = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        dg = dy + _rms_backward(d_normed * wn[None, :], g_hat, rstd, D)
        tl.store(dg_ptr + offsets, dg.to(dg_ptr.dtype.element_ty), mask=mask)
    part = (pid * M + m) * D + cols  # (BLOCK_D,) into (G, M, D) and, times K, into (G, M, D, K)
    tl.store(dwn_part_ptr + part, dwn_acc, mask=cols < D)
    tl.store(dcw_part_ptr + part[None, :] * K + taps[:, None], dcw_acc, mask=(taps < K)[:, None] & (cols < D)[None, :])


# -------------------------------------------------------------------------------------- launchers
def _token_major(x: torch.Tensor, name: str) -> tuple[torch.Tensor, int, int]:
    """x (B, T, M, D) addressed as (N, M, D): returns x (a contiguous copy only if B and T cannot be
    merged or D is strided), the token stride and the branch stride (0 for an expanded value)."""
    if x.dim() != 4:
        raise ValueError(f"{name} must be (B, T, M, D), got shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} dtype {x.dtype} not supported; use one of {FLOAT_DTYPES}")
    B, T = x.shape[:2]
    if x.stride(3) != 1 or (B > 1 and x.stride(0) != T * x.stride(1)):
        x = x.contiguous()
    return x, x.stride(1), x.stride(2)


def _check_weight(w: torch.Tensor, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    if tuple(w.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(w.shape)}")
    if w.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} dtype {w.dtype} not supported; use one of {FLOAT_DTYPES}")
    return w.contiguous()


def _tile(D: int, block_n: int | None) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_D, num_warps): whole rows of D, about TILE_ELEMS values per tile."""
    block_d = triton.next_power_of_2(D)
    if block_n is None:
        block_n = max(1, TILE_ELEMS // block_d)
    if block_n < 1 or block_n & (block_n - 1):
        raise ValueError(f"block_n {block_n} must be a power of two >= 1")
    return block_n, block_d, 4 if block_n * block_d <= 2048 else 8


def _num_programs(num_tiles: int, device: torch.device, max_programs: int | None) -> int:
    """Programs of a kernel that reduces weight gradients: enough to fill the GPU a few times over,
    few enough that the (G, M, D) partial buffers stay small."""
    if max_programs is None and device.type == "cuda":
        max_programs = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    elif max_programs is None:  # the interpreter: programs run one after another anyway
        max_programs = 16
    return max(1, min(num_tiles, max_programs))


def gate_forward(hidden: torch.Tensor, projected: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor,
                 eps: float, block_n: int | None = None) -> torch.Tensor:
    """hidden (B, T, M, D), projected (B, T, M+1, D) = [v, k_1..k_M], wq, wk (M, D) -> gated (B, T, M, D)."""
    B, T, M, D = hidden.shape
    if tuple(projected.shape) != (B, T, M + 1, D) or projected.dtype != hidden.dtype:
        raise ValueError(f"projected must be {(B, T, M + 1, D)} {hidden.dtype}, got "
                         f"{tuple(projected.shape)} {projected.dtype}")
    hidden, stride_hn, stride_hm = _token_major(hidden, "hidden")
    projected, stride_pn, stride_pm = _token_major(projected, "projected")
    wq, wk = _check_weight(wq, "wq", (M, D)), _check_weight(wk, "wk", (M, D))
    block_n, block_d, num_warps = _tile(D, block_n)
    N = B * T
    out = torch.empty(B, T, M, D, dtype=hidden.dtype, device=hidden.device)
    _gate_fwd_kernel[(triton.cdiv(N, block_n),)](
        hidden, projected, wq, wk, out, N, D, stride_hn, stride_hm, stride_pn, stride_pm,
        1.0 / math.sqrt(D), eps, M=M, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=num_warps)
    return out


def gate_backward(d_gated: torch.Tensor, hidden: torch.Tensor, projected: torch.Tensor, wq: torch.Tensor,
                  wk: torch.Tensor, eps: float, block_n: int | None = None, max_programs: int | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of `gate_forward`'s inputs: d_hidden (B, T, M, D), d_projected (B, T, M+1, D),
    d_wq, d_wk (M, D)."""
    B, T, M, D = hidden.shape
    hidden, stride_hn, stride_hm = _token_major(hidden, "hidden")
    projected, stride_pn, stride_pm = _token_major(projected, "projected")
    wq, wk = wq.contiguous(), wk.contiguous()  # (M, D), checked by gate_forward
    d_gated = d_gated.contiguous()  # (B, T, M, D)
    block_n, block_d, num_warps = _tile(D, block_n)
    N = B * T
    num_tiles = triton.cdiv(N, block_n)
    G = _num_programs(num_tiles, hidden.device, max_programs)
    d_hidden = torch.empty(B, T, M, D, dtype=hidden.dtype, device=hidden.device)
    d_projected = torch.empty(B, T, M + 1, D, dtype=projected.dtype, device=projected.device)
    dwq_part = torch.empty(G, M, D, dtype=torch.float32, device=hidden.device)
    dwk_part = torch.empty_like(dwq_part)
    _gate_bwd_kernel[(G,)](
        d_gated, hidden, projected, wq, wk, d_hidden, d_projected, dwq_part, dwk_part, N, D,
        stride_hn, stride_hm, stride_pn, stride_pm, 1.0 / math.sqrt(D), eps, triton.cdiv(num_tiles, G),
        M=M, M_PAD=triton.next_power_of_2(M), BLOCK_N=block_n, BLOCK_D=block_d, num_warps=num_warps)
    return d_hidden, d_projected, dwq_part.sum(0).to(wq.dtype), dwk_part.sum(0).to(wk.dtype)


def _check_conv(conv_weight: torch.Tensor, M: int, D: int) -> tuple[torch.Tensor, int]:
    if conv_weight.dim() != 3 or conv_weight.shape[:2] != (M * D, 1):
        raise ValueError(f"conv_weight must be (M*D, 1, K) = ({M * D}, 1, K), got {tuple(conv_weight.shape)}")
    return _check_weight(conv_weight, "conv_weight", tuple(conv_weight.shape)), conv_weight.shape[2]


def value_forward(gated: torch.Tensor, wn: torch.Tensor, conv_weight: torch.Tensor, dilation: int,
                  eps: float, block_n: int | None = None) -> torch.Tensor:
    """gated (B, T, M, D), wn (M, D), conv_weight (M*D, 1, K) -> y (B, T, M, D)."""
    B, T, M, D = gated.shape
    gated, stride_gn, stride_gm = _token_major(gated, "gated")
    wn = _check_weight(wn, "wn", (M, D))
    conv_weight, K = _check_conv(conv_weight, M, D)
    if dilation < 1:
        raise ValueError(f"dilation {dilation} must be >= 1")
    block_n, block_d, num_warps = _tile(D, block_n)
    N = B * T
    y = torch.empty(B, T, M, D, dtype=gated.dtype, device=gated.device)
    _value_fwd_kernel[(triton.cdiv(N, block_n), M)](
        gated, wn, conv_weight, y, N, T, D, stride_gn, stride_gm, eps, M=M, K=K, DILATION=dilation,
        BLOCK_N=block_n, BLOCK_D=block_d, num_warps=num_warps)
    return y


def value_backward(dy: torch.Tensor, gated: torch.Tensor, wn: torch.Tensor, conv_weight: torch.Tensor,
                   dilation: int, eps: float, block_n: int | None = None, max_programs: int | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of `value_forward`'s inputs: d_gated (B, T, M, D) (dense even for an expanded
    gated), d_wn (M, D), d_conv_weight (M*D, 1, K)."""
    B, T, M, D = gated.shape
    gated, stride_gn, stride_gm = _token_major(gated, "gated")
    conv_weight, K = _check_conv(conv_weight, M, D)
    wn = wn.contiguous()  # (M, D), checked by value_forward
    dy = dy.contiguous()  # (B, T, M, D)
    block_n, block_d, num_warps = _tile(D, block_n)
    N = B * T
    num_tiles = triton.cdiv(N, block_n)
    dz = torch.empty(B, T, M, D, dtype=torch.float32, device=gated.device)
    _value_dz_kernel[(num_tiles, M)](
        dy, gated, wn, conv_weight, dz, N, T, D, stride_gn, stride_gm, eps, M=M, K=K, DILATION=dilation,
        BLOCK_N=block_n, BLOCK_D=block_d, num_warps=num_warps)
    G = _num_programs(num_tiles, gated.device, max_programs)
    d_gated = torch.empty(B, T, M, D, dtype=gated.dtype, device=gated.device)
    dwn_part = torch.empty(G, M, D, dtype=torch.float32, device=gated.device)
    dcw_part = torch.empty(G, M, D, K, dtype=torch.float32, device=gated.device)
    _value_bwd_kernel[(G, M)](
        dy, dz, gated, wn, conv_weight, d_gated, dwn_part, dcw_part, N, T, D, stride_gn, stride_gm, eps,
        triton.cdiv(num_tiles, G), M=M, K=K, K_PAD=triton.next_power_of_2(K), DILATION=dilation,
        BLOCK_N=block_n, BLOCK_D=block_d, num_warps=num_warps)
    d_conv = dcw_part.sum(0).view(M * D, 1, K).to(conv_weight.dtype)
    return d_gated, dwn_part.sum(0).to(wn.dtype), d_conv


# ---------------------------------------------------------------------------- autograd functions
class FusedGate(torch.autograd.Function):
    """Autograd for the fused gate; saves only its inputs (the norms are recomputed backward)."""

    @staticmethod
    def forward(ctx, hidden, projected, wq, wk, eps, block_n, max_programs):
        ctx.save_for_backward(hidden, projected, wq, wk)
        ctx.config = (eps, block_n, max_programs)
        return gate_forward(hidden, projected, wq, wk, eps, block_n)

    @staticmethod
    def backward(ctx, d_gated):
        eps, block_n, max_programs = ctx.config
        grads = gate_backward(d_gated, *ctx.saved_tensors, eps, block_n, max_programs)
        return (*grads, None, None, None)


class FusedValuePath(torch.autograd.Function):
    """Autograd for the fused value path; saves only its inputs (norms and conv are recomputed)."""

    @staticmethod
    def forward(ctx, gated, wn, conv_weight, dilation, eps, block_n, max_programs):
        ctx.save_for_backward(gated, wn, conv_weight)
        ctx.config = (dilation, eps, block_n, max_programs)
        return value_forward(gated, wn, conv_weight, dilation, eps, block_n)

    @staticmethod
    def backward(ctx, dy):
        dilation, eps, block_n, max_programs = ctx.config
        grads = value_backward(dy, *ctx.saved_tensors, dilation, eps, block_n, max_programs)
        return (*grads, None, None, None, None)


def fused_gate(hidden: torch.Tensor, projected: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor,
               eps: float = 1e-6, block_n: int | None = None, max_programs: int | None = None) -> torch.Tensor:
    """alpha * v with alpha = sigmoid(s(RMSNorm_q(h) . RMSNorm_k(k) / sqrt(D))), differentiable:
    `reference.gated_value` in one pass.

    hidden (B, T, M, D); projected (B, T, M+1, D): slot 0 the shared value, slots 1..M the keys
    (taking the projection whole lets the backward write dv and dk straight into its gradient).
    block_n / max_programs override the tile height and the backward's program count (tests)."""
    return FusedGate.apply(hidden, projected, wq, wk, eps, block_n, max_programs)


def fused_value_path(gated: torch.Tensor, wn: torch.Tensor, conv_weight: torch.Tensor, dilation: int,
                     eps: float = 1e-6, block_n: int | None = None, max_programs: int | None = None
                     ) -> torch.Tensor:
    """SiLU(CausalDepthwiseConv(RMSNorm(gated))) + gated, differentiable: `reference.value_path` fused.
    gated (B, T, M, D) may be an expanded (stride 0 over M) view, wn (M, D) the per-branch norm
    weights, conv_weight (M*D, 1, K)."""
    return FusedValuePath.apply(gated, wn, conv_weight, dilation, eps, block_n, max_programs)
