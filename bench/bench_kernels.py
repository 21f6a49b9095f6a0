"""The Engram block on the GPU: eager PyTorch vs torch.compile vs the Triton kernels of
trainer/kernels/gating.py, forward and forward+backward, bf16.

Blocks, as measured in issue 7 and ENGRAM.md §7:
  gate  the fused projection (W_V and the M W_K in one GEMM) + RMSNorms + dot + signed sqrt + sigmoid
        + gate * v
  full  gate + the value path (RMSNorm, dilated causal depthwise conv, SiLU, residual): Engram.forward
The projection stays in cuBLAS in every column; the kernels own everything around it.

Floor: the projection GEMMs alone (measured here: the floor's matrix part) plus the bytes the
elementwise part must move at the HBM copy bandwidth (measured here). Bytes the elementwise part must
move, per token (s bytes per value, P = (M+1)*D): forward, read hidden (M*D) and the projection (P),
write the output (M*D), plus for the value path read the gated value and write y (2*M*D); backward,
read dY, hidden, the projection and write dhidden, dprojection (3*M*D + 2*P), plus 3*M*D for the
value path. GB/s below = (GEMM bytes + those bytes) / time; "% floor" = floor time / time.
Forward is the training forward (inputs require grad), the half of forward+backward.

    python bench/bench_kernels.py [--budget-ms 200] [--json]

Needs a CUDA GPU; without one it exits with a message and prints no numbers.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from typing import Callable

import torch
from triton.testing import do_bench

from trainer.engram import Engram, EngramConfig
from trainer.kernels.gating import fused_gate

DTYPE = torch.bfloat16


@dataclass(frozen=True)
class Shape:
    """One benchmark cell's sizes: tokens = batch * seq_len."""
    name: str
    batch: int
    seq_len: int
    num_branches: int
    hidden_size: int
    retrieved_width: int

    @property
    def tokens(self) -> int:
        return self.batch * self.seq_len


SHAPES = (
    Shape("headline", 8, 2048, 4, 1024, 1024),  # 16,384 tokens: issue 7's table
    Shape("4k tokens", 4, 1024, 4, 1024, 1024),
    Shape("1 branch, D 512", 8, 2048, 1, 512, 512),
)


def bytes_moved(shape: Shape, block: str, backward: bool) -> tuple[int, int]:
    """(GEMM bytes, elementwise bytes) the block must move, forward or forward+backward."""
    s, N, M, D, E = DTYPE.itemsize, shape.tokens, shape.num_branches, shape.hidden_size, shape.retrieved_width
    P = (M + 1) * D
    gemm = N * E + P * E + N * P  # read rows and weight, write the projection
    elem = 2 * N * M * D + N * P + (2 * N * M * D if block == "full" else 0)
    if backward:
        gemm += 2 * (N * P + N * E + P * E)  # d rows = dP W, dW = dP^T rows
        elem += 3 * N * M * D + 2 * N * P + (3 * N * M * D if block == "full" else 0)
    return s * gemm, s * elem


def make_module(shape: Shape, kernels: str) -> Engram:
    cfg = EngramConfig(hidden_size=shape.hidden_size, num_branches=shape.num_branches, max_ngram=3,
                       heads_per_ngram=8, d_mem=shape.retrieved_width // 2, table_sizes=(11, 13))
    module = Engram(cfg, kernels=kernels)
    torch.nn.init.normal_(module.conv.weight, std=0.1)  # a trained conv, not the zero init
    return module.cuda().to(DTYPE)


def gate_block(module: Engram, hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Projection + gate: hidden (B, T, M, D), rows (B, T, E) -> alpha * v (B, T, M, D)."""
    B, T, M, D = hidden.shape
    projected = module.proj(rows).view(B, T, M + 1, D)  # (B, T, M+1, D)
    if module.uses_triton(hidden):
        wq = torch.stack([n.weight for n in module.query_norms])  # (M, D)
        wk = torch.stack([n.weight for n in module.key_norms])  # (M, D)
        return fused_gate(hidden, projected, wq, wk, module.query_norms[0].eps)
    return module.gates(hidden, projected[:, :, 1:]) * projected[:, :, :1]


def full_block(module: Engram, hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    return module(hidden, rows)


def projection(module: Engram, hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    return module.proj(rows)


def time_ms(fn: Callable[[], torch.Tensor], backward: bool, grads_to_reset: list[torch.Tensor],
            budget_ms: int) -> float:
    """Median ms of fn (and its backward), L2 flushed between runs by triton's do_bench."""
    d_out = torch.ones_like(fn()) if backward else None  # made once: a fill is not the block's work

    def step() -> None:
        out = fn()
        if backward:
            out.backward(d_out)

    for _ in range(3):  # compile, autotune, allocator
        step()
    torch.cuda.synchronize()
    return do_bench(step, warmup=10, rep=budget_ms, grad_to_none=grads_to_reset, return_mode="median")


def copy_bandwidth_gbps() -> float:
    """HBM copy bandwidth, read + write, of a 1 GiB buffer: the limit the elementwise part can't beat."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=10, rep=100, return_mode="median")
    return 2 * src.numel() / ms / 1e6


def shape_cells(shape: Shape, budget_ms: int, bandwidth: float) -> list[dict]:
    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(shape.batch, shape.seq_len, shape.num_branches, shape.hidden_size, device="cuda",
                         generator=g).to(DTYPE).requires_grad_(True)
    rows = torch.randn(shape.batch, shape.seq_len, shape.retrieved_width, device="cuda",
                       generator=g).to(DTYPE).requires_grad_(True)
    eager, triton_module = make_module(shape, "torch"), make_module(shape, "triton")
    triton_module.load_state_dict(eager.state_dict())
    to_reset = [hidden, rows, *eager.parameters(), *triton_module.parameters()]
    floor_ms = {backward: time_ms(lambda: projection(eager, hidden, rows), backward, to_reset, budget_ms)
                for backward in (False, True)}
    cells = []
    for block_name, block in (("gate", gate_block), ("full", full_block)):
        # dynamic=False: one static graph per shape, as a training run at a fixed shape compiles
        compiled = torch.compile(lambda h, r, block=block: block(eager, h, r), dynamic=False)
        impls = {"eager": lambda: block(eager, hidden, rows), "compile": lambda: compiled(hidden, rows),
                 "triton": lambda: block(triton_module, hidden, rows)}
        for backward in (False, True):
            gemm_bytes, elem_bytes = bytes_moved(shape, block_name, backward)
            floor = floor_ms[backward] + elem_bytes / bandwidth / 1e6
            times = {impl: time_ms(fn, backward, to_reset, budget_ms) for impl, fn in impls.items()}
            for impl, ms in times.items():
                cells.append({"shape": shape.name, "tokens": shape.tokens, "branches": shape.num_branches,
                              "hidden": shape.hidden_size, "retrieved": shape.retrieved_width,
                              "block": block_name, "pass": "fwd+bwd" if backward else "fwd", "impl": impl,
                              "ms": ms, "gbps": (gemm_bytes + elem_bytes) / ms / 1e6,
                              "x_eager": times["eager"] / ms, "floor_ms": floor,
                              "matrix_floor_ms": floor_ms[backward], "pct_floor": 100 * floor / ms})
    return cells


def print_table(cells: list[dict], bandwidth: float) -> None:
    print(f"{torch.cuda.get_device_name()}, bf16; HBM copy {bandwidth:,.0f} GB/s (read + write)")
    for shape in SHAPES:
        rows = [c for c in cells if c["shape"] == shape.name]
        print(f"\n{shape.name}: {shape.tokens:,} tokens, M={shape.num_branches}, D={shape.hidden_size}, "
              f"E={shape.retrieved_width}")
        for backward in ("fwd", "fwd+bwd"):
            matrix = next(c["matrix_floor_ms"] for c in rows if c["pass"] == backward)
            print(f"  {backward}: projection GEMMs alone (the floor's matrix part) {matrix:.3f} ms")
        print("  | block | pass | impl | ms | GB/s | x eager | floor ms | % floor |")
        print("  |---|---|---|---|---|---|---|---|")
        for c in rows:
            print(f"  | {c['block']} | {c['pass']} | {c['impl']} | {c['ms']:.3f} | {c['gbps']:,.0f} | "
                  f"{c['x_eager']:.2f} | {c['floor_ms']:.3f} | {c['pct_floor']:.0f}% |")


def headline(cells: list[dict]) -> dict:
    """The --json summary keys: forward+backward ms per impl at the headline shape."""
    out = {}
    for c in cells:
        if c["shape"] == SHAPES[0].name and c["pass"] == "fwd+bwd":
            prefix = "" if c["block"] == "full" else "gate_"
            out[f"{prefix}{c['impl']}_fwd_bwd_ms"] = c["ms"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budget-ms", type=int, default=200, help="do_bench's timing budget per cell, ms")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_kernels.py needs a CUDA GPU and torch.cuda.is_available() is False: no numbers without one")
    bandwidth = copy_bandwidth_gbps()
    cells = [c for shape in SHAPES for c in shape_cells(shape, args.budget_ms, bandwidth)]
    if args.json:
        print(json.dumps({"device": torch.cuda.get_device_name(), "dtype": "bfloat16", "hbm_copy_gbps": bandwidth,
                          **headline(cells), "cells": cells}, indent=1))
    else:
        print_table(cells, bandwidth)


if __name__ == "__main__":
    main()
