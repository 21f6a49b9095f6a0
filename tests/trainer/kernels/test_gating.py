"""trainer/kernels/gating.py: the fused gate and value path, forward and every gradient, against
their PyTorch reference (trainer/kernels/reference.py) and against the Engram module's own
(PyTorch) path.

Without CUDA the kernels run in Triton's interpreter. `triton.jit` reads TRITON_INTERPRET when a
kernel is defined, so it is set here, before trainer.kernels is imported (`import trainer` never
imports that package). With CUDA the kernels compile and the same tests run on the GPU.
"""
import os

import torch

INTERPRET = os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"

import pytest  # noqa: E402

from trainer.engram import Engram, EngramConfig  # noqa: E402
from trainer.kernels import gating, reference  # noqa: E402


def assert_rel(actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-4) -> None:
    """max |actual - expected| <= tol * max |expected|: relative to the tensor's scale, so entries
    that cancel to ~0 are not held to more digits than fp32 has."""
    assert actual.shape == expected.shape
    err = (actual.float() - expected.float()).abs().max().item()
    scale = expected.float().abs().max().item()
    assert scale > 0, "a zero reference proves nothing"
    assert err <= tol * scale, f"max error {err:.3g} > {tol} x max |expected| {scale:.3g}"


def gate_inputs(B: int, T: int, M: int, D: int, dtype=torch.float32, seed: int = 0):
    """hidden (B, T, M, D), projected (B, T, M+1, D), wq, wk (M, D), all requiring grad; one
    token's hidden row is zero so its logit is exactly 0 (sign(0) and the clamp's zero gradient)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, M, D, generator=g)
    hidden[0, 5, 0] = 0.0
    projected = torch.randn(B, T, M + 1, D, generator=g)
    wq = 1.0 + 0.3 * torch.randn(M, D, generator=g)
    wk = 1.0 + 0.3 * torch.randn(M, D, generator=g)
    return [x.to(DEVICE, dtype).requires_grad_(True) for x in (hidden, projected, wq, wk)]


def value_inputs(B: int, T: int, M: int, D: int, K: int, dtype=torch.float32, seed: int = 0):
    """gated (B, T, M, D), wn (M, D), conv weight (M*D, 1, K), all requiring grad."""
    g = torch.Generator().manual_seed(seed)
    gated = torch.randn(B, T, M, D, generator=g)
    wn = 1.0 + 0.3 * torch.randn(M, D, generator=g)
    conv = 0.3 * torch.randn(M * D, 1, K, generator=g)
    return [x.to(DEVICE, dtype).requires_grad_(True) for x in (gated, wn, conv)]


def grads(out: torch.Tensor, inputs: list[torch.Tensor], seed: int = 1) -> tuple[torch.Tensor | None, ...]:
    """d(sum(out * r))/d inputs for a fixed random r; None for an input `out` does not use."""
    r = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.device, out.dtype)
    return torch.autograd.grad(out, inputs, r, allow_unused=True)


# B*T = 74: neither the default tile (128 tokens at D <= 32, 64 at D <= 64) nor 16 divides it, and
# with T = 37 tiles of 16 straddle the boundary between the two sequences.
@pytest.mark.parametrize("M", [1, 4])
@pytest.mark.parametrize("D", [24, 40])
def test_gate_forward_and_gradients_match_reference(M, D):
    inputs = gate_inputs(2, 37, M, D)
    out = gating.fused_gate(*inputs)
    expected = reference.gated_value(*inputs)
    assert_rel(out, expected)
    assert out[0, 5, 0].eq(0.5 * inputs[1][0, 5, 0]).all()  # logit 0: alpha = sigmoid(0)
    for got, want in zip(grads(out, inputs), grads(expected, inputs)):
        assert_rel(got, want)


@pytest.mark.parametrize("M", [1, 4])
@pytest.mark.parametrize("D,K,dilation", [(24, 4, 3), (40, 4, 2), (24, 3, 5)])
def test_value_path_forward_and_gradients_match_reference(M, D, K, dilation):
    inputs = value_inputs(2, 37, M, D, K)
    out = gating.fused_value_path(inputs[0], inputs[1], inputs[2], dilation)
    expected = reference.value_path(inputs[0], inputs[1], inputs[2], dilation)
    assert_rel(out, expected)
    for got, want in zip(grads(out, inputs), grads(expected, inputs)):
        assert_rel(got, want)


def test_many_tiles_per_program_match_reference():
    """16-token tiles and 2 programs: the backward's loop over tiles, the partial weight-gradient
    sums across programs, a ragged last tile, and tiles spanning two sequences."""
    M, D = 4, 24
    gate_in = gate_inputs(2, 37, M, D, seed=3)
    out = gating.fused_gate(*gate_in, block_n=16, max_programs=2)
    expected = reference.gated_value(*gate_in)
    assert_rel(out, expected)
    for got, want in zip(grads(out, gate_in), grads(expected, gate_in)):
        assert_rel(got, want)
    value_in = value_inputs(2, 37, M, D, 4, seed=4)
    out = gating.fused_value_path(*value_in, 3, block_n=16, max_programs=2)
    expected = reference.value_path(*value_in, 3)
    assert_rel(out, expected)
    for got, want in zip(grads(out, value_in), grads(expected, value_in)):
        assert_rel(got, want)


def test_value_path_of_an_expanded_value_matches_reference():
    """use_gate=False feeds the shared value expanded over M (stride 0): read in place, and its
    gradient is the sum over branches."""
    B, T, M, D = 2, 37, 4, 24
    value, wn, conv = value_inputs(B, T, 1, D, 4)
    wn4 = (1.0 + 0.3 * torch.randn(M, D, generator=torch.Generator().manual_seed(5))).to(DEVICE).requires_grad_(True)
    conv4 = torch.randn(M * D, 1, 4, generator=torch.Generator().manual_seed(6)).to(DEVICE).requires_grad_(True)
    gated = value.expand(B, T, M, D)
    out = gating.fused_value_path(gated, wn4, conv4, 3)
    expected = reference.value_path(gated, wn4, conv4, 3)
    assert_rel(out, expected)
    for got, want in zip(grads(out, [value, wn4, conv4]), grads(expected, [value, wn4, conv4])):
        assert_rel(got, want)


def small_engram(M: int, use_gate: bool, kernels: str) -> Engram:
    cfg = EngramConfig(hidden_size=24, num_branches=M, max_ngram=3, heads_per_ngram=2, d_mem=10,
                       table_sizes=(11, 13), layer_ids=(0,), use_gate=use_gate)
    module = Engram(cfg, kernels=kernels)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():  # non-trivial norms and conv (the conv starts at zero)
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if p.ndim == 1 else 0.0))
    return module.to(DEVICE)


@pytest.mark.parametrize("M", [1, 4])
@pytest.mark.parametrize("use_gate", [True, False])
def test_engram_triton_path_matches_its_torch_path(M, use_gate):
    fused, plain = small_engram(M, use_gate, "triton"), small_engram(M, use_gate, "torch")
    g = torch.Generator().manual_seed(8)
    hidden = torch.randn(2, 37, M, 24, generator=g).to(DEVICE).requires_grad_(True)
    rows = torch.randn(2, 37, fused.cfg.retrieved_width, generator=g).to(DEVICE).requires_grad_(True)
    out, expected = fused(hidden, rows), plain(hidden, rows)
    assert_rel(out, expected)
    params = dict(fused.named_parameters())
    want = grads(expected, [hidden, rows, *(p for _, p in plain.named_parameters())])
    got = grads(out, [hidden, rows, *params.values()])
    for name, a, b in zip(["hidden", "rows", *params], got, want):
        if b is None:  # without a gate neither hidden nor the query and key norms are used
            assert a is None and not use_gate and (name == "hidden" or "y_norms" in name), name
        else:
            assert_rel(a, b)


def test_kernel_switch():
    cfg = EngramConfig(hidden_size=24, num_branches=2, d_mem=8, table_sizes=(11, 13))
    hidden = torch.zeros(1, 3, 2, 24)
    assert not Engram(cfg).uses_triton(hidden)  # "auto" on a CPU tensor
    assert Engram(cfg, kernels="triton").uses_triton(hidden)
    assert not Engram(cfg, kernels="torch").uses_triton(hidden)
    with pytest.raises(ValueError, match="kernels 'cuda' must be one of"):
        Engram(cfg, kernels="cuda")


def test_launchers_name_bad_shapes_and_dtypes():
    hidden, projected, wq, wk = (x.detach() for x in gate_inputs(1, 7, 2, 24))
    with pytest.raises(ValueError, match=r"projected must be \(1, 7, 3, 24\)"):
        gating.gate_forward(hidden, projected[:, :, :2], wq, wk, 1e-6)
    with pytest.raises(ValueError, match=r"wk must have shape \(2, 24\), got \(2, 23\)"):
        gating.gate_forward(hidden, projected, wq, wk[:, :23], 1e-6)
    with pytest.raises(ValueError, match="hidden dtype torch.float64 not supported"):
        gating.gate_forward(hidden.double(), projected.double(), wq, wk, 1e-6)
    with pytest.raises(ValueError, match=r"conv_weight must be \(M\*D, 1, K\) = \(48, 1, K\)"):
        gating.value_forward(hidden, wq, torch.zeros(24, 1, 4, device=DEVICE), 3, 1e-6)
    with pytest.raises(ValueError, match="block_n 12 must be a power of two"):
        gating.gate_forward(hidden, projected, wq, wk, 1e-6, block_n=12)


# ------------------------------------------------------------------ GPU: bf16 against fp32
def bf16_and_fp32(inputs: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The inputs rounded to bf16, and the same values in fp32 for the reference."""
    low = [x.detach().bfloat16().requires_grad_(True) for x in inputs]
    return low, [x.detach().float().requires_grad_(True) for x in low]


@pytest.mark.gpu
@pytest.mark.parametrize("D", [1024, 1000])
def test_bf16_gate_on_cuda_matches_fp32_reference(D):
    low, ref = bf16_and_fp32([x.cuda() for x in gate_inputs(4, 512, 4, D)])
    out, expected = gating.fused_gate(*low), reference.gated_value(*ref)
    assert out.dtype == torch.bfloat16
    assert_rel(out, expected, tol=1e-2)
    for got, want in zip(grads(out, low), grads(expected, ref)):
        assert_rel(got, want, tol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("D", [1024, 1000])
def test_bf16_value_path_on_cuda_matches_fp32_reference(D):
    low, ref = bf16_and_fp32([x.cuda() for x in value_inputs(4, 512, 4, D, 4)])
    out, expected = gating.fused_value_path(*low, 3), reference.value_path(*ref, 3)
    assert out.dtype == torch.bfloat16
    assert_rel(out, expected, tol=1e-2)
    for got, want in zip(grads(out, low), grads(expected, ref)):
        assert_rel(got, want, tol=2e-2)


@pytest.mark.gpu
def test_bf16_engram_on_cuda_uses_kernels_and_matches_fp32_torch_path():
    cfg = EngramConfig(hidden_size=1024, num_branches=4, heads_per_ngram=8, d_mem=512, table_sizes=(11, 13))
    plain = Engram(cfg, kernels="torch").cuda()
    torch.nn.init.normal_(plain.conv.weight, std=0.3)
    fused = Engram(cfg).cuda().bfloat16()  # "auto"
    fused.load_state_dict(plain.state_dict())
    hidden = torch.randn(2, 512, 4, 1024, device="cuda").bfloat16()
    rows = torch.randn(2, 512, cfg.retrieved_width, device="cuda").bfloat16()
    assert fused.uses_triton(hidden)
    assert_rel(fused(hidden, rows), plain(hidden.float(), rows.float()), tol=3e-2)


def test_without_triton_the_model_runs_on_the_reference():
    """triton is an optional extra (engram-memory[gpu]): in a process where it cannot be imported,
    the Engram module imports and runs forward and backward (auto takes the PyTorch reference),
    and triton_installed() says so."""
    import subprocess
    import sys

    script = (
        "import sys\n"
        "class Hide:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'triton' or name.startswith('triton.'):\n"
        "            raise ModuleNotFoundError(name)\n"
        "sys.meta_path.insert(0, Hide())\n"
        "import torch\n"
        "from trainer.kernels import triton_installed\n"
        "from trainer.engram import Engram, EngramConfig\n"
        "assert not triton_installed()\n"
        "cfg = EngramConfig(hidden_size=24, num_branches=2, d_mem=8, table_sizes=(11, 13))\n"
        "module = Engram(cfg)\n"
        "hidden = torch.randn(2, 5, 2, 24, requires_grad=True)\n"
        "rows = torch.randn(2, 5, cfg.retrieved_width)\n"
        "module(hidden, rows).sum().backward()\n"
        "assert 'triton' not in sys.modules\n"
        "print('ok')\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
