"""The Engram block around its projections, stated once in plain PyTorch (ENGRAM.md §3).

    gate:        alpha_m = sigmoid(s(RMSNorm_q,m(h_m) . RMSNorm_k,m(k_m) / sqrt(D))),  s(x) = sign(x) sqrt(|x|)
    gated value: v~_m    = alpha_m * v
    value path:  Y_m     = SiLU(CausalDepthwiseConv(RMSNorm_v,m(v~_m))) + v~_m   (kernel K, dilation = max_ngram)

`Engram` (trainer/engram.py) runs these functions as its PyTorch path, whole sequences and incremental
decoding alike, and the fused Triton kernels (gating.py) are tested against them. Per-branch norm
weights are "(M, D)": one tensor, or M tensors of (D,) (a module's norms handed over without a
stack). Each branch is normalised on its own, with its own weight inside `F.rms_norm`: the ops, and
so the bits, of one `nn.RMSNorm` per branch.

Imports nothing of the project and no Triton: the model and the kernels both import it.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

BranchWeights = torch.Tensor | Sequence[torch.Tensor]  # (M, D): a tensor, or M tensors of (D,)


def signed_sqrt(x: torch.Tensor) -> torch.Tensor:
    """sign(x) * sqrt(max(|x|, 1e-6)): the reference's squashing of the gate logit (the clamp keeps
    the gradient finite at 0)."""
    return x.abs().clamp_min(1e-6).sqrt() * x.sign()


def branch_rms_norm(x: torch.Tensor, weights: BranchWeights, eps: float) -> torch.Tensor:
    """x (..., M, D) -> (..., M, D): branch m normalised over D and scaled by weights[m] (D,)."""
    D = x.shape[-1]
    return torch.stack([F.rms_norm(x[..., m, :], (D,), w, eps) for m, w in enumerate(weights)], dim=-2)


def gate(hidden: torch.Tensor, keys: torch.Tensor, wq: BranchWeights, wk: BranchWeights,
         eps: float) -> torch.Tensor:
    """hidden, keys (B, T, M, D) -> alpha (B, T, M, 1): how much of the shared value each branch
    takes, from how well the retrieved key agrees with the branch's hidden state."""
    q = branch_rms_norm(hidden, wq, eps)  # (B, T, M, D)
    k = branch_rms_norm(keys, wk, eps)  # (B, T, M, D)
    logit = (q * k).sum(-1, keepdim=True) / math.sqrt(hidden.shape[-1])  # (B, T, M, 1)
    return torch.sigmoid(signed_sqrt(logit))


def gated_value(hidden: torch.Tensor, projected: torch.Tensor, wq: BranchWeights, wk: BranchWeights,
                eps: float = 1e-6) -> torch.Tensor:
    """hidden (B, T, M, D), projected (B, T, M+1, D) = [v, k_1..k_M] -> v~ = alpha * v (B, T, M, D).
    What `gating.fused_gate` computes."""
    value, keys = projected[:, :, :1], projected[:, :, 1:]  # (B, T, 1, D), (B, T, M, D)
    return gate(hidden, keys, wq, wk, eps) * value


def conv_input(gated: torch.Tensor, wn: BranchWeights, eps: float) -> torch.Tensor:
    """v~ (B, T, M, D) -> RMSNorm_m(v~_m), the branches as the conv's channels (B, M*D, T)."""
    B, T, M, D = gated.shape
    return branch_rms_norm(gated, wn, eps).reshape(B, T, M * D).transpose(1, 2)


def causal_conv(normed: torch.Tensor, conv_weight: torch.Tensor, dilation: int) -> torch.Tensor:
    """normed (B, C, T), conv_weight (C, 1, K) -> depthwise conv (B, C, T) that reads positions
    t - j * dilation only, zeros before the start: padded on both sides, the first T outputs kept."""
    C, T, K = normed.shape[1], normed.shape[2], conv_weight.shape[-1]
    return F.conv1d(normed, conv_weight, None, 1, (K - 1) * dilation, dilation, C)[..., :T]


def value_output(conv: torch.Tensor, gated: torch.Tensor) -> torch.Tensor:
    """conv (B, M*D, T), v~ (B, T, M, D) -> Y = SiLU(conv) + v~ (B, T, M, D)."""
    B, T, M, D = gated.shape
    return F.silu(conv).transpose(1, 2).reshape(B, T, M, D) + gated


def value_path(gated: torch.Tensor, wn: BranchWeights, conv_weight: torch.Tensor, dilation: int,
               eps: float = 1e-6) -> torch.Tensor:
    """v~ (B, T, M, D) of whole sequences, wn (M, D), conv_weight (M*D, 1, K) -> Y (B, T, M, D),
    causal along T. What `gating.fused_value_path` computes."""
    return value_output(causal_conv(conv_input(gated, wn, eps), conv_weight, dilation), gated)


def value_path_step(gated: torch.Tensor, past: torch.Tensor, wn: BranchWeights, conv_weight: torch.Tensor,
                    dilation: int, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """`value_path` over the next T positions of sequences whose last conv inputs are `past`.

    v~ (B, T, M, D), past (B, M*D, P) with P = (K - 1) * dilation (zeros before the start, as the
    conv's padding) -> (Y (B, T, M, D), the new past (B, M*D, P))."""
    T, C = gated.shape[1], past.shape[1]
    window = torch.cat([past, conv_input(gated, wn, eps)], dim=-1)  # (B, M*D, P + T)
    conv = F.conv1d(window, conv_weight, dilation=dilation, groups=C)  # (B, M*D, T): no padding needed
    return value_output(conv, gated), window[:, :, T:]
